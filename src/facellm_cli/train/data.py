"""Reading training conversations: build-dataset's messages JSONL and ShareGPT JSON.

Both formats become :class:`Sample` (an id, role/content turns whose content
is a string with ``<image>`` placeholders, and resolved image paths). Every
record is checked when the file is read, before any model loads, so a bad
record stops the run at once with its id and line instead of hours later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import DataError

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Sample:
    """One training conversation. ``images`` are in placeholder order."""

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
        f"record '{sample_id}' ({where}): {placeholders} <image> placeholder(s) in its messages but "
        f"{images} image(s) listed; every image needs exactly one <image> in the text "
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


def _check(sample: Sample, root: Path, check_images: bool) -> Sample:
    where = sample.source
    if not sample.messages:
        raise DataError(f"record '{sample.id}' ({where}): no messages")
    for i, m in enumerate(sample.messages):
        if m.get("role") not in ROLES:
            raise DataError(
                f"record '{sample.id}' ({where}): message {i} has role {m.get('role')!r}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(m.get("content"), str):
            raise DataError(
                f"record '{sample.id}' ({where}): message {i} content must be a string with <image> placeholders"
            )
        if m["role"] == "system" and i != 0:
            raise DataError(f"record '{sample.id}' ({where}): a system message may only come first")
    if not any(m["role"] == "assistant" for m in sample.messages):
        raise DataError(f"record '{sample.id}' ({where}): no assistant message, so nothing to learn from")
    if sample.placeholder_count != len(sample.images):
        raise DataError(placeholder_mismatch_message(sample.id, where, sample.placeholder_count, len(sample.images)))
    resolved = []
    for img in sample.images:
        p = Path(img)
        p = p if p.is_absolute() else root / p
        if check_images and not p.is_file():
            raise DataError(f"image not found: {p} (record '{sample.id}', {where}); check data.image_root")
        resolved.append(p)
    sample.images = resolved
    return sample


def _read_messages(path: Path, root: Path, check_images: bool) -> list[Sample]:
    from ..io import read_jsonl

    out = []
    for lineno, rec in read_jsonl(path):
        where = f"{path.name} line {lineno}"
        if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list):
            raise DataError(f"{where}: expected an object with a 'messages' list (build-dataset's messages JSONL)")
        sid = str(rec.get("id", f"line-{lineno}"))
        images = rec.get("images") or []
        if not isinstance(images, list):
            raise DataError(f"record '{sid}' ({where}): 'images' must be a list of paths")
        msgs = [dict(m) for m in rec["messages"] if isinstance(m, dict)]
        if len(msgs) != len(rec["messages"]):
            raise DataError(f"record '{sid}' ({where}): every message must be an object with role and content")
        out.append(_check(Sample(sid, msgs, [Path(str(i)) for i in images], where), root, check_images))
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
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
            raise DataError(f"{where}: expected an object with a 'conversations' list")
        sid = str(rec.get("id", f"record-{n}"))
        msgs = []
        if rec.get("system"):
            msgs.append({"role": "system", "content": str(rec["system"])})
        for turn in rec["conversations"]:
            role = _SHAREGPT_ROLES.get(str(turn.get("from", ""))) if isinstance(turn, dict) else None
            if role is None:
                raise DataError(
                    f"record '{sid}' ({where}): turn {turn!r:.80} needs 'from' in human/gpt/system and 'value'"
                )
            msgs.append({"role": role, "content": turn.get("value")})
        images = rec.get("images") or []
        out.append(_check(Sample(sid, msgs, [Path(str(i)) for i in images], where), root, check_images))
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
    """Turn string contents into the processor's parts, an image part at each ``<image>`` position."""
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
