"""The one progress protocol between library code and whoever shows it.

Library entry points take a ``reporter`` and never print: they name each stage of
work (with its size when known), count items as they finish, and pass on notes.
The CLI hands in the rich bar (``_progress.ProgressBar``); library callers get
:data:`SILENT` by default.
"""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    def stage(self, name: str, total: int | None = None) -> None:
        """Start a stage of ``total`` items (None: unknown); its count starts at 0."""

    def advance(self, n: int = 1, **status: object) -> None:
        """``n`` more items of the current stage are done (0 just starts its clock or refreshes ``status``).

        ``status``: live counters a display may show beside the count (annotate's failed, in_flight, tokens).
        """

    def log(self, msg: str) -> None:
        """A note for the person running the command (a plain line, no markup)."""


class SilentReporter:
    """Reports nothing: the default for library callers."""

    def stage(self, name: str, total: int | None = None) -> None:
        pass

    def advance(self, n: int = 1, **status: object) -> None:
        pass

    def log(self, msg: str) -> None:
        pass


SILENT = SilentReporter()


class Within:
    """A reporter for a library call made inside the caller's stage ``name``.

    The callee's stages keep the caller's label (quickstart's "finetune" stays "finetune" while
    the trainer counts its steps); counts and notes pass through.
    """

    def __init__(self, outer: Reporter, name: str) -> None:
        self.outer = outer
        self.name = name

    def stage(self, name: str, total: int | None = None) -> None:
        self.outer.stage(self.name, total)

    def advance(self, n: int = 1, **status: object) -> None:
        self.outer.advance(n, **status)

    def log(self, msg: str) -> None:
        self.outer.log(msg)
