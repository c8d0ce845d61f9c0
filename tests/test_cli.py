"""Every registered command answers --help, and the top-level help lists only them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command

from facellm_cli.cli import app


def _commands(group, prefix=()):
    for name, cmd in getattr(group, "commands", {}).items():
        yield (*prefix, name)
        yield from _commands(cmd, (*prefix, name))


ALL = sorted(_commands(get_command(app)))


@pytest.mark.parametrize("path", ALL, ids=[" ".join(p) for p in ALL])
def test_every_command_has_help(cli, path: tuple[str, ...]) -> None:
    r = cli(*path, "--help")
    assert r.code == 0
    assert "Usage:" in r.out


def test_top_level_help_does_not_import_torch() -> None:
    src = Path(__file__).parents[1] / "src"
    code = "import sys; from facellm_cli.cli import run; run(['--help']) ; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(src)})
    assert out.stdout.strip().splitlines()[-1] == "False"
    assert "ask" in out.stdout and "dev" in out.stdout


def test_version(cli) -> None:
    r = cli("--version")
    assert r.code == 0 and r.out.startswith("facellm ")


def test_dev_tiny_model_command(cli, tmp_path: Path) -> None:
    out = tmp_path / "m"
    r = cli("dev", "tiny-model", out, "--family", "qwen2_vl")
    assert r.code == 0, r.err
    assert r.out.strip() == str(out)
    assert (out / "model.safetensors").is_file() and (out / "processor_config.json").is_file()
    r = cli("dev", "tiny-model", out)
    assert r.code == 1 and f"output folder is not empty: {out} (choose another or pass --overwrite)" in r.err
    r = cli("dev", "tiny-model", tmp_path / "x", "--family", "gpt2")
    assert r.code == 1 and "unknown tiny-model family 'gpt2'; choose one of: internvl, qwen2_vl" in r.err
