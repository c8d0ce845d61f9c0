from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facellm_cli.errors import ImageError
from facellm_cli.images import find_images, open_image


def save(img: Image.Image, path: Path, **kw: object) -> Path:
    img.save(path, **kw)
    return path


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [
        ("RGBA", ".png"),
        ("LA", ".png"),
        ("P", ".png"),
        ("L", ".png"),
        ("1", ".png"),
        ("CMYK", ".jpg"),
        ("I;16", ".png"),
        ("I", ".tif"),
        ("F", ".tif"),
    ],
)
def test_every_mode_becomes_8bit_rgb(tmp_path: Path, mode: str, suffix: str) -> None:
    base = Image.new("RGB", (20, 10), (200, 40, 10))
    if mode == "I;16":
        img = Image.fromarray((np.arange(200).reshape(10, 20) * 300).astype("uint16"))
        assert img.mode.startswith("I;16")
    elif mode in ("I", "F"):
        img = Image.fromarray(np.arange(200, dtype="float32" if mode == "F" else "int32").reshape(10, 20), mode=mode)
    else:
        img = base.convert(mode)
    out = open_image(save(img, tmp_path / f"x{suffix}"))
    assert out.mode == "RGB" and out.size == (20, 10)
    assert np.asarray(out).dtype == np.uint8


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.putpixel((0, 0), (0, 0, 255, 255))
    out = open_image(save(img, tmp_path / "t.png"))
    assert out.getpixel((1, 1)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 0, 255)


def test_16bit_keeps_gradient(tmp_path: Path) -> None:
    arr = np.linspace(0, 65535, 64, dtype="uint16").reshape(8, 8)
    out = np.asarray(open_image(save(Image.fromarray(arr), tmp_path / "g.png")))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_exif_orientation_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = save(img, tmp_path / "r.jpg", exif=exif.tobytes())
    assert Image.open(path).size == (40, 20)
    assert open_image(path).size == (20, 40)


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0)]]
    path = tmp_path / "a.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    r, g, _ = open_image(path).getpixel((4, 4))
    assert r > 200 and g < 50


def test_pixel_limit_refuses_bombs_before_decoding(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (300, 300)), tmp_path / "big.png")
    with pytest.raises(ImageError) as e:
        open_image(path, max_pixels=10_000)
    assert "image too large (300x300 = 90,000 pixels > limit 10,000" in str(e.value)
    assert str(path) in str(e.value)


def test_bad_files_name_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="PNG")
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    cases = {
        tmp_path / "missing.png": "image not found",
        empty: "empty image file",
        text: "not an image file (format not recognised)",
        trunc: "cannot decode image",
        tmp_path: "expected an image file, got a folder",
    }
    for path, reason in cases.items():
        with pytest.raises(ImageError) as e:
            open_image(path)
        assert str(e.value).startswith(reason), str(e.value)
        assert str(e.value).endswith(str(path))
    with pytest.raises(ImageError, match="empty image data"):
        open_image(b"")


def test_open_bytes(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (5, 6)).save(buf, format="WEBP")
    assert open_image(buf.getvalue()).size == (5, 6)


def test_find_images_expands_folders_globs_and_keeps_missing(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ["b.png", "a.jpg", "sub/c.webp", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    found = find_images([str(tmp_path)])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.jpg", "b.png", "sub/c.webp"]
    assert [p.name for p in find_images([str(tmp_path / "*.png")])] == ["b.png"]
    assert find_images([str(tmp_path / "gone.png"), "-"]) == [tmp_path / "gone.png", Path("-")]
