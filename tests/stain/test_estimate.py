"""caffe_layers.stain.estimate: channel-mean ratios, concentration means and the suggested ranges."""
import ast

import numpy as np
import pytest

from caffe_layers import stain

from he_images import examples, hgsc, target, synthetic_he, white  # noqa: F401 - fixtures


def test_channel_mean_ratios_equal_direct_numpy(hgsc, target):
    ratios = stain.channel_mean_ratios(hgsc, target)
    np.testing.assert_allclose(ratios, hgsc.mean((0, 1)) / target.mean((0, 1)))
    masked = stain.channel_mean_ratios(hgsc, target, ignore_white=True)
    image_tissue, target_tissue = stain.tissue_mask(hgsc), stain.tissue_mask(target)
    np.testing.assert_allclose(masked, hgsc[image_tissue].mean(0) / target[target_tissue].mean(0))


def test_channel_mean_ratios_errors():
    image = synthetic_he(0)
    zero_red = image.copy()
    zero_red[..., 0] = 0
    with pytest.raises(ValueError, match="reference has zero mean in channel 0"):
        stain.channel_mean_ratios(image, zero_red)
    with pytest.raises(ValueError, match="reference has no tissue"):
        stain.channel_mean_ratios(image, white(), ignore_white=True)
    with pytest.raises(ValueError, match="image has no tissue"):
        stain.channel_mean_ratios(image, image, mask=np.zeros(image.shape[:2], bool))


def test_suggest_color_params_covers_both_directions():
    train = {"a": synthetic_he(1), "b": synthetic_he(2, tint=(1.05, 1.0, 0.97))}
    test = [synthetic_he(3, tint=(0.8, 1.2, 1.0))]
    estimate = stain.suggest_color_params(train, test, margin=0.1)
    assert set(estimate.ratios) == {"test:0", "train:a", "train:b"}
    ratios = np.concatenate(list(estimate.ratios.values()))
    both = np.concatenate([ratios, 1 / ratios])
    params = estimate.params
    assert params["color"] is True
    assert params["color_a_min"] <= both.min() * 0.9 + 1e-12
    assert params["color_a_max"] >= both.max() * 1.1 - 1e-12
    assert params["color_a_max"] - both.max() * 1.1 < 0.011  # rounded, not inflated
    assert ast.literal_eval(estimate.param_str) == params
    # Ratio of the test image against the mean train statistics, computed directly.
    train_means = np.mean([img[stain.tissue_mask(img)].mean(0) for img in train.values()], axis=0)
    direct = test[0][stain.tissue_mask(test[0])].mean(0) / train_means
    np.testing.assert_allclose(estimate.ratios["test:0"], direct)


def test_suggest_color_params_offset_and_errors():
    estimate = stain.suggest_color_params([synthetic_he(1)], [synthetic_he(2, tint=(0.9, 1, 1))],
                                          include_offset=True)
    assert estimate.params["color_b_min"] == -estimate.params["color_b_max"] < 0
    with pytest.raises(ValueError, match="margin"):
        stain.suggest_color_params([synthetic_he(1)], [synthetic_he(2)], margin=-1)
    with pytest.raises(ValueError, match="test_images is empty"):
        stain.suggest_color_params([synthetic_he(1)], [])
    with pytest.raises(ValueError, match="train image '0' has no tissue"):
        stain.suggest_color_params([white()], [synthetic_he(2)])


def test_stain_concentration_means_is_tissue_mean_of_od_times_hed_from_rgb(hgsc):
    from skimage.color import hed_from_rgb

    image = hgsc[::4, ::4]
    tissue = stain.tissue_mask(image)
    od = -np.log((image[tissue].astype(np.float64) + 1) / 256)
    np.testing.assert_allclose(stain.stain_concentration_means(image), (od @ hed_from_rgb).mean(0),
                               rtol=1e-4)


def test_suggest_hed_params_recovers_a_known_stain_shift(hgsc):
    from caffe_layers.stain import shift_stains

    train, test = hgsc[:600:2, ::2], hgsc[900::2, ::2]
    shifted = shift_stains(test, (1.3, 0.8, 1.0))
    estimate = stain.suggest_hed_params({"train": train}, {"shifted": shifted}, margin=0.1)
    unshifted = stain.suggest_hed_params({"train": train}, {"same": test}, margin=0.1)
    # Concentrations are linear in the shift: the ratios move by alpha (up to uint8 rounding).
    np.testing.assert_allclose(estimate.ratios["test:shifted"][:2] / unshifted.ratios["test:same"][:2],
                               (1.3, 0.8), rtol=0.03)
    largest = np.abs(1 - estimate.ratios["test:shifted"][:2]).max()
    assert largest * 1.1 <= estimate.params["hed_alpha"] <= largest * 1.1 + 0.01
    assert estimate.params["hed"] is True
    from caffe_layers.params import AUGMENT_SCHEMA, load_params
    assert load_params(estimate.param_str, AUGMENT_SCHEMA, "test")["hed_alpha"] == estimate.params["hed_alpha"]


def test_suggest_hed_params_caps_alpha_and_rejects_blank_images(hgsc):
    from caffe_layers.stain import shift_stains

    train = hgsc[:600:4, ::4]
    estimate = stain.suggest_hed_params([train], [shift_stains(train, (3.0, 3.0, 1.0))])
    assert estimate.params["hed_alpha"] == 0.95  # a stain is never scaled down to nothing
    with pytest.raises(ValueError, match="no tissue"):
        stain.suggest_hed_params([white()], [train])
    # All pixels of a blank or grey image: no stain to take a ratio of (it gave ratios of 1e7).
    grey = np.full((32, 32, 3), 250, np.uint8)
    for blank in (white(), grey):
        with pytest.raises(ValueError, match=r"train image '0' has \(almost\) no (haematoxylin|eosin)"):
            stain.suggest_hed_params([blank], [train], ignore_white=False)
        with pytest.raises(ValueError, match=r"test image '0' has \(almost\) no (haematoxylin|eosin)"):
            stain.suggest_hed_params([train], [blank], ignore_white=False)
