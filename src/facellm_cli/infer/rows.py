"""Per-row control of a batched ``generate`` call: the one streaming mechanism.

``ask`` (one row) and ``serve`` (a dynamic batch) both stream through
:class:`RowControl`, a transformers stopping criterion that runs after every
token. It decodes each row's new tokens, ends the row at an end-of-sequence
token, at its own ``max_tokens``, at a stop string (cutting the text before it),
or when its client left, and hands each row's text to the row's ``emit`` as it
becomes final. transformers pads finished rows and stops the whole call once
every row is done.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from .generate import eos_ids

if TYPE_CHECKING:
    from ..models.loader import LoadedModel


class RowSpec(Protocol):
    """What one row of a batch asks for (serve's ``Job``, or ``stream_generate``'s single row)."""

    stream: bool

    @property
    def max_tokens(self) -> int: ...

    @property
    def stop(self) -> tuple[str, ...]: ...

    def is_cancelled(self) -> bool: ...

    def emit(self, text: str) -> None:
        """Streamed text that is final (called only when ``stream`` is set)."""


class Row:
    __slots__ = ("spec", "ids", "text", "sent", "done", "reason")

    def __init__(self, spec: RowSpec) -> None:
        self.spec = spec
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.done = False
        self.reason = "length"


class RowControl:
    """The stopping criterion (see module docstring); ``finish()`` after generate returns."""

    def __init__(self, lm: LoadedModel, specs: Sequence[RowSpec]) -> None:
        self.tokenizer = lm.tokenizer
        self.eos = eos_ids(lm)
        pad = lm.tokenizer.pad_token_id
        self.stop_ids = set(self.eos) | ({pad} if pad is not None else set())
        self.rows = [Row(s) for s in specs]

    def _emit(self, row: Row) -> None:
        if not row.spec.stream:
            return
        text = row.text.lstrip()
        end = len(text)
        if not row.done:
            hold = max((len(s) for s in row.spec.stop), default=1) - 1
            end = max(0, end - hold)
            while end > 0 and text[end - 1] == "\ufffd":  # an incomplete multi-byte character
                end -= 1
        if end > row.sent:
            row.spec.emit(text[row.sent : end])
            row.sent = end

    def _step(self, row: Row, token: int) -> None:
        spec = row.spec
        if spec.is_cancelled():
            row.done, row.reason = True, "cancelled"
            return
        if token in self.stop_ids:
            row.done, row.reason = True, "stop"
            self._emit(row)
            return
        row.ids.append(token)
        if not (spec.stream or spec.stop):
            # nothing to look at before the end: decode once in finish() instead of every step
            if len(row.ids) >= spec.max_tokens:
                row.done, row.reason = True, "length"
            return
        row.text = cast(str, self.tokenizer.decode(row.ids, skip_special_tokens=True))  # one id list: one string
        cut = min((i for i in (row.text.find(s) for s in spec.stop) if i >= 0), default=-1)
        if cut >= 0:
            row.text = row.text[:cut]
            row.done, row.reason = True, "stop"
        elif len(row.ids) >= spec.max_tokens:
            row.done, row.reason = True, "length"
        self._emit(row)

    def finish(self) -> None:
        """After generate returns: decode rows that were not decoded step by step, end rows still open."""
        for row in self.rows:
            if not (row.spec.stream or row.spec.stop) and row.reason != "cancelled":
                row.text = cast(str, self.tokenizer.decode(row.ids, skip_special_tokens=True))
            if not row.done:  # generate stopped on its own length limit before our criterion ended the row
                row.done = True
                self._emit(row)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        last = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, last, strict=True):
            if not row.done:
                self._step(row, int(token))
        return torch.tensor([r.done for r in self.rows], dtype=torch.bool, device=input_ids.device)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings (already merged with the server's defaults): serve's batcher and the vLLM engine."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def group_key(self, job_id: str) -> tuple[Any, ...]:
        """Requests with equal keys can share one generate call."""
        if self.temperature == 0:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", job_id)
        return ("sample", self.temperature, self.top_p)
