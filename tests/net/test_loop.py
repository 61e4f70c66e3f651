"""caffe_layers.net.training.loop (train) on small synthetic patches, with the real Caffe."""
import csv

import numpy as np
import pytest

from caffe_layers.cli import train as train_cli
from caffe_layers.net.training import loop as training
from caffe_layers.net.training import templates as unet

from test_templates import write_dataset

PATCH, BATCH, WIDTH = 32, 4, 8


def write_run(tmp_path, *, base_width=WIDTH, base_lr=3e-3, max_iter=40, snapshot=0, name="run"):
    """Small train/val net + solver in ``tmp_path``; returns (solver path, train_val path)."""
    list_file = tmp_path / "data" / "list.txt"
    if not list_file.exists():
        write_dataset(tmp_path / "data", n_images=4, size=64)
    net_path = tmp_path / f"{name}_train_val.prototxt"
    # fixed data seed, no augmentation: every fresh net sees the same first batch
    net_path.write_text(unet.net_to_text(unet.unet_train_val(
        str(list_file), str(list_file), centring="patchmean", batch_size=BATCH, patch_size=PATCH,
        base_width=base_width, seed=7)))
    solver_path = tmp_path / f"{name}_solver.prototxt"
    solver_path.write_text(unet.solver_to_text(unet.solver(
        str(net_path), base_lr=base_lr, max_iter=max_iter, snapshot_prefix=str(tmp_path / "snapshots" / name),
        test_iter=2, test_interval=10, snapshot=snapshot, random_seed=1)))
    return solver_path, net_path


def test_a_few_iterations_lower_the_loss_and_log_csv(caffe, tmp_path):
    solver_path, _ = write_run(tmp_path, max_iter=40)
    log_path = tmp_path / "logs" / "train.csv"
    result = training.train(solver_path, log_csv=log_path, progress=False)

    assert result.iterations == 40 and [it for it, _ in result.losses] == list(range(40))
    first, last = np.mean([loss for _, loss in result.losses[:5]]), np.mean([loss for _, loss in result.losses[-5:]])
    assert last < 0.6 * first, (first, last)
    assert [entry["iter"] for entry in result.validation] == [10, 20, 30, 40]
    assert 0 <= result.validation[-1]["val_dice"] <= 1 and result.validation[-1]["val_loss"] > 0

    rows = list(csv.DictReader(open(log_path)))
    assert len(rows) == 40 and float(rows[0]["loss"]) == pytest.approx(result.losses[0][1])
    assert {"val_loss", "val_dice", "val_accuracy"} <= set(rows[0])
    assert rows[9]["val_dice"] != "" and rows[8]["val_dice"] == ""

    # the final snapshot is always written
    assert result.caffemodel.endswith("run_iter_40.caffemodel")
    assert (tmp_path / "snapshots" / "run_iter_40.solverstate").is_file()


def test_retraining_starts_from_the_saved_weights(caffe, tmp_path):
    solver_path, net_path = write_run(tmp_path, max_iter=25)
    first_run = training.train(solver_path, progress=False, validate_every=0)

    # the saved model's loss on the first batch the data layer gives
    saved = caffe.Net(str(net_path), caffe.TRAIN, weights=first_run.caffemodel)
    saved_loss = float(saved.forward()["loss"])

    retrained = training.train(solver_path, weights=first_run.caffemodel, max_iter=2, progress=False,
                               validate_every=0)
    assert retrained.first_loss == pytest.approx(saved_loss, rel=1e-5)
    assert abs(first_run.first_loss - saved_loss) > 0.05  # a fresh net would not give this loss


def test_resume_continues_from_the_solverstate(caffe, tmp_path):
    solver_path, _ = write_run(tmp_path, max_iter=10, snapshot=5)
    first = training.train(solver_path, max_iter=5, progress=False, validate_every=0)
    assert first.solverstate.endswith("run_iter_5.solverstate")
    resumed = training.train(solver_path, resume=first.solverstate, progress=False, validate_every=0)
    assert [it for it, _ in resumed.losses] == list(range(5, 10))
    assert resumed.iterations == 10 and resumed.caffemodel.endswith("run_iter_10.caffemodel")


def test_missing_files_give_clear_errors(caffe, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope_solver.prototxt"):
        training.train(tmp_path / "nope_solver.prototxt", progress=False)
    solver_path, _ = write_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.caffemodel"):
        training.train(solver_path, weights=tmp_path / "nope.caffemodel", progress=False)
    with pytest.raises(FileNotFoundError, match="nope.solverstate"):
        training.train(solver_path, resume=tmp_path / "nope.solverstate", progress=False)

    broken_net = tmp_path / "broken_solver.prototxt"
    broken_net.write_text(f'net: "{tmp_path / "missing_net.prototxt"}"\nbase_lr: 0.01\n')
    with pytest.raises(FileNotFoundError, match="missing_net.prototxt"):
        training.train(broken_net, progress=False)
    broken_text = tmp_path / "garbled_solver.prototxt"
    broken_text.write_text("base_lr: fast\n")
    with pytest.raises(ValueError, match="garbled_solver.prototxt"):
        training.train(broken_text, progress=False)


def test_mismatched_weights_are_refused_before_caffe_aborts(caffe, tmp_path):
    solver_path, _ = write_run(tmp_path)
    # same layer names, half the channels
    narrow = tmp_path / "narrow_deploy.prototxt"
    narrow.write_text(unet.net_to_text(unet.unet_deploy(centring="patchmean", base_width=WIDTH // 2)))
    narrow_weights = tmp_path / "narrow.caffemodel"
    caffe.Net(str(narrow), caffe.TEST).save(str(narrow_weights))
    with pytest.raises(ValueError, match=r"does not fit the net: layer 'enc0_conv1' blob 0"):
        training.train(solver_path, weights=narrow_weights, progress=False)

    not_a_model = tmp_path / "notes.caffemodel"
    not_a_model.write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(ValueError, match="notes.caffemodel"):
        training.train(solver_path, weights=not_a_model, progress=False)


def test_console_entry(caffe, tmp_path, capsys):
    solver_path, _ = write_run(tmp_path, max_iter=3)
    log_path = tmp_path / "cli.csv"
    assert train_cli.main(["--solver", str(solver_path), "--log", str(log_path), "--no-progress"]) == 0
    assert len(list(csv.DictReader(open(log_path)))) == 3
    assert "trained to iteration 3" in capsys.readouterr().out

    assert train_cli.main(["--solver", str(tmp_path / "absent.prototxt")]) == 2
    assert "absent.prototxt" in capsys.readouterr().err


def test_a_few_iterations_on_real_he_patches_lower_the_loss(caffe, tmp_path):
    """The template flow on real tissue: hgsc_nest patches -> AugmentationLayer -> per-patch
    centring -> U-Net; the loss falls within a few dozen iterations."""
    from caffe_layers import sample_data
    from caffe_layers.experiment import regions as prepare

    rgb, instances = sample_data.load_hgsc_nest()
    crop = slice(0, 400)
    regions = prepare.split_regions(400, gap=8)
    lists = prepare.write_region_lists(rgb[crop, crop], sample_data.nucleus_mask(instances)[crop, crop],
                                       regions, tmp_path / "data")
    net_path = tmp_path / "real_train_val.prototxt"
    net_path.write_text(unet.net_to_text(unet.unet_train_val(
        str(lists["train"]), str(lists["val"]), centring="patchmean", batch_size=BATCH, patch_size=PATCH,
        base_width=WIDTH, augment_param_str=unet.DEFAULT_AUGMENT_PARAM_STR, seed=3)))
    solver_path = tmp_path / "real_solver.prototxt"
    solver_path.write_text(unet.solver_to_text(unet.solver(
        str(net_path), base_lr=3e-3, max_iter=60, snapshot_prefix=str(tmp_path / "real"),
        test_iter=2, test_interval=60, snapshot=0, random_seed=1)))
    result = training.train(solver_path, progress=False)
    losses = [loss for _, loss in result.losses]
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.75 * first, (first, last)
    assert 0 < result.validation[-1]["val_dice"] <= 1


CLASSIFIER = """
name: "PatchClassifier"
layer { name: "patches" type: "DummyData" top: "im" top: "cls"
  dummy_data_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } shape { dim: 4 }
                     data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "fc" type: "InnerProduct" bottom: "im" top: "logits"
  inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
layer { name: "acc" type: "Accuracy" bottom: "logits" bottom: "cls" top: "acc" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "logits" bottom: "cls" top: "loss" }
"""


def test_validation_finds_a_classifiers_own_blob_names(caffe, tmp_path, capsys):
    """A patch classifier whose scores and labels are not called score/label (DIGITS' ip2/label,
    a user's logits/cls) is validated through its loss layer's bottoms, with its Accuracy output."""
    net = tmp_path / "classifier.prototxt"
    net.write_text(CLASSIFIER)
    solver_path = tmp_path / "solver.prototxt"
    solver_path.write_text(f'net: "{net}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 4\ntest_iter: 2\n'
                           f'test_interval: 2\nsnapshot_prefix: "{tmp_path / "snap" / "cls"}"\nrandom_seed: 1\n')
    result = training.train(solver_path, progress=False)
    assert [entry["iter"] for entry in result.validation] == [2, 4]
    last = result.validation[-1]
    assert {"val_loss", "val_acc", "val_accuracy", "val_dice"} <= set(last)
    assert last["val_accuracy"] == pytest.approx(last["val_acc"])  # Caffe's own Accuracy agrees
    assert last["val_dice"] == pytest.approx(2 * last["val_accuracy"] / (1 + last["val_accuracy"]))
    log_path = tmp_path / "log.csv"
    assert train_cli.main(["--solver", str(solver_path), "--log", str(log_path), "--no-progress",
                           "--overwrite-snapshots"]) == 0  # the run above wrote the same snapshots
    assert "val_acc" in open(log_path).readline()


def test_the_log_never_replaces_an_input_or_an_existing_file(caffe, tmp_path, capsys):
    solver_path, net_path = write_run(tmp_path, max_iter=2)
    before = {path: path.read_bytes() for path in (solver_path, net_path)}
    for path in before:
        assert train_cli.main(["--solver", str(solver_path), "--log", str(path), "--no-progress"]) == 2
        assert f"log {path}: is one of the files training reads" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in before} == before
    log_path = tmp_path / "old.csv"
    log_path.write_text("a previous run\n")
    assert train_cli.main(["--solver", str(solver_path), "--log", str(log_path), "--no-progress"]) == 2
    assert "already exists (use --overwrite-log" in capsys.readouterr().err
    assert log_path.read_text() == "a previous run\n"
    assert train_cli.main(["--solver", str(solver_path), "--log", str(log_path), "--no-progress",
                           "--overwrite-log"]) == 0
    assert log_path.read_text().startswith("iter,loss")


IGNORING_CLASSIFIER = """
name: "IgnoringClassifier"
layer { name: "patches" type: "DummyData" top: "im" top: "kept" top: "ignored"
  dummy_data_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } shape { dim: 2 } shape { dim: 2 }
                     data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 }
                     data_filler { type: "constant" value: 255 } } }
layer { name: "labels" type: "Concat" bottom: "kept" bottom: "ignored" top: "cls" concat_param { axis: 0 } }
layer { name: "fc" type: "InnerProduct" bottom: "im" top: "logits"
  inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
layer { name: "acc" type: "Accuracy" bottom: "logits" bottom: "cls" top: "acc" include { phase: TEST }
  accuracy_param { ignore_label: 255 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "logits" bottom: "cls" top: "loss"
  loss_param { ignore_label: 255 } }
"""


def test_validation_does_not_score_ignored_labels(caffe, tmp_path):
    """Labels equal to the loss's ignore_label (255 here, half of every batch) are left out of the
    accuracy and Dice, as Caffe's own Accuracy layer with the same ignore_label leaves them out."""
    net = tmp_path / "ignoring.prototxt"
    net.write_text(IGNORING_CLASSIFIER)
    solver_path = tmp_path / "solver.prototxt"
    solver_path.write_text(f'net: "{net}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 2\ntest_iter: 2\n'
                           f'test_interval: 2\nsnapshot_prefix: "{tmp_path / "snap" / "cls"}"\nrandom_seed: 1\n')
    last = training.train(solver_path, progress=False).validation[-1]
    assert last["val_accuracy"] == pytest.approx(last["val_acc"])
    assert last["val_dice"] == pytest.approx(2 * last["val_accuracy"] / (1 + last["val_accuracy"]))


def test_snapshots_never_replace_the_start_or_an_earlier_run(caffe, tmp_path, capsys):
    solver_path, _ = write_run(tmp_path, max_iter=2)
    first = training.train(solver_path, progress=False, validate_every=0)
    model = open(first.caffemodel, "rb").read()
    with pytest.raises(FileExistsError, match=r"run_iter_2\.caffemodel: a snapshot of an earlier run"):
        training.train(solver_path, progress=False, validate_every=0)
    for start in (first.caffemodel, str(tmp_path / "snapshots" / "." / "run_iter_2.caffemodel")):
        with pytest.raises(ValueError, match="would snapshot iteration 2 over the weights it starts from"):
            training.train(solver_path, weights=start, progress=False, validate_every=0, overwrite_snapshots=True)
    assert open(first.caffemodel, "rb").read() == model
    # resuming at the last iteration trains nothing and keeps the state it was given
    state = open(first.solverstate, "rb").read()
    resumed = training.train(solver_path, resume=first.solverstate, progress=False, validate_every=0)
    assert resumed.caffemodel == first.caffemodel and open(first.solverstate, "rb").read() == state
    assert train_cli.main(["--solver", str(solver_path), "--no-progress"]) == 2
    assert "--overwrite-snapshots" in capsys.readouterr().err
    assert train_cli.main(["--solver", str(solver_path), "--no-progress", "--overwrite-snapshots"]) == 0
