"""H-SAM's training loss: 0.1·cross-entropy + 0.9·soft Dice per stage, stages mixed by an epoch schedule.

Soft Dice (as the authors train): softmax probabilities p and one-hot targets t for every class c of the
K outputs (background included), sums over the whole batch and all pixels,

    dice_c = (2·Σ p_c t_c + ε) / (Σ p_c² + Σ t_c² + ε),   ε = 1e-5,   L_dice = mean_c (1 − dice_c)

(squared terms in the denominator). Stage 1 is supervised at its own resolution with nearest-downsampled
labels, stage 2 at full resolution; the total is ``(1 − w)·L₁ + w·L₂`` with ``w = 0.6 ** (0.99 ** epoch)``
(0.60 at epoch 0, → 0.975 at epoch 300).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

CE_WEIGHT = 0.1
DICE_WEIGHT = 0.9
DICE_SMOOTH = 1e-5


def stage2_weight(epoch: float) -> float:
    """w of ``(1 − w)·L₁ + w·L₂`` at ``epoch`` (0-based): ``0.6 ** (0.99 ** epoch)``."""
    return 0.6 ** (0.99 ** float(epoch))


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH,
                   reduce_sums: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """logits (B, K, H, W), target (B, H, W) integer class indices → scalar ``mean_c (1 − dice_c)``.

    Sums run over the batch and all pixels; all K classes count, background included; the denominator
    uses squared probabilities and squared (one-hot) targets. ``reduce_sums`` (distributed training) maps the
    local per-class sums (2, K) to the sums over the whole global batch (an all-reduce).
    """
    num_classes = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    intersect = (probs * onehot).sum(dims)
    denominator = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
    if reduce_sums is not None:
        intersect, denominator = reduce_sums(torch.stack([intersect, denominator]))
    dice = (2 * intersect + smooth) / (denominator + smooth)
    return (1 - dice).mean()


def stage_loss(logits: torch.Tensor, target: torch.Tensor,
               reduce_sums: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """``0.1·CE + 0.9·soft Dice`` of one stage; ``target`` at the logits' resolution."""
    ce = F.cross_entropy(logits.float(), target.long())
    return CE_WEIGHT * ce + DICE_WEIGHT * soft_dice_loss(logits, target, reduce_sums=reduce_sums)


def downsample_labels(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) class indices → (B, h, w) by nearest neighbour (unchanged when the size already matches)."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    small = F.interpolate(target[:, None].float(), size=size, mode="nearest")
    return small[:, 0].round().to(target.dtype)


@dataclass
class HSAMLoss:
    """The loss of one batch: ``total`` (backpropagated) and its parts (for logs)."""

    total: torch.Tensor
    stage1: torch.Tensor
    stage2: torch.Tensor
    weight: float


def hsam_loss(stage1_logits: torch.Tensor, stage2_logits: torch.Tensor, target: torch.Tensor,
              epoch: float, reduce_sums: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> HSAMLoss:
    """Both stages' loss mixed by :func:`stage2_weight`.

    stage1_logits (B, K, h, w) (e.g. 4g × 4g), stage2_logits (B, K, H, W), target (B, H, W) class indices at
    stage 2's resolution. ``reduce_sums``: see :func:`soft_dice_loss`.
    """
    if tuple(stage2_logits.shape[-2:]) != tuple(target.shape[-2:]):
        raise ValueError(f"stage-2 logits {tuple(stage2_logits.shape)} and labels {tuple(target.shape)} differ in size")
    w = stage2_weight(epoch)
    l1 = stage_loss(stage1_logits, downsample_labels(target, tuple(stage1_logits.shape[-2:])), reduce_sums)
    l2 = stage_loss(stage2_logits, target, reduce_sums)
    return HSAMLoss(total=(1 - w) * l1 + w * l2, stage1=l1.detach(), stage2=l2.detach(), weight=w)
