"""Waiting in tests on events, not on wall-clock deadlines (a busy machine only makes the wait longer).

A wait ends when its condition holds, or fails at once when the process it depends on has ended.
pytest-timeout (pyproject) is the backstop for a process that hangs; its traceback points at the
``wait_for`` line, whose ``what`` says what was awaited.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str, poll: float = 0.02) -> None:
    """Return once ``condition()`` is true; raise (with the process's stderr) if ``proc`` ends first."""
    while not condition():
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}: {err[-2000:]}")
        time.sleep(poll)
