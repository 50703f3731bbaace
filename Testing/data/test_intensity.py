"""Intensity preprocessing: window and per-volume percentile normalisation to float32 [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest

from hsam.data.intensity import IntensityNormalizer
from hsam.description import IntensitySpec


def test_window_maps_hu_linearly_and_clips():
    norm = IntensityNormalizer.fit(np.zeros((2, 2, 2)), IntensitySpec())  # H-SAM's CT window [-125, 275]
    hu = np.array([[[-1000, -125, 75, 275, 3000]]], dtype=np.int16)
    out = norm.apply(hu)
    assert out.dtype == np.float32 and out.shape == hu.shape
    assert out.ravel().tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert norm.describe() == "window [-125, 275]"


def test_window_matches_the_published_formula_on_a_stack():
    rng = np.random.default_rng(0)
    slices = rng.integers(-1500, 2000, size=(4, 16, 16)).astype(np.int16)  # (n, rows, columns)
    out = IntensityNormalizer.fit(slices, IntensitySpec()).apply(slices)
    expected = (np.clip(slices.astype(np.float64), -125, 275) + 125) / 400
    assert out.shape == (4, 16, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_window_top_is_exactly_one_for_awkward_bounds():
    spec = IntensitySpec(kind="window", low=-0.1, high=0.7)
    x = np.array([-0.1, 0.7, 0.69999999, 10.0], dtype=np.float64)
    out = IntensityNormalizer.fit(x, spec).apply(x)
    assert out[0] == 0.0 and out[1] == 1.0 and out[3] == 1.0 and 0.99 < out[2] <= 1.0


def test_percentile_uses_foreground_above_the_minimum():
    rng = np.random.default_rng(1)
    volume = np.full((6, 20, 20), -50.0)  # background at the volume minimum (most voxels)
    foreground = rng.uniform(100, 1100, size=600)
    volume.reshape(-1)[:600] = foreground
    spec = IntensitySpec(kind="percentile", low=1, high=99, modality="MR")
    norm = IntensityNormalizer.fit(volume, spec)
    low, high = np.percentile(foreground, [1, 99])
    assert norm.low == pytest.approx(low) and norm.high == pytest.approx(high)
    out = norm.apply(volume[:2])
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    middle = (low + high) / 2
    assert norm.apply(np.array([[[middle]]]))[0, 0, 0] == pytest.approx(0.5, abs=1e-6)


def test_percentile_zero_range_is_a_step_not_nan():
    volume = np.zeros((3, 8, 8), dtype=np.int16)
    volume[1] = 40  # foreground all one value: both percentiles coincide
    norm = IntensityNormalizer.fit(volume, IntensitySpec(kind="percentile", low=0.5, high=99.5))
    assert not norm.has_range
    out = norm.apply(volume)
    assert out.dtype == np.float32 and not np.isnan(out).any()
    assert set(np.unique(out).tolist()) == {0.0}  # 40 is not above low (= 40)
    assert norm.apply(np.array([[[41]]]))[0, 0, 0] == 1.0


def test_percentile_on_a_constant_volume_does_not_fail():
    volume = np.full((2, 4, 4), 7.0)
    norm = IntensityNormalizer.fit(volume, IntensitySpec(kind="percentile", low=1, high=99))
    assert np.array_equal(norm.apply(volume), np.zeros_like(volume, dtype=np.float32))


def test_apply_does_not_modify_its_input():
    x = np.array([[[-500.0, 500.0]]])
    before = x.copy()
    IntensityNormalizer.fit(x, IntensitySpec()).apply(x)
    assert np.array_equal(x, before)


def test_empty_volume_cannot_be_fitted_for_percentiles():
    with pytest.raises(ValueError, match="empty"):
        IntensityNormalizer.fit(np.zeros((0, 4, 4)), IntensitySpec(kind="percentile", low=1, high=99))
