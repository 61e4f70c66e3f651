"""The U-Net templates in prototxt/, their generator, and mean files, against the real Caffe."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caffe_layers import patches
from caffe_layers.cli import meanfile as meanfile_cli
from caffe_layers.net import meanfile
from caffe_layers.net.training import templates as unet

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTOTXT = REPO_ROOT / "prototxt"
PYTHON = sys.executable
TRAIN_VAL = ["unet_meanfile_train_val.prototxt", "unet_patchmean_train_val.prototxt"]
DEPLOY = ["unet_meanfile_deploy.prototxt", "unet_patchmean_deploy.prototxt"]


def write_dataset(directory, n_images=3, size=100, seed=0):
    """Synthetic H&E-like tiles (dark disks on pink) and masks as .npy; return the list file."""
    rng = np.random.default_rng(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    lines = []
    for index in range(n_images):
        mask = np.zeros((size, size), np.uint8)
        for _ in range(6):
            cy, cx, radius = rng.integers(6, size - 6, 2).tolist() + [int(rng.integers(4, 8))]
            mask |= ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2).astype(np.uint8)
        image = np.where(mask[..., None] > 0, (90, 40, 130), (230, 180, 200)) + rng.normal(0, 8, (size, size, 3))
        np.save(directory / f"image{index}.npy", np.clip(image, 0, 255).astype(np.uint8))
        np.save(directory / f"mask{index}.npy", mask)
        lines.append(f"image{index}.npy mask{index}.npy")
    list_file = directory / "list.txt"
    list_file.write_text("\n".join(lines) + "\n")
    return list_file


@pytest.fixture
def repo_like_cwd(tmp_path, monkeypatch):
    """A working directory with data/train_list.txt, data/val_list.txt and data/mean.binaryproto,
    the relative paths the committed templates use."""
    list_file = write_dataset(tmp_path / "data")
    (tmp_path / "data" / "train_list.txt").write_text(list_file.read_text())
    (tmp_path / "data" / "val_list.txt").write_text(list_file.read_text())
    meanfile.write_mean_binaryproto(tmp_path / "data" / "mean.binaryproto",
                                    np.full((3, 96, 96), 128, np.float32))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_committed_prototxt_equal_generator_output():
    templates = unet.default_templates()
    assert set(templates) == {path.name for path in PROTOTXT.glob("*.prototxt")}
    for name, text in templates.items():
        assert (PROTOTXT / name).read_text() == text, f"{name} is stale: run scripts/make_prototxt.py"


def test_make_prototxt_check_reports_stale_files(tmp_path):
    script = str(REPO_ROOT / "scripts" / "make_prototxt.py")
    env = dict(os.environ, GLOG_minloglevel="2")
    assert subprocess.run([PYTHON, script, "--check"], env=env, capture_output=True).returncode == 0
    subprocess.run([PYTHON, script, "--out", str(tmp_path)], env=env, check=True, capture_output=True)
    (tmp_path / "solver_scratch.prototxt").write_text("# edited\n")
    result = subprocess.run([PYTHON, script, "--check", "--out", str(tmp_path)], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "solver_scratch.prototxt" in result.stderr and "unet_meanfile" not in result.stderr
    (tmp_path / "solver_scratch.prototxt").write_text(unet.default_templates()["solver_scratch.prototxt"])
    (tmp_path / "old_net.prototxt").write_text("# no longer generated\n")
    result = subprocess.run([PYTHON, script, "--check", "--out", str(tmp_path)], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 1 and "not generated any more" in result.stderr
    assert "old_net.prototxt" in result.stderr


@pytest.mark.parametrize("name", TRAIN_VAL)
def test_train_val_templates_augment_raw_pixels_before_centring(name):
    """The augmentation changes raw stain intensities: it must come before any centring, and
    only in TRAIN; the deploy twins have no augmentation."""
    from caffe.proto import caffe_pb2
    from google.protobuf import text_format

    net = text_format.Parse((PROTOTXT / name).read_text(), caffe_pb2.NetParameter())
    layers = [layer.name for layer in net.layer]
    augment = net.layer[layers.index("augment")]
    assert augment.python_param.layer == "AugmentationLayer"
    assert [rule.phase for rule in augment.include] == [caffe_pb2.TRAIN]
    centring = [i for i, layer in enumerate(net.layer) if layer.type in ("MVN", "Python")
                and layer.name != "augment" and layer.python_param.layer != "PatchDataLayer"]
    assert centring and layers.index("augment") < min(centring), layers
    deploy = (PROTOTXT / name.replace("train_val", "deploy")).read_text()
    assert "AugmentationLayer" not in deploy


@pytest.mark.parametrize("name", TRAIN_VAL)
def test_train_val_templates_construct_and_run_in_both_phases(caffe, repo_like_cwd, name):
    for phase in (caffe.TRAIN, caffe.TEST):
        net = caffe.Net(str(PROTOTXT / name), phase)
        assert net.blobs["data"].data.shape == (8, 3, 96, 96)
        assert net.blobs["label"].data.shape == (8, 1, 96, 96)
        outputs = net.forward()
        assert np.isfinite(outputs["loss"]) and 0 < outputs["loss"] < 5
        assert net.blobs["score"].data.shape == (8, 2, 96, 96)
        # augmentation only in TRAIN; accuracy only in TEST
        assert ("augment" in net._layer_names) == (phase == caffe.TRAIN)
        assert ("accuracy" in outputs) == (phase == caffe.TEST)


@pytest.mark.parametrize("name", DEPLOY)
def test_deploy_templates_give_probabilities_for_any_size(caffe, repo_like_cwd, name):
    net = caffe.Net(str(PROTOTXT / name), caffe.TEST)
    rng = np.random.default_rng(1)
    for height, width in [(96, 96), (97, 61), (33, 35)]:  # odd sizes go through Crop
        image = rng.uniform(0, 255, (3, height, width)).astype(np.float32)
        net.blobs["data"].reshape(1, 3, height, width)
        net.reshape()
        net.blobs["data"].data[...] = image
        prob = net.forward()["prob"]
        assert prob.shape == (1, 2, height, width)
        np.testing.assert_allclose(prob.sum(axis=1), 1, atol=1e-5)
        assert (prob >= 0).all()


@pytest.mark.parametrize("centring", unet.CENTRINGS)
def test_deploy_and_train_val_share_learnable_layers(caffe, repo_like_cwd, centring):
    train = caffe.Net(str(PROTOTXT / f"unet_{centring}_train_val.prototxt"), caffe.TRAIN)
    deploy = caffe.Net(str(PROTOTXT / f"unet_{centring}_deploy.prototxt"), caffe.TEST)
    shapes = lambda net: {name: [blob.data.shape for blob in blobs] for name, blobs in net.params.items()}  # noqa: E731
    assert shapes(train) == shapes(deploy)


def test_generated_variants_construct(caffe, tmp_path):
    # depth 3, 4×4 upsampling, odd patch size (needs the Crop), both centrings
    list_file = write_dataset(tmp_path / "data", n_images=2, size=60)
    mean_path = tmp_path / "mean.binaryproto"
    meanfile.write_mean_binaryproto(mean_path, np.full((3, 4, 4), 100, np.float32))
    for centring, mean_file in (("meanfile", str(mean_path)), ("patchmean", None)):
        proto = unet.unet_train_val(str(list_file), str(list_file), centring=centring, mean_file=mean_file,
                                    augment_param_str=unet.DEFAULT_AUGMENT_PARAM_STR, batch_size=2,
                                    patch_size=45, depth=3, base_width=4, upsample_kernel=4, seed=3)
        path = tmp_path / f"{centring}.prototxt"
        path.write_text(unet.net_to_text(proto))
        net = caffe.Net(str(path), caffe.TRAIN)
        assert net.forward()["loss"] > 0
        assert net.blobs["score"].data.shape == (2, 2, 45, 45)


def test_generator_rejects_bad_options():
    with pytest.raises(ValueError, match="mean_file"):
        unet.unet_deploy(centring="meanfile")
    with pytest.raises(ValueError, match="centring"):
        unet.unet_deploy(centring="zscore")
    with pytest.raises(ValueError, match="upsample_kernel"):
        unet.unet_deploy(centring="patchmean", upsample_kernel=3)
    with pytest.raises(ValueError, match="depth"):
        unet.unet_train_val("a", "b", centring="patchmean", depth=0)


def test_solver_templates_parse_and_point_at_committed_net(caffe):
    from caffe_layers.net.training import read_solver_param

    scratch = read_solver_param(PROTOTXT / "solver_scratch.prototxt")
    finetune = read_solver_param(PROTOTXT / "solver_finetune.prototxt")
    for param in (scratch, finetune):
        assert (REPO_ROOT / param.net).is_file()
        assert param.solver_mode == param.CPU and param.type == "Adam"
    assert finetune.base_lr < scratch.base_lr


# --- mean files -------------------------------------------------------------------------------

def test_compute_mean_image_per_pixel_and_per_channel():
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (5, 7, 3)).astype(np.uint8) for _ in range(3)]
    per_pixel = patches.compute_mean_image(images)
    assert per_pixel.shape == (3, 5, 7) and per_pixel.dtype == np.float32
    np.testing.assert_allclose(per_pixel, np.mean(images, axis=0).transpose(2, 0, 1), rtol=1e-6)

    sizes = [(5, 7), (9, 4)]  # any sizes, and an alpha channel that must be ignored
    rgba = [rng.integers(0, 256, size + (4,)).astype(np.uint8) for size in sizes]
    per_channel = patches.compute_mean_image(iter(rgba), patch_size=6)
    assert per_channel.shape == (3, 6, 6)
    pixels = np.concatenate([image[..., :3].reshape(-1, 3) for image in rgba])
    np.testing.assert_allclose(per_channel[:, 2, 3], pixels.mean(axis=0), rtol=1e-6)
    assert np.ptp(per_channel, axis=(1, 2)).max() == 0

    with pytest.raises(ValueError, match="patch_size"):
        patches.compute_mean_image(rgba)
    with pytest.raises(ValueError, match="RGB"):
        patches.compute_mean_image([np.zeros((4, 4))])
    with pytest.raises(ValueError, match="at least one"):
        patches.compute_mean_image([])


def test_mean_binaryproto_round_trip_through_caffe_io(caffe, tmp_path):
    from caffe.proto import caffe_pb2

    mean = np.random.default_rng(3).uniform(0, 255, (3, 8, 6)).astype(np.float32)
    path = tmp_path / "sub" / "mean.binaryproto"
    meanfile.write_mean_binaryproto(path, mean)
    blob = caffe_pb2.BlobProto()
    blob.ParseFromString(path.read_bytes())
    as_caffe_reads_it = caffe.io.blobproto_to_array(blob)
    assert as_caffe_reads_it.shape == (1, 3, 8, 6)
    np.testing.assert_allclose(as_caffe_reads_it[0], mean, rtol=1e-6)
    np.testing.assert_allclose(meanfile.read_mean_binaryproto(path), mean, rtol=1e-6)


def _memory_data_with_mean_file(path, mean_file):
    path.write_text(f"""
layer {{ name: "data" type: "MemoryData" top: "data" top: "label"
  memory_data_param {{ batch_size: 1 channels: 3 height: 8 width: 6 }}
  transform_param {{ mean_file: "{mean_file}" }} }}
""")


def test_mean_file_is_accepted_by_caffe_transform_param(caffe, tmp_path):
    # Caffe's DataTransformer reads transform_param.mean_file in C++ when a data layer is set
    # up (MemoryData hosts it here: no database or OpenCV needed);
    # a bad file aborts the process, hence the subprocess.
    good, bad = tmp_path / "mean.binaryproto", tmp_path / "bad.binaryproto"
    meanfile.write_mean_binaryproto(good, np.full((3, 8, 6), 10, np.float32))
    bad.write_bytes(b"\xff\xff not a blob")
    code = "import sys, caffe; caffe.Net(sys.argv[1], caffe.TEST); print('ok')"
    env = dict(os.environ, GLOG_minloglevel="2")
    for mean_file, expect_ok in ((good, True), (bad, False)):
        net_path = tmp_path / f"net_{mean_file.stem}.prototxt"
        _memory_data_with_mean_file(net_path, mean_file)
        result = subprocess.run([PYTHON, "-c", code, str(net_path)], env=env, capture_output=True, text=True)
        assert (result.returncode == 0 and "ok" in result.stdout) == expect_ok, result.stderr[-2000:]


def _mean_subtract_net(tmp_path, mean_file, height, width):
    path = tmp_path / f"mean_subtract_{height}x{width}.prototxt"
    path.write_text(f"""
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: 3 dim: {height} dim: {width} }} }} }}
layer {{ name: "centre" type: "Python" bottom: "data" top: "centred"
  python_param {{ module: "caffe_layers.mean_subtract" layer: "MeanSubtractLayer"
                  param_str: '{{"mean_file": "{mean_file}"}}' }} }}
""")
    return str(path)


def test_mean_subtract_layer(caffe, tmp_path):
    rng = np.random.default_rng(4)
    mean = rng.uniform(0, 255, (3, 8, 6)).astype(np.float32)
    mean_path = tmp_path / "mean.binaryproto"
    meanfile.write_mean_binaryproto(mean_path, mean)
    data = rng.uniform(0, 255, (2, 3, 8, 6)).astype(np.float32)

    same_size = caffe.Net(_mean_subtract_net(tmp_path, mean_path, 8, 6), caffe.TEST)
    same_size.blobs["data"].data[...] = data
    np.testing.assert_allclose(same_size.forward()["centred"], data - mean, atol=1e-4)

    # another size (whole images at deploy time): the per-channel mean
    other = caffe.Net(_mean_subtract_net(tmp_path, mean_path, 5, 9), caffe.TEST)
    other_data = rng.uniform(0, 255, (2, 3, 5, 9)).astype(np.float32)
    other.blobs["data"].data[...] = other_data
    np.testing.assert_allclose(other.forward()["centred"],
                               other_data - mean.mean(axis=(1, 2))[:, None, None], atol=1e-3)


def test_mean_subtract_layer_errors_name_the_file(caffe, tmp_path):
    missing = tmp_path / "missing.binaryproto"
    with pytest.raises(ValueError, match="missing.binaryproto"):
        caffe.Net(_mean_subtract_net(tmp_path, missing, 4, 4), caffe.TEST)
    garbage = tmp_path / "garbage.binaryproto"
    garbage.write_bytes(b"\xff\xfe\x00 definitely not protobuf")
    with pytest.raises(ValueError, match="garbage.binaryproto"):
        caffe.Net(_mean_subtract_net(tmp_path, garbage, 4, 4), caffe.TEST)


def test_meanfile_console_entry(caffe, tmp_path, capsys):
    list_file = write_dataset(tmp_path / "data", n_images=2, size=40)
    output = tmp_path / "mean.binaryproto"
    assert meanfile_cli.main(["--list", str(list_file), "--output", str(output), "--patch-size", "16"]) == 0
    mean = meanfile.read_mean_binaryproto(output)
    images = [np.load(tmp_path / "data" / f"image{i}.npy") for i in range(2)]
    assert mean.shape == (3, 16, 16)
    np.testing.assert_allclose(mean[:, 0, 0], np.concatenate(images).reshape(-1, 3).mean(axis=0), rtol=1e-5)

    assert meanfile_cli.main(["--list", str(tmp_path / "nope.txt"), "--output", str(output)]) == 2
    assert "nope.txt" in capsys.readouterr().err


def test_caffe_tool_trains_committed_net_and_deploy_loads_the_weights(caffe, run_caffe_tool, repo_like_cwd):
    # The user's flow from the repository root: `caffe train` on the committed nets (the
    # committed solver differs only in max_iter and snapshot_prefix), then deploy.
    (repo_like_cwd / "prototxt").symlink_to(PROTOTXT)
    param = unet.solver("prototxt/unet_patchmean_train_val.prototxt", base_lr=1e-3, max_iter=2,
                        snapshot_prefix="snapshots/tool", test_iter=1, test_interval=2, snapshot=0)
    (repo_like_cwd / "solver.prototxt").write_text(unet.solver_to_text(param))
    (repo_like_cwd / "snapshots").mkdir()
    run_caffe_tool("train", "-solver", "solver.prototxt", cwd=repo_like_cwd)
    weights = repo_like_cwd / "snapshots" / "tool_iter_2.caffemodel"
    assert weights.is_file()
    deploy = caffe.Net(str(PROTOTXT / "unet_patchmean_deploy.prototxt"), caffe.TEST, weights=str(weights))
    prob = deploy.forward()["prob"]
    assert prob.shape == (1, 2, 96, 96)


def test_non_finite_mean_file_is_refused(caffe, tmp_path):
    path = tmp_path / "nan.binaryproto"
    meanfile.write_mean_binaryproto(path, np.full((3, 4, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"nan\.binaryproto holds NaN or infinite values"):
        meanfile.read_mean_binaryproto(path)
    with pytest.raises(FileExistsError, match="already exists"):
        meanfile.write_mean_binaryproto(path, np.zeros((3, 4, 4), np.float32))
