"""compare_models with instance ground truth (AJI, PQ, written instance labels) and read_ground_truth's
rule for what counts as instances; the nets are numpy ``predict`` callables (no Caffe needed)."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from caffe_layers.annotations import read_ground_truth, read_instance_image, write_instance_image
from caffe_layers.instances import instances_from_probability
from caffe_layers.metrics import instance_scores
from caffe_layers.net.inference.compare import ModelSpec, compare_models


def nuclei(shape=(64, 80)):
    """Instance labels of discs, two of them touching, and an RGB image that shows them."""
    labels = np.zeros(shape, np.int32)
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    centres = [(20, 20), (20, 30), (45, 60), (48, 20)]
    for index, (y, x) in enumerate(centres, start=1):
        labels[((rows - y) ** 2 + (cols - x) ** 2 <= 36) & (labels == 0)] = index
    rgb = np.full(shape + (3,), 230, np.uint8)
    rgb[labels > 0] = (90, 60, 150)
    return rgb, labels


def blurred_truth(batch):
    """A 'net' that sees the purple pixels, softly: probability of nucleus, channel 1."""
    purple = (batch[:, 2] > batch[:, 1] + 40).astype(np.float32)
    soft = np.stack([ndimage.gaussian_filter(plane, 1.0) for plane in purple])
    return np.stack([1 - soft, soft], axis=1)


def test_compare_scores_instances_and_writes_them(tmp_path):
    rgb, labels = nuclei()
    model = ModelSpec("soft", Path("unused.prototxt"), Path("unused.caffemodel"))
    images = [("labelled", rgb, labels), ("mask only", rgb, labels > 0)]
    summary = compare_models([model], images, tmp_path, predictors={"soft": blurred_truth}, tile=32, overlap=8,
                             figures=False, instances=dict(min_distance=2), instance_labels=True)
    written = read_instance_image(tmp_path / "instances" / "labelled_original_soft.png")
    prob = blurred_truth(np.transpose(rgb, (2, 0, 1))[None].astype(np.float32))[0, 1]
    np.testing.assert_array_equal(written, instances_from_probability(prob, 0.5, min_distance=2))
    expected = instance_scores(written, labels)
    scored = {s["image"]: s for s in summary["per_image"]}
    assert scored["labelled"]["aji"] == pytest.approx(expected["aji"]) and "aji" not in scored["mask only"]
    pooled = summary["results"]["soft"]["original"]
    assert pooled["instance_images"] == 1 and pooled["aji"] == pytest.approx(expected["aji"])
    assert pooled["pq"] == pytest.approx(expected["pq"]) and pooled["images"] == 2
    assert summary["settings"]["instances"]["min_distance"] == 2
    assert summary["settings"]["instances"]["min_size"] == 10  # the library's default, as run
    assert "| AJI | PQ |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "instances" / "mask_only_original_soft.png").is_file()
    with pytest.raises(FileExistsError, match="instances"):  # an earlier run's labels are not replaced
        (tmp_path / "table.md").unlink()
        compare_models([model], images, tmp_path, predictors={"soft": blurred_truth}, tile=32, overlap=8,
                       figures=False, instance_labels=True)


def test_masks_alone_add_no_instance_columns(tmp_path):
    rgb, labels = nuclei()
    model = ModelSpec("soft", Path("unused.prototxt"), Path("unused.caffemodel"))
    summary = compare_models([model], [("m", rgb, labels > 0)], tmp_path, predictors={"soft": blurred_truth},
                             tile=32, overlap=8, figures=False)
    assert summary["results"]["soft"]["original"]["aji"] is None
    assert "AJI" not in (tmp_path / "table.md").read_text()
    assert not (tmp_path / "instances").exists()


def test_read_ground_truth_tells_instances_from_masks(tmp_path):
    _, labels = nuclei()
    write_instance_image(tmp_path / "labels.png", labels)
    Image.fromarray((labels > 0).astype(np.uint8) * 255).save(tmp_path / "mask.png")
    Image.fromarray(np.repeat(((labels > 0) * 255).astype(np.uint8)[..., None], 3, axis=2)).save(tmp_path / "rgb.png")
    found = read_ground_truth(tmp_path / "labels.png", labels.shape)
    assert found.dtype == np.int32 and np.array_equal(found, labels)
    for name in ("mask.png", "rgb.png"):
        mask = read_ground_truth(tmp_path / name, labels.shape)
        assert mask.dtype == bool and np.array_equal(mask, labels > 0)
    with pytest.raises(ValueError, match="does not match"):
        read_ground_truth(tmp_path / "labels.png", (10, 10))
    with pytest.raises(ValueError, match="65535"):
        write_instance_image(tmp_path / "big.png", np.full((2, 2), 70000))
