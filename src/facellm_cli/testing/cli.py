"""Running the real ``facellm`` in a fresh process from tests and benchmarks (the in-process runner is the
``cli`` fixture in tests/conftest.py)."""

from __future__ import annotations

import os
import sys

from .paths import REPO_ROOT

FACELLM = (sys.executable, "-m", "facellm_cli")  # the CLI of this interpreter, not whatever is first on PATH


def facellm_cmd(*args: object) -> list[str]:
    """``python -m facellm_cli ARGS`` as an argv list."""
    return [*FACELLM, *(str(a) for a in args)]


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment with this checkout's ``src`` first on PYTHONPATH (so a child imports the code under test),
    without FACELLM_DEBUG, plus ``extra``."""
    paths = [str(REPO_ROOT / "src"), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env = {k: v for k, v in os.environ.items() if k != "FACELLM_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env
