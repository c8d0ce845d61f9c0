"""Small on-disk corpora for build-dataset tests: real PNGs and annotate JSONL lines."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .files import read_jsonl, write_jsonl, write_png

__all__ = ["ASPECTS", "EXPRESSIONS", "GENDERS", "annotation", "make_corpus", "read_jsonl", "write_jsonl", "write_png"]

EXPRESSIONS = ["happy", "sad", "angry", "neutral", "surprised"]
GENDERS = ["Male", "Female"]
ASPECTS = {
    "expression": "What is the facial expression of this person?",
    "age": "How old does this person look?",
    "pose": "Describe the head pose.",
}


def annotation(image: str, aspect: str, answer: str, *, root: Path | None = None, **extra: Any) -> dict[str, Any]:
    sha = hashlib.sha256((root / image).read_bytes()).hexdigest() if root and (root / image).is_file() else "0" * 64
    rec = {
        "image": image,
        "image_sha256": sha,
        "aspect": aspect,
        "question": ASPECTS.get(aspect, f"Question about {aspect}?"),
        "answer": answer,
        "status": "ok",
        "model": "template",
        "provider": "template",
        "prompt_version": "v1",
        "labels": {},
    }
    rec.update(extra)
    return rec


def make_corpus(
    root: Path, n_images: int = 20, aspects: tuple[str, ...] = ("expression", "age", "pose"), with_labels: bool = True
) -> tuple[Path, list[dict[str, Any]]]:
    """Images under root/'faces', one annotate JSONL; returns (jsonl path, records)."""
    images = root / "faces"
    records = []
    for i in range(n_images):
        rel = f"img_{i:03d}.png"
        write_png(images / rel, i)
        labels = {"expression": EXPRESSIONS[i % 5], "gender": GENDERS[i % 2], "person": f"p{i // 2}"}
        for a in aspects:
            records.append(
                annotation(
                    rel,
                    a,
                    f"The {a} of person {i} is {EXPRESSIONS[i % 5]}.",
                    root=images,
                    labels=labels if with_labels else {},
                )
            )
    jsonl = root / "annotations.jsonl"
    write_jsonl(jsonl, records)
    return jsonl, records
