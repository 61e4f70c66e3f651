"""Every command, run on its own input folder, leaves every input byte-identical.

The folder holds what a user has there: real H&E, a ground-truth mask named ``<name>_mask.png``,
a list file, a deploy net and its weights. Each command is pointed at that same folder for its
outputs (the careless case); whatever it refuses or writes, no input changes.
"""
import hashlib
import textwrap

import numpy as np
import pytest
from PIL import Image

from caffe_layers import sample_data
from caffe_layers.cli import compare, estimate, meanfile, normalize, prepare, segment, train

DEPLOY = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "score"
  convolution_param { num_output: 2 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }
"""
TRAIN_VAL = """
name: "tiny_train"
layer { name: "data" type: "Python" top: "data" top: "label"
  python_param { module: "caffe_layers.data" layer: "PatchDataLayer"
                 param_str: '{"source": "LIST", "batch_size": 2, "patch_size": 32, "seed": 1}' } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "score"
  convolution_param { num_output: 2 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }
"""


def fingerprint(folder):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.iterdir()) if path.is_file()}


@pytest.fixture
def data_folder(caffe, tmp_path):
    rgb, instances = sample_data.load_hgsc_nest()
    folder = tmp_path / "lab"
    folder.mkdir()
    for name, rows in (("a", slice(0, 64)), ("b", slice(200, 264))):
        Image.fromarray(rgb[rows, :80]).save(folder / f"{name}.png")
        Image.fromarray((sample_data.nucleus_mask(instances)[rows, :80] > 0).astype(np.uint8) * 255).save(
            folder / f"{name}_mask.png")
    (folder / "list.txt").write_text("a.png a_mask.png\nb.png b_mask.png\n")
    (folder / "deploy.prototxt").write_text(DEPLOY)
    net = caffe.Net(str(folder / "deploy.prototxt"), caffe.TEST)
    net.save(str(folder / "weights.caffemodel"))
    (folder / "train_val.prototxt").write_text(TRAIN_VAL.replace("LIST", str(folder / "list.txt")))
    (folder / "solver.prototxt").write_text(textwrap.dedent(f"""
        net: "{folder / 'train_val.prototxt'}"
        base_lr: 0.001
        lr_policy: "fixed"
        max_iter: 2
        solver_mode: CPU
        snapshot_prefix: "{tmp_path / 'snapshots' / 'run'}"
        """))
    return folder


def run_all(folder):
    lab = str(folder)
    image, mask = str(folder / "a.png"), str(folder / "a_mask.png")
    model = [str(folder / "deploy.prototxt"), str(folder / "weights.caffemodel")]
    return {
        "normalize into its input folder": normalize.main([lab, "--template", image, "--output", lab]),
        "normalize --overwrite into its input folder": normalize.main(
            [lab, "--template", image, "--output", lab, "--overwrite"]),
        "normalize onto its template": normalize.main([str(folder / "b.png"), "--template", image, "--output", image]),
        "estimate": estimate.main(["--train", image, "--test", str(folder / "b.png")]),
        "segment into the data folder": segment.main(
            ["--model", model[0], "--weights", model[1], "--out", lab, "--tile", "32", "--overlap", "8",
             "--no-progress", image]),
        "segment again": segment.main(
            ["--model", model[0], "--weights", model[1], "--out", lab, "--tile", "32", "--overlap", "8",
             "--no-progress", image]),
        "compare into the data folder": compare.main(
            ["--model", "m", *model, "--image", image, "--mask", mask, "--out", lab, "--tile", "32",
             "--overlap", "8", "--no-figures"]),
        "meanfile onto its list": meanfile.main(["--list", str(folder / "list.txt"), "--output",
                                                 str(folder / "list.txt")]),
        "meanfile onto an image": meanfile.main(["--list", str(folder / "list.txt"), "--output", image]),
        "prepare into the data folder": prepare.main(["--out", lab]),
        "prepare again": prepare.main(["--out", lab]),
        "train": train.main(["--solver", str(folder / "solver.prototxt"), "--no-progress"]),
    }


def test_no_command_changes_an_input(data_folder, capsys):
    before = fingerprint(data_folder)
    codes = run_all(data_folder)
    after = {name: digest for name, digest in fingerprint(data_folder).items() if name in before}
    assert after == before, codes
    # What had to be refused was refused (exit 2), the rest ran (exit 0).
    refused = {name for name, code in codes.items() if code == 2}
    assert refused == {"normalize into its input folder", "normalize --overwrite into its input folder",
                       "normalize onto its template", "segment again", "meanfile onto its list",
                       "meanfile onto an image", "prepare again"}, codes
    assert all(code == 0 for name, code in codes.items() if name not in refused), codes
    # The prediction never takes the ground truth's name.
    assert (data_folder / "a_pred.png").is_file() and (data_folder / "a_mask.png").is_file()


def test_an_output_that_is_a_hard_link_of_an_input_is_refused(data_folder, capsys):
    # Another name of the same file (a hard link, or a case variant on a case-insensitive disk).
    image = data_folder / "a.png"
    (data_folder / "link.png").hardlink_to(image)
    (data_folder / "link.binaryproto").hardlink_to(image)
    before = image.read_bytes()
    assert normalize.main([str(data_folder / "b.png"), "--template", str(image), "--output",
                           str(data_folder / "link.png"), "--overwrite"]) == 2
    assert meanfile.main(["--list", str(data_folder / "list.txt"), "--output", str(data_folder / "link.binaryproto"),
                          "--overwrite"]) == 2
    assert capsys.readouterr().err.count("would replace") == 2
    assert image.read_bytes() == before
