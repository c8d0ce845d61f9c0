"""Label files: the FairFace CSV and generic CSV/JSONL tables, and joining them to images.

FairFace ships ``file,age,gender,race,service_test`` with paths such as
``val/1.jpg`` relative to the dataset folder. A generic table has an image
column (``file``, ``image``, ``image_path``, ``path`` or ``filename``, or the
one named in the config) and any attribute columns. Values are kept as written
(``Latino_Hispanic``, ``more than 70``); prompts turn them into prose.

Problems with single rows (no image value, image not found) are collected and
reported, never fatal: one bad row must not stop a 100k-image job.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DataError
from ..faces import face_ref
from ..images import find_images, is_image_path
from ..schema import FaceRef

if TYPE_CHECKING:
    import _csv

IMAGE_COLUMNS = ("file", "image", "image_path", "path", "filename", "img")


@dataclass
class LabelRow:
    """One row: the image reference as written, its attributes, and where it came from."""

    image: str
    labels: dict[str, str]
    line: int
    face: FaceRef | None = None  # a faces-crop manifest row: where the chip came from (not a face attribute)


@dataclass
class LabelTable:
    source: Path
    image_column: str
    columns: list[str]
    rows: list[LabelRow]
    problems: list[str] = field(default_factory=list)


def _clean(value: object) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    text = str(value).strip()
    return text or None


def read_labels(
    path: str | os.PathLike[str], image_column: str | None = None, ignore: list[str] | None = None
) -> LabelTable:
    """Read a CSV or JSONL label file. Unreadable files and a missing image column are errors."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"labels file not found: {p} (check --labels)")
    ignore_set = set(ignore or [])
    records = _read_jsonl_rows(p) if p.suffix.lower() in (".jsonl", ".ndjson") else _read_csv_rows(p)
    columns: list[str] = []
    for _, rec in records:
        for k in rec:
            if k not in columns:
                columns.append(k)
    if image_column is None:
        image_column = next((c for c in IMAGE_COLUMNS if c in columns), None)
        if image_column is None:
            raise DataError(
                f"{p} has no image column (looked for {', '.join(IMAGE_COLUMNS)}; columns are: "
                f"{', '.join(columns) or 'none'}); name it with --set labels_image_column=COLUMN"
            )
    elif image_column not in columns:
        raise DataError(
            f"{p} has no column '{image_column}' (columns are: {', '.join(columns)}); fix labels_image_column"
        )
    table = LabelTable(source=p, image_column=image_column, columns=columns, rows=[])
    for line, rec in records:
        image = _clean(rec.get(image_column))
        if not image:
            table.problems.append(f"label row without an image: {p} line {line} (empty '{image_column}')")
            continue
        labels = {}
        for k, v in rec.items():
            if k == image_column or k in ignore_set:
                continue
            value = _clean(v)
            if value is not None:
                labels[str(k).strip()] = value
        face = face_ref(labels)  # removes a faces manifest's provenance columns from the labels
        table.rows.append(LabelRow(image=image, labels=labels, line=line, face=face))
    return table


def _read_csv_rows(p: Path) -> list[tuple[int, dict[str, object]]]:
    """Rows as (first line, {column: cell}). Ragged rows and broken quoting are errors naming their lines.

    A label value never spans lines, so a cell holding a line break is a stray quote
    that swallowed the rows after it, reported here rather than as an image named
    after two glued rows.
    """
    problems: list[str] = []
    rows: list[tuple[int, dict[str, object]]] = []
    try:
        with open(p, encoding="utf-8-sig", newline="") as f:
            _collect_csv(csv.reader(f, strict=True), p, rows, problems)
    except UnicodeDecodeError as e:
        raise DataError(f"{p} is not UTF-8 text ({e}); save it as UTF-8 CSV") from None
    if problems:
        raise DataError(_listed(problems))
    return rows


def _collect_csv(reader: _csv.Reader, p: Path, rows: list[tuple[int, dict[str, object]]], problems: list[str]) -> None:
    header: list[str] = []
    prev_end = 0  # last physical line of the previous record; the next one starts after it
    try:
        while not header:
            header = next(reader)
            prev_end = reader.line_num
        for row in reader:
            line, prev_end = prev_end + 1, reader.line_num
            if not row:  # blank line
                continue
            problem = _csv_row_problem(p, header, row, line, prev_end)
            if problem is not None:
                problems.append(problem)
            else:
                rows.append((line, dict(zip(header, row, strict=True))))
    except StopIteration:
        raise DataError(f"{p} is empty (a CSV needs a header row such as file,age,gender,race)") from None
    except csv.Error as e:
        problems.append(f"{p} line {prev_end + 1}: not a valid CSV ({e}); check the quoting from that line on")


def _csv_row_problem(p: Path, header: list[str], row: list[str], line: int, end: int) -> str | None:
    if end > line and any("\n" in c or "\r" in c for c in row):
        return (
            f"{p} line {line}: a quoted cell runs on to line {end}, merging rows "
            '(a stray " in the file?); fix the quoting (not a valid CSV)'
        )
    if len(row) != len(header):
        what = "few" if len(row) < len(header) else "many"
        return (
            f"{p} line {line}: {len(row)} cells but the header has {len(header)} "
            f"({', '.join(header)}); too {what} cells in that row"
        )
    return None


MAX_LISTED = 100


def _listed(problems: list[str]) -> str:
    """Problems one per line (the CLI prints each as an error line), the tail counted after ``MAX_LISTED``."""
    shown = problems[:MAX_LISTED]
    if len(problems) > MAX_LISTED:
        shown.append(f"... and {len(problems) - MAX_LISTED} more problems of the same kinds")
    return "\n".join(shown)


def check_label_values(table: LabelTable, allowed: dict[str, list[str]]) -> None:
    """Every value of a column with a vocabulary must be in it; all offenders are listed, with file and line.

    Matching ignores case and treats ``_`` as a space ('east_asian' is 'East Asian');
    anything else outside the vocabulary is an error before any request is sent.
    """
    if not allowed:
        return
    vocab = {col.lower(): {_norm(v) for v in values} for col, values in allowed.items()}
    shown = {col.lower(): ", ".join(values) for col, values in allowed.items()}
    problems = []
    for row in table.rows:
        for key, value in row.labels.items():
            known = vocab.get(key.lower())
            if known is not None and _norm(value) not in known:
                problems.append(
                    f"{table.source} line {row.line}: {key} '{value}' is not a known value "
                    f"(one of: {shown[key.lower()]})"
                )
    if problems:
        raise DataError(
            _listed(problems) + f"\n{len(problems)} label value(s) would go into the prompts as written: fix them, "
            "or give --prompts a prompt set YAML whose label_values allow them"
        )


def _norm(value: str) -> str:
    return " ".join(value.replace("_", " ").split()).casefold()


def _read_jsonl_rows(p: Path) -> list[tuple[int, dict[str, object]]]:
    rows = []
    with open(p, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise DataError(f"{p} line {line_no}: not valid JSON ({e}); fix or delete that line") from None
            if not isinstance(rec, dict):
                raise DataError(f"{p} line {line_no}: expected a JSON object, got {type(rec).__name__}")
            rows.append((line_no, rec))
    return rows


class Problems(list[str]):
    """What a run reports, in order. ``skip`` records an input left out, which fails the run (exit 1) at its end."""

    def __init__(self, items: list[str] | None = None, skipped: int = 0) -> None:
        super().__init__(items or [])
        self.skipped = skipped

    def skip(self, message: str) -> None:
        self.append(message)
        self.skipped += 1


@dataclass
class ImageItem:
    """One image to annotate: its path on disk, the name stored in records, and its labels."""

    path: Path
    name: str
    labels: dict[str, str]
    face: FaceRef | None = None


@dataclass
class Inputs:
    items: list[ImageItem]
    problems: Problems


def _stored_name(path: Path, image_root: Path | None) -> str:
    if image_root is not None:
        try:
            return path.resolve().relative_to(image_root.resolve()).as_posix()
        except ValueError:
            pass
    return path.as_posix()


def collect_inputs(
    images: list[str],
    labels: str | None,
    *,
    image_column: str | None = None,
    ignore: list[str] | None = None,
    image_root: str | None = None,
    label_values: dict[str, list[str]] | None = None,
) -> Inputs:
    """Images joined with their labels.

    A label row is matched to an image by path (the row's path resolved against
    the image root, the labels file's folder and every folder given), then by
    file name when that name is unique. Without image arguments the label rows
    themselves are the images (resolved against the image root, else the labels
    file's folder). ``label_values`` (column -> allowed values) is checked on every row
    first: a value outside it is an error listing each one, before anything is sent.
    """
    root = Path(image_root) if image_root else None
    problems = Problems()
    table = read_labels(labels, image_column, ignore) if labels else None
    if table is not None:
        check_label_values(table, label_values or {})
        problems.extend(table.problems)
    if not images:
        assert table is not None  # the config requires images or labels
        return Inputs(items=_items_from_table(table, root, problems), problems=problems)
    paths = _image_paths(images, problems)
    items = [ImageItem(path=p, name=_stored_name(p, root), labels={}) for p in paths]
    if table is not None:
        _join_labels(items, table, root, images, problems)
    return Inputs(items=items, problems=problems)


def _items_from_table(table: LabelTable, root: Path | None, problems: Problems) -> list[ImageItem]:
    """Without image arguments the label rows are the images (resolved against the root, else the file's folder)."""
    base = root or table.source.parent
    items: list[ImageItem] = []
    seen: set[Path] = set()
    for row in table.rows:
        path = base / row.image
        if path in seen:
            problems.append(f"duplicate label row for {row.image}: {table.source} line {row.line} (first one kept)")
        elif not path.is_file():
            seen.add(path)
            problems.skip(f"image not found: {path} (listed in {table.source.name} line {row.line})")
        else:
            seen.add(path)
            items.append(ImageItem(path=path, name=_stored_name(path, root), labels=row.labels, face=row.face))
    return items


def _image_paths(images: list[str], problems: Problems) -> list[Path]:
    """Image files found in the arguments; what cannot be an image is skipped (and counted)."""
    paths: list[Path] = []
    for p in find_images(images):
        if str(p) == "-":
            problems.skip("'-' (stdin) is not supported by annotate: give image files or folders")
        elif not p.exists():
            problems.skip(f"image not found: {p}")
        elif p.is_file() and not is_image_path(p):
            problems.skip(f"not an image file name: {p} (expected .jpg, .png, .webp, ...)")
        elif p.is_file():
            paths.append(p)
    return paths


class _ImageIndex:
    """The images by resolved path and by file name, to find the one a label row names in O(1)."""

    def __init__(self, items: list[ImageItem]) -> None:
        self.paths = [it.path.resolve() for it in items]
        self.by_resolved = {p: i for i, p in enumerate(self.paths)}
        self.by_name: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            self.by_name.setdefault(it.path.name, []).append(i)

    def find(self, image: str, bases: list[Path]) -> int | None:
        """By path under one of ``bases``, else by a unique matching path tail."""
        for base in bases:
            idx = self.by_resolved.get((base / image).resolve())
            if idx is not None:
                return idx
        # Fall back to the path's tail: "train/1.jpg" is fairface/train/1.jpg, never fairface/val/1.jpg.
        tail = Path(image).parts
        same = [i for i in self.by_name.get(Path(image).name, []) if self.paths[i].parts[-len(tail) :] == tail]
        return same[0] if len(same) == 1 else None


def _join_labels(
    items: list[ImageItem], table: LabelTable, root: Path | None, images: list[str], problems: Problems
) -> None:
    """Give each image its label row; rows for images not asked for are not problems."""
    asked_dirs = [Path(a) for a in images if Path(a).is_dir()]
    bases = [b for b in [root, table.source.parent, *asked_dirs] if b is not None]
    resolved_dirs = [d.resolve() for d in asked_dirs]
    index = _ImageIndex(items)
    matched: set[int] = set()
    for row in table.rows:
        idx = index.find(row.image, bases)
        if idx is None:
            # Missing from a folder being annotated: a problem. Elsewhere: an image not asked for
            # (a few images, or one folder, annotated with the full labels file), not a problem.
            if _lands_in(row.image, [b for b in (root, table.source.parent) if b is not None], resolved_dirs):
                problems.append(f"label row without an image: {row.image} ({table.source.name} line {row.line})")
        elif idx in matched:
            problems.append(
                f"duplicate label row for {row.image}: {table.source.name} line {row.line} (first one kept)"
            )
        else:
            matched.add(idx)
            items[idx].labels = row.labels
            items[idx].face = row.face


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _lands_in(image: str, bases: list[Path], folders: list[Path]) -> bool:
    """Whether a label row's path, read from a base or from above an asked folder, lies in that folder.

    ``train/5.jpg`` lands in an asked ``fairface/train`` (read from ``fairface``);
    ``val/5.jpg`` does not. A bare name is read from the folder itself.
    """
    bare = len(Path(image).parts) == 1
    for d in folders:
        starts = [*bases, *d.parents, *([d] if bare else [])]
        if any(_inside((b / image).resolve(), d) for b in starts):
            return True
    return False
