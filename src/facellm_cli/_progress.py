"""The one progress display of the CLI: a rich bar on stderr with elapsed time, rate and time left.

Library code reports through plain callbacks (``progress(done, total)``) and
never prints; commands wrap those callbacks in :class:`ProgressBar`. The bar
also watches throughput: when the rate over the last few seconds falls far
below what this machine did a minute earlier, it says so once, with the fix
(other processes are competing for the cores).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

# A rate below this fraction of the earlier one is "far below".
DROP_RATIO = 0.35
# The current rate is measured over this many seconds, the earlier one over the minute before it.
RECENT_S = 15.0
EARLIER_S = 60.0

SLOW_HINT = (
    "other processes may be competing for the CPU cores: close them, or give facellm fewer threads "
    "(--threads N or OMP_NUM_THREADS=N, N = the cores that are free)"
)


class ThroughputWatch:
    """Detects a throughput drop: the rate of the last ``recent_s`` seconds vs the minute before.

    Pure bookkeeping over (time, done) samples, so tests can feed it times.
    """

    def __init__(self, recent_s: float = RECENT_S, earlier_s: float = EARLIER_S, ratio: float = DROP_RATIO) -> None:
        self.recent_s = recent_s
        self.earlier_s = earlier_s
        self.ratio = ratio
        self.samples: deque[tuple[float, float]] = deque()
        self.warned = False

    @staticmethod
    def _rate(a: tuple[float, float], b: tuple[float, float]) -> float | None:
        dt = b[0] - a[0]
        return (b[1] - a[1]) / dt if dt > 0 else None

    def _at(self, t: float) -> tuple[float, float] | None:
        """The last sample taken at or before ``t``."""
        best = None
        for s in self.samples:
            if s[0] <= t:
                best = s
            else:
                break
        return best

    def update(self, done: float, now: float | None = None) -> tuple[float, float] | None:
        """Record progress; return (earlier rate, recent rate) the first time the recent one is far below."""
        now = time.monotonic() if now is None else now
        if self.samples and done < self.samples[-1][1]:
            self.samples.clear()  # a new stage or a reset counter
        self.samples.append((now, done))
        horizon = now - self.recent_s - self.earlier_s - 1.0
        while len(self.samples) > 2 and self.samples[1][0] <= horizon:
            self.samples.popleft()
        if self.warned:
            return None
        start = self.samples[0]
        if now - start[0] < self.recent_s + self.earlier_s * 0.5:
            return None  # not enough history yet for a fair comparison
        mid = self._at(now - self.recent_s)
        if mid is None or mid is start:
            return None
        earlier, recent = self._rate(start, mid), self._rate(mid, (now, done))
        if earlier is None or recent is None or earlier <= 0:
            return None
        if recent < self.ratio * earlier:
            self.warned = True
            return earlier, recent
        return None


class ProgressBar:
    """``with ProgressBar(console, "evaluate", unit="questions") as bar: run(progress=bar)``.

    Calling ``bar(done, total)`` updates it; :meth:`stage` starts a new labelled
    bar (quickstart's stages); :meth:`print` writes a line above it. Extra
    ``fields`` become text columns (annotate's failed / in flight / tokens).
    """

    def __init__(
        self,
        console: Any,
        label: str,
        *,
        unit: str = "",
        fields: dict[str, str] | None = None,
        columns: tuple[str, ...] = (),
        transient: bool = False,
        watch: ThroughputWatch | None = None,
    ) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console
        self.unit = unit
        self.watch = watch if watch is not None else ThroughputWatch()
        self._fields = dict(fields or {})
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            *(TextColumn(c) for c in columns),
            TextColumn("{task.fields[rate]}"),
            TextColumn("elapsed"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=console,
            transient=transient,
            speed_estimate_period=60.0,
        )
        self.task = self.progress.add_task(label, total=None, rate="", **self._fields)
        self._started: set[Any] = set()

    def __enter__(self) -> ProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def stage(self, label: str) -> None:
        """Finish the current bar and start a fresh one (its own elapsed time and estimate)."""
        self.progress.stop_task(self.task)
        self.task = self.progress.add_task(label, total=None, rate="", **self._fields)

    def print(self, message: str, **kwargs: Any) -> None:
        self.progress.console.print(message, **kwargs)

    def __call__(self, done: float, total: float | None, **fields: Any) -> None:
        if self.task not in self._started:
            # The first report may start mid-way (a resumed run): the rate counts from here, not from 0.
            self._started.add(self.task)
            # (reset replaces the task's fields: pass them all)
            self.progress.reset(self.task, total=total, completed=done, **{"rate": "", **self._fields, **fields})
            return
        self.progress.update(self.task, completed=done, total=total, **fields)
        speed = next((t.speed for t in self.progress.tasks if t.id == self.task), None)
        if speed:
            self.progress.update(self.task, rate=f"{speed:.2f} {self.unit}/s" if self.unit else f"{speed:.2f}/s")
        drop = self.watch.update(done)
        if drop:
            earlier, recent = drop
            self.print(
                f"[yellow]warning:[/yellow] throughput fell from {earlier:.2f} to {recent:.2f} "
                f"{self.unit or 'items'}/s in the last minute; {SLOW_HINT}",
                highlight=False,
            )
