#!/usr/bin/env python
"""int8 dynamic quantisation of the image encoder's linear layers on the CPU: speed and agreement.

Variants (all on the segmenter's prepared model: LoRA merged, SDPA attention, batch 1):
  ``fp32``            precision="fp32"
  ``bf16``            the current CPU default where bf16 is native: the bf16 recipe (proj + MLP linears in bf16)
  ``int8-all``        fp32 model, then ``torch.ao.quantization.quantize_dynamic`` (qint8 weights per tensor,
                      activations quantised per call) on every encoder linear: qkv, proj, lin1, lin2
  ``int8-mlp-proj``   the same on proj + MLP only, qkv kept fp32 (the bf16 recipe's split)
  ``int8+bf16-qkv``   int8 proj + MLP, qkv in bf16
  ``int8``            ``precision="int8"``, the opt-in option: ``hsam.engine.inference.int8_encoder_linears``
                      (every encoder linear, weights per output channel)
  ``int8pc-*``        int8-all / int8-mlp-proj with weights quantised per output channel
                      (``per_channel_dynamic_qconfig``): ``int8pc-all`` (= ``int8``), ``int8pc-mlp-proj``, and
                      ``int8pc-mlp`` (lin1 + lin2 only)

Speed: per-slice seconds of the bare encoder on a random 512² batch of 1 and of the whole segmenter on a
synthetic CT slice, variants interleaved slice by slice (a shared machine drifts; interleaving keeps the
ratios fair), median over ``--slices`` after one warm-up each.

Agreement (the fast-path gate, ``Testing/fastpath_gate.py``: ≥ 99.5 % voxels and per-class Dice ≥ 0.99 vs
fp32): the labels of each variant against fp32 on the fixture image (2 slices, official-layout deterministic
weights) and on ``--real-slices`` slices evenly spread over the Colin27 MR (percentile normalisation) and the
Cranium CT (window [-125, 275]), with the same fixture-weight model (ViT-B/512). With ``--backbone
litemedsam`` the model is the LiteMedSAM base (real TinyViT weights, untrained class heads).

    python Testing/benchmarks/int8_encoder.py --threads 1 [--slices 5] [--real-slices 8] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def quantize_linears(encoder, names: tuple[str, ...] | None, per_channel: bool = False):
    """Dynamic int8 on the encoder's ``nn.Linear`` modules (all, or the blocks' ones whose dotted name ends with
    one of ``names``), in place; weights quantised per tensor, or per output channel."""
    import torch
    from torch import nn

    q = torch.ao.quantization
    qconfig = q.per_channel_dynamic_qconfig if per_channel else q.default_dynamic_qconfig
    spec = {n: qconfig for n, m in encoder.named_modules()
            if isinstance(m, nn.Linear) and (names is None or n.endswith(names))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.ao.quantization.quantize_dynamic(encoder, spec, dtype=torch.qint8, inplace=True)
    return encoder


def build_variants(model, k: int, size: int, names: list[str]):
    import torch

    from hsam.engine.device import cpu_has_native_bf16
    from hsam.engine.inference import BF16Linear, SliceSegmenter

    out = {}
    for name in names:
        if name == "int8":  # the opt-in option itself (= int8pc-all)
            seg = SliceSegmenter(model, k, size, device="cpu", precision="int8", batch_size=1)
        elif name == "bf16":
            if not cpu_has_native_bf16():
                continue
            seg = SliceSegmenter(model, k, size, device="cpu", precision="bf16", batch_size=1)
            if seg.dtype is None:
                continue  # the recipe does not apply (no SAM blocks)
        else:
            seg = SliceSegmenter(model, k, size, device="cpu", precision="fp32", batch_size=1)
            enc = seg.model.image_encoder
            if name in ("int8-all", "int8pc-all"):
                quantize_linears(enc, None, per_channel=name.startswith("int8pc"))
            elif name in ("int8-mlp-proj", "int8pc-mlp-proj"):
                quantize_linears(enc, ("attn.proj", "mlp.lin1", "mlp.lin2"), per_channel=name.startswith("int8pc"))
            elif name == "int8pc-mlp":
                quantize_linears(enc, ("mlp.lin1", "mlp.lin2"), per_channel=True)
            elif name == "int8+bf16-qkv":
                quantize_linears(enc, ("attn.proj", "mlp.lin1", "mlp.lin2"))
                for block in getattr(enc, "blocks", ()):
                    block.attn.qkv = BF16Linear(block.attn.qkv)
            elif name != "fp32":
                raise ValueError(name)
        out[name] = seg
    return out


def time_variants(variants: dict, slices, n: int) -> dict:
    """Interleaved per-slice seconds: {name: {"encoder": [...], "pipeline": [...]}}."""
    import torch

    times = {name: {"encoder": [], "pipeline": []} for name in variants}
    size = next(iter(variants.values())).image_size
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    for i in range(n + 1):  # i = 0: warm-up
        for name, seg in variants.items():
            with torch.inference_mode():
                t = time.perf_counter()
                seg.model.encode(x)
                enc = time.perf_counter() - t
            t = time.perf_counter()
            seg.segment(slices[i % len(slices)][None])
            pipe = time.perf_counter() - t
            if i:
                times[name]["encoder"].append(enc)
                times[name]["pipeline"].append(pipe)
    return times


def real_slices(count: int, size: int) -> dict:
    """{volume: (count, H, W) float32 in [0, 1]} evenly spread over the body slices, model (SPL) order."""
    import numpy as np
    import SimpleITK as sitk

    from fastpath_gate import colin27, cranium
    from hsam.data.intensity import IntensityNormalizer
    from hsam.data.orientation import reorientation_for
    from hsam.description import IntensitySpec, OrientationSpec
    from hsam.engine.air import air_slices, body_threshold

    out = {}
    for name, load, spec in (("colin27", colin27, IntensitySpec("percentile", 0.5, 99.5, "MR")),
                             ("cranium", cranium, IntensitySpec("window", -125.0, 275.0, "CT"))):
        image = load(1)[0]
        volume = sitk.GetArrayViewFromImage(image)
        normalizer = IntensityNormalizer.fit(volume, spec)
        raw = reorientation_for(image, OrientationSpec()).to_model(volume)
        body = np.flatnonzero(~air_slices(raw, body_threshold(normalizer)))
        pick = body[np.linspace(0, len(body) - 1, count).round().astype(int)]
        out[name] = normalizer.apply(raw[pick])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="sam_vit_b", choices=["sam_vit_b", "litemedsam"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--slices", type=int, default=5, help="timed slices per variant (after one warm-up)")
    parser.add_argument("--real-slices", type=int, default=8, help="slices per real volume for the agreement")
    parser.add_argument("--variants", default="fp32,bf16,int8,int8-all,int8-mlp-proj,int8pc-mlp")
    parser.add_argument("--json", help="write everything here")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from fastpath_gate import gate
    from hsam.bench import synthetic_ct

    torch.set_num_threads(args.threads)
    if args.backbone == "sam_vit_b":
        from hsam_testlib import reference_fixture_path
        from hsam.weights.official import load_official
        import importlib.util

        path = reference_fixture_path()
        spec = importlib.util.spec_from_file_location("reference_weights", path.parent / "reference_weights.py")
        rule = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(rule)
        sam_keys = json.loads((path.parent / "sam_vit_b_base_keys.json").read_text())
        hsam_keys = json.loads((path.parent / "hsam_official_ckpt_keys.json").read_text())
        model, desc, _ = load_official({k: rule.reference_tensor(k, s) for k, (s, _d) in sam_keys.items()},
                                       {k: rule.reference_tensor(k, s) for k, s in hsam_keys.items()})
        fixture = {"fixture": dict(np.load(path))["image"]}
    else:
        from hsam.data.labels import SYNAPSE_ORGANS
        from hsam.weights.litemedsam import build_litemedsam_base

        model, desc, _ = build_litemedsam_base(SYNAPSE_ORGANS)
        model.eval()
        fixture = {}
    k, size = desc.num_classes, desc.image_size
    variants = build_variants(model, k, size, args.variants.split(","))
    print(f"{args.backbone}: variants {list(variants)}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s), {platform.processor() or platform.machine()}", flush=True)

    times = time_variants(variants, synthetic_ct(args.slices, 512, 512), args.slices)
    med = {n: {p: statistics.median(v) for p, v in t.items()} for n, t in times.items()}
    default = "bf16" if "bf16" in med else "fp32"

    volumes = {**fixture, **real_slices(args.real_slices, size)}
    labels = {n: {v: seg.segment(x) for v, x in volumes.items()} for n, seg in variants.items()}
    rows = []
    print(f"\n| variant | encoder s/slice | pipeline s/slice | pipeline × vs fp32 | × vs {default} (default) | "
          + " | ".join(f"{v} agreement / min Dice vs fp32" for v in volumes) + " | gate |")
    print("|---" * (6 + len(volumes)) + "|")
    for name in variants:
        gates = {v: gate(labels["fp32"][v], labels[name][v]) for v in volumes}
        row = {"variant": name, "encoder_s": med[name]["encoder"], "pipeline_s": med[name]["pipeline"],
               "speedup_vs_fp32": med["fp32"]["pipeline"] / med[name]["pipeline"],
               "speedup_vs_default": med[default]["pipeline"] / med[name]["pipeline"],
               "encoder_speedup_vs_fp32": med["fp32"]["encoder"] / med[name]["encoder"],
               "gates": {v: {"agreement": g.agreement, "min_dice": g.min_dice, "dice": g.dice, "passes": g.passes}
                         for v, g in gates.items()},
               "passes": all(g.passes for g in gates.values()), "times": times[name]}
        rows.append(row)
        print(f"| {name} | {row['encoder_s']:.3f} | {row['pipeline_s']:.3f} | {row['speedup_vs_fp32']:.2f} | "
              f"{row['speedup_vs_default']:.2f} | "
              + " | ".join(f"{g.agreement:.2%} / {g.min_dice:.3f}" for g in gates.values())
              + f" | {'pass' if row['passes'] else 'FAIL'} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"backbone": args.backbone, "threads": args.threads,
                                               "torch": torch.__version__, "rows": rows}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
