"""The answer parser on tricky model outputs, and the accuracy tally."""

from __future__ import annotations

import pytest

from facellm_cli.eval.scoring import Tally, accuracy, parse_answer

EXPR = ["smiling", "neutral", "frowning", "surprised"]
IMAGES = ["Image 3", "Image 2", "Image 2, Image 3", "Image 1, Image 2, Image 3"]
YES_NO = ["Yes", "No"]
AGES = ["30-39", "20-29", "40-49", "10-19"]
COUNTS = ["22 to 26", "27 to 31", "32 to 36", "17 to 21"]
NUMS = ["3", "30", "13", "None of the above"]

# (model output, options, expected letter or None, rule that decided it)
CASES = [
    ("C", EXPR, "C", "letter"),
    ("c", EXPR, "C", "letter"),
    ("(B)", EXPR, "B", "letter"),
    ("(b)", EXPR, "B", "letter"),
    ("D.", EXPR, "D", "letter"),
    ("  A  ", EXPR, "A", "letter"),
    ("**B**", EXPR, "B", "letter"),
    ("a", EXPR, "A", "letter"),
    ("E", EXPR, None, "none"),
    ("The answer is (C).", EXPR, "C", "explicit"),
    ("A woman with dark hair; the answer is (C)", EXPR, "C", "explicit"),
    ("A man smiling. Answer: B", EXPR, "B", "explicit"),
    ("Answer: d", EXPR, "D", "explicit"),
    ("answer - C", EXPR, "C", "explicit"),
    ("Option C", EXPR, "C", "explicit"),
    ("I would pick option (b) here.", EXPR, "B", "explicit"),
    ("The correct answer is B, since the mouth corners are raised.", EXPR, "B", "explicit"),
    ("The correct choice would be D", EXPR, "D", "explicit"),
    ("Final answer: **A**", EXPR, "A", "explicit"),
    ("The answer is a.", EXPR, "A", "explicit"),
    ("The answer is A, not C.", EXPR, "A", "explicit"),
    ("The answer is A. Wait, the answer is C.", EXPR, None, "ambiguous"),
    ("C. frowning", EXPR, "C", "start"),
    ("(B) neutral", EXPR, "B", "start"),
    ("B) neutral", EXPR, "B", "start"),
    ("d: surprised", EXPR, "D", "start"),
    ("A - smiling, clearly", EXPR, "A", "start"),
    ("I think it is (C) because the brows are lowered.", EXPR, "C", "mention"),
    ("Probably B given the eyes.", EXPR, "B", "mention"),
    ("A person who looks happy, so B", EXPR, "B", "mention"),
    ("A woman with dark hair.", EXPR, None, "none"),
    ("It could be A or B.", EXPR, None, "ambiguous"),
    ("Either (A) or (C) fits.", EXPR, None, "ambiguous"),
    ("Between A and D, I lean to neither.", EXPR, None, "ambiguous"),
    ("(A) smiling (B) neutral (C) frowning (D) surprised", EXPR, None, "ambiguous"),
    ("I'm sorry, but I can't help with identifying facial expressions.", EXPR, None, "refusal"),
    ("I cannot determine the expression from this image.", EXPR, None, "refusal"),
    ("As an AI, I don't analyse people's faces. It is neutral.", EXPR, None, "refusal"),
    ("neutral", EXPR, "B", "option_text"),
    ("Frowning.", EXPR, "C", "option_text"),
    ("The person appears to be surprised.", EXPR, "D", "option_text"),
    ("smiling or neutral", EXPR, None, "none"),
    ("Image 2, Image 3", IMAGES, "C", "option_text"),
    ("The female individuals are in Image 2, Image 3.", IMAGES, "C", "option_text"),
    ("No", YES_NO, "B", "option_text"),
    ("yes, it is a spoof", YES_NO, "A", "option_text"),
    ("B", YES_NO, "B", "letter"),
    ("C", YES_NO, None, "none"),
    ("20-29", AGES, "B", "option_text"),
    ("The person is 20-29 years old.", AGES, "B", "option_text"),
    ("27 to 31", COUNTS, "B", "option_text"),
    ("30", NUMS, "B", "option_text"),
    ("about 13 faces", NUMS, "C", "option_text"),
    ("", EXPR, None, "empty"),
    (None, EXPR, None, "empty"),
    ("The expression is hard to read.", EXPR, None, "none"),
    ("answer is a woman", EXPR, None, "none"),
    ("a woman, answer: (c)", EXPR, "C", "explicit"),
    ("The answer is D) surprised", EXPR, "D", "explicit"),
]


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize(("text", "options", "letter", "how"), CASES, ids=[repr(c[0])[:40] for c in CASES])
def test_parse_answer(text: str | None, options: list[str], letter: str | None, how: str) -> None:
    got = parse_answer(text, options)
    assert (got.letter, got.how) == (letter, how)


def test_accuracy_counts_unparseable_as_wrong() -> None:
    t = accuracy([("A", "A"), (None, "B"), ("C", "D"), ("D", "D")])
    assert (t.n, t.correct, t.unparseable) == (4, 2, 1)
    assert t.accuracy == 50.0
    assert Tally().accuracy == 0.0
