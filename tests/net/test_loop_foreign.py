"""train() on nets written the way older and foreign Caffe nets are: a loss without a top, a
test_interval meaning "never", a run that diverges without reaching NaN."""
import re

import pytest

from caffe_layers.net.training import loop as training

# A V1-era habit: the loss layer has no top (Caffe gives it an anonymous one).
NO_TOP = """
name: "NoTopLoss"
layer { name: "patches" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 3 dim: 6 dim: 6 } shape { dim: 4 }
                     data_filler { type: "gaussian" std: 20 } data_filler { type: "constant" value: 1 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" }
"""


def solver(tmp_path, *, base_lr=0.001, max_iter=3, extra=""):
    net = tmp_path / "net.prototxt"
    net.write_text(NO_TOP)
    path = tmp_path / "solver.prototxt"
    (tmp_path / "snap").mkdir(exist_ok=True)  # the caffe tool aborts when it cannot snapshot
    path.write_text(f'net: "{net}"\nbase_lr: {base_lr}\nlr_policy: "fixed"\nmax_iter: {max_iter}\ndisplay: 1\n'
                    f'snapshot_prefix: "{tmp_path / "snap" / "run"}"\nrandom_seed: 5\n{extra}')
    return path


def test_a_loss_without_top_is_logged_as_caffe_prints_it(caffe, tmp_path, run_caffe_tool):
    path = solver(tmp_path, max_iter=1)
    printed = run_caffe_tool("train", f"--solver={path}", cwd=tmp_path).stderr
    caffe_loss = float(re.search(r"Iteration 0.*loss = ([-\d.e+]+)", printed).group(1))
    result = training.train(path, progress=False, overwrite_snapshots=True)
    assert caffe_loss > 1
    assert result.losses[0][1] == pytest.approx(caffe_loss, rel=1e-4)


def test_a_test_interval_beyond_max_iter_never_validates(caffe, tmp_path):
    test_net = tmp_path / "net.prototxt"
    path = solver(tmp_path, max_iter=3, extra=f'test_net: "{test_net}"\ntest_iter: 1\ntest_interval: 999999999\n')
    calls = []
    result = training.train(path, progress=False, validate_fn=lambda s: calls.append(s.iter) or {"val_loss": 0.0})
    assert result.iterations == 3 and calls == [] and result.validation == []


def test_weights_that_explode_without_nan_are_warned_of_with_the_iteration(caffe, tmp_path):
    path = solver(tmp_path, base_lr=1e12, max_iter=4)
    with pytest.warns(training.TrainingDivergingWarning, match=r"at iteration \d+ of .*solver.prototxt"):
        result = training.train(path, progress=False)
    assert all(loss < float("inf") for _, loss in result.losses)  # finite: the NaN stop cannot fire


def test_an_ordinary_run_gives_no_divergence_warning(caffe, tmp_path, recwarn):
    training.train(solver(tmp_path, max_iter=3), progress=False)
    assert not [w for w in recwarn if issubclass(w.category, training.TrainingDivergingWarning)]
