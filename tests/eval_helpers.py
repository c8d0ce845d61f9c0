"""Test helpers for evaluate: a FaceXBench copy with placeholder images, and a scriptable OpenAI-style server."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real FaceXBench question files committed with the tests: the first 30 questions of 12 files (360 in all),
# covering every category and the zero, single and multiple image settings. See its README.
SUBSET_BENCHMARK = Path(__file__).parent / "data" / "facexbench" / "benchmark"


def find_facexbench(env: str | None = None) -> Path | None:
    """The folder holding all 48 FaceXBench question files, or None.

    FACEXBENCH_DIR (a FaceXBench checkout or its benchmark/ folder) when set, else
    ``../shared/facexbench`` next to the repository. Never an absolute path of one machine.
    """
    given = env if env is not None else os.environ.get("FACEXBENCH_DIR")
    base = Path(given) if given else REPO_ROOT.parent / "shared" / "facexbench"
    for folder in (base / "benchmark", base):
        if len(list(folder.glob("*.json"))) == 48:
            return folder
    return None


SHARED_BENCHMARK = find_facexbench()
FULL_BENCHMARK_MISSING = (
    "the 48 FaceXBench question files are not at ../shared/facexbench beside the repository "
    "(set FACEXBENCH_DIR to a FaceXBench checkout to run the full-benchmark tests)"
)


def png_bytes(color: tuple[int, int, int] = (90, 120, 150), size: int = 16) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def make_facexbench(dst: Path, files: Iterable[str] | None = None, source: Path = SUBSET_BENCHMARK) -> Path:
    """Copy question files from ``source`` into ``dst/benchmark`` and write a placeholder PNG at every image path."""
    bench = dst / "benchmark"
    bench.mkdir(parents=True, exist_ok=True)
    data = png_bytes()
    names = sorted(files) if files else sorted(p.name for p in source.glob("*.json"))
    for name in names:
        src = source / name
        shutil.copy(src, bench / name)
        meta = json.loads(src.read_text(encoding="utf-8"))
        for q in meta["questions"].values():
            for rel in q["image_paths"]:
                p = bench / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
    return dst


class FakeOpenAI:
    """A real HTTP server on 127.0.0.1 speaking the chat-completions wire format.

    ``script`` is consumed per request: an int is an HTTP status to fail with,
    a string is the answer text; when it runs out, ``default`` is answered.
    It records the requests and the most requests seen in flight at once.
    """

    def __init__(self, script: list[int | str] | None = None, default: str = "The answer is (B).", delay: float = 0.02):
        self.script = list(script or [])
        self.default = default
        self.delay = delay
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with outer._lock:
                    outer.requests.append(body)
                    outer.headers.append({k.lower(): v for k, v in self.headers.items()})
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                    step = outer.script.pop(0) if outer.script else outer.default
                time.sleep(outer.delay)
                with outer._lock:
                    outer.in_flight -= 1
                if isinstance(step, int):
                    payload = json.dumps({"error": {"message": f"scripted {step}", "type": "server_error"}}).encode()
                    self.send_response(step)
                else:
                    payload = json.dumps(
                        {
                            "id": "chatcmpl-test",
                            "object": "chat.completion",
                            "created": 0,
                            "model": body.get("model", "fake"),
                            "choices": [
                                {"index": 0, "message": {"role": "assistant", "content": step}, "finish_reason": "stop"}
                            ],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                        }
                    ).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
