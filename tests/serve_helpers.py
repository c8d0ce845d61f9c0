"""A real uvicorn server on a free 127.0.0.1 port, in a background thread, for the serve tests and bench."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def running_server(cfg: Any, lm: Any, api_key: str | None = None) -> Iterator[tuple[str, Any]]:
    """Serve ``create_app(cfg, lm)`` until the block ends; yields (base_url '.../v1', app)."""
    import uvicorn

    from facellm_cli.serve.app import create_app

    app = create_app(cfg, lm, api_key=api_key)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1", app
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


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
