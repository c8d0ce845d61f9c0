"""The learning test: a random-init tiny VLM learns to read facial expressions from drawn faces.

Multiple-choice format exactly as build-dataset exports it and evaluate asks it
(``<image>\\n`` + ``format_mcq_prompt``; the answer is the option letter).
Accuracy is measured on held-out faces from the letter logits after the prompt.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from facellm_cli.config import FinetuneConfig, resolve_config
from facellm_cli.testing.paths import REPO_ROOT
from facellm_cli.testing.records import QUESTION, face_rows, letter_accuracy, mcq_records, write_jsonl
from facellm_cli.train.recipes import QUICKSTART_TINY, QUICKSTART_TINY_MODEL, quickstart_tiny_config

N_TRAIN, N_TEST = 3200, 200  # the quickstart's 80% / 5% of 4,000 faces


def test_quickstart_example_matches_the_recipe(tmp_path: Path) -> None:
    example = REPO_ROOT / "examples" / "quickstart-tiny.yaml"
    from_yaml = resolve_config(FinetuneConfig, example)
    from_code = quickstart_tiny_config(
        yaml.safe_load(example.read_text())["model"]["model"], from_yaml.data.train or "", from_yaml.out or ""
    )
    assert from_yaml == from_code
    assert QUICKSTART_TINY["method"] == "full"


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~150 s idle; the limit only catches a hang, a busy machine makes it slower, not wrong
def test_tiny_model_learns_expression_from_synthetic_faces(tmp_path: Path, cli) -> None:
    from facellm_cli.runtime import configure_threads
    from facellm_cli.testing import build_tiny_model
    from facellm_cli.train.finetune import finetune

    # torch threads = the cores this process may use that other jobs leave idle (so they do not spin)
    threads = configure_threads()
    print(f"\ntorch threads {threads.threads} of {threads.usable} usable core(s); {threads.note or 'machine idle'}")
    start = time.monotonic()
    faces = tmp_path / "faces"
    rows = face_rows(faces, N_TRAIN + N_TEST, seed=0)
    train, test = mcq_records(rows[:N_TRAIN]), mcq_records(rows[N_TRAIN:], "held-out")
    train_file = write_jsonl(faces / "train.jsonl", train)
    kwargs = dict(QUICKSTART_TINY_MODEL)
    model = build_tiny_model(tmp_path / "model", kwargs.pop("family"), seed=0, **kwargs)
    before = letter_accuracy(model, test, faces)

    result = finetune(quickstart_tiny_config(model, train_file, tmp_path / "run"))
    after = letter_accuracy(tmp_path / "run", test, faces)
    elapsed = time.monotonic() - start
    print(
        f"\nheld-out accuracy {before:.3f} -> {after:.3f}; {result.global_step} steps, "
        f"{result.samples_per_second:.1f} samples/s, training {result.runtime_seconds:.0f} s, total {elapsed:.0f} s"
    )
    assert before < 0.5  # chance is 1/3
    assert after >= 0.95  # the quickstart recipe; see train/recipes.py for what it reaches

    # and `ask` with the trained model answers a held-out face with its letter
    rec = test[0]
    prompt = rec["messages"][0]["content"].split("\n", 1)[1]
    assert prompt.startswith(QUESTION)
    r = cli("ask", "--model", tmp_path / "run", "--max-new-tokens", "2", faces / rec["images"][0], prompt)
    assert r.code == 0, r.err
    assert r.out.strip() in ("A", "B", "C")
