import csv
import json

import numpy as np
import pytest
from PIL import Image

from caffe_layers.cli.compare import main as compare_main
from caffe_layers.net.inference.compare import ModelSpec, compare_models
from caffe_layers.net.inference.caffe_engine import CaffeSegmenter
from caffe_layers.reports import save_comparison_figure, write_table
from caffe_layers.tiling import segment_tiled

from test_image_files import make_tiny_net


@pytest.fixture
def two_models(caffe, tmp_path):
    return [ModelSpec(name, *make_tiny_net(caffe, tmp_path / name, seed))
            for name, seed in (("alpha", 0), ("beta", 1))]


def test_write_table_and_figure(tmp_path):
    rows = [dict(model="m", condition="original", images=2, pixels=10, dice=0.5, iou=1 / 3,
                 object_f1=None, precision=None, recall=1.0)]
    md, csv_path = write_table(rows, tmp_path / "t")
    text = md.read_text()
    assert "| m | original | 2 | 10 | 0.5000 | 0.3333 | n/a | n/a | 1.0000 |" in text
    with open(csv_path) as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["dice"] == "0.5000" and row["object_f1"] == ""
    rgb = np.zeros((50, 60, 3), np.uint8)
    path = save_comparison_figure(tmp_path / "f" / "fig.png",
                                  [("input", rgb), ("truth", None), ("mask", rgb[..., 0] > 0)],
                                  title="blank")
    assert Image.open(path).size[0] > Image.open(path).size[1]
    with pytest.raises(ValueError, match="panel"):
        save_comparison_figure(tmp_path / "x.png", [])


def test_compare_models(two_models, tmp_path):
    rng = np.random.default_rng(0)
    rgb_a = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
    rgb_b = rng.integers(0, 256, (33, 30, 3), dtype=np.uint8)
    truth_a = rng.random((40, 52)) < 0.3
    blank = np.zeros((20, 24, 3), np.uint8)
    images = [("a", rgb_a, truth_a), ("b", rgb_b, None), ("blank", blank, np.zeros((20, 24)))]
    # A stand-in stain normalisation (the real one is stain.match_histograms).
    conditions = {"original": None, "inverted": lambda rgb: 255 - np.asarray(rgb)}
    out = tmp_path / "cmp"
    summary = compare_models(two_models, images, out, conditions=conditions, tile=16,
                             overlap=4)

    results = json.loads((out / "summary.json").read_text())["results"]
    assert results == json.loads(json.dumps(summary["results"]))
    for model in ("alpha", "beta"):
        for condition in ("original", "inverted"):
            r = results[model][condition]
            assert r["images"] == 2 and r["images_segmented"] == 3
            assert r["pixels"] == 40 * 52 + 20 * 24
            assert all(0 <= r[k] <= 1 for k in ("dice", "iou", "object_f1"))
    # Pooled Dice equals the Dice of the image with truth, since the blank adds no counts
    # unless the model predicts nuclei there; check against a direct computation.
    predict = CaffeSegmenter(two_models[0].deploy, two_models[0].weights)
    pred_a = segment_tiled(predict, rgb_a, 16, 4) > 0.5
    pred_blank = segment_tiled(predict, blank, 16, 4) > 0.5
    tp = np.sum(pred_a & truth_a)
    fp = np.sum(pred_a & ~truth_a) + pred_blank.sum()
    fn = np.sum(~pred_a & truth_a)
    assert results["alpha"]["original"]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))

    with open(out / "table.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["model"], r["condition"]) for r in rows] == [
        ("alpha", "original"), ("alpha", "inverted"), ("beta", "original"), ("beta", "inverted")]
    assert all(r["images"] == "2" for r in rows)
    assert (out / "table.md").read_text().count("\n") == 2 + 4
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == sorted(f"{i}_{c}.png" for i in ("a", "b", "blank")
                             for c in ("original", "inverted"))
    assert len(summary["per_image"]) == 2 * 2 * 2


def test_compare_without_truth_has_no_scores(two_models, tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    summary = compare_models(two_models[:1], [("x", rgb, None)], tmp_path, tile=16, overlap=4,
                             figures=False)
    r = summary["results"]["alpha"]["original"]
    assert r["dice"] is None and r["images"] == 0 and r["images_segmented"] == 1
    assert "n/a" in (tmp_path / "table.md").read_text()
    assert not (tmp_path / "figures").exists()
    with pytest.raises(ValueError, match="mask shape"):
        compare_models(two_models[:1], [("x", rgb, np.zeros((3, 3)))], tmp_path)
    with pytest.raises(ValueError, match="unique"):
        compare_models(two_models[:1] * 2, [("x", rgb, None)], tmp_path)


def test_compare_with_template(two_models, tmp_path):
    pytest.importorskip("caffe_layers.stain")
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    template = rng.integers(100, 200, (32, 32, 3), dtype=np.uint8)
    summary = compare_models(two_models, [("x", rgb, rng.random((32, 32)) < 0.5)], tmp_path,
                             template_rgb=template, tile=16, overlap=4)
    assert summary["conditions"] == ["original", "matched"]
    assert summary["results"]["beta"]["matched"]["images"] == 1


def test_compare_cli(two_models, tmp_path, capsys):
    rng = np.random.default_rng(3)
    for name in ("p", "q"):
        Image.fromarray(rng.integers(0, 256, (28, 36, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    Image.fromarray(((rng.random((28, 36)) < 0.4) * 255).astype(np.uint8)).save(tmp_path / "p_mask.png")
    out = tmp_path / "out"
    models = [arg for m in two_models for arg in ("--model", m.name, str(m.deploy), str(m.weights))]
    argv = models + ["--image", str(tmp_path / "p.png"), "--mask", str(tmp_path / "p_mask.png"),
                     "--image", str(tmp_path / "q.png"), "--out", str(out),
                     "--tile", "16", "--overlap", "4"]
    assert compare_main(argv) == 0
    assert "| alpha | original | 1 | 1008 |" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["results"]["beta"]["original"]["images"] == 1
    assert summary["results"]["beta"]["original"]["images_segmented"] == 2
    assert (out / "figures" / "q_original.png").is_file()
    # Run again into the same folder: refused before anything runs, nothing replaced...
    written = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    assert compare_main(argv) == 2
    assert "table.md: already exists, from an earlier comparison (use --overwrite" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == written
    # ...unless asked.
    assert compare_main(argv + ["--overwrite"]) == 0
    capsys.readouterr()
    # A mask of the wrong size is reported with its file name.
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "small.png")
    argv_bad = models + ["--image", str(tmp_path / "p.png"), "--mask", str(tmp_path / "small.png"),
                         "--out", str(out)]
    assert compare_main(argv_bad) == 2
    assert "small.png" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare_main(models + ["--mask", str(tmp_path / "p_mask.png"), "--out", str(out)])


def test_compare_never_writes_over_an_input_even_with_overwrite(two_models, tmp_path, capsys):
    # The figure of image "p" (condition original) is figures/p_original.png: here an input.
    rng = np.random.default_rng(4)
    (tmp_path / "figures").mkdir()
    for path in (tmp_path / "p.png", tmp_path / "figures" / "p_original.png"):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)
    before = (tmp_path / "figures" / "p_original.png").read_bytes()
    model = two_models[0]
    argv = ["--model", model.name, str(model.deploy), str(model.weights), "--image", str(tmp_path / "p.png"),
            "--image", str(tmp_path / "figures" / "p_original.png"), "--out", str(tmp_path), "--tile", "16",
            "--overlap", "4", "--overwrite"]
    assert compare_main(argv) == 2
    assert "would replace the input" in capsys.readouterr().err
    assert (tmp_path / "figures" / "p_original.png").read_bytes() == before
    assert not (tmp_path / "summary.json").exists()


def test_a_blank_template_is_a_one_line_warning(two_models, tmp_path, capsys):
    Image.fromarray(np.random.default_rng(5).integers(0, 200, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    Image.fromarray(np.full((20, 20, 3), 255, np.uint8)).save(tmp_path / "blank.png")
    model = two_models[0]
    assert compare_main(["--model", model.name, str(model.deploy), str(model.weights), "--image",
                         str(tmp_path / "p.png"), "--template", str(tmp_path / "blank.png"), "--out",
                         str(tmp_path / "out"), "--tile", "16", "--overlap", "4", "--no-figures"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "engine" not in line]
    assert lines == ["caffe-stain-compare: warning: reference has no tissue pixels (mask empty); "
                     "returning the image unchanged"], lines


def test_comparison_figure_wraps_panels_into_a_grid(tmp_path):
    rgb = np.zeros((50, 50, 3), np.uint8)
    panels = [(f"panel {i}", rgb) for i in range(10)]
    row = Image.open(save_comparison_figure(tmp_path / "row.png", panels, panel_size=3.0)).size
    grid = Image.open(save_comparison_figure(tmp_path / "grid.png", panels, panel_size=3.0, columns=4)).size
    assert row[0] / row[1] > 5  # one strip
    assert grid[0] == row[0] * 4 // 10 and grid[1] > 2.5 * row[1]  # 4 columns, 3 rows
