"""caffe_layers.net.training.datum_lmdb and caffe-stain-lmdb: Datum LMDBs read back by lmdb and by Caffe.

The databases are read back independently of the writer (the ``lmdb`` package and
``caffe_pb2.Datum``), and -- the test that matters -- by Caffe's own ``Data`` layer
(``backend: LMDB``) in a subprocess: a Caffe built without LMDB aborts the process
(``LOG(FATAL) << "Unknown database backend"``). That test skips when the build has no LMDB,
unless ``CAFFE_STAIN_REQUIRE_LMDB`` is set, when it fails.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest
from caffe.proto import caffe_pb2
from PIL import Image

from caffe_layers import sample_data
from caffe_layers.cli.lmdb import main as lmdb_main
from caffe_layers.net.training import datum_lmdb as lmdb_datasets
from caffe_layers.net.training.datum_lmdb import (class_folder_items, read_label_list, write_classification_lmdb,
                                            write_segmentation_lmdbs)
from caffe_layers.patches import read_pair_list

from test_sample_data import load_or_skip

PROG = "caffe-stain-lmdb"


# ---------------------------------------------------------------- helpers

def read_db(path):
    """[(key, Datum)] of an LMDB in key order, read with lmdb + caffe_pb2 only."""
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            entries = []
            for key, value in txn.cursor():
                datum = caffe_pb2.Datum()
                datum.ParseFromString(value)
                entries.append((key.decode(), datum))
    finally:
        env.close()
    return entries


def arrays(entries):
    """The C×H×W uint8 arrays of read_db's Datums (checking they are raw pixels)."""
    out = []
    for _, datum in entries:
        assert not datum.encoded and not datum.float_data
        out.append(np.frombuffer(datum.data, np.uint8).reshape(datum.channels, datum.height, datum.width))
    return out


def stored_map_size(path):
    """The map size recorded in the database (opening with map_size=0 takes the file's)."""
    env = lmdb.open(str(path), map_size=0, lock=False)
    try:
        return env.info()["map_size"]
    finally:
        env.close()


def chw(rgb, order="BGR"):
    return (rgb[..., ::-1] if order == "BGR" else rgb).transpose(2, 0, 1)


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def he_pieces():
    """Four 24×32 pieces of real H&E (hgsc_nest) with their nucleus masks."""
    rgb, instances = load_or_skip(sample_data.load_hgsc_nest)
    mask = sample_data.nucleus_mask(instances)
    corners = [(100, 100), (400, 700), (900, 300), (1200, 1200)]
    return [(rgb[y:y + 24, x:x + 32].copy(), mask[y:y + 24, x:x + 32].copy()) for y, x in corners]


@pytest.fixture
def seg_list(tmp_path, he_pieces):
    """An 'image mask' list file of the H&E pieces (masks as 0/255 PNGs), in a non-sorted order."""
    lines = []
    for i, (rgb, mask) in zip([3, 0, 2, 1], he_pieces):
        save(tmp_path / "data" / f"img{i}.png", rgb)
        save(tmp_path / "data" / f"mask{i}.png", mask.astype(np.uint8) * 255)
        lines.append(f"img{i}.png mask{i}.png")
    list_file = tmp_path / "data" / "train.txt"
    list_file.write_text("# image mask\n" + "\n".join(lines) + "\n")
    return list_file


@pytest.fixture
def class_root(tmp_path):
    """root/<class>/<n>.png with classes created out of sorted order; synthetic 8×10 images."""
    rng = np.random.default_rng(1)
    images = {}
    for name, count in [("zebra", 2), ("ant", 3), ("moth", 1)]:
        for i in range(count):
            rgb = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
            images[(name, i)] = rgb
            save(tmp_path / "classes" / name / f"{i}.png", rgb)
    return tmp_path / "classes", images


def run_cli(capsys, *args):
    code = lmdb_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith((".partial", ".old")))


# ---------------------------------------------------------------- segmentation

def test_segmentation_round_trip_on_real_he(tmp_path, seg_list, he_pieces, capsys):
    code, out, err = run_cli(capsys, "segmentation", "--list", seg_list, "--output", tmp_path / "train_db")
    assert code == 0, err
    images, labels = read_db(tmp_path / "train_db" / "images"), read_db(tmp_path / "train_db" / "labels")
    keys = [f"{i:08d}" for i in range(4)]
    assert [k for k, _ in images] == keys and [k for k, _ in labels] == keys  # aligned, list order
    pairs = read_pair_list(seg_list)
    order = [3, 0, 2, 1]  # file img<i> holds he_pieces[position of i in this list]
    for (image, label), (image_path, _), i in zip(zip(arrays(images), arrays(labels)), pairs, order):
        rgb, mask = he_pieces[order.index(i)]
        assert Path(image_path).name == f"img{i}.png"
        assert image.shape == (3, 24, 32) and label.shape == (1, 24, 32)
        np.testing.assert_array_equal(image, chw(rgb, "BGR"))  # default BGR
        np.testing.assert_array_equal(label[0], mask.astype(np.uint8))  # class indices, not 255
    assert all(datum.label == 0 for _, datum in images + labels)
    # The library's own reader agrees; the folders have the umask's permissions, not mkdtemp's 0700.
    own = lmdb_datasets.iter_datums(tmp_path / "train_db" / "images")
    for (key, datum), (own_key, array, label) in zip(images, own, strict=True):
        assert own_key == key and label == datum.label
        np.testing.assert_array_equal(array, arrays([(key, datum)])[0])
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "train_db").stat().st_mode & 0o777 == 0o777 & ~umask
    lines = out.strip().splitlines()
    assert lines == [f"wrote {tmp_path / 'train_db' / 'images'}: 4 entries, 3×24×32 uint8 BGR images; list order",
                     f"wrote {tmp_path / 'train_db' / 'labels'}: 4 entries, 1×24×32 uint8 class indices "
                     f"{{0, 1}} (mask > 0); same keys as {tmp_path / 'train_db' / 'images'}"]
    assert leftovers(tmp_path) == []


def test_rgb_is_bgr_reversed_and_shuffle_keeps_pairs_aligned(tmp_path, seg_list):
    pairs = read_pair_list(seg_list)
    write_segmentation_lmdbs(pairs, tmp_path / "bgr")
    write_segmentation_lmdbs(pairs, tmp_path / "rgb", channel_order="rgb")
    bgr, rgb = arrays(read_db(tmp_path / "bgr" / "images")), arrays(read_db(tmp_path / "rgb" / "images"))
    for b, r in zip(bgr, rgb):
        np.testing.assert_array_equal(b, r[::-1])
        assert not np.array_equal(b, r)  # H&E is not grey
    write_segmentation_lmdbs(pairs, tmp_path / "shuffled", shuffle=True, seed=5)
    shuffled = arrays(read_db(tmp_path / "shuffled" / "images"))
    shuffled_labels = arrays(read_db(tmp_path / "shuffled" / "labels"))
    plain_labels = arrays(read_db(tmp_path / "bgr" / "labels"))
    permutation = [next(i for i, b in enumerate(bgr) if np.array_equal(b, s)) for s in shuffled]
    assert sorted(permutation) == [0, 1, 2, 3] and permutation != [0, 1, 2, 3]
    for j, i in enumerate(permutation):  # every image still has its own mask under its key
        np.testing.assert_array_equal(shuffled_labels[j], plain_labels[i])


def test_same_input_and_seed_give_byte_identical_databases(tmp_path, seg_list):
    # Unused page bytes were left as the writer's heap held them (meminit=False).
    pairs = read_pair_list(seg_list)
    for name in ("first", "second"):
        lmdb_datasets.write_segmentation_lmdbs(pairs, tmp_path / name, shuffle=True, seed=5)
    for part in ("images", "labels"):
        assert (tmp_path / "first" / part / "data.mdb").read_bytes() == \
            (tmp_path / "second" / part / "data.mdb").read_bytes(), part


def test_resize_images_bilinear_masks_nearest(tmp_path):
    rng = np.random.default_rng(2)
    lines = []
    for i, (h, w) in enumerate([(20, 30), (16, 16)]):
        save(tmp_path / f"i{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        save(tmp_path / f"m{i}.png", (rng.random((h, w)) > 0.5).astype(np.uint8) * 7)  # any value > 0
        lines.append(f"i{i}.png m{i}.png")
    (tmp_path / "list.txt").write_text("\n".join(lines))
    pairs = read_pair_list(tmp_path / "list.txt")
    with pytest.raises(ValueError, match=r"i1\.png.* is 16×16 .*i0\.png.* is 20×30.*resize"):
        write_segmentation_lmdbs(pairs, tmp_path / "db")
    assert not (tmp_path / "db").exists() and leftovers(tmp_path) == []
    write_segmentation_lmdbs(pairs, tmp_path / "db", resize=(12, 14), channel_order="RGB")
    images, labels = arrays(read_db(tmp_path / "db" / "images")), arrays(read_db(tmp_path / "db" / "labels"))
    for i, (image, label) in enumerate(zip(images, labels)):
        rgb = np.asarray(Image.open(tmp_path / f"i{i}.png"))
        mask = (np.asarray(Image.open(tmp_path / f"m{i}.png")) > 0).astype(np.uint8)
        assert image.shape == (3, 12, 14) and label.shape == (1, 12, 14)
        np.testing.assert_array_equal(image, chw(cv2.resize(rgb, (14, 12), interpolation=cv2.INTER_LINEAR), "RGB"))
        np.testing.assert_array_equal(label[0], cv2.resize(mask, (14, 12), interpolation=cv2.INTER_NEAREST))
        assert set(np.unique(label)) <= {0, 1}


# ---------------------------------------------------------------- classification

def test_classification_folder_sorted_classes_and_labels_txt(tmp_path, class_root, capsys):
    root, images = class_root
    (tmp_path / "out").mkdir()
    code, out, err = run_cli(capsys, "classification", "--folder", root, "--output", tmp_path / "out" / "train_lmdb")
    assert code == 0, err
    assert (tmp_path / "out" / "labels.txt").read_text() == "ant\nmoth\nzebra\n"
    entries = read_db(tmp_path / "out" / "train_lmdb")
    assert [k for k, _ in entries] == [f"{i:08d}" for i in range(6)]
    expected = [("ant", 0), ("ant", 1), ("ant", 2), ("moth", 0), ("zebra", 0), ("zebra", 1)]
    assert [d.label for _, d in entries] == [0, 0, 0, 1, 2, 2]
    for array, key in zip(arrays(entries), expected):
        np.testing.assert_array_equal(array, chw(images[key], "BGR"))
    assert out.strip() == (f"wrote {tmp_path / 'out' / 'train_lmdb'}: 6 entries, 3×8×10 uint8 BGR images with "
                           f"labels; 3 classes, names in {tmp_path / 'out' / 'labels.txt'}, input order")
    # A second database beside it (the validation set) keeps the identical labels.txt ...
    code, _, err = run_cli(capsys, "classification", "--folder", root, "--output", tmp_path / "out" / "val_lmdb")
    assert code == 0, err
    # ... but other class names are not silently written over it.
    (root / "bee").mkdir()
    save(root / "bee" / "0.png", images[("ant", 0)])
    code, _, err = run_cli(capsys, "classification", "--folder", root, "--output", tmp_path / "out" / "test_lmdb")
    assert code == 2 and "labels.txt: already exists with other class names" in err
    assert not (tmp_path / "out" / "test_lmdb").exists()
    assert (tmp_path / "out" / "labels.txt").read_text() == "ant\nmoth\nzebra\n"


def test_classification_list_and_deterministic_shuffle(tmp_path, class_root):
    root, images = class_root
    items, names = class_folder_items(root)
    lines = [f"{Path(p).relative_to(root)} {label}  # {names[label]}" for p, label in items]
    (root / "train.txt").write_text("\n".join(["# path label", *lines, ""]))
    listed = read_label_list(root / "train.txt")
    assert [(Path(p), label) for p, label in listed] == items
    write_classification_lmdb(listed, tmp_path / "plain")
    assert not (tmp_path / "labels.txt").exists()  # a list file has no class names
    plain = read_db(tmp_path / "plain")
    for name, seed in [("a", 3), ("b", 3), ("c", 4)]:
        write_classification_lmdb(listed, tmp_path / name, shuffle=True, seed=seed)
    a, b, c = (read_db(tmp_path / name) for name in "abc")
    assert [d.SerializeToString() for _, d in a] == [d.SerializeToString() for _, d in b]  # same seed, same DB
    assert [d.data for _, d in a] != [d.data for _, d in c]
    assert [d.data for _, d in a] != [d.data for _, d in plain]
    # A shuffle permutes whole entries: every image keeps its label.
    assert sorted((d.data, d.label) for _, d in a) == sorted((d.data, d.label) for _, d in plain)


# ---------------------------------------------------------------- errors and safety

def _run_error(capsys, tmp_path, *args):
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == "", (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: "), err
    assert leftovers(tmp_path) == [], "a partial build was left behind"
    return lines[0]


def test_errors_name_the_file_and_leave_nothing(tmp_path, seg_list, class_root, capsys):
    root, _ = class_root
    data = seg_list.parent
    (data / "broken.png").write_bytes(b"not a png at all")
    (data / "broken.txt").write_text("img0.png mask0.png\nbroken.png mask1.png\n")
    save(data / "small_mask.png", np.zeros((5, 5), np.uint8))
    (data / "mismatch.txt").write_text("img0.png mask0.png\nimg1.png small_mask.png\n")
    (data / "empty.txt").write_text("# nothing yet\n\n")
    (data / "labels_bad.txt").write_text("img0.png -1\n")
    (tmp_path / "no_classes").mkdir()
    (root / "empty_class").mkdir()
    out = tmp_path / "db"
    cases = [
        (["segmentation", "--list", data / "broken.txt"], "broken.png"),
        (["segmentation", "--list", data / "mismatch.txt"], "small_mask.png"),
        (["segmentation", "--list", data / "empty.txt"], "holds no image/mask pairs"),
        (["segmentation", "--list", data / "absent.txt"], "absent.txt"),
        (["classification", "--list", data / "empty.txt"], "holds no 'image label' lines"),
        (["classification", "--list", data / "labels_bad.txt"], "label '-1' is not an integer"),
        (["classification", "--folder", tmp_path / "no_classes"], "no class subfolders"),
        (["classification", "--folder", root], "empty_class: folder contains no"),
        (["classification", "--folder", root, "--seed", "3"], "--seed is only used with --shuffle"),
    ]
    for args, message in cases:
        line = _run_error(capsys, tmp_path, *args, "--output", out)
        assert message in line, line
        assert not out.exists()
    line = _run_error(capsys, tmp_path, "classification", "--folder", root / "..", "--output", root / "db")
    assert "inside the class folder" in line
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage errors: exit 2 as well
        lmdb_main(["segmentation", "--list", str(seg_list), "--output", str(out), "--resize", "0x5"])
    assert exit_info.value.code == 2 and "sides must be in [1, 16384]" in capsys.readouterr().err


def test_never_writes_into_an_existing_database_without_overwrite(tmp_path, seg_list, capsys):
    out = tmp_path / "db"
    assert run_cli(capsys, "segmentation", "--list", seg_list, "--output", out)[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*.mdb")}
    line = _run_error(capsys, tmp_path, "segmentation", "--list", seg_list, "--output", out, "--channel-order", "RGB")
    assert "already exists (use --overwrite" in line
    assert {p: p.read_bytes() for p in out.rglob("*.mdb")} == before
    # --overwrite replaces the whole database (no stale entries of the old one survive).
    (seg_list.parent / "one.txt").write_text(seg_list.read_text().splitlines()[1] + "\n")
    code, _, err = run_cli(capsys, "segmentation", "--list", seg_list.parent / "one.txt", "--output", out,
                           "--overwrite", "--channel-order", "RGB")
    assert code == 0, err
    assert len(read_db(out / "images")) == len(read_db(out / "labels")) == 1
    assert leftovers(tmp_path) == []
    # A folder that is not a database is never replaced, with or without --overwrite.
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        _run_error(capsys, tmp_path, "segmentation", "--list", seg_list, "--output", tmp_path / "precious", *extra)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_interrupt_leaves_no_database_and_keeps_the_old_one(tmp_path, seg_list, capsys, monkeypatch):
    out = tmp_path / "db"
    write_segmentation_lmdbs(read_pair_list(seg_list), out, channel_order="RGB")
    old = arrays(read_db(out / "images"))
    real_read_rgb, calls = lmdb_datasets.read_rgb, []

    def interrupted_read(path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_read_rgb(path)

    monkeypatch.setattr(lmdb_datasets, "read_rgb", interrupted_read)
    for target, extra in [(tmp_path / "new_db", []), (out, ["--overwrite"])]:
        calls.clear()
        code, _, err = run_cli(capsys, "segmentation", "--list", seg_list, "--output", target, *extra)
        assert code == 130 and err.startswith(f"{PROG}: interrupted; nothing was written"), err
        assert leftovers(tmp_path) == []
    assert not (tmp_path / "new_db").exists()
    for a, b in zip(arrays(read_db(out / "images")), old):  # the old database, untouched
        np.testing.assert_array_equal(a, b)


def test_a_failed_swap_puts_the_old_database_back(tmp_path, seg_list, monkeypatch):
    out = tmp_path / "db"
    write_segmentation_lmdbs(read_pair_list(seg_list), out)
    old = [d.SerializeToString() for _, d in read_db(out / "labels")]
    real_replace, calls = os.replace, []

    def failing_replace(source, target):
        calls.append(target)
        if len(calls) == 2:  # moving the old one aside worked; renaming the new one in fails
            raise OSError("disk trouble")
        return real_replace(source, target)

    monkeypatch.setattr(lmdb_datasets.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk trouble"):
        write_segmentation_lmdbs(read_pair_list(seg_list)[:1], out, overwrite=True)
    monkeypatch.undo()
    assert [d.SerializeToString() for _, d in read_db(out / "labels")] == old
    assert leftovers(tmp_path) == []


def test_map_size_follows_the_data_and_grows_if_short(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    items = [(save(tmp_path / "img" / f"{i}.png", rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)), i % 2)
             for i in range(30)]
    write_classification_lmdb(items, tmp_path / "db")
    data_bytes = 30 * 3 * 64 * 96
    size = stored_map_size(tmp_path / "db")
    assert data_bytes < size < 2 * data_bytes + (2 << 20)  # from the data: not a fixed terabyte
    # A map that is too small is grown rather than failing half-way.
    monkeypatch.setattr(lmdb_datasets, "_map_size", lambda *args: 64 << 10)
    write_classification_lmdb(items, tmp_path / "small")
    assert [d.SerializeToString() for _, d in read_db(tmp_path / "small")] == \
           [d.SerializeToString() for _, d in read_db(tmp_path / "db")]


# ---------------------------------------------------------------- Caffe's own Data layer

CAFFE_READER = textwrap.dedent("""
    import sys
    import numpy as np
    import caffe
    caffe.set_mode_cpu()
    blobs = {}
    for index, prototxt in enumerate(sys.argv[2:]):
        net = caffe.Net(prototxt, caffe.TEST)
        net.forward()
        blobs.update({f"{index}_{name}": blob.data.copy() for name, blob in net.blobs.items()})
    np.savez(sys.argv[1], **blobs)
""")


def data_layer(name, source, batch_size, tops):
    top_lines = " ".join(f'top: "{top}"' for top in tops)
    return (f'layer {{ name: "{name}" type: "Data" {top_lines} include {{ phase: TEST }}\n'
            f'        data_param {{ source: "{source}" backend: LMDB batch_size: {batch_size} }} }}\n')


def read_with_caffe(tmp_path, nets):
    """Blobs after one TEST forward of each net (a list of prototxt texts), in a subprocess."""
    paths = []
    for i, text in enumerate(nets):
        paths.append(tmp_path / f"reader{i}.prototxt")
        paths[-1].write_text(f'name: "reader{i}"\n' + text)
    env = dict(os.environ, GLOG_minloglevel="2")
    result = subprocess.run([sys.executable, "-c", CAFFE_READER, str(tmp_path / "blobs.npz"), *map(str, paths)],
                            capture_output=True, text=True, timeout=120, env=env)
    if result.returncode != 0:
        if "Unknown database backend" in result.stderr and not os.environ.get("CAFFE_STAIN_REQUIRE_LMDB"):
            pytest.skip("this Caffe build has no LMDB support (USE_LMDB := 0); set CAFFE_STAIN_REQUIRE_LMDB=1 "
                        "to make that a failure")
        raise AssertionError(f"Caffe could not read the LMDBs (exit {result.returncode}):\n{result.stderr[-3000:]}")
    with np.load(tmp_path / "blobs.npz") as blobs:
        return dict(blobs)


def test_caffe_data_layer_reads_the_same_arrays(caffe, tmp_path, seg_list, class_root):
    root, _ = class_root
    seg = tmp_path / "seg_db"
    write_segmentation_lmdbs(read_pair_list(seg_list), seg)
    items, names = class_folder_items(root)
    write_classification_lmdb(items, tmp_path / "cls_db", class_names=names, channel_order="RGB",
                              shuffle=True, seed=1)
    seg_net = data_layer("data", seg / "images", 4, ["data"]) + data_layer("label", seg / "labels", 4, ["label"])
    cls_net = data_layer("data", tmp_path / "cls_db", 6, ["data", "label"])
    blobs = read_with_caffe(tmp_path, [seg_net, cls_net])

    images, labels = arrays(read_db(seg / "images")), arrays(read_db(seg / "labels"))
    assert blobs["0_data"].dtype == np.float32 and blobs["0_data"].shape == (4, 3, 24, 32)
    np.testing.assert_array_equal(blobs["0_data"], np.stack(images).astype(np.float32))  # BGR, key order
    np.testing.assert_array_equal(blobs["0_label"], np.stack(labels).astype(np.float32))
    # ... which are the list's images as BGR and its masks as {0, 1}.
    for (image_path, mask_path), image, label in zip(read_pair_list(seg_list), blobs["0_data"], blobs["0_label"]):
        rgb = np.asarray(Image.open(image_path))
        np.testing.assert_array_equal(image, chw(rgb, "BGR"))
        np.testing.assert_array_equal(label[0], np.asarray(Image.open(mask_path)) > 0)

    entries = read_db(tmp_path / "cls_db")
    np.testing.assert_array_equal(blobs["1_data"], np.stack(arrays(entries)).astype(np.float32))
    np.testing.assert_array_equal(blobs["1_label"], [d.label for _, d in entries])
    assert sorted(blobs["1_label"].tolist()) == [0, 0, 0, 1, 2, 2]


def test_meanfile_of_an_lmdb_centres_what_caffes_data_layer_reads(caffe, tmp_path, seg_list, capsys):
    """caffe-stain-meanfile --lmdb: the mean of a BGR Datum LMDB in its own channel order (what
    compute_image_mean, which needs OpenCV in this build, writes): the Data layer's transform_param
    mean_file then centres every pixel of the database on zero."""
    from caffe_layers.cli import meanfile

    seg = tmp_path / "seg_db"
    write_segmentation_lmdbs(read_pair_list(seg_list), seg)
    mean = tmp_path / "mean.binaryproto"
    assert meanfile.main(["--lmdb", str(seg / "images"), "--output", str(mean)]) == 0
    assert "database-order channel means" in capsys.readouterr().out
    net = (f'layer {{ name: "data" type: "Data" top: "data" include {{ phase: TEST }}\n'
           f'  transform_param {{ mean_file: "{mean}" }}\n'
           f'  data_param {{ source: "{seg / "images"}" backend: LMDB batch_size: 4 }} }}\n')
    centred = read_with_caffe(tmp_path, [net])["0_data"]
    np.testing.assert_allclose(centred.mean(axis=0), 0, atol=1e-3)
    bgr = np.mean([chw(np.asarray(Image.open(image)), "BGR") for image, _ in read_pair_list(seg_list)], axis=0)
    np.testing.assert_allclose(centred[0], chw(np.asarray(Image.open(read_pair_list(seg_list)[0][0])), "BGR")
                               - bgr, atol=1e-3)

    assert meanfile.main(["--lmdb", str(seg / "labels"), "--output", str(tmp_path / "labels.binaryproto")]) == 2
    assert "holds a 1-channel image" in capsys.readouterr().err
    assert meanfile.main(["--lmdb", str(seg / "images"), "--output", str(seg / "images" / "m.binaryproto")]) == 2
    assert "inside the database" in capsys.readouterr().err
    assert meanfile.main(["--lmdb", str(tmp_path / "nope"), "--output", str(tmp_path / "m.binaryproto")]) == 2
    assert "not an LMDB database folder" in capsys.readouterr().err
    assert not (tmp_path / "labels.binaryproto").exists() and not (tmp_path / "m.binaryproto").exists()
