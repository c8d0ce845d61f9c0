"""The ``template`` provider: deterministic question-answer pairs from labels alone (no model, no network).

It gives the pipeline a baseline that runs anywhere (tests, the quickstart on
synthetic faces) and whose answers are known exactly. For each image it writes:

* ``demographics`` (the paper's aspect, with the prompt set's stored question)
  when any of age/gender/race is known:
  "The person appears to be a woman of East Asian ethnicity, 20-29 years old.";
* one aspect per label column, named after the column, from the table below, or
  the generic fallback ``What is the {column} of the person in the image?`` ->
  ``{value}`` for columns the table does not know.

=============  ======================================================  =========================================
column         question                                                answer
=============  ======================================================  =========================================
age            How old is the person in the image?                     The person is {value} years old.
gender         What is the gender of the person in the image?          The person is a {man|woman|boy|girl}.
race           What is the ethnicity of the person in the image?       The person appears to be of {value} ethnicity.
expression     What is the facial expression of the person in the      The person is {value}. (neutral: The person
               image?                                                  has a neutral expression.)
eyes           Are the eyes of the person in the image open or         The person's eyes are {value}.
               closed?
pose           What is the head pose of the person in the image?       The head pose is {value}.
glasses        Is the person in the image wearing glasses?             Yes, the person is wearing glasses. / No, ...
skin_tone      What is the skin tone of the person in the image?       The person has a {value} skin tone.
background     What is the background of the image?                    The background is {value}.
hair_color     What is the hair color of the person in the image?      The person has {value} hair.
=============  ======================================================  =========================================

``ethnicity`` uses the race row, ``emotion`` the expression row, ``sex`` the
gender row, ``hair_colour`` the hair_color row (the aspect keeps the column's name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .prompts import FAIRFACEGPT_V1, PromptSet, gender_noun, person_phrase, race_text

TEMPLATE_VERSION = "template-v1"


@dataclass(frozen=True)
class AttributeTemplate:
    question: str
    answer: str = "{value}"
    values: dict[str, str] = field(default_factory=dict)  # lower-case value -> whole answer


_YES = "Yes, the person is wearing glasses."
_NO = "No, the person is not wearing glasses."

ATTRIBUTE_TEMPLATES: dict[str, AttributeTemplate] = {
    "age": AttributeTemplate("How old is the person in the image?", "The person is {value} years old."),
    "gender": AttributeTemplate("What is the gender of the person in the image?", "The person is {article} {noun}."),
    "race": AttributeTemplate(
        "What is the ethnicity of the person in the image?", "The person appears to be of {value} ethnicity."
    ),
    "expression": AttributeTemplate(
        "What is the facial expression of the person in the image?",
        "The person is {value}.",
        {"neutral": "The person has a neutral expression."},
    ),
    "eyes": AttributeTemplate(
        "Are the eyes of the person in the image open or closed?", "The person's eyes are {value}."
    ),
    "pose": AttributeTemplate("What is the head pose of the person in the image?", "The head pose is {value}."),
    "glasses": AttributeTemplate(
        "Is the person in the image wearing glasses?",
        "{value}",
        {"yes": _YES, "true": _YES, "1": _YES, "no": _NO, "false": _NO, "0": _NO},
    ),
    "skin_tone": AttributeTemplate(
        "What is the skin tone of the person in the image?", "The person has a {value} skin tone."
    ),
    "background": AttributeTemplate("What is the background of the image?", "The background is {value}."),
    "hair_color": AttributeTemplate(
        "What is the hair color of the person in the image?", "The person has {value} hair."
    ),
}
ALIASES = {"ethnicity": "race", "emotion": "expression", "sex": "gender", "hair_colour": "hair_color"}
GENERIC = AttributeTemplate("What is the {column} of the person in the image?", "{value}")


@dataclass(frozen=True)
class TemplateQA:
    aspect: str
    question: str
    answer: str


def aspect_key(column: str) -> str:
    """A column name as an aspect key: 'Skin Tone' -> 'skin_tone'."""
    key = re.sub(r"[^a-z0-9]+", "_", column.strip().lower()).strip("_") or "attribute"
    return key if key[0].isalpha() else f"attr_{key}"


def template_qa(labels: dict[str, str], prompt_set: PromptSet = FAIRFACEGPT_V1) -> list[TemplateQA]:
    """All deterministic QA pairs the labels allow, in a stable order (demographics first, then columns)."""
    out: list[TemplateQA] = []
    person = person_phrase(labels, prompt_set)
    if person:
        demo = next((a for a in prompt_set.aspects if a.key == "demographics"), FAIRFACEGPT_V1.aspects[0])
        out.append(
            TemplateQA("demographics", demo.question.format(name=demo.name), f"The person appears to be {person}.")
        )
    for column, value in labels.items():
        if not value:
            continue
        key = aspect_key(column)
        canonical = ALIASES.get(key, key)
        tpl = ATTRIBUTE_TEMPLATES.get(canonical)
        if tpl is None:
            out.append(TemplateQA(key, GENERIC.question.format(column=column.replace("_", " ").strip()), value))
            continue
        special = tpl.values.get(value.strip().lower())
        if special is not None:
            answer = special
        elif canonical == "gender":
            noun = gender_noun({"gender": value, "age": labels.get("age", "")}, prompt_set) or value
            answer = tpl.answer.format(article="an" if noun[:1].lower() in "aeiou" else "a", noun=noun)
        elif canonical == "race":
            answer = tpl.answer.format(value=race_text(value))
        else:
            answer = tpl.answer.format(value=value)
        out.append(TemplateQA(key, tpl.question, answer))
    return out
