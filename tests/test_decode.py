"""Decoding: every mode becomes 8-bit RGB in the EXIF-oriented frame, with the right pixels;
bad files raise DecodeError naming the file; stored_jpeg keeps plain JPEG bytes."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from preprocess.decode import DecodeError, decode, load_rgb, stored_jpeg


def save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def marker_jpeg(path, orientation: int):
    """A 60x40 JPEG, white with a black block in its raw top-left corner, EXIF orientation set."""
    arr = np.full((40, 60, 3), 255, np.uint8)
    arr[:10, :10] = 0
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(Image.fromarray(arr), path, format="JPEG", quality=95, exif=exif.tobytes())


def test_exif_rotation_is_applied(tmp_path):
    decoded = decode(marker_jpeg(tmp_path / "r.jpg", 6))  # 6: rotate 90 clockwise to display
    assert decoded.orientation == 6 and decoded.raw_size == (60, 40)
    rgb = decoded.rgb
    assert rgb.shape == (60, 40, 3)
    assert rgb[:8, -8:].mean() < 40 and rgb[:8, :8].mean() > 215  # the corner moved to the top right


def test_grayscale_palette_rgba_16bit_cmyk(tmp_path):
    gray = load_rgb(save(Image.new("L", (5, 4), 77), tmp_path / "g.png"))
    assert gray.shape == (4, 5, 3) and gray.dtype == np.uint8 and (gray == 77).all()

    pal = Image.new("P", (3, 3), 0)
    pal.putpalette([10, 200, 30] + [0] * 765)
    assert (load_rgb(save(pal, tmp_path / "p.png")) == [10, 200, 30]).all()

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (0, 0, 255, 255)     # opaque blue stays blue
    rgba[0, 1] = (0, 0, 255, 0)       # transparent: composited over white, hidden colour gone
    out = load_rgb(save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    assert tuple(out[0, 0]) == (0, 0, 255) and tuple(out[0, 1]) == (255, 255, 255)

    deep = np.array([[0, 257 * 100, 65535]], np.uint16)
    out16 = load_rgb(save(Image.fromarray(deep), tmp_path / "d.png"))
    assert out16.dtype == np.uint8 and list(out16[0, :, 0]) == [0, 100, 255]

    cmyk = load_rgb(save(Image.new("CMYK", (4, 4), (255, 0, 0, 0)), tmp_path / "c.jpg", format="JPEG", quality=95))
    assert cmyk.shape == (4, 4, 3)
    r, g, b = cmyk[1, 1].astype(int)
    assert r < 40 and g > 200 and b > 200  # pure cyan ink


@pytest.mark.parametrize("name,content,reason", [
    ("empty.jpg", b"", "zero-byte"),
    ("text.jpg", b"hello, I am not a picture\n", "not a decodable image"),
])
def test_bad_bytes_raise_with_the_file_named(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DecodeError, match=reason) as err:
        load_rgb(path)
    assert str(path) in str(err.value)


def test_truncated_jpeg_raises(tmp_path):
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(DecodeError, match="truncated"):
        load_rgb(path)


def test_pixel_limit_refuses_before_decoding(tmp_path):
    path = save(Image.new("RGB", (40, 30)), tmp_path / "big.png")
    assert load_rgb(path, limit=1200).shape == (30, 40, 3)
    with pytest.raises(DecodeError, match="exceeds the limit of 1199"):
        load_rgb(path, limit=1199)


def test_missing_file_raises(tmp_path):
    with pytest.raises(DecodeError, match="cannot read"):
        load_rgb(tmp_path / "gone.jpg")


def test_stored_jpeg_keeps_plain_jpeg_bytes(tmp_path):
    path = save(Image.fromarray(np.full((20, 30, 3), 90, np.uint8)), tmp_path / "plain.jpg", format="JPEG")
    data, rgb = stored_jpeg(path)
    assert data == path.read_bytes() and rgb.shape == (20, 30, 3)


def test_stored_jpeg_reencodes_what_needs_fixing(tmp_path):
    rotated = marker_jpeg(tmp_path / "r.jpg", 8)
    data, rgb = stored_jpeg(rotated)
    assert data != rotated.read_bytes()
    stored = Image.open(io.BytesIO(data))
    assert stored.format == "JPEG" and stored.size == (40, 60)
    assert stored.getexif().get(0x0112, 1) == 1
    np.testing.assert_array_equal(np.asarray(stored.convert("RGB")), rgb)
    assert np.abs(rgb.astype(int) - load_rgb(rotated).astype(int)).mean() < 3  # same frame, same pixels

    png = save(Image.new("RGBA", (7, 5), (1, 2, 3, 255)), tmp_path / "x.png")
    data, rgb = stored_jpeg(png)
    assert Image.open(io.BytesIO(data)).format == "JPEG" and rgb.shape == (5, 7, 3)
