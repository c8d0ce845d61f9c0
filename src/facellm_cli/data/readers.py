"""Readers for build-dataset's inputs: annotate JSONL, the paper's folder layout, and a labels CSV.

Every source can be scanned once (yielding small integer locations) and then
read again at one location. build-dataset keeps only those locations between
its two passes, so memory stays flat however large the corpus is.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pydantic import ValidationError

from ..errors import DataError
from ..faces import PROVENANCE_COLUMNS
from ..images import IMAGE_SUFFIXES
from ..schema import Annotation

# Suffixes tried, in this order, to find the image of a paper-layout folder {id}/.
PAPER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_QUESTION_FILE = re.compile(r"^question_(\d+)\.txt$")


@dataclass
class RawRecord:
    """One question-answer pair as read, before validation."""

    image: str
    question: str
    answer: str
    aspect: str
    status: str = "ok"
    labels: dict[str, str] = field(default_factory=dict)
    image_sha256: str | None = None
    image_hint: str | None = None  # why an image could not be located (paper layout)


@dataclass
class Problem:
    """A line or file that could not be read as a record."""

    reason: str
    message: str


class JsonlSource:
    """An annotate JSONL file; a location is the byte offset of a line."""

    kind = "jsonl"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fh: BinaryIO | None = None

    def scan(self) -> Iterator[tuple[int, str, RawRecord | Problem]]:
        """Yield (byte offset, 'file line N', record or problem) for every non-blank line."""
        offset = 0
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                start = offset
                offset += len(raw)
                if not raw.strip():
                    continue
                where = f"{self.path} line {lineno}"
                torn = not raw.endswith(b"\n")
                item = self._parse(raw, where)
                if torn and isinstance(item, Problem) and item.reason == "invalid_json":
                    # A killed annotate run can leave half a line at the end; annotate repairs it on resume.
                    item = Problem("torn_line", f"{where}: incomplete last line (an interrupted write); ignored")
                yield start, where, item

    def _parse(self, raw: bytes, where: str) -> RawRecord | Problem:
        try:
            data = json.loads(raw)
        except ValueError as e:
            return Problem("invalid_json", f"{where}: not valid JSON ({e})")
        if not isinstance(data, dict):
            return Problem("invalid_record", f"{where}: expected a JSON object, got {type(data).__name__}")
        try:
            ann = Annotation.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "(root)"
            return Problem("invalid_record", f"{where}: not an annotate record ({loc}: {first['msg']})")
        return RawRecord(
            image=ann.image,
            question=ann.question,
            answer=ann.answer,
            aspect=ann.aspect,
            status=ann.status,
            labels={str(k): str(v) for k, v in ann.labels.items()},
            image_sha256=ann.image_sha256 or None,
        )

    def read_at(self, loc: int) -> RawRecord:
        """Re-read a line the scan validated; a fast path without the schema check, which already passed."""
        if self._fh is None:
            self._fh = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        self._fh.seek(loc)
        raw = self._fh.readline()
        try:
            d = json.loads(raw)
            return RawRecord(
                image=d["image"],
                question=d["question"],
                answer=d.get("answer", ""),
                aspect=d["aspect"],
                status=d.get("status", "ok"),
                labels=d.get("labels") or {},
                image_sha256=d.get("image_sha256"),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DataError(
                f"{self.path} at byte {loc}: no longer the record read before; "
                "the file changed while build-dataset was reading it, run again"
            ) from None

    def describe(self, loc: int) -> str:
        """'file line N' for a byte offset (counts newlines; only used for error messages)."""
        with open(self.path, "rb") as f:
            line = f.read(loc).count(b"\n") + 1
        return f"{self.path} line {line}"

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class PaperSource:
    """A folder in the FairFaceGPT release layout: ``{id}/question_i.txt`` + ``{id}/answer_i.txt``.

    Any folder below the input that holds ``question_*.txt`` files is one image;
    its path relative to the input (``train/123``) is the image id, and the image
    is ``{id}.jpg`` (or another image suffix) under the image root. Turn ``i``
    becomes aspect ``q{i}``. A location packs (folder index, turn).
    """

    kind = "paper"

    def __init__(self, root: Path, image_root: Path) -> None:
        self.root = Path(root)
        self.image_root = Path(image_root)
        self._dirs: list[str] = []  # per-image state: the folder of each id

    def _find_image(self, item_id: str) -> tuple[str, str | None]:
        stem = self.image_root / item_id
        if Path(item_id).suffix.lower() in IMAGE_SUFFIXES and stem.is_file():
            return item_id, None
        for suffix in PAPER_IMAGE_SUFFIXES:
            if stem.with_name(stem.name + suffix).is_file():
                return item_id + suffix, None
        tried = "/".join(s.lstrip(".") for s in PAPER_IMAGE_SUFFIXES)
        return item_id + PAPER_IMAGE_SUFFIXES[0], f"no {item_id}.{{{tried}}} under the image root"

    def _item_dirs(self) -> Iterator[tuple[Path, list[int]]]:
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            turns = sorted(int(m.group(1)) for name in filenames if (m := _QUESTION_FILE.match(name)))
            if turns:
                yield Path(dirpath), turns

    def scan(self) -> Iterator[tuple[int, str, RawRecord | Problem]]:
        for dirpath, turns in self._item_dirs():
            rel = dirpath.relative_to(self.root).as_posix()
            item_id = rel if rel != "." else self.root.name
            dir_index = len(self._dirs)
            self._dirs.append(str(dirpath))
            image, hint = self._find_image(item_id)
            for turn in turns:
                loc = (dir_index << 16) | turn
                where = str(dirpath / f"answer_{turn}.txt")
                yield loc, where, self._read(dirpath, turn, image, hint)

    def _read(self, dirpath: Path, turn: int, image: str, hint: str | None) -> RawRecord | Problem:
        qpath, apath = dirpath / f"question_{turn}.txt", dirpath / f"answer_{turn}.txt"
        if not apath.is_file():
            return Problem("missing_answer", f"{apath}: missing (every question_i.txt needs its answer_i.txt)")
        try:
            question = qpath.read_text(encoding="utf-8")
            answer = apath.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            return Problem("invalid_record", f"{dirpath}: turn {turn} is not UTF-8 text ({e})")
        return RawRecord(image=image, question=question, answer=answer, aspect=f"q{turn}", image_hint=hint)

    def read_at(self, loc: int) -> RawRecord:
        dirpath = Path(self._dirs[loc >> 16])
        rel = dirpath.relative_to(self.root).as_posix()
        image, hint = self._find_image(rel if rel != "." else self.root.name)
        item = self._read(dirpath, loc & 0xFFFF, image, hint)
        if isinstance(item, Problem):
            raise DataError(f"{item.message}; the folder changed while build-dataset was reading it, run again")
        return item

    def describe(self, loc: int) -> str:
        return str(Path(self._dirs[loc >> 16]) / f"answer_{loc & 0xFFFF}.txt")

    def close(self) -> None:
        pass


Source = JsonlSource | PaperSource


def open_sources(inputs: list[str], image_root: Path) -> list[Source]:
    """One source per input: a folder is the paper layout, a file is annotate JSONL."""
    sources: list[Source] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            sources.append(PaperSource(p, image_root))
        elif p.is_file():
            sources.append(JsonlSource(p))
        else:
            raise DataError(f"input not found: {item} (give annotate JSONL files or paper-layout folders)")
    return sources


def read_labels_csv(path: Path, image_column: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Map normalised image path -> {column: value} for every row; also return the label columns.

    Keys are the image column as written (posix separators) and the same path
    without its suffix, so paper-layout ids match ``train/1.jpg`` rows.
    """
    if not path.is_file():
        raise DataError(f"labels CSV not found: {path} (check --labels)")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    table: dict[str, dict[str, str]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        if image_column not in columns:
            raise DataError(
                f"labels CSV {path} has no '{image_column}' column (columns: {', '.join(columns) or 'none'}); "
                "name the image column with --set labels_image_column=COLUMN"
            )
        label_cols = [c for c in columns if c != image_column and c not in PROVENANCE_COLUMNS]
        for lineno, row in enumerate(reader, 2):
            key = (row.get(image_column) or "").strip().replace("\\", "/")
            if not key:
                raise DataError(f"labels CSV {path} line {lineno}: empty '{image_column}' value")
            key = os.path.normpath(key).replace("\\", "/")
            values = {c: sys.intern((row.get(c) or "").strip()) for c in label_cols}
            values = {c: v for c, v in values.items() if v}
            table[key] = values
            stem = os.path.splitext(key)[0]
            table.setdefault(stem, values)
    return table, label_cols
