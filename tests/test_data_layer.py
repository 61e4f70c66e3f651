"""PatchDataLayer through real pycaffe: prototxt -> caffe.Net -> forward."""
import json

import numpy as np
import pytest
from PIL import Image

from caffe_layers.patches import PatchSampler

PATCH, BATCH = 16, 4


def make_pair(rng, height, width):
    """An image whose nuclei (mask 1) are bright (~200) on a dark (~20) background, so the
    label can be read back from the image even after augmentation."""
    mask = (rng.random((height, width)) > 0.6).astype(np.uint8)
    image = np.where(mask[..., None] == 1, 200, 20).astype(np.int16)
    image = image + rng.integers(-15, 16, (height, width, 3))
    image[..., 1] += 10  # channels differ, so an RGB/BGR swap would show
    return np.clip(image, 0, 255).astype(np.uint8), mask


@pytest.fixture
def dataset(tmp_path):
    """Three pairs (PNG and .npy, different sizes) and a list file with relative paths."""
    rng = np.random.default_rng(0)
    pairs = [make_pair(rng, 40, 50), make_pair(rng, 32, 24), make_pair(rng, 20, 36)]
    lines = ["# image mask"]
    for i, (image, mask) in enumerate(pairs):
        if i == 1:
            np.save(tmp_path / f"img{i}.npy", image)
            np.save(tmp_path / f"mask{i}.npy", mask)
            lines.append(f"img{i}.npy mask{i}.npy")
        else:
            Image.fromarray(image).save(tmp_path / f"img{i}.png")
            Image.fromarray(mask * 255).save(tmp_path / f"mask{i}.png")
            lines.append(f"img{i}.png mask{i}.png")
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "train.txt", [p[0] for p in pairs], [p[1] for p in pairs]


def write_net(tmp_path, params, tops=("data", "label"), name="net.prototxt", bottom_input=False):
    """A prototxt with one PatchDataLayer (and, optionally, an Input layer feeding it)."""
    text = ""
    if bottom_input:
        text += ('layer { name: "in" type: "Input" top: "x" '
                 'input_param { shape { dim: 1 dim: 1 } } }\n')
    param_str = json.dumps(params)
    assert "'" not in param_str  # the prototxt quotes param_str with single quotes
    text += ('layer {\n  name: "data" type: "Python"\n'
             + ('  bottom: "x"\n' if bottom_input else "")
             + "".join(f'  top: "{top}"\n' for top in tops)
             + '  python_param {\n    module: "caffe_layers.data" layer: "PatchDataLayer"\n'
             + f"    param_str: '{param_str}'\n  }}\n}}\n")
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def base_params(list_file, **extra):
    return dict({"source": str(list_file), "batch_size": BATCH, "patch_size": PATCH,
                 "seed": 7}, **extra)


def forward(net):
    net.forward()
    return (net.blobs["data"].data.copy(),
            net.blobs["label"].data.copy() if "label" in net.blobs else None)


def test_shapes_and_values(caffe, dataset, tmp_path):
    list_file, images, masks = dataset
    net = caffe.Net(write_net(tmp_path, base_params(list_file)), caffe.TRAIN)
    assert net.blobs["data"].data.shape == (BATCH, 3, PATCH, PATCH)
    assert net.blobs["label"].data.shape == (BATCH, 1, PATCH, PATCH)
    # The layer is exactly a PatchSampler with the layer's seed (no augment): patches are
    # RGB crops of the files, channel-first, and labels the matching mask crops.
    sampler = PatchSampler(images, masks, PATCH, BATCH, seed=7)
    for _ in range(3):
        data, label = forward(net)
        assert data.dtype == np.float32 and label.dtype == np.float32
        assert 0 <= data.min() and data.max() <= 255
        assert set(np.unique(label)) <= {0.0, 1.0}
        expected_data, expected_label = sampler.next_batch()
        np.testing.assert_array_equal(data, expected_data)
        np.testing.assert_array_equal(label, expected_label)
        for k, (i, (y, x)) in enumerate(zip(sampler.last_indices, sampler.last_corners)):
            crop = images[i][y:y + PATCH, x:x + PATCH]
            np.testing.assert_array_equal(data[k, 0], crop[..., 0])  # channel 0 is red
            np.testing.assert_array_equal(label[k, 0], masks[i][y:y + PATCH, x:x + PATCH])


def test_root_and_single_top(caffe, dataset, tmp_path):
    list_file, _, _ = dataset
    moved = tmp_path / "lists"
    moved.mkdir()
    (moved / "train.txt").write_text(list_file.read_text())
    params = base_params(moved / "train.txt", root=str(tmp_path), shuffle=False)
    net = caffe.Net(write_net(tmp_path, params, tops=("data",)), caffe.TEST)
    data, label = forward(net)
    assert label is None and data.shape == (BATCH, 3, PATCH, PATCH)


def test_same_seed_same_batches(caffe, dataset, tmp_path):
    list_file, _, _ = dataset
    augment = {"rotate": True, "flip": True, "color": True, "hed": True}

    def run(seed):
        net = caffe.Net(write_net(tmp_path, base_params(list_file, seed=seed, augment=augment),
                                  name=f"net{seed}.prototxt"), caffe.TRAIN)
        return [forward(net) for _ in range(3)]

    first, again, other = run(11), run(11), run(12)
    for (d1, l1), (d2, l2) in zip(first, again):
        np.testing.assert_array_equal(d1, d2)
        np.testing.assert_array_equal(l1, l2)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other))


def test_augment_changes_colour_and_keeps_label_geometry(caffe, dataset, tmp_path):
    list_file, _, _ = dataset
    plain = caffe.Net(write_net(tmp_path, base_params(list_file), name="plain.prototxt"),
                      caffe.TRAIN)
    augment = {"rotate": True, "flip": True, "color": True, "color_a_min": 0.8,
               "color_a_max": 1.2, "color_b_min": -15, "color_b_max": 15}
    augmented = caffe.Net(write_net(tmp_path, base_params(list_file, augment=augment),
                                    name="aug.prototxt"), caffe.TRAIN)
    geometry_changed = False
    for _ in range(4):
        plain_data, plain_label = forward(plain)
        data, label = forward(augmented)
        assert set(np.unique(label)) <= {0.0, 1.0}
        assert 0 <= data.min() and data.max() <= 255  # clipped by default
        assert not np.allclose(data, plain_data)
        geometry_changed |= not np.array_equal(label, plain_label)
        # Nuclei are ~200 and background ~20 before a*x+b: the label must still sit exactly
        # on the bright pixels, i.e. image and label got the same rotation/flip.
        np.testing.assert_array_equal(data.mean(axis=1, keepdims=True) > 110, label == 1)
    assert geometry_changed  # rotate/flip did act on the labels


def test_augment_only_in_train_unless_test_augment(caffe, dataset, tmp_path):
    list_file, _, _ = dataset
    augment = {"color": True}
    plain = forward(caffe.Net(write_net(tmp_path, base_params(list_file), name="p.prototxt"),
                              caffe.TEST))
    test_net = forward(caffe.Net(write_net(tmp_path, base_params(list_file, augment=augment),
                                           name="t.prototxt"), caffe.TEST))
    np.testing.assert_array_equal(test_net[0], plain[0])
    augment["test_augment"] = True
    test_aug = forward(caffe.Net(write_net(tmp_path, base_params(list_file, augment=augment),
                                           name="ta.prototxt"), caffe.TEST))
    assert not np.allclose(test_aug[0], plain[0])
    np.testing.assert_array_equal(test_aug[1], plain[1])  # colour only: labels untouched


def test_explicit_augment_seed_is_used(caffe, dataset, tmp_path):
    list_file, _, _ = dataset

    def data(augment_seed):
        params = base_params(list_file, augment={"color": True, "seed": augment_seed})
        net = caffe.Net(write_net(tmp_path, params, name=f"s{augment_seed}.prototxt"),
                        caffe.TRAIN)
        return forward(net)

    (a, la), (b, lb) = data(1), data(2)
    np.testing.assert_array_equal(la, lb)  # same layer seed: same patches
    assert not np.allclose(a, b)           # different augment seed: different colours


# --------------------------------------------------------------------------- setup errors

def net_error(caffe, path, phase=None):
    with pytest.raises(Exception) as info:
        caffe.Net(path, caffe.TRAIN if phase is None else phase)
    return info


def test_error_missing_list_file(caffe, tmp_path):
    info = net_error(caffe, write_net(tmp_path, base_params(tmp_path / "nope.txt")))
    assert info.type is FileNotFoundError
    assert "list file" in str(info.value) and "nope.txt" in str(info.value)


def test_error_missing_image_file(caffe, dataset, tmp_path):
    list_file, _, _ = dataset
    list_file.write_text(list_file.read_text() + "img9.png mask0.png\n")
    info = net_error(caffe, write_net(tmp_path, base_params(list_file)))
    assert info.type is FileNotFoundError
    assert "train.txt:5: image file" in str(info.value) and "img9.png" in str(info.value)


def test_error_size_mismatch(caffe, dataset, tmp_path):
    list_file, _, _ = dataset
    list_file.write_text(list_file.read_text() + "img0.png mask1.npy\n")
    info = net_error(caffe, write_net(tmp_path, base_params(list_file)))
    assert info.type is ValueError
    message = str(info.value)
    assert "img0.png" in message and "40×50" in message
    assert "mask1.npy" in message and "32×24" in message


def test_error_patch_too_large(caffe, dataset, tmp_path):
    list_file, _, _ = dataset
    info = net_error(caffe, write_net(tmp_path, dict(base_params(list_file), patch_size=24)))
    assert info.type is ValueError
    assert "patch_size 24 does not fit in" in str(info.value)
    assert "img2.png" in str(info.value) and "20×36" in str(info.value)


def test_error_unknown_key_suggests(caffe, dataset, tmp_path):
    list_file, _, _ = dataset
    params = base_params(list_file)
    params["patch_sise"] = params.pop("patch_size")
    info = net_error(caffe, write_net(tmp_path, params))
    assert isinstance(info.value, ValueError)  # ParamError
    assert "PatchDataLayer param_str" in str(info.value)
    assert "'patch_sise'" in str(info.value) and "did you mean 'patch_size'" in str(info.value)


def test_error_unknown_augment_key(caffe, dataset, tmp_path):
    list_file, _, _ = dataset
    info = net_error(caffe, write_net(tmp_path, base_params(list_file, augment={"rotat": True})))
    assert "'augment.rotat'" in str(info.value) and "did you mean 'augment.rotate'" in str(info.value)


@pytest.mark.parametrize("tops", [("data", "label", "extra")])
def test_error_wrong_number_of_tops(caffe, dataset, tmp_path, tops):
    list_file, _, _ = dataset
    info = net_error(caffe, write_net(tmp_path, base_params(list_file), tops=tops))
    assert info.type is ValueError
    assert "1 or 2 tops" in str(info.value) and "got 3" in str(info.value)


def test_error_bottom_given(caffe, dataset, tmp_path):
    list_file, _, _ = dataset
    info = net_error(caffe, write_net(tmp_path, base_params(list_file), bottom_input=True))
    assert info.type is ValueError
    assert "takes no bottoms, got 1" in str(info.value)


def test_layer_under_caffe_tool_with_a_loss(run_caffe_tool, dataset, tmp_path):
    """The `caffe` binary's embedded Python runs the layer forward and backward, feeding a
    1×1 convolution and SoftmaxWithLoss, as in a real U-Net train prototxt."""
    list_file, _, _ = dataset
    path = write_net(tmp_path, base_params(list_file, augment={"flip": True, "hed": True}))
    with open(path, "a") as handle:
        handle.write('layer { name: "score" type: "Convolution" bottom: "data" top: "score"\n'
                     '  convolution_param { num_output: 2 kernel_size: 1 '
                     'weight_filler { type: "xavier" } } }\n'
                     'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" '
                     'bottom: "label" top: "loss" }\n')
    result = run_caffe_tool("time", "-model", path, "-iterations", "2", cwd=tmp_path)
    assert "Average Forward-Backward" in result.stderr
