"""``/health`` while ``facellm serve`` receives a 200,000-part body: the part cap on vs off, same run.

One client posts a chat completion whose user message has 200,000 one-letter text parts
(5.4 MB of JSON); another calls ``/health`` in a loop until that request is answered.
With the default cap (``max_content_parts`` 1024) the body is refused after JSON decoding,
before validation builds 200,000 objects; with the cap raised past the body it is parsed,
validated and tokenised (off the event loop in both cases) before its 400 for the model's
context. Prints the big request's time and the slowest ``/health`` answer for both, and the
ratios.

    python bench/serve_big_body.py
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def _post(url: str, data: bytes | None = None) -> int:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code


def measure(lm: Any, max_parts: int, body: bytes) -> tuple[int, float, float, int]:
    """(status of the big request, its seconds, slowest /health seconds, /health calls) for one server."""
    from facellm_cli.config import ServeConfig
    from facellm_cli.serve.app import background_server

    cfg = ServeConfig.model_validate(
        {"model": {"model": "bench"}, "generation": {"max_new_tokens": 2}, "max_content_parts": max_parts}
    )
    with background_server(cfg, lm) as (url, _app):
        health = url.removesuffix("/v1") + "/health"
        _post(health)
        out: dict[str, Any] = {}

        def big() -> None:
            t0 = time.perf_counter()
            out["status"] = _post(url + "/chat/completions", body)
            out["s"] = time.perf_counter() - t0

        t = threading.Thread(target=big)
        t.start()
        waits = []
        while t.is_alive():
            t0 = time.perf_counter()
            _post(health)
            waits.append(time.perf_counter() - t0)
        t.join()
    return out["status"], out["s"], max(waits), len(waits)


def main() -> None:
    from facellm_cli.config import ModelConfig
    from facellm_cli.models.loader import load_model_and_processor
    from facellm_cli.testing import build_tiny_model

    parts = [{"type": "text", "text": "a"}] * 200_000
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": parts}]}, separators=(",", ":"))
    with tempfile.TemporaryDirectory() as tmp:
        lm = load_model_and_processor(ModelConfig(model=str(build_tiny_model(Path(tmp) / "tiny", "internvl"))))
        rows = {
            "cap 1024 (default)": measure(lm, 1024, body.encode()),
            "cap off (1,000,000)": measure(lm, 1_000_000, body.encode()),
        }
    print(f"body: {len(parts):,} text parts, {len(body) / 1e6:.1f} MB")
    for name, (status, secs, worst, calls) in rows.items():
        print(f"{name:>20}: HTTP {status} in {secs:.2f} s; /health slowest {worst * 1000:.0f} ms over {calls} calls")
    (_, on_s, on_w, _), (_, off_s, off_w, _) = rows.values()
    print(f"ratio (cap off / cap on): big request {off_s / on_s:.1f}x, slowest /health {off_w / on_w:.1f}x")


if __name__ == "__main__":
    main()
