"""Split assignment, MCQ construction and conversation checks, without files."""

from __future__ import annotations

from collections import Counter

import pytest

from facellm_cli.data.mcq import build_mcq, question_for
from facellm_cli.data.splits import assign_splits, stable_hash
from facellm_cli.data.validate import check_conversation, check_text
from facellm_cli.errors import DataError
from facellm_cli.schema import LETTERS


def test_ratios_are_met_and_assignment_is_stable() -> None:
    units = {f"img{i}": "" for i in range(1000)}
    a = assign_splits(units, [0.8, 0.1, 0.1], seed=0)
    assert Counter(a.values()) == {"train": 800, "val": 100, "test": 100}
    reordered = dict(reversed(list(units.items())))
    assert assign_splits(reordered, [0.8, 0.1, 0.1], seed=0) == a  # insertion order does not matter
    b = assign_splits(units, [0.8, 0.1, 0.1], seed=1)
    assert a != b and Counter(b.values()) == Counter(a.values())


def test_small_strata_do_not_all_round_the_same_way() -> None:
    # 30 strata of 3 units: per stratum 0.8*3 -> 2 train, and the leftover rotates between val and test.
    units = {f"s{s}-u{u}": f"s{s}" for s in range(30) for u in range(3)}
    counts = Counter(assign_splits(units, [0.8, 0.1, 0.1], seed=0).values())
    assert counts["train"] == 72 and counts["val"] == 9 and counts["test"] == 9


def test_zero_fraction_split_stays_empty() -> None:
    counts = Counter(assign_splits({str(i): "" for i in range(17)}, [0.9, 0.1, 0.0], seed=3).values())
    assert counts == {"train": 15, "val": 2}


def test_stable_hash_is_fixed() -> None:
    assert stable_hash(0, "img.png") == stable_hash(0, "img.png") != stable_hash(1, "img.png")
    assert stable_hash("a", "bc") != stable_hash("ab", "c")  # parts are separated


def test_mcq_options_and_answer() -> None:
    values = ["angry", "happy", "neutral", "sad", "surprised"]
    for i in range(20):
        truth = values[i % 5]
        q = build_mcq(qid=f"q{i}", image=f"{i}.png", label="expression", true_value=truth, values=values, seed=0)
        assert len(q.options) == 4 and len(set(q.options)) == 4 and set(q.options) <= set(values)
        assert q.options[LETTERS.index(q.answer)] == values[i % 5]
        assert q.question == "What is the facial expression of the person in the image?"
    two = build_mcq(qid="g", image="x.png", label="gender", true_value="Male", values=["Female", "Male"], seed=0)
    assert sorted(two.options) == ["Female", "Male"]
    assert question_for("skin_tone") == "What is the skin tone of the person in the image?"


def test_text_checks() -> None:
    assert check_text("Q?", "A fine answer.", None) is None
    assert check_text(" ", "A", None) == "empty_question"
    assert check_text("Q?", "\n", None) == "empty_answer"
    assert check_text("Q?", "I'm sorry, I can't help with that.", None) == "refusal"
    assert check_text("Q?", "See <image> above.", None) == "image_token_in_text"


def test_conversation_check() -> None:
    good = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]
    check_conversation(good, ["a.png"], where="c1")
    with pytest.raises(DataError, match="c1: turn 2 is from 'human', expected 'gpt'"):
        check_conversation([good[0], good[0]], ["a.png"], where="c1")
    with pytest.raises(DataError, match="c1: 1 <image> placeholders for 2 images"):
        check_conversation(good, ["a.png", "b.png"], where="c1")
    with pytest.raises(DataError, match="c1: conversation has 1 turns"):
        check_conversation(good[:1], ["a.png"], where="c1")
