"""Slice-by-slice inference: batches of 2D slices → H-SAM → per-slice class labels.

``SliceSegmenter(model, num_classes, image_size).segment(slices)`` takes slices (n, H, W) already
intensity-normalised to [0, 1] and returns labels (n, H, W) uint8. Per batch, under ``torch.inference_mode``:
resize to S×S on the device (bilinear, antialiased when shrinking), 1 → 3 channels, the network (autocast on
GPUs when a reduced precision is chosen), fused logits (B, K, S, S) resized back to H×W (bilinear), argmax,
written into one preallocated output. Logits of more than one batch never exist at a time.

The caller's model is not modified: the segmenter runs its own copy (sharing the tensors it does not change,
``sharing_copy``) with LoRA merged into the qkv weights, SAM's ViT attention replaced by
``hsam.model.fast_attention`` (same function, fused kernels) and, for ``precision="bf16"`` on the CPU, the encoder's proj and MLP linears in bfloat16 (see ``hsam.engine.device``);
for ``precision="int8"`` (CPU only, opt-in) every encoder linear int8 with dynamic quantisation
(``int8_encoder_linears``; faster than the bf16 recipe but it fails the fast-path accuracy gate, so it is never
chosen automatically: BENCHMARKS.md "int8").

``segment(slices, skip=mask)`` leaves the slices where ``mask`` is True out of the model entirely and labels
them 0 (background); the pipeline uses it for air-only slices (``hsam.engine.air``). A ``StageTimer`` set as
``segmenter.timer`` accumulates per-stage wall time (preprocess, encoder, decoders, postprocess) with a device
synchronisation at each stage boundary (for ``hsam bench``; it stalls GPU pipelining, so it is off by default).

GPU out-of-memory: the batch is halved (logged: "CUDA out of memory at batch 8; retrying at batch 4") down to
1; if one slice does not fit either, the rest of the run continues on the CPU (logged). ``cancel`` is looked
at between batches and raises ``CancelledError``; ``progress(done, total)`` is called after each batch.
"""

from __future__ import annotations

import copy
import logging
from contextlib import nullcontext
import threading
import time
import warnings
from typing import Callable, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CancelledError, InputVolumeError
from .device import DeviceError, choose_precision, resolve_device

log = logging.getLogger("hsam")

Progress = Callable[[int, int], None]
Cancel = Union[Callable[[], bool], threading.Event, None]

# Auto batch size on the CPU, measured (``hsam bench --batch-sizes 1,2,4,8 --precision bf16 --slices 8``,
# ViT-B/512, 1 thread): pipeline 1.49 / 1.59 / 1.88 / 2.08 s per slice at batch 1 / 2 / 4 / 8, peak RSS
# 1.74 / 1.73 / 1.74 / 2.04 GB. (fp32, 2 threads, bare encoder: 1.37 / 1.60 / 1.73 s at 1 / 2 / 4.) One
# 512-px slice already gives the matmuls 1024+ rows; bigger batches only push the activations out of the
# cache. So batch 1, not 4.
CPU_BATCH_SIZE = 1
# GPU memory one 512-px ViT-B slice may need during inference (activations, attention, the pixel decoder,
# the (K, S, S) logits), scaled with S² and the encoder width, with a factor 0.6 under autocast. On the CPU
# the peak grows by ~44 MB per extra slice (batch 8 vs 1); GPU workspaces and the caching allocator need
# more, so this keeps a wide margin (and out-of-memory is handled anyway).
GPU_BYTES_PER_SLICE_512 = 320 * 2**20
GPU_MEMORY_FRACTION = 0.5
MAX_AUTO_BATCH = 32


class BF16Linear(nn.Module):
    """An inference-only ``nn.Linear`` whose weight is stored and multiplied in bfloat16 (float32
    accumulation); input and output stay in the surrounding dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


class BF16MLP(nn.Module):
    """SAM's ``MLPBlock`` (lin1 → act → lin2) with both linears in bfloat16 and the hidden activation kept in
    bfloat16 between them (the activation is computed in float32 internally and rounded once, exactly what
    rounding its float32 output for a bfloat16 ``lin2`` does), so the (tokens × 4·dim) hidden tensor is never
    converted back and forth. Input and output stay in the surrounding dtype."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.lin1 = BF16Linear(mlp.lin1)
        self.lin2 = BF16Linear(mlp.lin2)
        self.act = mlp.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(F.linear(x.to(torch.bfloat16), self.lin1.weight, self.lin1.bias))
        return F.linear(hidden, self.lin2.weight, self.lin2.bias).to(x.dtype)


def bf16_encoder_linears(encoder: nn.Module, names: tuple[str, ...] = ("attn.proj", "mlp.lin1", "mlp.lin2")) -> int:
    """Replace the named linears of every SAM ViT block by ``BF16Linear`` (in place; the qkv projection stays
    float32: it decides the attention weights and is the most precision-sensitive, see ``hsam.engine.device``).
    With both MLP linears named, the block's MLP becomes one ``BF16MLP``. Returns how many linears were
    replaced (0 for encoders without SAM blocks)."""
    count = 0
    for block in getattr(encoder, "blocks", ()):
        mlp = getattr(block, "mlp", None)
        if {"mlp.lin1", "mlp.lin2"} <= set(names) and isinstance(getattr(mlp, "lin1", None), nn.Linear) \
                and isinstance(getattr(mlp, "lin2", None), nn.Linear) and hasattr(mlp, "act"):
            block.mlp = BF16MLP(mlp)
            count += 2
        for dotted in names:
            parent_name, _, attr = dotted.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            child = getattr(parent, attr, None)
            if isinstance(child, nn.Linear):
                setattr(parent, attr, BF16Linear(child))
                count += 1
    return count


def int8_encoder_linears(encoder: nn.Module) -> int:
    """Dynamic int8 quantisation of every ``nn.Linear`` of ``encoder`` (in place, CPU): int8 weights per output
    channel, activations quantised per call (``torch.ao.quantization.quantize_dynamic``, in torch since 1.x and
    still in 2.14, deprecated there in favour of torchao). Returns how many linears were replaced; raises
    ``DeviceError`` where this torch lacks the API or a quantised engine."""
    quantization = getattr(getattr(torch, "ao", None), "quantization", None)
    engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if quantization is None or not hasattr(quantization, "quantize_dynamic") or not engines:
        raise DeviceError(f"precision int8 needs torch.ao.quantization.quantize_dynamic and a quantised CPU engine, "
                          f"which torch {torch.__version__} here lacks; use fp32 or bf16")
    spec = {name: quantization.per_channel_dynamic_qconfig for name, module in encoder.named_modules()
            if isinstance(module, nn.Linear)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of torch.ao.quantization (torch >= 2.9)
        quantization.quantize_dynamic(encoder, spec, dtype=torch.qint8, inplace=True)
    return len(spec)


def sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose modules are new but whose parameters and buffers are views of the same memory.

    The preparation steps only ever *replace* tensors or modules of the copy (merged LoRA linears, bf16 and
    int8 linears, ``.to(device)``), never write into them, so sharing is safe and the inference copy costs only
    the tensors it changes (for ViT-B/512 in fp32 on the CPU: the merged qkv weights, not a second model; peak
    RSS of ``hsam segment``: ``Testing/benchmarks/memory_profile.py``, BENCHMARKS.md). The new
    parameters do not require gradients; the argument's are untouched. Training the argument in place while
    the copy is in use would show through the unchanged tensors: make a new segmenter after changing it."""
    memo = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if isinstance(tensor, nn.Parameter):
            memo[id(tensor)] = nn.Parameter(tensor.detach(), requires_grad=False)
        else:
            memo[id(tensor)] = tensor.detach()
    return copy.deepcopy(model, memo)


def prepare_model(model: nn.Module, device: torch.device, dtype: torch.dtype | None,
                  fast_attention: bool = True, int8: bool = False) -> nn.Module:
    """An inference copy of ``model`` on ``device``: eval mode, no gradients, LoRA merged, fast attention,
    CPU bfloat16 recipe when ``dtype`` is bfloat16 on the CPU, int8 encoder linears with ``int8`` (CPU only).
    The argument itself is left untouched."""
    from ..model.fast_attention import use_fast_attention
    from ..model.lora import merge_lora

    work = sharing_copy(model).eval()
    work.requires_grad_(False)
    merged = merge_lora(work)
    encoder = getattr(work, "image_encoder", None)
    swapped = use_fast_attention(encoder) if (fast_attention and encoder is not None) else 0
    work.to(device)
    cast = 0
    if device.type == "cpu" and dtype == torch.bfloat16 and encoder is not None:
        cast = bf16_encoder_linears(encoder)
    quantized = int8_encoder_linears(encoder) if int8 and encoder is not None else 0
    log.debug("inference model: %d LoRA adapters merged, %d attention modules on SDPA, %d bf16 linears, "
              "%d int8 linears", merged, swapped, cast, quantized)
    return work


class StageTimer:
    """Wall seconds per stage of ``SliceSegmenter`` batches: ``preprocess`` (array → resized 3-channel tensor on
    the device), ``encoder``, ``decoders`` (both stages and the fused logits), ``postprocess`` (logits back to
    H×W, argmax, labels to the CPU). Each lap synchronises the device, so the stages add up to the batch time."""

    STAGES = ("preprocess", "encoder", "decoders", "postprocess")

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {name: 0.0 for name in self.STAGES}
        self._device: torch.device | None = None
        self._last = 0.0

    def start(self, device: torch.device) -> None:
        self._device = device
        _synchronize(device)
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        _synchronize(self._device)
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now


def _synchronize(device: "torch.device | None") -> None:
    if device is None:
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _is_out_of_memory(exc: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def is_cancelled(cancel: Cancel) -> bool:
    """Whether a cooperative-cancel token (a callable or a ``threading.Event``; None = never) has fired."""
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def resize_images(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(B, C, h, w) → (B, C, *size); antialiased when shrinking (bilinear/bicubic); no-op at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=shrinking)


def authors_resize(x: torch.Tensor, roundtrip: int, image_size: int) -> torch.Tensor:
    """The authors' tester's input path: each slice H×W → roundtrip² → S² with order-3 interpolation, no
    antialiasing, on the device.

    They use ``scipy.ndimage.zoom(order=3)`` twice (cubic B-spline with prefilter, corner-aligned grid,
    ``mode="constant"``); we use torch bicubic (Keys cubic convolution, a = −0.75) with ``align_corners=True``
    (the same corner-aligned grid). Measured on the fixture CT slice (512 → 224 → 512): mean |Δ| 0.004 in the
    interior (max 0.28 at the sharpest edges: the two cubic kernels differ), and scipy sets some pixels of the
    last row/column to its ``cval`` 0 (sample positions rounded just outside the image), which we do not
    reproduce. Use this only to compare with published numbers."""
    for side in (roundtrip, image_size):
        if tuple(x.shape[-2:]) != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=True)
    return x


class SliceSegmenter:
    """Segments stacks of 2D slices with an H-SAM (or any model with ``encode``/``decode``/``fused_logits``).

    ``device``: ``auto``/``cpu``/``cuda``/``cuda:N``/``mps`` or a ``torch.device``. ``batch_size``: ``None``
    picks one (CPU: ``CPU_BATCH_SIZE``; CUDA: from free memory). ``precision``: ``auto``/``fp32``/``bf16``/
    ``fp16`` (see ``hsam.engine.device.choose_precision``), or ``int8`` (CPU only, opt-in: the encoder's linears
    int8, the rest fp32; see ``int8_encoder_linears``). ``authors_roundtrip``: e.g. 224 to reproduce the
    authors' tester's H×W → 224 → S bicubic input path (for comparing with published numbers only).
    """

    def __init__(self, model: nn.Module, num_classes: int, image_size: int, device: "str | torch.device" = "auto",
                 batch_size: int | None = None, precision: str = "auto", authors_roundtrip: int | None = None,
                 fast_attention: bool = True) -> None:
        if not 1 <= int(num_classes) <= 256:
            raise ValueError(f"num_classes must be in 1..256 for uint8 labels, got {num_classes}")
        model_classes = getattr(model, "num_classes", None)
        if model_classes is not None and int(model_classes) != int(num_classes):
            raise ValueError(f"the model predicts {model_classes} classes, not {num_classes}")
        model_size = getattr(model, "image_size", None)
        if model_size is not None and int(model_size) != int(image_size):
            raise ValueError(f"the model takes {model_size}-px inputs, not {image_size}")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if authors_roundtrip is not None and int(authors_roundtrip) < 1:
            raise ValueError(f"authors_roundtrip must be a positive size, got {authors_roundtrip}")
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.authors_roundtrip = None if authors_roundtrip is None else int(authors_roundtrip)
        self.precision = precision
        self.fast_attention = fast_attention
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.int8 = precision == "int8"
        if self.int8 and self.device.type != "cpu":
            raise DeviceError(f"precision int8 runs on the CPU only, not on {self.device}; use --device cpu, or "
                              "auto/bf16/fp16 on a GPU")
        self.dtype = None if self.int8 else choose_precision(self.device, precision)
        self.model = prepare_model(model, self.device, self.dtype, fast_attention, int8=self.int8)
        if self.device.type == "cpu" and self.dtype is not None and \
                not any(isinstance(m, BF16Linear) for m in self.model.modules()):
            log.info("the CPU bf16 recipe does not apply to this encoder (no SAM ViT blocks): running fp32")
            self.dtype = None
        self.batch_size = int(batch_size) if batch_size is not None else self.auto_batch_size()
        self.timer: StageTimer | None = None
        log.info("segmenter: %s, %s, batch %d%s", self.device,
                 "int8 encoder linears" if self.int8 else
                 "fp32" if self.dtype is None else str(self.dtype).replace("torch.", ""), self.batch_size,
                 f", authors' {self.authors_roundtrip}-px round trip" if self.authors_roundtrip else "")

    # -- set-up -------------------------------------------------------------------------------------------
    def auto_batch_size(self) -> int:
        """CPU: ``CPU_BATCH_SIZE``. CUDA: what fits in half the free memory at ``GPU_BYTES_PER_SLICE_512``
        per 512-px slice (scaled with S² and the encoder width), 1..32. MPS: 1."""
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            per_slice = self.bytes_per_slice_estimate()
            batch = int(free * GPU_MEMORY_FRACTION // per_slice)
            chosen = max(1, min(MAX_AUTO_BATCH, batch))
            log.info("auto batch size %d (%.1f GiB free on %s, ~%.0f MiB per slice)", chosen, free / 2**30,
                     self.device, per_slice / 2**20)
            return chosen
        if self.device.type == "cpu":
            return CPU_BATCH_SIZE
        return 1

    def bytes_per_slice_estimate(self) -> int:
        scale = (self.image_size / 512) ** 2
        width = 1.0
        encoder = getattr(self.model, "image_encoder", None)
        blocks = getattr(encoder, "blocks", None)
        if blocks:
            width = max(1.0, blocks[0].norm1.normalized_shape[0] / 768)
        factor = 0.6 if self.dtype in (torch.float16, torch.bfloat16) else 1.0
        return int(GPU_BYTES_PER_SLICE_512 * scale * width * factor)

    def _fall_back_to_cpu(self) -> None:
        cpu = torch.device("cpu")
        self.model.to(cpu)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.device = cpu
        request = self.precision if self.precision in ("fp32", "bf16") else "auto"
        self.dtype = choose_precision(cpu, request)
        encoder = getattr(self.model, "image_encoder", None)
        if self.dtype == torch.bfloat16 and (encoder is None or not bf16_encoder_linears(encoder)):
            self.dtype = None
        self.batch_size = CPU_BATCH_SIZE

    # -- running ------------------------------------------------------------------------------------------
    def segment(self, slices: np.ndarray, progress: Progress | None = None, cancel: Cancel = None,
                skip: np.ndarray | None = None, normalize=None) -> np.ndarray:
        """slices (n, H, W) float in [0, 1] → labels (n, H, W) uint8 in 0..K−1.

        ``skip``: optional (n,) booleans; those slices are not run through the model and get label 0.
        ``normalize``: given, ``slices`` are raw intensities and each batch is normalised by
        ``normalize(batch) → float (b, H, W)`` just before the model (no normalised copy of the whole volume:
        ≈ 4 bytes per voxel less peak memory).
        ``progress(done, total)`` counts the slices run through the model (``total`` = n − skipped)."""
        slices = np.asarray(slices)
        if slices.ndim != 3:
            raise InputVolumeError(f"expected slices shaped (n, H, W), got an array of shape {slices.shape}")
        if normalize is None and not np.issubdtype(slices.dtype, np.floating):
            raise InputVolumeError(f"expected intensity-normalised float slices, got dtype {slices.dtype}")
        n, h, w = slices.shape
        if skip is None:
            todo = np.arange(n)
            out = np.empty((n, h, w), dtype=np.uint8)
        else:
            skip = np.asarray(skip, dtype=bool)
            if skip.shape != (n,):
                raise ValueError(f"skip must be {n} booleans (one per slice), got shape {skip.shape}")
            todo = np.flatnonzero(~skip)
            out = np.zeros((n, h, w), dtype=np.uint8)
        total = len(todo)
        start, batch = 0, self.batch_size
        started = time.perf_counter()
        while start < total:
            if is_cancelled(cancel):
                raise CancelledError(f"segmentation cancelled after {start} of {total} slices; nothing was returned")
            stop = min(start + batch, total)
            first, last = int(todo[start]), int(todo[stop - 1])
            where = slice(first, last + 1) if last - first == stop - start - 1 else todo[start:stop]
            labels = None
            try:
                chunk = slices[where]
                labels = self._forward_batch(chunk if normalize is None else normalize(chunk))
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
                if not _is_out_of_memory(exc) or self.device.type == "cpu":
                    raise
            if labels is None:  # out of memory; handled outside the except block so its tensors are freed
                batch = self._recover_from_oom(stop - start)  # halve what was tried (maybe a short last batch)
                continue
            out[where] = labels
            start = stop
            if progress is not None:
                progress(start, total)
        self.batch_size = batch
        if total:
            log.debug("segmented %d slices in %.1f s", total, time.perf_counter() - started)
        return out

    def _recover_from_oom(self, batch: int) -> int:
        """After an out-of-memory error at ``batch``: the batch to retry with (maybe on the CPU now)."""
        kind = "CUDA" if self.device.type == "cuda" else self.device.type.upper()
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if batch > 1:
            smaller = batch // 2
            log.warning("%s out of memory at batch %d; retrying at batch %d", kind, batch, smaller)
            return smaller
        log.warning("%s out of memory at batch 1: one slice does not fit on %s; continuing on the CPU "
                    "(slower; close other GPU programs or use a smaller model to stay on the GPU)",
                    kind, self.device)
        self._fall_back_to_cpu()
        return self.batch_size

    def _forward_batch(self, batch: np.ndarray) -> np.ndarray:
        """(b, H, W) float slices → (b, H, W) uint8 labels (one batch, on ``self.device``)."""
        h, w = batch.shape[-2:]
        size = (self.image_size, self.image_size)
        timer = self.timer
        if timer is not None:
            timer.start(self.device)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            if not bool(torch.isfinite(x).all()):
                raise InputVolumeError("the slices contain NaN or infinite values; fix or mask the image first")
            x = x.unsqueeze(1)
            if self.authors_roundtrip:
                x = authors_resize(x, self.authors_roundtrip, self.image_size)
            else:
                x = resize_images(x, size)
            x = x.expand(-1, 3, -1, -1).contiguous()
            if timer is not None:
                timer.lap("preprocess")
            logits = self._logits(x)
            logits = resize_images(logits.float(), (h, w))
            labels = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
            if timer is not None:
                timer.lap("postprocess")
            return labels

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, S, S) → fused logits (b, K, S, S), under autocast where a GPU precision is set."""
        autocast = self.dtype is not None and self.device.type != "cpu"  # the CPU recipe is in the weights
        context = torch.autocast(device_type=self.device.type, dtype=self.dtype) if autocast else nullcontext()
        timer = self.timer
        with context:
            embeddings = self.model.encode(images)
            if timer is not None:
                timer.lap("encoder")
            logits = self.model.fused_logits(self.model.decode(embeddings))
            if timer is not None:
                timer.lap("decoders")
            return logits


def segment_slices(model: nn.Module, slices: np.ndarray, num_classes: int, image_size: int, **kwargs) -> np.ndarray:
    """One-call convenience: ``SliceSegmenter(model, num_classes, image_size, **options).segment(slices)``
    (``progress`` and ``cancel`` may be passed too)."""
    progress = kwargs.pop("progress", None)
    cancel = kwargs.pop("cancel", None)
    return SliceSegmenter(model, num_classes, image_size, **kwargs).segment(slices, progress, cancel)


__all__ = ["SliceSegmenter", "StageTimer", "prepare_model", "bf16_encoder_linears", "int8_encoder_linears",
           "BF16Linear", "BF16MLP", "resize_images",
           "authors_resize", "segment_slices"]
