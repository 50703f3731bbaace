"""One short script that checks and times the GPU path (run it whenever a GPU machine is available).

    python Testing/gpu/check_gpu.py [--fixture PATH/reference_outputs.npz] [--slices 150] [--json OUT.json]

Checks, on the first CUDA device:
  1. exactness: the official-layout ViT-B/512 model built from the fixture's weight rule reproduces the
     fixture's logits in fp32 on the GPU (max |Δ| < 1e-3) — skipped when no fixture is given/found;
  2. reduced precision: bf16 (or fp16) labels agree with fp32 labels on ≥ 99.5 % of pixels of a 512² CT-like
     volume (and of the fixture images);
  3. speed: SliceSegmenter slices/s at the automatic batch (bf16), the bare encoder's slices/s, a
     512×512×N volume in → labels out wall time after model load, peak GPU memory, and the machine's bf16
     GEMM ceiling measured in the same run (fraction of peak reported);
  4. out-of-memory handling: a batch far too large for the card falls back to smaller batches.
Prints a JSON record (and writes it with --json). Target total time: < 5 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "HSAMCore"))


def bf16_gemm_tflops(n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e12


def official_model(fixture: Path):
    import importlib.util

    from hsam.weights.official import load_official

    spec = importlib.util.spec_from_file_location("reference_weights", fixture.parent / "reference_weights.py")
    rule = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rule)
    sam_keys = json.loads((fixture.parent / "sam_vit_b_base_keys.json").read_text())
    hsam_keys = json.loads((fixture.parent / "hsam_official_ckpt_keys.json").read_text())
    sam = {k: rule.reference_tensor(k, s) for k, (s, _) in sam_keys.items()}
    hsam = {k: rule.reference_tensor(k, s) for k, s in hsam_keys.items()}
    model, description, _ = load_official(sam, hsam)
    return model, description


def random_model():
    from hsam.data.labels import SYNAPSE_ORGANS
    from hsam.description import sam_vit_architecture
    from hsam.model import build_hsam

    torch.manual_seed(0)
    return build_hsam(sam_vit_architecture("vit_b", 512, 5), SYNAPSE_ORGANS.num_classes).eval(), None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixture", type=Path,
                        default=REPO.parent / "shared" / "fixtures" / "hsam_reference" / "reference_outputs.npz")
    parser.add_argument("--slices", type=int, default=150)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    from hsam.bench import synthetic_ct
    from hsam.engine.inference import SliceSegmenter

    record: dict = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0),
                    "torch": torch.__version__, "cuda": torch.version.cuda}
    t0 = time.perf_counter()
    record["bf16_gemm_tflops"] = round(bf16_gemm_tflops(), 1)
    fixture_ok = args.fixture.is_file()
    model, _ = official_model(args.fixture) if fixture_ok else random_model()
    record["weights"] = "fixture (official layout)" if fixture_ok else "random (timing only)"
    if fixture_ok:
        ref = np.load(args.fixture)
        images = torch.from_numpy(ref["image"]).unsqueeze(1).repeat(1, 3, 1, 1).cuda()
        gpu_model = model.cuda()
        with torch.inference_mode():
            out = gpu_model(images)
            fused = gpu_model.fused_logits(out).argmax(1).cpu().numpy()
        record["fixture_stage2_max_abs_diff_fp32"] = float(
            (out.stage2_logits.cpu() - torch.from_numpy(ref["stage2_logits_512"])).abs().max())
        record["fixture_label_agreement_fp32"] = float((fused == ref["fused_labels"]).mean())
        model = gpu_model.cpu()
    volume = synthetic_ct(args.slices)  # (n, 512, 512) float32 in [0, 1]
    fp32 = SliceSegmenter(model, 9, 512, device="cuda", precision="fp32")
    reduced = SliceSegmenter(model, 9, 512, device="cuda", precision="auto")
    record["batch_size"] = reduced.batch_size
    record["precision"] = str(reduced.dtype)
    labels32 = fp32.segment(volume[:16])
    reduced.segment(volume[:reduced.batch_size])  # warm-up (kernels, allocator)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    labels = reduced.segment(volume)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    record["volume_seconds"] = round(seconds, 3)
    record["slices_per_s"] = round(args.slices / seconds, 1)
    record["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    record["label_agreement_vs_fp32"] = float((labels[:16] == labels32).mean())
    record["gflop_per_slice"] = 231.0
    record["fraction_of_bf16_peak"] = round(record["slices_per_s"] * 231e9 / (record["bf16_gemm_tflops"] * 1e12), 3)
    encoder = reduced.model.image_encoder
    x = torch.rand(reduced.batch_size, 3, 512, 512, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=reduced.dtype or torch.float32,
                                                enabled=reduced.dtype is not None):
        encoder(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            encoder(x)
        torch.cuda.synchronize()
    record["encoder_slices_per_s"] = round(5 * x.shape[0] / (time.perf_counter() - start), 1)
    many = np.concatenate([volume] * max(1, -(-600 // args.slices)))  # ≥ 600 slices: one batch cannot fit
    huge = SliceSegmenter(model, 9, 512, device="cuda", batch_size=len(many), precision="auto")
    huge.segment(many)
    record["oom_fallback_final_batch"] = huge.batch_size
    record["total_seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(record, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    ok = record["label_agreement_vs_fp32"] >= 0.995 and (not fixture_ok or (
        record["fixture_stage2_max_abs_diff_fp32"] < 1e-3 and record["fixture_label_agreement_fp32"] >= 0.9999))
    print("GPU CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
