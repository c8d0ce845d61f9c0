"""Helpers for tests that run servers: the library's server on a free 127.0.0.1 port, chat messages with
images, and waiting on events rather than on wall-clock deadlines.

A wait ends when its condition holds, or fails at once when the process it depends on has ended.
pytest-timeout (pyproject) is the backstop for a process that hangs; its traceback points at the
``wait_for`` line, whose ``what`` says what was awaited.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import Any

from .files import png_data_uri

__all__ = ["image_message", "png_data_uri", "running_server", "wait_for"]


def running_server(cfg: Any, lm: Any, api_key: str | None = None) -> Any:
    """The library's background server (real uvicorn, free 127.0.0.1 port); yields (base_url, app)."""
    from facellm_cli.serve.app import background_server

    return background_server(cfg, lm, api_key=api_key)


def image_message(question: str, *uris: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in uris]
    parts.append({"type": "text", "text": question})
    return [{"role": "user", "content": parts}]


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str, poll: float = 0.02) -> None:
    """Return once ``condition()`` is true; raise (with the process's stderr) if ``proc`` ends first."""
    while not condition():
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}: {err[-2000:]}")
        time.sleep(poll)
