"""kill -9 in the middle of a run, then --resume: same total steps, same data order, same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from facellm_cli.testing.cli import facellm_cmd, subprocess_env
from facellm_cli.testing.records import describe_records, face_rows, write_jsonl
from facellm_cli.testing.reporter import RecordingReporter

STEPS = 8
WEIGHTS = {"full": "model.safetensors", "lora": "adapter_model.safetensors", "qlora": "adapter_model.safetensors"}


def _config(tmp: Path, model: Path, data: Path, out: Path, method: str = "lora") -> Path:
    cfg = {
        "model": {"model": str(model), "device": "cpu"},
        "method": method,
        "data": {"train": str(data)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},  # dropout: RNG state must be restored too
        "train": {
            "learning_rate": 5e-3,
            "batch_size": 2,
            "max_steps": STEPS,
            "logging_steps": 1,
            "save_steps": 2,
            "save_total_limit": 3,
            "seed": 7,
        },
        "out": str(out),
    }
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _steps(path: Path) -> list[dict]:
    text = path.read_text()
    try:
        return [json.loads(line) for line in text.splitlines()]
    except json.JSONDecodeError as e:
        raise AssertionError(f"{path} is not JSON lines ({e}): {text[-600:]!r}") from None


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("resume") / "faces"
    return write_jsonl(folder / "train.jsonl", describe_records(face_rows(folder, 10)))  # 5 steps per epoch


def _kill_after_first_checkpoint(config: Path, out: Path) -> None:
    """Start ``facellm finetune`` in a fresh process and SIGKILL it once checkpoint-2 is complete.

    (Killing it as soon as trainer_state.json exists found a bug: that file can exist still empty, and such a
    torn checkpoint was taken as the latest complete one.)
    """
    from facellm_cli.train.finetune import checkpoint_complete

    proc = subprocess.Popen(
        facellm_cmd("finetune", "--config", config),
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # no deadline: the wait ends when the checkpoint is complete or the process ends
        while not checkpoint_complete(out / "checkpoint-2"):
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]!r}"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()  # it really died mid-run


@pytest.mark.slow  # per case: one run in-process, one killed in a fresh process, one resume
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("family", ["internvl", "qwen2_vl"])
def test_killed_run_resumes_to_the_same_end(
    family: str, method: str, tmp_path: Path, resume_data: Path, tiny_internvl: Path, tiny_qwen2_vl: Path
) -> None:
    from safetensors.torch import load_file

    from facellm_cli.config import FinetuneConfig, resolve_config
    from facellm_cli.train.finetune import finetune

    model = tiny_internvl if family == "internvl" else tiny_qwen2_vl
    ref = tmp_path / "ref"
    assert (
        finetune(resolve_config(FinetuneConfig, _config(tmp_path, model, resume_data, ref, method))).global_step
        == STEPS
    )

    out = tmp_path / "killed"
    config = _config(tmp_path, model, resume_data, out, method)
    _kill_after_first_checkpoint(config, out)
    # the kill may have torn the last line (the resume repairs it); count the complete ones
    text = (out / "samples.jsonl").read_text()
    complete = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    killed_at = max(json.loads(line)["step"] for line in complete)
    assert 2 <= killed_at < STEPS

    rec = RecordingReporter()
    resumed = finetune(resolve_config(FinetuneConfig, config), resume="latest", reporter=rec)
    logs = [str(c[1]) for c in rec.calls if c[0] == "log"]
    assert resumed.global_step == STEPS
    assert Path(resumed.resumed_from or "").name in ("checkpoint-2", "checkpoint-4", "checkpoint-6")
    assert any(line.startswith("resuming from") for line in logs)
    # The step count starts at the checkpoint's step and reaches the end one step at a time.
    start = rec.calls.index(("stage", "training", STEPS))
    counts = [c[1] for c in rec.calls[start + 1 :] if c[0] == "advance"]
    assert counts[0] == int(Path(resumed.resumed_from or "").name.split("-")[1]) and sum(counts) == STEPS

    # the same samples in the same order at every step, across the epoch boundary
    assert _steps(out / "samples.jsonl") == _steps(ref / "samples.jsonl")
    assert [m["step"] for m in _steps(out / "metrics.jsonl") if "loss" in m] == list(range(1, STEPS + 1))
    # weights, optimiser, scheduler and RNG state restored: the result matches the uninterrupted run
    a, b = load_file(str(out / WEIGHTS[method])), load_file(str(ref / WEIGHTS[method]))
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-4
    base = load_file(str(model / "model.safetensors"))
    if method == "full":  # and training moved them: the comparison is not between two copies of the base
        assert max((b[k].float() - base[k].float()).abs().max().item() for k in b) > 1e-3


@pytest.mark.slow  # trains
def test_a_checkpoint_that_does_not_fit_the_model_is_an_error(
    tmp_path: Path, resume_data: Path, tiny_internvl: Path, tiny_qwen2_vl: Path
) -> None:
    """Weights that match nothing are refused, naming the checkpoint; never a silent start from the base."""
    import shutil

    from facellm_cli.config import FinetuneConfig, resolve_config
    from facellm_cli.train.finetune import CheckpointError, finetune

    qwen = tmp_path / "qwen"
    cfg = resolve_config(
        FinetuneConfig, _config(tmp_path, tiny_qwen2_vl, resume_data, qwen, "full"), {"train.max_steps": 2}
    )
    finetune(cfg)
    out = tmp_path / "internvl"
    config = _config(tmp_path, tiny_internvl, resume_data, out, "full")
    out.mkdir()
    shutil.copytree(qwen / "checkpoint-2", out / "checkpoint-2")
    with pytest.raises(CheckpointError) as e:
        finetune(resolve_config(FinetuneConfig, config), resume="latest")
    msg = str(e.value)
    assert f"checkpoint {out / 'checkpoint-2'} does not match the model being trained" in msg
    assert "weight(s) missing" in msg and "--overwrite" in msg


@pytest.mark.slow  # trains
def test_resume_refuses_a_changed_config(tmp_path: Path, tiny_internvl: Path, cli) -> None:
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


@pytest.mark.slow  # trains
def test_a_truncated_checkpoint_is_an_error_naming_its_file(
    tmp_path: Path, resume_data: Path, tiny_internvl: Path
) -> None:
    from facellm_cli.config import FinetuneConfig, resolve_config
    from facellm_cli.train.finetune import CheckpointError, finetune

    out = tmp_path / "run"
    cfg = resolve_config(
        FinetuneConfig, _config(tmp_path, tiny_internvl, resume_data, out, "full"), {"train.max_steps": 2}
    )
    finetune(cfg)
    weights = out / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError) as e:
        finetune(
            resolve_config(FinetuneConfig, _config(tmp_path, tiny_internvl, resume_data, out, "full")), resume="latest"
        )
    assert str(e.value).startswith(f"checkpoint weights {weights} is corrupt or incomplete (")
    assert str(e.value).endswith("re-download it, or resume from an earlier checkpoint with --resume-from")


@pytest.mark.slow  # trains
def test_a_checkpoint_killed_while_writing_its_state_is_not_resumed_from(
    tmp_path: Path, resume_data: Path, tiny_internvl: Path
) -> None:
    """trainer_state.json is written last; a kill can leave it empty. The checkpoint before it is used instead."""
    from facellm_cli.config import FinetuneConfig, resolve_config
    from facellm_cli.train.finetune import finetune

    out = tmp_path / "run"
    config = _config(tmp_path, tiny_internvl, resume_data, out, "lora")
    finetune(resolve_config(FinetuneConfig, config, {"train.max_steps": 4}))
    (out / "checkpoint-4" / "trainer_state.json").write_text("")  # what the kill left
    rec = RecordingReporter()
    res = finetune(resolve_config(FinetuneConfig, config, {"train.max_steps": 6}), resume="latest", reporter=rec)
    logs = [str(c[1]) for c in rec.calls if c[0] == "log"]
    assert Path(res.resumed_from or "").name == "checkpoint-2" and res.global_step == 6
    assert "removing incomplete checkpoint checkpoint-4 (the previous run stopped while saving it)" in logs


@pytest.mark.slow  # trains
def test_an_adapter_checkpoint_that_does_not_fit_is_an_error(
    tmp_path: Path, resume_data: Path, tiny_internvl: Path
) -> None:
    """LoRA resume goes through PEFT's load_adapter, which only warns about keys it cannot place."""
    from safetensors.torch import load_file, save_file

    from facellm_cli.config import FinetuneConfig, resolve_config
    from facellm_cli.train.finetune import CheckpointError, finetune

    out = tmp_path / "run"
    config = _config(tmp_path, tiny_internvl, resume_data, out, "lora")
    finetune(resolve_config(FinetuneConfig, config, {"train.max_steps": 2}))
    weights = out / "checkpoint-2" / "adapter_model.safetensors"
    renamed = {k.replace("q_proj", "query"): v for k, v in load_file(str(weights)).items()}  # another model's names
    save_file(renamed, str(weights))
    with pytest.raises(CheckpointError) as e:
        finetune(resolve_config(FinetuneConfig, config, {"train.max_steps": 4}), resume="latest")
    msg = str(e.value)
    assert msg.startswith(f"checkpoint {out / 'checkpoint-2'} does not match the model being trained: ")
    assert "weight(s) missing (e.g. " in msg and "q_proj" in msg
