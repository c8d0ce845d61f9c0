"""The type checker runs over ``src/`` as part of the test suite, so CI (which runs ``pytest``) runs it too.

Configuration lives in pyproject.toml (``[tool.mypy]``). A cold run follows torch and transformers' own
types and takes ~40 s of CPU; later runs read ``.mypy_cache`` and take about a second.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed (pip install -e '.[test]')")
def test_mypy_reports_no_errors_in_src() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "src"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, f"mypy found type errors in src/:\n{proc.stdout}{proc.stderr}"
    assert "Success: no issues found" in proc.stdout
