"""Versioned prompt sets: what is sent to the VLM and what question is stored.

The default set, ``fairfacegpt-v1``, follows the scheme of the paper's released
generator (FaceLLM, arXiv 2507.10300, ``fairfacegpt.py``): a system prompt for
objective forensic/biometric face description, eight aspects, and an
attribute-aware sentence that puts the known labels into every prompt
("a woman of East Asian ethnicity, 20-29 years old"), with children called
boy/girl. The question *stored* with an answer is short and label-free
("Describe the face pose of the image based on the visual information."), so a
model trained on it learns to answer without being told the labels. The prompt
*sent* is longer and carries the labels.

Deviation from the paper's script, on purpose: it applied boy/girl only to the
3-9 bin and called 0-2 year olds man/woman; here every bin in ``child_ages``
(0-2 and 3-9) gets boy/girl.

Users supply their own set as YAML with the same fields (validated, unknown keys
and unknown ``{placeholders}`` are errors).
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from ..config import DEFAULT_PROMPT_SET, StrictModel, load_yaml, validate_config
from ..errors import ConfigError

# Placeholders each template may use; anything else is a typo caught at load time.
_ASPECT_PROMPT_FIELDS = {"labels", "name"}
_QUESTION_FIELDS = {"name"}
_GROUPED_FIELDS = {"labels", "aspect_list", "keys"}
_LABEL_SENTENCE_FIELDS = {"person"}
_EXTRA_FIELDS = {"attributes"}


class AspectTemplate(StrictModel):
    """One aspect: the instruction sent (with labels) and the question stored (without)."""

    key: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="Stable aspect key stored in every record.")
    name: str = Field(min_length=1, description="Human name used inside the templates, e.g. 'face pose'.")
    prompt: str = Field(min_length=1, description="User text sent with the image; may use {labels} and {name}.")
    question: str = Field(min_length=1, description="Question stored with the answer; may use {name}.")


class PromptSet(StrictModel):
    """A complete, versioned prompting scheme. Its ``version`` is stored in every record."""

    version: str = Field(min_length=1, description="Stored as prompt_version in each record.")
    system: str = Field(min_length=1, description="System prompt sent with every request.")
    label_sentence: str = Field(
        "We know that this is a face image of {person}.",
        description="Sentence giving the known demographics; {person} is built from gender, race and age.",
    )
    extra_labels_sentence: str = Field(
        "Other known attributes of the face: {attributes}.",
        description="Sentence listing non-demographic labels ({attributes} = 'expression: smiling; eyes: open').",
    )
    gender_words: dict[str, str] = Field(
        default_factory=lambda: {"male": "man", "female": "woman"},
        description="Label value (lower case) -> noun for adults.",
    )
    child_gender_words: dict[str, str] = Field(
        default_factory=lambda: {"male": "boy", "female": "girl"},
        description="Label value (lower case) -> noun for children.",
    )
    child_ages: list[str] = Field(
        default_factory=lambda: ["0-2", "3-9"], description="Age labels that count as children."
    )
    grouped_prompt: str = Field(
        "{labels} Describe the following aspects of this face image, each one separately and only from the visual "
        "information: {aspect_list}. Return only a JSON object with exactly these keys: {keys}. Each value is a plain "
        "text description (one or more paragraphs) of that aspect alone.",
        description="User text for grouped mode; may use {labels}, {aspect_list} and {keys}.",
    )
    aspects: list[AspectTemplate] = Field(min_length=1, description="The aspects, in order.")
    label_values: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Allowed values per label column, e.g. {gender: [Male, Female]}; a label file with another "
        "value is an error before any request (case and '_' vs ' ' ignored). Empty: any value.",
    )

    @model_validator(mode="after")
    def _check_templates(self) -> PromptSet:
        problems = []
        keys = [a.key for a in self.aspects]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            problems.append(f"aspects: duplicate key(s) {', '.join(dupes)}")

        def check(where: str, text: str, allowed: set[str]) -> None:
            try:
                names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
            except ValueError as e:
                problems.append(f"{where}: not a valid template ({e}); write literal braces as {{{{ }}}}")
                return
            bad = sorted(n for n in names if n not in allowed)
            if bad:
                problems.append(
                    f"{where}: unknown placeholder {{{bad[0]}}} (allowed: {', '.join(sorted(allowed)) or 'none'})"
                )

        check("label_sentence", self.label_sentence, _LABEL_SENTENCE_FIELDS)
        check("extra_labels_sentence", self.extra_labels_sentence, _EXTRA_FIELDS)
        check("grouped_prompt", self.grouped_prompt, _GROUPED_FIELDS)
        for i, a in enumerate(self.aspects):
            check(f"aspects.{i}.prompt", a.prompt, _ASPECT_PROMPT_FIELDS)
            check(f"aspects.{i}.question", a.question, _QUESTION_FIELDS)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def select(self, keys: list[str] | None) -> list[AspectTemplate]:
        """The aspects to run, in the set's order; unknown keys are a ConfigError naming them."""
        if not keys:
            return list(self.aspects)
        known = {a.key for a in self.aspects}
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise ConfigError(
                f"aspects: unknown aspect '{unknown[0]}' for prompt set {self.version} "
                f"(known: {', '.join(a.key for a in self.aspects)})"
            )
        return [a for a in self.aspects if a.key in set(keys)]


_SYSTEM = (
    "You are an AI assistant specialised in analysing face images. You describe faces accurately and in detail, "
    "in a way suitable for forensic and biometric applications. Always analyse the face image you are given. "
    "Give objective, detailed descriptions grounded in what is visible, and make no assumptions beyond visible traits. "
    "When analysing an image consider: demographic estimation (estimated age range, gender and ethnicity); facial "
    "structure and features (eye shape and colour, nose shape, lip thickness, jawline, cheekbones and other defining "
    "attributes); skin texture and condition (smoothness, wrinkles, scars, freckles, moles, tattoos or other marks); "
    "expression and emotion (neutral, smiling, frowning, surprised, ...); lighting and image quality (brightness, "
    "sharpness, blur and distortions); face pose (frontal, profile, tilted) and occlusions (hair, glasses, mask, ...); "
    "forensic considerations (low light, partial occlusion, makeup, ageing effects). "
    "You may be told the person's ethnicity, one of 7 groups (White, Black, Indian, East Asian, Southeast Asian, "
    "Middle Eastern and Latino), and their gender and age. When asked about one feature or attribute, describe only "
    "that. Never answer that you are unable to analyse the image; describe what is visible instead. "
    "Answer in plain text (one or more paragraphs)."
)

_ASPECT_PROMPT = (
    "{labels} Describe only the {name} of the image and discuss your description of the {name} based on the visual "
    "information (do not mention that it is based on a description)."
)
_ASPECT_QUESTION = "Describe the {name} of the image based on the visual information."

# FairFace's vocabularies, spelled as in fairface_label_{train,val}.csv.
FAIRFACE_LABEL_VALUES: dict[str, list[str]] = {
    "age": ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70"],
    "gender": ["Male", "Female"],
    "race": ["White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern"],
}

FAIRFACEGPT_V1 = PromptSet(
    version=DEFAULT_PROMPT_SET,
    system=_SYSTEM,
    label_values=FAIRFACE_LABEL_VALUES,
    aspects=[
        AspectTemplate(
            key="demographics", name="demographic attributes", prompt=_ASPECT_PROMPT, question=_ASPECT_QUESTION
        ),
        AspectTemplate(
            key="facial_structure", name="facial structure", prompt=_ASPECT_PROMPT, question=_ASPECT_QUESTION
        ),
        AspectTemplate(key="skin_texture", name="skin texture", prompt=_ASPECT_PROMPT, question=_ASPECT_QUESTION),
        AspectTemplate(
            key="expression_emotion", name="expression and emotion", prompt=_ASPECT_PROMPT, question=_ASPECT_QUESTION
        ),
        AspectTemplate(
            key="lighting_quality", name="lighting and image quality", prompt=_ASPECT_PROMPT, question=_ASPECT_QUESTION
        ),
        AspectTemplate(key="face_pose", name="face pose", prompt=_ASPECT_PROMPT, question=_ASPECT_QUESTION),
        AspectTemplate(
            key="forensic", name="forensic considerations", prompt=_ASPECT_PROMPT, question=_ASPECT_QUESTION
        ),
        AspectTemplate(
            key="detail",
            name="detailed description",
            prompt="{labels} Describe this image.",
            question="Describe this image.",
        ),
    ],
)

BUILTIN_PROMPT_SETS: dict[str, PromptSet] = {FAIRFACEGPT_V1.version: FAIRFACEGPT_V1}


def load_prompt_set(name_or_path: str) -> PromptSet:
    """A built-in set by name, or a YAML file validated as a PromptSet."""
    if name_or_path in BUILTIN_PROMPT_SETS:
        return BUILTIN_PROMPT_SETS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(
            f"prompts: '{name_or_path}' is neither a built-in prompt set ({', '.join(BUILTIN_PROMPT_SETS)}) "
            "nor a YAML file (check the path)"
        )
    return validate_config(PromptSet, load_yaml(path), source=str(path))


# ---- label sentence -------------------------------------------------------------------------

DEMOGRAPHIC_KEYS = {"age", "gender", "race", "ethnicity"}
RACE_NAMES = {"Latino_Hispanic": "Latino/Hispanic"}


def race_text(value: str) -> str:
    """FairFace race value as prose: 'Latino_Hispanic' -> 'Latino/Hispanic', 'East_Asian' -> 'East Asian'."""
    return RACE_NAMES.get(value, value.replace("_", " "))


def gender_noun(labels: dict[str, str], ps: PromptSet = FAIRFACEGPT_V1) -> str | None:
    """'man'/'woman', or 'boy'/'girl' when the age label is a child bin (the paper's rule)."""
    gender = labels.get("gender")
    if not gender:
        return None
    words = ps.child_gender_words if labels.get("age") in set(ps.child_ages) else ps.gender_words
    return words.get(gender.strip().lower(), gender.strip().lower())


def person_phrase(labels: dict[str, str], ps: PromptSet = FAIRFACEGPT_V1) -> str | None:
    """'a woman of East Asian ethnicity, 20-29 years old' from whatever of gender/race/age is known."""
    noun = gender_noun(labels, ps)
    race = labels.get("race") or labels.get("ethnicity")
    age = labels.get("age")
    if not (noun or race or age):
        return None
    noun = noun or "person"
    text = f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"
    if race:
        text += f" of {race_text(race)} ethnicity"
    if age:
        text += f", {age} years old"
    return text


def label_text(labels: dict[str, str], ps: PromptSet) -> str:
    """The attribute-aware sentence(s) put in front of every prompt ('' when nothing is known)."""
    parts = []
    person = person_phrase(labels, ps)
    if person:
        parts.append(ps.label_sentence.format(person=person))
    extra = [(k, v) for k, v in labels.items() if k not in DEMOGRAPHIC_KEYS and v]
    if extra:
        attributes = "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in extra)
        parts.append(ps.extra_labels_sentence.format(attributes=attributes))
    return " ".join(parts)


def render_aspect(ps: PromptSet, aspect: AspectTemplate, labels: dict[str, str]) -> tuple[str, str]:
    """(prompt sent, question stored) for one image and aspect."""
    prompt = aspect.prompt.format(labels=label_text(labels, ps), name=aspect.name).strip()
    return " ".join(prompt.split()), aspect.question.format(name=aspect.name)


def render_grouped(ps: PromptSet, aspects: list[AspectTemplate], labels: dict[str, str]) -> str:
    """The one prompt of grouped mode: every aspect, answered as one JSON object."""
    aspect_list = "; ".join(f"{a.key} ({a.name})" for a in aspects)
    keys = ", ".join(a.key for a in aspects)
    text = ps.grouped_prompt.format(labels=label_text(labels, ps), aspect_list=aspect_list, keys=keys)
    return " ".join(text.split())


def grouped_json_schema(aspects: list[AspectTemplate]) -> dict[str, object]:
    """``response_format`` for structured outputs: one required string per aspect key."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "face_aspects",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {a.key: {"type": "string", "description": a.name} for a in aspects},
                "required": [a.key for a in aspects],
                "additionalProperties": False,
            },
        },
    }


def parse_grouped(text: str | None, keys: list[str]) -> dict[str, str | None]:
    """JSON object (bare, or fenced/embedded in text) -> {key: answer or None}. Raises ValueError when malformed."""
    from pydantic import ConfigDict, ValidationError, create_model

    if text is None:
        raise ValueError("no content")
    s = text.strip()
    start, end = s.find("{"), s.rfind("}")
    if start == -1 or end <= start:
        raise ValueError("no JSON object in the answer")
    data = json.loads(s[start : end + 1])
    if not isinstance(data, dict):
        raise ValueError("answer is not a JSON object")
    fields: dict[str, Any] = {k: (str | None, None) for k in keys}
    model = create_model("GroupedAnswers", __config__=ConfigDict(extra="ignore"), **fields)
    try:
        parsed = model.model_validate(data)
    except ValidationError as e:
        raise ValueError(f"answer does not match the schema ({e.error_count()} problems)") from None
    return {k: getattr(parsed, k) for k in keys}
