"""``hsam bench``: how fast H-SAM inference runs here, against the authors'-style loop, and its memory.

Every measured path runs in a fresh Python process (``python -m hsam.bench --worker SPEC``) so its peak RSS is
its own (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at its end; psutil sampling where ``resource`` does not
exist) and one path's allocator state does not slow the next. Weights are random (seeded): inference time
does not depend on weight values, so no download is needed.

Paths, per backbone:

``baseline``   the authors' tester (their ``utils.test_single_volume``): one slice at a time, LoRA unmerged,
               SAM's attention, ``torch.no_grad``, float32, input ``scipy.ndimage.zoom(order=3)`` H→224→S,
               labels back with ``zoom(order=0)``.
``pipeline``   ``SliceSegmenter.segment`` (batched, ``inference_mode``, LoRA merged, fused attention,
               torch resizing, streaming argmax) at a batch size and precision; ``attention=sam`` is the same
               with SAM's original attention (the "before" of the attention change).
``encoder``    the bare image encoder of that same prepared model on random S×S batches (no resizing, no
               decoder): ``pipeline_to_encoder_time_ratio`` = pipeline time / encoder time.
``memory``     the default pipeline on a synthetic 512×512×N CT volume (N = 8 and 24 by default) from array
               to labels; RSS should not grow with N beyond the input and output arrays themselves (5 bytes
               per voxel), so the peak for N = 200 is projected from the measured ones (running 200 slices at
               ~1 s each would take minutes).

Each path is warmed up with one batch, then every batch is timed: ``slices_per_s`` is 1 / the median
per-slice time over the batches (robust to other jobs on a shared machine), ``slices_per_s_total`` the plain
slices / total seconds; ``batch_seconds`` lists them all. Speed-ups and ratios use ``slices_per_s``.

``stages``     the whole product path on a synthetic CT file (``hsam.engine.pipeline.segment_file``: read the
               file, checks, reorientation, normalisation, the segmenter, label values, write a .seg.nrrd) with
               the segmenter's ``StageTimer`` on: wall seconds per slice of ``preprocess``, ``encoder``,
               ``decoders``, ``postprocess`` and ``io`` (read + write), plus the once-per-volume ``setup`` (the
               segmenter's model copy). The timer synchronises the device at each stage boundary.

Ceilings: a process measures what this machine can do with the same thread count (``measure_ceilings``): the
best of ten 2048² float32 GEMMs (GFLOP/s; 8192² on GPUs; on CPUs with native bfloat16 and on CUDA also a
bfloat16 GEMM of the same size) and of a large tensor copy (256 MB, GB/s counted as bytes read + written; on a
GPU a 1 GB device-to-device copy) — once before the paths and once after them, keeping the better of the two
(on a shared machine a single measurement can land in a busy moment and make every fraction look too good).
Every record carries them (``ceilings``) and its ``fraction_of_ceiling`` = ``gflops_per_s`` / the GEMM
ceiling of its precision (bf16 GEMM for bf16/fp16 paths where measured; fp32 GEMM for fp32 and int8); the
stage breakdown does the same for the encoder and the decoders (the stages whose FLOPs are counted), each
against the precision it runs in (the CPU bf16 recipe runs the decoders in fp32).
The FLOP count is the reference model's (see below), so a fraction slightly above 1 is possible for paths
that skip work the count includes.

FLOPs per slice are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the reference model (LoRA
unmerged, SAM attention), batch 1. It counts matrix multiplications and convolutions (2 FLOPs per
multiply-add) and ignores softmax, normalisation and element-wise work. For ViT-B/512 and K = 9 it gives
227.65 GFLOP in the encoder and 230.75 in total, the 227.6 / 231 quoted for H-SAM. (The inference model does
less work than it counts: merged LoRA, and qkv/proj on the 32×32 real tokens instead of the 42×42 padded
grid of the windowed blocks; ``gflops_per_s`` is the reference count divided by time, i.e. "useful"
throughput.)

No torch at import time (the CLI parser imports this module).
"""

from __future__ import annotations

import argparse
import json as _json
import math
import os
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from typing import Any, Iterable

WEIGHTS_NOTE = "random init (seeded): inference time does not depend on weight values"
MEMORY_PROJECTION_SLICES = 200
TINY_ARCHITECTURE: dict[str, Any] = {  # a seconds-fast stand-in for tests and smoke runs
    "variant": "vit_b", "image_size": 64, "lora_rank": 2, "embed_dim": 32, "depth": 2, "num_heads": 2,
    "global_attn_indexes": [1], "window_size": 3, "out_chans": 32,
    "decoder": {"transformer_dim": 32, "num_heads": 2, "mlp_dim": 64},
}
# backbone name → (architecture factory name, K classes incl. background, input slice side)
BACKBONES: dict[str, tuple[str, int, int]] = {
    "sam_vit_b": ("sam_vit_b", 9, 512),
    "litemedsam": ("litemedsam", 9, 512),
    "tiny": ("tiny", 3, 80),
}
REQUIRED_KEYS = ("backbone", "device", "dtype", "batch_size", "slices_per_s", "gflops_per_s", "peak_rss_mb",
                 "baseline_slices_per_s", "speedup_vs_baseline", "ceilings", "ceiling", "ceiling_gflops_per_s",
                 "fraction_of_ceiling")
CEILING_KEYS = ("device", "threads", "gemm_size", "fp32_gemm_gflops_per_s", "bf16_gemm_gflops_per_s",
                "copy_gb_per_s", "copy_kind")
STAGES = ("preprocess", "encoder", "decoders", "postprocess", "io")
STAGE_KEYS = ("seconds", "seconds_per_slice", "share")  # plus gflop_per_slice, gflops_per_s, fraction_of_ceiling
GEMM_SIZE = 2048


def architecture_for(backbone: str) -> dict:
    from .description import litemedsam_architecture, sam_vit_architecture

    if backbone == "sam_vit_b":
        return sam_vit_architecture("vit_b", image_size=512, lora_rank=5)
    if backbone == "litemedsam":
        return litemedsam_architecture()
    if backbone == "tiny":
        spec = dict(TINY_ARCHITECTURE)
        variant, size, rank = spec.pop("variant"), spec.pop("image_size"), spec.pop("lora_rank")
        return sam_vit_architecture(variant, image_size=size, lora_rank=rank, **spec)
    raise ValueError(f"unknown backbone {backbone!r} ({'|'.join(BACKBONES)})")


def synthetic_ct(n: int, height: int = 512, width: int = 512, seed: int = 0) -> "Any":
    """A synthetic abdominal-CT-like stack (n, H, W) windowed to [0, 1] (window [−125, 275] HU): air, a body
    ellipse of fat and soft tissue, a few organ-like ellipses and a spine, noise; changes slowly along z."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy = (yy - height / 2) / (height / 2)
    xx = (xx - width / 2) / (width / 2)
    out = np.empty((n, height, width), dtype=np.float32)
    organs = [(-0.25, 0.35, 0.30, 0.22, 60.0), (-0.15, -0.35, 0.18, 0.15, 45.0), (0.15, 0.35, 0.12, 0.10, 30.0),
              (0.20, -0.40, 0.10, 0.09, 30.0), (0.35, 0.0, 0.09, 0.09, 250.0), (0.05, 0.0, 0.05, 0.05, 180.0)]
    for k in range(n):
        t = k / max(1, n - 1)
        hu = np.full((height, width), -1000.0, dtype=np.float32)
        body = (xx / 0.85) ** 2 + (yy / (0.65 + 0.05 * t)) ** 2 <= 1
        hu[body] = -100.0
        hu[(xx / 0.78) ** 2 + (yy / (0.58 + 0.05 * t)) ** 2 <= 1] = 40.0
        for cy, cx, ry, rx, value in organs:
            scale = 0.7 + 0.3 * math.sin(math.pi * (t + 0.2 * cx + 0.1))
            hu[((yy - cy) / (ry * scale)) ** 2 + ((xx - cx) / (rx * scale)) ** 2 <= 1] = value
        hu += rng.normal(0.0, 15.0, size=hu.shape).astype(np.float32) * body
        out[k] = np.clip((hu + 125.0) / 400.0, 0.0, 1.0)
    return out


# --------------------------------------------------------------------------------------------- peak memory
class PeakRSS:
    """Max resident set size of this process, sampled by a thread (psutil) while the context is open."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while True:
            self.peak = max(self.peak, proc.memory_info().rss)
            if self._stop.wait(self.interval):
                break

    def __enter__(self) -> "PeakRSS":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def process_peak_rss_mb() -> float | None:
    """This process's lifetime peak RSS (MB) from ``getrusage``, or None where unavailable (Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# ------------------------------------------------------------------------------------------------ workers
def count_gflops(backbone: str, num_classes: int) -> dict:
    """GFLOP per slice of the encoder and of the whole reference model (batch 1, see the module docstring)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .model import build_hsam

    arch = architecture_for(backbone)
    model = build_hsam(arch, num_classes).eval().requires_grad_(False)
    size = int(arch["image_size"])
    x = torch.rand(1, 3, size, size)
    with torch.no_grad():  # FlopCounterMode's module tracker does not work under inference_mode
        counter = FlopCounterMode(display=False)
        with counter:
            embeddings = model.encode(x)
        encoder = counter.get_total_flops()
        counter = FlopCounterMode(display=False)
        with counter:
            model.fused_logits(model.decode(embeddings))
        decoder = counter.get_total_flops()
    return {"encoder_gflop": encoder / 1e9, "model_gflop": (encoder + decoder) / 1e9}


class _BatchClock:
    """Per-batch wall times (the machine may be shared: the median batch is the robust estimate)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.batches: list[tuple[int, float]] = []  # (slices, seconds)
        self.done = 0

    def tick(self, slices: int) -> None:
        now = time.perf_counter()
        self.batches.append((slices, now - self.last))
        self.last = now
        self.done += slices

    def progress(self, done: int, total: int) -> None:
        self.tick(done - self.done)

    def result(self) -> dict:
        return {"seconds": self.last - self.start, "slices": self.done,
                "batch_seconds": [[n, round(t, 4)] for n, t in self.batches]}


def _build(backbone: str, num_classes: int):
    import torch

    from .model import build_hsam

    torch.manual_seed(0)
    return build_hsam(architecture_for(backbone), num_classes)


def _measure_baseline(spec: dict) -> dict:
    """The authors' tester loop (see the module docstring)."""
    import numpy as np
    import torch
    from scipy.ndimage import zoom

    backbone, k, side = spec["backbone"], spec["num_classes"], spec["side"]
    model = _build(backbone, k).eval()
    size = model.image_size
    slices = synthetic_ct(spec["slices"] + 1, side, side)
    mid = int(spec.get("roundtrip", 224))

    def one(sl: "np.ndarray") -> "np.ndarray":
        h, w = sl.shape
        if (h, w) != (mid, mid):
            sl = zoom(sl, (mid / h, mid / w), order=3)
        if sl.shape != (size, size):
            sl = zoom(sl, (size / sl.shape[0], size / sl.shape[1]), order=3)
        x = torch.from_numpy(np.ascontiguousarray(sl, dtype=np.float32))[None, None].repeat(1, 3, 1, 1)
        with torch.no_grad():
            probs = torch.softmax(model.fused_logits(model(x)), dim=1)
            out = torch.argmax(probs, dim=1)[0].numpy()
        if out.shape != (h, w):
            out = zoom(out, (h / out.shape[0], w / out.shape[1]), order=0)
        return out

    one(slices[0])  # warm-up
    clock = _BatchClock()
    for sl in slices[1:]:
        one(sl)
        clock.tick(1)
    return {**clock.result(), "batch_size": 1, "dtype": "fp32", "attention": "sam",
            "lora": "unmerged", "grad_mode": "no_grad", "resize": "scipy zoom order 3 (in), order 0 (out)"}


def _dtype_name(dtype) -> str:
    import torch

    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _seg_dtype(seg) -> str:
    return "int8" if getattr(seg, "int8", False) else _dtype_name(seg.dtype)


def _measure_pipeline(spec: dict) -> dict:
    import gc

    from .engine.inference import SliceSegmenter

    backbone, k, side = spec["backbone"], spec["num_classes"], spec["side"]
    model = _build(backbone, k)
    seg = SliceSegmenter(model, k, model.image_size, device=spec["device"], batch_size=spec.get("batch_size"),
                         precision=spec.get("precision", "auto"), fast_attention=spec.get("attention") != "sam")
    del model
    gc.collect()
    n = spec["slices"]
    slices = synthetic_ct(n, side, side)
    seg.segment(slices[: seg.batch_size])  # warm-up (kernel selection, allocator)
    _sync(seg.device)
    clock = _BatchClock()
    labels = seg.segment(slices, progress=clock.progress)  # labels reach the CPU after each batch: no sync
    assert labels.shape == slices.shape
    return {**clock.result(), "batch_size": seg.batch_size, "dtype": _seg_dtype(seg),
            "device": str(seg.device), "attention": "sam" if spec.get("attention") == "sam" else _attention(seg.model)}


def _measure_encoder(spec: dict) -> dict:
    """The bare encoder of the model a ``SliceSegmenter`` with the same settings prepares (same batch size,
    precision and attention) on random S×S batches."""
    import torch

    from .engine.inference import SliceSegmenter

    backbone, k = spec["backbone"], spec["num_classes"]
    model = _build(backbone, k)
    seg = SliceSegmenter(model, k, model.image_size, device=spec["device"], batch_size=spec.get("batch_size"),
                         precision=spec.get("precision", "auto"), fast_attention=spec.get("attention") != "sam")
    del model
    device, dtype, batch, n, size = seg.device, seg.dtype, seg.batch_size, spec["slices"], seg.image_size
    autocast = dtype is not None and device.type != "cpu"
    context = torch.autocast(device.type, dtype=dtype) if autocast else nullcontext()
    with torch.inference_mode(), context:
        x = torch.rand(batch, 3, size, size, device=device)
        seg.model.encode(x)  # warm-up
        _sync(device)
        done = 0
        clock = _BatchClock()
        while done < n:
            b = min(batch, n - done)
            seg.model.encode(x[:b])
            _sync(device)
            done += b
            clock.tick(b)
    return {**clock.result(), "batch_size": batch, "dtype": _seg_dtype(seg), "device": str(device),
            "attention": "sam" if spec.get("attention") == "sam" else _attention(seg.model)}


def _measure_memory(spec: dict) -> dict:
    """The default pipeline on a synthetic volume of ``slices`` 512² slices; RSS sampled throughout. The
    caller's model stays alive during the run, as in ``hsam segment`` (the segmenter runs its own copy)."""
    from .engine.inference import SliceSegmenter

    backbone, k, side = spec["backbone"], spec["num_classes"], spec["side"]
    model = _build(backbone, k)
    seg = SliceSegmenter(model, k, model.image_size, device=spec["device"], batch_size=spec.get("batch_size"),
                         precision=spec.get("precision", "auto"))
    volume = synthetic_ct(spec["slices"], side, side)
    clock = _BatchClock()
    labels = seg.segment(volume, progress=clock.progress)
    del model
    return {**clock.result(), "batch_size": seg.batch_size,
            "dtype": _dtype_name(seg.dtype), "device": str(seg.device), "attention": _attention(seg.model),
            "volume_mb": (volume.nbytes + labels.nbytes) / 2**20}


def measure_ceilings(device: str = "cpu", size: int = GEMM_SIZE, repeats: int = 10, copy_mb: int = 256) -> dict:
    """This machine's ceilings at the current thread count (see the module docstring): the best of
    ``repeats`` timed GEMMs of ``size``² (after one warm-up) and of a ``copy_mb`` MB tensor copy."""
    import torch

    from .engine.device import cpu_has_native_bf16, resolve_device

    dev = resolve_device(device)

    def best(fn) -> float:
        fn()
        _sync(dev)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            _sync(dev)
            times.append(time.perf_counter() - start)
        return min(times)

    def gemm(dtype, n: int) -> float:
        g = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(n, n, generator=g).to(dev, dtype)
        b = torch.randn(n, n, generator=g).to(dev, dtype)
        with torch.inference_mode():
            seconds = best(lambda: torch.mm(a, b))
        return 2 * n**3 / seconds / 1e9

    gpu = dev.type in ("cuda", "mps")
    n = max(size, 8192) if gpu else size  # small GEMMs measure launch overhead on a GPU
    out: dict[str, Any] = {"device": str(dev), "threads": torch.get_num_threads(), "gemm_size": n,
                           "fp32_gemm_gflops_per_s": round(gemm(torch.float32, n), 1),
                           "bf16_gemm_gflops_per_s": None}
    if dev.type == "cuda" or (dev.type == "cpu" and cpu_has_native_bf16()):
        out["bf16_gemm_gflops_per_s"] = round(gemm(torch.bfloat16, n), 1)
    numel = (max(copy_mb, 1024) if gpu else copy_mb) * 2**20 // 4
    src = torch.empty(numel, dtype=torch.float32, device=dev).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = best(lambda: dst.copy_(src))
    out["copy_gb_per_s"] = round(2 * src.numel() * 4 / seconds / 1e9, 1)  # bytes read + written
    out["copy_kind"] = "device-to-device" if dev.type in ("cuda", "mps") else "host memory"
    if dev.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(dev)
    return out


def _measure_ceilings(spec: dict) -> dict:
    return measure_ceilings(spec["device"], int(spec.get("gemm_size") or GEMM_SIZE))


def _bench_description(backbone: str, num_classes: int):
    from .data.labels import SYNAPSE_ORGANS, LabelSet
    from .description import IntensitySpec, ModelDescription, OrientationSpec

    labels = LabelSet(f"bench-{num_classes - 1}", SYNAPSE_ORGANS.classes[: num_classes - 1])
    return ModelDescription(name=f"bench-{backbone}", architecture=architecture_for(backbone), labels=labels,
                            intensity=IntensitySpec("window", -125.0, 275.0, "CT"),
                            orientation=OrientationSpec(verified=True, source="bench"))


def _measure_stages(spec: dict) -> dict:
    """``segment_file`` on a synthetic CT file (HU, int16, compressed NRRD) with the stage timer on; a short
    warm-up run first (kernel selection), not counted."""
    import tempfile

    import numpy as np
    import SimpleITK as sitk

    from .engine.pipeline import segment_file, segment_image
    from .weights.loader import LoadedModel

    backbone, k, side, n = spec["backbone"], spec["num_classes"], spec["side"], spec["slices"]
    model = _build(backbone, k).eval()
    loaded = LoadedModel(model, _bench_description(backbone, k), "bench (random weights)")
    windowed = synthetic_ct(n, side, side)
    hu = np.where(windowed > 0, np.rint(windowed * 400.0 - 125.0), -1000.0).astype(np.int16)  # air back at -1000
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.8, 0.8, 2.5))
    options = dict(device=spec["device"], batch_size=spec.get("batch_size"), precision=spec.get("precision", "auto"))
    with tempfile.TemporaryDirectory(prefix="hsam-bench-") as tmp:
        source = os.path.join(tmp, "ct.nrrd")
        sitk.WriteImage(image, source, True)
        segment_image(image[:, :, :1], loaded, **options)  # warm-up
        stages: dict[str, float] = {}
        result = segment_file(source, os.path.join(tmp, "labels.seg.nrrd"), loaded, stage_seconds=stages,
                              **options)
    setup = stages.pop("setup", 0.0)
    seconds = sum(stages.values())
    return {"seconds": seconds, "slices": n, "batch_seconds": [[n, round(seconds, 4)]],
            "setup_seconds": round(setup, 3),
            "stage_seconds": {name: round(stages.get(name, 0.0), 4) for name in STAGES},
            "batch_size": result.engine["batch_size"], "dtype": result.engine["dtype"],
            "device": result.engine["device"], "attention": "n/a" if backbone == "litemedsam" else "sdpa"}


def _attention(model) -> str:
    from .model.fast_attention import FastViTAttention

    return "sdpa" if any(isinstance(m, FastViTAttention) for m in model.modules()) else "n/a"


def _sync(device) -> None:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


_WORKERS = {"baseline": _measure_baseline, "pipeline": _measure_pipeline, "encoder": _measure_encoder,
            "memory": _measure_memory, "stages": _measure_stages, "flops": None, "ceilings": None}


def run_worker(spec: dict) -> dict:
    """Measure one path in this process; returns its raw record (with ``peak_rss_mb``)."""
    import torch

    threads_before = torch.get_num_threads()
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    try:
        if spec["path"] == "flops":
            return count_gflops(spec["backbone"], spec["num_classes"])
        if spec["path"] == "ceilings":
            return _measure_ceilings(spec)
        with PeakRSS() as sampler:
            record = _WORKERS[spec["path"]](spec)
        lifetime = process_peak_rss_mb() if spec.get("isolated") else None
        record["peak_rss_mb"] = round(max(sampler.peak_mb, lifetime or 0.0), 1)
        record["threads"] = torch.get_num_threads()
        return record
    finally:
        torch.set_num_threads(threads_before)


def _run_isolated(spec: dict, timeout: float) -> dict:
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "hsam.bench", "--worker", _json.dumps({**spec, "isolated": True})],
                          capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"bench worker for {spec['path']} failed (exit {proc.returncode}): " + " | ".join(tail))
    return _json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------- the bench
def _plan(backbone: str, device: str, slices: int, batch_sizes: Iterable[int | None], memory_slices: Iterable[int],
          precisions: Iterable[str], stages: bool = True) -> list[dict]:
    k, side = BACKBONES[backbone][1], BACKBONES[backbone][2]
    base = {"backbone": backbone, "num_classes": k, "side": side, "device": device}
    sam_blocks = backbone != "litemedsam"
    plan = [{**base, "path": "baseline", "slices": max(1, slices)}]
    batch_sizes = list(batch_sizes)
    first = batch_sizes[0]
    for precision in precisions:
        if not sam_blocks and precision == "bf16" and device == "cpu":
            continue  # the CPU bf16 recipe applies to SAM ViT blocks only: it would repeat the fp32 paths
        if sam_blocks and precision == "fp32":
            plan.append({**base, "path": "pipeline", "precision": precision, "batch_size": first,
                         "slices": slices, "attention": "sam"})
        for batch in batch_sizes:
            n = max(slices, batch or 1)
            plan.append({**base, "path": "pipeline", "precision": precision, "batch_size": batch, "slices": n})
            plan.append({**base, "path": "encoder", "precision": precision, "batch_size": batch, "slices": n})
    if stages:
        plan.append({**base, "path": "stages", "precision": "auto", "batch_size": first, "slices": max(1, slices)})
    for n in memory_slices:
        plan.append({**base, "path": "memory", "precision": "auto", "batch_size": None, "slices": int(n)})
    return plan


def _default_precisions(device: str) -> list[str]:
    """fp32 and bf16 where bf16 is native (CPU with AVX512-BF16/AMX/Arm BF16, CUDA); else fp32 only."""
    from .engine.device import cpu_has_native_bf16, resolve_device

    dev = resolve_device(device)
    if dev.type == "cpu":
        return ["fp32", "bf16"] if cpu_has_native_bf16() else ["fp32"]
    if dev.type == "cuda":
        return ["fp32", "auto"]
    return ["fp32"]


def run_bench(backbones: Iterable[str] = ("sam_vit_b", "litemedsam"), device: str = "auto", slices: int = 4,
              batch_sizes: Iterable[int | None] = (None,), json: bool = False, precisions: Iterable[str] | None = None,
              memory_slices: Iterable[int] = (8, 24), isolate: bool = True, threads: int | None = None,
              timeout: float = 3600.0, log: Any = None, stages: bool = True, gemm_size: int = GEMM_SIZE) -> list[dict]:
    """Measure the paths of the module docstring; returns one record per path (see ``REQUIRED_KEYS``).

    ``batch_sizes``: pipeline/encoder batch sizes (``None`` = the segmenter's automatic choice).
    ``precisions``: default fp32, plus bf16 where the hardware has it. ``memory_slices``: volume sizes of the
    memory check (empty to skip). ``isolate``: one fresh process per path (separate peak RSS; slower start).
    ``stages``: the per-stage breakdown of the product path. ``gemm_size``: side of the ceiling GEMMs.
    Without ``json`` a table is printed to stdout as well.
    """
    from .engine.device import resolve_device

    device_name = str(resolve_device(device))
    precisions = list(precisions) if precisions is not None else _default_precisions(device_name)
    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    records: list[dict] = []
    ceiling_spec = {"path": "ceilings", "device": device_name, "threads": threads, "gemm_size": gemm_size}
    ceilings = _dispatch(ceiling_spec, isolate, timeout)
    say(f"[bench] ceilings before: {_ceilings_text(ceilings)}")
    flops_of: dict[str, dict] = {}
    for backbone in backbones:
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r} ({'|'.join(BACKBONES)})")
        k = BACKBONES[backbone][1]
        try:
            flops = _dispatch({"path": "flops", "backbone": backbone, "num_classes": k, "threads": threads},
                              isolate, timeout)
        except Exception as exc:  # noqa: BLE001 - an unavailable backbone is skipped, with a note
            note = f"skipped: the {backbone} backbone cannot be built here ({exc})"
            say(f"[bench] {note}")
            records.append({"backbone": backbone, "device": device_name, "skipped": True, "note": note})
            continue
        flops_of[backbone] = flops
        say(f"[bench] {backbone}: {flops['encoder_gflop']:.2f} GFLOP/slice in the encoder, "
            f"{flops['model_gflop']:.2f} in the whole model; weights: {WEIGHTS_NOTE}")
        rows = []
        for spec in _plan(backbone, device_name, slices, batch_sizes, memory_slices, precisions, stages):
            spec["threads"] = threads
            say(f"[bench] {backbone} {spec['path']} precision={spec.get('precision', 'fp32')} "
                f"batch={spec.get('batch_size') or 'auto'} attention={spec.get('attention', 'default')} "
                f"slices={spec['slices']} ...")
            raw = _dispatch(spec, isolate, timeout)
            rows.append(_record(backbone, spec, raw, flops, device_name))
        _finish(rows)
        records.extend(rows)
    if any(not r.get("skipped") for r in records):
        after = _dispatch(ceiling_spec, isolate, timeout)
        say(f"[bench] ceilings after: {_ceilings_text(after)}")
        ceilings = best_ceilings(ceilings, after)
    for r in records:
        if not r.get("skipped"):
            apply_ceilings(r, ceilings, flops_of[r["backbone"]])
    if not json:
        print(format_table(records))
    return records


def _dispatch(spec: dict, isolate: bool, timeout: float) -> dict:
    return _run_isolated(spec, timeout) if isolate else run_worker(spec)


def _fmt(value: Any, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def _ceilings_text(c: dict) -> str:
    return (f"{c['device']} ({c['threads']} threads): fp32 GEMM {c['fp32_gemm_gflops_per_s']:.1f} GFLOP/s, bf16 GEMM "
            f"{_fmt(c['bf16_gemm_gflops_per_s'], '{:.1f} GFLOP/s')}, {c['copy_kind']} copy "
            f"{c['copy_gb_per_s']:.1f} GB/s")


def best_ceilings(*measured: dict) -> dict:
    """The better value of each ceiling over several measurements (``measurements``: how many)."""
    out = dict(measured[0])
    for other in measured[1:]:
        for key in ("fp32_gemm_gflops_per_s", "bf16_gemm_gflops_per_s", "copy_gb_per_s"):
            values = [v for v in (out.get(key), other.get(key)) if v is not None]
            out[key] = max(values) if values else None
    out["measurements"] = len(measured)
    return out


def apply_ceilings(record: dict, ceilings: dict, flops: dict) -> None:
    """Fill a record's ceiling fields (and a ``stages`` record's breakdown) from ``ceilings``."""
    name, ceiling = ceiling_for(record["dtype"], ceilings)
    record.update(ceilings=ceilings, ceiling=name, ceiling_gflops_per_s=ceiling,
                  fraction_of_ceiling=_fraction(record["gflops_per_s"], ceiling))
    if record["path"] == "stages":
        record["stages"] = stage_breakdown(record.pop("stage_seconds"), record["slices"], flops, ceilings,
                                           record["dtype"], record["device"])


def ceiling_for(dtype: str, ceilings: dict) -> tuple[str, float]:
    """(name, GFLOP/s) of the GEMM ceiling a path of ``dtype`` is compared with."""
    if dtype in ("bf16", "fp16") and ceilings.get("bf16_gemm_gflops_per_s"):
        return "bf16 GEMM", float(ceilings["bf16_gemm_gflops_per_s"])
    return "fp32 GEMM", float(ceilings["fp32_gemm_gflops_per_s"])


def _fraction(gflops_per_s: float, ceiling: float) -> float:
    return float(f"{gflops_per_s / ceiling:.4g}") if ceiling > 0 else float("nan")


def stage_breakdown(stage_seconds: dict, slices: int, flops: dict, ceilings: dict, dtype: str = "fp32",
                    device: str = "cpu") -> dict:
    """Per stage: seconds, seconds per slice, share of the total; for the encoder and the decoders also the
    counted GFLOP per slice, the achieved GFLOP/s, the ceiling of the precision the stage runs in (the CPU bf16
    recipe keeps the decoders fp32) and the fraction of it."""
    total = sum(stage_seconds.values()) or float("nan")
    gflop = {"encoder": flops["encoder_gflop"], "decoders": flops["model_gflop"] - flops["encoder_gflop"]}
    cpu_recipe = str(device).startswith("cpu") and dtype in ("bf16", "int8")
    stage_dtype = {"encoder": dtype, "decoders": "fp32" if cpu_recipe else dtype}
    out = {}
    for name in STAGES:
        seconds = float(stage_seconds.get(name, 0.0))
        entry = {"seconds": round(seconds, 4), "seconds_per_slice": round(seconds / max(1, slices), 4),
                 "share": round(seconds / total, 4)}
        if name in gflop and seconds > 0:
            rate = gflop[name] * slices / seconds
            ceiling_name, ceiling = ceiling_for(stage_dtype[name], ceilings)
            entry.update(gflop_per_slice=round(gflop[name], 3), gflops_per_s=round(rate, 3), ceiling=ceiling_name,
                         fraction_of_ceiling=_fraction(rate, ceiling))
        out[name] = entry
    return out


def _record(backbone: str, spec: dict, raw: dict, flops: dict, device_name: str) -> dict:
    path = spec["path"]
    gflop = flops["encoder_gflop"] if path == "encoder" else flops["model_gflop"]
    total_sps = raw["slices"] / raw["seconds"] if raw["seconds"] > 0 else float("inf")
    per_slice = sorted(t / n for n, t in raw.get("batch_seconds", []) if n) or [1 / total_sps]
    sps = 1 / _median(per_slice)
    record = {
        "backbone": backbone, "path": path, "device": raw.get("device", device_name), "dtype": raw["dtype"],
        "attention": raw.get("attention", "sam"), "batch_size": raw["batch_size"], "slices": raw["slices"],
        "seconds": round(raw["seconds"], 3), "slices_per_s": round(sps, 4), "seconds_per_slice": round(1 / sps, 3),
        "slices_per_s_total": round(total_sps, 4), "batch_seconds": raw.get("batch_seconds"),
        "gflop_per_slice": round(gflop, 2), "gflops_per_s": round(gflop * sps, 2), "peak_rss_mb": raw["peak_rss_mb"],
        "threads": raw.get("threads"), "weights": WEIGHTS_NOTE,
    }
    for key in ("lora", "grad_mode", "resize", "volume_mb"):
        if key in raw:
            record[key] = raw[key] if not isinstance(raw[key], float) else round(raw[key], 1)
    if path == "stages":  # the breakdown is filled in with the ceilings (apply_ceilings)
        record["setup_seconds"] = raw["setup_seconds"]
        record["stage_seconds"] = raw["stage_seconds"]
    if path == "pipeline" and raw["dtype"] == "bf16" and record["device"] == "cpu":
        record["precision_note"] = "CPU bf16 recipe: encoder proj + MLP linears in bfloat16, the rest float32"
    return record


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _finish(rows: list[dict]) -> None:
    """Fill the baseline, speed-up, pipeline/encoder ratio and memory projection into a backbone's records."""
    baseline = next((r for r in rows if r["path"] == "baseline"), None)
    base_sps = baseline["slices_per_s"] if baseline else None
    for r in rows:
        r["baseline_slices_per_s"] = base_sps
        r["speedup_vs_baseline"] = round(r["slices_per_s"] / base_sps, 3) if base_sps else None
        if r["path"] == "pipeline":
            enc = next((e for e in rows if e["path"] == "encoder" and e["dtype"] == r["dtype"]
                        and e["batch_size"] == r["batch_size"] and e["attention"] == r["attention"]), None)
            if enc:
                r["encoder_slices_per_s"] = enc["slices_per_s"]
                r["pipeline_to_encoder_time_ratio"] = round(enc["slices_per_s"] / r["slices_per_s"], 3)
    memory = sorted((r for r in rows if r["path"] == "memory"), key=lambda r: r["slices"])
    if len(memory) >= 2:
        small, large = memory[0], memory[-1]
        growth = (large["peak_rss_mb"] - small["peak_rss_mb"]) / (large["slices"] - small["slices"])
        # Input float32 + output uint8 arrays: 5 bytes per voxel are the only per-slice cost by design.
        per_slice_arrays = large["volume_mb"] / large["slices"]
        projected = large["peak_rss_mb"] + max(growth, per_slice_arrays) * (MEMORY_PROJECTION_SLICES - large["slices"])
        for r in memory:
            r["rss_growth_mb_per_slice"] = round(growth, 2)
            r["arrays_mb_per_slice"] = round(per_slice_arrays, 2)
            r[f"projected_peak_rss_mb_{MEMORY_PROJECTION_SLICES}"] = round(projected, 1)


def format_table(records: list[dict]) -> str:
    cols = [("backbone", "backbone", "{}"), ("path", "path", "{}"), ("device", "device", "{}"),
            ("dtype", "dtype", "{}"), ("attention", "attn", "{}"), ("batch_size", "batch", "{}"),
            ("slices", "n", "{}"), ("seconds_per_slice", "s/slice", "{:.3f}"), ("slices_per_s", "slices/s", "{:.3f}"),
            ("gflops_per_s", "GFLOP/s", "{:.1f}"), ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
            ("speedup_vs_baseline", "× baseline", "{:.2f}"), ("pipeline_to_encoder_time_ratio", "pipe/enc", "{:.2f}"),
            ("fraction_of_ceiling", "of ceiling", "{:.1%}")]
    table = [[title for _, title, _ in cols]]
    notes = []
    for r in records:
        if r.get("skipped"):
            notes.append(f"{r['backbone']}: {r['note']}")
            continue
        table.append(["" if r.get(key) is None else fmt.format(r[key]) for key, _, fmt in cols])
        key = f"projected_peak_rss_mb_{MEMORY_PROJECTION_SLICES}"
        if key in r and r["slices"] == max(x["slices"] for x in records if x.get("path") == "memory"
                                           and x["backbone"] == r["backbone"]):
            notes.append(f"{r['backbone']}: peak RSS grows {r['rss_growth_mb_per_slice']:.2f} MB/slice between the "
                         f"memory runs (input+output arrays: {r['arrays_mb_per_slice']:.2f} MB/slice); projected "
                         f"peak for {MEMORY_PROJECTION_SLICES} slices: {r[key]:.0f} MB")
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(cell.rjust(widths[i]) for i, cell in enumerate(row)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"weights: {WEIGHTS_NOTE}")
    ceilings = next((r["ceilings"] for r in records if r.get("ceilings")), None)
    if ceilings:
        lines.append(f"ceilings {_ceilings_text(ceilings)}; 'of ceiling' = GFLOP/s ÷ the GEMM ceiling of the "
                     "path's precision")
    for r in records:
        if r.get("stages"):
            lines.append(format_stages(r))
    lines.extend(notes)
    return "\n".join(lines)


def format_stages(record: dict) -> str:
    """The per-stage lines of a ``stages`` record."""
    head = (f"{record['backbone']} stages ({record['device']}, {record['dtype']}, batch {record['batch_size']}, "
            f"{record['slices']} slices, {record['seconds_per_slice']:.3f} s/slice incl. I/O, setup "
            f"{record['setup_seconds']:.2f} s once):")
    rows = [head]
    for name, st in record["stages"].items():
        extra = ""
        if "gflops_per_s" in st:
            extra = f"  {st['gflops_per_s']:8.1f} GFLOP/s  {st['fraction_of_ceiling']:.1%} of the {st['ceiling']}"
        rows.append(f"  {name:<12}{st['seconds_per_slice']:8.3f} s/slice  {st['share']:6.1%}{extra}")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------- CLI
def _int_list(text: str) -> list[int | None]:
    out: list[int | None] = []
    for part in text.split(","):
        part = part.strip()
        if part:
            out.append(None if part == "auto" else int(part))
    return out


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``hsam bench``; sets ``func=run_bench_command``."""
    parser = subparsers.add_parser(
        "bench", help="measure inference speed and memory (random weights, no download)",
        description="Time H-SAM inference paths (the authors'-style per-slice loop, our batched pipeline, the "
                    "bare encoder) and the pipeline's peak memory on a synthetic CT volume. Each path runs in "
                    "its own process. Weights are random: timing does not depend on their values.")
    parser.add_argument("--json", action="store_true", help="print one JSON list of records on stdout")
    parser.add_argument("--backbone", action="append", choices=sorted(BACKBONES), dest="backbones",
                        help="backbone(s) to measure (repeatable; default sam_vit_b and litemedsam)")
    parser.add_argument("--slices", type=int, default=4, help="slices timed per path (default 4)")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps (default auto)")
    parser.add_argument("--batch-sizes", type=_int_list, default=[None], metavar="LIST",
                        help="comma-separated batch sizes, 'auto' for the automatic one (default auto)")
    parser.add_argument("--precision", action="append", choices=["auto", "fp32", "bf16", "fp16", "int8"],
                        dest="precisions", help="precision(s) to measure (repeatable; default fp32, plus bf16 where "
                                                "native; int8: the CPU's opt-in int8 encoder linears)")
    parser.add_argument("--memory-slices", type=_int_list, default=[8, 24], metavar="LIST",
                        help="volume sizes (slices of 512²) of the memory check (default 8,24; '' to skip)")
    parser.add_argument("--no-memory-check", action="store_true", help="skip the memory check")
    parser.add_argument("--no-stages", action="store_true",
                        help="skip the per-stage breakdown of the product path (read, preprocess, encoder, "
                             "decoders, postprocess, write)")
    parser.add_argument("--gemm-size", type=int, default=GEMM_SIZE,
                        help=f"side of the ceiling GEMMs (default {GEMM_SIZE})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--in-process", action="store_true",
                        help="measure every path in this process (faster start; peak RSS then mixes paths)")
    parser.set_defaults(func=run_bench_command)
    return parser


def run_bench_command(args: argparse.Namespace) -> int:
    records = run_bench(backbones=args.backbones or ("sam_vit_b", "litemedsam"), device=args.device,
                        slices=args.slices, batch_sizes=args.batch_sizes or [None], json=args.json,
                        precisions=args.precisions,
                        memory_slices=[] if args.no_memory_check else [n for n in args.memory_slices if n],
                        isolate=not args.in_process, threads=args.threads, stages=not args.no_stages,
                        gemm_size=args.gemm_size)
    if args.json:
        print(_json.dumps(records, indent=1))
    return 0


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        record = run_worker(_json.loads(argv[1]))
        print(_json.dumps(record))
        return 0
    parser = argparse.ArgumentParser(prog="python -m hsam.bench")
    sub = parser.add_subparsers(dest="command")
    add_bench_parser(sub)
    args = parser.parse_args(["bench", *argv])
    return run_bench_command(args)


if __name__ == "__main__":
    sys.exit(_main())
