#!/usr/bin/env python
"""Air-only slice skipping against the full path on the real volumes: the accuracy gate and the time saved.

For each volume (Colin27 T1 MR, InVesalius Cranium CT; see ``Testing/fastpath_gate.py``) and each model, the
volume is segmented through ``hsam.engine.pipeline.segment_image`` twice, ``skip_air=False`` (every slice
through the model, the reference) and ``skip_air=True``, and the two label maps go through the gate (≥ 99.5 %
voxel agreement, per-class Dice ≥ 0.99). Both are also compared with the volume's reference labels (the grouped
AAL atlas; the Cranium threshold labels), which have nothing on the air-only slices.

Models:
  ``litemedsam``  the offline LiteMedSAM base fine-tuned in fast mode on every 10th labelled slice of the
                  volume (160 steps, the product's default fast fine-tune), at full resolution;
  ``tiny``        the tiny test model fine-tuned the same way (600 steps), on the volume shrunk in-plane
                  (Colin27 ÷3, Cranium ÷4) — the configuration of the test
                  ``Testing/core/test_air.py::test_air_skipping_passes_the_gate_on_real_volumes``;
  ``untrained``   the tiny model with untrained heads (shrunk volumes), ``untrained-litemedsam`` the LiteMedSAM
                  base with its untrained class heads (full size), for reference: the pipeline refuses such
                  models; the gate is computed anyway to show what it measures.

    python Testing/benchmarks/air_skip_gate.py [--models litemedsam,tiny,untrained] [--threads 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_pair(image, loaded, **options):
    import SimpleITK as sitk

    from hsam.engine.pipeline import segment_image

    loaded.require_trained = lambda: None  # the untrained reference models are measured too
    t0 = time.perf_counter()
    off = segment_image(image, loaded, skip_air=False, **options)
    t1 = time.perf_counter()
    on = segment_image(image, loaded, skip_air=True, **options)
    t2 = time.perf_counter()
    return sitk.GetArrayFromImage(off.labels), sitk.GetArrayFromImage(on.labels), on, t1 - t0, t2 - t1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="litemedsam,tiny,untrained")
    parser.add_argument("--volumes", default="colin27,cranium")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)

    import logging

    import numpy as np
    import torch

    from fastpath_gate import colin27, cranium, gate, given_every, trained_tiny
    from hsam.description import IntensitySpec
    from hsam.engine.finetune import finetune
    from hsam.weights.litemedsam import build_litemedsam_base
    from hsam.weights.loader import LoadedModel

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    specs = {"colin27": (colin27, IntensitySpec("percentile", 0.5, 99.5, "MR"), 3),
             "cranium": (cranium, IntensitySpec("window", -125.0, 275.0, "CT"), 4)}
    rows = []
    for volume in args.volumes.split(","):
        load, intensity, shrink = specs[volume]
        for model_name in args.models.split(","):
            jobs = []
            if model_name == "litemedsam":
                image, labels, labelset = load(1)
                t = time.perf_counter()
                model, desc, _ = build_litemedsam_base(labelset, intensity=intensity)
                base = LoadedModel(model.eval(), desc, "litemedsam-base")
                tuned = finetune(image, labels, given_every(labels), base, labelset=labelset, save=False,
                                 cache=False, device="cpu", precision="fp32", validation=0.0).loaded
                jobs.append(("litemedsam-base fine-tuned (fast, 160 steps)", image, labels, tuned,
                             time.perf_counter() - t))
            elif model_name == "tiny":
                image, labels, labelset = load(shrink)
                t = time.perf_counter()
                tuned = trained_tiny(image, labels, labelset, intensity, steps=600)
                jobs.append((f"tiny fine-tuned (fast, 600 steps), ÷{shrink} in-plane", image, labels, tuned,
                             time.perf_counter() - t))
            elif model_name == "untrained":
                from hsam_testlib import make_tiny_model_file
                from hsam.weights.loader import load_model
                import tempfile

                image, labels, labelset = load(shrink)
                tiny = load_model(checkpoint=make_tiny_model_file(Path(tempfile.mkdtemp()) / "t.safetensors",
                                                                  intensity=intensity))
                jobs.append((f"tiny untrained, ÷{shrink} in-plane", image, labels, tiny, 0.0))
            elif model_name == "untrained-litemedsam":
                full, truth, labelset = load(1)
                model, desc, _ = build_litemedsam_base(labelset, intensity=intensity)
                jobs.append(("litemedsam-base untrained heads", full, truth, LoadedModel(model.eval(), desc, "base"),
                             0.0))
            for title, image, truth, loaded, train_s in jobs:
                off, on, result, t_off, t_on = run_pair(image, loaded, device="cpu")
                g = gate(off, on)
                truth_off, truth_on = gate(truth, off), gate(truth, on)
                skipped = result.skipped_slices
                kept_equal = bool(np.array_equal(np.delete(off, skipped, axis=0), np.delete(on, skipped, axis=0))) \
                    if result.skipped_axis == "k" else None
                row = {"volume": volume, "model": title, "size": list(image.GetSize()),
                       "skipped": f"{result.skipped_axis} = {skipped}", "n_skipped": len(skipped),
                       "agreement": round(g.agreement, 6), "min_dice": round(g.min_dice, 6),
                       "dice": {str(k): round(v, 6) for k, v in g.dice.items()}, "passes": g.passes,
                       "kept_slices_identical": kept_equal,
                       "labels_on_skipped_without_skipping": np.bincount(off[skipped].ravel()).tolist() if skipped
                       and result.skipped_axis == "k" else [],
                       "seconds_skip_off": round(t_off, 2), "seconds_skip_on": round(t_on, 2),
                       "time_ratio_on_over_off": round(t_on / t_off, 3), "finetune_seconds": round(train_s, 1),
                       "vs_truth": {"skip_off": {"agreement": truth_off.agreement, "dice": truth_off.dice},
                                    "skip_on": {"agreement": truth_on.agreement, "dice": truth_on.dice}}}
                rows.append(row)
                print(f"{volume:8s} {title:48s} skipped {len(skipped):3d} {g.summary()}  time on/off "
                      f"{t_on:.1f}/{t_off:.1f} s = {t_on / t_off:.3f}; kept slices identical: {kept_equal}; vs the "
                      f"reference labels: mean Dice {np.mean(list(truth_off.dice.values())):.4f} off, "
                      f"{np.mean(list(truth_on.dice.values())):.4f} on",
                      flush=True)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
