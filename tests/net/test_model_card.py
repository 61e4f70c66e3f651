"""Any Caffe model through its model card: variants of one reference net in the conventions labs use.

From one reference net (RGB 0-255 in, softmax ``prob`` out, nucleus = channel 1) the tests build
equivalent nets in other conventions -- BGR, 0-1 input, mean values, renamed blobs, raw scores,
swapped classes, valid convolutions (smaller output), a strided output -- plus a patch
classifier, and check on real H&E that CaffeSegmenter with the right card reproduces the
reference's map, and that a wrong card is caught where it can be.
"""
import textwrap

import numpy as np
import pytest

from caffe_layers import sample_data
from caffe_layers.model_card import load_model_card, write_model_card
from caffe_layers.net.meanfile import write_mean_binaryproto
from caffe_layers.net.inference.caffe_engine import CaffeSegmenter
from caffe_layers.params import ParamError

HEIGHT, WIDTH = 48, 56
RADIUS = 2  # two 3×3 convolutions: zero padding differs from real context within 2 px of a border

NET = """
name: "variant"
layer {{ name: "input" type: "Input" top: "{input}" input_param {{ shape {{ dim: 1 dim: 3 dim: {h} dim: {w} }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "{input}" top: "conv1"
  convolution_param {{ num_output: 6 kernel_size: 3 pad: {pad} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "conv2" type: "Convolution" bottom: "conv1" top: "score"
  convolution_param {{ num_output: 2 kernel_size: 3 pad: {pad} stride: {stride} }} }}
{softmax}
"""


def build(caffe, folder, name, *, input="data", output="prob", pad=1, stride=1, softmax=True, h=HEIGHT, w=WIDTH,
          weights=None):
    softmax_layer = f'layer {{ name: "sm" type: "Softmax" bottom: "score" top: "{output}" }}' if softmax else ""
    text = NET.format(input=input, pad=pad, stride=stride, softmax=softmax_layer, h=h, w=w)
    deploy = folder / f"{name}.prototxt"
    deploy.write_text(textwrap.dedent(text))
    net = caffe.Net(str(deploy), caffe.TEST)
    for layer, (w_, b_) in weights.items():
        net.params[layer][0].data[...] = w_
        net.params[layer][1].data[...] = b_
    path = folder / f"{name}.caffemodel"
    net.save(str(path))
    return deploy, path


@pytest.fixture(scope="module")
def tile():
    rgb, _ = sample_data.load_hgsc_nest()
    return np.ascontiguousarray(rgb[300:300 + HEIGHT, 500:500 + WIDTH].transpose(2, 0, 1)[None], dtype=np.float32)


@pytest.fixture(scope="module")
def reference_weights():
    rng = np.random.default_rng(3)
    return {"conv1": (rng.normal(0, 0.02, (6, 3, 3, 3)).astype(np.float32), rng.normal(0, 0.1, 6).astype(np.float32)),
            "conv2": (rng.normal(0, 0.3, (2, 6, 3, 3)).astype(np.float32), rng.normal(0, 0.1, 2).astype(np.float32))}


@pytest.fixture
def reference(caffe, tmp_path, reference_weights, tile):
    deploy, weights = build(caffe, tmp_path, "reference", weights=reference_weights)
    return CaffeSegmenter(deploy, weights)(tile)[0, 1]


def interior(prob, radius=RADIUS):
    return prob[radius:-radius, radius:-radius]


def variant_weights(reference_weights, **changes):
    weights = {layer: (w.copy(), b.copy()) for layer, (w, b) in reference_weights.items()}
    for layer, (w, b) in changes.items():
        weights[layer] = (w, b)
    return weights


def test_defaults_are_the_project_convention(caffe, tmp_path, reference_weights, tile, reference):
    deploy, weights = build(caffe, tmp_path, "same", weights=reference_weights)
    segmenter = CaffeSegmenter(deploy, weights, load_model_card())
    assert segmenter.geometry == "same"
    np.testing.assert_allclose(segmenter(tile)[0, 1], reference, atol=1e-6)


def test_variants_with_the_right_card_reproduce_the_reference(caffe, tmp_path, reference_weights, tile, reference):
    w1, b1 = reference_weights["conv1"]
    w2, b2 = reference_weights["conv2"]
    mean = np.array([180.0, 120.0, 160.0], np.float32)
    cases = {
        # trained on BGR: the first convolution reads the channels the other way round
        "bgr": (dict(weights=variant_weights(reference_weights, conv1=(w1[:, ::-1].copy(), b1))),
                dict(channel_order="BGR"), False),
        # trained on 0-1 images
        "unit_range": (dict(weights=variant_weights(reference_weights, conv1=(w1 * 255, b1))),
                       dict(raw_scale=1 / 255), False),
        # trained on mean-subtracted input (zero padding now means the mean: compare the interior)
        "mean_value": (dict(weights=variant_weights(
            reference_weights, conv1=(w1, b1 + np.einsum("oikl,i->o", w1, mean)))), dict(mean_value=list(mean)), True),
        # its own blob names
        "renamed": (dict(input="image", output="nuclei_prob", weights=reference_weights),
                    dict(input_blob="image", output_blob="nuclei_prob"), False),
        # raw scores, no softmax layer
        "scores": (dict(output="score", softmax=False, weights=reference_weights),
                   dict(output_blob="score", output="scores"), False),
        # nucleus is class 0
        "swapped": (dict(weights=variant_weights(reference_weights, conv2=(w2[::-1].copy(), b2[::-1].copy()))),
                    dict(foreground_class=0), False),
        # valid convolutions: the output is 2 px smaller on every side
        "valid": (dict(pad=0, weights=reference_weights), dict(), True),
    }
    for name, (net_options, card, only_interior) in cases.items():
        deploy, weights = build(caffe, tmp_path, name, **net_options)
        segmenter = CaffeSegmenter(deploy, weights, load_model_card(**card))
        prob = segmenter(tile)[0, 1]
        assert prob.shape == reference.shape, name
        expected, got = (interior(reference), interior(prob)) if only_interior else (reference, prob)
        np.testing.assert_allclose(got, expected, atol=2e-5, err_msg=name)
    assert CaffeSegmenter(*build(caffe, tmp_path, "v2", pad=0, weights=reference_weights)).geometry == "margin"


def test_a_mean_file_card_relative_to_its_folder(caffe, tmp_path, reference_weights, tile, reference):
    w1, b1 = reference_weights["conv1"]
    mean = np.array([170.0, 110.0, 150.0], np.float32)
    model = tmp_path / "model"
    model.mkdir()
    deploy, weights = build(caffe, model, "deploy",
                            weights=variant_weights(reference_weights,
                                                    conv1=(w1[:, ::-1].copy(), b1 + np.einsum("oikl,i->o", w1, mean))))
    # DIGITS-style: a BGR mean image; the card names it relative to its own folder.
    write_mean_binaryproto(model / "mean.binaryproto", np.broadcast_to(mean[::-1, None, None], (3, 8, 8)))
    write_model_card(model / "card.yaml", dict(channel_order="BGR", mean_file="mean.binaryproto"))
    card = load_model_card(model / "card.yaml")
    prob = CaffeSegmenter(deploy, weights, card)(tile)[0, 1]
    np.testing.assert_allclose(interior(prob), interior(reference), atol=2e-5)


def test_strided_output_is_upsampled_onto_the_receptive_field_centres(caffe, tmp_path, reference_weights, tile,
                                                                    reference):
    deploy, weights = build(caffe, tmp_path, "strided", stride=2, weights=reference_weights)
    segmenter = CaffeSegmenter(deploy, weights)
    assert segmenter.geometry == "strided" and segmenter.stride == 2 and segmenter.offset == 0
    prob = segmenter(tile)[0, 1]
    assert prob.shape == reference.shape
    # Output j of the stride-2 net is the reference at input 2j: those pixels agree exactly...
    np.testing.assert_allclose(prob[::2, ::2], reference[::2, ::2], atol=2e-5)
    # ...and the pixels between are interpolated between their neighbours.
    between = 0.5 * (reference[0:-2:2, ::2] + reference[2::2, ::2])
    np.testing.assert_allclose(prob[1:-1:2, ::2], between, atol=2e-5)


PATCH_NET = """
name: "patch_classifier"
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 9 dim: 9 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "score" inner_product_param { num_output: 3 } }
"""


def _patch_classifier(caffe, tmp_path):
    """PATCH_NET with fixed random weights: (deploy, weights) paths."""
    deploy = tmp_path / "patch.prototxt"
    deploy.write_text(textwrap.dedent(PATCH_NET))
    net = caffe.Net(str(deploy), caffe.TEST)
    rng = np.random.default_rng(5)
    for name in ("conv1", "fc"):
        for blob in net.params[name]:
            blob.data[...] = rng.normal(0, 0.05, blob.data.shape)
    weights = tmp_path / "patch.caffemodel"
    net.save(str(weights))
    return deploy, weights


def test_patch_classifier_labels_each_pixel_by_the_patch_centred_there(caffe, tmp_path, tile):
    deploy, weights = _patch_classifier(caffe, tmp_path)
    card = load_model_card(patch_classifier=True, output_blob="score", output="scores", foreground_class=2,
                           mean_value=[128.0])
    small = tile[:, :, :20, :24]
    segmenter = CaffeSegmenter(deploy, weights, card)
    assert segmenter.geometry == "patch" and segmenter.context == 4
    prob = segmenter(small)[0, 1]
    # Brute force, pixel by pixel: the classifier on the reflect-padded 9×9 patch centred there.
    padded = np.pad(small[0], ((0, 0), (4, 4), (4, 4)), mode="reflect")
    net = caffe.Net(str(deploy), str(weights), caffe.TEST)
    net.blobs["data"].reshape(1, 3, 9, 9)
    for y, x in [(0, 0), (5, 7), (19, 23), (10, 0), (13, 17)]:
        net.blobs["data"].data[...] = padded[:, y:y + 9, x:x + 9] - 128.0
        scores = net.forward()["score"][0].astype(np.float64)
        expected = np.exp(scores - scores.max())
        assert prob[y, x] == pytest.approx(expected[2] / expected.sum(), abs=1e-5), (y, x)


def test_wrong_cards_are_caught(caffe, tmp_path, reference_weights):
    deploy, weights = build(caffe, tmp_path, "ref", weights=reference_weights)
    for card, message in [
        (dict(foreground_class=5), r"foreground_class 5 is out of range: output blob 'prob' has 2 channels"),
        (dict(input_blob="image"), r"no input blob 'image' \(inputs: \['data'\]\)"),
        (dict(output_blob="softmax"), r"no output blob 'softmax'"),
        (dict(mean_value=[1.0, 2.0]), r"the mean has 2 channels, the net's input 3"),
        (dict(patch_classifier=True), r"patch_classifier is set, but a \(48, 56\) input gives output"),
    ]:
        with pytest.raises(ValueError, match=message):
            CaffeSegmenter(deploy, weights, load_model_card(**card))
    patch = tmp_path / "patch.prototxt"
    patch.write_text(textwrap.dedent(PATCH_NET))
    net = caffe.Net(str(patch), caffe.TEST)
    net.save(str(tmp_path / "patch.caffemodel"))
    with pytest.raises(ValueError, match="needs patch_classifier: true"):
        CaffeSegmenter(patch, tmp_path / "patch.caffemodel", load_model_card(output_blob="score"))


def test_card_files_are_validated_by_the_schema(tmp_path):
    card = tmp_path / "card.yaml"
    card.write_text("chanel_order: BGR\n")
    with pytest.raises(ParamError, match=r"unknown key 'chanel_order' in model card .*did you mean 'channel_order'"):
        load_model_card(card)
    card.write_text("mean_value: [104, 117, 123]\nmean_file: m.binaryproto\n")
    with pytest.raises(ParamError, match="give mean_file or mean_value, not both"):
        load_model_card(card)
    card.write_text("mean_file: missing.binaryproto\n")
    with pytest.raises(FileNotFoundError, match=r"mean_file 'missing.binaryproto' not found"):
        load_model_card(card)
    card.write_text("channel_order: BGR\nraw_scale: 0.00392156862745098\n")
    loaded = load_model_card(card, raw_scale=1.0)  # a flag overrides the card
    assert loaded.channel_order == "BGR" and loaded.raw_scale == 1.0


def test_segment_command_with_a_card(caffe, tmp_path, reference_weights, tile, reference):
    from PIL import Image

    from caffe_layers.cli import segment

    w1, b1 = reference_weights["conv1"]
    deploy, weights = build(caffe, tmp_path, "bgr_scores", output="score", softmax=False,
                            weights=variant_weights(reference_weights, conv1=(w1[:, ::-1] * 255, b1)))
    write_model_card(tmp_path / "card.yaml", dict(channel_order="BGR", raw_scale=1 / 255, output_blob="score",
                                                 output="scores"))
    image = tmp_path / "tile.png"
    Image.fromarray(tile[0].transpose(1, 2, 0).astype(np.uint8)).save(image)
    args = ["--model", str(deploy), "--weights", str(weights), "--card", str(tmp_path / "card.yaml"),
            "--out", str(tmp_path / "out"), "--tile", "64", "--overlap", "8", "--prob-format", "npy",
            "--no-progress", str(image)]
    assert segment.main(args) == 0
    np.testing.assert_allclose(np.load(tmp_path / "out" / "tile_prob.npy"), reference, atol=2e-5)
    # --tta averages the 8 views: a different map, but a probability map all the same.
    assert segment.main(args[:-1] + ["--tta", "--overwrite", str(image)]) == 0
    tta = np.load(tmp_path / "out" / "tile_prob.npy")
    assert tta.shape == reference.shape and 0 <= tta.min() and tta.max() <= 1 and not np.allclose(tta, reference)


def test_compare_command_takes_a_card_per_model(caffe, tmp_path, reference_weights, tile, capsys):
    import json

    from PIL import Image

    from caffe_layers.cli import compare

    w2, b2 = reference_weights["conv2"]
    reference = build(caffe, tmp_path, "reference", weights=reference_weights)
    swapped = build(caffe, tmp_path, "swapped", weights=variant_weights(reference_weights,
                                                                       conv2=(w2[::-1].copy(), b2[::-1].copy())))
    write_model_card(tmp_path / "swapped.yaml", dict(foreground_class=0))
    image, mask = tmp_path / "tile.png", tmp_path / "tile_mask.png"
    Image.fromarray(tile[0].transpose(1, 2, 0).astype(np.uint8)).save(image)
    Image.fromarray((np.arange(HEIGHT * WIDTH).reshape(HEIGHT, WIDTH) % 7 == 0).astype(np.uint8) * 255).save(mask)
    out = tmp_path / "out"
    code = compare.main(["--model", "before", *map(str, reference), "--model", "after", *map(str, swapped),
                         str(tmp_path / "swapped.yaml"), "--image", str(image), "--mask", str(mask),
                         "--out", str(out), "--tile", "64", "--overlap", "8", "--no-figures"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "summary.json").read_text())["results"]
    assert results["before"]["original"]["dice"] == pytest.approx(results["after"]["original"]["dice"], abs=1e-9)
    assert compare.main(["--model", "x", str(reference[0]), "--image", str(image), "--out", str(tmp_path / "o2")]) == 2
    assert "--model takes NAME DEPLOY WEIGHTS [CARD], got 2 values" in capsys.readouterr().err


def test_patch_stride_classifies_every_nth_pixel_on_one_grid_across_tiles(caffe, tmp_path, tile):
    """patch_stride: s runs the classifier on the pixels (s·i, s·j) only -- exactly what stride 1
    gives there -- and interpolates between; tiles start on the same grid, so a tiled map is the
    one-pass map, and a whole slide's blocks agree with each other."""
    from caffe_layers.tiling import segment_tiled

    deploy, weights = _patch_classifier(caffe, tmp_path)
    options = dict(patch_classifier=True, output_blob="score", output="scores", mean_value=[128.0])
    every = CaffeSegmenter(deploy, weights, load_model_card(**options))
    card = load_model_card(patch_stride=4, **options)
    assert card.size_multiple == 4  # tiles start on the stride's grid
    assert load_model_card(patch_stride=4, size_multiple=6, **options).size_multiple == 12
    strided = CaffeSegmenter(deploy, weights, card)
    assert strided.geometry == "patch" and strided.context == 4 + 3
    small = tile[:, :, :40, :48]
    full, sparse = every(small)[0, 1], strided(small)[0, 1]
    np.testing.assert_allclose(sparse[::4, ::4], full[::4, ::4], atol=1e-6)
    between = 0.5 * (full[0:-4:4, ::4] + full[4::4, ::4])
    np.testing.assert_allclose(sparse[2:-4:4, ::4], between, atol=1e-6)
    image = np.ascontiguousarray(tile[0, :, :40, :48].transpose(1, 2, 0)).astype(np.uint8)
    one_pass = segment_tiled(strided, image, tile=48, overlap=0, multiple=4, progress=False)
    tiled = segment_tiled(strided, image, tile=24, overlap=16, multiple=4, progress=False)
    np.testing.assert_allclose(tiled, one_pass, atol=1e-6)

    with pytest.raises(ParamError, match="patch_stride 4 needs patch_classifier: true"):
        load_model_card(patch_stride=4)
    with pytest.raises(ParamError, match="patch_stride"):
        load_model_card(patch_stride=0, patch_classifier=True)
