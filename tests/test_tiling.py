"""caffe_layers.tiling (and the overlay drawing of caffe_layers.reports): pure numpy, no Caffe."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from caffe_layers.reports import overlay
from caffe_layers.tiling import segment_tiled, tile_grid


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(4, 64), st.data())
def test_tile_grid_covers_every_pixel(height, width, tile, data):
    overlap = data.draw(st.integers(0, tile - 1))
    origins = tile_grid(height, width, tile, overlap)
    covered = np.zeros((height, width), bool)
    th, tw = min(tile, height), min(tile, width)
    for y, x in origins:
        assert 0 <= y <= height - th and 0 <= x <= width - tw
        covered[y:y + th, x:x + tw] = True
    assert covered.all()
    # Neighbouring tiles overlap by at least `overlap` (when there are several).
    for axis, size, t in ((0, height, th), (1, width, tw)):
        starts = np.unique(origins[:, axis])
        assert np.all(starts[1:] - starts[:-1] <= t - overlap)


def test_tile_grid_multiple_and_errors():
    origins = tile_grid(100, 72, 32, 8, multiple=4)
    assert np.all(origins % 4 == 0)  # sizes multiples of 4 -> every tile on the 4-grid
    assert origins[:, 0].max() == 100 - 32 and origins[:, 1].max() == 72 - 32
    with pytest.raises(ValueError, match="overlap"):
        tile_grid(100, 100, 32, 32)


def box_predict(mode="constant", calls=None):
    """Translation-equivariant toy net: sigmoid of a 3x3 box filter of the red channel."""
    kernel = np.ones((1, 1, 3, 3)) / 9.0

    def predict(batch):
        assert batch.dtype == np.float32 and batch.ndim == 4 and batch.shape[1] == 3
        if calls is not None:
            calls.append(batch.shape)
        mean = ndimage.correlate(batch[:, :1].astype(np.float64), kernel, mode=mode)
        nucleus = 1.0 / (1.0 + np.exp(-(mean - 128.0) / 16.0))
        return np.concatenate([1.0 - nucleus, nucleus], axis=1).astype(np.float32)

    return predict


def full_pass(predict, rgb):
    return predict(rgb.transpose(2, 0, 1)[None].astype(np.float32))[0, 1]


@pytest.mark.parametrize("shape", [(101, 77), (130, 259), (64, 64), (5, 3), (1, 1)])
def test_tiled_equals_single_pass(shape):
    rgb = np.random.default_rng(0).integers(0, 256, shape + (3,), dtype=np.uint8)
    calls = []
    prob = segment_tiled(box_predict(calls=calls), rgb, tile=32, overlap=8, multiple=4)
    assert prob.shape == shape and prob.dtype == np.float32
    assert np.all(np.isfinite(prob)) and prob.min() >= 0 and prob.max() <= 1
    reference = full_pass(box_predict(), rgb)
    # Zero padding (like Caffe's): identical except within the 1-pixel receptive radius of
    # the bottom/right edges, where the tiles see reflect padding instead.
    np.testing.assert_array_equal(prob[:-1, :-1], reference[:-1, :-1])
    np.testing.assert_allclose(prob, reference, atol=1.0)
    # Mirror padding in the net = the tiler's reflect padding: identical everywhere.
    np.testing.assert_array_equal(segment_tiled(box_predict("mirror"), rgb, 32, 8, 4),
                                  full_pass(box_predict("mirror"), rgb))
    # Only tile-sized single-image batches ever reach predict, multiples of 4.
    tile_shape = tuple(min(32, -(-s // 4) * 4) for s in shape)
    assert set(calls) == {(1, 3) + tile_shape}
    assert len(calls) <= len(tile_grid(*(-(-s // 4) * 4 for s in shape), 32, 8, 4))


class ReadRecorder:
    """Array-like image that records the size of every read (a stand-in for a disk map)."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, key):
        block = self.array[key]
        self.reads.append(block.shape)
        return block


def test_streaming_reads_one_tile_at_a_time(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (150, 203, 3), dtype=np.uint8)
    image = ReadRecorder(rgb)
    out = np.lib.format.open_memmap(tmp_path / "prob.npy", mode="w+", dtype=np.float32,
                                    shape=rgb.shape[:2])
    result = segment_tiled(box_predict(), image, tile=48, overlap=16, multiple=4, out=out)
    assert result is out
    assert len(image.reads) > 1
    assert all(h <= 48 and w <= 48 for h, w, _ in image.reads)
    np.testing.assert_array_equal(out, segment_tiled(box_predict(), rgb, 48, 16, 4))


def test_memmap_input(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (90, 61, 3), dtype=np.uint8)
    np.save(tmp_path / "rgb.npy", rgb)
    mapped = np.load(tmp_path / "rgb.npy", mmap_mode="r")
    np.testing.assert_array_equal(segment_tiled(box_predict(), mapped, 32, 8),
                                  segment_tiled(box_predict(), rgb, 32, 8))


def test_blank_image_and_alpha():
    blank = np.zeros((40, 50, 4), np.uint8)
    prob = segment_tiled(box_predict(), blank, tile=16, overlap=4, progress=True)
    assert prob.shape == (40, 50) and np.all(np.isfinite(prob))


def test_segment_tiled_errors():
    rgb = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ValueError, match="RGB"):
        segment_tiled(box_predict(), np.zeros((20, 20)), 16, 4)
    with pytest.raises(ValueError, match="overlap"):
        segment_tiled(box_predict(), rgb, 16, 16)
    with pytest.raises(ValueError, match="predict returned shape"):
        segment_tiled(lambda b: b[:, :1], rgb, 16, 4)
    with pytest.raises(ValueError, match="out has shape"):
        segment_tiled(box_predict(), rgb, 16, 4, out=np.zeros((3, 3), np.float32))


def test_overlay():
    rgb = np.full((9, 9, 3), 100, np.uint8)
    mask = np.zeros((9, 9), bool)
    mask[2:7, 2:7] = True
    outlined = overlay(rgb, mask, color=(0, 255, 0))
    green = np.all(outlined == (0, 255, 0), axis=2)
    assert green[2, 2:7].all() and not green[4, 4] and not green[0].any()
    assert np.all(rgb == 100)  # input untouched
    tinted = overlay(rgb, mask, color=(255, 0, 0), mode="tint", alpha=0.5)
    assert tuple(tinted[4, 4]) == (178, 50, 50) and tuple(tinted[0, 0]) == (100, 100, 100)
    assert np.array_equal(overlay(rgb, np.zeros((9, 9))), rgb)
    with pytest.raises(ValueError, match="mask shape"):
        overlay(rgb, np.zeros((3, 3)))


def test_padded_batches_keep_one_input_shape_and_the_result():
    rgb = np.random.default_rng(1).integers(0, 256, (70, 120, 3), dtype=np.uint8)
    calls = []
    stats = {}
    padded = segment_tiled(box_predict(calls=calls), rgb, tile=32, overlap=8, multiple=4, batch_size=4,
                           pad_batches=True, stats=stats)
    plain = segment_tiled(box_predict(), rgb, tile=32, overlap=8, multiple=4, batch_size=4)
    np.testing.assert_array_equal(padded, plain)
    tiles = len(tile_grid(72, 120, 32, 8, 4))
    assert tiles % 4 != 0  # the last batch is partial ...
    assert set(calls) == {(4, 3, 32, 32)}  # ... and still reaches predict as 4 tiles
    assert stats["net_pixels"] == len(calls) * 4 * 32 * 32
