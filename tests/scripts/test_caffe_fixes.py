"""The fixes scripts/install_caffe.sh makes to the Caffe it builds, run against that real build:

* LMDB and LevelDB support: the ``Data`` layer reads Datum databases of both backends;
* ``caffe train --weights=A[,B]`` finetunes (the fork had lost upstream's CopyLayers);
* ``caffe.io.array_to_datum`` / ``datum_to_array`` work with numpy 2;
* two nets of one process reading the same LMDB no longer block forever.
"""
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

# Every subprocess gets this long: a regression that hangs fails the test instead of the suite.
HANG_TIMEOUT = 60
BATCH = 4


def _module(name):
    """Import a database binding the venv must have (install_caffe.sh installs it)."""
    try:
        return __import__(name)
    except ImportError as error:
        message = f"python package {name} is missing ({error}); run `bash scripts/install_caffe.sh`"
        if os.environ.get("CAFFE_STAIN_REQUIRE_CAFFE"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def _records(n=6, shape=(3, 4, 5), dtype=np.uint8, seed=0):
    """n distinct (array, label) records."""
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]
    else:
        arrays = [rng.normal(0, 100, shape).astype(dtype) for _ in range(n)]
    return [(array, 10 + i) for i, array in enumerate(arrays)]


def write_db(caffe, path, backend, records):
    """Write records as Datums (via caffe.io.array_to_datum) under keys in record order."""
    items = [(b"%08d" % i, caffe.io.array_to_datum(array, label).SerializeToString())
             for i, (array, label) in enumerate(records)]
    if backend == "LMDB":
        env = _module("lmdb").open(str(path), map_size=1 << 26, subdir=True)
        with env.begin(write=True) as txn:
            for key, value in items:
                txn.put(key, value)
        env.close()
    else:
        db = _module("plyvel").DB(str(path), create_if_missing=True, error_if_exists=True)
        with db.write_batch() as batch:
            for key, value in items:
                batch.put(key, value)
        db.close()
    return path


def data_net(tmp_path, source, backend, name="data_only.prototxt"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(f"""
        name: "reader"
        layer {{ name: "data" type: "Data" top: "data" top: "label"
          data_param {{ source: "{source}" backend: {backend} batch_size: {BATCH} }} }}
        """))
    return str(path)


def expected_batch(records, start):
    """The batch the Data layer gives from record `start` on (it wraps around at the end)."""
    picked = [records[(start + i) % len(records)] for i in range(BATCH)]
    return (np.stack([array for array, _ in picked]).astype(np.float32),
            np.array([label for _, label in picked], dtype=np.float32))


# --- 1 + 3: the Data layer reads LMDB and LevelDB, written through caffe.io.array_to_datum

@pytest.mark.parametrize("backend", ["LMDB", "LEVELDB"])
def test_data_layer_reads_database_of_each_backend(caffe, tmp_path, backend):
    records = _records()
    source = write_db(caffe, tmp_path / f"db_{backend.lower()}", backend, records)
    net = caffe.Net(data_net(tmp_path, source, backend), caffe.TEST)
    for start in (0, BATCH):  # the second batch wraps around to the first records
        out = net.forward()
        data, labels = expected_batch(records, start)
        np.testing.assert_array_equal(out["data"], data)
        np.testing.assert_array_equal(out["label"], labels)


def test_data_layer_reads_float_datums(caffe, tmp_path):
    records = _records(dtype=np.float32, seed=1)
    source = write_db(caffe, tmp_path / "db_float", "LMDB", records)
    datum = caffe.io.array_to_datum(records[0][0])
    assert len(datum.data) == 0 and len(datum.float_data) == records[0][0].size
    net = caffe.Net(data_net(tmp_path, source, "LMDB"), caffe.TEST)
    out = net.forward()
    data, labels = expected_batch(records, 0)
    np.testing.assert_array_equal(out["data"], data)
    np.testing.assert_array_equal(out["label"], labels)


# --- 3: caffe.io datum conversions with numpy 2

def test_uint8_datum_round_trip(caffe):
    from caffe.proto import caffe_pb2

    array = np.random.default_rng(2).integers(0, 256, (3, 5, 7), dtype=np.uint8)
    for source in (array, np.ascontiguousarray(array.transpose(0, 2, 1)).transpose(0, 2, 1)):
        datum = caffe.io.array_to_datum(source, label=3)
        assert datum.data == array.tobytes() and len(datum.float_data) == 0
        assert (datum.channels, datum.height, datum.width, datum.label) == (3, 5, 7, 3)
        parsed = caffe_pb2.Datum.FromString(datum.SerializeToString())
        back = caffe.io.datum_to_array(parsed)
        assert back.dtype == np.uint8
        np.testing.assert_array_equal(back, array)
        back[0, 0, 0] ^= 1  # a writable array of its own, not a view of the datum's bytes
        assert caffe.io.datum_to_array(parsed)[0, 0, 0] == array[0, 0, 0]


def test_datum_to_array_reads_a_datum_written_elsewhere(caffe):
    """datum_to_array alone, on a Datum not made by array_to_datum (as convert_imageset writes)."""
    from caffe.proto import caffe_pb2

    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    datum = caffe_pb2.Datum(channels=2, height=3, width=4, data=array.tobytes(), label=1)
    np.testing.assert_array_equal(caffe.io.datum_to_array(datum), array)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_datum_round_trip(caffe, dtype):
    from caffe.proto import caffe_pb2

    array = np.random.default_rng(3).normal(0, 50, (2, 3, 4)).astype(np.float32).astype(dtype)
    datum = caffe.io.array_to_datum(array)
    assert len(datum.data) == 0
    back = caffe.io.datum_to_array(caffe_pb2.Datum.FromString(datum.SerializeToString()))
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)  # float32 values survive the float field exactly


def test_array_to_datum_rejects_non_3d(caffe):
    with pytest.raises(ValueError):
        caffe.io.array_to_datum(np.zeros((2, 2), dtype=np.uint8))


# --- 4: two nets of one process on the same database

# The first net runs a batch and settles (its reader then waits on a full queue) before the
# second is made: the fork's shared reader then never served the second net, which waited
# forever; made straight after the first, the second net instead died on a CHECK.
TWO_NETS = """
import sys
import time
import numpy as np
import caffe
caffe.set_mode_cpu()
model, first, second, out = sys.argv[1:]
net1 = caffe.Net(model, getattr(caffe, first))
a = {k: v.copy() for k, v in net1.forward().items()}
time.sleep(0.5)
net2 = caffe.Net(model, getattr(caffe, second))
b = {k: v.copy() for k, v in net2.forward().items()}
c = {k: v.copy() for k, v in net1.forward().items()}
np.savez(out, a_data=a["data"], a_label=a["label"], b_data=b["data"], b_label=b["label"],
         c_data=c["data"], c_label=c["label"])
print("two nets done")
"""


def run_two_nets(tmp_path, model, first, second):
    script = tmp_path / "two_nets.py"
    script.write_text(TWO_NETS)
    out = tmp_path / "two_nets.npz"
    env = dict(os.environ, GLOG_minloglevel="2")
    try:
        result = subprocess.run([sys.executable, str(script), model, first, second, str(out)],
                                env=env, text=True, capture_output=True, timeout=HANG_TIMEOUT)
    except subprocess.TimeoutExpired as error:
        stderr = error.stderr or b""
        stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
        pytest.fail(f"two {first}/{second} nets on one database hung for {HANG_TIMEOUT} s:\n"
                    f"{stderr[-2000:]}", pytrace=False)
    return result, out


@pytest.mark.parametrize("phases", [("TEST", "TEST"), ("TRAIN", "TEST")])
def test_two_nets_read_the_same_lmdb(caffe, tmp_path, phases):
    """Each net reads the database from its start, on its own cursor."""
    records = _records(n=6, seed=4)
    source = write_db(caffe, tmp_path / "db", "LMDB", records)
    result, out = run_two_nets(tmp_path, data_net(tmp_path, source, "LMDB"), *phases)
    assert result.returncode == 0, result.stderr[-3000:]
    got = np.load(out)
    for prefix, start in (("a", 0), ("b", 0), ("c", BATCH)):
        data, labels = expected_batch(records, start)
        np.testing.assert_array_equal(got[prefix + "_data"], data, err_msg=prefix)
        np.testing.assert_array_equal(got[prefix + "_label"], labels, err_msg=prefix)


def test_two_nets_on_the_same_leveldb_fail_clearly(caffe, tmp_path):
    """LevelDB allows one open handle per process: the second net stops with LevelDB's lock
    error (a limitation, reported plainly) instead of waiting forever."""
    source = write_db(caffe, tmp_path / "db", "LEVELDB", _records(seed=5))
    result, _ = run_two_nets(tmp_path, data_net(tmp_path, source, "LEVELDB"), "TEST", "TEST")
    assert result.returncode != 0
    assert "Failed to open leveldb" in result.stderr
    assert "already held by process" in result.stderr


# --- 2: caffe train --weights

# A deterministic batch: DummyData's bilinear filler is a fixed function of the shape.
DATA = """
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param {
    data_filler { type: "bilinear" } data_filler { type: "constant" value: 1 }
    shape { dim: 2 dim: 3 dim: 8 dim: 8 } shape { dim: 2 dim: 1 dim: 8 dim: 8 } } }
"""
LOSS = """
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }
"""
CONV = """layer { name: "%s" type: "Convolution" bottom: "%s" top: "%s"
  convolution_param { num_output: %d kernel_size: 3 pad: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0.1 } } }"""
CONV1 = CONV % ("conv1", "data", "c1", 4)
CONV2 = CONV % ("conv2", "c1", "c2", 4)
CONV3 = CONV % ("conv3", "c2", "score", 2)
NET = "\n".join([DATA, CONV1, CONV2, CONV3, LOSS])
SOLVER = """
net: "net.prototxt"
base_lr: 0
lr_policy: "fixed"
momentum: 0.9
max_iter: 2
display: 1
test_iter: 1
test_interval: 1000
snapshot_prefix: "snap"
solver_mode: CPU
random_seed: 7
"""


def _weights_file(caffe, tmp_path, name, layers_text, seed):
    """Save a caffemodel holding only the layers of the net made of layers_text (a list of
    prototxt snippets), with random values."""
    proto = tmp_path / f"{name}.prototxt"
    proto.write_text('name: "part"\n' + "\n".join(layers_text))
    net = caffe.Net(str(proto), caffe.TEST)
    rng = np.random.default_rng(seed)
    values = {}
    for layer, blobs in net.params.items():
        for blob in blobs:
            blob.data[...] = rng.normal(0, 0.5, blob.data.shape)
        values[layer] = [blob.data.copy() for blob in blobs]
    path = tmp_path / f"{name}.caffemodel"
    net.save(str(path))
    return path, values


@pytest.fixture
def finetune_dir(caffe, tmp_path):
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(SOLVER)
    return tmp_path


def _pycaffe_loss(caffe, net_dir, values):
    net = caffe.Net(str(net_dir / "net.prototxt"), caffe.TEST)
    assert set(values) == set(net.params)
    for layer, arrays in values.items():
        for blob, array in zip(net.params[layer], arrays):
            blob.data[...] = array
    return float(net.forward()["loss"])


def _logged(pattern, log):
    match = re.search(pattern + r" = ([-+0-9.eE]+|nan|inf)", log)
    assert match, f"no '{pattern}' in the log:\n{log[-3000:]}"
    return float(match.group(1))


def _assert_snapshot_holds(caffe, net_dir, values):
    snapshot = net_dir / "snap_iter_2.caffemodel"
    assert snapshot.exists()
    net = caffe.Net(str(net_dir / "net.prototxt"), str(snapshot), caffe.TEST)
    for layer, arrays in values.items():
        for i, array in enumerate(arrays):
            np.testing.assert_array_equal(net.params[layer][i].data, array,
                                          err_msg=f"{layer} param {i}")


def test_train_with_weights_starts_from_them(caffe, run_caffe_tool, finetune_dir):
    weights, values = _weights_file(caffe, finetune_dir, "w", [NET], seed=10)
    expected_loss = _pycaffe_loss(caffe, finetune_dir, values)
    result = run_caffe_tool("train", "--solver=solver.prototxt", f"--weights={weights.name}",
                            cwd=finetune_dir, timeout=HANG_TIMEOUT)
    # The first training forward and the test net (tested at iteration 0) both used them.
    assert _logged(r"Iteration 0, loss", result.stderr) == pytest.approx(expected_loss, rel=1e-4)
    assert _logged(r"Test net output #0: loss", result.stderr) == pytest.approx(
        expected_loss, rel=1e-4)
    # base_lr 0: training leaves them as they were.
    _assert_snapshot_holds(caffe, finetune_dir, values)


def test_train_with_two_weights_files_applies_both_in_order(caffe, run_caffe_tool, finetune_dir):
    # A: conv1 and conv2; B: conv2 (overrides A's) and conv3 (which A lacks).
    a_path, a_values = _weights_file(caffe, finetune_dir, "a", [DATA, CONV1, CONV2], seed=11)
    b_input = ('layer { name: "in" type: "Input" top: "c1"\n'
               '  input_param { shape { dim: 2 dim: 4 dim: 8 dim: 8 } } }')
    b_path, b_values = _weights_file(caffe, finetune_dir, "b", [b_input, CONV2, CONV3], seed=12)
    assert set(a_values) == {"conv1", "conv2"} and set(b_values) == {"conv2", "conv3"}
    expected = {"conv1": a_values["conv1"], "conv2": b_values["conv2"],
                "conv3": b_values["conv3"]}
    expected_loss = _pycaffe_loss(caffe, finetune_dir, expected)
    result = run_caffe_tool("train", "--solver=solver.prototxt",
                            f"--weights={a_path.name}, {b_path.name}", cwd=finetune_dir,
                            timeout=HANG_TIMEOUT)
    assert _logged(r"Iteration 0, loss", result.stderr) == pytest.approx(expected_loss, rel=1e-4)
    _assert_snapshot_holds(caffe, finetune_dir, expected)


@pytest.mark.parametrize("case", ["missing", "second missing", "directory", "empty", "garbage"])
def test_train_refuses_unreadable_weights_before_training(caffe, run_caffe_tool, finetune_dir,
                                                           case):
    good, _ = _weights_file(caffe, finetune_dir, "good", [DATA, CONV1], seed=13)
    (finetune_dir / "adir").mkdir()
    (finetune_dir / "empty.caffemodel").write_bytes(b"")
    (finetune_dir / "garbage.caffemodel").write_bytes(b"not a caffe model at all\n")
    weights, message = {
        "missing": ("nope.caffemodel",
                    "cannot read --weights file nope.caffemodel: No such file or directory"),
        "second missing": (f"{good.name},nope.caffemodel",
                           "cannot read --weights file nope.caffemodel: No such file or directory"),
        "directory": ("adir", "cannot read --weights file adir: Is a directory"),
        "empty": ("empty.caffemodel", "cannot read --weights file empty.caffemodel: file is empty"),
        "garbage": ("garbage.caffemodel", "--weights file garbage.caffemodel is not a Caffe model"),
    }[case]
    result = run_caffe_tool("train", "--solver=solver.prototxt", f"--weights={weights}",
                            cwd=finetune_dir, check=False, timeout=HANG_TIMEOUT)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "caffe train: " + message in result.stderr
    assert "Starting Optimization" not in result.stderr and "Iteration 0" not in result.stderr
    assert not list(finetune_dir.glob("snap_iter_*"))


def test_train_refuses_weights_with_snapshot(caffe, run_caffe_tool, finetune_dir):
    good, _ = _weights_file(caffe, finetune_dir, "good", [DATA, CONV1], seed=14)
    result = run_caffe_tool("train", "--solver=solver.prototxt", f"--weights={good.name}",
                            "--snapshot=snap_iter_1.solverstate", cwd=finetune_dir, check=False,
                            timeout=HANG_TIMEOUT)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "not both" in result.stderr
    assert "Starting Optimization" not in result.stderr
    assert not list(finetune_dir.glob("snap_iter_*"))
