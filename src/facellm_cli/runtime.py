"""The process around the model: how many CPU threads torch uses, and which library warnings are noise.

Threads: torch's CPU kernels run their parallel parts on a team of OpenMP threads that wait for
each other. When the team is larger than the cores the process actually gets (other jobs on a
shared machine, a CPU affinity mask, a container quota), each step waits for descheduled team
members; measured here on 2 cores with 2 busy neighbours, a small training step ran 6.7 steps/s
with 2 threads and 151 with 1 (bench/threads.py). So on CPU the default is the cores this process
may use (affinity mask and cgroup quota), less the ones other processes are keeping busy right now,
and never more than torch was told (OMP_NUM_THREADS). ``--threads`` overrides it.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

_DECIDED: ThreadChoice | None = None


@dataclass(frozen=True)
class ThreadChoice:
    """What was chosen, from what, and the one line a person should see about it (or None)."""

    threads: int
    usable: int
    idle: float | None
    requested: int | None
    note: str | None


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota when one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def worker_processes(n: int, per_process: int, most: int = 8) -> int:
    """Processes worth starting for ``n`` items when one process pays for itself at ``per_process`` items:
    at least 1, at most the usable CPUs or ``most``."""
    return max(1, min(most, usable_cores(), n // per_process))


def _cpu_times() -> dict[int, tuple[int, int]]:
    """Per-CPU (idle, total) jiffies from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            values = [int(v) for v in fields[:8]]
            out[int(name[3:])] = (values[3] + values[4], sum(values))
    return out


def idle_cores(window: float = 0.3) -> float | None:
    """How many of this process's CPUs sat idle over ``window`` seconds (None where /proc/stat is missing)."""
    try:
        allowed = os.sched_getaffinity(0)
        first = _cpu_times()
        time.sleep(window)
        second = _cpu_times()
    except (AttributeError, OSError, ValueError):
        return None
    idle = 0.0
    for cpu in allowed:
        if cpu in first and cpu in second:
            d_idle = second[cpu][0] - first[cpu][0]
            d_total = second[cpu][1] - first[cpu][1]
            idle += d_idle / d_total if d_total > 0 else 1.0
    return idle


def choose_threads(requested: int | None, current: int, usable: int, idle: float | None) -> ThreadChoice:
    """The thread count for torch on CPU (pure: the caller measures ``usable`` and ``idle``).

    ``current`` is torch's own count (OMP_NUM_THREADS, else its core count), which the default never exceeds.
    """
    if requested is not None:
        note = None
        if requested > usable:
            note = (
                f"--threads {requested} is more than the {usable} CPU core(s) this process may use; torch's threads "
                f"will wait on each other and run slower: use --threads {usable} or fewer"
            )
        return ThreadChoice(requested, usable, idle, requested, note)
    threads = min(current, usable)
    note = None
    if current > usable:
        note = (
            f"torch was set to {current} threads (OMP_NUM_THREADS?) but this process may use {usable} CPU core(s); "
            f"using {usable} (set --threads or OMP_NUM_THREADS to at most {usable})"
        )
    if idle is not None:
        free = max(1, min(threads, math.floor(idle + 0.5)))
        if free < threads:
            note = (
                f"{usable - idle:.1f} of {usable} CPU core(s) are busy with other work: using {free} torch "
                f"thread(s) instead of {threads} so they do not wait on each other (--threads to choose)"
            )
            threads = free
    return ThreadChoice(threads, usable, idle, None, note)


def configure_threads(requested: int | None = None) -> ThreadChoice:
    """Set torch's CPU thread count once per process (an explicit request always applies); returns the choice.

    The first decision stands for later model loads in the same process (quickstart, evaluate then ask),
    so the idle measurement is taken once, before this process starts its own work.
    """
    global _DECIDED
    import torch

    if requested is None and _DECIDED is not None:
        return _DECIDED
    current = _DECIDED.threads if _DECIDED is not None else torch.get_num_threads()
    choice = choose_threads(requested, current, usable_cores(), None if requested else idle_cores())
    if choice.threads != torch.get_num_threads():
        torch.set_num_threads(choice.threads)
    _DECIDED = choice
    return choice


# ---------------------------------------------------------------- library noise

# (logger name, start of the message): warnings that say nothing wrong about this install.
_NOISY_LOGS = (
    # bitsandbytes on CPUs with AVX512-BF16 tries an optional kernel package and logs its absence.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)
# (category, message regex) for warnings.warn calls inside libraries.
_NOISY_WARNINGS = (
    # peft reads transformers' deprecated property; nothing the user can change.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def silence_known_warnings(debug: bool) -> None:
    """Drop the specific harmless library warnings above (all of them stay visible when ``debug``)."""
    if debug:
        return
    for name, prefix in _NOISY_LOGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessages(prefix))
    for category, message in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
