"""Helpers for the serve tests: a real server on a free 127.0.0.1 port, image data URIs, messages."""

from __future__ import annotations

import base64
import io
from typing import Any


def running_server(cfg: Any, lm: Any, api_key: str | None = None) -> Any:
    """The library's background server (real uvicorn, free 127.0.0.1 port); yields (base_url, app)."""
    from facellm_cli.serve.app import background_server

    return background_server(cfg, lm, api_key=api_key)


def png_data_uri(color: tuple[int, int, int], size: tuple[int, int] = (64, 64), fmt: str = "PNG") -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    mime = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}[fmt]
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(question: str, *uris: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in uris]
    parts.append({"type": "text", "text": question})
    return [{"role": "user", "content": parts}]
