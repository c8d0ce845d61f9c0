"""The quickstart end to end at a reduced size: every stage runs for real and training must clearly help."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quickstart_learns_expressions(cli, tmp_path: Path) -> None:
    out = tmp_path / "qs"
    r = cli("quickstart", "--out", out, "--faces", "1000", "--json")
    assert r.code == 0, r.err
    result = json.loads(r.out)
    assert result["faces"] == 1000
    assert set(result["splits"]) == {"train", "val", "test"}
    # accuracies are measured by evaluate on held-out faces; chance is 1/3
    assert result["accuracy_before"] < 50.0
    assert result["accuracy_after"] >= result["accuracy_before"] + 30.0, result
    assert [s["name"] for s in result["stages"]] == [
        "synthesize faces",
        "annotate",
        "build-dataset",
        "build tiny model",
        "evaluate before training",
        "finetune",
        "evaluate after training",
        "ask",
    ]
    for key in ("annotations", "mcq test set", "fine-tuned model", "eval after"):
        assert Path(result["artefacts"][key]).exists(), key
    assert json.loads((out / "eval-after" / "results.json").read_text())["overall"]["accuracy"] == pytest.approx(
        result["accuracy_after"]
    )
    assert result["ask"]["truth"] in ("smiling", "neutral", "frowning")
    assert result["ask"]["correct"] == (result["ask"]["picked"] == result["ask"]["truth"])
    assert (out / "quickstart-results.json").is_file()
    assert (out / "before_after.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The follow-up command runs as printed: the fine-tuned model and the real question.
    cmd = shlex.split(result["ask"]["command"])
    assert cmd[:4] == ["facellm", "ask", "--model", result["artefacts"]["fine-tuned model"]]
    assert cmd[-1] == result["ask"]["question"] and "(A)" in cmd[-1]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == result["ask"]["answer"].strip()

    # a second run refuses to overwrite, --overwrite replaces only a quickstart folder
    r = cli("quickstart", "--out", out, "--faces", "30")
    assert r.code == 1 and f"output folder is not empty: {out} (choose another --out or pass --overwrite)" in r.err
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("user data")
    r = cli("quickstart", "--out", other, "--overwrite")
    assert r.code == 1 and "has no quickstart.json" in r.err
    assert (other / "keep.txt").read_text() == "user data"


def test_quickstart_config_errors(cli, tmp_path: Path) -> None:
    r = cli("quickstart", "--out", tmp_path / "q", "--faces", "3")
    assert r.code == 1 and "faces: Input should be greater than or equal to 30" in r.err
    assert not (tmp_path / "q").exists()
