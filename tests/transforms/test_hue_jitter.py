"""The hue jitter (``stain_angle``): turned H and E vectors, fused with the concentration jitter."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from caffe_layers.params import AUGMENT_SCHEMA, ParamError, load_params
from caffe_layers.stain import shift_stains
from caffe_layers.stain.optical_density import (HE_PLANE_NORMAL, HED_FROM_RGB, RGB_FROM_HED, StainAffine,
                                                intensity, optical_density, rotated_stain_matrix, stain_transform)
from caffe_layers.transforms import AugmentDraws, BatchAugmenter, draw_augmentation

from naive_reference import naive_augment

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HUE = dict(hed=True, stain_angle=12.0, hed_alpha=0.2, hed_beta=0.05)
seeds = st.integers(0, 2**32 - 1)


def batch(seed, n=4, height=10, width=10):
    return np.random.default_rng(seed).uniform(0, 255, (n, 3, height, width)).astype(np.float32)


def angle_between(first, second):
    cosine = first @ second / (np.linalg.norm(first) * np.linalg.norm(second))
    return np.degrees(np.arccos(np.clip(cosine, -1, 1)))


# --- the turned stain matrix -------------------------------------------------------------------


@pytest.mark.parametrize("angles", [(3.0, 0.0), (0.0, -7.5), (10.0, 20.0), (-30.0, 30.0)])
def test_rotated_stain_matrix_turns_each_vector_in_the_he_plane(angles):
    turned = rotated_stain_matrix(angles)
    for stain, angle in enumerate(angles):
        assert angle_between(turned[stain], RGB_FROM_HED[stain]) == pytest.approx(abs(angle), abs=1e-6)  # arccos near 1
        assert np.linalg.norm(turned[stain]) == pytest.approx(np.linalg.norm(RGB_FROM_HED[stain]))
        assert turned[stain] @ HE_PLANE_NORMAL == pytest.approx(0.0, abs=1e-12)  # stays in the plane
        explicit = Rotation.from_rotvec(np.deg2rad(angle) * HE_PLANE_NORMAL).apply(RGB_FROM_HED[stain])
        np.testing.assert_allclose(turned[stain], explicit, atol=1e-12)
    np.testing.assert_array_equal(turned[2], RGB_FROM_HED[2])  # DAB untouched
    # Positive angles turn haematoxylin towards eosin.
    if angles[0] > 0:
        assert angle_between(turned[0], RGB_FROM_HED[1]) < angle_between(RGB_FROM_HED[0], RGB_FROM_HED[1])


def test_zero_angles_give_the_stain_matrix_exactly():
    assert rotated_stain_matrix(None) is RGB_FROM_HED
    assert rotated_stain_matrix((0.0, 0.0)) is RGB_FROM_HED
    transform, shift = stain_transform((1.2, 0.8, 1.0), (0.01, 0.0, 0.0), (0.0, 0.0))
    np.testing.assert_array_equal(transform, HED_FROM_RGB @ np.diag((1.2, 0.8, 1.0)) @ RGB_FROM_HED)


@FAST
@given(alpha=st.tuples(*[st.floats(0.5, 1.5)] * 3), beta=st.tuples(*[st.floats(-0.05, 0.05)] * 3),
       angles=st.tuples(st.floats(-30, 30), st.floats(-30, 30)), seed=seeds)
def test_fused_matrix_equals_the_explicit_round_trip(alpha, beta, angles, seed):
    """T and t of StainAffine (derived in its docstring) against unmix -> jitter -> turned re-mix."""
    pixels = np.random.default_rng(seed).uniform(0, 255, (50, 3))
    concentrations = optical_density(pixels, 255.0, np.float64) @ HED_FROM_RGB
    explicit = intensity((concentrations * alpha + beta) @ rotated_stain_matrix(angles), 255.0)
    transform, shift = stain_transform(alpha, beta, angles, 255.0)
    fused = np.clip(np.expm1(np.log1p(pixels) @ transform + shift), 0, 255)
    np.testing.assert_allclose(fused, explicit, atol=1e-8)


def test_a_pure_eosin_image_turns_by_the_drawn_angle():
    """A pixel of eosin alone, turned by 9° (towards H: away from H its red absorbance would go
    negative and the red channel clip at white), has its optical density turned by 9° too."""
    concentrations = np.zeros((1, 4, 3))
    concentrations[..., 1] = np.linspace(0.2, 0.8, 4)
    image = intensity(concentrations @ RGB_FROM_HED, 255.0).transpose(2, 0, 1)[None].astype(np.float32)
    draws = draw_augmentation(1, (3, 1, 4), np.random.default_rng(0), dict(hed=True, hed_alpha=0, hed_beta=0))
    draws = AugmentDraws(**dict(draws.as_dict(), stain_rotation=np.array([[0.0, -9.0]])))
    out, _ = BatchAugmenter(hed=True)(image, draws=draws)
    od = optical_density(out[0].reshape(3, -1).T.astype(np.float64), 255.0, np.float64)
    for pixel in od:
        assert angle_between(pixel, RGB_FROM_HED[1]) == pytest.approx(9.0, abs=0.05)
        assert angle_between(pixel, rotated_stain_matrix((0.0, -9.0))[1]) < 0.05


# --- draws ----------------------------------------------------------------------------------


def legacy_draws(n, channels, seed, p):
    """The draws as draw_augmentation made them before stain_angle existed (same calls, same order)."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, 4, n)
    flip_h, flip_v = rng.random(n) < 0.5, rng.random(n) < 0.5
    angle = rng.uniform(p["angle_min"], p["angle_max"], n)
    hed_applied = rng.random(n) < p["hed_p"]
    alpha = rng.uniform(1.0 - p["hed_alpha"], 1.0 + p["hed_alpha"], (n, 3))
    beta = rng.uniform(-p["hed_beta"], p["hed_beta"], (n, 3))
    color_applied = rng.random(n) < p["color_p"]
    a = rng.uniform(p["color_a_min"], p["color_a_max"], (n, channels))
    b = rng.uniform(p["color_b_min"], p["color_b_max"], (n, channels))
    return dict(k=k, flip_h=flip_h, flip_v=flip_v, angle=angle, hed_applied=hed_applied, alpha=alpha, beta=beta,
                color_applied=color_applied, a=a, b=b)


@FAST
@given(seed=seeds, n=st.integers(1, 6), stain_angle=st.sampled_from([0.0, 5.0, 30.0]))
def test_existing_draws_of_a_batch_are_those_of_before(seed, n, stain_angle):
    config = dict(rotate=True, flip=True, rotate_any=True, color=True, hed=True, hed_p=1.0, stain_angle=stain_angle)
    p = AUGMENT_SCHEMA.validate(config)
    draws = draw_augmentation(n, (3, 8, 8), np.random.default_rng(seed), config)
    for name, value in legacy_draws(n, 3, seed, p).items():
        np.testing.assert_array_equal(getattr(draws, name), value, err_msg=name)


def test_stain_angle_on_or_off_keeps_every_other_draw_over_successive_batches():
    shape, images = (3, 8, 8), batch(1, n=5, height=8, width=8)
    plain = BatchAugmenter(seed=7, **dict(HUE, stain_angle=0.0, color=True, rotate=True))
    hue = BatchAugmenter(seed=7, **dict(HUE, color=True, rotate=True))
    for _ in range(3):
        plain(images), hue(images)
        for name, value in plain.last_draws.as_dict().items():
            if name != "stain_rotation":
                np.testing.assert_array_equal(value, getattr(hue.last_draws, name), err_msg=name)
        assert not plain.last_draws.stain_rotation.any()
        assert hue.last_draws.stain_rotation.any()
    assert draw_augmentation(2, shape, np.random.default_rng(0), dict(stain_angle=10.0)).stain_rotation.shape == (2, 2)


def test_angles_lie_in_range_and_are_zero_without_the_stain_jitter():
    rng = np.random.default_rng(3)
    draws = draw_augmentation(400, (3, 4, 4), rng, dict(hed=True, hed_p=0.5, stain_angle=6.0))
    rotation = draws.stain_rotation
    assert np.abs(rotation).max() <= 6.0 and np.abs(rotation).max() > 5.5
    assert not rotation[~draws.hed_applied].any() and rotation[draws.hed_applied].all()
    off = draw_augmentation(10, (3, 4, 4), rng, dict(hed=False, stain_angle=6.0))
    assert not off.stain_rotation.any()


def test_zero_angles_change_nothing_bit_for_bit():
    images = batch(2)
    draws = draw_augmentation(4, (3, 10, 10), np.random.default_rng(2), dict(hed=True, hed_alpha=0.3))
    assert not draws.stain_rotation.any()
    with_zeros, _ = BatchAugmenter(hed=True)(images, draws=draws)
    without, _ = BatchAugmenter(hed=True)(images, draws=AugmentDraws(**dict(draws.as_dict(), stain_rotation=None)))
    np.testing.assert_array_equal(with_zeros, without)


def test_explicit_draws_with_a_wrong_rotation_shape_are_refused():
    images = batch(3)
    draws = draw_augmentation(4, (3, 10, 10), np.random.default_rng(0), HUE)
    bad = AugmentDraws(**dict(draws.as_dict(), stain_rotation=np.zeros((4, 3))))
    with pytest.raises(ValueError, match=r"stain_rotation must have shape \(4, 2\)"):
        BatchAugmenter(**HUE)(images, draws=bad)


# --- the fast path against the oracle -------------------------------------------------------


@FAST
@given(seed=seeds, n=st.integers(1, 4), size=st.integers(1, 12), order=st.sampled_from(["RGB", "BGR"]),
       extra=st.sampled_from([{}, dict(rotate=True, flip=True, color=True), dict(rotate_any=True, hed_p=0.6)]))
def test_fast_path_matches_the_explicit_oracle(seed, n, size, order, extra):
    config = dict(HUE, channel_order=order, **extra)
    images = batch(seed, n, size, size)
    labels = np.zeros((n, 1, size, size), np.int32)
    fast, _ = BatchAugmenter(seed=seed, **config)(images, labels)
    slow, _ = naive_augment(images, labels, config, np.random.default_rng(seed))
    np.testing.assert_allclose(fast, slow, atol=2e-3, rtol=1e-5)


def test_the_oracle_really_turns_the_vectors():
    """Guard against an oracle that ignores the angles: 20° changes stained pixels visibly."""
    images = batch(5)
    config = dict(hed=True, hed_alpha=0.0, hed_beta=0.0, stain_angle=20.0)
    turned, _ = naive_augment(images, None, config, np.random.default_rng(5))
    plain, _ = naive_augment(images, None, dict(config, stain_angle=0.0), np.random.default_rng(5))
    assert np.abs(turned - plain).max() > 5


def test_shift_stains_takes_fixed_angles_like_the_layer():
    rgb = np.random.default_rng(4).integers(30, 230, (6, 7, 3)).astype(np.uint8)
    shifted = shift_stains(rgb, (1.1, 0.9, 1.0), (0.0, 0.02, 0.0), rotation=(5.0, -4.0))
    planes = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
    StainAffine(255.0, "RGB", rgb.shape[:2])(planes, planes, np.array([1.1, 0.9, 1.0]), np.array([0.0, 0.02, 0.0]),
                                              np.array([5.0, -4.0]))
    np.testing.assert_array_equal(shifted, np.clip(np.rint(planes.transpose(1, 2, 0)), 0, 255).astype(np.uint8))
    assert not np.array_equal(shifted, shift_stains(rgb, (1.1, 0.9, 1.0), (0.0, 0.02, 0.0)))


# --- the parameter --------------------------------------------------------------------------


def test_stain_angle_is_validated_with_its_key_and_range():
    assert load_params("", AUGMENT_SCHEMA)["stain_angle"] == 0.0
    assert load_params('{"hed": True, "stain_angle": 7.5}', AUGMENT_SCHEMA)["stain_angle"] == 7.5
    for bad in (-1, 31, "5", float("nan")):
        with pytest.raises(ParamError, match="stain_angle"):
            BatchAugmenter(stain_angle=bad)
