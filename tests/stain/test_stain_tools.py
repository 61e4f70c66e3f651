"""Vahadane, the fast paths of the normalisers and of histogram matching, the stain-angle
estimate, and the parallel folder normalisation."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from caffe_layers import sample_data, stain
from caffe_layers.cli import estimate as estimate_cli
from caffe_layers.cli import normalize as normalize_cli
from caffe_layers.params import AUGMENT_SCHEMA, load_params
from caffe_layers.stain import colours, histogram, normalizers
from caffe_layers.stain.normalizers import positive_lasso_2, sparse_stain_dictionary
from caffe_layers.stain.optical_density import beer_lambert_od, beer_lambert_rgb
from caffe_layers.stain.tissue import background_planes

from test_sample_data import load_or_skip


@pytest.fixture(scope="module")
def hgsc():
    return load_or_skip(sample_data.load_hgsc_nest)[0]


@pytest.fixture(scope="module")
def target():
    return load_or_skip(sample_data.load_stained_examples)["tiatoolbox_target"]


def white(shape=(40, 50)):
    return np.full((*shape, 3), 255, np.uint8)


def angle(first, second):
    cosine = first @ second / (np.linalg.norm(first) * np.linalg.norm(second))
    return math.degrees(math.acos(min(1.0, max(-1.0, float(cosine)))))


def _tissue_lab_mean(rgb):
    from skimage.color import rgb2lab

    return rgb2lab(rgb[stain.tissue_mask(rgb)][:, None, :])[:, 0].mean(0)


# --------------------------------------------------------------------------- #
# tissue masks and background planes
# --------------------------------------------------------------------------- #
def every_colour():
    codes = np.arange(1 << 24, dtype=np.uint32).reshape(4096, 4096)
    return np.stack([codes & 255, (codes >> 8) & 255, codes >> 16], axis=-1).astype(np.uint8)


def test_opencv_tissue_test_is_exact_for_every_colour_and_threshold():
    """The fixed-point cv2.transform path of tissue_mask equals R+G+B <= 3t for all 2**24 colours."""
    image = every_colour()
    grey_sum = image.astype(np.uint16).sum(axis=-1)
    for threshold in (0, 1 / 3, 100, 199.9, 200, 200.4, 254.9):
        expected = grey_sum <= 3 * threshold
        np.testing.assert_array_equal(stain.tissue_mask(image, threshold), expected, err_msg=str(threshold))
        planes = background_planes(image, threshold)
        assert planes.shape == image.shape
        np.testing.assert_array_equal(planes[..., 0] == 0, expected)
        np.testing.assert_array_equal(planes[..., 1], planes[..., 0])
        assert set(np.unique(planes)) <= {0, 255}
    strided = image[::7, ::5]  # not C-contiguous: the numpy path
    np.testing.assert_array_equal(stain.tissue_mask(strided), strided.astype(np.uint16).sum(-1) <= 600)
    assert not stain.tissue_mask(image[:2, :2], -1).any() and stain.tissue_mask(image[:2, :2], 300).all()


# --------------------------------------------------------------------------- #
# histogram matching: the OpenCV path against the numpy definitions
# --------------------------------------------------------------------------- #
def test_opencv_counts_and_luts_equal_numpy(hgsc):
    flat = np.ascontiguousarray(hgsc[:333, :301]).reshape(-1, 3)  # odd pixel count
    expected = np.stack([np.bincount(flat[:, c], minlength=256) for c in range(3)])
    np.testing.assert_array_equal(histogram._uint8_channel_counts(flat), expected)
    luts = np.random.default_rng(0).integers(0, 256, (3, 256)).astype(np.uint8)
    np.testing.assert_array_equal(histogram._apply_channel_luts(flat, luts), luts[np.arange(3), flat])


def test_pair_counting_of_huge_images_equals_calchist(hgsc, monkeypatch):
    flat = np.ascontiguousarray(hgsc[:101, :99]).reshape(-1, 3)
    exact = histogram._uint8_channel_counts(flat)
    monkeypatch.setattr(histogram, "_CALCHIST_MAX_PIXELS", 0)  # as for images of 2**24 pixels and more
    np.testing.assert_array_equal(histogram._uint8_channel_counts(flat), exact)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), height=st.integers(1, 40), width=st.integers(1, 40),
       white_fraction=st.floats(0.0, 0.9))
def test_ignore_white_equals_matching_the_tissue_pixels_alone(seed, height, width, white_fraction):
    """The background-planes path (subtract + copyTo) and the explicit-mask path agree with the
    definition: tissue matched as if gathered, background bit-identical."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
    image[rng.random((height, width)) < white_fraction] = 250
    reference = rng.integers(0, 230, (width + 2, height + 3, 3)).astype(np.uint8)
    tissue, reference_tissue = stain.tissue_mask(image), stain.tissue_mask(reference)
    if not tissue.any():
        return
    matched = stain.match_histograms(image, reference, ignore_white=True)
    np.testing.assert_array_equal(matched[~tissue], image[~tissue])
    expected = stain.match_histograms(image[tissue][None], reference[reference_tissue][None])
    np.testing.assert_array_equal(matched[tissue], expected[0])
    np.testing.assert_array_equal(
        stain.match_histograms(image, reference, mask=tissue, reference_mask=reference_tissue), matched)


# --------------------------------------------------------------------------- #
# colour tables and samples
# --------------------------------------------------------------------------- #
def test_map_colours_table_equals_per_pixel(hgsc):
    image = hgsc[:400, :500]

    def function(colour_array):
        return (255 - colour_array[:, ::-1]).astype(np.uint8)

    direct = colours.map_colours(image, function, table_min_pixels=10**9)
    table = colours.map_colours(image, function, table_min_pixels=0)
    np.testing.assert_array_equal(direct, table)
    np.testing.assert_array_equal(table, 255 - image[..., ::-1])
    with pytest.raises(ValueError, match="colour function must return"):
        colours.map_colours(image, lambda c: c[:, :2], table_min_pixels=0)


def test_sample_pixels_is_deterministic_uniform_and_keeps_small_selections_whole(hgsc):
    image = np.ascontiguousarray(hgsc)
    mask = stain.tissue_mask(image)
    first, count = colours.sample_pixels(image, mask, 20_000, seed=3)
    again, _ = colours.sample_pixels(image, mask, 20_000, seed=3)
    other, _ = colours.sample_pixels(image, mask, 20_000, seed=4)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert count == mask.sum() and 18_000 < len(first) < 22_000
    assert stain.tissue_mask(first[None]).all()  # only selected pixels
    np.testing.assert_allclose(first.mean(0), image[mask].mean(0), atol=1.5)  # a uniform sample
    small = np.zeros(image.shape[:2], bool)
    small[:3, :4] = True
    whole, count = colours.sample_pixels(image, small, 20_000)
    np.testing.assert_array_equal(whole, image[:3, :4].reshape(-1, 3))
    everything, count = colours.sample_pixels(image, None, None)
    assert count == image.shape[0] * image.shape[1] and len(everything) == count


# --------------------------------------------------------------------------- #
# Reinhard and Macenko: the fast paths against the definitions
# --------------------------------------------------------------------------- #
def test_reinhard_all_pixel_statistics_equal_the_definition(hgsc, target):
    """With sample_size=None, the per-colour Reinhard is the plain per-pixel computation."""
    image = hgsc[::2, ::2]
    normalizer = stain.ReinhardNormalizer(sample_size=None).fit(target)
    lab_target = normalizers._rgb_to_lab(target[stain.tissue_mask(target)])
    np.testing.assert_allclose(normalizer.template_means_, lab_target.mean(0))
    mask = stain.tissue_mask(image)
    lab = normalizers._rgb_to_lab(image[mask])
    restained = (lab - lab.mean(0)) * (lab_target.std(0) / lab.std(0)) + lab_target.mean(0)
    expected = image.copy()
    expected[mask] = np.clip(np.rint(normalizers._lab_to_rgb(restained) * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(normalizer.transform(image), expected)


def test_macenko_four_pass_transform_equals_the_definition(hgsc, target):
    image = np.ascontiguousarray(hgsc[::2, ::2])
    normalizer = stain.MacenkoNormalizer().fit(target)
    stains, max_conc = normalizer._analyse(image)
    od = beer_lambert_od(image).reshape(-1, 3).astype(np.float64)
    concentrations = od @ np.linalg.pinv(stains) * (normalizer.max_concentrations_ / max_conc)
    expected = beer_lambert_rgb(concentrations @ normalizer.stain_matrix_).reshape(image.shape)
    difference = np.abs(normalizer.transform(image).astype(int) - expected)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01  # float32 rounding only


def test_sampled_fits_are_deterministic_and_close_to_all_pixel_fits(hgsc, target):
    image = np.ascontiguousarray(np.tile(hgsc, (2, 1, 1)))  # 3000×1500: larger than the sample
    for name in ("ReinhardNormalizer", "MacenkoNormalizer", "VahadaneNormalizer"):
        cls = getattr(stain, name)
        first = cls().fit(target).transform(image)
        np.testing.assert_array_equal(first, cls().fit(target).transform(image), err_msg=name)
        exact = cls(sample_size=None).fit(target).transform(image)
        assert np.abs(first.astype(int) - exact).mean() < 1.0, name
    macenko, exact = stain.MacenkoNormalizer().fit(image), stain.MacenkoNormalizer(sample_size=None).fit(image)
    for row in range(2):
        assert angle(macenko.stain_matrix_[row], exact.stain_matrix_[row]) < 0.5


def test_sampling_parameters_are_checked():
    for cls in (stain.ReinhardNormalizer, stain.MacenkoNormalizer, stain.VahadaneNormalizer):
        with pytest.raises(ValueError, match="sample_size"):
            cls(sample_size=0)
        with pytest.raises(ValueError, match="seed"):
            cls(seed=-1)


# --------------------------------------------------------------------------- #
# Vahadane
# --------------------------------------------------------------------------- #
def test_positive_lasso_2_satisfies_the_kkt_conditions():
    rng = np.random.default_rng(0)
    stains = np.abs(rng.normal(size=(2, 3)))
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    od = np.abs(rng.normal(0.5, 0.6, (5000, 3)))
    od[:500] = rng.normal(0, 0.05, (500, 3))  # near-white pixels: zero concentrations
    penalty = 0.05
    for dtype in (np.float64, np.float32):
        c = positive_lasso_2(od.astype(dtype), stains, penalty).astype(np.float64)
        assert c.dtype == np.float64 and (c >= 0).all()
        gradient = c @ (stains @ stains.T) - (od @ stains.T - penalty)
        tolerance = 1e-9 if dtype == np.float64 else 1e-4
        assert np.abs(gradient[c > 0]).max() < tolerance  # stationary on the free coordinates
        assert gradient[c == 0].min() > -tolerance  # no descent into the feasible set
        assert (c == 0).any() and (c > 0).all(axis=1).any() and ((c > 0).sum(axis=1) == 1).any()


def test_positive_lasso_2_matches_spams_when_installed():
    spams = pytest.importorskip("spams")
    rng = np.random.default_rng(1)
    stains = np.array([[0.55, 0.75, 0.36], [0.2, 0.85, 0.49]])
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    od = np.abs(rng.normal(0.4, 0.4, (2000, 3)))
    theirs = spams.lasso(X=np.asfortranarray(od.T), D=np.asfortranarray(stains.T), mode=2, lambda1=0.01,
                         pos=True).toarray().T
    np.testing.assert_allclose(positive_lasso_2(od, stains, 0.01), theirs, atol=1e-6)


def test_sparse_dictionary_recovers_known_stains():
    rng = np.random.default_rng(2)
    truth = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    concentrations = rng.exponential(0.6, (20_000, 2)) * (rng.random((20_000, 2)) < 0.7)
    od = concentrations @ truth + np.abs(rng.normal(0, 0.01, (20_000, 3)))
    atoms = sparse_stain_dictionary(od, penalty=0.01, initial=np.array([[0.5, 0.6, 0.6], [0.3, 0.9, 0.3]]))
    assert (atoms >= 0).all() and (np.linalg.norm(atoms, axis=1) <= 1 + 1e-12).all()
    for row in range(2):
        assert angle(atoms[row], truth[row]) < 2.0


def test_vahadane_on_real_he_is_deterministic_and_normalises(hgsc, target):
    image = hgsc[::2, ::2].copy()
    normalizer = stain.VahadaneNormalizer().fit(target)
    again = stain.VahadaneNormalizer().fit(target)
    np.testing.assert_array_equal(normalizer.stain_matrix_, again.stain_matrix_)
    h, e = normalizer.stain_matrix_
    assert h[0] > e[0] and np.allclose(np.linalg.norm(normalizer.stain_matrix_, axis=1), 1)
    assert 5 < angle(h, e) < 60 and (normalizer.stain_matrix_ >= 0).all()
    # Close to the stains Macenko finds on the same tissue.
    macenko = stain.MacenkoNormalizer().fit(target).stain_matrix_
    assert angle(h, macenko[0]) < 10 and angle(e, macenko[1]) < 15
    normalised = normalizer.transform(image)
    assert normalised.dtype == np.uint8 and normalised.shape == image.shape
    np.testing.assert_array_equal(normalised, again.transform(image))
    before = np.linalg.norm(_tissue_lab_mean(image) - _tissue_lab_mean(target))
    after = np.linalg.norm(_tissue_lab_mean(normalised) - _tissue_lab_mean(target))
    assert after < 0.6 * before


@pytest.mark.parametrize("alpha", [(1.4, 0.7, 1.0), (0.7, 1.3, 1.0)])
def test_vahadane_recovers_a_stain_shift(hgsc, alpha):
    """A template re-stained in HED space: normalising the original to it brings its tissue
    closer to the template's than Macenko does, and much closer than unnormalised."""
    original = hgsc[:600:2, ::2].copy()
    tissue = stain.tissue_mask(original)
    template = stain.shift_stains(original, alpha)

    def error(image):
        return np.abs(image.astype(int) - template)[tissue].mean()

    vahadane = error(stain.VahadaneNormalizer().fit(template).transform(original))
    assert vahadane < 0.65 * error(original)
    assert vahadane <= error(stain.MacenkoNormalizer().fit(template).transform(original))


def test_vahadane_blank_low_tissue_and_single_colour_inputs(target):
    normalizer = stain.VahadaneNormalizer().fit(target[::4, ::4])
    nearly_blank = white((60, 60))
    nearly_blank[:5, :5] = (150, 80, 140)  # 25 tissue pixels < min_pixels
    for blank in (white(), nearly_blank):
        with pytest.warns(stain.NoTissueWarning, match="no tissue"):
            result = normalizer.transform(blank)
        np.testing.assert_array_equal(result, blank)
        with pytest.raises(ValueError, match="template has too few tissue pixels"):
            stain.VahadaneNormalizer().fit(blank)
    single = np.full((50, 60, 3), (150, 80, 140), np.uint8)
    with pytest.raises(ValueError, match="no distinct haematoxylin and eosin directions"):
        stain.VahadaneNormalizer().fit(single)
    with pytest.warns(stain.StainSeparationWarning, match="no two distinct stains"):
        result = normalizer.transform(single)
    np.testing.assert_array_equal(result, single)
    with pytest.raises(RuntimeError, match="fit"):
        stain.VahadaneNormalizer().transform(target)
    with pytest.raises(ValueError, match="lambda1"):
        stain.VahadaneNormalizer(lambda1=-1)
    with pytest.raises(ValueError, match="min_angle"):
        stain.VahadaneNormalizer(min_angle=90)


# --------------------------------------------------------------------------- #
# stain-angle estimate
# --------------------------------------------------------------------------- #
def test_suggest_stain_angle_measures_a_turned_haematoxylin(hgsc):
    train = hgsc[:600:2, ::2]
    same = stain.suggest_stain_angle({"train": train}, {"test": train})
    assert same.params == {"stain_angle": 0.0} and np.allclose(same.angles["test"], 0)
    turned = stain.suggest_stain_angle({"train": train}, {"test": stain.shift_stains(train, (1, 1, 1),
                                                                                   rotation=(8.0, 0.0))})
    h_angle, e_angle = turned.angles["test"]
    assert 5 < h_angle < 11 and e_angle < 3
    largest = max(np.nanmax(v) for v in turned.angles.values())
    assert turned.params["stain_angle"] == pytest.approx(math.ceil(largest * 1.1 * 10) / 10)
    assert load_params(turned.param_str, AUGMENT_SCHEMA)["stain_angle"] == turned.params["stain_angle"]
    np.testing.assert_allclose(np.linalg.norm(turned.train_vectors, axis=1), 1)


def test_suggest_stain_angle_in_domain_spread_and_errors(hgsc):
    train = {"a": hgsc[:500:2, :700:2], "b": hgsc[500:1000:2, 700::2]}
    estimate = stain.suggest_stain_angle(train, [hgsc[1000::2, ::2]], margin=0)
    assert set(estimate.angles) == {"test", "test:0", "train:a", "train:b"}
    assert 0 <= estimate.params["stain_angle"] <= 30
    with pytest.raises(ValueError, match="test images: cannot fit stain vectors"):
        stain.suggest_stain_angle([hgsc[:200, :200]], [white()])
    with pytest.raises(ValueError, match="margin"):
        stain.suggest_stain_angle([hgsc[:200, :200]], [hgsc[:200, :200]], margin=-1)


def _save(path, rgb):
    Image.fromarray(rgb).save(path)
    return str(path)


def test_estimate_cli_hed_suggests_stain_angle(tmp_path, capsys, hgsc):
    train = [_save(tmp_path / "train1.png", hgsc[:300:2, :300:2]),
             _save(tmp_path / "train2.png", hgsc[300:600:2, 300:600:2])]
    test = _save(tmp_path / "test.png", stain.shift_stains(hgsc[600:900:2, :300:2], (1, 1, 1), rotation=(10, 0)))
    assert estimate_cli.main(["--train", *train, "--test", test, "--hed"]) == 0
    out = capsys.readouterr().out
    assert "stain vectors, degrees" in out and "hue jitter: stain_angle =" in out
    params = load_params(out.strip().splitlines()[-1], AUGMENT_SCHEMA, "x")
    assert params["hed"] is True and params["stain_angle"] > 3
    assert estimate_cli.main(["--train", *train, "--test", test, "--hed", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"params", "param_str", "ratios", "hed_ratios"}
    assert report["params"]["stain_angle"] == params["stain_angle"]
    # Without --hed nothing about stains.
    assert estimate_cli.main(["--train", *train, "--test", test]) == 0
    assert "stain_angle" not in capsys.readouterr().out


def test_estimate_cli_warns_when_stain_vectors_cannot_be_fitted(tmp_path, capsys, hgsc):
    train = _save(tmp_path / "train.png", hgsc[:200, :200])
    flat = _save(tmp_path / "flat.png", np.full((40, 40, 3), (150, 80, 140), np.uint8))
    assert estimate_cli.main(["--train", train, "--test", flat, "--hed"]) == 0
    captured = capsys.readouterr()
    assert "warning: no stain_angle suggested" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert "stain_angle" not in captured.out.strip().splitlines()[-1]


# --------------------------------------------------------------------------- #
# caffe-stain-normalize: vahadane, --jobs, progress
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def folder(tmp_path_factory, hgsc, target):
    root = tmp_path_factory.mktemp("normalize")
    inputs = root / "inputs"
    inputs.mkdir()
    for index in range(5):
        _save(inputs / f"tile{index}.png", hgsc[index * 250:(index + 1) * 250, index * 200:index * 200 + 300])
    _save(inputs / "blank.png", white((30, 30)))
    return root, _save(root / "template.png", target[::3, ::3])


@pytest.mark.parametrize("method", ["histmatch", "reinhard", "macenko", "vahadane"])
def test_parallel_folder_output_is_identical_to_one_process(folder, method, capsys):
    root, template = folder
    outputs = {}
    for jobs in ("1", "2"):
        out = root / f"out_{method}_{jobs}"
        assert normalize_cli.main([str(root / "inputs"), "--template", template, "--output", str(out),
                                   "--method", method, "--jobs", jobs]) == 0
        captured = capsys.readouterr()
        assert captured.out.count(" -> ") == 6
        outputs[jobs] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
        if method != "histmatch":
            assert "blank.png" in captured.err and "no tissue" in captured.err  # warnings cross the pool
    assert len(outputs["1"]) == 6 and outputs["1"] == outputs["2"]


def test_normalize_cli_jobs_and_method_errors(folder, capsys):
    root, template = folder
    for extra, message in ((["--jobs", "0"], "--jobs must be in [1, 1024]; got 0"),
                           (["--method", "vahadane", "--ignore-white"], "vahadane selects tissue itself")):
        code = normalize_cli.main([str(root / "inputs"), "--template", template, "--output",
                                   str(root / "refused"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    blank = _save(root / "blank_template.png", white())
    code = normalize_cli.main([str(root / "inputs"), "--template", blank, "--output", str(root / "refused"),
                               "--method", "vahadane"])
    err = capsys.readouterr().err
    assert code == 2 and "blank_template.png" in err and "too few tissue pixels" in err


def test_normalize_cli_reports_a_corrupt_image_from_the_pool(folder, tmp_path, capsys):
    root, template = folder
    inputs = tmp_path / "mixed"
    inputs.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (inputs / name).write_bytes((root / "inputs" / "tile0.png").read_bytes())
    (inputs / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    code = normalize_cli.main([str(inputs), "--template", template, "--output", str(tmp_path / "out"),
                               "--jobs", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "b.png" in err and len(err.strip().splitlines()) == 1


def test_normalize_cli_progress_bar_goes_to_stderr(folder, capsys, monkeypatch):
    root, template = folder

    class FakeTqdm:
        instances = []

        def __init__(self, total, **kwargs):
            self.total, self.kwargs, self.n, self.disable = total, kwargs, 0, False
            FakeTqdm.instances.append(self)

        def update(self):
            self.n += 1

        def write(self, line, file):
            print(line, file=file)

        def close(self):
            self.closed = True

    import tqdm

    monkeypatch.setattr(tqdm, "tqdm", FakeTqdm)
    assert normalize_cli.main([str(root / "inputs"), "--template", template, "--output", str(root / "bar"),
                               "--jobs", "1"]) == 0
    bar, = FakeTqdm.instances
    assert bar.total == bar.n == 6 and bar.closed and bar.kwargs["file"] is __import__("sys").stderr
    assert capsys.readouterr().out.count(" -> ") == 6
    FakeTqdm.instances.clear()
    assert normalize_cli.main([str(root / "inputs"), "--template", template, "--output", str(root / "nobar"),
                               "--no-progress"]) == 0
    assert not FakeTqdm.instances
