"""Answer extraction for multiple-choice questions, and accuracy. Pure functions, no I/O.

FaceXBench's ``aggregate_results.py`` takes the first ``\\b\\(?([A-Za-z])\\)?\\b``
match, so "A woman with dark hair; the answer is (C)" scores as A, and a
refusal that happens to contain an option word scores as that option. Here the
order is:

1. the whole answer is a letter: ``C``, ``(c)``, ``C.``;
2. explicit phrases: "answer is (C)", "Answer: C", "Option C", "correct choice is C";
   if they name different letters the answer is ambiguous;
3. a letter at the start followed by punctuation: "C. smiling", "(C) smiling", "C) ..."
   (unless other parenthesised letters follow: "(A) smiling (B) neutral" echoes the options);
4. letters mentioned elsewhere: "(C)" or a capital standalone letter that is
   not the article "A" ("A woman ..."); exactly one distinct letter wins, two
   or more make the answer ambiguous;
5. refusals ("I'm sorry, I can't ...") are unparseable;
6. the option text itself: the whole answer equals one option, or exactly one
   option (the longest of nested ones) appears in it as a phrase.

Anything else is unparseable, and it is counted and reported as such rather
than guessed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..refusals import is_refusal
from ..schema import LETTERS

_PHRASE = re.compile(
    r"""(?:\b(?:the\s+)?(?:final\s+|correct\s+|right\s+|best\s+)?(?:answer|option|choice|letter)s?\b
        (?:\s+(?:is|would\s+be|should\s+be|will\s+be|=|seems\s+to\s+be|appears\s+to\s+be))?
        (?:\s+(?:option|choice|letter))?
        \s*[:=\-–—]?\s*\**\s*)
        (?:\((?P<p>[A-Za-z])\)|\[(?P<b>[A-Za-z])\]|(?P<l>[A-Za-z])(?![A-Za-z0-9'’]))
    """,
    re.IGNORECASE | re.VERBOSE,
)
_START = re.compile(r"^\s*(?:\((?P<p>[A-Za-z])\)|(?P<l>[A-Za-z])(?:[.):]|\s+[-–—:]))")
_WHOLE = re.compile(r"^\s*[\(\[]?\s*(?P<l>[A-Za-z])\s*[\)\]]?\s*[.!:]?\s*$")
_PAREN = re.compile(r"\((?P<l>[A-Za-z])\)")
_CAPITAL = re.compile(r"(?<![A-Za-z0-9'’\-])(?P<l>[A-Z])(?![A-Za-z0-9'’\-])")
# Words after a standalone "A" that show it is a letter, not the article ("between A and B", "A is correct").
_A_AS_LETTER_NEXT = {
    "and",
    "or",
    "nor",
    "vs",
    "versus",
    "is",
    "was",
    "seems",
    "looks",
    "appears",
    "would",
    "should",
    "could",
    "might",
    "because",
    "since",
    "but",
    "as",
    "then",
    "fits",
    "matches",
    "best",
    "applies",
}
# Beyond the shared refusal detector: answers that decline to pick an option.
_NO_CHOICE = re.compile(
    r"\b(?:i\s*(?:can(?:'|no)t|cannot)\b|i\s+(?:do\s+not|don't)\s+know\b|"
    r"not\s+possible\s+to\s+(?:determine|tell|identify)|unable\s+to\s+(?:determine|identify|tell)|"
    r"can(?:not|'t)\s+be\s+determined|there\s+is\s+no\s+(?:image|face))",
    re.IGNORECASE,
)
_MARKUP = re.compile(r"[*_`#]+")


@dataclass(frozen=True)
class Parsed:
    """The letter read from an answer (None when unparseable) and which rule decided it."""

    letter: str | None
    how: str  # letter | explicit | start | mention | option_text | empty | ambiguous | refusal | none


def _valid(options: Sequence[object]) -> str:
    return LETTERS[: len(options)]


def _article(text: str, start: int, end: int) -> bool:
    """True when the capital 'A' at [start, end) reads as the article: followed by a space and a word."""
    if text[start:end] != "A":
        return False
    m = re.match(r"\s+([A-Za-z]+)", text[end:])
    if not m:
        return False
    return m.group(1).lower() not in _A_AS_LETTER_NEXT


def _lower_is_prose(text: str, end: int) -> bool:
    """A lower-case letter followed by a space and a lower-case word is a word ("the answer is a woman")."""
    return bool(re.match(r"\s+[a-z]", text[end:]))


def _group(m: re.Match[str]) -> tuple[str, int, int]:
    for name in ("p", "b", "l"):
        if name in m.re.groupindex and m.group(name):
            return m.group(name), m.start(name), m.end(name)
    raise AssertionError("pattern without a letter group")


def _norm(s: str) -> str:
    s = s.lower().replace("’", "'")
    s = re.sub(r"[^\w\s'%+<>=/-]", " ", s)
    return " ".join(s.split())


def _option_text(text: str, options: Sequence[object]) -> str | None:
    answer = _norm(text)
    normed = [_norm(str(o)) for o in options]
    if not answer:
        return None
    exact = [i for i, o in enumerate(normed) if o and o == answer]
    if len(exact) == 1:
        return LETTERS[exact[0]]
    found = [i for i, o in enumerate(normed) if o and re.search(r"(?<![\w])" + re.escape(o) + r"(?![\w])", answer)]
    # Drop options nested in a longer matched option ("Image 2" inside "Image 2, Image 3").
    found = [i for i in found if not any(j != i and normed[i] in normed[j] and normed[i] != normed[j] for j in found)]
    if len({normed[i] for i in found}) == 1 and len(found) == 1:
        return LETTERS[found[0]]
    return None


def parse_answer(text: str | None, options: Sequence[object]) -> Parsed:
    """Read the chosen option letter out of a model's answer; see the module docstring for the rules."""
    valid = _valid(options)
    raw = _MARKUP.sub("", text or "").strip().strip("\"'“”")
    if not raw:
        return Parsed(None, "empty")

    m = _WHOLE.match(raw)
    if m:
        letter = m.group("l").upper()
        return Parsed(letter, "letter") if letter in valid else Parsed(None, "none")

    explicit: list[str] = []
    for m in _PHRASE.finditer(raw):
        letter, s, e = _group(m)
        if m.group("l") and letter.islower() and _lower_is_prose(raw, e):
            continue
        if m.group("l") and _article(raw, s, e):
            continue
        if letter.upper() in valid:
            explicit.append(letter.upper())
    if explicit:
        return Parsed(explicit[0], "explicit") if len(set(explicit)) == 1 else Parsed(None, "ambiguous")

    in_parens = {m.group("l").upper() for m in _PAREN.finditer(raw) if m.group("l").upper() in valid}
    m = _START.match(raw)
    if m:
        letter, _, _ = _group(m)
        if letter.upper() in valid:
            # "(A) smiling (B) neutral ..." echoes the options rather than choosing one.
            return Parsed(letter.upper(), "start") if in_parens <= {letter.upper()} else Parsed(None, "ambiguous")

    mentioned = set(in_parens)
    for m in _CAPITAL.finditer(raw):
        letter = m.group("l")
        if letter in valid and not _article(raw, m.start("l"), m.end("l")):
            mentioned.add(letter)
    if len(mentioned) == 1:
        return Parsed(mentioned.pop(), "mention")
    if len(mentioned) > 1:
        return Parsed(None, "ambiguous")

    if is_refusal(raw) or _NO_CHOICE.search(raw):
        return Parsed(None, "refusal")
    letter = _option_text(raw, options)
    if letter:
        return Parsed(letter, "option_text")
    return Parsed(None, "none")


@dataclass
class Tally:
    """Counts behind one accuracy figure."""

    n: int = 0
    correct: int = 0
    unparseable: int = 0

    def add(self, correct: bool, unparseable: bool) -> None:
        self.n += 1
        self.correct += int(correct)
        self.unparseable += int(unparseable)

    @property
    def accuracy(self) -> float:
        """Percent correct (0 for an empty tally)."""
        return 100.0 * self.correct / self.n if self.n else 0.0

    def to_json(self) -> dict[str, float | int]:
        return {"n": self.n, "correct": self.correct, "unparseable": self.unparseable, "accuracy": self.accuracy}


def accuracy(pairs: Iterable[tuple[str | None, str]]) -> Tally:
    """Tally (predicted letter or None, gold letter) pairs; None counts as wrong and unparseable."""
    t = Tally()
    for pred, gold in pairs:
        t.add(pred is not None and pred == gold, pred is None)
    return t
