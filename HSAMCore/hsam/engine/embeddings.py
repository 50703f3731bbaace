"""Image embeddings of volume slices for decoder-only ("fast") fine-tuning: computed once, cached.

The frozen encoder dominates the cost on a CPU (LiteMedSAM's TinyViT: ≈0.7–3 s per 256² slice on 2 shared
cores), while a decoder step costs a fraction of that. So each slice is encoded once and the embedding kept
in memory and on disk, under the per-user cache (``<HSAM_HOME>/cache/embeddings``), keyed by a hash of the
volume's voxels, the slice index, the encoder's weights and the preprocessing (intensity mapping,
orientation, input size, precision). Entries are float16 ``.npy`` files written atomically; the oldest
volumes are pruned beyond a size limit (``HSAM_EMBEDDING_CACHE_MB``, default 4096).

The slice → network input mapping (:func:`model_inputs`) and the network output → slice mapping
(:func:`logits_to_slice`) are the inference engine's (``hsam.engine.inference.resize_images``): bilinear resize
to the model's square input (antialiased when shrinking), one channel repeated ×3; logits resized the same way
back to the slice size before the arg-max.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CancelledError
from .inference import is_cancelled

log = logging.getLogger("hsam")

EMBEDDING_FORMAT = 1
ENV_CACHE_MB = "HSAM_EMBEDDING_CACHE_MB"
DEFAULT_CACHE_MB = 4096


# ---------------------------------------------------------------------------------------------- slices ↔ network

def model_inputs(slices: np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
    """Normalised slices (n, H, W) in [0, 1] → network input (n, 3, S, S) float32 (bilinear resize,
    ``align_corners=False``, the channel repeated three times)."""
    x = torch.as_tensor(np.ascontiguousarray(slices) if isinstance(slices, np.ndarray) else slices,
                        dtype=torch.float32)
    if x.ndim != 3:
        raise ValueError(f"slices must be (n, H, W), got {tuple(x.shape)}")
    from .inference import resize_images

    x = resize_images(x[:, None], (image_size, image_size))
    return x.expand(-1, 3, -1, -1).contiguous()


def labels_to_model(labels: np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
    """Class indices (n, H, W) → (n, S, S) int64 by nearest neighbour (the training targets)."""
    y = torch.as_tensor(np.ascontiguousarray(labels) if isinstance(labels, np.ndarray) else labels)
    if tuple(y.shape[-2:]) != (image_size, image_size):
        y = F.interpolate(y[:, None].float(), size=(image_size, image_size), mode="nearest")[:, 0].round()
    return y.long()


def logits_to_slice(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Decision logits (n, K, S, S) → class indices (n, H, W) uint8 (resized as inference does, then arg-max)."""
    from .inference import resize_images

    return resize_images(logits.float(), tuple(size)).argmax(1).to(torch.uint8)


# ---------------------------------------------------------------------------------------------- fingerprints

def array_fingerprint(array: np.ndarray) -> str:
    """SHA-256 over an array's shape, dtype and bytes (hex)."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(json.dumps([list(array.shape), array.dtype.str]).encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state dict (names, shapes, dtypes, values) — the model file's content hash."""
    from ..weights.modelfile import content_sha256

    return content_sha256({k: v for k, v in module.state_dict().items()})


# ---------------------------------------------------------------------------------------------- encoder

def _fuse_tinyvit_batchnorm(module: torch.nn.Module) -> int:
    """Fold TinyViT's Conv2d+BatchNorm pairs into single convolutions (eval only; same function)."""
    count = 0
    for name, child in list(module.named_children()):
        if type(child).__name__ == "Conv2d_BN" and hasattr(child, "fuse"):
            setattr(module, name, child.fuse())
            count += 1
        else:
            count += _fuse_tinyvit_batchnorm(child)
    return count


class SliceEncoder:
    """The model's frozen image encoder, prepared for fast repeated inference on a private copy:
    BatchNorm folded into convolutions (TinyViT), channels-last memory, optional bfloat16 autocast.
    The model passed in is never modified."""

    def __init__(self, model, device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None) -> None:
        self.device = torch.device(device)
        encoder = copy.deepcopy(model.image_encoder).eval()
        for p in encoder.parameters():
            p.requires_grad_(False)
        self.fused = _fuse_tinyvit_batchnorm(encoder)
        self.channels_last = self.fused > 0  # conv-heavy TinyViT gains; the ViT is linear layers only
        if self.channels_last:
            encoder = encoder.to(memory_format=torch.channels_last)
        self.encoder = encoder.to(self.device)
        self.autocast_dtype = autocast_dtype

    @torch.inference_mode()
    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → embeddings (B, C, g, g) float32 on the CPU."""
        x = inputs.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            out = self.encoder(x)
        return out.float().contiguous().cpu()


# ---------------------------------------------------------------------------------------------- cache

def embedding_cache_root(create: bool = True) -> Path:
    from ..weights.cache import ensure_dir, hsam_home

    path = hsam_home() / "cache" / "embeddings"
    return ensure_dir(path) if create else path


class EmbeddingCache:
    """Slice embeddings in memory and (optionally) on disk.

    ``namespace`` identifies everything but the slice index: encoder weights, volume voxels, preprocessing.
    """

    def __init__(self, namespace: dict, disk: bool = True, root: Path | None = None) -> None:
        text = json.dumps({"format": EMBEDDING_FORMAT, **namespace}, sort_keys=True)
        self.key = hashlib.sha256(text.encode()).hexdigest()[:24]
        self.namespace = namespace
        self.memory: dict[int, torch.Tensor] = {}
        self.folder: Path | None = None
        if disk:
            try:
                self.folder = (root or embedding_cache_root()) / self.key
                self.folder.mkdir(parents=True, exist_ok=True)
                meta = self.folder / "namespace.json"
                if not meta.exists():
                    meta.write_text(text, encoding="utf-8")
            except OSError as exc:  # a read-only or full cache must not stop fine-tuning
                log.warning("embedding cache disabled (%s): embeddings are kept in memory only", exc)
                self.folder = None

    def _path(self, index: int) -> Path:
        assert self.folder is not None
        return self.folder / f"slice_{int(index):05d}.npy"

    def get(self, index: int) -> torch.Tensor | None:
        if index in self.memory:
            return self.memory[index]
        if self.folder is None:
            return None
        path = self._path(index)
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        tensor = torch.from_numpy(array.astype(np.float32))
        self.memory[index] = tensor
        return tensor

    def put(self, index: int, embedding: torch.Tensor) -> None:
        stored = embedding.detach().cpu().to(torch.float16)
        self.memory[index] = stored.float()
        if self.folder is None:
            return
        try:
            fd, tmp = tempfile.mkstemp(prefix=".slice.", suffix=".npy", dir=self.folder)
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, stored.numpy(), allow_pickle=False)
            os.replace(tmp, self._path(index))
        except OSError as exc:
            log.warning("could not write an embedding to the cache (%s); continuing without the disk cache", exc)
            self.folder = None

    def touch(self) -> None:
        if self.folder is not None:
            try:
                os.utime(self.folder)
            except OSError:
                pass


def prune_cache(limit_mb: float | None = None, keep: Sequence[Path] = ()) -> int:
    """Delete the least recently used volumes' embeddings beyond ``limit_mb`` (env ``HSAM_EMBEDDING_CACHE_MB``).
    Returns the number of folders removed."""
    if limit_mb is None:
        try:
            limit_mb = float(os.environ.get(ENV_CACHE_MB, DEFAULT_CACHE_MB))
        except ValueError:
            limit_mb = DEFAULT_CACHE_MB
    root = embedding_cache_root(create=False)
    if not root.is_dir():
        return 0
    entries = []
    for folder in root.iterdir():
        if folder.is_dir():
            size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            entries.append((folder.stat().st_mtime, size, folder))
    total = sum(e[1] for e in entries)
    removed = 0
    keep_set = {Path(k).resolve() for k in keep}
    for _mtime, size, folder in sorted(entries):
        if total <= limit_mb * 1024 * 1024:
            break
        if folder.resolve() in keep_set:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        total -= size
        removed += 1
    return removed


def compute_embeddings(encoder: SliceEncoder, slices: np.ndarray, indices: Sequence[int], image_size: int,
                       cache: EmbeddingCache | None = None, batch_size: int = 4,
                       progress: Callable[[int, int], None] | None = None, cancel=None) -> torch.Tensor:
    """Embeddings (n, C, g, g) float32 of ``slices`` (n, H, W) normalised to [0, 1]; ``indices`` (n) are their
    slice numbers (cache keys). Cached slices are not recomputed. ``progress(done, n)`` after each batch;
    ``cancel`` (a callable or an Event) raises CancelledError between batches."""
    n = len(indices)
    if len(slices) != n:
        raise ValueError("one slice index per slice is needed")
    found: dict[int, torch.Tensor] = {}
    todo = []
    for pos, index in enumerate(indices):
        hit = cache.get(int(index)) if cache is not None else None
        if hit is None:
            todo.append(pos)
        else:
            found[pos] = hit
    if found:
        log.info("embeddings: %d of %d slices from the cache", len(found), n)
    done = len(found)
    if progress:
        progress(done, n)
    started = time.perf_counter()
    for start in range(0, len(todo), max(1, batch_size)):
        if is_cancelled(cancel):
            raise CancelledError("cancelled while computing embeddings: nothing was written")
        chunk = todo[start:start + batch_size]
        out = encoder(model_inputs(slices[chunk], image_size))
        for pos, emb in zip(chunk, out):
            if cache is not None:
                cache.put(int(indices[pos]), emb)
                found[pos] = cache.memory[int(indices[pos])]
            else:
                found[pos] = emb.to(torch.float16).float()
        done += len(chunk)
        if progress:
            progress(done, n)
    if todo:
        seconds = time.perf_counter() - started
        log.info("embeddings: %d slices encoded in %.1f s (%.2f s/slice)", len(todo), seconds, seconds / len(todo))
    if cache is not None:
        cache.touch()
        if todo and cache.folder is not None:
            try:
                prune_cache(keep=[cache.folder])
            except OSError as exc:  # pruning is housekeeping: never fail a run for it
                log.warning("could not prune the embedding cache: %s", exc)
    return torch.stack([found[pos] for pos in range(n)]) if n else torch.empty(0)
