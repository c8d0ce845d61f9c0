"""Checks a record must pass before it becomes training data.

Each check returns a reason key (counted in ``stats.json`` under
``filtered``) or ``None``. Without ``--skip-invalid`` any reason is an error
that names the record; with it, the record is dropped and counted.

Images are fully decoded once per unique image (not once per record): a
header-only check would pass truncated files that then crash a training run
hours later, and one decode per image (10,954 for FairFaceGPT) is cheap next to
reading the records.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import DataError, ImageError
from ..images import open_image
from ..refusals import is_refusal
from ..schema import IMAGE_PLACEHOLDER

# reason key -> what it means (used in report.md and error messages)
REASONS: dict[str, str] = {
    "annotate_failed": "annotate recorded a failure for this item (status=failed); skipped, not an error",
    "torn_line": "incomplete last line of a JSONL file (an interrupted write)",
    "invalid_json": "line is not valid JSON",
    "invalid_record": "line is not an annotate record",
    "missing_answer": "question_i.txt without answer_i.txt",
    "empty_question": "question is empty",
    "empty_answer": "answer is empty",
    "refusal": "answer is a refusal",
    "image_token_in_text": f"question or answer contains the {IMAGE_PLACEHOLDER} placeholder",
    "image_outside_root": "image path points outside the image root",
    "missing_image": "image file not found",
    "corrupt_image": "image cannot be decoded",
    "image_too_large": "image over the size limits",
    "image_changed": "image bytes differ from the image_sha256 recorded at annotation",
    "duplicate": "same (image, question) as an earlier record",
    "benchmark_overlap": "image matches a benchmark image (--exclude-overlap-with); dropped",
}

# Reasons that are not errors even without --skip-invalid: annotate's own failures and torn tails.
NOT_ERRORS = frozenset({"annotate_failed", "torn_line", "benchmark_overlap"})


def check_text(question: str, answer: str, refusal_patterns: list[str] | None) -> str | None:
    """Reason key when a QA pair cannot be trained on, else None."""
    if not question.strip():
        return "empty_question"
    if not answer.strip():
        return "empty_answer"
    if is_refusal(answer, refusal_patterns):
        return "refusal"
    if IMAGE_PLACEHOLDER in question or IMAGE_PLACEHOLDER in answer:
        # A literal placeholder would add a placeholder with no image behind it.
        return "image_token_in_text"
    return None


def check_image(path: Path, *, expected_sha256: str | None, max_pixels: int, max_bytes: int) -> tuple[str, str] | None:
    """(reason, detail) when the image cannot be used, else None. Reads and decodes the file once."""
    if not path.is_file():
        return "missing_image", "image not found" if not path.exists() else "not a file"
    size = path.stat().st_size
    if size > max_bytes:
        return "image_too_large", f"file is {size / 1e6:.1f} MB > limit {max_bytes / 1e6:g} MB (raise max_image_mb)"
    data = path.read_bytes()
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256.lower():
        return "image_changed", "image bytes differ from image_sha256 recorded at annotation (re-annotate it)"
    if not data:
        return "corrupt_image", "empty image file"
    try:
        open_image(data, max_pixels=max_pixels, name=str(path))
    except ImageError as e:
        kind = "image_too_large" if e.reason.startswith("image too large") else "corrupt_image"
        return kind, e.reason
    return None


def check_conversation(turns: list[dict[str, str]], images: list[str], *, where: str) -> None:
    """Raise DataError unless turns alternate human/gpt starting with human and placeholder count == len(images).

    Conversations are built here from validated pairs, so this guards the
    writer itself: LLaMA-Factory drops or misaligns samples that break it.
    """
    if not turns or len(turns) % 2:
        raise DataError(f"{where}: conversation has {len(turns)} turns; it needs question-answer pairs")
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            got = turn.get("from")
            raise DataError(f"{where}: turn {i + 1} is from '{got}', expected '{expected}' (turns must alternate)")
        if not str(turn.get("value", "")).strip():
            raise DataError(f"{where}: turn {i + 1} is empty")
    placeholders = sum(str(t["value"]).count(IMAGE_PLACEHOLDER) for t in turns)
    if placeholders != len(images):
        raise DataError(f"{where}: {placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images")
