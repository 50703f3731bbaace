"""hsam.metrics: Dice and HD95 against hand-computed values, medpy's surface definition, the published edge rules
and the correct (mm, undefined-is-undefined) ones, cropping, aggregation."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from hsam.metrics import (CaseMetric, aggregate, correct_case_metrics, dice, hd95, published_case_metrics,
                          surface_distances)


def cube(shape, start, size):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def brute_hd95(pred, gt, spacing):
    """The definition spelled out: face-connected erosion surfaces, all pairwise distances, pooled 95th pct."""
    structure = ndimage.generate_binary_structure(pred.ndim, 1)
    ps = np.argwhere(pred & ~ndimage.binary_erosion(pred, structure)) * np.asarray(spacing, float)
    gs = np.argwhere(gt & ~ndimage.binary_erosion(gt, structure)) * np.asarray(spacing, float)
    d = cdist(ps, gs)
    return float(np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95))


def full_volume_hd95(pred, gt, spacing=None):
    """The same without any cropping: distance transforms over the whole array."""
    structure = ndimage.generate_binary_structure(pred.ndim, 1)
    ps = pred & ~ndimage.binary_erosion(pred, structure)
    gs = gt & ~ndimage.binary_erosion(gt, structure)
    d1 = ndimage.distance_transform_edt(~gs, sampling=spacing)[ps]
    d2 = ndimage.distance_transform_edt(~ps, sampling=spacing)[gs]
    return float(np.percentile(np.concatenate([d1, d2]), 95))


# --------------------------------------------------------------------------------------- hand-computed

def test_disjoint_2cubes_offset_along_z():
    # 2×2×2 cubes (every voxel on the surface) 3 voxels apart along axis 0: distances 2 (near faces) and 3
    # (far faces), 8 of each per direction → 95th percentile 3 voxels; 3 × 2.5 mm along axis 0 = 7.5 mm.
    pred, gt = cube((8, 6, 6), (0, 2, 2), 2), cube((8, 6, 6), (3, 2, 2), 2)
    to_gt, to_pred = surface_distances(pred, gt)
    assert sorted(to_gt) == [2.0] * 4 + [3.0] * 4 and sorted(to_pred) == [2.0] * 4 + [3.0] * 4
    assert hd95(pred, gt) == 3.0
    assert hd95(pred, gt, spacing=(2.5, 0.7, 0.7)) == pytest.approx(7.5)
    assert dice(pred, gt) == 0.0


def test_overlapping_4cubes_shifted_one_voxel_anisotropic():
    # 4×4×4 cubes shifted by one voxel along axis 0. Surface distances (56 + 56): in voxels 40 ones and 72 zeros
    # → HD95 1; with spacing (3, 1, 1) the 32 face-to-face distances become 3 mm while the 8 interior-face voxels
    # find the side wall 1 mm away → HD95 3 mm. Dice = 2·48 / 128.
    pred, gt = cube((10, 8, 8), (3, 2, 2), 4), cube((10, 8, 8), (2, 2, 2), 4)
    to_gt, to_pred = surface_distances(pred, gt)
    assert len(to_gt) == len(to_pred) == 56
    assert np.count_nonzero(np.concatenate([to_gt, to_pred]) == 1) == 40
    assert hd95(pred, gt) == 1.0
    d_mm = np.concatenate(surface_distances(pred, gt, spacing=(3.0, 1.0, 1.0)))
    assert np.count_nonzero(d_mm == 3.0) == 32 and np.count_nonzero(d_mm == 1.0) == 8
    assert hd95(pred, gt, spacing=(3.0, 1.0, 1.0)) == 3.0
    assert dice(pred, gt) == pytest.approx(0.75)


def test_lateral_offset_uses_the_spacing_of_that_axis():
    pred, gt = cube((4, 12, 12), (1, 2, 2), 2), cube((4, 12, 12), (1, 2, 6), 2)  # 4 apart along axis 2
    assert hd95(pred, gt) == 4.0  # near faces 3 apart, far faces 4
    assert hd95(pred, gt, spacing=(5.0, 0.5, 0.8)) == pytest.approx(3.2)


def test_single_voxel_masks():
    a, b = np.zeros((3, 6, 6), bool), np.zeros((3, 6, 6), bool)
    a[0, 0, 0] = True
    assert dice(a, a) == 1.0 and hd95(a, a) == 0.0
    b[0, 3, 4] = True
    assert hd95(a, b) == 5.0
    assert hd95(a, b, spacing=(1.0, 2.0, 0.5)) == pytest.approx(math.sqrt(6.0 ** 2 + 2.0 ** 2))
    assert dice(a, b) == 0.0


def test_2d_masks_and_scalar_spacing():
    a, b = np.zeros((9, 9), bool), np.zeros((9, 9), bool)
    a[1, 1], b[4, 5] = True, True
    assert hd95(a, b) == 5.0 and hd95(a, b, spacing=2.0) == 10.0


def test_agrees_with_brute_force_definition_on_random_shapes():
    rng = np.random.default_rng(7)
    for _ in range(8):
        p = ndimage.binary_dilation(rng.random((9, 11, 13)) > 0.97)
        g = ndimage.binary_dilation(rng.random((9, 11, 13)) > 0.97)
        if not (p.any() and g.any()):
            continue
        assert hd95(p, g) == pytest.approx(brute_hd95(p, g, (1, 1, 1)))
        assert hd95(p, g, (2.5, 0.7, 0.9)) == pytest.approx(brute_hd95(p, g, (2.5, 0.7, 0.9)))


def test_empty_masks_are_undefined_for_the_bare_functions():
    empty, one = np.zeros((4, 4, 4), bool), cube((4, 4, 4), (1, 1, 1), 2)
    assert math.isnan(dice(empty, empty))
    assert dice(one, empty) == 0.0 and dice(empty, one) == 0.0
    for p, g in ((one, empty), (empty, one), (empty, empty)):
        with pytest.raises(ValueError, match="empty"):
            hd95(p, g)


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="spacing"):
        hd95(cube((4, 4, 4), (0, 0, 0), 2), cube((4, 4, 4), (1, 1, 1), 2), spacing=(1, 1))
    with pytest.raises(ValueError, match="classes"):
        published_case_metrics(np.zeros((2, 2)), np.zeros((2, 2)), [0, 1])


# --------------------------------------------------------------------------------------- cropping

def test_cropping_gives_identical_results():
    shape = (20, 40, 36)
    pred, gt = np.zeros(shape, bool), np.zeros(shape, bool)
    pred[0:5, 0:9, 3:12] = True  # touches the array border: border voxels are surface (outside = background)
    pred[12:16, 20:30, 20:36] = True  # touches the far border
    gt[1:6, 1:10, 2:11] = True
    gt[11:17, 22:31, 18:34] = True
    for spacing in (None, (2.5, 0.7, 0.9)):
        assert hd95(pred, gt, spacing) == full_volume_hd95(pred, gt, spacing)
    big_p, big_g = np.zeros((40, 80, 80), bool), np.zeros((40, 80, 80), bool)
    big_p[10:30, 20:60, 30:66], big_g[10:30, 20:60, 30:66] = pred, gt
    assert hd95(big_p, big_g, (2.5, 0.7, 0.9)) == hd95(pred, gt, (2.5, 0.7, 0.9))
    labels_p = np.where(big_p, 3, 0).astype(np.uint8)
    labels_g = np.where(big_g, 3, 0).astype(np.uint8)
    assert correct_case_metrics(labels_p, labels_g, [3], (2.5, 0.7, 0.9))[3].hd95 == \
        full_volume_hd95(big_p, big_g, (2.5, 0.7, 0.9))


def test_small_organs_in_a_ct_sized_volume_are_fast():
    labels_p = np.zeros((150, 512, 512), np.uint8)
    labels_g = np.zeros_like(labels_p)
    labels_g[60:80, 200:260, 300:340] = 1
    labels_p[62:81, 203:262, 300:338] = 1
    labels_g[10:14, 10:20, 10:20] = 4
    start = time.perf_counter()
    result = correct_case_metrics(labels_p, labels_g, range(1, 9), (0.7, 0.7, 2.5)[::-1])
    published = published_case_metrics(labels_p, labels_g, range(1, 9))
    assert time.perf_counter() - start < 8.0  # uncropped distance transforms of 39 M voxels take far longer
    assert result[1].hd95 > 0 and published[4] == CaseMetric(0.0, 0.0)


# --------------------------------------------------------------------------------------- edge rules

@pytest.fixture
def edge_case_labels():
    """Class 1 on both sides, 2 only predicted, 3 only in the ground truth, 4 absent from both."""
    pred, gt = np.zeros((6, 10, 10), np.uint8), np.zeros((6, 10, 10), np.uint8)
    gt[1:3, 1:5, 1:5] = 1
    pred[2:4, 1:5, 1:5] = 1
    pred[4, 7, 7] = 2
    gt[5, 0:2, 8:10] = 3
    return pred, gt


def test_published_edge_rules_exactly(edge_case_labels):
    pred, gt = edge_case_labels
    result = published_case_metrics(pred, gt, [1, 2, 3, 4])
    assert result[1] == CaseMetric(dice(pred == 1, gt == 1), hd95(pred == 1, gt == 1))
    assert result[1].dice == pytest.approx(0.5)
    assert result[2] == CaseMetric(1.0, 0.0)  # prediction non-empty, ground truth empty
    assert result[3] == CaseMetric(0.0, 0.0)  # prediction empty
    assert result[4] == CaseMetric(0.0, 0.0)  # both empty: also "prediction empty"


def test_correct_edge_rules(edge_case_labels):
    pred, gt = edge_case_labels
    result = correct_case_metrics(pred, gt, [1, 2, 3, 4], spacing=(3.0, 0.8, 0.8))
    assert result[1].dice == pytest.approx(0.5)
    assert result[1].hd95 == pytest.approx(hd95(pred == 1, gt == 1, (3.0, 0.8, 0.8)))
    assert result[2].dice == 0.0 and math.isnan(result[2].hd95)
    assert result[3].dice == 0.0 and math.isnan(result[3].hd95)
    assert math.isnan(result[4].dice) and math.isnan(result[4].hd95)


def test_published_and_correct_agree_where_both_present_and_spacing_is_1(edge_case_labels):
    pred, gt = edge_case_labels
    pred[0, 6:9, 6:9] = 5
    gt[0, 7:10, 5:9] = 5
    published = published_case_metrics(pred, gt, [1, 5])
    for spacing in (None, (1.0, 1.0, 1.0)):
        assert correct_case_metrics(pred, gt, [1, 5], spacing) == published


def test_labels_outside_the_classes_and_float_label_maps_are_handled():
    pred = np.zeros((4, 6, 6), np.int16)
    gt = np.zeros((4, 6, 6), np.float32)
    pred[1:3, 1:3, 1:3] = 2
    pred[0, 0, 0] = 13  # a class not evaluated
    gt[1:3, 1:3, 1:4] = 2
    gt[3, 5, 5] = -1
    result = published_case_metrics(pred, gt, [2])
    assert list(result) == [2] and result[2].dice == pytest.approx(16 / 20)


# --------------------------------------------------------------------------------------- aggregation

def test_aggregate_means_per_class_then_over_classes():
    cases = [{1: CaseMetric(0.8, 4.0), 2: CaseMetric(0.6, 10.0)},
             {1: CaseMetric(0.6, 2.0), 2: CaseMetric(0.2, 20.0)}]
    agg = aggregate(cases, [1, 2])
    assert agg["per_class"][1] == {"dice": pytest.approx(0.7), "hd95": pytest.approx(3.0), "n_cases": 2,
                                   "n_dice": 2, "n_hd95": 2}
    assert agg["per_class"][2]["dice"] == pytest.approx(0.4) and agg["per_class"][2]["hd95"] == pytest.approx(15.0)
    assert agg["mean"]["dice"] == pytest.approx(0.55) and agg["mean"]["hd95"] == pytest.approx(9.0)


def test_aggregate_leaves_undefined_values_out_and_counts_them():
    nan = math.nan
    cases = [{1: CaseMetric(0.9, 3.0), 2: CaseMetric(nan, nan)},
             {1: CaseMetric(0.0, nan), 2: CaseMetric(nan, nan)},
             {1: CaseMetric(0.6, 5.0), 2: CaseMetric(0.5, 7.0)}]
    agg = aggregate(cases)
    one, two = agg["per_class"][1], agg["per_class"][2]
    assert one["dice"] == pytest.approx(0.5) and one["hd95"] == pytest.approx(4.0)
    assert (one["n_cases"], one["n_dice"], one["n_hd95"]) == (3, 3, 2)
    assert (two["dice"], two["hd95"], two["n_dice"], two["n_hd95"]) == (0.5, 7.0, 1, 1)
    assert agg["mean"]["dice"] == pytest.approx(0.5) and agg["mean"]["hd95"] == pytest.approx(5.5)
    empty = aggregate([{3: CaseMetric(nan, nan)}])
    assert math.isnan(empty["per_class"][3]["dice"]) and math.isnan(empty["mean"]["hd95"])
