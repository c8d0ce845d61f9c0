"""Rendering for ``facellm annotate``: a rich progress bar on stderr and the summary lines.

Kept apart from the run so the library stays print-free; the CLI passes an
:class:`AnnotateProgress` as the pipeline's reporter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._progress import ProgressBar
from .run import AnnotateSummary

if TYPE_CHECKING:
    from rich.console import Console


class AnnotateProgress(ProgressBar):
    """The shared bar plus failed / in flight / tokens, from the status the pipeline reports with each count."""

    def __init__(self, console: Console, description: str) -> None:
        super().__init__(
            console,
            description,
            unit="items",
            cpu_bound=False,  # paced by the endpoint, not by this machine's cores
            fields={"failed": "0", "in_flight": "0", "tokens": "0"},
            columns=(
                "[red]{task.fields[failed]} failed[/red] · {task.fields[in_flight]} in flight · {task.fields[tokens]} tokens",
            ),
        )

    def advance(self, n: int = 1, **status: Any) -> None:
        if "tokens" in status:
            status["tokens"] = f"{status['tokens']:,}"
        super().advance(n, **status)


def summary_lines(s: AnnotateSummary) -> list[str]:
    """Human summary (stderr)."""
    cost = "unknown (add the model to prices)" if s.cost_usd is None else f"${s.cost_usd:,.4f}"
    if s.dry_run:
        lines = [
            f"dry run ({s.provider}, {s.mode}, {s.model}): {s.images} images, "
            f"{s.items_pending} of {s.items_total} items to do",
            f"would send {s.requests:,} requests, ~{s.prompt_tokens:,} prompt tokens ({s.image_tokens:,} for images), "
            f"~{s.completion_tokens:,} completion tokens; estimated cost {cost}{' (batch price)' if s.batch else ''}",
        ]
    else:
        rejected = ", ".join(f"{v} {k}" for k, v in sorted(s.rejected.items())) or "none"
        lines = [
            f"{s.written_ok:,} written, {s.failed:,} failed, {s.items_done_before:,} already done "
            f"({s.images} images, {s.items_total:,} items) in {s.wall_s:.1f}s",
            f"{s.requests:,} requests, {s.retries:,} retries, {s.reasks:,} re-asks (rejected answers: {rejected})",
            f"tokens: {s.prompt_tokens:,} prompt ({s.image_tokens:,} image), "
            f"{s.completion_tokens:,} completion; cost {cost}",
        ]
    if s.problems_total:
        lines.append(f"{s.problems_total} problem(s):")
        lines.extend(f"  {p}" for p in s.problems)
        if s.problems_total > len(s.problems):
            lines.append(f"  ... and {s.problems_total - len(s.problems)} more")
    return lines
