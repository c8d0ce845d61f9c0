"""finetune when the world fails: a full disk, a read-only folder, a model that does not load."""

from __future__ import annotations

import errno
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from facellm_cli.testing.records import describe_records, face_rows, write_jsonl


@pytest.fixture(scope="module")
def face_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ftfail") / "faces"
    return write_jsonl(folder / "train.jsonl", describe_records(face_rows(folder, 6)))


def _config(path: Path, model: Path | str, data: Path, out: Path, **train: object) -> Path:
    cfg = {
        "model": {"model": str(model), "device": "cpu"},
        "method": "full",
        "data": {"train": str(data)},
        "train": {"batch_size": 2, "max_steps": 6, "save_steps": 2, "logging_steps": 1, "seed": 3, **train},
        "out": str(out),
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


class SmallDisk:
    """A real tmpfs of a chosen size (mounting needs root, as in CI containers; elsewhere the test skips)."""

    def __init__(self, where: Path) -> None:
        self.where = where

    def mount(self, options: str) -> None:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(self.where)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip() or 'not root'})")

    def remount(self, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.where)], check=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    where = tmp_path / "disk"
    where.mkdir()
    disk = SmallDisk(where)
    yield disk
    subprocess.run(["umount", str(where)], capture_output=True)


@pytest.mark.slow  # two short full fine-tuning runs
def test_disk_full_during_a_checkpoint_then_resume(
    small_disk: SmallDisk,
    tmp_path: Path,
    face_data: Path,
    tiny_internvl: Path,
    cli,
) -> None:
    # room for one checkpoint of the tiny model (weights 0.6 MB + Adam state 0.9 MB) but not for two
    small_disk.mount("size=2000k")
    out = small_disk.where / "run"
    config = _config(tmp_path / "run.yaml", tiny_internvl, face_data, out)
    r = cli("finetune", "--config", config)
    assert r.code == 1
    assert r.err.count("error:") == 1 and "Traceback" not in r.err
    assert (
        f"error: cannot write to {out}: no space left on device; free some space, then run again with --resume: "
        "it continues from the last complete checkpoint (checkpoint-2)"
    ) in " ".join(r.err.split())
    small_disk.remount("size=8m")  # space freed
    r = cli("finetune", "--config", config, "--resume", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["global_step"] == 6 and "removing incomplete checkpoint checkpoint-4" in r.err


def test_read_only_output_folder_is_refused_before_the_model_loads(
    small_disk: SmallDisk,
    tmp_path: Path,
    face_data: Path,
    tiny_internvl: Path,
    cli,
) -> None:
    small_disk.mount("size=1m,ro")
    config = _config(tmp_path / "run.yaml", tiny_internvl, face_data, small_disk.where / "run")
    r = cli("finetune", "--config", config)
    assert r.code == 1
    assert (f"out: cannot write to {small_disk.where} (read-only or no permission); choose another --out") in " ".join(
        r.err.split()
    )


def test_write_failures_are_named_with_their_cause_and_the_way_on(tmp_path: Path) -> None:
    """The errors the OS, torch's zip writer and safetensors raise when a save fails, each as one line."""
    from safetensors import SafetensorError

    from facellm_cli.train.finetune import write_failure

    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (out / "checkpoint-4").mkdir()  # torn: no trainer_state.json
    resume = "then run again with --resume: it continues from the last complete checkpoint (checkpoint-2)"
    cases = {
        OSError(errno.ENOSPC, "No space left on device"): "no space left on device; free some space, " + resume,
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 578560 vs 578448"): (
            "a write stopped short, the disk is probably full ("
        ),
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"): (
            "no space left on device"
        ),
        OSError(errno.EROFS, "Read-only file system"): (
            "read-only file system; make it writable or choose another --out, " + resume
        ),
    }
    for err, expected in cases.items():
        msg = str(write_failure(out, err))
        assert msg.startswith(f"cannot write to {out}: {expected}"), msg
        assert msg.endswith(resume), msg
    assert write_failure(out, RuntimeError("CUDA out of memory")) is None
    fresh = tmp_path / "fresh"
    assert str(write_failure(fresh, OSError(errno.ENOSPC, "No space left on device"))).endswith(
        "run again with --overwrite (no checkpoint was completed, so --resume has none to continue)"
    )


@pytest.mark.slow  # trains
def test_a_run_whose_model_does_not_load_leaves_nothing_that_blocks_the_next(
    tmp_path: Path,
    face_data: Path,
    tiny_internvl: Path,
    cli,
) -> None:
    out = tmp_path / "run"
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    r = cli("finetune", "--config", _config(tmp_path / "bad.yaml", broken, face_data, out))
    assert r.code == 1 and "config.json is not valid JSON" in r.err
    assert not out.exists() or not any(out.iterdir())
    # a folder an older version left holding only its config is not "not empty" either
    out.mkdir(exist_ok=True)
    (out / "finetune_config.yaml").write_text("method: full\n")
    r = cli("finetune", "--config", _config(tmp_path / "good.yaml", tiny_internvl, face_data, out), "--max-steps", "1")
    assert r.code == 0, r.err
