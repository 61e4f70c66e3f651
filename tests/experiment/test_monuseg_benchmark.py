"""The MoNuSeg benchmark: its data split and training masks (no Caffe), and a smoke run on real
tiles with real Caffe (two tiles per split, a few iterations) whose seeds combine into one table."""
import csv
import json

import numpy as np
import pytest

from caffe_layers.experiment import monuseg_data
from monuseg_model import monuseg_root as find_monuseg_root


@pytest.fixture(scope="module")
def monuseg_root():
    return find_monuseg_root()  # the shared copy, or a skip/failure naming where it was looked for


def test_separate_touching_cuts_a_line_between_touching_nuclei_only():
    labels = np.zeros((6, 9), np.int32)
    labels[1:5, 1:4] = 1  # touches nucleus 2 along column 3 | 4
    labels[1:5, 4:7] = 2
    labels[1:3, 8] = 3  # alone
    mask = monuseg_data.separate_touching(labels)
    assert not mask[1:5, 3].any() and not mask[1:5, 4].any()  # both sides of the contact line
    assert mask[1:5, 1:3].all() and mask[1:5, 5:7].all()
    assert mask[1:3, 8].all()  # a lone nucleus keeps every pixel
    assert not mask[labels == 0].any()


def test_resampling_keeps_instance_ids_and_probability_range():
    labels = np.kron(np.arange(12, dtype=np.int32).reshape(3, 4), np.ones((4, 4), np.int32))
    small = monuseg_data.resample_labels(labels, (6, 8))
    assert set(np.unique(small)) == set(range(12))
    prob = np.linspace(0, 1, 48, dtype=np.float32).reshape(6, 8)
    big = monuseg_data.resample_probability(prob, (12, 16))
    assert big.shape == (12, 16) and 0 <= big.min() and big.max() <= 1


def test_split_by_site_holds_out_whole_sites(monuseg_root):
    from caffe_layers.monuseg import find_tiles

    tiles = find_tiles(monuseg_root)
    train, val, test = monuseg_data.split_by_site(tiles, ("21", "AR", "CH", "DK", "NH"))
    assert {t.site for t in val} == {"21", "AR", "CH", "DK", "NH"}
    assert not {t.site for t in train} & {t.site for t in val}
    assert len(train) + len(val) == 30 and len(test) == 14
    with pytest.raises(ValueError, match="ZZ"):
        monuseg_data.split_by_site(tiles, ("ZZ",))


def test_tiny_benchmark_runs_and_seeds_combine(caffe, monuseg_root, tmp_path, capfd):
    from caffe_layers.cli.experiment import main

    out = tmp_path / "monuseg"
    args = ["--dataset", "monuseg", "--data", str(monuseg_root), "--tiny", "--out", str(out), "--engine", "caffe"]
    assert main(args + ["--seed", "0"]) == 0
    assert main(args + ["--seed", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert {r["seed"] for r in rows} == {"0", "1"}
    assert {r["row"] for r in rows} >= {"meanfile", "meanfile+aug", "patchmean", "patchmean+aug",
                                        "patchmean+aug-trainsites", "patchmean+macenko", "patchmean+aug+macenko"}
    for row in rows:
        for key in ("dice", "aji", "pq"):
            assert 0 <= float(row[key]) <= 1
    table = (out / "table.md").read_text()
    assert "±" in table and "test AJI" in table
    card = (out / "models" / "patchmean_aug" / "model_card.yaml").read_text()
    assert "mpp: 0.5" in card
    assert any(p.name.startswith("overlay_") for p in (out / "figures").iterdir())
    # A third run with the same seeds does no work: both seeds are on record.
    assert main(args + ["--seed", "0", "--seeds", "2"]) == 0
    assert json.loads((out / "summary.json").read_text())["seeds"] == [0, 1]
    # A seed stopped after its trainings (its record missing) is scored again from its weights.
    first = (out / "seeds" / "seed_1.json").read_text()
    (out / "seeds" / "seed_1.json").unlink()
    assert main(args + ["--seed", "1"]) == 0
    assert "reusing the completed training of patchmean (seed 1)" in capfd.readouterr().err
    assert json.loads((out / "seeds" / "seed_1.json").read_text())["test"] == json.loads(first)["test"]
