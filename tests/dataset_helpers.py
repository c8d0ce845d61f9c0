"""Small on-disk corpora for build-dataset tests: real PNGs and annotate JSONL lines."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

EXPRESSIONS = ["happy", "sad", "angry", "neutral", "surprised"]
GENDERS = ["Male", "Female"]
ASPECTS = {
    "expression": "What is the facial expression of this person?",
    "age": "How old does this person look?",
    "pose": "Describe the head pose.",
}


def write_png(path: Path, seed: int, size: int = 8) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (size, size), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    img.save(path, format="PNG")
    return path


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


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
