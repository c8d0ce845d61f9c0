"""The shared refusal detector (annotate re-asks on it, build-dataset filters on it)."""

from __future__ import annotations

import pytest

from facellm_cli.refusals import DEFAULT_REFUSAL_PATTERNS, is_refusal


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that.",
        "I\u2019m sorry, I cannot identify people.",  # curly apostrophe
        "i CAN'T HELP with identifying real people",
        "I cannot assist with this request.",
        "Unfortunately I am unable to analyze this image.",
        "I'm unable to  determine the age of people from photos.",  # extra whitespace
        "As an AI, I do not make judgements about race.",
        "Sorry. I'm not able to provide that.",
    ],
)
def test_refusals_are_detected(text: str) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "The person is smiling broadly, with raised cheeks.",
        "A young woman, about 20-29 years old, looking slightly to the left.",
        "The man seems unable to keep his eyes open in the bright light.",  # 'unable to' alone is not a refusal
        "",
    ],
)
def test_descriptions_are_not_refusals(text: str) -> None:
    assert not is_refusal(text)


def test_custom_patterns_replace_the_defaults() -> None:
    assert is_refusal("No comment.", ["no comment"])
    assert not is_refusal("I'm sorry, I can't help.", ["no comment"])
    assert not is_refusal("I'm sorry", [])  # an explicit empty list turns detection off
    assert "I'm sorry" in DEFAULT_REFUSAL_PATTERNS and "as an AI" in DEFAULT_REFUSAL_PATTERNS
