"""Tests of caffe_layers.transforms (pure numpy augmentation core)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage

from caffe_layers.params import AUGMENT_SCHEMA, ParamError
from caffe_layers.params import load_params, parse_param_str
from caffe_layers.transforms import functional
from caffe_layers.transforms import (DIHEDRAL_ELEMENTS, AugmentDraws, BatchAugmenter, apply_dihedral,
                                     dihedral_element, draw_augmentation)

from naive_reference import naive_augment

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

GEOMETRY = dict(rotate=True, flip=True)
EVERYTHING = dict(rotate=True, flip=True, rotate_any=True, color=True, hed=True,
                  hed_alpha=0.2, hed_beta=0.1, color_p=0.7, hed_p=0.7)


def make_batch(seed, n=4, channels=3, height=12, width=12, label_ndim=4, label_dtype=np.int32):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (n, channels, height, width)).astype(np.float32)
    label_shape = (n, 1, height, width) if label_ndim == 4 else (n, height, width)
    labels = rng.integers(0, 6, label_shape).astype(label_dtype)
    return images, labels


shapes = st.tuples(st.integers(1, 4), st.integers(1, 14), st.integers(1, 14))  # N, H, W
seeds = st.integers(0, 2**32 - 1)


# --- geometry ------------------------------------------------------------------------------


@FAST
@given(shape=shapes, seed=seeds, label_ndim=st.sampled_from([3, 4]))
def test_geometry_identical_for_image_and_label(shape, seed, label_ndim):
    n, height, width = shape
    images, labels = make_batch(seed, n, 3, height, width, label_ndim)
    label_plane = labels if label_ndim == 3 else labels[:, 0]
    images[:, 0] = label_plane  # channel 0 carries the label values
    out_images, out_labels = BatchAugmenter(seed=seed, **GEOMETRY)(images, labels)
    out_plane = out_labels if label_ndim == 3 else out_labels[:, 0]
    np.testing.assert_array_equal(out_images[:, 0], out_plane.astype(np.float32))
    assert out_images.shape == images.shape and out_labels.shape == labels.shape
    assert out_labels.dtype == labels.dtype
    for i in range(n):  # each sample is a permutation of its own pixels
        assert sorted(out_plane[i].ravel()) == sorted(label_plane[i].ravel())


@FAST
@given(shape=shapes, seed=seeds)
def test_rotate_any_preserves_label_values_and_shape(shape, seed):
    n, height, width = shape
    images, labels = make_batch(seed, n, 3, height, width)
    out_images, out_labels = BatchAugmenter(seed=seed, rotate_any=True, rotate=True, flip=True)(images, labels)
    assert out_images.shape == images.shape and out_labels.shape == labels.shape
    for i in range(n):
        assert set(np.unique(out_labels[i])) <= set(np.unique(labels[i]))
    # Bilinear with reflect padding never leaves the input's range.
    assert out_images.min() >= images.min() - 1e-3 and out_images.max() <= images.max() + 1e-3


def test_rotate_any_uses_nearest_for_labels_of_any_dtype():
    images, labels = make_batch(0, 3, 3, 10, 10)
    for dtype in (np.bool_, np.float16, np.uint8, np.float32):
        typed = (labels > 2).astype(dtype) if dtype == np.bool_ else labels.astype(dtype)
        _, out = BatchAugmenter(seed=1, rotate_any=True)(images, typed)
        assert out.dtype == typed.dtype
        assert set(np.unique(out)) <= set(np.unique(typed))


def test_quarter_turn_angle_matches_rot90():
    images, labels = make_batch(3, 2, 3, 9, 9)
    augment = BatchAugmenter(rotate_any=True, angle_min=90, angle_max=90)
    out_images, out_labels = augment(images, labels)
    np.testing.assert_allclose(out_images, np.rot90(images, 1, axes=(2, 3)), atol=1e-3)
    np.testing.assert_array_equal(out_labels, np.rot90(labels, 1, axes=(2, 3)))


def test_rotate_any_matches_scipy_rotate():
    images, _ = make_batch(4, 1, 2, 11, 16)
    augment = BatchAugmenter(rotate_any=True, angle_min=33.0, angle_max=33.0)
    out_images, _ = augment(images)
    expected = [ndimage.rotate(channel, 33.0, reshape=False, order=1, mode="reflect") for channel in images[0]]
    np.testing.assert_allclose(out_images[0], np.stack(expected), atol=1e-3)


@pytest.mark.parametrize("height, width", [(8, 13), (13, 8)])
def test_non_square_patches_keep_their_shape(height, width):
    images, labels = make_batch(5, 16, 3, height, width)
    augment = BatchAugmenter(seed=5, **GEOMETRY)
    out_images, out_labels = augment(images, labels)
    assert out_images.shape == images.shape and out_labels.shape == labels.shape
    assert set(augment.last_draws.k) <= {0, 2}


def test_square_patches_use_all_quarter_turns():
    augment = BatchAugmenter(seed=0, rotate=True)
    augment(np.zeros((64, 1, 4, 4), np.float32))
    assert set(augment.last_draws.k) == {0, 1, 2, 3}


# --- the 8 dihedral elements through OpenCV -------------------------------------------------

LABEL_DTYPES = [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.uint32, np.int64, np.uint64,
                np.float16, np.float32, np.float64, np.bool_]
ALL_DRAWS = [(k, flip_h, flip_v) for k in range(4) for flip_h in (False, True) for flip_v in (False, True)]


def numpy_geometry(x, k, flip_h, flip_v):
    """The documented semantics of AugmentDraws: flips, then np.rot90 on the last two axes."""
    if flip_v:
        x = np.flip(x, axis=-2)
    if flip_h:
        x = np.flip(x, axis=-1)
    return np.rot90(x, k, axes=(-2, -1))


def test_dihedral_element_composes_all_16_draws_into_the_8_elements():
    plane = np.arange(20).reshape(4, 5)  # no symmetry
    results = {}
    for k, flip_h, flip_v in ALL_DRAWS:
        element = dihedral_element(k, flip_h, flip_v)
        expected = numpy_geometry(plane, k, flip_h, flip_v)
        results.setdefault(element, expected)
        np.testing.assert_array_equal(results[element], expected)  # same element, same result
        target = np.empty(expected.shape, plane.dtype)
        apply_dihedral(element, plane, target)
        np.testing.assert_array_equal(target, expected)
    assert sorted(results) == sorted(DIHEDRAL_ELEMENTS)
    assert len({r.tobytes() + bytes(r.shape) for r in results.values()}) == 8  # all distinct


@pytest.mark.parametrize("dtype", LABEL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("element", DIHEDRAL_ELEMENTS)
def test_apply_dihedral_every_element_and_dtype_out_of_place_and_in_place(element, dtype):
    rng = np.random.default_rng(0)
    plane = rng.integers(0, 2 if dtype == np.bool_ else 100, (7, 7)).astype(dtype)
    expected = {e: numpy_geometry(plane, k, h, v) for k, h, v in ALL_DRAWS
                for e in [dihedral_element(k, h, v)]}[element]
    target = np.full_like(plane, 1)
    apply_dihedral(element, plane, target)
    assert target.dtype == plane.dtype
    np.testing.assert_array_equal(target, expected)
    in_place = plane.copy()
    apply_dihedral(element, in_place, in_place)
    np.testing.assert_array_equal(in_place, expected)


@pytest.mark.parametrize("element", DIHEDRAL_ELEMENTS)
def test_apply_dihedral_strided_cast_and_overlapping_planes(element):
    rng = np.random.default_rng(1)
    base = rng.integers(0, 100, (9, 9)).astype(np.int32)
    expected = {dihedral_element(k, h, v): numpy_geometry(base, k, h, v) for k, h, v in ALL_DRAWS}[element]
    # non-contiguous source and target, with a cast
    wide = np.zeros((9, 20), np.float32)
    apply_dihedral(element, base[:, :].T.T, wide[:, ::2][:, :9])
    np.testing.assert_array_equal(wide[:, ::2][:, :9], expected)
    assert not wide[:, 1::2].any()  # nothing written between the strided columns
    # partially overlapping source and target in one buffer
    buffer = np.zeros((10, 9), np.int32)
    buffer[:9] = base
    apply_dihedral(element, buffer[:9], buffer[1:])
    np.testing.assert_array_equal(buffer[1:], expected)


def test_apply_dihedral_rejects_bad_shapes_and_elements():
    with pytest.raises(ValueError, match="transpose of a \\(3, 4\\) plane has shape \\(4, 3\\)"):
        apply_dihedral("transpose", np.zeros((3, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="unknown dihedral element 'spin'"):
        apply_dihedral("spin", np.zeros((3, 3)), np.zeros((3, 3)))


def test_cv2_dtype_probe_matches_opencv_abilities():
    assert functional._cv2_handles(np.float32) and functional._cv2_handles(np.uint8)
    assert not functional._cv2_handles(np.dtype(">f4"))  # byte-swapped: numpy path


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("in_place", [False, True], ids=["out-of-place", "in-place"])
@pytest.mark.parametrize("label_ndim", [3, 4])
def test_all_draws_every_label_dtype_match_rot90_and_flip(label_dtype, in_place, label_ndim):
    """All 16 (k, flip_h, flip_v) draws (8 elements, each twice) in one batch, against numpy."""
    n = len(ALL_DRAWS)
    images, labels = make_batch(0, n, 3, 16, 16, label_ndim=label_ndim)
    labels = (labels > 2).astype(label_dtype) if label_dtype == np.bool_ else labels.astype(label_dtype)
    k, flip_h, flip_v = (np.array(column) for column in zip(*ALL_DRAWS))
    draws = draw_augmentation(n, (3, 16, 16), np.random.default_rng(0), dict(color=True))
    draws = AugmentDraws(**dict(draws.as_dict(), k=k, flip_h=flip_h, flip_v=flip_v))
    params = dict(rotate=True, flip=True, color=True, color_a_min=0.5, color_a_max=1.5, color_b_min=-30,
                  color_b_max=30)
    naive_images, naive_labels = naive_augment(images, labels, params, draws=draws)
    expected_labels = np.stack([numpy_geometry(labels[i], k[i], flip_h[i], flip_v[i]) for i in range(n)])
    np.testing.assert_array_equal(naive_labels, expected_labels)
    augment = BatchAugmenter(**params)
    if in_place:
        out_images, out_labels = images.copy(), labels.copy()
        augment.augment_into(out_images, out_labels, out_images, out_labels, draws=draws)
    else:
        out_images, out_labels = augment(images, labels, draws=draws)
    np.testing.assert_array_equal(out_images, naive_images)  # exact, not just close
    assert out_labels.dtype == labels.dtype
    np.testing.assert_array_equal(out_labels, expected_labels)


@pytest.mark.parametrize("images_dtype", [np.uint8, np.float64, np.float32])
@pytest.mark.parametrize("labels_out_dtype", [np.float32, np.int64, np.uint8])
def test_cast_into_caffe_style_outputs_all_draws(images_dtype, labels_out_dtype):
    n = len(ALL_DRAWS)
    images, labels = make_batch(1, n, 3, 10, 10)
    images = images.astype(images_dtype)
    labels = labels.astype(np.uint8)
    k, flip_h, flip_v = (np.array(column) for column in zip(*ALL_DRAWS))
    draws = draw_augmentation(n, (3, 10, 10), np.random.default_rng(0), GEOMETRY)
    draws = AugmentDraws(**dict(draws.as_dict(), k=k, flip_h=flip_h, flip_v=flip_v))
    images_out = np.empty(images.shape, np.float32)
    labels_out = np.empty(labels.shape, labels_out_dtype)
    BatchAugmenter(**GEOMETRY).augment_into(images, labels, images_out, labels_out, draws=draws)
    for i in range(n):
        np.testing.assert_array_equal(images_out[i], numpy_geometry(images[i].astype(np.float32), *ALL_DRAWS[i]))
        np.testing.assert_array_equal(labels_out[i], numpy_geometry(labels[i], *ALL_DRAWS[i]))


def test_non_contiguous_outputs_are_written():
    images, labels = make_batch(2, 16, 3, 8, 8)
    k, flip_h, flip_v = (np.array(column) for column in zip(*ALL_DRAWS))
    draws = draw_augmentation(16, (3, 8, 8), np.random.default_rng(0), GEOMETRY)
    draws = AugmentDraws(**dict(draws.as_dict(), k=k, flip_h=flip_h, flip_v=flip_v))
    expected_images, expected_labels = naive_augment(images, labels, GEOMETRY, draws=draws)
    # strided columns (general path), and contiguous planes with gaps between them (OpenCV path)
    strided = (np.zeros((16, 3, 8, 16), np.float32), np.zeros((16, 8, 8, 1), np.int32))
    gapped = (np.zeros((16, 4, 9, 8), np.float32), np.zeros((16, 2, 8, 8), np.int32))
    layouts = [(strided[0][..., ::2], strided[1].transpose(0, 3, 1, 2), strided[0][..., 1::2], None),
               (gapped[0][:, 1:, 1:], gapped[1][:, :1], gapped[0][:, :, 0], gapped[1][:, 1])]
    for images_out, labels_out, images_outside, labels_outside in layouts:
        BatchAugmenter(**GEOMETRY).augment_into(images, labels, images_out, labels_out, draws=draws)
        np.testing.assert_array_equal(images_out, expected_images)
        np.testing.assert_array_equal(labels_out, expected_labels)
        assert not images_outside.any()  # nothing written between or around the planes
        assert labels_outside is None or not labels_outside.any()


@pytest.mark.parametrize("in_place", [False, True])
def test_caffe_blobs_take_one_opencv_call_per_plane(monkeypatch, in_place):
    """float32 images and labels (Caffe blobs): every non-identity plane is one OpenCV call."""
    assert functional._cv2_handles(np.float32)  # probe first: it calls OpenCV too
    calls = []
    real_call = functional._cv2_call
    monkeypatch.setattr(functional, "_cv2_call", lambda *args: calls.append(args[0]) or real_call(*args))
    monkeypatch.setattr(functional, "apply_dihedral", None)  # the general path must not be taken
    images, labels = make_batch(5, 16, 3, 8, 8)
    labels = labels.astype(np.float32)
    k, flip_h, flip_v = (np.array(column) for column in zip(*ALL_DRAWS))
    draws = draw_augmentation(16, (3, 8, 8), np.random.default_rng(0), GEOMETRY)
    draws = AugmentDraws(**dict(draws.as_dict(), k=k, flip_h=flip_h, flip_v=flip_v))
    expected_images, expected_labels = naive_augment(images, labels, GEOMETRY, draws=draws)
    augment = BatchAugmenter(**GEOMETRY)
    if in_place:
        augment.augment_into(images, labels, images, labels, draws=draws)
        out_images, out_labels = images, labels
    else:
        out_images, out_labels = augment(images, labels, draws=draws)
    np.testing.assert_array_equal(out_images, expected_images)
    np.testing.assert_array_equal(out_labels, expected_labels)
    elements = [dihedral_element(*draw) for draw in ALL_DRAWS]
    assert sorted(calls) == sorted(e for e in elements if e != "identity" for _ in range(4))  # 3 channels + label


def test_odd_quarter_turns_of_non_square_patches_rejected():
    images, labels = make_batch(3, 2, 3, 6, 8)
    draws = draw_augmentation(2, (3, 6, 8), np.random.default_rng(0), GEOMETRY)
    draws = AugmentDraws(**dict(draws.as_dict(), k=np.array([0, 1])))
    with pytest.raises(ValueError, match=r"odd quarter turns \(k=\[0, 1\]\) .* non-square 6×8"):
        BatchAugmenter(**GEOMETRY)(images, labels, draws=draws)


@pytest.mark.parametrize("config", [dict(GEOMETRY, rotate_any=True, angle_min=-30, angle_max=30),
                                    dict(GEOMETRY, hed=True, color=True)])
@pytest.mark.parametrize("label_dtype", [np.int64, np.float32, np.bool_])
def test_all_draws_with_rotate_any_or_hed_in_place(config, label_dtype):
    n = len(ALL_DRAWS)
    images, labels = make_batch(4, n, 3, 12, 12)
    labels = (labels > 2).astype(label_dtype) if label_dtype == np.bool_ else labels.astype(label_dtype)
    k, flip_h, flip_v = (np.array(column) for column in zip(*ALL_DRAWS))
    draws = draw_augmentation(n, (3, 12, 12), np.random.default_rng(4), config)
    draws = AugmentDraws(**dict(draws.as_dict(), k=k, flip_h=flip_h, flip_v=flip_v))
    expected_images, expected_labels = BatchAugmenter(**config)(images, labels, draws=draws)
    naive_images, naive_labels = naive_augment(images, labels, config, draws=draws)
    np.testing.assert_allclose(expected_images, naive_images, atol=2e-3, rtol=1e-5)
    np.testing.assert_array_equal(expected_labels, naive_labels)
    BatchAugmenter(**config).augment_into(images, labels, images, labels, draws=draws)
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)


# --- colour --------------------------------------------------------------------------------


@FAST
@given(seed=seeds, a_range=st.tuples(st.floats(0.2, 2.0), st.floats(0.2, 2.0)),
       b_range=st.tuples(st.floats(-20, 20), st.floats(-20, 20)))
def test_colour_factors_inside_ranges_and_recoverable(seed, a_range, b_range):
    a_min, a_max = sorted(a_range)
    b_min, b_max = sorted(b_range)
    augment = BatchAugmenter(seed=seed, color=True, clip=False, color_a_min=a_min, color_a_max=a_max,
                             color_b_min=b_min, color_b_max=b_max)
    images = np.full((5, 3, 4, 4), 100.0, np.float32)
    out, _ = augment(images)
    drawn = augment.last_draws
    assert drawn.a.shape == (5, 3) and drawn.b.shape == (5, 3)
    assert np.all((drawn.a >= a_min) & (drawn.a <= a_max))
    assert np.all((drawn.b >= b_min) & (drawn.b <= b_max))
    # A constant image makes each channel constant: out = 100*a + b.
    assert np.ptp(out, axis=(2, 3)).max() == 0
    np.testing.assert_allclose(out[:, :, 0, 0], 100.0 * drawn.a + drawn.b, rtol=1e-5, atol=1e-4)
    # Two constant levels recover a and b separately.
    twin = BatchAugmenter(seed=seed, color=True, clip=False, color_a_min=a_min, color_a_max=a_max,
                          color_b_min=b_min, color_b_max=b_max)
    out_50, _ = twin(np.full((5, 3, 4, 4), 50.0, np.float32))
    recovered_a = (out[:, :, 0, 0] - out_50[:, :, 0, 0]) / 50.0
    np.testing.assert_allclose(recovered_a, drawn.a, rtol=1e-4, atol=1e-4)


def test_colour_probability_zero_changes_nothing():
    images, _ = make_batch(6)
    augment = BatchAugmenter(seed=1, color=True, color_p=0.0, color_a_min=0.1, color_a_max=0.2)
    out, _ = augment(images)
    np.testing.assert_array_equal(out, images)
    assert not augment.last_draws.color_applied.any()
    assert np.all(augment.last_draws.a == 1) and np.all(augment.last_draws.b == 0)


@FAST
@given(seed=seeds, clip_range=st.tuples(st.floats(-50, 300), st.floats(-50, 300)))
def test_clip_respected(seed, clip_range):
    clip_min, clip_max = sorted(clip_range)
    images, _ = make_batch(seed)
    augment = BatchAugmenter(seed=seed, color=True, color_a_min=0.5, color_a_max=2.0, color_b_min=-40,
                             color_b_max=40, clip_min=clip_min, clip_max=clip_max)
    out, _ = augment(images)
    assert out.min() >= np.float32(clip_min) and out.max() <= np.float32(clip_max)


def test_clip_only_runs_with_colour():
    images = np.full((2, 3, 4, 4), -7.0, np.float32)  # e.g. already mean-subtracted
    out, _ = BatchAugmenter(seed=0, rotate=True, clip=True)(images)
    np.testing.assert_array_equal(out, images)


# --- stain (HED) jitter --------------------------------------------------------------------


def test_hed_identity_when_alpha_and_beta_are_zero():
    images, _ = make_batch(7, 3, 3, 10, 10)
    images[0] = 255.0
    images[1, :, :5] = 0.0
    for order in ("RGB", "BGR"):
        out, _ = BatchAugmenter(hed=True, hed_alpha=0.0, hed_beta=0.0, channel_order=order)(images)
        np.testing.assert_allclose(out, images, atol=0.02)
        np.testing.assert_array_equal(out[0], 255.0)  # white stays white


@pytest.mark.parametrize("value", [0.0, 255.0])
def test_hed_blank_images_no_nan_and_nearly_unchanged(value):
    images = np.full((4, 3, 6, 6), value, np.float32)
    out, _ = BatchAugmenter(seed=2, hed=True)(images)  # default alpha 0.05, beta 0.01
    assert np.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 255.0
    assert np.abs(out - value).max() < 3.0


def test_hed_out_of_range_input_no_nan():
    images = np.full((2, 3, 4, 4), -500.0, np.float32)
    images[1] = 1e6
    out, _ = BatchAugmenter(seed=2, hed=True, hed_alpha=0.5, hed_beta=0.5)(images)
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 255


def test_hed_changes_stained_pixels_within_bounds():
    images, _ = make_batch(8, 4, 3, 8, 8)
    augment = BatchAugmenter(seed=8, hed=True, hed_alpha=0.3, hed_beta=0.1, max_value=255)
    out, _ = augment(images)
    assert np.abs(out - images).max() > 1.0
    assert out.min() >= 0 and out.max() <= 255
    drawn = augment.last_draws
    assert np.all(np.abs(drawn.alpha - 1) <= 0.3) and np.all(np.abs(drawn.beta) <= 0.1)


def test_hed_needs_three_channels():
    with pytest.raises(ValueError, match=r"hed stain jitter needs 3-channel RGB/BGR images, got C=4"):
        BatchAugmenter(hed=True)(np.zeros((2, 4, 5, 5), np.float32))


# --- reference implementation, reproducibility, identity -----------------------------------


@FAST
@given(shape=shapes, seed=seeds, config=st.sampled_from(
    [GEOMETRY, EVERYTHING, dict(color=True, color_p=0.5), dict(hed=True, channel_order="BGR", hed_beta=0.2),
     dict(rotate_any=True, angle_min=-20, angle_max=45)]))
def test_matches_naive_reference_given_same_draws(shape, seed, config):
    n, height, width = shape
    images, labels = make_batch(seed, n, 3, height, width)
    fast_images, fast_labels = BatchAugmenter(seed=seed, **config)(images, labels)
    naive_images, naive_labels = naive_augment(images, labels, config, np.random.default_rng(seed))
    np.testing.assert_allclose(fast_images, naive_images, atol=2e-3, rtol=1e-5)
    np.testing.assert_array_equal(fast_labels, naive_labels)


def test_explicit_draws_are_applied_by_both_implementations():
    images, labels = make_batch(9, 6, 3, 10, 10)
    draws = draw_augmentation(6, (3, 10, 10), np.random.default_rng(9), EVERYTHING)
    augment = BatchAugmenter(**EVERYTHING)
    fast_images, fast_labels = augment(images, labels, draws=draws)
    assert augment.last_draws is draws
    naive_images, naive_labels = naive_augment(images, labels, EVERYTHING, draws=draws)
    np.testing.assert_allclose(fast_images, naive_images, atol=2e-3)
    np.testing.assert_array_equal(fast_labels, naive_labels)


def test_same_seed_same_output_different_seed_different():
    images, labels = make_batch(10, 8)
    first = BatchAugmenter(seed=123, **EVERYTHING)(images, labels)
    second = BatchAugmenter(seed=123, **EVERYTHING)(images, labels)
    other = BatchAugmenter(seed=124, **EVERYTHING)(images, labels)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0], other[0])


def test_successive_batches_differ_and_unseeded_augmenters_differ():
    images, _ = make_batch(11, 8)
    augment = BatchAugmenter(seed=0, color=True)
    assert not np.array_equal(augment(images)[0], augment(images)[0])
    assert not np.array_equal(BatchAugmenter(color=True)(images)[0], BatchAugmenter(color=True)(images)[0])


def test_enabling_one_transform_keeps_the_draws_of_another():
    shape = (3, 8, 8)
    colour_only = draw_augmentation(5, shape, np.random.default_rng(1), dict(color=True))
    with_flip = draw_augmentation(5, shape, np.random.default_rng(1), dict(color=True, flip=True))
    np.testing.assert_array_equal(colour_only.a, with_flip.a)


def test_identity_when_everything_off():
    images, labels = make_batch(12)
    augment = BatchAugmenter(**load_params("", AUGMENT_SCHEMA))
    out_images, out_labels = augment(images, labels)
    np.testing.assert_array_equal(out_images, images)
    np.testing.assert_array_equal(out_labels, labels)
    flipped, _ = BatchAugmenter(flip=True, seed=0)(images, labels)
    assert not np.array_equal(flipped, images)


TRANSFORM_SWITCHES = ("rotate", "flip", "color", "hed", "rotate_any")
switches = st.fixed_dictionaries({name: st.booleans() for name in TRANSFORM_SWITCHES})


@st.composite
def switched_batches(draw):
    """(config, images, labels): a random on/off configuration of every transform and a small
    batch for it -- N 1-4, C 1-3 (3 with hed), H and W in 4..16, square or not."""
    config = draw(switches)
    n = draw(st.integers(1, 4))
    channels = 3 if config["hed"] else draw(st.integers(1, 3))
    height = draw(st.integers(4, 16))
    width = height if draw(st.booleans()) else draw(st.integers(4, 16).filter(lambda w: w != height))
    images, labels = make_batch(draw(seeds), n, channels, height, width, draw(st.sampled_from([3, 4])))
    labels = labels * 37 + 3  # sparse label values: {3, 40, ..., 188}
    return config, images, labels


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=seeds, batch=switched_batches())
def test_same_seed_reproducible_for_any_configuration_and_shape(seed, batch):
    config, images, labels = batch
    first, second = BatchAugmenter(seed=seed, **config), BatchAugmenter(seed=seed, **config)
    for _ in range(2):  # the two random streams stay in step over successive batches
        first_images, first_labels = first(images, labels)
        second_images, second_labels = second(images, labels)
        np.testing.assert_array_equal(first_images, second_images)
        np.testing.assert_array_equal(first_labels, second_labels)
        for name, value in first.last_draws.as_dict().items():
            np.testing.assert_array_equal(value, getattr(second.last_draws, name), err_msg=name)
    assert first_images.shape == images.shape and first_labels.shape == labels.shape
    if images.shape[-2] != images.shape[-1]:
        assert set(first.last_draws.k) <= {0, 2}  # non-square: half turns only


finite_or_not = st.floats(width=32, allow_nan=True, allow_infinity=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images=hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 9),
                                                st.integers(1, 9)), elements=finite_or_not),
       label_ndim=st.sampled_from([3, 4]), seed=seeds, in_place=st.booleans(),
       extra=st.fixed_dictionaries({}, optional={"clip_min": st.floats(0, 10), "clip_max": st.floats(10, 20),
                                                 "color_a_min": st.floats(0.1, 0.5), "hed_p": st.floats(0, 1)}))
def test_everything_off_is_exact_identity_for_any_batch(images, label_ndim, seed, in_place, extra):
    """All transforms off: bit-for-bit the input, even outside the clip range, NaN and inf
    included, whatever the other (unused) parameters."""
    n, _, height, width = images.shape
    rng = np.random.default_rng(seed)
    labels = rng.integers(-2**31, 2**31 - 1, (n, height, width) if label_ndim == 3 else (n, 1, height, width))
    augment = BatchAugmenter(seed=seed, **dict.fromkeys(TRANSFORM_SWITCHES, False), **extra)
    if in_place:
        out_images, out_labels = images.copy(), labels.copy()
        augment.augment_into(out_images, out_labels, out_images, out_labels)
    else:
        out_images, out_labels = augment(images, labels)
    assert out_images.dtype == np.float32 and out_labels.dtype == labels.dtype
    np.testing.assert_array_equal(out_images.view(np.uint32), images.view(np.uint32))  # also -0.0, NaN bits
    np.testing.assert_array_equal(out_labels, labels)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=seeds, batch=switched_batches(), label_dtype=st.sampled_from([np.int32, np.uint8, np.float32]))
def test_labels_keep_their_values_under_any_configuration(seed, batch, label_dtype):
    config, images, labels = batch
    labels = labels.astype(label_dtype)
    augment = BatchAugmenter(seed=seed, **config)
    _, out_labels = augment(images, labels)
    assert out_labels.dtype == labels.dtype and out_labels.shape == labels.shape
    assert set(np.unique(out_labels)) <= set(np.unique(labels))
    for i in range(len(labels)):
        if config["rotate_any"]:  # nearest-neighbour sampling: no new values, some may drop out
            assert set(np.unique(out_labels[i])) <= set(np.unique(labels[i]))
        else:  # flips and quarter turns permute the pixels; colour and stain never touch labels
            np.testing.assert_array_equal(np.sort(out_labels[i], axis=None), np.sort(labels[i], axis=None))


@FAST
@given(seed=seeds, label_ndim=st.sampled_from([3, 4]))
def test_inputs_not_modified(seed, label_ndim):
    images, labels = make_batch(seed, label_ndim=label_ndim)
    images_before, labels_before = images.copy(), labels.copy()
    BatchAugmenter(seed=seed, **EVERYTHING)(images, labels)
    np.testing.assert_array_equal(images, images_before)
    np.testing.assert_array_equal(labels, labels_before)


def test_float64_and_uint8_inputs_give_float32():
    images, labels = make_batch(13)
    for dtype in (np.float64, np.uint8):
        out, _ = BatchAugmenter(seed=0, **GEOMETRY)(images.astype(dtype), labels)
        assert out.dtype == np.float32


# --- writing into preallocated outputs (Caffe top blobs) -----------------------------------


def test_augment_into_preallocated_outputs_matches_call():
    images, labels = make_batch(14, 6)
    expected_images, expected_labels = BatchAugmenter(seed=14, **EVERYTHING)(images, labels)
    images_out = np.empty_like(images)
    labels_out = np.empty(labels.shape, np.float32)  # Caffe label blobs are float32
    draws = BatchAugmenter(seed=14, **EVERYTHING).augment_into(images, labels, images_out, labels_out)
    assert isinstance(draws, AugmentDraws) and len(draws) == 6
    np.testing.assert_array_equal(images_out, expected_images)
    np.testing.assert_array_equal(labels_out, expected_labels.astype(np.float32))


@pytest.mark.parametrize("config", [GEOMETRY, EVERYTHING, dict(rotate_any=True), dict(hed=True, flip=True)])
def test_in_place_augmentation_matches_out_of_place(config):
    images, labels = make_batch(15, 6)
    expected_images, expected_labels = BatchAugmenter(seed=15, **config)(images, labels)
    BatchAugmenter(seed=15, **config).augment_into(images, labels, images, labels)
    np.testing.assert_allclose(images, expected_images, atol=1e-4)
    np.testing.assert_array_equal(labels, expected_labels)


def test_augment_into_without_labels():
    """Images alone get exactly the images of an image+label call with the same seed."""
    images, labels = make_batch(16)
    out = np.empty_like(images)
    draws = BatchAugmenter(seed=0, **GEOMETRY).augment_into(images, None, out, None)
    with_labels, _ = BatchAugmenter(seed=0, **GEOMETRY)(images, labels)
    np.testing.assert_array_equal(out, with_labels)
    assert np.asarray(draws.k).any() or np.asarray(draws.flip_h).any()  # something was done
    assert not np.array_equal(out, images)


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images_shape, labels_shape, pattern",
    [
        ((3, 12, 12), None, r"images must be a 4-D N×C×H×W array, got shape \(3, 12, 12\)"),
        ((2, 3, 12, 12), (2, 2, 12, 12), r"labels must be N×1×H×W or N×H×W, got shape \(2, 2, 12, 12\)"),
        ((2, 3, 12, 12), (12, 12), r"labels must be N×1×H×W or N×H×W"),
        ((2, 3, 12, 12), (3, 1, 12, 12), r"different batch sizes: images \(2, 3, 12, 12\), labels \(3, 1, 12, 12\)"),
        ((2, 3, 12, 12), (2, 12, 11), r"different H×W: images \(2, 3, 12, 12\), labels \(2, 12, 11\)"),
    ],
)
def test_bad_shapes(images_shape, labels_shape, pattern):
    images = np.zeros(images_shape, np.float32)
    labels = None if labels_shape is None else np.zeros(labels_shape, np.int32)
    with pytest.raises(ValueError, match=pattern):
        BatchAugmenter(**GEOMETRY)(images, labels)


def test_bad_outputs():
    images, labels = make_batch(17)
    augment = BatchAugmenter(**GEOMETRY)
    with pytest.raises(ValueError, match=r"images_out must have shape \(4, 3, 12, 12\), got \(4, 3, 12, 11\)"):
        augment.augment_into(images, labels, np.empty((4, 3, 12, 11), np.float32), np.empty_like(labels))
    with pytest.raises(ValueError, match="images_out must have a floating dtype"):
        augment.augment_into(images, labels, np.empty(images.shape, np.uint8), np.empty_like(labels))
    with pytest.raises(ValueError, match="labels and labels_out must be given together"):
        augment.augment_into(images, labels, np.empty_like(images), None)
    with pytest.raises(ValueError, match="images must have a real numeric dtype"):
        augment(images.astype(np.complex64))


def test_bad_parameters_raise_param_error_naming_where():
    with pytest.raises(ParamError, match=r"unknown key 'colour' in BatchAugmenter; did you mean 'color'\?"):
        BatchAugmenter(colour=True)
    with pytest.raises(ParamError, match=r"color_a_min=2\.0 > color_a_max=1\.1"):
        BatchAugmenter(color_a_min=2.0)
    with pytest.raises(ParamError, match=r"AugmentationLayer param_str.*rotate=1"):
        BatchAugmenter(where="AugmentationLayer param_str", **parse_param_str('{"rotate": 1}'))


def test_param_str_and_dict_give_the_same_augmenter():
    from_text = BatchAugmenter(**load_params('{"rotate": True, "color": True, "color_a_max":1.5, "color_a_min": .3}',
                                             AUGMENT_SCHEMA))
    from_dict = BatchAugmenter(rotate=True, color=True, color_a_max=1.5, color_a_min=0.3)
    assert dict(from_text.params) == dict(from_dict.params) == AUGMENT_SCHEMA.validate(
        {"rotate": True, "color": True, "color_a_max": 1.5, "color_a_min": 0.3})
    with pytest.raises(TypeError):
        from_text.params["rotate"] = False  # read-only


@pytest.mark.parametrize("layout", ["contiguous", "strided", "float64"])
@pytest.mark.parametrize("low, high", [(0.0, 255.0), (5.0, 200.5), (-10.0, 10.0)])
def test_in_place_colour_helpers_match_numpy(layout, low, high):
    """The OpenCV fast paths and their numpy fallbacks give numpy's values exactly."""
    from caffe_layers.transforms.functional import clip_in_place, scale_shift_in_place

    base = np.random.default_rng(5).uniform(-50, 300, (3, 20, 24)).astype(np.float32)
    if layout == "float64":
        base = base.astype(np.float64)
    planes = base.copy()
    views = planes[:, :, ::2] if layout == "strided" else planes
    expected = np.clip(views, low, high)
    clip_in_place(views, low, high)
    np.testing.assert_array_equal(views, expected)

    a, b = np.float32(1.2345), np.float32(-3.21)
    planes = base.copy()
    plane = planes[1, :, ::2] if layout == "strided" else planes[1]
    expected = (plane.astype(np.float64) * float(a) + float(b)).astype(plane.dtype)
    scale_shift_in_place(plane, a, b)
    np.testing.assert_array_equal(plane, expected)
    np.testing.assert_array_equal(planes[0], base[0])  # only that plane is touched


@pytest.mark.parametrize("shape", [(37, 53), (1, 7), (9, 64), (5, 13)])
def test_scale_shift_is_exact_for_any_plane_size(shape):
    """Planes whose size is no multiple of OpenCV's SIMD block: OpenCV 4.x computes the last
    elements in float32; they must still get the double-precision value, once rounded."""
    from caffe_layers.transforms.functional import scale_shift_in_place

    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    for _ in range(20):
        plane = rng.uniform(-20, 300, shape).astype(np.float32)
        a, b = np.float32(rng.uniform(0.3, 1.7)), np.float32(rng.uniform(-20, 20))
        expected = (plane.astype(np.float64) * float(a) + float(b)).astype(np.float32)
        scale_shift_in_place(plane, a, b)
        np.testing.assert_array_equal(plane, expected)


@pytest.mark.parametrize("switch", ["hed", "rotate_any", "color"])
def test_non_finite_pixels_are_refused_when_values_are_mixed(switch):
    images, labels = make_batch(3)
    images = images.astype(np.float32)
    images[1, 0, 2, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite values \(first in sample 1 of the batch\)"):
        BatchAugmenter(seed=0, **{switch: True})(images, labels)
    images[1, 0, 2, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        BatchAugmenter(seed=0, **{switch: True})(images, labels)
    # Flips and turns only move values: a NaN stays one NaN in its own sample.
    moved, _ = BatchAugmenter(seed=0, flip=True, rotate=True)(images, labels)
    assert np.isinf(moved[1]).sum() == 1 and np.isfinite(np.delete(moved, 1, axis=0)).all()
