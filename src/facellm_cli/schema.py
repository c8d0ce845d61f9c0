"""Records that pass between stages (annotate -> build-dataset -> finetune / evaluate).

These are the on-disk contracts: JSONL lines are ``Model.model_dump(mode="json")``.
Field names are stable; add fields, never rename them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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


# ---- training conversations (build-dataset writes them, finetune reads them) ----

IMAGE_PLACEHOLDER = "<image>"
"""Marks where an image goes in a message's text; each image of a record has exactly one."""

ROLES = ("system", "user", "assistant")
# ShareGPT's speaker tags (LLaMA-Factory's ``dataset_info.json`` names them) and the roles they stand for.
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_TO_SHAREGPT = {"user": SHAREGPT_TAGS["user_tag"], "assistant": SHAREGPT_TAGS["assistant_tag"]}


class ChatMessage(BaseModel):
    """One turn: a role and its text, with one :data:`IMAGE_PLACEHOLDER` per image it shows."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class TrainingRecord(BaseModel):
    """One training conversation: a line of build-dataset's ``{split}.jsonl``, a record of its ``{split}.json``.

    The JSONL line is ``model_dump(mode="json")``; the ShareGPT record is :meth:`to_sharegpt`. ``images`` are paths
    relative to the dataset's image root, in placeholder order.
    """

    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)

    id: str
    messages: list[ChatMessage] = Field(min_length=1)
    images: list[str] = Field(default_factory=list)

    @field_validator("images", mode="before")
    @classmethod
    def _no_images(cls, v: object) -> object:
        return [] if v is None else v

    @classmethod
    def from_pairs(cls, rid: str, pairs: list[tuple[str, str]], image: str) -> TrainingRecord:
        """Question-answer pairs about one image; the placeholder opens the first question."""
        messages: list[dict[str, str]] = []
        for i, (q, a) in enumerate(pairs):
            messages.append({"role": "user", "content": (f"{IMAGE_PLACEHOLDER}\n" if i == 0 else "") + q})
            messages.append({"role": "assistant", "content": a})
        # One validation call for the whole record: faster than building each message model (2.5 vs 5.9 us).
        return cls.model_validate({"id": rid, "messages": messages, "images": [image]})

    @classmethod
    def from_sharegpt(cls, rec: dict[str, Any], default_id: str) -> TrainingRecord:
        """A ShareGPT record (``conversations`` of ``from``/``value`` turns, optional ``system``); ValueError if not."""
        turns = rec.get("conversations")
        if not isinstance(turns, list):
            raise ValueError("expected an object with a 'conversations' list")
        messages = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
        for turn in turns:
            role = SHAREGPT_ROLES.get(str(turn.get("from", ""))) if isinstance(turn, dict) else None
            if role is None:
                raise ValueError(f"turn {turn!r:.80} needs 'from' in human/gpt/system and 'value'")
            messages.append({"role": role, "content": turn.get("value")})
        return cls.model_validate({"id": rec.get("id", default_id), "messages": messages, "images": rec.get("images")})

    def to_sharegpt(self) -> dict[str, Any]:
        """The LLaMA-Factory ShareGPT form of this record (no id: LLaMA-Factory has no such column)."""
        system = [m.content for m in self.messages if m.role == "system"]
        turns = [{"from": _TO_SHAREGPT[m.role], "value": m.content} for m in self.messages if m.role != "system"]
        return {"conversations": turns, "images": list(self.images), **({"system": system[0]} if system else {})}

    @property
    def placeholder_count(self) -> int:
        return sum(m.content.count(IMAGE_PLACEHOLDER) for m in self.messages)
