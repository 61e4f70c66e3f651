"""caffe_layers.image_io: the one image/mask reader (formats, colour rules, errors, memmap)."""
import os

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from caffe_layers import image_io
from caffe_layers.image_io import read_mask, read_rgb


def random_image(seed, height, width, channels=3):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


# --------------------------------------------------------------------------- read_rgb: formats

@pytest.mark.parametrize("ext", [".png", ".tif", ".tiff", ".npy"])
def test_read_rgb_lossless_formats(tmp_path, ext):
    image = random_image(1, 7, 9)
    path = tmp_path / f"x{ext}"
    if ext == ".npy":
        np.save(path, image)
    else:
        Image.fromarray(image).save(path)
    loaded = read_rgb(path)
    assert type(loaded) is np.ndarray and loaded.dtype == np.uint8 and loaded.shape == (7, 9, 3)
    assert loaded.flags.c_contiguous
    np.testing.assert_array_equal(loaded, image)
    np.testing.assert_array_equal(read_rgb(str(path)), image)  # str paths too


def test_read_rgb_jpeg(tmp_path):
    image = np.full((8, 8, 3), (200, 100, 50), np.uint8)
    Image.fromarray(image).save(tmp_path / "x.jpg", quality=95)
    Image.fromarray(image).save(tmp_path / "x.jpeg", quality=95)
    for name in ("x.jpg", "x.jpeg"):
        loaded = read_rgb(tmp_path / name)
        assert loaded.shape == (8, 8, 3) and loaded.dtype == np.uint8
        assert np.abs(loaded.astype(int) - image).max() <= 3  # lossy, but RGB order kept


def test_read_rgb_planar_tiff(tmp_path):
    image = random_image(4, 6, 7)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(image, -1, 0), photometric="rgb",
                     planarconfig="separate")
    np.testing.assert_array_equal(read_rgb(tmp_path / "planar.tif"), image)
    mapped = read_rgb(tmp_path / "planar.tif", memmap=True)
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, image)


def test_read_rgb_pyramid_level0(tmp_path):
    """SVS and pyramidal TIFF: level 0 (full resolution) of the first series."""
    image = random_image(6, 64, 48)
    for name in ("slide.svs", "pyramid.tif"):
        with tifffile.TiffWriter(tmp_path / name) as tiff:
            tiff.write(image, tile=(16, 16), subifds=1, compression="zlib")
            tiff.write(image[::2, ::2], tile=(16, 16), subfiletype=1, compression="zlib")
        for memmap in (False, True):  # tiled and compressed: memmap falls back to a full read
            loaded = read_rgb(tmp_path / name, memmap=memmap)
            assert loaded.shape == (64, 48, 3), (name, memmap)
            np.testing.assert_array_equal(loaded, image)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_read_rgb_tiff_falls_back_to_pillow(tmp_path, monkeypatch):
    def no_codec(path, memmap=False):
        raise ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    image = random_image(5, 5, 4)
    Image.fromarray(image).save(tmp_path / "x.tiff")
    monkeypatch.setattr(image_io, "_read_tiff", no_codec)
    np.testing.assert_array_equal(read_rgb(tmp_path / "x.tiff"), image)
    np.testing.assert_array_equal(read_rgb(tmp_path / "x.tiff", memmap=True), image)
    (tmp_path / "bad.tiff").write_bytes(b"II*\x00garbage")
    # Neither can read it: the error names the file and gives tifffile's reason.
    with pytest.raises(ValueError, match=r"bad\.tiff.*cannot be read.*imagecodecs"):
        read_rgb(tmp_path / "bad.tiff")


# --------------------------------------------------------------------------- read_rgb: colour

def test_read_rgb_drops_alpha(tmp_path):
    rgba = random_image(2, 6, 5, channels=4)
    rgba[..., 3] = 255  # opaque, so PIL keeps colours exact
    Image.fromarray(rgba, "RGBA").save(tmp_path / "x.png")
    np.save(tmp_path / "x.npy", rgba)
    tifffile.imwrite(tmp_path / "x.tif", rgba, photometric="rgb", extrasamples="unassalpha")
    for name in ("x.png", "x.npy", "x.tif"):
        loaded = read_rgb(tmp_path / name)
        assert loaded.flags.c_contiguous, name
        np.testing.assert_array_equal(loaded, rgba[..., :3], err_msg=name)


def test_read_rgb_palette_and_cmyk(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[:2] = (255, 0, 0)
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "p.png"), rgb)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    loaded = read_rgb(tmp_path / "c.jpg")
    assert loaded.shape == (4, 4, 3) and np.abs(loaded.astype(int) - rgb).max() <= 8


def test_read_rgb_grey_is_an_error(tmp_path):
    """One rule everywhere: a grey-level image is refused (never repeated to 3 channels)."""
    grey = np.zeros((5, 6), np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    Image.fromarray(grey).convert("LA").save(tmp_path / "ga.png")
    np.save(tmp_path / "g.npy", grey)
    np.save(tmp_path / "g1.npy", grey[..., None])
    tifffile.imwrite(tmp_path / "g.tif", grey)
    for name in ("g.png", "ga.png", "g.npy", "g1.npy", "g.tif"):
        for memmap in (False, True):
            with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}.*grey-level.*RGB"):
                read_rgb(tmp_path / name, memmap=memmap)


def test_read_rgb_other_shapes_are_errors(tmp_path):
    np.save(tmp_path / "five.npy", np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"five\.npy.*shape \(4, 4, 5\)"):
        read_rgb(tmp_path / "five.npy")
    np.save(tmp_path / "flat.npy", np.zeros(12, np.uint8))
    with pytest.raises(ValueError, match=r"flat\.npy.*shape"):
        read_rgb(tmp_path / "flat.npy")


# --------------------------------------------------------------------------- read_rgb: errors

def test_read_rgb_non_8_bit(tmp_path):
    np.save(tmp_path / "big.npy", np.full((4, 4, 3), 4095, np.uint16))
    with pytest.raises(ValueError, match=r"big\.npy.*uint16.*4095.*0\.\.255"):
        read_rgb(tmp_path / "big.npy")
    tifffile.imwrite(tmp_path / "big16.tif", np.full((4, 4, 3), 40000, np.uint16))
    with pytest.raises(ValueError, match=r"big16\.tif.*uint16"):
        read_rgb(tmp_path / "big16.tif", memmap=True)
    np.save(tmp_path / "f.npy", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"f\.npy.*float32"):  # 0-1 or 0-255? refused
        read_rgb(tmp_path / "f.npy")
    np.save(tmp_path / "small.npy", np.full((4, 4, 3), 7, np.int64))  # ints in range are fine
    loaded = read_rgb(tmp_path / "small.npy")
    assert loaded.dtype == np.uint8 and (loaded == 7).all()


def test_read_rgb_missing_unsupported_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gone\.png"):
        read_rgb(tmp_path / "gone.png")
    with pytest.raises(FileNotFoundError, match=r"folder"):
        (tmp_path / "folder").mkdir()
        read_rgb(tmp_path / "folder")
    (tmp_path / "x.bmp").write_bytes(b"")
    with pytest.raises(ValueError, match=r"x\.bmp.*unsupported file type"):
        read_rgb(tmp_path / "x.bmp")
    for name in ("broken.png", "broken.jpg", "broken.tif", "broken.svs", "broken.npy"):
        (tmp_path / name).write_bytes(b"not an image")
        with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}.*cannot be read"):
            read_rgb(tmp_path / name)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"objects\.npy.*cannot be read"):  # no pickles
        read_rgb(tmp_path / "objects.npy")


# --------------------------------------------------------------------------- read_rgb: memmap

def test_read_rgb_memmap(tmp_path):
    """Uncompressed TIFF and .npy stay on disk; everything else is read whole."""
    rgb = random_image(3, 30, 40)
    tifffile.imwrite(tmp_path / "a.tif", rgb)
    np.save(tmp_path / "a.npy", rgb)
    for name in ("a.tif", "a.npy"):
        mapped = read_rgb(tmp_path / name, memmap=True)
        assert isinstance(mapped, np.memmap), name
        assert not mapped.flags.writeable, name
        np.testing.assert_array_equal(mapped, rgb)
        assert not isinstance(read_rgb(tmp_path / name), np.memmap), name  # the default

    rgba = random_image(7, 30, 40, channels=4)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples="unassalpha")
    mapped = read_rgb(tmp_path / "rgba.tif", memmap=True)
    assert isinstance(mapped, np.memmap) and mapped.shape == (30, 40, 3)
    np.testing.assert_array_equal(mapped, rgba[..., :3])

    tifffile.imwrite(tmp_path / "z.tif", rgb, compression="zlib")
    Image.fromarray(rgb).save(tmp_path / "a.png")
    for name in ("z.tif", "a.png"):  # not mappable: a full read, same pixels
        loaded = read_rgb(tmp_path / name, memmap=True)
        assert not isinstance(loaded, np.memmap), name
        np.testing.assert_array_equal(loaded, rgb)


# --------------------------------------------------------------------------- read_mask

def test_read_mask_any_positive_is_nucleus(tmp_path):
    labels = np.array([[0, 1, 2], [0, 300, 0]], np.uint16)  # an instance label map
    np.save(tmp_path / "m.npy", labels)
    Image.fromarray((labels > 0).astype(np.uint8) * 255).save(tmp_path / "m.png")
    Image.fromarray(labels).save(tmp_path / "m16.png")  # 16-bit label PNG (mode I;16)
    Image.fromarray(labels > 0).save(tmp_path / "m1.png")  # mode 1
    tifffile.imwrite(tmp_path / "m.tif", labels)
    np.save(tmp_path / "mf.npy", labels.astype(np.float32) / 300)
    expected = labels > 0
    for name in ("m.npy", "m.png", "m16.png", "m1.png", "m.tif", "mf.npy"):
        mask = read_mask(tmp_path / name)
        assert mask.dtype == bool and mask.shape == (2, 3), name
        np.testing.assert_array_equal(mask, expected, err_msg=name)


def test_read_mask_palette_gives_labels(tmp_path):
    labels = np.array([[0, 1], [2, 0]], np.uint8)
    image = Image.fromarray(labels, "P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (253 * 3))
    image.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png"), labels > 0)


def test_read_mask_rgb_only_with_identical_channels(tmp_path):
    grey_as_rgb = np.repeat((np.eye(4, dtype=np.uint8) * 255)[..., None], 3, axis=2)
    Image.fromarray(grey_as_rgb).save(tmp_path / "ok.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "ok.png"), np.eye(4, dtype=bool))
    rgba = np.concatenate([grey_as_rgb, np.full((4, 4, 1), 255, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "ok_alpha.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "ok_alpha.png"), np.eye(4, dtype=bool))
    Image.fromarray(np.eye(4, dtype=np.uint8) * 255).convert("LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "la.png"), np.eye(4, dtype=bool))
    colour = grey_as_rgb.copy()
    colour[0, 0] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(ValueError, match=r"colour\.png.*single-channel"):
        read_mask(tmp_path / "colour.png")
    np.save(tmp_path / "stack.npy", np.zeros((2, 5, 7), np.uint8))
    with pytest.raises(ValueError, match=r"stack\.npy.*single-channel"):
        read_mask(tmp_path / "stack.npy")


def test_read_mask_shape_check_and_errors(tmp_path):
    Image.fromarray((random_image(8, 30, 40)[..., 0] > 128).astype(np.uint8)).save(
        tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png", shape=(30, 40)).shape == (30, 40)
    assert read_mask(tmp_path / "m.png", shape=np.array([30, 40])).shape == (30, 40)
    with pytest.raises(ValueError, match=r"m\.png.*30×40.*does not match.*5×5"):
        read_mask(tmp_path / "m.png", shape=(5, 5))
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        read_mask(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"bad\.png.*cannot be read"):
        read_mask(tmp_path / "bad.png")
    (tmp_path / "m.gif").write_bytes(b"")
    with pytest.raises(ValueError, match=r"m\.gif.*unsupported file type"):
        read_mask(tmp_path / "m.gif")
    np.save(tmp_path / "text.npy", np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(ValueError, match=r"text\.npy.*non-numeric"):
        read_mask(tmp_path / "text.npy")


# --------------------------------------------------------------------------- hostile files

def test_claimed_size_is_checked_before_allocating(tmp_path, monkeypatch):
    """A small file claiming a huge image is refused from its header, for every format."""
    import tifffile

    monkeypatch.setenv("CAFFE_STAIN_MAX_PIXELS", "1000")
    image = random_image(0, 40, 40)  # 1600 pixels > 1000
    Image.fromarray(image).save(tmp_path / "big.png")
    tifffile.imwrite(tmp_path / "big.tif", image, compression="zlib")
    np.save(tmp_path / "big.npy", image)
    for name in ("big.png", "big.tif", "big.npy"):
        with pytest.raises(ValueError, match=r"claims 40×40 = 1600 pixels, more than the limit of 1000"):
            read_rgb(tmp_path / name)
    np.testing.assert_array_equal(read_rgb(tmp_path / "big.npy", memmap=True), image)  # no allocation
    monkeypatch.setenv("CAFFE_STAIN_MAX_PIXELS", "many")
    with pytest.raises(ValueError, match="CAFFE_STAIN_MAX_PIXELS='many' is not an integer"):
        read_rgb(tmp_path / "big.png")


def test_npy_header_claiming_more_than_the_file_holds(tmp_path):
    path = tmp_path / "liar.npy"
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "|u1", "fortran_order": False,
                                                      "shape": (100000, 100000, 3)})
        handle.write(b"\0" * 100)
    with pytest.raises(ValueError, match=r"liar\.npy' is truncated: its header claims shape \(100000, 100000, 3\)"):
        read_rgb(path)
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([[{"a": 1}]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="holds Python objects"):
        read_rgb(objects)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
@settings(max_examples=150, deadline=None)
@given(st.sampled_from([".png", ".jpg", ".tif", ".npy"]), st.binary(max_size=600), st.integers(0, 400))
def test_random_and_truncated_bytes_give_a_clear_error(tmp_path_factory, suffix, noise, cut):
    """Any bytes (random, or a real file cut short) give an image or a ValueError naming the file."""
    folder = tmp_path_factory.mktemp("fuzz")
    real = folder / f"real{suffix}"
    image = random_image(1, 12, 9)
    if suffix == ".npy":
        np.save(real, image)
    else:
        Image.fromarray(image).save(real)
    for name, data in (("noise", noise), ("cut", real.read_bytes()[:cut]),
                       ("spliced", real.read_bytes()[:cut] + noise)):
        path = folder / f"{name}{suffix}"
        path.write_bytes(data)
        for reader in (read_rgb, read_mask):
            try:
                result = reader(path)
            except ValueError as error:
                assert str(path) in str(error) or path.name in str(error)
            else:
                assert isinstance(result, np.ndarray) and result.ndim in (2, 3)


def test_written_files_are_not_private(tmp_path):
    # The temporary file of an atomic write is made 0600; the output must not stay that way.
    old = os.umask(0o022)
    try:
        new = image_io.write_image(tmp_path / "new.png", np.zeros((4, 4, 3), np.uint8))
        assert new.stat().st_mode & 0o777 == 0o644
        shared = tmp_path / "shared.png"
        shared.write_bytes(b"")
        shared.chmod(0o664)
        image_io.write_image(shared, np.zeros((4, 4, 3), np.uint8), overwrite=True)
        assert shared.stat().st_mode & 0o777 == 0o664  # a replaced file keeps its mode
    finally:
        os.umask(old)


def test_empty_images_and_masks_are_refused_by_name(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 5, 3), np.uint8))
    np.save(tmp_path / "empty_mask.npy", np.zeros((4, 0), np.uint8))
    with pytest.raises(ValueError, match=r"image '.*empty\.npy' is empty"):
        read_rgb(tmp_path / "empty.npy")
    with pytest.raises(ValueError, match=r"mask '.*empty_mask\.npy' is empty"):
        read_mask(tmp_path / "empty_mask.npy")


def test_16_bit_rgb_png_is_not_silently_cut_to_its_high_byte(tmp_path):
    import cv2
    rgb = np.zeros((6, 5, 3), np.uint16)
    rgb[..., 0], rgb[..., 2] = 16383, 40  # 14-bit data in 16 bits: Pillow gave (63, 0, 0)
    cv2.imwrite(str(tmp_path / "deep.png"), rgb[..., ::-1])
    with pytest.raises(ValueError, match=r"deep\.png' has dtype uint16 with values 0\.\.16383; expected 8-bit"):
        read_rgb(tmp_path / "deep.png")
    rgb[..., 0] = 200  # values an 8-bit image holds: accepted, as for a 16-bit TIFF
    cv2.imwrite(str(tmp_path / "shallow.png"), rgb[..., ::-1])
    assert read_rgb(tmp_path / "shallow.png")[0, 0].tolist() == [200, 0, 40]


def test_an_unwritable_folder_is_named_with_the_output(tmp_path):
    with pytest.raises(OSError, match=r"^/proc/x\.png: cannot write in folder /proc \("):
        image_io.write_image("/proc/x.png", np.zeros((2, 2, 3), np.uint8))


def test_the_pixel_limit_is_the_packages_not_pillows(tmp_path, monkeypatch):
    # Pillow refuses PNG/JPEG above its MAX_IMAGE_PIXELS (179 M by default, a 13 400² image) as a
    # "decompression bomb", whatever CAFFE_STAIN_MAX_PIXELS says; here it is made 100 pixels.
    from PIL import Image as PILImage
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(tmp_path / "x.png")
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(tmp_path / "x.jpg")
    for name in ("x.png", "x.jpg"):
        assert read_rgb(tmp_path / name).shape == (20, 30, 3)
        assert image_io.image_shape(tmp_path / name) == (20, 30)
    monkeypatch.setenv("CAFFE_STAIN_MAX_PIXELS", "500")
    with pytest.raises(ValueError, match=r"claims 20×30 = 600 pixels, more than the limit of 500"):
        read_rgb(tmp_path / "x.png")
    assert PILImage.MAX_IMAGE_PIXELS == 100  # Pillow's own setting is left as it was
