"""One short script that checks and times ``hsam train`` on GPUs (run it whenever a GPU machine is available).

    python Testing/gpu/check_train_gpu.py [--steps 6] [--json OUT.json]
    python Testing/gpu/check_train_gpu.py --device cpu --tiny      # dry run of the script itself (CPU, tiny model)

On the first CUDA device, with a randomly initialised ViT-B/512 H-SAM (LoRA rank 5) and synthetic 512² CT-like
volumes:
  1. speed and memory: slices/s and peak GPU memory of single-process training, bf16 autocast, with and without
     gradient checkpointing (global batch 8);
  2. bf16 vs fp32: the first steps' losses agree (|Δ| < 0.02);
  3. several GPUs (when torch.cuda.device_count() >= 2): ``torchrun --nproc_per_node 2`` (nccl) with global batch
     8 ends with parameters within 1e-3 (fp32) of the single-process run.
Prints a JSON record (and writes it with --json). Target total time: < 5 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "HSAMCore"))
sys.path.insert(0, str(REPO / "Testing"))


def make_data(root: Path, size: int, depth: int, cases: int = 2) -> Path:
    from hsam_testlib import write_training_dataset

    return write_training_dataset(root, cases=cases, shape=(depth, size, size))


def make_model(path: Path, tiny: bool) -> Path:
    from hsam.data.labels import SYNAPSE_ORGANS
    from hsam.description import IntensitySpec, ModelDescription, OrientationSpec, sam_vit_architecture
    from hsam.model import build_from_description
    from hsam.weights.modelfile import save_model_file

    from hsam_testlib import TINY_DECODER, TINY_ENCODER

    arch = (sam_vit_architecture("vit_b", image_size=64, lora_rank=2, decoder=dict(TINY_DECODER), **TINY_ENCODER)
            if tiny else sam_vit_architecture("vit_b", image_size=512, lora_rank=5))
    description = ModelDescription(name="train-gpu-check", title="random H-SAM for the training check",
                                   architecture=arch, labels=SYNAPSE_ORGANS,
                                   intensity=IntensitySpec("window", -125.0, 275.0, "CT"),
                                   orientation=OrientationSpec(verified=True, source="test"),
                                   provenance={"source": "tests"}, licence="MIT")
    torch.manual_seed(0)
    model = build_from_description(description)
    save_model_file(path, {k: v.detach().clone() for k, v in model.state_dict().items()}, description)
    return path


def run_once(data: Path, model: Path, out: Path, device: str, **settings) -> dict:
    from hsam.engine.train import train
    from hsam.weights.loader import load_model_file

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = train(data, load_model_file(model), out=out, device=device, **settings)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rates = [float(r["slices_per_s"]) for r in result.history[1:]] or [0.0]
    return {"seconds": round(seconds, 2), "slices_per_s_median": round(float(np.median(rates)), 2),
            "losses": [float(r["loss"]) for r in result.history],
            "peak_gpu_mb": (round(torch.cuda.max_memory_allocated() / 2 ** 20) if device.startswith("cuda")
                            else None)}


def max_diff(a_path: Path, b_path: Path) -> float:
    from hsam.weights.modelfile import read_model_file

    a, _ = read_model_file(a_path)
    b, _ = read_model_file(b_path)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny 64 px model (dry run)")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    record: dict = {"torch": torch.__version__, "device": args.device}
    if args.device.startswith("cuda"):
        record["gpu"] = torch.cuda.get_device_name(0)
    work = Path(tempfile.mkdtemp(prefix="hsam_train_gpu_"))
    os.environ.setdefault("HSAM_HOME", str(work / "home"))
    data = make_data(work / "data", 32 if args.tiny else 512, 8)
    model = make_model(work / "base.safetensors", args.tiny)
    common = dict(global_batch=8, steps=args.steps, warmup=1, lr=1e-3, fraction=1.0)
    bf16 = "bf16" if args.device.startswith("cuda") else "fp32"
    record["bf16"] = run_once(data, model, work / "bf16.safetensors", args.device, precision=bf16, **common)
    record["bf16_grad_checkpoint"] = run_once(data, model, work / "bf16_gc.safetensors", args.device,
                                              precision=bf16, grad_checkpoint=True, **common)
    record["fp32"] = run_once(data, model, work / "fp32.safetensors", args.device, precision="fp32", **common)
    record["bf16_vs_fp32_loss_max_abs"] = max(abs(a - b) for a, b in zip(record["bf16"]["losses"],
                                                                        record["fp32"]["losses"]))
    ok = record["bf16_vs_fp32_loss_max_abs"] < 0.02
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 2
    if gpus >= 2:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "hsam.cli", "train", str(data), "--out", str(work / "ddp.safetensors"), "--base", str(model),
               "--global-batch", "8", "--steps", str(args.steps), "--warmup", "1", "--lr", "1e-3", "--fraction", "1",
               "--precision", "fp32", "--device", "cuda" if args.device.startswith("cuda") else "cpu", "--quiet"]
        env = {**os.environ, "PYTHONPATH": str(REPO / "HSAMCore") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        record["ddp_2_processes"] = {"returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 1)}
        if proc.returncode == 0:
            diff = max_diff(work / "fp32.safetensors", work / "ddp.safetensors")
            record["ddp_2_processes"]["max_abs_param_diff_vs_1_process"] = diff
            ok = ok and diff < 1e-3
        else:
            record["ddp_2_processes"]["stderr_tail"] = proc.stderr[-3000:]
            ok = False
    record["ok"] = bool(ok)
    text = json.dumps(record, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
