"""Synthetic faces: deterministic per seed, labels that match the drawings' attributes."""

from __future__ import annotations

import csv
import hashlib
import random
from pathlib import Path

import pytest

from facellm_cli.errors import OutputExistsError
from facellm_cli.synth import (
    BACKGROUNDS,
    EXPRESSIONS,
    LABEL_COLUMNS,
    SKIN_TONES,
    FaceAttributes,
    draw_face,
    synth_faces,
)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    synth_faces(tmp_path / "a", 9, seed=3)
    synth_faces(tmp_path / "b", 9, seed=3)
    synth_faces(tmp_path / "c", 9, seed=4)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b
    assert len(a) == 10  # 9 PNGs + labels.csv
    assert a != c
    synth_faces(tmp_path / "d", 9, seed=3, workers=2)  # two spawned processes draw the same files
    assert _digest(tmp_path / "d") == a


def test_reporting_silent_by_default_and_counted_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from facellm_cli.testing.reporter import RecordingReporter

    synth_faces(tmp_path / "quiet", 6, seed=1)
    assert capsys.readouterr() == ("", "")
    rec = RecordingReporter()
    synth_faces(tmp_path / "counted", 6, seed=1, workers=1, reporter=rec)
    assert rec.calls[0] == ("stage", "drawing faces", 6)
    assert rec.calls[1] == ("advance", 0)
    assert sum(c[1] for c in rec.calls if c[0] == "advance") == 6
    assert capsys.readouterr() == ("", "")


def test_labels_csv_matches_files_and_vocabulary(tmp_path: Path) -> None:
    res = synth_faces(tmp_path / "f", 12, seed=0, size=48)
    with open(res.labels_csv, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == LABEL_COLUMNS
        rows = list(reader)
    assert [r["file"] for r in rows] == [f"face_{i:05d}.png" for i in range(12)]
    # expressions are balanced: 4 of each
    assert sorted(r["expression"] for r in rows) == sorted(EXPRESSIONS * 4)
    from PIL import Image

    for r in rows:
        assert r["eyes"] in ("open", "closed") and r["pose"] in ("left", "upright", "right")
        assert r["glasses"] in ("yes", "no") and r["skin_tone"] in SKIN_TONES and r["background"] in BACKGROUNDS
        with Image.open(tmp_path / "f" / r["file"]) as im:
            assert im.size == (48, 48) and im.mode == "RGB"
            # the corner pixel is the background colour named in the label
            assert max(abs(a - b) for a, b in zip(im.getpixel((0, 0)), BACKGROUNDS[r["background"]], strict=True)) <= 2
    assert res.counts["expression"] == {"smiling": 4, "neutral": 4, "frowning": 4}


def _mouth_rows(expression: str) -> tuple[float, float]:
    """Mean row of the red mouth pixels at the corners and at the centre of the mouth."""
    import numpy as np

    attrs = FaceAttributes(expression, "open", "upright", "no", "light", "white")
    arr = np.asarray(draw_face(attrs, 64, random.Random(0))).astype(int)
    red = (arr[:, :, 0] - arr[:, :, 1] > 70) & (arr[:, :, 0] - arr[:, :, 2] > 60)
    red[:38] = False  # the mouth is in the lower part of the face
    ys, xs = np.nonzero(red)
    left, right = xs.min(), xs.max()
    centre = ys[np.abs(xs - (left + right) / 2) <= 2].mean()
    corners = ys[(xs <= left + 2) | (xs >= right - 2)].mean()
    return float(corners), float(centre)


def test_mouth_curve_shows_the_expression() -> None:
    corners, centre = _mouth_rows("smiling")
    assert corners < centre - 1.5  # corners higher in the image than the middle
    corners, centre = _mouth_rows("frowning")
    assert corners > centre + 1.5
    corners, centre = _mouth_rows("neutral")
    assert abs(corners - centre) <= 1


def test_refuses_non_empty_folder_and_cli(tmp_path: Path, cli) -> None:
    out = tmp_path / "faces"
    r = cli("dev", "synth-faces", out, "--n", "3", "--seed", "1", "--size", "64")
    assert r.code == 0, r.err
    assert r.out.strip() == str(out / "labels.csv")
    assert len(list(out.glob("*.png"))) == 3
    with pytest.raises(OutputExistsError, match="not empty"):
        synth_faces(out, 3)
    r = cli("dev", "synth-faces", out, "--n", "3")
    assert r.code == 1 and "output folder is not empty" in r.err
    r = cli("dev", "synth-faces", out, "--n", "0", "--overwrite")
    assert r.code == 1 and "--n must be at least 1, got 0" in r.err
