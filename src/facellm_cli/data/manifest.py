"""``facellm_dataset.json``: what a build-dataset folder needs to be read back by finetune and evaluate.

build-dataset writes image paths relative to its ``--image-root``; without
knowing that root, ``finetune --data data/fairfacegpt/train.jsonl`` would look
for images next to the JSONL. The manifest records the root twice — relative
to the dataset folder (survives moving both together) and absolute (survives
moving the dataset alone) — and readers take the first that exists. An
explicit ``image_root`` always wins over the manifest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError

MANIFEST_NAME = "facellm_dataset.json"
KIND = "facellm build-dataset"
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class DatasetManifest:
    """The parts of a manifest readers use."""

    folder: Path
    image_root_rel: str | None
    image_root_abs: str | None

    def image_root(self) -> Path:
        """The image root, relative form first (dataset and images moved together), else the absolute one."""
        cands = []
        if self.image_root_rel is not None:
            cands.append(self.folder / self.image_root_rel)
        if self.image_root_abs:
            cands.append(Path(self.image_root_abs))
        for c in cands:
            if c.is_dir():
                return c
        shown = " or ".join(str(c) for c in cands) or "(none recorded)"
        raise DataError(
            f"{self.folder / MANIFEST_NAME}: the image root it records is gone ({shown}); "
            "pass the folder holding the images with --image-root (or data.image_root)"
        )


def manifest_data(out_dir: Path, image_root: Path) -> dict[str, Any]:
    """What build-dataset writes: the image root, and which files hold which split."""
    rel = os.path.relpath(image_root.resolve(), out_dir.resolve())
    return {
        "kind": KIND,
        "version": 1,
        "image_root": Path(rel).as_posix(),
        "image_root_absolute": str(image_root.resolve()),
        "train": {s: f"{s}.jsonl" for s in SPLIT_NAMES},
        "mcq": {s: f"mcq_{s}.jsonl" for s in SPLIT_NAMES},
    }


def write_manifest(staging: Path, out_dir: Path, image_root: Path) -> Path:
    path = staging / MANIFEST_NAME
    path.write_text(json.dumps(manifest_data(out_dir, image_root), indent=2) + "\n", encoding="utf-8")
    return path


def find_manifest(path: str | Path) -> DatasetManifest | None:
    """The manifest of a dataset folder, or of the folder a dataset file sits in; None when there is none."""
    p = Path(path).expanduser()
    folder = p if p.is_dir() else p.parent
    f = folder / MANIFEST_NAME
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{f}: not valid JSON ({e}); rebuild the dataset with facellm build-dataset") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise DataError(f"{f}: not a facellm build-dataset manifest; rebuild the dataset with facellm build-dataset")
    rel, absolute = data.get("image_root"), data.get("image_root_absolute")
    return DatasetManifest(folder, str(rel) if rel is not None else None, str(absolute) if absolute else None)


def default_image_root(path: str | Path, explicit: str | Path | None) -> Path | None:
    """``explicit`` when given, else the manifest's image root, else None (the caller's own default)."""
    if explicit:
        return Path(explicit).expanduser()
    m = find_manifest(path)
    return m.image_root() if m else None


def dataset_file(path: str | Path, split: str, *, mcq: bool = False) -> Path:
    """``path`` itself for a file; for a build-dataset folder its ``{split}.jsonl`` (or ``mcq_{split}.jsonl``)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return p
    name = f"mcq_{split}.jsonl" if mcq else f"{split}.jsonl"
    f = p / name
    if not f.is_file():
        what = "a build-dataset output folder" if (p / MANIFEST_NAME).is_file() else "a folder"
        raise DataError(f"{p} is {what} without {name} (point at a build-dataset --out folder or at a file)")
    return f
