"""H-SAM's loss against hand-computed values, and the augmentation keeping labels integral and aligned."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hsam.engine import augment
from hsam.engine.losses import downsample_labels, hsam_loss, soft_dice_loss, stage2_weight, stage_loss


def test_soft_dice_by_hand():
    # two pixels, two classes; softmax probabilities chosen through their logits
    p = torch.tensor([[0.8, 0.3]])  # P(class 1) at the two pixels
    logits = torch.stack([torch.zeros(1, 2), torch.log(p / (1 - p))], dim=1).reshape(1, 2, 1, 2)
    target = torch.tensor([[[1, 0]]])
    # class 0: probs (0.2, 0.7), onehot (0, 1): I = 0.7, Σp² = 0.04 + 0.49, Σt² = 1
    # class 1: probs (0.8, 0.3), onehot (1, 0): I = 0.8, Σp² = 0.64 + 0.09, Σt² = 1
    eps = 1e-5
    d0 = (2 * 0.7 + eps) / (0.53 + 1 + eps)
    d1 = (2 * 0.8 + eps) / (0.73 + 1 + eps)
    expected = ((1 - d0) + (1 - d1)) / 2
    assert soft_dice_loss(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_stage_loss_is_0_1_ce_plus_0_9_dice():
    logits = torch.tensor([[[[2.0]], [[0.5]], [[-1.0]]]])  # (1, 3, 1, 1)
    target = torch.tensor([[[1]]])
    probs = torch.softmax(logits, 1).flatten()
    ce = -math.log(probs[1].item())
    eps = 1e-5
    dice = [(2 * probs[c].item() * (c == 1) + eps) / (probs[c].item() ** 2 + (c == 1) + eps) for c in range(3)]
    expected = 0.1 * ce + 0.9 * sum(1 - d for d in dice) / 3
    assert stage_loss(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_stage_weight_schedule():
    assert stage2_weight(0) == pytest.approx(0.6)
    assert stage2_weight(300) == pytest.approx(0.6 ** (0.99 ** 300))
    assert 0.97 < stage2_weight(300) < 0.98
    assert stage2_weight(10) < stage2_weight(100)


def test_hsam_loss_mixes_stages_with_nearest_downsampled_labels():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8))
    s1 = torch.randn(2, 3, 4, 4)
    s2 = torch.randn(2, 3, 8, 8)
    small = downsample_labels(target, (4, 4))
    assert small.dtype == target.dtype and set(small.unique().tolist()) <= set(target.unique().tolist())
    assert torch.equal(small, target[:, ::2, ::2])  # nearest picks the top-left sample of each 2×2 block
    loss = hsam_loss(s1, s2, target, epoch=50)
    w = stage2_weight(50)
    expected = (1 - w) * stage_loss(s1, small) + w * stage_loss(s2, target)
    assert loss.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.weight == pytest.approx(w)
    with pytest.raises(ValueError):
        hsam_loss(s1, s2, target[:, :4], 0)


def test_perfect_prediction_has_near_zero_dice_loss():
    target = torch.randint(0, 4, (1, 6, 6))
    logits = torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float() * 50
    assert soft_dice_loss(logits, target).item() < 1e-4


# ------------------------------------------------------------------------------------------ augmentation

def square(size=32, lo=10, hi=20):
    labels = torch.zeros(1, size, size, dtype=torch.long)
    labels[:, lo:hi, lo:hi] = 1
    labels[:, lo:lo + 3, lo:hi] = 2  # a stripe of another class on top
    return labels


def test_rotation_by_90_degrees_is_exact_for_labels():
    labels = square()
    theta = augment.rotation_theta(torch.tensor([90.0]))
    rotated = augment.warp_labels(labels, theta)
    assert rotated.dtype == labels.dtype
    # 90° about the centre maps the square onto its rotated copy exactly (an even-sized grid)
    candidates = [torch.rot90(labels, k, dims=(1, 2)) for k in (1, 3)]
    assert any(torch.equal(rotated, c) for c in candidates)


@pytest.mark.parametrize("kind", augment.KINDS)
def test_labels_stay_integral_and_aligned_with_the_image(kind):
    g = torch.Generator().manual_seed(3)
    labels = square(48, 12, 36).repeat(4, 1, 1)
    image = labels.float()[:, None] / 2  # the image shows the labels: 0, 0.5, 1
    image = image.repeat(1, 3, 1, 1)
    transform = augment.sample_transform(4, g, kinds=(kind,))
    out_img, out_lab = transform.images(image), transform.labels(labels)
    assert out_lab.dtype == torch.long
    assert set(out_lab.unique().tolist()) <= {0, 1, 2}
    # the image resampled bilinearly, thresholded back to classes, agrees with the nearest-resampled labels
    from_image = torch.round(out_img[:, 0] * 2).long()
    agree = (from_image == out_lab).float().mean().item()
    assert agree > 0.97, agree
    assert not torch.equal(out_lab, labels)  # it did transform


def test_same_transform_aligns_low_and_high_resolution():
    """Embeddings (g×g) and labels (S×S) cover one field of view: a transform moves both alike."""
    g = torch.Generator().manual_seed(1)
    labels = square(64, 16, 40)
    coarse = torch.nn.functional.avg_pool2d(labels.float()[:, None].clamp(max=1), 4)  # (1, 1, 16, 16)
    transform = augment.sample_transform(1, g, kinds=("rotate",))
    moved_labels = transform.labels(labels).clamp(max=1).float()
    moved_coarse = transform.images(coarse)
    expected = torch.nn.functional.avg_pool2d(moved_labels[:, None], 4)
    assert (moved_coarse - expected).abs().mean().item() < 0.05


def test_augmentation_is_reproducible_with_a_seed():
    labels = square(32).repeat(3, 1, 1)
    a = augment.sample_transform(3, torch.Generator().manual_seed(7)).labels(labels)
    b = augment.sample_transform(3, torch.Generator().manual_seed(7)).labels(labels)
    assert torch.equal(a, b)


def test_flip_pair():
    labels = square(16, 2, 6)
    image = labels.float()[:, None]
    img2, lab2 = augment.flip_pair(image, labels, torch.tensor([True]))
    assert torch.equal(lab2, labels.flip(-1)) and torch.equal(img2[:, 0].long(), lab2)
    assert np.array_equal(labels.numpy(), square(16, 2, 6).numpy())  # input untouched
