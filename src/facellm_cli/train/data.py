"""Reading training conversations: build-dataset's messages JSONL and ShareGPT JSON.

Both formats are :class:`~facellm_cli.schema.TrainingRecord` on disk (the one
definition build-dataset writes) and become :class:`Sample` here (its turns and
resolved image paths). Every record is checked when the file is read, before
any model loads, so a bad record stops the run at once with its id and line
instead of hours later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from ..errors import DataError
from ..schema import IMAGE_PLACEHOLDER, TrainingRecord


@dataclass
class Sample:
    """One training conversation, as read: a :class:`TrainingRecord` with its images resolved to paths."""

    id: str
    messages: list[dict[str, str]]
    images: list[Path] = field(default_factory=list)
    source: str = ""  # "file line N" / "file record N", for error messages

    @property
    def placeholder_count(self) -> int:
        return sum(m["content"].count(IMAGE_PLACEHOLDER) for m in self.messages)


def placeholder_mismatch_message(sample_id: str, where: str, placeholders: int, images: int) -> str:
    """The documented error for an image/placeholder count mismatch (also raised by the collator)."""
    return (
        f"record '{sample_id}' ({where}): {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in its messages but "
        f"{images} image(s) listed; every image needs exactly one {IMAGE_PLACEHOLDER} in the text "
        "(fix the record or rebuild the dataset)"
    )


def detect_format(path: Path) -> Literal["messages", "sharegpt"]:
    """``.jsonl`` is our messages format; ``.json`` (a list) is ShareGPT."""
    if path.suffix == ".jsonl":
        return "messages"
    if path.suffix == ".json":
        return "sharegpt"
    raise DataError(
        f"cannot tell the format of {path} from its suffix; name it .jsonl (messages) or .json (ShareGPT), "
        "or set data.format"
    )


def _record_error(rec: Any, default_id: str, where: str, err: ValueError) -> DataError:
    """A record that does not fit :class:`TrainingRecord`, named by its id and line, one problem shown."""
    sid = str(rec.get("id", default_id)) if isinstance(rec, dict) else default_id
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        detail = f"{loc}: {first['msg']}" if loc else first["msg"]
    else:
        detail = str(err)
    return DataError(f"record '{sid}' ({where}): {detail}")


def _sample(record: TrainingRecord, where: str, root: Path, check_images: bool) -> Sample:
    """Check what the schema cannot (turn order, placeholders, image files) and resolve the images."""
    sid = record.id
    roles = [m.role for m in record.messages]
    if "system" in roles[1:]:
        raise DataError(f"record '{sid}' ({where}): a system message may only come first")
    if "assistant" not in roles:
        raise DataError(f"record '{sid}' ({where}): no assistant message, so nothing to learn from")
    if record.placeholder_count != len(record.images):
        raise DataError(placeholder_mismatch_message(sid, where, record.placeholder_count, len(record.images)))
    resolved = []
    for img in record.images:
        p = Path(img)
        p = p if p.is_absolute() else root / p
        if check_images and not p.is_file():
            raise DataError(f"image not found: {p} (record '{sid}', {where}); check data.image_root")
        resolved.append(p)
    messages = [{"role": m.role, "content": m.content} for m in record.messages]
    return Sample(sid, messages, resolved, where)


def _read_messages(path: Path, root: Path, check_images: bool) -> list[Sample]:
    from ..io import read_jsonl

    out = []
    for lineno, rec in read_jsonl(path):
        where = f"{path.name} line {lineno}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object with a 'messages' list (build-dataset's messages JSONL)")
        try:
            record = TrainingRecord.model_validate({"id": f"line-{lineno}", **rec})
        except ValidationError as e:
            raise _record_error(rec, f"line-{lineno}", where, e) from None
        out.append(_sample(record, where, root, check_images))
    return out


def _read_sharegpt(path: Path, root: Path, check_images: bool) -> list[Sample]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a ShareGPT file is a JSON list of records with 'conversations'")
    out = []
    for n, rec in enumerate(data):
        where = f"{path.name} record {n}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object with a 'conversations' list")
        try:
            record = TrainingRecord.from_sharegpt(rec, f"record-{n}")
        except ValueError as e:
            raise _record_error(rec, f"record-{n}", where, e) from None
        out.append(_sample(record, where, root, check_images))
    return out


def read_samples(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    fmt: Literal["auto", "messages", "sharegpt"] = "auto",
    check_images: bool = True,
    max_samples: int | None = None,
    key: str = "data.train",
) -> list[Sample]:
    """Read and check every record.

    ``path`` may be a build-dataset folder (its ``train.jsonl``, or ``val.jsonl``
    for ``data.eval``). Relative image paths resolve against ``image_root``,
    else the image root recorded in the dataset's manifest, else the file's folder.
    """
    from ..data.manifest import dataset_file, default_image_root

    p = dataset_file(path, "val" if key == "data.eval" else "train")
    if not p.is_file():
        hint = "data.train / --data" if key == "data.train" else key
        raise DataError(f"data file not found: {p} (check {hint})")
    kind = detect_format(p) if fmt == "auto" else fmt
    root = default_image_root(p, image_root) or p.parent
    samples = (_read_messages if kind == "messages" else _read_sharegpt)(p, root, check_images)
    if not samples:
        raise DataError(f"{p} has no records")
    seen: dict[str, str] = {}
    for s in samples:
        if s.id in seen:
            raise DataError(f"record id '{s.id}' appears twice ({seen[s.id]} and {s.source}); ids must be unique")
        seen[s.id] = s.source
    return samples[:max_samples] if max_samples else samples


def to_chat_messages(sample: Sample) -> list[dict[str, Any]]:
    """Turn string contents into the processor's parts, an image part at each placeholder."""
    out = []
    for m in sample.messages:
        parts: list[dict[str, Any]] = []
        pieces = m["content"].split(IMAGE_PLACEHOLDER)
        for i, piece in enumerate(pieces):
            if i > 0:
                parts.append({"type": "image"})
            text = piece
            # "<image>\nQuestion" is the usual layout; the template adds its own separator after the image.
            if i > 0 and text.startswith("\n"):
                text = text[1:]
            if text:
                parts.append({"type": "text", "text": text})
        out.append({"role": m["role"], "content": parts})
    return out
