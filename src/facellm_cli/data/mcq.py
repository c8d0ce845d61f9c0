"""Multiple-choice questions built from image labels (the held-out set ``evaluate`` reads).

One question per (image, label column): the true value plus up to
``max_options - 1`` other values of that column, both the distractors and the
option order chosen by a keyed hash of the seed, so the same inputs give the
same questions byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import ConfigError
from ..schema import LETTERS, MCQuestion
from .splits import stable_hash

QUESTION_TEMPLATES: dict[str, str] = {
    "expression": "What is the facial expression of the person in the image?",
    "emotion": "What is the facial expression of the person in the image?",
    "gender": "What is the gender of the person in the image?",
    "sex": "What is the gender of the person in the image?",
    "age": "What is the age range of the person in the image?",
    "race": "What is the race of the person in the image?",
    "ethnicity": "What is the ethnicity of the person in the image?",
    "eyes": "What is the state of the eyes of the person in the image?",
    "glasses": "What kind of glasses is the person in the image wearing?",
    "pose": "What is the head pose of the person in the image?",
    "hair": "What is the hair of the person in the image like?",
    "beard": "What kind of beard does the person in the image have?",
}


def question_for(label: str) -> str:
    """The question text for a label column; a generic one for columns not in the table."""
    key = label.strip().lower()
    return QUESTION_TEMPLATES.get(key) or f"What is the {key.replace('_', ' ')} of the person in the image?"


def build_mcq(
    *,
    qid: str,
    image: str,
    label: str,
    true_value: str,
    values: list[str],
    seed: int,
    max_options: int = 4,
    labels: dict[str, str] | None = None,
    option_order: str = "shuffled",
) -> MCQuestion:
    """One question: options are distinct, include ``true_value`` once, and ``answer`` is its letter.

    ``option_order="fixed"`` lists the options in the column's sorted value order, so a letter means the same value
    in every question of that column (a plain classification, as in the quickstart); "shuffled" (the default, as in
    FaceXBench) orders them by a keyed hash, so the model must read the options.
    """
    others = sorted((v for v in values if v != true_value), key=lambda v: (stable_hash(seed, image, label, v), v))
    options = [true_value, *others[: max(0, min(max_options, len(LETTERS)) - 1)]]
    if option_order == "fixed":
        options.sort()
    else:
        options.sort(key=lambda v: (stable_hash(seed, image, label, "order", v), v))
    return MCQuestion(
        id=qid,
        images=[image],
        question=question_for(label),
        options=options,
        answer=LETTERS[options.index(true_value)],
        task=f"facellm_{label}",
        category=label,
        labels=dict(labels or {}),
    )


def label_values(columns: list[str], label_sets: Iterable[dict[str, str]]) -> dict[str, list[str]]:
    """Per MCQ column, the sorted distinct values the kept images have: the options questions draw from.

    A column with fewer than two values cannot make a question: ConfigError naming the column and its values.
    """
    sets = list(label_sets)
    out: dict[str, list[str]] = {}
    for col in columns:
        values = sorted({labels[col] for labels in sets if labels.get(col)})
        if len(values) < 2:
            raise ConfigError(
                f"--mcq {col}: the label has {len(values)} distinct value(s) {values}; a question needs at least 2"
            )
        out[col] = values
    return out


def image_questions(
    image: str,
    labels: dict[str, str],
    values: dict[str, list[str]],
    *,
    seed: int,
    max_options: int,
    option_order: str,
) -> tuple[list[MCQuestion], list[str]]:
    """The questions about one image (one per column of ``values`` it has a label for) and the columns it lacks."""
    questions: list[MCQuestion] = []
    missing: list[str] = []
    for col, col_values in values.items():
        value = labels.get(col)
        if not value:
            missing.append(col)
            continue
        questions.append(
            build_mcq(
                qid=f"{image}#mcq-{col}",
                image=image,
                label=col,
                true_value=value,
                values=col_values,
                seed=seed,
                max_options=max_options,
                option_order=option_order,
                labels=labels,
            )
        )
    return questions, missing
