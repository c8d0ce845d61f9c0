"""Where a source checkout keeps its test assets (this module is for tests and bench/, run from a checkout)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]  # src/facellm_cli/testing/paths.py -> the repository
ASSETS = REPO_ROOT / "tests" / "assets"
