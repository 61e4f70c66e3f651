"""The README's worked example, end to end: a lab's classic Caffe model retrained with the layer.

For a DIGITS-style V1 patch classifier (LMDB, mean file, mirror, crop) and a DIGITS-style LMDB
image + label segmentation net, on real H&E: build the databases with caffe-stain-lmdb, train
briefly with the real ``caffe train``, retrofit the prototxt with caffe-stain-retrofit, and
fine-tune the retrofitted net with ``caffe train --weights`` from the model's own weights. With
``base_lr: 0`` the fine-tuned snapshot must equal the weights it started from: proof that
``--weights`` loaded every layer into the retrofitted net.
"""
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caffe_layers import sample_data
from caffe_layers.cli import lmdb as lmdb_cli
from caffe_layers.cli import retrofit as retrofit_cli
from caffe_layers.net.checks import read_weights
from caffe_layers.net.meanfile import write_mean_binaryproto
from caffe_layers.patches import compute_mean_image

FIXTURES = Path(__file__).resolve().parent / "net" / "fixtures" / "retrofit"
PARAM_STR = '{"rotate": True, "flip": True, "color": True, "color_a_min": 0.7, "color_a_max": 1.4, "seed": 3}'


def solver(path, net, prefix, iterations, base_lr):
    path.write_text(f'net: "{net}"\nbase_lr: {base_lr}\nlr_policy: "fixed"\nmomentum: 0.9\n'
                    f'max_iter: {iterations}\nsnapshot: {iterations}\nsnapshot_prefix: "{prefix}"\n'
                    'test_iter: 1\ntest_interval: 1000\ndisplay: 1\nsolver_mode: CPU\nrandom_seed: 1\n')
    return path


def learned(path):
    return {layer.name: [np.asarray(blob.data) for blob in layer.blobs]
            for layer in read_weights(path).layer if layer.blobs}


def retrain_with_the_layer(run_caffe_tool, folder, net_name):
    """caffe train -> caffe-stain-retrofit -> caffe train --weights (base_lr 0); returns the two snapshots."""
    (folder / "snap").mkdir(exist_ok=True)  # the caffe tool does not create it
    run_caffe_tool("train", f"--solver={solver(folder / 'solver.prototxt', net_name, 'snap/classic', 6, 0.01)}",
                   cwd=folder)
    original = folder / "snap" / "classic_iter_6.caffemodel"
    assert original.is_file()
    assert retrofit_cli.main([net_name, "--param-str", PARAM_STR, "--out", "aug_" + net_name]) == 0
    text = (folder / ("aug_" + net_name)).read_text()
    assert "caffe_layers.augmentation" in text and "phase: TRAIN" in text
    result = run_caffe_tool("train", f"--solver={solver(folder / 'ft.prototxt', 'aug_' + net_name, 'snap/ft', 2, 0)}",
                            f"--weights={original}", cwd=folder)
    assert "Iteration 2" in result.stderr or "Optimization Done" in result.stderr
    return original, folder / "snap" / "ft_iter_2.caffemodel"


@pytest.fixture(scope="module")
def he():
    rgb, instances = sample_data.load_hgsc_nest()
    return rgb, sample_data.nucleus_mask(instances) > 0


def test_digits_v1_patch_classifier(caffe, run_caffe_tool, tmp_path, he, monkeypatch):
    rgb, nuclei = he
    monkeypatch.chdir(tmp_path)
    patches = []
    for index, (y, x) in enumerate((y, x) for y in range(100, 420, 40) for x in range(100, 420, 40)):
        patch = rgb[y:y + 32, x:x + 32]
        label = "nucleus" if nuclei[y + 16, x + 16] else "background"
        (tmp_path / "patches" / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(patch).save(tmp_path / "patches" / label / f"{index}.png")
        patches.append(patch)
    for db in ("train_db", "val_db"):  # BGR, as DIGITS writes them
        assert lmdb_cli.main(["classification", "--folder", "patches", "--output", db]) == 0
    # DIGITS' mean file: the mean image in the database's channel order (BGR).
    write_mean_binaryproto("mean.binaryproto", compute_mean_image(patches)[::-1])
    shutil.copy(FIXTURES / "digits_v1_classifier.prototxt", "train_val.prototxt")

    original, finetuned = retrain_with_the_layer(run_caffe_tool, tmp_path, "train_val.prototxt")
    before, after = learned(original), learned(finetuned)
    assert set(before) == set(after) == {"conv1", "ip1", "ip2"}
    for name in before:
        for a, b in zip(before[name], after[name]):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_digits_lmdb_segmentation_net(caffe, run_caffe_tool, tmp_path, he, monkeypatch):
    rgb, nuclei = he
    monkeypatch.chdir(tmp_path)
    lines = []
    for index, (y, x) in enumerate([(0, 0), (200, 300), (600, 100), (900, 900)]):
        Image.fromarray(rgb[y:y + 48, x:x + 48]).save(tmp_path / f"tile{index}.png")
        Image.fromarray(nuclei[y:y + 48, x:x + 48].astype(np.uint8) * 255).save(tmp_path / f"tile{index}_mask.png")
        lines.append(f"tile{index}.png tile{index}_mask.png")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    assert lmdb_cli.main(["segmentation", "--list", "list.txt", "--output", "seg_db"]) == 0
    text = (FIXTURES / "lmdb_segmentation.prototxt").read_text()
    for phase_db in ("train_db", "val_db"):
        text = text.replace(f"{phase_db}/features", "seg_db/images").replace(f"{phase_db}/labels", "seg_db/labels")
    (tmp_path / "seg.prototxt").write_text(text)

    original, finetuned = retrain_with_the_layer(run_caffe_tool, tmp_path, "seg.prototxt")
    before, after = learned(original), learned(finetuned)
    # The mean_value moved out of transform_param into a Bias layer with fixed blobs.
    assert set(before) == {"conv1", "score"} and set(after) == {"conv1", "score", "data_mean"}
    np.testing.assert_array_equal(after["data_mean"][0].ravel(), [-180, -130, -190])
    for name in before:
        for a, b in zip(before[name], after[name]):
            np.testing.assert_array_equal(a, b, err_msg=name)
