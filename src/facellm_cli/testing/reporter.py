"""A reporter that remembers what it was told, for tests of library progress reporting."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RecordingReporter:
    """Records every call as ``("stage", name, total)``, ``("advance", n)`` or ``("log", msg)``.

    ``stop_at`` (optional) raises KeyboardInterrupt once the current stage's count reaches it,
    as Ctrl-C in the middle of a run would."""

    calls: list[tuple[object, ...]] = field(default_factory=list)
    stop_at: int | None = None
    done: int = 0

    def stage(self, name: str, total: int | None = None) -> None:
        self.calls.append(("stage", name, total))
        self.done = 0

    def advance(self, n: int = 1, **status: object) -> None:
        self.calls.append(("advance", n))
        self.done += n
        if self.stop_at is not None and self.done >= self.stop_at:
            raise KeyboardInterrupt

    def log(self, msg: str) -> None:
        self.calls.append(("log", msg))

    def stages(self) -> list[str]:
        return [str(c[1]) for c in self.calls if c[0] == "stage"]
