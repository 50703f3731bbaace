"""Geometric augmentation of (image, label) batches with torch ops; labels always by nearest neighbour.

H-SAM trains with one of three augmentations per sample: a rotation of ±20°, a random crop (side 20–80 %
of the image) zoomed back to full size, or an elastic deformation on top of a small random affine. Every
transform here is a sampling grid in normalised coordinates (``torch.nn.functional.affine_grid`` /
``grid_sample``, ``align_corners=False``), so one transform can be applied to tensors of different
resolutions that cover the same field of view — an image (B, C, S, S), its embedding (B, C, g, g) and its
labels (B, S, S) — and they stay aligned. Images and embeddings are sampled bilinearly, labels with
``mode="nearest"``: they stay integral and no new class values appear. Outside the field of view images
get 0 and labels background (0).

Randomness comes only from the ``torch.Generator`` passed in (reproducible with a seed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("rotate", "crop_zoom", "elastic")
MAX_ROTATION_DEG = 20.0
CROP_RANGE = (0.2, 0.8)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def rotation_theta(degrees: torch.Tensor, aspect: float = 1.0) -> torch.Tensor:
    """(B,) angles in degrees (counter-clockwise in (x right, y down) pixel axes) → (B, 2, 3) affine
    parameters for ``affine_grid``. ``aspect`` = width / height of the sampled tensor (the rotation is a
    true rotation in pixel space, not in normalised coordinates)."""
    rad = degrees.to(torch.float64) * math.pi / 180
    cos, sin = torch.cos(rad), torch.sin(rad)
    theta = torch.zeros(len(rad), 2, 3, dtype=torch.float64)
    # output pixel → input pixel is R⁻¹; in normalised coords x_n = x / (W/2), y_n = y / (H/2)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = sin / aspect
    theta[:, 1, 0] = -sin * aspect
    theta[:, 1, 1] = cos
    return theta


def crop_theta(side: torch.Tensor, centre_x: torch.Tensor, centre_y: torch.Tensor) -> torch.Tensor:
    """A square crop of relative side ``side`` (B,) centred at (centre_x, centre_y) in normalised
    coordinates, zoomed to the full output: (B, 2, 3)."""
    theta = torch.zeros(len(side), 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = side
    theta[:, 1, 1] = side
    theta[:, 0, 2] = centre_x
    theta[:, 1, 2] = centre_y
    return theta


def _grid(theta: torch.Tensor, size: tuple[int, int], device, displacement: torch.Tensor | None) -> torch.Tensor:
    b = theta.shape[0]
    grid = F.affine_grid(theta.to(device=device, dtype=torch.float32), [b, 1, *size], align_corners=False)
    if displacement is not None:  # (B, 2, h, w) in normalised units, resampled to this size
        disp = F.interpolate(displacement.to(device=device, dtype=torch.float32), size=size, mode="bicubic",
                             align_corners=False)
        grid = grid + disp.permute(0, 2, 3, 1)
    return grid


def warp(tensor: torch.Tensor, theta: torch.Tensor, displacement: torch.Tensor | None = None) -> torch.Tensor:
    """Resample a float tensor (B, C, H, W) bilinearly through the transform (zeros outside)."""
    grid = _grid(theta, tuple(tensor.shape[-2:]), tensor.device, displacement)
    out = F.grid_sample(tensor.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.to(tensor.dtype)


def warp_labels(labels: torch.Tensor, theta: torch.Tensor, displacement: torch.Tensor | None = None) -> torch.Tensor:
    """Resample integer labels (B, H, W) by nearest neighbour through the transform (background outside);
    the result holds only values present in ``labels`` (or 0) and keeps ``labels``' dtype."""
    grid = _grid(theta, tuple(labels.shape[-2:]), labels.device, displacement)
    out = F.grid_sample(labels[:, None].to(torch.float32), grid, mode="nearest", padding_mode="zeros",
                        align_corners=False)
    return out[:, 0].round().to(labels.dtype)


def elastic_displacement(batch: int, alpha: float, grid_points: int, generator: torch.Generator | None
                         ) -> torch.Tensor:
    """A smooth random displacement field (B, 2, n, n) in normalised units (|d| ≲ alpha), from Gaussian
    noise on a ``grid_points``² lattice smoothed by a 3×3 box filter (upsampled bicubically when used)."""
    noise = torch.randn(batch, 2, grid_points, grid_points, generator=generator, dtype=torch.float64)
    noise = F.avg_pool2d(F.pad(noise, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return alpha * noise / noise.std().clamp_min(1e-6)


class Transform:
    """One random transform per sample: (B, 2, 3) affine parameters (+ an optional displacement field)."""

    def __init__(self, theta: torch.Tensor, displacement: torch.Tensor | None = None) -> None:
        self.theta = theta
        self.displacement = displacement

    def images(self, x: torch.Tensor) -> torch.Tensor:
        return warp(x, self.theta, self.displacement)

    def labels(self, y: torch.Tensor) -> torch.Tensor:
        return warp_labels(y, self.theta, self.displacement)


def sample_transform(batch: int, generator: torch.Generator | None = None, kinds: tuple[str, ...] = KINDS,
                     probability: float = 1.0, max_rotation: float = MAX_ROTATION_DEG,
                     crop_range: tuple[float, float] = CROP_RANGE, elastic_alpha: float = 0.03,
                     elastic_points: int = 6) -> Transform:
    """For each sample, with ``probability``, one of ``kinds`` chosen uniformly (else the identity):

    ``rotate``     rotation by U(−max_rotation, +max_rotation) degrees about the centre;
    ``crop_zoom``  a square crop of side U(crop_range) of the field of view, anywhere inside it, zoomed to full size;
    ``elastic``    a small affine (rotation ±10°, scale 0.9–1.1, shift ±5 %) plus a smooth displacement field.
    """
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown augmentation {kind!r} ({', '.join(KINDS)})")
    theta = torch.zeros(batch, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    apply = torch.rand(batch, generator=generator, dtype=torch.float64) < probability
    choice = torch.randint(len(kinds), (batch,), generator=generator)
    angles = _uniform(batch, -max_rotation, max_rotation, generator)
    sides = _uniform(batch, *crop_range, generator)
    cx, cy = (_uniform(batch, -1, 1, generator) for _ in range(2))
    small_angles = _uniform(batch, -10, 10, generator)
    scales = _uniform(batch, 0.9, 1.1, generator)
    shifts = _uniform(batch * 2, -0.1, 0.1, generator).reshape(batch, 2)
    displacement = None
    if "elastic" in kinds:
        displacement = elastic_displacement(batch, elastic_alpha, elastic_points, generator)
    use_displacement = torch.zeros(batch, dtype=torch.bool)
    for i in range(batch):
        if not apply[i]:
            continue
        kind = kinds[int(choice[i])]
        if kind == "rotate":
            theta[i] = rotation_theta(angles[i:i + 1])[0]
        elif kind == "crop_zoom":
            side = sides[i]
            theta[i] = crop_theta(side[None], (cx[i] * (1 - side))[None], (cy[i] * (1 - side))[None])[0]
        else:
            t = rotation_theta(small_angles[i:i + 1])[0]
            t[:, :2] *= scales[i]
            t[:, 2] = shifts[i]
            theta[i] = t
            use_displacement[i] = True
    if displacement is not None:
        displacement = displacement * use_displacement[:, None, None, None].to(displacement.dtype)
        if not bool(use_displacement.any()):
            displacement = None
    return Transform(theta, displacement)


def augment_batch(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None,
                  **options) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, C, H, W) and labels (B, h, w) (same field of view, any resolutions) → both transformed by
    one random transform per sample (see :func:`sample_transform`)."""
    transform = sample_transform(images.shape[0], generator, **options)
    return transform.images(images), transform.labels(labels)


def flip_pair(images: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-right flip of the samples where ``mask`` (B,) is true (images (B, C, H, W), labels (B, h, w))."""
    if not bool(mask.any()):
        return images, labels
    images, labels = images.clone(), labels.clone()
    images[mask] = images[mask].flip(-1)
    labels[mask] = labels[mask].flip(-1)
    return images, labels
