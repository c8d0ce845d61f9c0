"""kill -9 in the middle of a run, then --resume: same total steps, same data order, same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from finetune_helpers import describe_records, face_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


def _config(tmp: Path, model: Path, data: Path, out: Path) -> Path:
    cfg = {
        "model": {"model": str(model), "device": "cpu"},
        "method": "lora",
        "data": {"train": str(data)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},  # dropout: RNG state must be restored too
        "train": {
            "learning_rate": 5e-3,
            "batch_size": 2,
            "max_steps": STEPS,
            "logging_steps": 1,
            "save_steps": 3,
            "save_total_limit": 3,
            "seed": 7,
        },
        "output_dir": str(out),
    }
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _facellm(*args: object) -> list[str]:
    return [sys.executable, "-m", "facellm_cli", *(str(a) for a in args)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # three training runs, two of them in fresh processes
@pytest.mark.timeout(600)
def test_killed_run_resumes_to_the_same_end(tmp_path: Path, tiny_internvl: Path) -> None:
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "faces"
    data = write_jsonl(folder / "train.jsonl", describe_records(face_rows(folder, 10)))  # 5 steps per epoch

    from facellm_cli.config import FinetuneConfig, resolve_config
    from facellm_cli.train.finetune import finetune

    ref = tmp_path / "ref"
    assert finetune(resolve_config(FinetuneConfig, _config(tmp_path, tiny_internvl, data, ref))).global_step == STEPS

    out = tmp_path / "killed"
    config = _config(tmp_path, tiny_internvl, data, out)
    proc = subprocess.Popen(
        _facellm("finetune", "--config", config), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 200
    try:
        while not (out / "checkpoint-6" / "trainer_state.json").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()  # it really died mid-run
    killed_at = max(r["step"] for r in _steps(out / "samples.jsonl"))
    assert 6 <= killed_at < STEPS

    resumed = subprocess.run(
        _facellm("finetune", "--config", config, "--resume", "--json"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["global_step"] == STEPS
    assert Path(summary["resumed_from"]).name in ("checkpoint-6", "checkpoint-9")
    assert "resuming from" in resumed.stderr

    # the same samples in the same order at every step, across the epoch boundaries
    assert _steps(out / "samples.jsonl") == _steps(ref / "samples.jsonl")
    assert [m["step"] for m in _steps(out / "metrics.jsonl") if "loss" in m] == list(range(1, STEPS + 1))
    # optimiser, scheduler and RNG state restored: the result matches the uninterrupted run
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(ref / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_resume_refuses_a_changed_config(tmp_path: Path, tiny_internvl: Path, cli) -> None:  # noqa: ANN001
    folder = tmp_path / "faces"
    data = write_jsonl(folder / "train.jsonl", describe_records(face_rows(folder, 4)))
    out = tmp_path / "run"
    config = _config(tmp_path, tiny_internvl, data, out)
    r = cli("finetune", "--config", config, "--max-steps", "3")
    assert r.code == 0, r.err
    r = cli("finetune", "--config", config, "--resume", "--set", "train.learning_rate=0.1", "--max-steps", "4")
    assert r.code == 1 and "resume: settings differ from the run being resumed (train.learning_rate)" in r.err
    r = cli("finetune", "--config", config, "--resume-from", "checkpoint-3", "--max-steps", "4", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["global_step"] == 4
