"""caffe_layers.patches: list files, image/mask loading and patch sampling (no Caffe)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from caffe_layers.patches import (PatchSampler, load_pairs,
                                  read_pair_list)


def random_image(rng, height, width):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def random_mask(rng, height, width):
    return (rng.random((height, width)) > 0.5).astype(np.uint8)


def drawn_indices(sampler, batches):
    """Image index of every patch in the next ``batches`` batches."""
    indices = []
    for _ in range(batches):
        sampler.next_batch()
        indices.append(sampler.last_indices)
    return np.concatenate(indices)


@pytest.fixture
def dataset(tmp_path):
    """Two pairs on disk: a 40×50 PNG pair and a 30×20 .npy pair; returns (list file, arrays)."""
    rng = np.random.default_rng(0)
    a_image, a_mask = random_image(rng, 40, 50), random_mask(rng, 40, 50)
    b_image, b_mask = random_image(rng, 30, 20), random_mask(rng, 30, 20)
    (tmp_path / "img").mkdir()
    (tmp_path / "mask").mkdir()
    Image.fromarray(a_image).save(tmp_path / "img" / "a.png")
    Image.fromarray(a_mask * 255).save(tmp_path / "mask" / "a.png")
    np.save(tmp_path / "img" / "b.npy", b_image)
    np.save(tmp_path / "mask" / "b.npy", b_mask.astype(bool))
    list_file = tmp_path / "train.txt"
    list_file.write_text("# image  mask\n\nimg/a.png mask/a.png\n"
                         "   img/b.npy\tmask/b.npy   # the small one\n")
    return list_file, [a_image, b_image], [a_mask, b_mask]


# --------------------------------------------------------------------------- read_pair_list

def test_read_pair_list_skips_comments_and_blank_lines(dataset, tmp_path):
    list_file, _, _ = dataset
    pairs = read_pair_list(list_file)
    assert pairs == [(str(tmp_path / "img" / "a.png"), str(tmp_path / "mask" / "a.png")),
                     (str(tmp_path / "img" / "b.npy"), str(tmp_path / "mask" / "b.npy"))]


def test_read_pair_list_root_and_absolute_paths(dataset, tmp_path):
    _, _, _ = dataset
    elsewhere = tmp_path / "lists"
    elsewhere.mkdir()
    list_file = elsewhere / "list.txt"
    list_file.write_text(f"img/a.png {tmp_path / 'mask' / 'a.png'}\n")
    pairs = read_pair_list(list_file, root=tmp_path)
    assert pairs == [(str(tmp_path / "img" / "a.png"), str(tmp_path / "mask" / "a.png"))]
    # Default root is the list file's own directory, where img/a.png does not exist.
    with pytest.raises(FileNotFoundError, match=r"list\.txt:1: image file .*lists/img/a\.png"):
        read_pair_list(list_file)


@pytest.mark.parametrize("line, count", [("img/a.png", 1), ("img/a.png mask/a.png extra", 3)])
def test_read_pair_list_malformed_line_names_line_number(dataset, tmp_path, line, count):
    list_file = tmp_path / "bad.txt"
    list_file.write_text(f"# header\nimg/a.png mask/a.png\n{line}\n")
    with pytest.raises(ValueError, match=rf"bad\.txt:3: expected 2 .*got {count}"):
        read_pair_list(list_file)


def test_read_pair_list_missing_file_is_named(dataset, tmp_path):
    list_file = tmp_path / "missing.txt"
    list_file.write_text("img/a.png mask/a.png\nimg/a.png mask/nope.png\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.txt:2: mask file .*mask/nope\.png"):
        read_pair_list(list_file)


def test_read_pair_list_missing_list_or_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"list file .*nothere\.txt"):
        read_pair_list(tmp_path / "nothere.txt")
    list_file = tmp_path / "l.txt"
    list_file.write_text("a b\n")
    with pytest.raises(FileNotFoundError, match=r"root directory .*no_dir"):
        read_pair_list(list_file, root=tmp_path / "no_dir")


def test_read_pair_list_empty(tmp_path):
    list_file = tmp_path / "empty.txt"
    list_file.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no image/mask pairs"):
        read_pair_list(list_file)


# --------------------------------------------------------------------------- image and mask types
# Formats and rules are tested with caffe_layers.image_io (tests/test_image_io.py); here only
# the data layer's contract on top of it: uint8 RGB images and uint8 {0, 1} masks.

def test_load_pairs_image_and_mask_types(tmp_path):
    image = random_image(np.random.default_rng(1), 2, 3)
    np.save(tmp_path / "i.npy", image)
    np.save(tmp_path / "m.npy", np.array([[0, 1, 2], [0, 300, 0]], np.uint16))  # label map
    [loaded], [mask] = load_pairs([(tmp_path / "i.npy", tmp_path / "m.npy")])
    assert loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, image)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, [[0, 1, 1], [0, 1, 0]])


# --------------------------------------------------------------------------- load_pairs

def test_load_pairs(dataset):
    list_file, images, masks = dataset
    loaded_images, loaded_masks = load_pairs(read_pair_list(list_file))
    for got, want in zip(loaded_images + loaded_masks, images + masks):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.uint8


def test_load_pairs_size_mismatch_names_both(tmp_path):
    np.save(tmp_path / "i.npy", np.zeros((10, 12, 3), np.uint8))
    np.save(tmp_path / "m.npy", np.zeros((10, 11), np.uint8))
    with pytest.raises(ValueError, match=r"i\.npy.* 10×12 .*m\.npy.* 10×11"):
        load_pairs([(str(tmp_path / "i.npy"), str(tmp_path / "m.npy"))])


# --------------------------------------------------------------------------- PatchSampler

def test_sampler_batch_shapes_and_values(dataset):
    _, images, masks = dataset
    sampler = PatchSampler(images, masks, patch_size=16, batch_size=5, seed=0)
    data, label = sampler.next_batch()
    assert data.shape == (5, 3, 16, 16) and data.dtype == np.float32
    assert label.shape == (5, 1, 16, 16) and label.dtype == np.float32
    assert data.min() >= 0 and data.max() <= 255
    assert set(np.unique(label)) <= {0.0, 1.0}


def test_sampler_patches_are_crops_of_the_sources(dataset):
    _, images, masks = dataset
    P = 12
    sampler = PatchSampler(images, masks, patch_size=P, batch_size=7, seed=5)
    for _ in range(4):
        data, label = sampler.next_batch()
        for k, (i, (y, x)) in enumerate(zip(sampler.last_indices, sampler.last_corners)):
            h, w = images[i].shape[:2]
            assert 0 <= y <= h - P and 0 <= x <= w - P
            # Channel 0 is red: the patch is RGB, channel-first.
            np.testing.assert_array_equal(data[k], images[i][y:y + P, x:x + P].transpose(2, 0, 1))
            np.testing.assert_array_equal(label[k, 0], masks[i][y:y + P, x:x + P])


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_sampler_crops_property(draw):
    """Any image sizes, patch and batch sizes: every patch is the crop at its corner."""
    P = draw.draw(st.integers(1, 9), label="patch_size")
    shapes = draw.draw(st.lists(st.tuples(st.integers(P, 14), st.integers(P, 14)),
                                min_size=1, max_size=4), label="shapes")
    N = draw.draw(st.integers(1, 6), label="batch_size")
    seed = draw.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    images = [random_image(rng, h, w) for h, w in shapes]
    masks = [rng.integers(0, 5, (h, w)) for h, w in shapes]  # label maps: binarised
    sampler = PatchSampler(images, masks, P, N, shuffle=draw.draw(st.booleans()), seed=seed)
    data, label = sampler.next_batch()
    for k, (i, (y, x)) in enumerate(zip(sampler.last_indices, sampler.last_corners)):
        np.testing.assert_array_equal(data[k], images[i][y:y + P, x:x + P].transpose(2, 0, 1))
        np.testing.assert_array_equal(label[k, 0], masks[i][y:y + P, x:x + P] > 0)


def test_sampler_seed_reproducibility(dataset):
    _, images, masks = dataset

    def batches(seed):
        sampler = PatchSampler(images, masks, patch_size=8, batch_size=4, seed=seed)
        return [sampler.next_batch() for _ in range(5)]

    for (d1, l1), (d2, l2) in zip(batches(3), batches(3)):
        np.testing.assert_array_equal(d1, d2)
        np.testing.assert_array_equal(l1, l2)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(batches(3), batches(4)))


def test_sampler_epochs_are_area_weighted(dataset):
    _, images, masks = dataset
    # 40×50 holds 4×5 = 20 tiles of 10×10 and 30×20 holds 3×2 = 6: one epoch is 26 patches.
    sampler = PatchSampler(images, masks, patch_size=10, batch_size=13, shuffle=True, seed=1)
    assert sampler.epoch_length == 26
    first = drawn_indices(sampler, 2)
    assert sampler.epoch == 1
    assert np.bincount(first).tolist() == [20, 6]
    assert not np.array_equal(first, np.sort(first))  # shuffled
    sampler.next_batch()
    assert sampler.epoch == 2


def test_sampler_without_shuffle_follows_list_order(dataset):
    _, images, masks = dataset
    sampler = PatchSampler(images, masks, patch_size=10, batch_size=8, shuffle=False, seed=1)
    order = drawn_indices(sampler, 4)
    expected = np.tile(np.repeat([0, 1], [20, 6]), 2)[:32]  # runs across the epoch boundary
    np.testing.assert_array_equal(order, expected)


def test_sampler_corners_cover_every_position():
    image = np.zeros((6, 5, 3), np.uint8)
    sampler = PatchSampler([image], [np.zeros((6, 5))], patch_size=4, batch_size=64, seed=0)
    sampler.next_batch()
    corners = {tuple(c) for c in sampler.last_corners}
    assert corners == {(y, x) for y in range(3) for x in range(2)}


def test_sampler_patch_equal_to_image():
    rng = np.random.default_rng(3)
    image, mask = random_image(rng, 8, 8), random_mask(rng, 8, 8)
    data, label = PatchSampler([image], [mask], 8, 2, seed=0).next_batch()
    np.testing.assert_array_equal(data[1], image.transpose(2, 0, 1))
    np.testing.assert_array_equal(label[0, 0], mask)


def test_sampler_patch_too_large_names_image_and_sizes(dataset):
    _, images, masks = dataset
    with pytest.raises(ValueError, match=r"patch_size 32 does not fit in small\.npy, which is 30×20"):
        PatchSampler(images, masks, 32, 2, names=["big.png", "small.npy"])


@pytest.mark.parametrize("kwargs, error, message", [
    ({"patch_size": 0}, ValueError, "patch_size must be >= 1"),
    ({"patch_size": 4.0}, TypeError, "patch_size must be an int"),
    ({"batch_size": True}, TypeError, "batch_size must be an int"),
    ({"batch_size": -1}, ValueError, "batch_size must be >= 1"),
    ({"shuffle": 1}, TypeError, "shuffle must be a bool"),
])
def test_sampler_validates_parameters(kwargs, error, message):
    arguments = dict(images=[np.zeros((8, 8, 3), np.uint8)], masks=[np.zeros((8, 8))],
                     patch_size=4, batch_size=2)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        PatchSampler(**arguments)


def test_sampler_validates_arrays():
    with pytest.raises(ValueError, match="at least one image"):
        PatchSampler([], [], 4, 1)
    with pytest.raises(ValueError, match="2 images but 1 masks"):
        PatchSampler([np.zeros((8, 8, 3), np.uint8)] * 2, [np.zeros((8, 8))], 4, 1)
    with pytest.raises(ValueError, match=r"image #0: expected an H×W×3 uint8"):
        PatchSampler([np.zeros((8, 8), np.uint8)], [np.zeros((8, 8))], 4, 1)
    with pytest.raises(ValueError, match=r"image #0: mask shape \(8, 7\)"):
        PatchSampler([np.zeros((8, 8, 3), np.uint8)], [np.zeros((8, 7))], 4, 1)


def test_sampler_does_not_share_memory_with_its_output(dataset):
    _, images, masks = dataset
    before = [image.copy() for image in images]
    data, _ = PatchSampler(images, masks, 8, 3, seed=0).next_batch()
    data[...] = -1  # writing into a batch must not reach the source images
    for image, original in zip(images, before):
        np.testing.assert_array_equal(image, original)


def test_mean_image_of_unequal_sizes_names_the_file():
    from caffe_layers.patches import compute_mean_image
    images = [np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)]
    with pytest.raises(ValueError, match=r"image b\.png has shape \(5, 4, 3\) but earlier images have"):
        compute_mean_image(images, names=["a.png", "b.png"])
