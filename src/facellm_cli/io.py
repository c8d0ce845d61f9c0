"""Small file helpers: atomic writes and append-only JSONL that survives ``kill -9``."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DataError


def atomic_write_text(path: Path, text: str) -> Path:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: Path, data: Any, *, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=indent) + "\n")


class JsonlAppender:
    """Append-only JSONL: each record is written as one ``write`` of a whole line and flushed.

    On open, a torn last line (a run killed mid-write) is cut off so the file
    stays valid; the number of bytes dropped is kept in ``dropped_bytes``.
    """

    def __init__(self, path: Path, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dropped_bytes = repair_jsonl_tail(self.path)
        self._fsync = fsync
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        if self._fsync:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def repair_jsonl_tail(path: Path) -> int:
    """Make a JSONL file end on a line boundary; return the bytes dropped.

    A last line without its newline is either a complete record whose newline
    was never written (a killed writer, or a file edited by hand) or the remains
    of a killed write. A complete JSON object is kept and given its newline;
    anything unparseable is cut off.
    """
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        pos = size
        keep = 0
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            idx = f.read(step).rfind(b"\n")
            if idx != -1:
                keep = pos + idx + 1
                break
        f.seek(keep)
        if _is_json_object(f.read(size - keep)):
            f.seek(size)
            f.write(b"\n")
            return 0
        f.truncate(keep)
        return size - keep


def _is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except ValueError:  # includes UnicodeDecodeError
        return False


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record) for every complete line; a torn last line is skipped."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.endswith("\n"):
                try:
                    yield lineno, json.loads(line)
                except ValueError:
                    return
                return
            line = line.strip()
            if not line:
                continue
            try:
                yield lineno, json.loads(line)
            except ValueError as e:
                raise DataError(f"{path} line {lineno}: not valid JSON ({e}); fix or delete that line") from None
