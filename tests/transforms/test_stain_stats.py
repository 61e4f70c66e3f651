"""The stain-statistics mode (``stain_stats``) and the colour gate ``p`` of BatchAugmenter."""
import warnings

import numpy as np
import pytest

from caffe_layers.param_str import ParamError
from caffe_layers.stain.statistics import StainStatisticsTransfer, fit_stain_statistics
from caffe_layers.stain.tissue import NoTissueWarning
from caffe_layers.transforms import BatchAugmenter, draw_augmentation
from caffe_layers.transforms.schema import AUGMENT_SCHEMA

from he_images import hgsc  # noqa: F401 - fixture

COLOUR = dict(color=True, color_a_min=0.8, color_a_max=1.2, hed=True, hed_alpha=0.1, hed_beta=0.02)


@pytest.fixture(scope="module")
def batch(hgsc):
    """Twelve 96×96 H&E patches (some with glass), 0-255 float32, and label maps."""
    tiles = [hgsc[y:y + 96, x:x + 96] for y in (0, 400, 800, 1300) for x in (0, 650, 1400)]
    images = np.stack([np.moveaxis(tile, -1, 0) for tile in tiles]).astype(np.float32)
    labels = (images[:, :1] < 120).astype(np.int32) + (images[:, 1:2] > 200)
    return images, labels


@pytest.fixture(scope="module", params=["lab", "hed"])
def stats(request, hgsc):
    tiles = [hgsc[y:y + 200, x:x + 200] for y in (100, 700, 1250) for x in (100, 800, 1250)]
    # spread 0.5: draws within a few sds, whose colours stay (mostly) inside [0, 255] unclipped
    return fit_stain_statistics(tiles, space=request.param, spread=0.5)


def measured(images, stats, masks):
    transfer = StainStatisticsTransfer(stats["space"])
    return np.array([transfer.statistics(image, mask)[:2] for image, mask in zip(images, masks)])


def tissue_masks(images):
    transfer = StainStatisticsTransfer("lab")
    return [transfer.tissue(transfer._interleaved(image, clip=True)[1]).copy() for image in images]


def test_statistics_reach_the_drawn_targets_and_labels_are_untouched(batch, stats):
    images, labels = batch
    augment = BatchAugmenter(stain_stats=stats, seed=1)
    out, out_labels = augment(images, labels)
    draws = augment.last_draws
    assert draws.stats_applied.all()
    masks = tissue_masks(images)  # no geometry: the input's tissue is the output's
    moved = measured(out, stats, masks)
    # A colour pushed beyond [0, 255] is clipped; even 0.3 % of such pixels (extreme concentrations)
    # move a std by 10 %. Samples whose tissue has no clipped pixel must hit the target exactly;
    # every sample's means must be close.
    clipped = np.array([((out[i] <= 0) | (out[i] >= 255)).any(axis=0)[mask].any() for i, mask in enumerate(masks)])
    exact = ~clipped
    assert exact.sum() >= 3
    tolerance, loose = (0.3, 1.5) if stats["space"] == "lab" else (0.005, 0.08)
    np.testing.assert_allclose(moved[exact, 0], draws.target_mean[exact], atol=tolerance)
    np.testing.assert_allclose(moved[exact, 1], draws.target_std[exact], atol=tolerance)
    np.testing.assert_allclose(moved[:, 0], draws.target_mean, atol=loose)
    np.testing.assert_array_equal(out_labels, labels)
    assert np.abs(out - images).mean() > 1


def test_with_geometry_the_label_gets_the_geometry_only(batch, stats):
    images, labels = batch
    _, geometry_labels = BatchAugmenter(rotate=True, flip=True, seed=5)(images, labels)
    out, out_labels = BatchAugmenter(rotate=True, flip=True, stain_stats=stats, **COLOUR, seed=5)(images, labels)
    np.testing.assert_array_equal(out_labels, geometry_labels)
    assert out.min() >= 0 and out.max() <= 255


def test_seeded_draws_and_results_are_deterministic(batch, stats):
    images, labels = batch
    params = dict(rotate=True, flip=True, stain_stats=stats, p=0.8, seed=11)
    first, second = BatchAugmenter(**params), BatchAugmenter(**params)
    for _ in range(2):  # two batches in a row
        out_1, _ = first(images, labels)
        out_2, _ = second(images, labels)
        np.testing.assert_array_equal(out_1, out_2)
        for name, value in first.last_draws.as_dict().items():
            np.testing.assert_array_equal(value, getattr(second.last_draws, name))
    other, _ = BatchAugmenter(**dict(params, seed=12))(images, labels)
    assert not np.array_equal(other, first(images, labels)[0])


def test_new_draws_come_after_the_old_ones(stats):
    """A batch's geometry, colour and stain draws do not depend on stain_stats or p."""
    old = draw_augmentation(8, (3, 16, 16), np.random.default_rng(3), dict(rotate=True, flip=True, **COLOUR))
    new = draw_augmentation(8, (3, 16, 16), np.random.default_rng(3),
                            dict(rotate=True, flip=True, stain_stats=stats, **COLOUR))
    for name in ("k", "flip_h", "flip_v", "angle", "hed_applied", "alpha", "beta", "color_applied", "a", "b",
                 "stain_rotation"):
        np.testing.assert_array_equal(getattr(new, name), getattr(old, name))
    assert new.augmented.all() and new.stats_applied.all() and not old.stats_applied.any()


def test_p_zero_leaves_the_batch_unchanged(batch, stats):
    images, labels = batch
    augment = BatchAugmenter(stain_stats=stats, **COLOUR, p=0.0, seed=2)
    out, out_labels = augment(images, labels)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(out_labels, labels)
    draws = augment.last_draws
    assert not (draws.augmented.any() or draws.stats_applied.any() or draws.hed_applied.any()
                or draws.color_applied.any())


def test_p_gates_the_colour_part_per_sample_and_never_the_geometry(batch, stats):
    images, labels = batch
    augment = BatchAugmenter(rotate=True, flip=True, stain_stats=stats, **COLOUR, p=0.5, seed=4)
    out, out_labels = augment(images, labels)
    draws = augment.last_draws
    assert 0 < draws.augmented.sum() < len(images)
    for applied in (draws.stats_applied, draws.hed_applied, draws.color_applied):
        np.testing.assert_array_equal(applied, draws.augmented)
    # The same geometry alone, from a generator in the same state.
    geometry = BatchAugmenter(rotate=True, flip=True, seed=4)
    moved, moved_labels = geometry(images, labels)
    np.testing.assert_array_equal(draws.k, geometry.last_draws.k)
    np.testing.assert_array_equal(out_labels, moved_labels)
    for i in range(len(images)):
        if draws.augmented[i]:
            assert np.abs(out[i] - moved[i]).mean() > 1
        else:
            np.testing.assert_array_equal(out[i], moved[i])


def test_stain_stats_needs_rgb_and_intensities_up_to_max_value(batch, stats):
    images, labels = batch
    augment = BatchAugmenter(stain_stats=stats, seed=0)
    with pytest.raises(ValueError, match="3-channel"):
        augment(images[:, :1], labels)
    with pytest.raises(ValueError, match=r"\[0, max_value=255\].*\[0, 300\]"):
        augment(np.concatenate([images[:1], np.full_like(images[:1], 300.0)]), labels[:2])
    # Data in 0-1 with max_value 1 is fine, and gives the 0-255 result scaled.
    scaled = BatchAugmenter(stain_stats=stats, max_value=1.0, seed=0)(images / 255, labels)[0]
    np.testing.assert_allclose(scaled * 255, augment(images, labels)[0], atol=0.05)


def test_channel_order_bgr_gives_the_rgb_result_reversed(batch, stats):
    images, labels = batch
    rgb, _ = BatchAugmenter(stain_stats=stats, seed=6)(images, labels)
    bgr, _ = BatchAugmenter(stain_stats=stats, channel_order="BGR", seed=6)(images[:, ::-1].copy(), labels)
    np.testing.assert_allclose(bgr[:, ::-1], rgb, atol=0.02)


def test_blank_samples_are_left_alone_with_one_warning(batch, stats):
    images, labels = batch
    images = images.copy()
    images[3] = 250.0
    augment = BatchAugmenter(stain_stats=stats, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = augment(images, labels)
    assert [str(w.message) for w in caught if issubclass(w.category, NoTissueWarning)] == [
        "stain_stats: samples with less than 5 % tissue (min_tissue) are left unchanged by the stain-statistics "
        "transfer"]
    np.testing.assert_array_equal(out[3], images[3])


def test_keys_are_validated_with_the_key_named(stats):
    with pytest.raises(ParamError, match="'p'") as info:
        BatchAugmenter(p=1.5)
    assert info.value.key == "p"
    bad = dict(stats, std=[[1.0, 0.1], [-1.0, 0.1], [1.0, 0.1]])
    with pytest.raises(ParamError) as info:
        BatchAugmenter(stain_stats=bad, where="AugmentationLayer param_str")
    assert info.value.key == "stain_stats.std[1][0]" and "AugmentationLayer param_str" in str(info.value)
    assert AUGMENT_SCHEMA.defaults()["p"] == 1.0 and AUGMENT_SCHEMA.defaults()["stain_stats"] is None
    assert "stain_stats" in repr(BatchAugmenter(stain_stats=stats, p=0.5))
