"""Fine-tune an H-SAM on a few corrected slices of one volume.

Input: an image volume (SimpleITK), a label map on its voxel grid (``(k, j, i)`` array or image), the indices
of the corrected slices along the image's third voxel axis k, and a base model (:class:`LoadedModel`). The
corrected slices go through the same path as inference — the model's slice orientation, its intensity
preprocessing, its square input size — and become (image, class-index) training pairs. Output: a new model
(:class:`FinetuneResult`) whose description records its lineage; the base model (in memory and on disk) and
the user's labels are never modified.

Modes
-----
``fast`` (CPUs): the image encoder is frozen; each corrected slice is encoded once (cached in memory and on
  disk, see :mod:`hsam.engine.embeddings`) and both decoders are trained on the cached embeddings with
  H-SAM's embedding noise (and optionally geometric augmentation applied consistently to embeddings and
  labels).
``full`` (GPUs): H-SAM's recipe — LoRA adapters of the ViT encoder and both decoders learn; each step
  re-encodes augmented images (rotation / crop-zoom / elastic, labels nearest-neighbour); embedding noise;
  AMP on CUDA. Needs a base with LoRA adapters (a SAM-ViT H-SAM).

Both: AdamW (β 0.9, 0.999, weight decay 0.1), linear warm-up then poly decay (power 0.9), loss 0.1·CE + 0.9·soft
Dice per stage mixed by ``w = 0.6 ** (0.99 ** epoch)`` (:mod:`hsam.engine.losses`), epochs counted as passes
over the training slices. (Stretching H-SAM's 300-epoch schedule over a short run was tried and measured worse:
stage 1 got too little weight to learn — see the benchmark report.) With ≥ 3 corrected slices some are held out
for validation (Dice per class), the best epoch's weights are kept and training stops early when validation
stops improving. A seed makes runs reproducible on one machine. ``progress(done, total, stage)`` reports slices
encoded (stage ``"embed"``) and epochs (``"train"``);
``cancel`` (a callable or an Event) stops the run with :class:`CancelledError`, nothing written.

A new label set is allowed: class tokens and class heads are re-initialised for the new classes (those whose
name matches a class of a trained base keep its heads), so a model can learn anatomy its base never saw.

Guidance (``FinetuneSettings.guidance``): part of the batches are decoded with the stage-2 prior taken from the
neighbouring corrected slices and stage 2 learning a correction of them (see :mod:`hsam.engine.guidance`), so
the same model can later segment either prompt-free (the default, ``hsam segment``) or guided by the corrected
slices (:func:`hsam.engine.guidance.segment_guided`). Both are validated on the held-out slices.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..data.labels import LabelSet
from ..errors import CancelledError
from .finetune_data import (CorrectedSlices, embed_slices, embedding_cache_for, parse_slice_spec,  # noqa: F401
                            prepare_corrected_slices, slice_inputs, split_validation)
from .finetune_model import MODES, FinetuneError, build_student, check_base_for_mode, trainable_parameters
from .inference import is_cancelled

log = logging.getLogger("hsam")

ProgressCallback = Callable[[int, int, str], None]

__all__ = ["CorrectedSlices", "FinetuneError", "FinetuneResult", "FinetuneSettings", "autocast_dtype",
           "decode_embeddings", "embed_slices", "embedding_cache_for", "finetune", "parse_slice_spec",
           "prepare_corrected_slices", "slice_inputs", "split_validation"]

# CPU autocast dtype of ``precision="auto"`` where the CPU has native bfloat16 (AVX512-BF16 / AMX). Measured on
# 2 shared cores of an AMD EPYC (torch 2.14, LiteMedSAM base, batch 4): TinyViT encoder 0.68 s/slice bf16 vs
# 1.2–3.2 s fp32 (BatchNorm folded, channels-last; embeddings differ by 1.1 % relative L2); one decoder training
# step 0.23–0.72 s/slice bf16 vs 0.63–2.9 s fp32 (the spread is the machine's load). Embeddings are cached per
# precision, so a model is trained and evaluated on embeddings of one precision.
FINETUNE_CPU_BF16 = True


# ---------------------------------------------------------------------------------------------- settings

@dataclass
class FinetuneSettings:
    """How to fine-tune. ``None`` fields get the mode's defaults (:meth:`resolved`)."""

    mode: str = "fast"
    steps: int | None = None          # optimiser steps in total (epochs are derived from it)
    epochs: int | None = None         # overrides ``steps``: passes over the training slices
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.1
    warmup: int | None = None         # linear warm-up steps
    seed: int = 2345
    validation: float = 0.2           # fraction of corrected slices held out when there are >= 3 (0: none)
    eval_every: int | None = None     # epochs between validations
    patience: int | None = None       # validations without improvement before stopping
    noise: float | None = None        # embedding noise σ as a fraction of the batch's value range (H-SAM: 0.2)
    augment: str | None = None        # "none" | "flip" | "rotate" | "full" (H-SAM's three kinds)
    guidance: float | None = None     # probability of a batch decoded with its neighbours' guidance (0: never)
    guidance_mix: float = 1.0         # stage-2 prior = (1 − mix)·stage-1 prior + mix·guidance
    guidance_weight: float = 1.0      # guided stage-2 logits = model's + weight·log(guidance + ε) (train and test)
    guidance_self: float = 0.5        # share of guided samples whose guidance is their own labels, deformed
    guidance_gate: float | None = 0.6  # guided decision: keep the neighbours' class where they agree this much
    propagation: bool = True          # guidance of training/validation slices propagated by registration
    precision: str = "auto"           # auto | fp32 | bf16 | fp16
    device: str = "auto"
    stage2_init: str = "stage1"       # a base's untrained stage 2: "stage1" (warm start) | "random"

    def resolved(self, num_train: int) -> "FinetuneSettings":
        """A copy with every default filled in for ``num_train`` training slices."""
        if self.mode not in MODES:
            raise FinetuneError(f"unknown fine-tuning mode {self.mode!r}: use fast (CPU, frozen encoder) or full "
                                "(GPU, LoRA + decoders)")
        fast = self.mode == "fast"
        s = copy.copy(self)
        s.batch_size = max(1, min(self.batch_size or (4 if fast else 8), num_train))
        steps_per_epoch = math.ceil(num_train / s.batch_size)
        if self.epochs is not None:
            if self.epochs < 1:
                raise FinetuneError(f"epochs must be at least 1, got {self.epochs}")
            s.epochs = int(self.epochs)
        else:
            steps = self.steps if self.steps is not None else (160 if fast else 600)
            if steps < 1:
                raise FinetuneError(f"steps must be at least 1, got {steps}")
            s.epochs = max(1, math.ceil(steps / steps_per_epoch))
        s.steps = s.epochs * steps_per_epoch
        s.lr = float(self.lr if self.lr is not None else (1e-3 if fast else 2.5e-3))
        if not s.lr > 0:
            raise FinetuneError(f"the learning rate must be positive, got {s.lr}")
        s.warmup = int(self.warmup if self.warmup is not None else min(250, max(1, s.steps // 10)))
        s.eval_every = int(self.eval_every or max(1, s.epochs // 15))
        s.patience = int(self.patience if self.patience is not None else 5)
        s.noise = float(self.noise if self.noise is not None else (0.02 if fast else 0.2))
        s.augment = self.augment or ("none" if fast else "full")
        if s.augment not in ("none", "flip", "rotate", "full"):
            raise FinetuneError(f"unknown augmentation {s.augment!r}: none, flip, rotate or full")
        s.guidance = float(self.guidance if self.guidance is not None else 0.7)
        if num_train < 2:
            s.guidance = 0.0  # leave-one-out guidance needs a second training slice
        if not 0 <= s.guidance <= 1 or not 0 <= s.guidance_mix <= 1:
            raise FinetuneError("guidance and guidance_mix must lie in [0, 1]")
        if s.stage2_init not in ("stage1", "random"):
            raise FinetuneError(f"unknown stage2_init {s.stage2_init!r}: stage1 or random")
        if not 0 <= s.validation < 1:
            raise FinetuneError(f"the validation fraction must lie in [0, 1), got {s.validation}")
        return s

    def to_json(self) -> dict:
        return dict(asdict(self))


@dataclass
class EpochRecord:
    epoch: int
    step: int
    loss: float
    loss_stage1: float
    loss_stage2: float
    stage2_weight: float
    lr: float
    seconds: float
    val_dice: dict[str, float] | None = None      # prompt-free, per class
    val_mean: float | None = None                 # prompt-free mean
    val_guided_mean: float | None = None          # guided mean (best decision weight)


@dataclass
class FinetuneResult:
    """``loaded``: the fine-tuned model (eval mode, CPU) with its description (lineage in its provenance);
    ``history``: one record per epoch; ``validation``: per-class Dice (prompt-free) of the kept weights on the
    held-out slices (None without validation); ``path``: where it was saved (None if not saved)."""

    loaded: Any
    history: list[EpochRecord]
    settings: FinetuneSettings
    train_slices: list[int]
    validation_slices: list[int]
    validation: dict[str, float] | None = None
    validation_guided: dict[str, float] | None = None
    best_epoch: int | None = None
    stopped_early: bool = False
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    path: Path | None = None

    @property
    def description(self):
        return self.loaded.description


# ---------------------------------------------------------------------------------------------- helpers

def learning_rate(step: int, base_lr: float, warmup: int, total: int, power: float = 0.9) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup`` steps, then poly decay to 0 at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    return base_lr * max(0.0, 1 - (step - warmup) / span) ** power


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> list[float]:
    """Dice of classes 1..K-1 over all given pixels together (NaN where a class is absent from both)."""
    out = []
    for c in range(1, num_classes):
        a, b = pred == c, truth == c
        total = int(a.sum()) + int(b.sum())
        out.append(float(2 * np.logical_and(a, b).sum() / total) if total else float("nan"))
    return out


def _mean(values) -> float:
    present = [v for v in values if not math.isnan(v)]
    return float(np.mean(present)) if present else 0.0


def autocast_dtype(device, precision: str = "auto"):
    """The autocast dtype for fine-tuning on ``device`` (None = float32). CUDA: bf16 where supported, else fp16
    (with a gradient scaler). CPU: ``auto`` = bf16 on CPUs with native bfloat16 (``FINETUNE_CPU_BF16``)."""
    import torch

    from .device import choose_precision, cpu_has_native_bf16

    device = torch.device(device)
    if device.type == "cpu" and (precision or "auto").lower() == "auto":
        return torch.bfloat16 if FINETUNE_CPU_BF16 and cpu_has_native_bf16() else None
    return choose_precision(device, precision)


def _noisy(embeddings, scale: float, generator):
    """H-SAM's embedding noise: E + N(0, σ²), σ = scale·(max E − min E) over the batch."""
    import torch

    if scale <= 0:
        return embeddings
    sigma = scale * (embeddings.max() - embeddings.min())
    noise = torch.randn(embeddings.shape, generator=generator).to(embeddings.device, embeddings.dtype)
    return embeddings + sigma * noise


def _augment(x, tgt, guides, kind: str, generator, crop_range=(0.2, 0.8)):
    """Geometric augmentation applied alike to inputs (embeddings (B, C, g, g) or images (B, 3, S, S)), labels
    (B, S, S) and guidance maps (each (B, K, h, w), or None); labels by nearest neighbour, guidance renormalised
    (background where the transform leaves the field of view)."""
    import torch

    from .augment import flip_pair, sample_transform

    if kind == "none":
        return x, tgt, guides
    if kind == "flip":
        mask = torch.rand(x.shape[0], generator=generator) < 0.5
        x2, tgt2 = flip_pair(x, tgt, mask)
        flipped = []
        for g in guides:
            if g is not None:
                g = g.clone()
                g[mask] = g[mask].flip(-1)
            flipped.append(g)
        return x2, tgt2, tuple(flipped)
    kinds = ("rotate",) if kind == "rotate" else ("rotate", "crop_zoom", "elastic")
    transform = sample_transform(x.shape[0], generator, kinds=kinds, crop_range=crop_range)
    moved = []
    for g in guides:
        if g is not None:
            g = transform.images(g)
            g[:, 0] += (1 - g.sum(1)).clamp_min(0)
        moved.append(g)
    return transform.images(x), transform.labels(tgt), tuple(moved)


class _Loop:
    """The optimisation loop shared by both modes."""

    def __init__(self, model, settings: FinetuneSettings, device, dtype, data: CorrectedSlices,
                 train_pos: list[int], val_pos: list[int], embeddings, images, num_classes: int, cancel) -> None:
        import torch

        from .embeddings import labels_to_model

        self.model, self.s, self.device, self.dtype = model, settings, device, dtype
        self.data, self.train_pos, self.val_pos = data, train_pos, val_pos
        self.embeddings, self.images = embeddings, images
        self.num_classes = num_classes
        self.cancel = cancel
        self.targets = labels_to_model(data.targets, model.image_size)
        self.generator = torch.Generator().manual_seed(settings.seed)
        params = trainable_parameters(model, settings.mode)
        self.optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.999),
                                           weight_decay=settings.weight_decay)
        self.scaler = (torch.amp.GradScaler("cuda") if device.type == "cuda" and dtype == torch.float16 else None)
        self.step_count = 0
        self.train_guides = self.train_guides_full = self.val_guides = None
        if settings.guidance > 0 or val_pos:
            self._prepare_guides()

    # ---- guidance of training slices (leave-one-out among training slices) and validation slices
    def _prepare_guides(self) -> None:
        from .guidance import guidance_for, to_grid

        k = self.data.k_indices
        train_labels = {k[p]: self.data.targets[p] for p in self.train_pos}
        images = dict(zip(k, self.data.images)) if self.s.propagation else None  # registration needs every slice
        grid = self._grid()
        if len(train_labels) >= 2:
            from .inference import resize_images

            full = guidance_for(train_labels, [k[p] for p in self.train_pos], self.num_classes, images, self.cancel)
            size = self.model.image_size
            self.train_guides = dict(zip(self.train_pos, to_grid(full, grid).reshape(len(full), -1, grid, grid)))
            self.train_guides_full = dict(zip(self.train_pos, resize_images(full, (size, size))))
        if self.val_pos and train_labels:
            self.val_guides = guidance_for(train_labels, [k[p] for p in self.val_pos], self.num_classes, images,
                                           self.cancel)

    def _perturbed_self_guides(self, batch, guide, guide_full):
        """Replace, with probability ``guidance_self``, a sample's guidance by its own labels under a random smooth
        deformation (blurred): guidance as good as near neighbours give at test time, where the leave-one-out
        guidance of a training slice comes from farther away."""
        import torch
        import torch.nn.functional as F

        from .augment import sample_transform
        from .guidance import _gaussian_blur, to_grid

        pick = torch.rand(len(batch), generator=self.generator) < self.s.guidance_self
        if not bool(pick.any()):
            return guide, guide_full
        guide, guide_full = guide.clone(), guide_full.clone()
        idx = [i for i in range(len(batch)) if pick[i]]
        own = F.one_hot(self.targets[[batch[i] for i in idx]], self.num_classes).permute(0, 3, 1, 2).float()
        alpha = float(0.01 + 0.04 * torch.rand(1, generator=self.generator))
        moved = sample_transform(len(idx), self.generator, kinds=("elastic",), elastic_alpha=alpha).images(own)
        moved[:, 0] += (1 - moved.sum(1)).clamp_min(0)
        moved = torch.stack([_gaussian_blur(m, 1.5) for m in moved])
        moved = moved / moved.sum(1, keepdim=True).clamp_min(1e-6)
        grid = guide.shape[-1]
        for j, i in enumerate(idx):
            guide_full[i] = moved[j]
            guide[i] = to_grid(moved[j:j + 1], grid).reshape(-1, grid, grid)
        return guide, guide_full

    def _grid(self) -> int:
        """Side g of the embedding grid (the prior's layout)."""
        if self.embeddings is not None:
            return int(self.embeddings.shape[-1])
        return int(self.model.prompt_encoder.image_embedding_size[0])

    def autocast(self):
        import torch

        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def epoch(self, positions: list[int], epoch: int, lr_fn) -> EpochRecord:
        import torch

        from .guidance import GUIDE_EPS, decode_guided
        from .losses import hsam_loss

        s, model = self.s, self.model
        model.train()
        model.image_encoder.eval()
        order = [positions[i] for i in torch.randperm(len(positions), generator=self.generator).tolist()]
        losses = []
        started = time.perf_counter()
        for b in range(0, len(order), s.batch_size):
            if is_cancelled(self.cancel):
                raise CancelledError("fine-tuning cancelled: nothing was written, the base model is unchanged")
            batch = order[b:b + s.batch_size]
            use_guide = (self.train_guides is not None and s.guidance > 0
                         and float(torch.rand(1, generator=self.generator)) < s.guidance)
            guide = torch.stack([self.train_guides[p] for p in batch]) if use_guide else None
            guide_full = torch.stack([self.train_guides_full[p] for p in batch]) if use_guide else None
            tgt = self.targets[batch]
            if use_guide and s.guidance_self > 0:
                guide, guide_full = self._perturbed_self_guides(batch, guide, guide_full)
            if s.mode == "fast":
                x, tgt, (guide, guide_full) = _augment(self.embeddings[batch], tgt, (guide, guide_full), s.augment,
                                                       self.generator)
                x = _noisy(x, s.noise, self.generator).to(self.device)
            else:
                x, tgt, (guide, guide_full) = _augment(self.images[batch], tgt, (guide, guide_full), s.augment,
                                                       self.generator)
                with self.autocast():
                    x = model.encode(x.to(self.device))
                x = _noisy(x.float(), s.noise, self.generator)
            tgt = tgt.to(self.device)
            lr = lr_fn(self.step_count)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with self.autocast():
                s1, s2 = decode_guided(model, x, None if guide is None else guide.flatten(2).to(self.device),
                                       s.guidance_mix)
            s1, s2 = s1.float(), s2.float()
            if guide_full is not None and s.guidance_weight:  # stage 2 learns a correction of the guidance
                s2 = s2 + s.guidance_weight * torch.log(guide_full.to(self.device) + GUIDE_EPS)
            loss = hsam_loss(s1, s2, tgt, epoch)
            if not torch.isfinite(loss.total):
                raise FinetuneError("the training loss became NaN/inf: lower the learning rate (--lr) or use "
                                    "--precision fp32")
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss.total).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.total.backward()
                self.optimizer.step()
            losses.append((loss.total.item(), loss.stage1.item(), loss.stage2.item(), loss.weight, lr))
            self.step_count += 1
        arr = np.asarray(losses, dtype=np.float64)
        return EpochRecord(epoch=epoch + 1, step=self.step_count, loss=float(arr[:, 0].mean()),
                           loss_stage1=float(arr[:, 1].mean()), loss_stage2=float(arr[:, 2].mean()),
                           stage2_weight=float(arr[-1, 3]), lr=float(arr[-1, 4]),
                           seconds=time.perf_counter() - started)

    def validate(self, guided: bool, with_prior: bool = False) -> tuple[list[float], dict[float, list[float]],
                                                                        dict[float, list[float]], list[float] | None]:
        """Dice per class on the held-out slices: prompt-free; guided (the fused decision) per decision weight;
        and with ``with_prior``, guided with stage 2 alone per decision weight and the propagated labels alone
        (else ``{}`` and None)."""
        from .guidance import DECISION_WEIGHTS, predict_guided

        size = tuple(self.data.images.shape[1:])
        truth = self.data.targets[self.val_pos]
        emb = self._val_embeddings()
        plain = predict_embeddings(self.model, emb, size, self.device, self.dtype)
        plain_dice = dice_per_class(plain, truth, self.num_classes)
        fused_dice: dict[float, list[float]] = {}
        stage2_dice: dict[float, list[float]] = {}
        prior_dice = None
        if guided and self.val_guides is not None:
            weights = sorted({self.s.guidance_weight * f for f in DECISION_WEIGHTS})
            for stage2_only in ((False, True) if with_prior else (False,)):
                preds = predict_guided(self.model, emb, self.val_guides, size, self.s.guidance_mix, weights,
                                       device=self.device, dtype=self.dtype, gate=self.s.guidance_gate,
                                       stage2_only=stage2_only)
                scores = {w: dice_per_class(p, truth, self.num_classes) for w, p in preds.items()}
                (stage2_dice if stage2_only else fused_dice).update(scores)
            if with_prior:
                prior_dice = dice_per_class(self.val_guides.argmax(1).numpy(), truth, self.num_classes)
        return plain_dice, fused_dice, stage2_dice, prior_dice

    def _val_embeddings(self):
        import torch

        if self.embeddings is not None:
            return self.embeddings[self.val_pos]
        with torch.inference_mode(), self.autocast():
            return self.model.encode(self.images[self.val_pos].to(self.device)).float().cpu()


def predict_embeddings(model, embeddings, slice_size, device, dtype, batch_size: int = 4) -> np.ndarray:
    """Prompt-free class indices (n, H, W) uint8 from embeddings (n, C, g, g)."""
    return decode_embeddings(model, embeddings, slice_size, device=device, dtype=dtype, batch_size=batch_size,
                             keep_device=True)


# ---------------------------------------------------------------------------------------------- main entry

def finetune(image, labels, slices: Sequence[int] | str, base, *, mode: str | None = None,
             labelset: LabelSet | None = None, settings: FinetuneSettings | None = None,
             progress: ProgressCallback | None = None, cancel=None, out: str | Path | None = None, save: bool = True,
             name: str | None = None, title: str | None = None, image_name: str | None = None, cache: bool = True,
             **overrides) -> FinetuneResult:
    """Fine-tune ``base`` (a :class:`~hsam.weights.loader.LoadedModel`) on the corrected ``slices`` (k indices,
    or a spec such as ``"0,10,20-25"``) of ``labels`` (a ``(k, j, i)`` array or a SimpleITK label image on
    ``image``'s grid).

    ``labelset``: the classes to learn (default: the base's); a different set re-initialises the class tokens
    and heads. ``settings`` / keyword ``overrides`` (any :class:`FinetuneSettings` field, e.g. ``epochs=50``,
    ``seed=1``, ``device="cpu"``). With ``save`` the model is written to ``out``, or to a new file named after
    the model in the per-user models folder; nothing is written if the run fails or is cancelled.
    ``cache``: keep slice embeddings on disk (fast mode) so a rerun on the same volume skips the encoder.
    """
    import torch

    from .device import resolve_device
    from .embeddings import SliceEncoder, compute_embeddings, model_inputs

    started = time.perf_counter()
    timings: dict[str, float] = {}
    settings = copy.copy(settings) if settings is not None else FinetuneSettings()
    if mode is not None:
        settings.mode = mode
    for key, value in overrides.items():
        if not hasattr(settings, key):
            raise TypeError(f"finetune() got an unknown setting {key!r}")
        if value is not None:
            setattr(settings, key, value)
    check_base_for_mode(base, settings.mode)
    labelset = labelset or base.description.labels
    if not isinstance(labelset, LabelSet):
        raise TypeError("labelset must be a LabelSet")
    out_path = _output_path(out, base) if save and out is not None else None

    data = prepare_corrected_slices(image, labels, parse_slice_spec(slices), base.description, labelset)
    for text in data.warnings:
        log.warning(text)
    n = len(data.k_indices)
    train_pos, val_pos = split_validation(n, settings.validation, settings.seed)
    settings = settings.resolved(len(train_pos))
    device = resolve_device(settings.device)
    dtype = autocast_dtype(device, settings.precision)
    log.info("fine-tuning (%s) on %d corrected slices (%d for training, %d held out): %d epochs of %d steps, "
             "batch %d, lr %g, guidance %.2f, %s on %s", settings.mode, n, len(train_pos), len(val_pos),
             settings.epochs, math.ceil(len(train_pos) / settings.batch_size), settings.batch_size, settings.lr,
             settings.guidance, "fp32" if dtype is None else str(dtype).removeprefix("torch."), device)

    base_hash = _state_hash(base.model)
    student, description, reused = build_student(base, labelset, settings.seed, settings.stage2_init)
    size = description.image_size

    t0 = time.perf_counter()
    embeddings = images = None
    if settings.mode == "fast":
        encoder = SliceEncoder(student, device, dtype)
        store = embedding_cache_for(student, data.volume_fingerprint, data.preprocessing, dtype, disk=cache)
        embeddings = compute_embeddings(encoder, data.images, data.model_indices, size, store,
                                        progress=(lambda d, t: progress(d, t, "embed")) if progress else None,
                                        cancel=cancel)
        del encoder
    else:
        images = model_inputs(data.images, size)
    timings["inputs"] = time.perf_counter() - t0

    student.to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)  # dropout draws from the global generator: seeded, caller's state kept
        return _train_and_package(student, description, reused, settings, device, dtype, data, train_pos, val_pos,
                                  embeddings, images, labelset, base, base_hash, image, image_name, name, title,
                                  progress, cancel, save, out_path, timings, started)


def _train_and_package(student, description, reused, settings, device, dtype, data, train_pos, val_pos, embeddings,
                       images, labelset, base, base_hash, image, image_name, name, title, progress, cancel, save,
                       out_path, timings, started) -> FinetuneResult:
    n = len(data.k_indices)
    loop = _Loop(student, settings, device, dtype, data, train_pos, val_pos, embeddings, images,
                 labelset.num_classes, cancel)
    guided = settings.guidance > 0
    history: list[EpochRecord] = []
    best_score, best_epoch, best_state = -1.0, None, None
    stale = 0
    stopped_early = False
    t0 = time.perf_counter()
    lr_fn = lambda step: learning_rate(step, settings.lr, settings.warmup, settings.steps)  # noqa: E731
    for epoch in range(settings.epochs):
        record = loop.epoch(train_pos, epoch, lr_fn)
        if val_pos and ((epoch + 1) % settings.eval_every == 0 or epoch == settings.epochs - 1):
            plain, by_weight, _, _ = loop.validate(guided)
            record.val_dice = dict(zip([c.name for c in labelset.classes], plain))
            record.val_mean = _mean(plain)
            if by_weight:
                record.val_guided_mean = max(_mean(v) for v in by_weight.values())
            score = record.val_mean if record.val_guided_mean is None else \
                (record.val_mean + record.val_guided_mean) / 2
            if score > best_score + 1e-4:
                best_score, best_epoch = score, epoch + 1
                best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
                stale = 0
            else:
                stale += 1
        history.append(record)
        log.info("epoch %d/%d: loss %.4f (stage 1 %.4f, stage 2 %.4f, w %.3f)%s%s", epoch + 1, settings.epochs,
                 record.loss, record.loss_stage1, record.loss_stage2, record.stage2_weight,
                 f", validation Dice {record.val_mean:.4f}" if record.val_mean is not None else "",
                 f" (guided {record.val_guided_mean:.4f})" if record.val_guided_mean is not None else "")
        if progress:
            progress(epoch + 1, settings.epochs, "train")
        if val_pos and stale >= settings.patience:
            stopped_early = True
            log.info("validation Dice has not improved for %d checks: stopping after epoch %d (best: epoch %d)",
                     stale, epoch + 1, best_epoch)
            if progress:
                progress(settings.epochs, settings.epochs, "train")
            break
    validation = validation_guided = validation_prior = validation_fused = None
    decision = "fused"
    prior_classes: list[int] = []
    decision_weight = settings.guidance_weight
    guided_by_weight: dict = {}
    stage2_by_weight_means: dict = {}
    if val_pos and best_state is not None:
        student.load_state_dict(best_state)
        plain, by_weight, stage2_by_weight, prior_dice = loop.validate(guided, with_prior=True)
        names = [c.name for c in labelset.classes]
        validation = dict(zip(names, plain))
        if by_weight:
            from .guidance import choose_guided_decision

            choice = choose_guided_decision(by_weight, stage2_by_weight, prior_dice, settings.guidance_weight)
            decision, decision_weight, prior_classes = choice.decision, choice.weight, choice.prior_classes
            validation_fused = dict(zip(names, by_weight[decision_weight]))
            validation_guided = dict(zip(names, choice.dice))
            validation_prior = dict(zip(names, prior_dice))
            guided_by_weight = {str(w): round(_mean(v), 4) for w, v in by_weight.items()}
            stage2_by_weight_means = {str(w): round(_mean(v), 4) for w, v in stage2_by_weight.items()}
    timings["train"] = time.perf_counter() - t0
    student.eval().cpu()
    for p in student.parameters():
        p.requires_grad_(False)

    now = _dt.datetime.now().astimezone()
    model_name = name or default_model_name(labelset, now)
    entry = _lineage_entry(now, settings, base, base_hash, image, image_name, data, train_pos, val_pos, labelset,
                           reused, device, dtype, history, best_epoch, stopped_early, validation, started)
    entry["guidance"] = {"trained": guided, "probability": settings.guidance, "mix": settings.guidance_mix,
                         "propagation": "registration" if settings.propagation else "blend",
                         "decision_weight": decision_weight, "gate": settings.guidance_gate,
                         "validation_mean_by_weight": guided_by_weight or None,
                         "validation_mean_by_weight_stage2": stage2_by_weight_means or None,
                         "decision": decision,
                         "validation_dice": _rounded(validation_guided),
                         "validation_dice_fused": _rounded(validation_fused),
                         "validation_dice_propagated": _rounded(validation_prior),
                         "prior_classes": prior_classes,
                         "prior_class_names": [labelset.classes[c - 1].name for c in prior_classes]}
    lineage = list(base.description.provenance.get("lineage", [])) + [entry]
    provenance = {"source": "fine-tuned with hsam (hsam.engine.finetune)", "heads_trained": True,
                  "base_model": base.description.name, "finetune": entry, "lineage": lineage}
    description = description.with_changes(
        name=model_name, provenance=provenance,
        title=title or f"{labelset.name} fine-tuned from {base.description.name} on {n} slices"
                       f"{' of ' + image_name if image_name else ''} ({now:%Y-%m-%d %H:%M})")
    from ..weights.loader import LoadedModel, save_model

    loaded = LoadedModel(student, description, source="finetune")
    result = FinetuneResult(loaded=loaded, history=history, settings=settings,
                            train_slices=[data.k_indices[p] for p in train_pos],
                            validation_slices=[data.k_indices[p] for p in val_pos], validation=validation,
                            validation_guided=validation_guided, best_epoch=best_epoch, stopped_early=stopped_early,
                            timings=timings)
    if save:
        if is_cancelled(cancel):
            raise CancelledError("fine-tuning cancelled: nothing was written, the base model is unchanged")
        path = out_path or _output_path(None, base, model_name)
        t0 = time.perf_counter()
        save_model(path, loaded)
        timings["save"] = time.perf_counter() - t0
        loaded.source = str(path)
        result.path = Path(path)
        log.info("saved the fine-tuned model to %s", path)
    result.seconds = time.perf_counter() - started
    entry["seconds"] = round(result.seconds, 1)
    return result


def _state_hash(model) -> str:
    from ..weights.modelfile import content_sha256

    return content_sha256({k: v for k, v in model.state_dict().items()})


def _rounded(d: dict | None) -> dict | None:
    if d is None:
        return None
    return {k: (None if math.isnan(v) else round(float(v), 4)) for k, v in d.items()}


def _lineage_entry(now, settings, base, base_hash, image, image_name, data, train_pos, val_pos, labelset, reused,
                   device, dtype, history, best_epoch, stopped_early, validation, started) -> dict:
    from .. import __version__

    k = data.k_indices
    return {
        "date": now.isoformat(timespec="seconds"),
        "hsam_version": __version__,
        "mode": settings.mode,
        "base": {"name": base.description.name, "title": base.description.title, "source": str(base.source),
                 "content_sha256": base_hash, "backbone": base.description.backbone,
                 "heads_trained": base.heads_trained},
        "image": {"name": image_name or "", "size_ijk": list(image.GetSize()),
                  "spacing": [round(float(x), 6) for x in image.GetSpacing()], "fingerprint": data.volume_fingerprint},
        "slices": {"axis": "k", "corrected": list(k), "train": [k[p] for p in train_pos],
                   "validation": [k[p] for p in val_pos]},
        "labels": {"name": labelset.name, "reinitialised": [c.name for c in labelset.classes if c.name not in reused],
                   "reused_from_base": list(reused)},
        "settings": {key: v for key, v in settings.to_json().items() if key != "device"},
        "device": str(device), "precision": "fp32" if dtype is None else str(dtype).removeprefix("torch."),
        "preprocessing": data.preprocessing,
        "epochs_run": len(history), "best_epoch": best_epoch, "stopped_early": stopped_early,
        "validation": ({"dice": _rounded(validation), "mean": round(_mean(list(validation.values())), 4),
                        "slices": [k[p] for p in val_pos]} if validation is not None else None),
        "final_loss": round(history[-1].loss, 5) if history else None,
        "seconds": round(time.perf_counter() - started, 1),
    }


def decode_embeddings(model, embeddings, slice_size: tuple[int, int], device="cpu", dtype=None, batch_size: int = 8,
                      progress: Callable[[int, int], None] | None = None, cancel=None,
                      keep_device: bool = False) -> np.ndarray:
    """Prompt-free class indices (n, H, W) uint8 from cached embeddings (n, C, g, g) with a fine-tuned model."""
    import torch

    from .embeddings import logits_to_slice

    device = torch.device(device)
    model = model.to(device).eval()
    out = []
    n = len(embeddings)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for b in range(0, n, batch_size):
            if is_cancelled(cancel):
                raise CancelledError("cancelled: nothing was written")
            emb = embeddings[b:b + batch_size].to(device)
            logits = model.fused_logits(model.decode(emb)).float()
            out.append(logits_to_slice(logits, tuple(slice_size)).cpu().numpy())
            if progress:
                progress(min(n, b + batch_size), n)
    if not keep_device:
        model.cpu()
    return np.concatenate(out) if out else np.zeros((0, *slice_size), np.uint8)


# ---------------------------------------------------------------------------------------------- names / paths

def default_model_name(labelset: LabelSet, when: _dt.datetime | None = None) -> str:
    """A readable, file-system-safe model name with the date, e.g. ``aal-7-structures-ft-20261128-0130``."""
    when = when or _dt.datetime.now()
    slug = re.sub(r"[^a-z0-9]+", "-", labelset.name.lower()).strip("-") or "model"
    return f"{slug[:48]}-ft-{when:%Y%m%d-%H%M%S}"


def _output_path(out: str | Path | None, base, model_name: str | None = None) -> Path:
    from ..weights.cache import models_dir
    from ..weights.modelfile import SUFFIX

    if out is None:
        folder = models_dir()
        path = folder / f"{model_name}{SUFFIX}"
        counter = 2
        while path.exists():
            path = folder / f"{model_name}-{counter}{SUFFIX}"
            counter += 1
    else:
        path = Path(out).expanduser()
        if path.is_dir():
            raise FinetuneError(f"--out {path} is a folder: give a file name ending in {SUFFIX}")
        if not path.parent.is_dir():
            raise FinetuneError(f"cannot write {path}: the folder {path.parent} does not exist")
    source = Path(str(base.source)) if base.source else None
    if source is not None and source.is_file() and path.exists() and path.resolve() == source.resolve():
        raise FinetuneError(f"refusing to overwrite the base model {source}: the base is never modified; choose "
                            "another output file")
    return path
