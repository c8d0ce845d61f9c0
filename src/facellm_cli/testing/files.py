"""Small real files for tests and benchmarks: PNGs (on disk, as bytes, as data URIs) and JSON Lines."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

_MIME = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}


def image_bytes(
    color: tuple[int, int, int] = (90, 120, 150), size: int | tuple[int, int] = 16, fmt: str = "PNG"
) -> bytes:
    """One flat-colour image encoded as ``fmt``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size) if isinstance(size, int) else size, color).save(buf, format=fmt)
    return buf.getvalue()


def png_bytes(color: tuple[int, int, int] = (90, 120, 150), size: int = 16) -> bytes:
    return image_bytes(color, size)


def seed_color(seed: int) -> tuple[int, int, int]:
    """A distinct colour per seed, so images written with different seeds hash differently."""
    return ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256)


def write_image(path: Path, color: tuple[int, int, int], size: int | tuple[int, int] = 16) -> Path:
    """A flat-colour image at ``path`` (parents created), encoded as its suffix says (.png, .jpg, ...)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size) if isinstance(size, int) else size, color).save(path)
    return path


def write_png(path: Path, seed: int, size: int = 8) -> Path:
    """A ``size``-square PNG at ``path`` (parents created) whose colour depends on ``seed``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed_color(seed), size))
    return path


def png_data_uri(color: tuple[int, int, int], size: tuple[int, int] = (64, 64), fmt: str = "PNG") -> str:
    data = image_bytes(color, size, fmt)
    return f"data:image/{_MIME[fmt]};base64," + base64.b64encode(data).decode()


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
