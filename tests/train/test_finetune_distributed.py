"""finetune under ``accelerate launch --num_processes 2`` on CPU (gloo): the DDP group forms, the two ranks
train on disjoint shards of each global batch, one output is written, and it equals a single-process run
with the same global batch (within float tolerance)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from facellm_cli.testing.cli import subprocess_env
from facellm_cli.testing.records import describe_records, face_rows, write_jsonl

pytestmark = pytest.mark.slow


def _config(path: Path, model: Path, data: Path, out: Path, batch_size: int) -> Path:
    cfg = {
        "model": {"model": str(model), "device": "cpu"},
        "method": "lora",
        "data": {"train": str(data)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {
            "learning_rate": 1e-2,
            "batch_size": batch_size,
            "max_steps": 2,
            "logging_steps": 1,
            "save_steps": None,
            "eval_steps": None,
            "seed": 3,
        },
        "out": str(out),
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cmd: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    env = subprocess_env(OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=900)


def test_two_processes_train_disjoint_shards_into_one_output_equal_to_one_process(
    tmp_path: Path, tiny_internvl: Path
) -> None:
    from safetensors.torch import load_file

    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    rows = face_rows(tmp_path / "faces", 8)
    data = write_jsonl(tmp_path / "faces" / "train.jsonl", describe_records(rows))

    one = tmp_path / "one"
    r1 = _run(
        [
            sys.executable,
            "-m",
            "facellm_cli",
            "finetune",
            "--config",
            str(_config(tmp_path / "1.yaml", tiny_internvl, data, one, 4)),
        ],
        tmp_path,
    )
    assert r1.returncode == 0, r1.stderr[-3000:]

    two = tmp_path / "two"
    # --multi_gpu selects accelerate's multi-process launcher (torchrun); with no GPU, finetune asks for gloo
    launch = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
    ]
    launch += ["--dynamo_backend", "no", "-m", "facellm_cli", "finetune"]
    r2 = _run([*launch, "--config", str(_config(tmp_path / "2.yaml", tiny_internvl, data, two, 2))], tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]

    # one output, written once (by the main process)
    assert (two / "adapter_model.safetensors").is_file() and (two / "summary.json").is_file()
    assert json.loads((two / "summary.json").read_text())["global_step"] == 2

    # each step: two ranks, disjoint shards, together the single process's global batch
    steps_two = [json.loads(x) for x in (two / "samples.jsonl").read_text().splitlines()]
    steps_one = [json.loads(x) for x in (one / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps_two] == [1, 2] == [s["step"] for s in steps_one]
    for s2, s1 in zip(steps_two, steps_one, strict=True):
        assert "rank_ids" in s2, (s2, r2.stderr[-2000:])  # the two ranks formed one DDP group
        rank0, rank1 = s2["rank_ids"]
        assert len(rank0) == len(rank1) == 2 and not set(rank0) & set(rank1)
        assert sorted(rank0 + rank1) == sorted(s1["ids"])
    seen = [i for s in steps_two for i in s["ids"]]
    assert len(seen) == len(set(seen)) == 8  # every sample once over the two steps

    # the same update as one process with the same global batch
    a, b = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    moved = [k for k in a if "lora_B" in k and a[k].abs().sum() > 0]
    assert moved, "training did not move the adapter; the comparison would prove nothing"
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-4 + 1e-3 * a[k].abs().max(), k
