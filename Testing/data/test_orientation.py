"""Orientation: any voxel grid → the model's (slices, rows, columns) stack and back, exactly.

Every signed axis permutation of the direction matrix (48, half of them left-handed), oblique rotations,
a 45° tie and anisotropic spacing; expectations are computed from physical voxel positions, not from the
implementation's own tables.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from hsam.data.orientation import (OBLIQUE_WARN_DEGREES, ModelSpacing, image_axis_codes, labels_to_image,
                                   letter_axis_sign, model_spacing, nearest_patient_axes, obliqueness_degrees,
                                   reorientation_for)
from hsam.description import OrientationSpec
from hsam.errors import InputVolumeError

SIZE = (7, 9, 11)  # i, j, k: all different, so a swapped axis changes the shape
SPACING = (0.7, 1.3, 2.9)
ORIGIN = (12.5, -40.25, 100.0)
SPECS = [OrientationSpec(), OrientationSpec.from_code("IAR"), OrientationSpec.from_code("RSA"),
         OrientationSpec.from_code("PLI")]


def signed_permutations() -> list[np.ndarray]:
    """All 48 direction matrices whose columns are ± patient axes (det +1 and -1)."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            m = np.zeros((3, 3))
            for a in range(3):
                m[perm[a], a] = signs[a]
            out.append(m)
    return out


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    p, q = [x for x in range(3) if x != axis]
    m = np.eye(3)
    m[p, p], m[p, q], m[q, p], m[q, q] = c, -s, s, c
    return m


def make_image(direction: np.ndarray, size=SIZE, spacing=SPACING, array: np.ndarray | None = None) -> sitk.Image:
    if array is None:
        array = np.zeros(size[::-1], dtype=np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(ORIGIN)
    image.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    return image


def centres_lps(image: sitk.Image) -> np.ndarray:
    """Physical LPS centre of every voxel, array (k, j, i, 3), computed from the image header."""
    size = image.GetSize()
    k, j, i = np.indices(size[::-1])
    ijk = np.stack([i, j, k]).reshape(3, -1).astype(float)
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    pts = np.asarray(image.GetOrigin())[:, None] + d @ np.diag(image.GetSpacing()) @ ijk
    return pts.T.reshape(size[2], size[1], size[0], 3)


def expected_model_shape(direction: np.ndarray, spec: OrientationSpec, size=SIZE) -> tuple[int, ...]:
    shape = []
    for letter in spec.code:
        axis, _ = letter_axis_sign(letter)
        a = int(np.argmax(np.abs(direction[axis, :])))
        shape.append(size[a])
    return tuple(shape)


def patient_unit(letter: str) -> np.ndarray:
    axis, sign = letter_axis_sign(letter)
    v = np.zeros(3)
    v[axis] = sign
    return v


def check_marker(direction: np.ndarray, spec: OrientationSpec) -> None:
    """The most left-posterior-superior voxel lands in the model corner those letters predict."""
    image = make_image(direction)
    pts = centres_lps(image)
    marker = np.zeros(SIZE[::-1], dtype=np.uint8)
    marker[np.unravel_index(np.argmax(pts.sum(axis=-1)), marker.shape)] = 1
    r = reorientation_for(image, spec)
    model = r.to_model(marker)
    assert model.shape == expected_model_shape(direction, spec) == r.model_shape
    expected = tuple(n - 1 if letter in "LPS" else 0 for n, letter in zip(model.shape, spec.code))
    assert [tuple(p) for p in np.argwhere(model == 1)] == [expected]


def check_steps_point_toward_letters(direction: np.ndarray, spec: OrientationSpec) -> None:
    """Moving +1 along each model axis moves (mostly) toward that axis's patient letter, by its spacing."""
    image = make_image(direction)
    r = reorientation_for(image, spec)
    pts = r.to_model(centres_lps(image))  # (slices, rows, columns, 3): trailing axis carried along
    steps = [pts[1, 0, 0] - pts[0, 0, 0], pts[0, 1, 0] - pts[0, 0, 0], pts[0, 0, 1] - pts[0, 0, 0]]
    for m, (step, letter) in enumerate(zip(steps, spec.code)):
        length = np.linalg.norm(step)
        assert length == pytest.approx(r.spacing[m])
        assert np.dot(step / length, patient_unit(letter)) > np.cos(np.radians(45)), (spec.code, m, step)


def test_there_are_48_signed_permutations_half_left_handed():
    dets = [round(np.linalg.det(m)) for m in signed_permutations()]
    assert len(dets) == 48 and dets.count(-1) == 24


@pytest.mark.parametrize("index", range(48))
def test_every_signed_permutation_marker_and_steps(index):
    direction = signed_permutations()[index]
    for spec in SPECS:
        check_marker(direction, spec)
        check_steps_point_toward_letters(direction, spec)
    assert obliqueness_degrees(make_image(direction)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("index", [0, 5, 13, 26, 47])
@pytest.mark.parametrize("flip_k", [False, True])
def test_oblique_20_degrees_about_two_axes(index, flip_k):
    direction = signed_permutations()[index] @ rotation(0, 20) @ rotation(2, 20)
    if flip_k:  # the other handedness
        direction = direction @ np.diag([1, 1, -1])
    for spec in SPECS:
        check_marker(direction, spec)
        check_steps_point_toward_letters(direction, spec)
    image = make_image(direction)
    oblique = obliqueness_degrees(image)
    assert 20 <= oblique < 35
    r = reorientation_for(image, OrientationSpec())
    assert r.obliqueness == pytest.approx(oblique)
    assert r.warnings and "oblique" in r.warnings[0]


def test_small_obliqueness_does_not_warn():
    image = make_image(rotation(1, 0.5 * OBLIQUE_WARN_DEGREES))
    assert reorientation_for(image, OrientationSpec()).warnings == []


def test_45_degree_tie_is_still_a_permutation():
    direction = rotation(2, 45)
    patient_axis, signs = nearest_patient_axes(direction)
    assert sorted(patient_axis) == [0, 1, 2] and all(s in (1, -1) for s in signs)
    image = make_image(direction)
    r = reorientation_for(image, OrientationSpec())
    assert sorted(r.permutation) == [0, 1, 2]
    x = np.random.default_rng(1).integers(-1000, 1000, size=SIZE[::-1]).astype(np.int16)
    assert np.array_equal(r.to_input(r.to_model(x)), x)
    assert obliqueness_degrees(image) == pytest.approx(45.0)


@pytest.mark.parametrize("index", [0, 9, 30, 47])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64, bool])
def test_round_trip_is_bit_exact(index, dtype):
    rng = np.random.default_rng(index)
    direction = signed_permutations()[index] @ rotation(1, 20) @ rotation(2, -20)
    r = reorientation_for(make_image(direction), OrientationSpec())
    x = (rng.standard_normal(SIZE[::-1]) * 1000).astype(dtype)
    if np.dtype(dtype).kind == "f":
        x.flat[::17] = np.nan
        x.flat[5] = -0.0
    back = r.to_input(r.to_model(x))
    assert back.dtype == x.dtype and back.flags.c_contiguous
    assert back.tobytes() == x.tobytes()
    # a model-ordered stack (n = slices, rows, columns), e.g. predicted labels, also round-trips
    stack = rng.integers(0, 9, size=r.model_shape).astype(np.uint8)
    assert np.array_equal(r.to_model(r.to_input(stack)), stack)
    # trailing axes (e.g. class probabilities) are carried along
    probs = rng.random(r.model_shape + (3,)).astype(np.float32)
    assert r.to_input(probs).shape == SIZE[::-1] + (3,)
    assert np.array_equal(r.to_model(r.to_input(probs)), probs)


def test_identity_axial_volume_is_transposed_and_flipped_as_expected():
    image = make_image(np.eye(3))  # i→L, j→P, k→S: already the SPL stack
    r = reorientation_for(image, OrientationSpec())
    assert r.is_identity and r.input_axis_codes == "LPS" and image_axis_codes(image) == "LPS"
    assert r.model_shape == (11, 9, 7)
    assert r.spacing == ModelSpacing(slice=2.9, row=1.3, column=0.7)
    ras = reorientation_for(make_image(np.diag([-1, -1, 1])), OrientationSpec())  # i→R, j→A (NIfTI RAS)
    assert ras.permutation == (0, 1, 2) and ras.flips == (False, True, True)


def test_model_spacing_follows_the_axes():
    direction = signed_permutations()[17]
    spec = OrientationSpec()
    spacing = model_spacing(make_image(direction), spec)
    for m, letter in enumerate(spec.code):
        axis, _ = letter_axis_sign(letter)
        assert spacing[m] == SPACING[int(np.argmax(np.abs(direction[axis])))]


def test_model_slice_index_for_k():
    up = reorientation_for(make_image(np.eye(3)), OrientationSpec())
    down = reorientation_for(make_image(np.diag([1, 1, -1])), OrientationSpec())
    assert up.model_slice_index(3) == 3
    assert down.model_slice_index(3) == SIZE[2] - 1 - 3
    sagittal_slicing = reorientation_for(make_image(np.eye(3)), OrientationSpec.from_code("LPS"))
    with pytest.raises(ValueError, match="not k"):
        sagittal_slicing.model_slice_index(0, voxel_axis=2)


def test_shape_mismatch_is_refused():
    r = reorientation_for(make_image(np.eye(3)), OrientationSpec())
    with pytest.raises(ValueError, match="expected an input-ordered array"):
        r.to_model(np.zeros((3, 3, 3)))
    with pytest.raises(ValueError, match="expected a model-ordered array"):
        r.to_input(np.zeros((3, 3, 3)))


def test_single_axial_slice_is_accepted():
    image = make_image(np.eye(3), size=(7, 9, 1))
    r = reorientation_for(image, OrientationSpec())
    assert r.model_shape == (1, 9, 7)


@pytest.mark.parametrize("size, plane", [((1, 9, 11), "sagittal"), ((7, 1, 11), "coronal")])
def test_single_slice_in_another_plane_is_refused(size, plane):
    with pytest.raises(InputVolumeError, match=f"single {plane} slice.*segments axial slices"):
        reorientation_for(make_image(np.eye(3), size=size), OrientationSpec())


def test_single_sagittal_slice_found_through_a_permuted_direction():
    # k points toward L here, so a one-voxel k axis is a sagittal slice
    direction = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=float)
    with pytest.raises(InputVolumeError, match="single sagittal slice"):
        reorientation_for(make_image(direction, size=(7, 9, 1)), OrientationSpec())


def test_a_line_is_refused():
    with pytest.raises(InputVolumeError, match="line"):
        reorientation_for(make_image(np.eye(3), size=(1, 1, 11)), OrientationSpec())


def test_2d_image_is_refused():
    with pytest.raises(InputVolumeError, match="2D"):
        reorientation_for(sitk.Image(4, 4, sitk.sitkInt16), OrientationSpec())


def test_labels_to_image_copies_geometry_exactly():
    direction = signed_permutations()[40] @ rotation(0, 20)
    reference = make_image(direction)
    labels = np.random.default_rng(0).integers(0, 9, size=SIZE[::-1])
    image = labels_to_image(labels, reference)
    assert image.GetPixelID() == sitk.sitkUInt8
    assert image.GetOrigin() == reference.GetOrigin()
    assert image.GetSpacing() == reference.GetSpacing()
    assert image.GetDirection() == reference.GetDirection()
    assert np.array_equal(sitk.GetArrayFromImage(image), labels)
    assert np.array_equal(sitk.GetArrayFromImage(labels_to_image(labels.astype(np.float32), reference)), labels)


def test_labels_to_image_refuses_bad_arrays():
    reference = make_image(np.eye(3))
    with pytest.raises(ValueError, match="does not match"):
        labels_to_image(np.zeros((3, 3, 3), np.uint8), reference)
    with pytest.raises(ValueError, match="0..255"):
        labels_to_image(np.full(SIZE[::-1], 300), reference)
    with pytest.raises(ValueError, match="non-integer"):
        labels_to_image(np.full(SIZE[::-1], 0.5), reference)
