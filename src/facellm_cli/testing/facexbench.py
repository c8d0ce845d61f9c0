"""FaceXBench for tests and benchmarks: the committed subset, the full set when present, copies with placeholder images."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from .files import png_bytes
from .paths import ASSETS, REPO_ROOT

__all__ = [
    "FULL_BENCHMARK_MISSING",
    "SHARED_BENCHMARK",
    "SUBSET_BENCHMARK",
    "find_facexbench",
    "make_facexbench",
    "png_bytes",
]

# Real FaceXBench question files committed with the tests: the first 30 questions of 12 files (360 in all),
# covering every category and the zero, single and multiple image settings. See its README.
SUBSET_BENCHMARK = ASSETS / "facexbench" / "benchmark"


def find_facexbench(env: str | None = None) -> Path | None:
    """The folder holding all 48 FaceXBench question files, or None.

    FACEXBENCH_DIR (a FaceXBench checkout or its benchmark/ folder) when set, else
    ``../shared/facexbench`` next to the repository. Never an absolute path of one machine.
    """
    given = env if env is not None else os.environ.get("FACEXBENCH_DIR")
    base = Path(given) if given else REPO_ROOT.parent / "shared" / "facexbench"
    for folder in (base / "benchmark", base):
        if len(list(folder.glob("*.json"))) == 48:
            return folder
    return None


SHARED_BENCHMARK = find_facexbench()
FULL_BENCHMARK_MISSING = (
    "the 48 FaceXBench question files are not at ../shared/facexbench beside the repository "
    "(set FACEXBENCH_DIR to a FaceXBench checkout to run the full-benchmark tests)"
)


def make_facexbench(dst: Path, files: Iterable[str] | None = None, source: Path = SUBSET_BENCHMARK) -> Path:
    """Copy question files from ``source`` into ``dst/benchmark`` and write a placeholder PNG at every image path."""
    bench = dst / "benchmark"
    bench.mkdir(parents=True, exist_ok=True)
    data = png_bytes()
    names = sorted(files) if files else sorted(p.name for p in source.glob("*.json"))
    for name in names:
        src = source / name
        shutil.copy(src, bench / name)
        meta = json.loads(src.read_text(encoding="utf-8"))
        for q in meta["questions"].values():
            for rel in q["image_paths"]:
                p = bench / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
    return dst
