"""Test data for finetune tests: synthetic faces written as build-dataset's messages JSONL / ShareGPT JSON."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from facellm_cli.schema import LETTERS, MCQuestion, format_mcq_prompt
from facellm_cli.synth import EXPRESSIONS, default_workers, synth_faces

from .files import write_jsonl

__all__ = [
    "QUESTION",
    "describe_records",
    "face_rows",
    "letter_accuracy",
    "mcq_records",
    "write_jsonl",
    "write_sharegpt",
]

QUESTION = "What is the facial expression of the person?"


def face_rows(folder: Path, n: int, seed: int = 0) -> list[dict[str, str]]:
    synth_faces(folder, n, seed=seed, workers=default_workers(n))
    with open(folder / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def describe_records(rows: list[dict[str, str]], multi_turn: bool = False) -> list[dict[str, Any]]:
    """Free-text answers (the annotate/build-dataset shape); multi_turn adds a second Q/A with a second image."""
    out = []
    for i, r in enumerate(rows):
        msgs = [
            {"role": "user", "content": "<image>\nWhat is the expression?"},
            {"role": "assistant", "content": f"The person is {r['expression']}."},
        ]
        images = [r["file"]]
        if multi_turn:
            other = rows[(i + 1) % len(rows)]
            msgs += [
                {"role": "user", "content": "And here, are the eyes open? <image>"},
                {"role": "assistant", "content": f"The eyes are {other['eyes']}."},
            ]
            images.append(other["file"])
        out.append({"id": f"rec-{i}", "messages": msgs, "images": images})
    return out


def mcq_records(rows: list[dict[str, str]], prefix: str = "q") -> list[dict[str, Any]]:
    """Expression as a multiple-choice question in the shared MCQ prompt format; the answer is the letter."""
    out = []
    for i, r in enumerate(rows):
        letter = LETTERS[EXPRESSIONS.index(r["expression"])]
        q = MCQuestion(
            id=f"{prefix}-{i}", images=[r["file"]], question=QUESTION, options=list(EXPRESSIONS), answer=letter
        )
        out.append(
            {
                "id": q.id,
                "messages": [
                    {"role": "user", "content": "<image>\n" + format_mcq_prompt(q)},
                    {"role": "assistant", "content": letter},
                ],
                "images": [r["file"]],
            }
        )
    return out


def write_sharegpt(path: Path, records: list[dict[str, Any]]) -> Path:
    role = {"user": "human", "assistant": "gpt", "system": "system"}
    data = [
        {
            "conversations": [{"from": role[m["role"]], "value": m["content"]} for m in r["messages"]],
            "images": r["images"],
        }
        for r in records
    ]
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def letter_accuracy(
    model_dir: Path, records: list[dict[str, Any]], image_root: Path, adapter: str | None = None
) -> float:
    """Held-out accuracy: the option letter with the highest next-token logit after the prompt."""
    import torch

    from facellm_cli.config import ModelConfig
    from facellm_cli.images import open_image
    from facellm_cli.infer.generate import Prompt, encode, render_prompt
    from facellm_cli.models.loader import load_model_and_processor

    lm = load_model_and_processor(ModelConfig(model=str(model_dir), adapter=adapter, device="cpu"))
    letters = [lm.tokenizer.convert_tokens_to_ids(L) for L in LETTERS[: len(EXPRESSIONS)]]
    correct = 0
    for start in range(0, len(records), 32):
        chunk = records[start : start + 32]
        prompts = [
            Prompt([open_image(image_root / r["images"][0])], r["messages"][0]["content"].split("\n", 1)[1])
            for r in chunk
        ]
        batch = encode(lm, [render_prompt(lm, p) for p in prompts], [im for p in prompts for im in p.images])
        with torch.inference_mode():
            logits = lm.model(**batch).logits[:, -1, letters]
        for r, pred in zip(chunk, logits.argmax(-1).tolist(), strict=True):
            correct += LETTERS[pred] == r["messages"][1]["content"]
    return correct / len(records)
