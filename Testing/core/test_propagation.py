"""Registration-propagated guidance (``hsam.engine.propagation``): a structure that moves between the corrected
slices is found where the target slice's image shows it (the plain blend puts it half-way between both), the
guidance is a soft partition, and large slices are registered on a coarser grid with the same result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hsam.engine.guidance import guided_decode, neighbour_guidance
from hsam.engine.propagation import MAX_REGISTRATION_SIZE, registered_guidance, warp_labels


def disk(size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    return ((y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius ** 2).astype(np.uint8)


def moving_disk(size=64, radius=10.0, scale=1.0):
    """Slices 0, 2, 4: a bright, textured disk (class 1; the texture moves with it, as anatomy does) moving right
    by 8·scale px per 2 slices, on a dim background."""
    from scipy.ndimage import gaussian_filter

    texture = gaussian_filter(np.random.default_rng(0).normal(size=(size, 2 * size)), 1.5 * scale)
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    images, labels = {}, {}
    for k in (0, 2, 4):
        shift = int(round((k - 2) * 4 * scale))
        labels[k] = disk(size, (size / 2, size / 2 + shift), radius * scale)
        moved = texture[:, size // 2 - shift: size // 2 - shift + size]
        images[k] = (0.2 + labels[k] * (0.4 + 0.4 * moved)).astype(np.float32)
    return images, labels


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def test_registered_guidance_follows_the_anatomy_where_the_blend_cannot():
    images, labels = moving_disk()
    corrected = {0: labels[0], 4: labels[4]}
    guide = registered_guidance(images, corrected, 2, num_classes=2)
    assert guide.shape == (2, 64, 64) and torch.allclose(guide.sum(0), torch.ones(64, 64), atol=1e-5)
    registered = dice(guide.argmax(0).numpy() == 1, labels[2] == 1)
    blended = dice(neighbour_guidance(corrected, 2, 2).argmax(0).numpy() == 1, labels[2] == 1)
    assert registered > 0.93 and registered > blended + 0.1, (registered, blended)


def test_warped_labels_stay_a_soft_partition_and_identity_is_exact():
    images, labels = moving_disk()
    same = warp_labels(labels[2], 3, images[2], images[2])  # registering a slice onto itself moves nothing
    assert same.shape == (3, 64, 64)
    assert torch.equal(same.argmax(0), torch.from_numpy(labels[2].astype(np.int64)))
    assert torch.allclose(same[2], torch.zeros(64, 64))  # a class that is absent stays absent
    moved = warp_labels(labels[0], 2, images[0], images[2])
    assert float(moved.min()) >= 0 and float(moved.sum(0).max()) <= 1 + 1e-5


def test_large_slices_are_registered_on_a_coarser_grid():
    scale = 2 * MAX_REGISTRATION_SIZE / 64 / 2  # 512-px slices → registration on 256 px
    size = int(64 * scale)
    images, labels = moving_disk(size=size, scale=scale)
    guide = registered_guidance(images, {0: labels[0], 4: labels[4]}, 2, num_classes=2)
    assert guide.shape == (2, size, size)
    assert dice(guide.argmax(0).numpy() == 1, labels[2] == 1) > 0.85  # a 16-px shift each side


def test_one_sided_guidance_and_errors():
    images, labels = moving_disk()
    guide = registered_guidance(images, {0: labels[0]}, 2, num_classes=2)  # only a slice below
    assert dice(guide.argmax(0).numpy() == 1, labels[2] == 1) > 0.9
    with pytest.raises(ValueError, match="at least one other labelled slice"):
        registered_guidance(images, {2: labels[2]}, 2, num_classes=2)
    with pytest.raises(ValueError, match="different sizes"):
        warp_labels(labels[0], 2, images[0], images[2][:-1])


def test_guided_decode_says_which_guidance_it_used():
    """With images the guided decode propagates by registration (recorded in its info), else it blends."""
    import inspect

    assert "images" in inspect.signature(guided_decode).parameters
