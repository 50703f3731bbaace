"""Where the peak RSS of ``hsam segment`` occurs: one CT volume through the same calls as the CLI, RSS sampled
every 20 ms and attributed to the step that was running.

    python Testing/benchmarks/memory_profile.py --slices 300 --out DIR [--backbone sam_vit_b] [--threads 2]

Writes a ViT-B/512 model file with seeded random weights (memory does not depend on weight values) and a
synthetic 512×512×N int16 CT (NRRD, as a scanner export would be) into DIR, then in a fresh process: import →
load the model file → read the volume → segment (``segment_image``: model preparation, the slice loop, label
conversion) → write the ``.seg.nrrd``. Prints, per step, the RSS when it started and ended and its peak, and the
process's lifetime peak (``getrusage``); ``--json FILE`` saves the same.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def make_inputs(out: Path, slices: int, backbone: str) -> tuple[Path, Path]:
    import numpy as np
    import SimpleITK as sitk
    import torch

    from hsam.bench import _bench_description, synthetic_ct
    from hsam.model import build_from_description
    from hsam.weights.modelfile import save_model_file

    model_path = out / f"bench-{backbone}.safetensors"
    if not model_path.exists():
        torch.manual_seed(0)
        description = _bench_description(backbone, 9)
        model = build_from_description(description)
        save_model_file(model_path, {k: v.detach().clone() for k, v in model.state_dict().items()}, description)
        del model
    volume_path = out / f"ct-512x512x{slices}.nrrd"
    if not volume_path.exists():
        hu = np.empty((slices, 512, 512), np.int16)
        for start in range(0, slices, 25):  # synthetic_ct is windowed to [0, 1]: map back to HU
            part = synthetic_ct(min(25, slices - start), seed=start)
            hu[start:start + len(part)] = np.round(part * 400.0 - 125.0).astype(np.int16)
        image = sitk.GetImageFromArray(hu)
        image.SetSpacing((0.78, 0.78, 1.5))
        sitk.WriteImage(image, str(volume_path), True)
    return model_path, volume_path


def profile(model_path: str, volume_path: str, output_path: str, threads: int) -> dict:
    """Runs in the measured process: the CLI's steps with RSS sampled throughout."""
    import threading

    import psutil

    proc = psutil.Process()
    current = {"step": "import"}
    steps: dict[str, dict] = {}
    stop = threading.Event()

    def record(rss: int) -> None:
        entry = steps.setdefault(current["step"], {"start_mb": rss / 2**20, "peak_mb": 0.0})
        entry["peak_mb"] = max(entry["peak_mb"], rss / 2**20)
        entry["end_mb"] = rss / 2**20

    def sample() -> None:
        while not stop.wait(0.02):
            record(proc.memory_info().rss)

    def step(name: str) -> None:
        record(proc.memory_info().rss)
        current["step"] = name
        record(proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    import torch

    torch.set_num_threads(threads)
    import hsam.engine.inference as inference
    import hsam.engine.pipeline as pipeline
    from hsam.data.segfile import write_segmentation
    from hsam.data.volume import read_image
    from hsam.weights.loader import load_model_file

    original_prepare, original_segment = inference.prepare_model, inference.SliceSegmenter.segment

    def prepare(*args, **kwargs):
        step("prepare model")
        return original_prepare(*args, **kwargs)

    def segment(self, *args, **kwargs):
        step("slice loop")
        out = original_segment(self, *args, **kwargs)
        step("labels to the input grid")
        return out

    inference.prepare_model = prepare
    inference.SliceSegmenter.segment = segment
    started = time.perf_counter()
    step("load model file")
    loaded = load_model_file(model_path)
    step("read volume")
    image = read_image(volume_path)
    step("checks and reorientation")
    result = pipeline.segment_image(image, loaded, device="cpu")
    step("write .seg.nrrd")
    write_segmentation(result.labels, result.labelset, output_path)
    step("done")
    stop.set()
    sampler.join()
    import resource

    return {"steps": steps, "lifetime_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": time.perf_counter() - started, "engine": result.engine,
            "slices": int(image.GetSize()[2]), "torch": torch.__version__, "threads": threads}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--backbone", default="sam_vit_b", choices=("sam_vit_b", "litemedsam", "tiny"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True, help="folder for the model file, the CT and the output")
    parser.add_argument("--json", help="also save the result here")
    parser.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        print(json.dumps(profile(*args._child, args.threads)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path, volume_path = make_inputs(out, args.slices, args.backbone)
    child = subprocess.run([sys.executable, __file__, "--out", str(out), "--threads", str(args.threads),
                            "--_child", str(model_path), str(volume_path), str(out / "result.seg.nrrd")],
                           capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if child.returncode != 0:
        sys.stderr.write(child.stderr)
        return child.returncode
    result = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"{result['slices']} slices, {result['engine']}, {result['seconds']:.0f} s, lifetime peak RSS "
          f"{result['lifetime_peak_mb']:.0f} MB")
    print(f"{'step':28s} {'start MB':>9s} {'peak MB':>9s} {'end MB':>9s}")
    for name, entry in result["steps"].items():
        print(f"{name:28s} {entry['start_mb']:9.0f} {entry['peak_mb']:9.0f} {entry['end_mb']:9.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
