"""The one progress display of the CLI: a rich bar on stderr with elapsed time, rate and time left.

Library code reports through the :class:`~facellm_cli.reporting.Reporter`
protocol (stage, advance, log) and never prints; :class:`ProgressBar` is the
CLI's one implementation of it. The bar
also watches throughput: when the rate over the last few seconds falls far
below what this machine did a minute earlier, it says so once, with the fix
(other processes are competing for the cores).
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import ProgressColumn, Task, TaskID
    from typing_extensions import Self

# A rate below this fraction of the earlier one is "far below".
DROP_RATIO = 0.35
# The current rate is measured over this many seconds, the earlier one over the minute before it.
RECENT_S = 15.0
EARLIER_S = 60.0
# At most one throughput sample per this many seconds.
MIN_INTERVAL_S = 0.5

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
        if self.samples and now - self.samples[-1][0] < MIN_INTERVAL_S:
            return None  # fast callers (thousands a second) keep the history short and the check cheap
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


def _times_column() -> ProgressColumn:
    """'0:01:05 elapsed · 0:02:10 left' in one column (rich's own columns are unlabelled)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    def fmt(seconds: float | None) -> str:
        if seconds is None:
            return "-:--"
        s = int(seconds)
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"

    class TimesColumn(ProgressColumn):
        max_refresh = 0.5

        def render(self, task: Task) -> Text:
            elapsed = task.finished_time if task.finished else task.elapsed
            left = 0.0 if task.finished else task.time_remaining
            return Text(f"{fmt(elapsed)} elapsed, {fmt(left)} left", style="progress.remaining")

    return TimesColumn()


class ProgressBar:
    """``with ProgressBar(console, "evaluate", unit="questions") as bar: evaluate(cfg, reporter=bar)``.

    A :class:`~facellm_cli.reporting.Reporter`: :meth:`stage` starts a new labelled bar, :meth:`advance`
    counts, :meth:`log` writes a line above it (``log_prefix`` first; ``headers`` also prints
    ">> stage" above each new stage, as quickstart does). ``bar(done, total)`` sets the count directly.
    Extra ``fields`` become text columns (annotate's failed / in flight / tokens).
    """

    def __init__(
        self,
        console: Console,
        label: str,
        *,
        unit: str = "",
        fields: dict[str, str] | None = None,
        columns: tuple[str, ...] = (),
        transient: bool = False,
        watch: ThroughputWatch | None = None,
        cpu_bound: bool = True,
        disable: bool = False,
        headers: bool = False,
        log_prefix: str = "",
    ) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.console = console
        self.unit = unit
        # Only local compute can be slowed by other processes on the cores; a remote endpoint's pace
        # (rate limits, a batch being processed) is not this machine's throughput.
        self.watch = (watch if watch is not None else ThroughputWatch()) if cpu_bound else None
        self._fields: dict[str, Any] = dict(fields or {})  # extra keyword arguments of rich's add_task
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=12),
            MofNCompleteColumn(),
            *(TextColumn(c) for c in columns),
            TextColumn("{task.fields[rate]}"),
            _times_column(),
            console=console,
            transient=transient,
            speed_estimate_period=60.0,
            disable=disable,
        )
        self.task = self.progress.add_task(label, total=None, rate="", **self._fields)
        self._started: set[TaskID] = set()
        self._stages = 0
        self._label = label
        self._done = 0
        self._total: int | None = None
        self.headers = headers
        self.log_prefix = log_prefix

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None and self.task not in self._started and self._stages:
            self.progress.update(self.task, total=1, completed=1)  # a last stage that counted nothing
        self.progress.stop()

    def stage(self, label: str, total: int | None = None) -> None:
        """Finish the current bar and start a fresh one (its own elapsed time and estimate).

        A stage that reported no counts shows as 1/1 when done; the opening bar
        is dropped when it never counted anything (it only stood for the command).
        The same label again before anything was counted only sets the size (a
        library call inside a caller's stage, see ``reporting.Within``).
        """
        self._done, self._total = 0, total
        if label == self._label and self.task not in self._started and self._stages:
            self.progress.update(self.task, total=total)
            return
        self._label = label
        if self.headers:
            self.print(f"[bold]>>[/bold] {label}")
        if self.task in self._started or self._stages:
            if self.task not in self._started:
                self.progress.update(self.task, total=1, completed=1)
            self.progress.stop_task(self.task)
        else:
            self.progress.remove_task(self.task)
        self._stages += 1
        if self.watch is not None:
            self.watch.samples.clear()  # a new stage has its own pace
        self.task = self.progress.add_task(label, total=total, rate="", **self._fields)

    def advance(self, n: int = 1, **status: Any) -> None:
        self._done += n
        self(self._done, self._total, **status)

    def log(self, msg: str) -> None:
        self.print(f"{self.log_prefix}{msg}", markup=False, highlight=False)

    def print(self, message: str, **kwargs: Any) -> None:
        self.progress.console.print(message, **kwargs)

    def __call__(self, done: float, total: float | None, **fields: Any) -> None:
        if self.task not in self._started:
            # The first report may start mid-way (a resumed run): the rate counts from here, not from 0.
            self._started.add(self.task)
            # (reset replaces the task's fields: pass them all)
            # rich annotates reset's ``completed`` as int, but stores it in Task.completed (a float) like update() does
            self.progress.reset(
                self.task,
                total=total,
                completed=done,  # type: ignore[arg-type]
                **{"rate": "", **self._fields, **fields},
            )
            return
        self.progress.update(self.task, completed=done, total=total, **fields)
        speed = next((t.speed for t in self.progress.tasks if t.id == self.task), None)
        if speed:
            shown = f"{speed:,.0f}" if speed >= 100 else f"{speed:.3g}"
            self.progress.update(self.task, rate=f"{shown} {self.unit}/s" if self.unit else f"{shown}/s")
        drop = self.watch.update(done) if self.watch is not None else None
        if drop:
            earlier, recent = drop
            self.print(
                f"[yellow]warning:[/yellow] throughput fell from {earlier:.2f} to {recent:.2f} "
                f"{self.unit or 'items'}/s in the last minute; {SLOW_HINT}",
                highlight=False,
            )
