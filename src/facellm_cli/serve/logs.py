"""Request log lines on stderr: ``key=value`` text for people, one JSON object per line for machines.

The app logs each request once through the ``facellm.serve`` logger with its fields
in ``extra={"fields": ...}``; nothing here ever sees headers, so the API key cannot
reach a log.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


class TextFormatter(logging.Formatter):
    """``2026-11-22T20:40:01Z request id=chatcmpl-.. status=200 images=1 prompt_tokens=41 ... latency_ms=12.5``."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        parts = [stamp, record.getMessage()]
        for key, value in _fields(record).items():
            if value is None:
                continue
            quote = isinstance(value, str) and (" " in value or not value)
            text = json.dumps(value, ensure_ascii=False) if quote else value
            parts.append(f"{key}={text}")
        line = " ".join(str(p) for p in parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``{"ts", "level", "event", ...fields}``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(log_json: bool = False, stream: IO[str] | None = None) -> logging.Handler:
    """Send ``facellm.serve`` records to ``stream`` (stderr) in the chosen format; returns the handler."""
    logger = logging.getLogger("facellm.serve")
    for h in list(logger.handlers):
        if getattr(h, "_facellm_serve", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_json else TextFormatter())
    handler._facellm_serve = True  # type: ignore[attr-defined]  # marks our handler so a second call replaces it
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler
