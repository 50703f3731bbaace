#!/usr/bin/env python
"""Few-shot benchmark on real MR data: H-SAM fine-tuned from a few labelled slices vs what a Slicer user
would otherwise do with the same slices. Rerunnable script, not a test.

Data: the Colin27 T1 template (``ch2.nii.gz``; Holmes et al., J Comput Assist Tomogr 22(2):324–333, 1998) and
the AAL atlas drawn on it (``aal.nii.gz``, ``aal.nii.txt``; Tzourio-Mazoyer et al., "Automated anatomical
labeling of activations in SPM using a macroscopic anatomical parcellation of the MNI MRI single-subject brain",
NeuroImage 15(1):273–289, 2002), both from the Debian package ``mricron-data``. The 116 AAL regions are grouped
into 7 structures by their code family (``hsam/data/tables/aal_groups.json``).

Protocol (``hsam.engine.fewshot``): the atlas labels of every n-th axial slice (k plane) of the labelled
extent are given, from its first slice on — n = 40, 20, 10, 5 ≈ 2.5 / 5 / 10 / 20 % of the 146 labelled
slices; every other slice of the extent is segmented; Dice per structure over those slices, mean over the 7.
Methods on the same given slices: H-SAM fast fine-tuning from the offline LiteMedSAM base then prompt-free
segmentation (``hsam``), the same model guided by the given slices around each slice, their labels propagated
onto it by 2D deformable registration (``hsam-guided``), that propagated prior alone (``propagation``), the prior
without registration (``guidance``: blurred, distance-weighted labels of the given slices below and above), ITK
morphological contour interpolation (Slicer's Fill between slices; PyPI itk-morphologicalcontourinterpolation)
and nearest-given-slice copy. The embeddings of the extent are computed once (and cached on disk, so a rerun
skips them) and shared by all levels.

    python Testing/benchmarks/fewshot_colin27.py [--out DIR] [--levels 40,20,10,5] [--steps N] [--quick]

Writes ``fewshot_colin27.md`` (tables), ``fewshot_colin27.json`` (everything, with timings and settings) and
``fewshot_colin27.png`` (mean Dice vs % of slices given) into ``--out`` (default ./fewshot_colin27).
``--quick``: the same code path on a 24-slice window with every 6th slice given and 6 steps (CI smoke run).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="fewshot_colin27", help="output folder")
    parser.add_argument("--levels", default="40,20,10,5", help="every n-th slice given (comma-separated n)")
    parser.add_argument("--steps", type=int, help="fine-tuning steps per level (default: the fast mode's)")
    parser.add_argument("--seed", type=int, default=2345)
    parser.add_argument("--validation", type=float, default=0.2, help="share of given slices held out (0: none)")
    parser.add_argument("--guidance", type=float, help="share of guided training batches (default: the fast mode's)")
    parser.add_argument("--methods", default="hsam,hsam-guided,propagation,guidance,interpolation,nearest")
    parser.add_argument("--data", help="folder with ch2.nii.gz, aal.nii.gz, aal.nii.txt")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--quick", action="store_true", help="a 24-slice window, every 6th slice, 6 steps")
    args = parser.parse_args(argv)

    from hsam.threads import prefer_passive_openmp

    prefer_passive_openmp()
    import logging

    import torch

    from hsam import __version__
    from hsam.engine.fewshot import (base_model, extent_embeddings, load_colin27, markdown_table, results_json,
                                     run_level, write_json, write_plot)
    from hsam.engine.finetune import FinetuneSettings, autocast_dtype

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    case = load_colin27(args.data)
    levels = [int(n) for n in args.levels.split(",") if n.strip()]
    steps = args.steps
    if args.quick:
        middle = case.extent[len(case.extent) // 2]
        case.extent = list(range(middle - 12, middle + 12))
        levels, steps = [6], steps or 6
    settings = FinetuneSettings(steps=steps, seed=args.seed, precision=args.precision, device="cpu",
                                validation=args.validation, guidance=args.guidance)
    dtype = autocast_dtype(torch.device("cpu"), args.precision)
    base = base_model(case.labelset)
    t = time.perf_counter()
    embeddings = extent_embeddings(case, base, dtype)
    embed_seconds = time.perf_counter() - t
    print(f"embeddings of {len(case.extent)} slices: {embed_seconds:.0f} s", file=sys.stderr)
    results = []
    for every in levels:
        t = time.perf_counter()
        level = run_level(case, every, args.methods.split(","), base=base, settings=settings, embeddings=embeddings,
                          dtype=dtype)
        results.append(level)
        summary = ", ".join(f"{m} {r.mean:.3f}" for m, r in level.methods.items())
        print(f"every {every}th slice ({level.percent:g} %): {summary} [{time.perf_counter() - t:.0f} s]",
              file=sys.stderr)
    total = time.perf_counter() - started
    machine = {"python": platform.python_version(), "torch": torch.__version__, "hsam": __version__,
               "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "threads": torch.get_num_threads(), "load_average_1min_at_end": os.getloadavg()[0],
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}
    extra = {"benchmark": "fewshot_colin27", "quick": args.quick, "extent": [case.extent[0], case.extent[-1]],
             "embedding_seconds": round(embed_seconds, 1), "total_seconds": round(total, 1),
             "precision": "fp32" if dtype is None else str(dtype).removeprefix("torch."),
             "settings": settings.to_json(), "machine": machine, "citation": case.groups.citation}
    results.sort(key=lambda lv: lv.percent)
    table = markdown_table(results, case.labelset)
    header = (f"# Few-shot benchmark: Colin27 T1 + AAL (7 structures)\n\n"
              f"hsam {__version__}, torch {torch.__version__}, {os.cpu_count()} CPU cores "
              f"({torch.get_num_threads()} threads), {extra['precision']}; embeddings of the {len(case.extent)} "
              f"extent slices {embed_seconds:.0f} s (shared by all levels); total {total:.0f} s. Seconds per method "
              f"= fine-tuning + segmentation of that level (H-SAM), or the baseline's own time.\n\n")
    (out / "fewshot_colin27.md").write_text(header + table, encoding="utf-8")
    write_json(results_json(results, extra), out / "fewshot_colin27.json")
    write_plot(results, out / "fewshot_colin27.png")
    print(header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
