from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from facellm_cli.testing.cli import FACELLM, subprocess_env
from facellm_cli.testing.files import write_image


@pytest.fixture
def faces(tmp_path: Path) -> list[Path]:
    colours = [(200, 150, 120), (90, 60, 40), (240, 210, 190)]
    return [write_image(tmp_path / f"face{i}.png", c, (48 + 8 * i, 64)) for i, c in enumerate(colours)]


@pytest.mark.parametrize("fixture", ["tiny_internvl", "tiny_qwen2_vl"])
def test_ask_single_image_streams_an_answer(
    request: pytest.FixtureRequest, cli, faces: list[Path], fixture: str
) -> None:
    model = request.getfixturevalue(fixture)
    r = cli("ask", "--model", model, faces[0], "what expression is this?", "--max-new-tokens", "4")
    assert r.code == 0, r.err
    assert r.out.endswith("\n")
    assert "error" not in r.err


def test_ask_batch_json_lines(cli, tiny_internvl: Path, faces: list[Path]) -> None:
    r = cli("ask", "--model", tiny_internvl, *faces, "how old?", "--json", "--batch-size", "2", "--max-new-tokens", "3")
    assert r.code == 0, r.err
    rows = [json.loads(line) for line in r.out.splitlines()]
    assert [row["image"] for row in rows] == [str(p) for p in faces]
    for row in rows:
        assert row["question"] == "how old?"
        assert row["model"] == tiny_internvl.name
        assert isinstance(row["answer"], str)
        assert row["tokens"]["prompt"] > 0 and 1 <= row["tokens"]["completion"] <= 3
        assert row["seconds"] >= 0


def test_ask_folder_plain_lines(cli, tiny_qwen2_vl: Path, faces: list[Path]) -> None:
    r = cli("ask", "-m", tiny_qwen2_vl, faces[0].parent, "describe", "--max-new-tokens", "2")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in faces]


def test_ask_corrupt_image_in_batch_answers_the_rest(
    cli, tiny_internvl: Path, faces: list[Path], tmp_path: Path
) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    r = cli("ask", "--model", tiny_internvl, faces[0], bad, faces[1], "q?", "--json", "--max-new-tokens", "2")
    assert r.code == 1
    rows = [json.loads(line) for line in r.out.splitlines()]
    answered = [row["image"] for row in rows if row.get("error") is None]
    assert answered == [str(faces[0]), str(faces[1])]
    assert [row for row in rows if row.get("error")][0]["image"] == str(bad)
    assert f"error: 1 of 3 images could not be read: {bad}" in r.err


def test_ask_missing_image_and_bad_usage(cli, tiny_internvl: Path, tmp_path: Path) -> None:
    r = cli("ask", "--model", tiny_internvl, tmp_path / "gone.png", "q?")
    assert r.code == 1
    assert f"image not found: {tmp_path / 'gone.png'}" in r.err
    r = cli("ask", "only-a-question")
    assert r.code == 2
    r = cli("ask", "--model", tiny_internvl, tmp_path / "x.png", "q", "--quantization", "2bit")
    assert r.code == 1 and "model.quantization: Input should be 'none', '8bit' or '4bit'" in r.err


def test_ask_stdin_through_the_real_console_script(tiny_internvl: Path, faces: list[Path]) -> None:
    env = subprocess_env()
    proc = subprocess.run(
        [
            *FACELLM,
            "ask",
            "--model",
            str(tiny_internvl),
            "-",
            "what?",
            "--json",
            "--max-new-tokens",
            "2",
        ],
        input=faces[0].read_bytes(),
        capture_output=True,
        env=env,  # no deadline: the run ends when the command does (pytest-timeout catches a hang)
    )
    assert proc.returncode == 0, proc.stderr.decode()
    row = json.loads(proc.stdout.decode().strip())
    assert row["image"] == "<stdin>" and row["tokens"]["completion"] >= 1


def test_ask_with_config_file_and_set(cli, tiny_internvl: Path, faces: list[Path], tmp_path: Path) -> None:
    cfg = tmp_path / "ask.yaml"
    cfg.write_text(f"model:\n  model: {tiny_internvl}\ngeneration:\n  max_new_tokens: 50\n")
    r = cli("ask", "--config", cfg, faces[0], faces[1], "q", "--json", "--set", "generation.max_new_tokens=1")
    assert r.code == 0, r.err
    assert all(json.loads(line)["tokens"]["completion"] == 1 for line in r.out.splitlines())


def test_ask_refuses_an_answer_longer_than_the_context(cli, tiny_internvl: Path, faces: list[Path]) -> None:
    """A max_new_tokens the model's context cannot hold is an error before any decoding, not hours of it."""
    for images in ([faces[0]], faces[:2]):  # the streaming path and the batch path
        r = cli("ask", "--model", tiny_internvl, *images, "q", "--set", "generation.max_new_tokens=1000000000")
        assert r.code == 1
        assert (
            "generation.max_new_tokens: 1,000,000,000 does not fit the model's context of 2,048 tokens "
            "(prompt and answer share it); use --max-new-tokens below 2,048"
        ) in r.err
        assert r.out == ""
