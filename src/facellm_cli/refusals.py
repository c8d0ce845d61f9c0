"""The one refusal detector, shared by annotate (re-ask), build-dataset (filter) and evaluate (unparseable).

A VLM asked about a face sometimes declines ("I'm sorry, I can't help with
identifying people"). Such a text must never become a training answer, and
annotate and build-dataset must agree on what counts as a refusal, so both call
:func:`is_refusal` from here.

Matching is a case-insensitive phrase search, with curly apostrophes folded to
straight ones. Phrases are chosen to be specific to declining: "unable to" alone
is not a refusal ("the person seems unable to smile" is a fine description),
"I'm unable to" is.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

DEFAULT_REFUSAL_PATTERNS: tuple[str, ...] = (
    "I'm sorry",
    "I am sorry",
    "I apologize",
    "I can't help",
    "I cannot help",
    "I can't assist",
    "I cannot assist",
    "I can't provide",
    "I cannot provide",
    "I can't analyze",
    "I cannot analyze",
    "I can't identify",
    "I cannot identify",
    "I can't determine",
    "I cannot determine",
    "I can't comply",
    "I cannot comply",
    "I won't be able to",
    "I'm not able to",
    "I am not able to",
    "I'm unable to",
    "I am unable to",
    "unable to analyze",
    "unable to assist",
    "unable to help with",
    "not able to help with",
    "as an AI",
    "as a language model",
    "I can't fulfill",
    "I cannot fulfill",
    "sorry, I can",
    "unable to analyse",
)

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def _normalise(text: str) -> str:
    return " ".join(text.translate(_APOSTROPHES).split()).casefold()


@lru_cache(maxsize=32)
def _prepare(patterns: tuple[str, ...]) -> tuple[str, ...]:
    # Plain substring tests: several times faster than one regex alternation on long answers.
    return tuple(dict.fromkeys(n for n in (_normalise(p) for p in patterns) if n))


def is_refusal(text: str, patterns: Iterable[str] | None = None) -> bool:
    """True when ``text`` contains one of ``patterns`` (default :data:`DEFAULT_REFUSAL_PATTERNS`).

    Case, curly apostrophes and runs of whitespace are ignored, so "I’m  SORRY"
    matches "I'm sorry".
    """
    pats = _prepare(DEFAULT_REFUSAL_PATTERNS if patterns is None else tuple(patterns))
    if not pats:
        return False  # an explicitly empty list disables detection
    norm = _normalise(text)
    return any(p in norm for p in pats)


def classify_answer(text: str | None, phrases: list[str], min_chars: int = 2) -> str | None:
    """None for a usable answer, else 'empty' or 'refusal' (annotate re-asks both)."""
    if text is None or len(text.strip()) < min_chars:
        return "empty"
    if is_refusal(text, phrases):
        return "refusal"
    return None
