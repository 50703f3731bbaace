"""Train an H-SAM on a dataset of labelled volumes (2D slices), on one process or many (torchrun).

Data: pairs of image / label-map volumes (:func:`find_pairs`: a folder with matching names, or a CSV
``image,label``), or TransUNet's Synapse ``train_npz`` slices (:mod:`hsam.engine.train_npz`). Slices are k planes (the image's third voxel axis) brought into the model's space exactly as
inference does (:func:`hsam.engine.finetune_data.slice_inputs`: slice orientation, intensity normalisation;
bilinear resize to the model's square input) with their labels (class indices, nearest neighbour). H-SAM's
"10 % of slices" protocol (:func:`select_slices`): ``round(fraction · all slices)`` slices drawn without
replacement over all volumes by a seeded generator (221 of Synapse's 2,211 at 0.1).

Recipe (shared with :mod:`hsam.engine.finetune`, mode ``full``): loss 0.1·CE + 0.9·soft Dice per stage mixed by
``w = 0.6 ** (0.99 ** epoch)`` (:mod:`hsam.engine.losses`); AdamW (0.9, 0.999), weight decay 0.1, lr 0.0025,
linear warm-up (250 steps) then poly decay (0.9) (:func:`hsam.engine.finetune.learning_rate`); embedding noise
E + N(0, σ²), σ = 0.2·(max E − min E) over the (global) batch; one of rotation / crop-zoom / elastic per sample,
labels nearest (:mod:`hsam.engine.augment`); seed 2345. LoRA adapters + both decoders learn (a base without LoRA:
decoders only, frozen encoder).

Distribution and exactness
--------------------------
``WORLD_SIZE > 1`` (torchrun): ``torch.distributed`` (gloo on CPU, nccl on CUDA) + ``DistributedDataParallel``.
The batch size given is the GLOBAL batch B; each of the W ranks takes a contiguous shard of B/W samples of each
step's global batch (B must divide by W). Every step's global batch is a pure function of ``(seed, step)``: the
sample stream is the concatenation of seeded per-epoch permutations. All randomness of a sample (augmentation,
embedding noise, stage-2 dropout) comes from generators keyed by ``(seed, its position in the stream)``, never
from per-process state, so 1 process with batch B and W processes with B/W see identical samples with identical
augmentations. The loss is that of the global batch: H-SAM's batch-level soft-Dice sums and the noise range
(max/min) are all-reduced with autograd-aware collectives; cross-entropy is a per-rank mean, which DDP's gradient
averaging turns into the global mean. Parameters of a W-process run therefore equal the 1-process run's up to
floating-point summation order.

Checkpoints (``checkpoint_every``): rank 0 writes ``<dir>/last.pt`` atomically (temporary file + rename) with
the trained parameters, optimiser state, schedule, RNG states and the step (the sampler's position is
``step · B``); everything is plain dicts / lists / tensors / numbers / strings, loadable with
``torch.load(weights_only=True)``. Resuming restores them and continues; on the CPU with one process the result
is bit-identical to an uninterrupted run. A per-step CSV log (rank 0) records step, epoch, lr, losses, w, slices/s.
The result is a model file in our format whose description records the lineage (base, dataset, slices, settings).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import hashlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import HSAMError, InputVolumeError

log = logging.getLogger("hsam")

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = "last.pt"
LOG_FIELDS = ("step", "epoch", "lr", "loss", "loss_stage1", "loss_stage2", "w", "slices_per_s")
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_FOLDERS = ("images", "imagesTr", "image", "img")
LABEL_FOLDERS = ("labels", "labelsTr", "label", "masks", "segmentations")

__all__ = ["SliceDataset", "TrainError", "TrainResult", "TrainSettings", "VolumePair", "find_pairs",
           "global_batch_positions", "load_checkpoint", "select_slices", "shard", "train"]


class TrainError(HSAMError):
    """Training cannot run with these inputs or settings (the message says why and what to do)."""


# ---------------------------------------------------------------------------------------------- settings

@dataclass
class TrainSettings:
    """How to train; the defaults are H-SAM's recipe."""

    global_batch: int = 16            # slices per optimiser step over all processes
    steps: int | None = None          # optimiser steps in total
    epochs: int | None = None         # or passes over the selected slices (steps = ceil(epochs·n / B))
    fraction: float = 0.1             # share of all slices used ("10 % of slices")
    lr: float = 0.0025
    weight_decay: float = 0.1
    warmup: int = 250                 # linear warm-up steps (capped at the number of steps)
    power: float = 0.9                # poly decay
    seed: int = 2345
    noise: float = 0.2                # embedding noise σ as a fraction of the batch's value range
    augment: str = "full"             # none | rotate | full (rotation / crop-zoom / elastic)
    encoder: str = "auto"             # auto (LoRA when the base has it) | lora | frozen
    precision: str = "auto"           # auto (bf16 on CUDA where supported, else fp32) | fp32 | bf16 (CUDA only)
    grad_checkpoint: bool = False     # recompute the ViT blocks in backward (less memory, ~30 % slower)
    checkpoint_every: int = 0         # steps between checkpoints (0: only when stopping early)
    stage2_init: str = "stage1"       # an untrained stage 2 of the base: warm start from stage 1, or random
    device: str = "auto"

    def resolved(self, num_slices: int) -> "TrainSettings":
        import copy

        s = copy.copy(self)
        if self.global_batch < 1:
            raise TrainError(f"the global batch must be at least 1, got {self.global_batch}")
        if not 0 < self.fraction <= 1:
            raise TrainError(f"the slice fraction must lie in (0, 1], got {self.fraction}")
        if self.epochs is not None:
            if self.epochs < 1:
                raise TrainError(f"epochs must be at least 1, got {self.epochs}")
            s.steps = math.ceil(self.epochs * num_slices / self.global_batch)
        elif self.steps is None:
            s.steps = math.ceil(300 * num_slices / self.global_batch)  # H-SAM: 300 epochs
        if s.steps < 1:
            raise TrainError(f"steps must be at least 1, got {s.steps}")
        s.warmup = max(1, min(int(self.warmup), s.steps))
        if not s.lr > 0:
            raise TrainError(f"the learning rate must be positive, got {s.lr}")
        if s.augment not in ("none", "rotate", "full"):
            raise TrainError(f"unknown augmentation {s.augment!r}: none, rotate or full")
        if s.encoder not in ("auto", "lora", "frozen"):
            raise TrainError(f"unknown encoder mode {s.encoder!r}: auto, lora or frozen")
        if s.precision not in ("auto", "fp32", "bf16"):
            raise TrainError(f"unknown precision {s.precision!r}: auto, fp32 or bf16")
        if s.checkpoint_every < 0:
            raise TrainError("checkpoint_every must be 0 (off) or a number of steps")
        return s

    def to_json(self) -> dict:
        return dict(asdict(self))


@dataclass
class TrainResult:
    """``loaded``: the trained model (CPU, eval) with lineage in its description (None on ranks > 0 and when the
    run stopped early); ``path``: where it was written; ``history``: per-step log rows of this run."""

    loaded: Any
    path: Path | None
    step: int
    steps: int
    history: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------- data

@dataclass(frozen=True)
class VolumePair:
    image: str
    label: str


def _stem(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[:-len(suffix)]
            break
    return name


def _volumes_in(folder: Path) -> dict[str, Path]:
    return {_stem(p): p for p in sorted(folder.iterdir())
            if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES) and not p.name.startswith(".")}


def find_pairs(data: str | Path) -> list[VolumePair]:
    """Image / label pairs of a dataset: a CSV with columns ``image,label`` (paths relative to the CSV's folder;
    a header row is optional), or a folder with an image folder (images, imagesTr, …) and a label folder (labels,
    labelsTr, masks, …) holding files of matching names (an nnU-Net channel suffix ``_0000`` is ignored)."""
    path = Path(data).expanduser()
    if path.is_file():
        rows = []
        with open(path, newline="") as fh:
            for row in csv.reader(fh):
                if not row or not "".join(row).strip() or row[0].strip().startswith("#"):
                    continue
                if len(row) < 2:
                    raise TrainError(f"{path}: each row needs an image and a label path (image,label), got {row}")
                rows.append((row[0].strip(), row[1].strip()))
        if rows and rows[0][0].lower() == "image" and rows[0][1].lower() in ("label", "labels"):
            rows = rows[1:]
        pairs = []
        for image, label in rows:
            ip, lp = (Path(p).expanduser() for p in (image, label))
            ip, lp = (p if p.is_absolute() else path.parent / p for p in (ip, lp))
            for p in (ip, lp):
                if not p.exists():
                    raise TrainError(f"{path}: {p} does not exist")
            pairs.append(VolumePair(str(ip), str(lp)))
        if not pairs:
            raise TrainError(f"{path} lists no image,label pairs")
        return pairs
    if not path.is_dir():
        raise TrainError(f"the dataset {path} is neither a folder nor a CSV file")
    image_dir = next((path / d for d in IMAGE_FOLDERS if (path / d).is_dir()), None)
    label_dir = next((path / d for d in LABEL_FOLDERS if (path / d).is_dir()), None)
    if image_dir is None or label_dir is None:
        raise TrainError(f"{path} needs an image folder ({', '.join(IMAGE_FOLDERS)}) and a label folder "
                         f"({', '.join(LABEL_FOLDERS)}) with files of matching names, or give a CSV image,label")
    labels = _volumes_in(label_dir)
    pairs, missing = [], []
    for stem, image in _volumes_in(image_dir).items():
        key = stem if stem in labels else (stem[:-5] if stem.endswith("_0000") else None)
        if key in labels:
            pairs.append(VolumePair(str(image), str(labels[key])))
        else:
            missing.append(image.name)
    if missing:
        raise TrainError(f"no label file in {label_dir} matches the images {missing[:5]}"
                         f"{' …' if len(missing) > 5 else ''}")
    if not pairs:
        raise TrainError(f"no volumes found in {image_dir}")
    return pairs


def _depth(path: str) -> int:
    """Slices along the third voxel axis (k), from the header where possible."""
    import SimpleITK as sitk

    if Path(path).is_file():
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
            size = reader.GetSize()
            return int(size[2]) if len(size) > 2 else 1
        except RuntimeError:
            pass
    from ..data.volume import read_image

    return int(read_image(path).GetSize()[2])


def select_slices(depths: Sequence[int], fraction: float, seed: int) -> list[tuple[int, int]]:
    """H-SAM's "fraction of 2D slices": ``max(1, round(fraction · Σ depths))`` distinct (volume, k) slices drawn
    uniformly over all volumes with a generator seeded by ``seed``; sorted. ``fraction = 1``: every slice."""
    total = int(sum(depths))
    if total < 1:
        raise TrainError("the dataset holds no slices")
    count = total if fraction >= 1 else max(1, round(fraction * total))
    chosen = np.arange(total) if count == total else np.sort(
        np.random.default_rng(np.random.SeedSequence([int(seed), 0x5A1CE])).choice(total, count, replace=False))
    starts = np.cumsum([0] + list(depths))
    out = []
    for g in chosen.tolist():
        v = int(np.searchsorted(starts, g, side="right") - 1)
        out.append((v, int(g - starts[v])))
    return out


class SliceDataset:
    """The selected slices in model space: ``images`` (n, S, S) float32 in [0, 1] (one channel; the network
    input repeats it ×3), ``targets`` (n, S, S) uint8 class indices; ``entries[i] = (volume, k)``."""

    def __init__(self, pairs: Sequence[VolumePair], description, labelset, fraction: float = 0.1,
                 seed: int = 2345) -> None:
        self.pairs = list(pairs)
        self.fraction, self.seed = float(fraction), int(seed)
        self.depths = [_depth(p.image) for p in self.pairs]
        self.entries = select_slices(self.depths, fraction, seed)
        self.labelset = labelset
        self.image_size = int(description.image_size)
        self.warnings: list[str] = []
        images, targets = [], []
        for v, pair in enumerate(self.pairs):
            ks = [k for vv, k in self.entries if vv == v]
            if ks:
                im, tg = self._load(pair, ks, description)
                images.append(im)
                targets.append(tg)
        import torch

        self.images = torch.cat(images)
        self.targets = torch.cat(targets)

    def __len__(self) -> int:
        return len(self.entries)

    def _load(self, pair: VolumePair, ks: list[int], description):
        import SimpleITK as sitk
        import torch

        from ..data.orientation import reorientation_for
        from ..data.volume import read_image
        from .embeddings import labels_to_model, model_inputs
        from .finetune_data import _labels_array, slice_inputs

        image = read_image(pair.image)
        label_image = sitk.ReadImage(str(pair.label))
        reorient = reorientation_for(image, description.orientation)
        self.warnings += [f"{Path(pair.image).name}: {w}" for w in reorient.warnings]
        try:
            labels = _labels_array(label_image, image)
        except InputVolumeError as exc:
            raise InputVolumeError(f"{Path(pair.label).name}: {exc}") from exc
        try:
            images, model_indices, _, _ = slice_inputs(image, description, ks, reorient)
        except ValueError:
            raise InputVolumeError(f"{Path(pair.image).name}: the model segments slices that are not this volume's "
                                   "k planes; resample the volume so that its third voxel axis is the model's "
                                   "slice axis") from None
        raw = reorient.to_model(labels)[model_indices]
        if raw.dtype.kind == "f" and not np.array_equal(raw, np.round(raw)):
            raise InputVolumeError(f"{Path(pair.label).name} holds non-integer values: it is not a label map")
        raw = raw.astype(np.int64)
        lut = np.zeros(max(256, int(raw.max()) + 1 if raw.size else 256), dtype=np.uint8)
        for index, value in enumerate(self.labelset.index_to_value_lut()):
            lut[value] = index
        known = set(self.labelset.index_to_value_lut())
        other = sorted(set(np.unique(raw).tolist()) - known)
        if raw.size and raw.min() < 0:
            raise InputVolumeError(f"{Path(pair.label).name} holds negative label values")
        if other:
            self.warnings.append(f"{Path(pair.label).name}: label values {other} are not in the label set "
                                 f"{self.labelset.name!r}: trained as background")
        images_t = model_inputs(images, self.image_size)[:, 0].contiguous()
        targets_t = labels_to_model(lut[raw], self.image_size).to(torch.uint8)
        return images_t, targets_t

    def sha256(self) -> str:
        """Content hash of the selected slices (images and labels, model space)."""
        digest = hashlib.sha256()
        digest.update(self.images.numpy().tobytes())
        digest.update(self.targets.numpy().tobytes())
        return digest.hexdigest()

    @classmethod
    def from_npz(cls, folder: Path, description, labelset, fraction: float = 0.1, seed: int = 2345) -> "SliceDataset":
        """The selected slices of a TransUNet ``train_npz`` folder (:mod:`hsam.engine.train_npz`)."""
        from .train_npz import load_npz_dataset

        dataset = cls.__new__(cls)
        dataset.fraction, dataset.seed = float(fraction), int(seed)
        dataset.labelset = labelset
        dataset.image_size = int(description.image_size)
        dataset.warnings = []
        load_npz_dataset(dataset, Path(folder), description, labelset)
        return dataset

    def record(self) -> dict:
        """The dataset as the model's lineage records it."""
        volumes = []
        for v, pair in enumerate(self.pairs):
            volumes.append({"image": pair.image, "label": pair.label, "slices_k": self.depths[v],
                            "selected_k": [k for vv, k in self.entries if vv == v]})
        return {"volumes": volumes, "total_slices": int(sum(self.depths)), "selected_slices": len(self.entries),
                "fraction": self.fraction, "selection_seed": self.seed, "axis": "k",
                "labels": self.labelset.name, "sha256": self.sha256()}


def open_dataset(data, description, labelset, fraction: float, seed: int) -> SliceDataset:
    """The training slices of ``data``: a TransUNet ``train_npz`` folder, a folder or CSV of volume pairs
    (:func:`find_pairs`), or a list of :class:`VolumePair`."""
    from .train_npz import npz_folder

    if isinstance(data, (list, tuple)):
        return SliceDataset(list(data), description, labelset, fraction, seed)
    folder = npz_folder(data)
    if folder is not None:
        return SliceDataset.from_npz(folder, description, labelset, fraction, seed)
    return SliceDataset(find_pairs(data), description, labelset, fraction, seed)


# ---------------------------------------------------------------------------------------------- sampling

def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([int(seed), 0xE90C, int(epoch)])).permutation(n)


def global_batch_positions(step: int, global_batch: int, n: int, seed: int) -> list[tuple[int, int]]:
    """Step ``step``'s global batch: (stream position, dataset index) pairs. The stream is the concatenation of
    seeded per-epoch permutations of the n slices; step s takes positions s·B … s·B + B − 1."""
    out = []
    cache: dict[int, np.ndarray] = {}
    for p in range(step * global_batch, (step + 1) * global_batch):
        epoch, i = divmod(p, n)
        if epoch not in cache:
            cache[epoch] = _epoch_order(n, seed, epoch)
        out.append((p, int(cache[epoch][i])))
    return out


def shard(items: Sequence, rank: int, world: int) -> list:
    """Rank ``rank``'s contiguous share of a global batch (its length must divide by ``world``)."""
    if len(items) % world:
        raise TrainError(f"the global batch {len(items)} does not divide by the {world} processes: choose a global "
                         f"batch that is a multiple of {world}")
    per = len(items) // world
    return list(items[rank * per:(rank + 1) * per])


def _sample_generator(seed: int, position: int, purpose: int = 0):
    import torch

    state = np.random.SeedSequence([int(seed), 0x5A3B1E, int(position), int(purpose)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


# ---------------------------------------------------------------------------------------------- distribution

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: Any = None
    group: Any = None          # side group for the loss collectives (not DDP's)
    owns_init: bool = False


def _init_distributed(device_name: str) -> _Dist:
    import torch

    from .device import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return _Dist(device=resolve_device(device_name))
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    elif device_name == "auto":
        device = torch.device("cpu")
    else:
        device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    group = dist.new_group(backend=backend)
    return _Dist(rank=rank, world=world, local_rank=local_rank, device=device, group=group, owns_init=owns)


def _all_reduce_sum_fn():
    import torch
    import torch.distributed as dist

    class _AllReduceSum(torch.autograd.Function):
        """Sum over ranks; the backward sums the gradients over ranks too, so that after DDP's averaging every
        rank's share of a global quantity receives the global loss's gradient."""

        @staticmethod
        def forward(ctx, x, group):
            ctx.group = group
            y = x.detach().clone()
            dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
            return y

        @staticmethod
        def backward(ctx, grad):
            g = grad.detach().clone().contiguous()
            dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
            return g, None

    return _AllReduceSum


class _Collectives:
    """Global-batch reductions: identities on one process, autograd-aware all-reduces on several."""

    def __init__(self, ctx: _Dist) -> None:
        self.ctx = ctx
        self._sum = _all_reduce_sum_fn() if ctx.world > 1 else None

    def sum(self, x):
        return x if self._sum is None else self._sum.apply(x, self.ctx.group)

    def max(self, x):
        local = x.max()
        if self._sum is None:
            return local
        import torch.distributed as dist

        top = local.detach().clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.ctx.group)
        owner = (local.detach() == top).to(local.dtype)
        count = owner.clone()
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=self.ctx.group)
        return self.sum(local * owner / count)

    def min(self, x):
        return -self.max(-x)

    def mean(self, x):
        """Mean over ranks of a detached value (logging)."""
        if self._sum is None:
            return x
        import torch.distributed as dist

        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.ctx.group)
        return y / self.ctx.world


@contextlib.contextmanager
def _keyed_dropout(model, seed: int, positions: Sequence[int]):
    """Dropout masks drawn per sample from ``(seed, stream position, module, call)``: the same sample gets the same
    mask whatever the process and batch it runs in."""
    import torch
    from torch import nn

    mods = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    calls = [0] * len(mods)

    def make(mi, mod):
        def forward(x):
            if not mod.training:
                return x
            if x.shape[0] != len(positions):
                raise RuntimeError("keyed dropout: the batch does not match the sample positions")
            masks = []
            for p in positions:
                g = _sample_generator(seed, p, 1000 + 64 * mi + calls[mi])
                masks.append(torch.rand(tuple(x.shape[1:]), generator=g) >= mod.p)
            calls[mi] += 1
            mask = torch.stack(masks).to(device=x.device, dtype=x.dtype)
            return x * mask / (1 - mod.p)
        return forward

    for mi, mod in enumerate(mods):
        mod.forward = make(mi, mod)
    try:
        yield
    finally:
        for mod in mods:
            del mod.forward


def _enable_grad_checkpoint(encoder) -> bool:
    """Recompute each ViT block in the backward pass (non-reentrant checkpointing). False if unsupported."""
    import torch.utils.checkpoint as cp

    blocks = getattr(encoder, "blocks", None)
    if blocks is None:
        return False
    for block in blocks:
        inner = block.forward

        def forward(x, _inner=inner):
            return cp.checkpoint(_inner, x, use_reentrant=False)
        block.forward = forward
    return True


def _step_module(model, train_encoder: bool, noise: float, coll: _Collectives):
    """The per-step computation as one module (DDP hooks ``forward``): encode, embedding noise, decode."""
    import torch
    from torch import nn

    class StepModule(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, images, noise_units):
            if train_encoder:
                emb = self.model.encode(images)
            else:
                with torch.no_grad():
                    emb = self.model.encode(images)
            emb = emb.float()
            if noise > 0:
                sigma = noise * (coll.max(emb) - coll.min(emb))
                emb = emb + sigma * noise_units
            out = self.model.decode(emb)
            return out.stage1_logits, out.stage2_logits

    return StepModule()


def _autocast_dtype(device, precision: str):
    import torch

    if precision == "bf16":
        if device.type != "cuda":
            raise TrainError("bf16 autocast is for CUDA GPUs; on this device train with --precision fp32")
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


# ---------------------------------------------------------------------------------------------- checkpoints

def _atomic_save(obj, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint (a file, or a folder holding ``last.pt``), loaded with ``weights_only=True``."""
    import torch

    path = Path(path).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise TrainError(f"no training checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path} is not an hsam training checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def _rng_state(device) -> dict:
    import torch

    state = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    import torch

    torch.set_rng_state(state["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"], device)


def _read_log(path: Path, upto: int) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [row for row in csv.DictReader(fh) if int(row["step"]) <= upto]


# ---------------------------------------------------------------------------------------------- main entry

def train(data: str | Path | Sequence[VolumePair], base, *, out: str | Path | None = None, labelset=None,
          settings: TrainSettings | None = None, checkpoint_dir: str | Path | None = None,
          resume: str | Path | None = None, log_path: str | Path | None = None, stop_after: int | None = None,
          name: str | None = None, title: str | None = None, **overrides) -> TrainResult:
    """Train ``base`` (a :class:`~hsam.weights.loader.LoadedModel`) on the slices of ``data`` (a folder / CSV for
    :func:`find_pairs`, or a list of :class:`VolumePair`). Run under torchrun for several processes.

    ``settings`` / keyword ``overrides``: :class:`TrainSettings` fields. ``checkpoint_dir``: where checkpoints go
    (default ``<out>.checkpoints``); ``resume``: a checkpoint folder or file to continue from; ``stop_after``:
    stop (with a checkpoint) once this step is done, without writing the model (preemption / tests);
    ``log_path``: the per-step CSV log. Returns a :class:`TrainResult` (the model only on rank 0)."""
    import torch

    from ..weights.loader import LoadedModel, save_model
    from .finetune import _augment, _state_hash, default_model_name, learning_rate
    from .finetune_model import build_student, check_base_for_mode, trainable_parameters
    from .losses import hsam_loss

    started = time.perf_counter()
    settings = TrainSettings(**asdict(settings)) if settings is not None else TrainSettings()
    for key, value in overrides.items():
        if not hasattr(settings, key):
            raise TypeError(f"train() got an unknown setting {key!r}")
        if value is not None:
            setattr(settings, key, value)
    labelset = labelset or base.description.labels
    description0 = base.description.with_changes(labels=labelset)
    arch = base.description.architecture
    has_lora = base.description.backbone == "sam_vit" and int(arch.get("lora_rank", 0) or 0) > 0
    if settings.encoder == "lora":
        check_base_for_mode(base, "full")
    train_encoder = has_lora and settings.encoder != "frozen"
    out_path = Path(out).expanduser() if out is not None else None
    if out_path is not None and (out_path.is_dir() or not out_path.parent.is_dir()):
        raise TrainError(f"cannot write the model to {out_path}: give a file in an existing folder")

    ctx = _init_distributed(settings.device)
    try:
        if settings.global_batch % ctx.world:
            raise TrainError(f"the global batch {settings.global_batch} does not divide by the {ctx.world} "
                             f"processes: choose a global batch that is a multiple of {ctx.world}")
        dataset = open_dataset(data, description0, labelset, settings.fraction, settings.seed)
        pairs = dataset.pairs
        if ctx.rank == 0:
            for text in dataset.warnings:
                log.warning(text)
        n = len(dataset)
        s = settings.resolved(n)
        per_rank = s.global_batch // ctx.world
        device = ctx.device
        dtype = _autocast_dtype(device, s.precision)
        data_sha = dataset.sha256()
        base_sha = _state_hash(base.model)
        run_id = {"seed": s.seed, "global_batch": s.global_batch, "fraction": s.fraction, "steps": s.steps,
                  "lr": s.lr, "warmup": s.warmup, "dataset_sha256": data_sha, "base_sha256": base_sha,
                  "train_encoder": bool(train_encoder), "labels": list(labelset.index_to_value_lut())}

        student, description, reused = build_student(base, labelset, s.seed, s.stage2_init)
        params = trainable_parameters(student, "full" if train_encoder else "fast")
        student.to(device)
        if s.grad_checkpoint and train_encoder and not _enable_grad_checkpoint(student.image_encoder):
            log.warning("gradient checkpointing is not supported by this encoder: ignored")
        optimizer = torch.optim.AdamW(params, lr=s.lr, betas=(0.9, 0.999), weight_decay=s.weight_decay)
        coll = _Collectives(ctx)
        module = _step_module(student, train_encoder, s.noise, coll)
        if ctx.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)

        if checkpoint_dir is not None:
            ckpt_dir = Path(checkpoint_dir).expanduser()
        elif resume is not None:  # keep writing where the run was resumed from
            ckpt_dir = Path(resume).expanduser() if Path(resume).expanduser().is_dir() else \
                Path(resume).expanduser().parent
        else:
            ckpt_dir = out_path.with_name(out_path.name + ".checkpoints") if out_path is not None else None
        step = 0
        torch.manual_seed(s.seed)
        if resume is not None:
            state = load_checkpoint(resume)
            differ = {k: (state["run"].get(k), v) for k, v in run_id.items()
                      if k != "steps" and state["run"].get(k) != v}
            if differ:
                raise TrainError(f"cannot resume from {resume}: the run differs in {sorted(differ)} (checkpoint "
                                 f"vs now: {differ}); resume with the same data, base and settings")
            with torch.no_grad():
                named = dict(student.named_parameters())
                for k, v in state["model"].items():
                    named[k].copy_(v.to(device))
            optimizer.load_state_dict(state["optimizer"])
            _set_rng_state(state["rng"], device)
            step = int(state["step"])
            log.info("resumed from %s at step %d", resume, step)
        log_file = Path(log_path).expanduser() if log_path is not None else None
        history = _read_log(log_file, step) if (log_file is not None and resume is not None) else []
        if ctx.rank == 0 and log_file is not None:
            with open(log_file, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
                writer.writeheader()
                writer.writerows(history)
        if ctx.rank == 0:
            log.info("training on %d of %d slices (%d volumes), %d steps, global batch %d (%d × %d processes), "
                     "lr %g, %s on %s, encoder %s", n, sum(dataset.depths), len(pairs), s.steps, s.global_batch,
                     per_rank, ctx.world, s.lr, "fp32" if dtype is None else "bf16", device,
                     "LoRA" if train_encoder else "frozen")

        def save_checkpoint(at: int) -> Path | None:
            if ckpt_dir is None:
                return None
            if ctx.rank == 0:
                state = {"format": CHECKPOINT_FORMAT, "kind": "hsam-train-checkpoint", "step": at,
                         "sample_position": at * s.global_batch,
                         "model": {k: p.detach().cpu().clone() for k, p in student.named_parameters()
                                   if p.requires_grad},
                         "optimizer": optimizer.state_dict(),
                         "scheduler": {"kind": "warmup-poly", "base_lr": s.lr, "warmup": s.warmup,
                                       "total": s.steps, "power": s.power},
                         "rng": _rng_state(device), "run": run_id, "world_size": ctx.world,
                         "settings": {k: v for k, v in s.to_json().items()}}
                _atomic_save(state, ckpt_dir / CHECKPOINT_NAME)
            if ctx.world > 1:
                import torch.distributed as dist

                dist.barrier()
            return ckpt_dir / CHECKPOINT_NAME

        student.train()
        student.image_encoder.eval()
        grid = tuple(student.prompt_encoder.image_embedding_size)
        channels = int(student.prompt_encoder.embed_dim)
        last_ckpt = None
        stop_at = s.steps if stop_after is None else min(s.steps, int(stop_after))
        while step < stop_at:
            t0 = time.perf_counter()
            batch = shard(global_batch_positions(step, s.global_batch, n, s.seed), ctx.rank, ctx.world)
            epoch = (step * s.global_batch) // n
            images, targets, noises = [], [], []
            for position, index in batch:
                g = _sample_generator(s.seed, position)
                img = dataset.images[index][None, None].to(device)  # augmented on the device
                tgt = dataset.targets[index][None].long().to(device)
                img, tgt, _ = _augment(img, tgt, (), s.augment, g)
                images.append(img[0])
                targets.append(tgt[0])
                noises.append(torch.randn((channels, *grid), generator=g))
            x = torch.stack(images).expand(-1, 3, -1, -1).contiguous()
            y = torch.stack(targets)
            eps = torch.stack(noises).to(device)
            lr = learning_rate(step, s.lr, s.warmup, s.steps, s.power)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with _keyed_dropout(student, s.seed, [p for p, _ in batch]), (
                    torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()):
                s1, s2 = module(x, eps)
            loss = hsam_loss(s1.float(), s2.float(), y, epoch, reduce_sums=coll.sum if ctx.world > 1 else None)
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            optimizer.step()
            values = coll.mean(torch.stack([loss.total.detach(), loss.stage1, loss.stage2]).float()).cpu()
            if not bool(torch.isfinite(values).all()):
                raise TrainError(f"the training loss became NaN/inf at step {step + 1}: lower the learning rate "
                                 "(--lr) or use --precision fp32")
            step += 1
            row = {"step": step, "epoch": epoch, "lr": f"{lr:.8g}", "loss": f"{float(values[0]):.6f}",
                   "loss_stage1": f"{float(values[1]):.6f}", "loss_stage2": f"{float(values[2]):.6f}",
                   "w": f"{loss.weight:.6f}",
                   "slices_per_s": f"{s.global_batch / max(time.perf_counter() - t0, 1e-9):.3f}"}
            history.append(row)
            if ctx.rank == 0 and log_file is not None:
                with open(log_file, "a", newline="") as fh:
                    csv.DictWriter(fh, fieldnames=LOG_FIELDS).writerow(row)
            if ctx.rank == 0 and (step % 10 == 0 or step == stop_at):
                log.info("step %d/%d: loss %s (stage 1 %s, stage 2 %s, w %s), lr %s, %s slices/s", step, s.steps,
                         row["loss"], row["loss_stage1"], row["loss_stage2"], row["w"], row["lr"],
                         row["slices_per_s"])
            if (s.checkpoint_every and step % s.checkpoint_every == 0) or (step == stop_at and step < s.steps):
                last_ckpt = save_checkpoint(step)
        if ctx.world > 1:
            import torch.distributed as dist

            dist.barrier()
        if step < s.steps:
            return TrainResult(loaded=None, path=None, step=step, steps=s.steps, history=history,
                               checkpoint=last_ckpt, seconds=time.perf_counter() - started)

        # ---- the trained model, with its lineage (rank 0)
        student.eval().cpu()
        for p in student.parameters():
            p.requires_grad_(False)
        if ctx.rank != 0:
            return TrainResult(loaded=None, path=None, step=step, steps=s.steps, history=history,
                               checkpoint=last_ckpt, seconds=time.perf_counter() - started)
        from .. import __version__

        now = _dt.datetime.now().astimezone()
        model_name = name or default_model_name(labelset, now).replace("-ft-", "-train-")
        entry = {
            "date": now.isoformat(timespec="seconds"), "hsam_version": __version__, "mode": "train",
            "base": {"name": base.description.name, "title": base.description.title, "source": str(base.source),
                     "content_sha256": base_sha, "backbone": base.description.backbone},
            "dataset": {"source": str(data) if not isinstance(data, (list, tuple)) else "pairs",
                        **dataset.record()},
            "labels": {"name": labelset.name, "reused_from_base": list(reused)},
            "settings": {k: v for k, v in s.to_json().items() if k != "device"},
            "encoder_trained": bool(train_encoder), "world_size": ctx.world, "per_rank_batch": per_rank,
            "device": str(device.type), "precision": "fp32" if dtype is None else "bf16",
            "steps": step, "epochs": round(step * s.global_batch / n, 3),
            "final_loss": float(history[-1]["loss"]) if history else None, "resumed": resume is not None,
            "seconds": round(time.perf_counter() - started, 1),
        }
        lineage = list(base.description.provenance.get("lineage", [])) + [entry]
        provenance = {"source": "trained with hsam (hsam.engine.train)", "heads_trained": True,
                      "base_model": base.description.name, "train": entry, "lineage": lineage}
        description = description.with_changes(
            name=model_name, provenance=provenance,
            title=title or f"{labelset.name} trained from {base.description.name} on {n} slices of "
                           f"{len(pairs)} volumes ({now:%Y-%m-%d %H:%M})")
        loaded = LoadedModel(student, description, source="train")
        path = None
        if out_path is not None:
            path = save_model(out_path, loaded)
            loaded.source = str(path)
            log.info("saved the trained model to %s", path)
        return TrainResult(loaded=loaded, path=Path(path) if path else None, step=step, steps=s.steps,
                           history=history, checkpoint=last_ckpt, seconds=time.perf_counter() - started)
    finally:
        if ctx.world > 1 and ctx.owns_init:
            import torch.distributed as dist

            dist.destroy_process_group()
