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
    same, same_image = warp_labels(labels[2], 3, images[2], images[2])  # a slice onto itself: nothing moves
    assert same.shape == (3, 64, 64)
    assert torch.allclose(same_image, torch.from_numpy(images[2]), atol=1e-6)
    assert torch.equal(same.argmax(0), torch.from_numpy(labels[2].astype(np.int64)))
    assert torch.allclose(same[2], torch.zeros(64, 64))  # a class that is absent stays absent
    moved, moved_image = warp_labels(labels[0], 2, images[0], images[2])
    # the warped image of the neighbour fits the target better than the neighbour as it is
    target = torch.from_numpy(images[2])
    assert ((moved_image - target) ** 2).mean() < 0.5 * ((torch.from_numpy(images[0]) - target) ** 2).mean()
    assert float(moved.min()) >= 0 and float(moved.sum(0).max()) <= 1 + 1e-5


def test_the_neighbour_whose_anatomy_matches_wins_locally(monkeypatch):
    """A structure present on the slice below and on the target but ended before the slice above: the 1/d blend
    of the two would halve it (and lose it where the slice above is nearer); the local fit weighting keeps it,
    because only the slice below's warped image shows it there. Elsewhere both neighbours agree."""
    from hsam.engine.propagation import local_fit_weight

    size = 64
    body = disk(size, (32, 32), 24)
    lesion = disk(size, (32, 40), 6)
    labels = {0: body + lesion, 2: body + lesion, 3: body}  # class 2 = the structure, gone on slice 3
    images = {k: (0.1 + 0.4 * (lab >= 1) + 0.4 * (lab == 2)).astype(np.float32) for k, lab in labels.items()}
    guide = registered_guidance(images, {0: labels[0], 3: labels[3]}, 2, num_classes=3)
    found = guide.argmax(0).numpy()
    assert dice(found == 2, labels[2] == 2) > 0.7  # the slice above is nearer (d = 1 vs 2), yet the lesion stays
    assert dice(found >= 1, labels[2] >= 1) > 0.95
    fit = local_fit_weight(images[2], torch.from_numpy(images[3]))  # slice 3 as it is, over slice 2
    assert fit.shape == (size, size) and float(fit[32, 40]) < 0.3 and float(fit[2, 2]) > 0.99
    import hsam.engine.propagation as propagation

    monkeypatch.setattr(propagation, "FUSION_H", 1e9)  # every weight 1: the plain 1/d blend of the warped labels
    blended = registered_guidance(images, {0: labels[0], 3: labels[3]}, 2, num_classes=3).argmax(0).numpy()
    assert (blended == 2).sum() == 0  # 1/3 lesion vs 2/3 body everywhere: lost


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
