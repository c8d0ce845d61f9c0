"""The one place images are found, opened and hashed.

Opening applies EXIF orientation, takes the first frame of animations, converts
every mode (RGBA, LA, P, CMYK, I;16, I, F, L, 1) to 8-bit RGB, and refuses
images over a pixel budget before decoding them (decompression bombs).
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ImageError

if TYPE_CHECKING:
    from PIL import Image as PILImage

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 64_000_000  # ~8000 x 8000; larger inputs are refused before decoding


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def find_images(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files, folders (recursive, sorted) and glob patterns into image paths.

    A plain path that does not exist is kept, so opening it later reports it as
    missing rather than silently dropping it. ``-`` is passed through for stdin.
    """
    out: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        if p not in seen:
            seen.add(p)
            out.append(p)

    for item in inputs:
        s = str(item)
        p = Path(s)
        if s == "-":
            add(p)
        elif p.is_dir():
            for child in sorted(p.rglob("*")):
                if child.is_file() and is_image_path(child):
                    add(child)
        elif any(ch in s for ch in "*?[") and not p.exists():
            for m in sorted(glob.glob(s, recursive=True)):
                mp = Path(m)
                if mp.is_file():
                    add(mp)
        else:
            add(p)
    return out


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _to_rgb(img: PILImage.Image) -> PILImage.Image:
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        return Image.fromarray(scaled.clip(0, 255).astype("uint8"), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def open_image(
    source: str | os.PathLike[str] | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> PILImage.Image:
    """Open a file path or raw bytes as a fully decoded 8-bit RGB image.

    Raises ImageError naming the file for missing, empty, truncated, oversized
    and non-image inputs.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    label = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    if isinstance(source, bytes):
        if not source:
            raise ImageError(label, "empty image data")
        fp: io.BytesIO | Path = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.exists():
            raise ImageError(label, "image not found")
        if path.is_dir():
            raise ImageError(label, "expected an image file, got a folder")
        if path.stat().st_size == 0:
            raise ImageError(label, "empty image file")
        fp = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageError(
                        label,
                        f"image too large ({width}x{height} = {width * height:,} pixels > limit {max_pixels:,}; "
                        "downscale it or raise the pixel limit)",
                    )
                if getattr(img, "is_animated", False):
                    img.seek(0)
                img.load()
                oriented = ImageOps.exif_transpose(img)
                rgb = _to_rgb(oriented)
                if rgb is img:
                    rgb = img.copy()
                return rgb
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(label, f"image too large (decompression bomb guard: {e})") from None
    except UnidentifiedImageError:
        raise ImageError(label, "not an image file (format not recognised)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(label, f"cannot decode image ({e}); the file may be truncated or corrupt") from None


def fit_within(img: PILImage.Image, max_side: int | None) -> PILImage.Image:
    """Downscale (keeping aspect) so the longer side is at most ``max_side``."""
    if not max_side or max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size)


def encode_data_uri(img: PILImage.Image, fmt: str = "PNG") -> str:
    """Encode an image as a ``data:`` URI for OpenAI-style ``image_url`` parts."""
    import base64

    buf = io.BytesIO()
    img.save(buf, format=fmt)
    mime = "jpeg" if fmt.upper() in ("JPG", "JPEG") else fmt.lower()
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class EncodedImage:
    """An image ready for an OpenAI-style ``image_url`` part, with the size the endpoint sees."""

    data_uri: str
    width: int
    height: int


def encode_for_request(
    source: str | os.PathLike[str] | bytes, max_side: int | None = None, *, name: str | None = None
) -> EncodedImage:
    """Validate (decode) an image, then send its own JPEG/PNG bytes when they fit, else a downscaled JPEG.

    Sending the file's own bytes keeps the exact pixels the labels were made for and
    costs no re-encoding; only oversized or exotic formats are re-encoded. The one
    encoder behind annotate, evaluate and ``ask --base-url``.
    """
    import base64

    img = open_image(source, name=name)
    w, h = img.size
    fits = not max_side or max(w, h) <= max_side
    raw = b""
    if fits:
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    mime = "jpeg" if raw.startswith(b"\xff\xd8\xff") else "png" if raw.startswith(b"\x89PNG") else None
    if mime is not None:
        return EncodedImage(f"data:image/{mime};base64," + base64.b64encode(raw).decode("ascii"), w, h)
    img = fit_within(img, max_side)
    return EncodedImage(encode_data_uri(img, "JPEG"), img.width, img.height)
