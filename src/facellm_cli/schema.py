"""Records that pass between stages (annotate -> build-dataset -> finetune / evaluate).

These are the on-disk contracts: JSONL lines are ``Model.model_dump(mode="json")``.
Field names are stable; add fields, never rename them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

LETTERS = "ABCDEFGHIJ"


class Usage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt_tokens: int = 0
    completion_tokens: int = 0


class FaceRef(BaseModel):
    """Where a face chip came from (``faces crop``, ``annotate --faces``): the photo and the face's box in it."""

    model_config = ConfigDict(extra="ignore")

    source_image: str = Field(description="The photo the chip was cut from, as given to faces crop.")
    face_index: int = Field(description="Index of the face in the photo (0 = leftmost).")
    box: list[int] = Field(description="Face box in the photo's pixels: x1, y1, x2, y2.")
    score: float | None = Field(None, description="Detector score.")


class Annotation(BaseModel):
    """One line of an annotate JSONL: one (image, aspect) question-answer pair, or a failure."""

    model_config = ConfigDict(extra="ignore")

    image: str = Field(description="Image path as given to annotate (relative to the image root when one is set).")
    image_sha256: str = Field(description="SHA-256 of the image file bytes.")
    aspect: str = Field(description="Aspect key, e.g. 'expression'.")
    question: str = Field(description="The question stored for training (not the prompt that was sent).")
    answer: str = Field("", description="The model's answer; empty when status is 'failed'.")
    status: Literal["ok", "failed"] = "ok"
    error: str | None = Field(None, description="Why the item failed, when it did.")
    model: str = Field("", description="Model name that wrote the answer.")
    provider: str = Field("openai", description="'openai' (any compatible endpoint) or 'template'.")
    prompt_version: str = Field("", description="Version of the prompt set used.")
    labels: dict[str, str] = Field(
        default_factory=dict, description="Known attributes of the image (age, gender, race...)."
    )
    usage: Usage = Field(default_factory=Usage)
    face: FaceRef | None = Field(None, description="For a face chip: its source photo and box.")
    attempts: int = 1
    created: str = Field("", description="UTC ISO-8601 time the record was written.")


class MCQuestion(BaseModel):
    """One multiple-choice question, from FaceXBench, build-dataset's export or a user's JSONL."""

    model_config = ConfigDict(extra="ignore")

    id: str
    images: list[str] = Field(default_factory=list, description="Image paths, resolved against the set's root.")
    question: str
    options: list[str] = Field(min_length=2, max_length=len(LETTERS))
    answer: str = Field(description="Correct option letter, 'A'...")
    task: str = Field("default", description="Sub-task name (FaceXBench file stem for FaceXBench).")
    category: str = Field("default", description="Category key, e.g. 'attributes_expression'.")
    context: str | None = None
    prepend_text: str | None = None
    postpend_text: str | None = None
    labels: dict[str, str] = Field(default_factory=dict, description="Demographic labels for fairness reports.")
    subtask: str | None = Field(
        None, description="Benchmark sub-task, e.g. FaceXBench's 'sub-category' ('age', 'hr_fr')."
    )
    image_setting: Literal["zero", "single", "multiple"] | None = Field(
        None,
        description="Image setting as the benchmark labels it (tools questions carry a black image but are 'zero').",
    )

    @property
    def setting(self) -> str:
        """The image setting, derived from the image count when the source does not say."""
        if self.image_setting:
            return self.image_setting
        return "zero" if not self.images else ("single" if len(self.images) == 1 else "multiple")


DEFAULT_MCQ_POSTPEND = "Please answer the question and provide only the correct option letter, e.g., A, B, C, D."


def format_mcq_prompt(q: MCQuestion, *, with_task_description: bool = False) -> str:
    """The user text for a multiple-choice question, exactly as FaceXBench builds it.

    FaceXBench's ``evaluate.py`` writes context, optional task description
    (prepend_text), question, postpend text and one ``(A) option`` line per
    option, each followed by a newline (so the text ends with one). Training
    data exported by build-dataset and evaluation both use this, so a model is
    asked at test time exactly as it was taught and as the benchmark asks.
    """
    parts: list[str] = []
    if q.context:
        parts.append(q.context.strip())
    if with_task_description and q.prepend_text:
        parts.append(q.prepend_text.strip())
    parts.append(q.question.strip())
    parts.append((q.postpend_text if q.postpend_text is not None else DEFAULT_MCQ_POSTPEND).strip())
    parts.extend(f"({LETTERS[i]}) {opt}" for i, opt in enumerate(q.options))
    return "".join(f"{p}\n" for p in parts if p)
