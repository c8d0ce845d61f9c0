"""torch threads on CPU (usable cores, busy neighbours, --threads) and the library warnings kept off stderr."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from facellm_cli import runtime
from facellm_cli.runtime import choose_threads
from facellm_cli.testing.cli import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test decides threads anew, and torch gets its count back afterwards."""
    import torch

    before = torch.get_num_threads()
    monkeypatch.setattr(runtime, "_DECIDED", None)
    yield
    torch.set_num_threads(before)


def test_default_is_the_usable_cores_that_other_work_leaves_idle() -> None:
    assert choose_threads(None, current=8, usable=8, idle=7.9).threads == 8
    quiet = choose_threads(None, current=8, usable=8, idle=7.9)
    assert quiet.note is None
    busy = choose_threads(None, current=2, usable=2, idle=0.1)  # two neighbours keep both cores busy
    assert busy.threads == 1
    assert busy.note == (
        "1.9 of 2 CPU core(s) are busy with other work: using 1 torch thread(s) instead of 2 so they do not wait "
        "on each other (--threads to choose)"
    )
    # an affinity mask or quota smaller than torch's own count (e.g. OMP_NUM_THREADS=16 in a 2-CPU container)
    capped = choose_threads(None, current=16, usable=2, idle=None)
    assert capped.threads == 2 and "torch was set to 16 threads" in (capped.note or "")
    assert choose_threads(None, current=1, usable=4, idle=4.0).threads == 1  # OMP_NUM_THREADS=1 is kept


def test_explicit_threads_win_and_too_many_are_named() -> None:
    assert choose_threads(3, current=1, usable=4, idle=0.0).threads == 3
    over = choose_threads(16, current=2, usable=2, idle=2.0)
    assert over.threads == 16
    assert over.note == (
        "--threads 16 is more than the 2 CPU core(s) this process may use; torch's threads will wait on each "
        "other and run slower: use --threads 2 or fewer"
    )


def test_busy_neighbours_are_measured(fresh_threads: None) -> None:
    """Real CPU burners on every usable core: the measured idle capacity drops and torch gets one thread."""
    import torch

    usable = runtime.usable_cores()
    n = min(usable, 8)  # enough to show the effect on a big machine without starting dozens
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5)  # let them get scheduled
        idle = runtime.idle_cores()
        assert idle is not None and idle < usable - n / 2
        torch.set_num_threads(usable)
        choice = runtime.configure_threads()
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert choice.usable == usable
    if usable > 1:
        assert choice.threads < usable and torch.get_num_threads() == choice.threads
        assert "busy with other work" in (choice.note or "")


def test_threads_flag_sets_torch_and_says_once_when_too_many(
    fresh_threads: None,
    tiny_internvl: Path,
    tmp_path: Path,
    cli,
) -> None:
    import torch
    from PIL import Image

    image = tmp_path / "face.png"
    Image.new("RGB", (48, 48), (200, 150, 120)).save(image)
    many = runtime.usable_cores() + 2
    r = cli("ask", "--model", tiny_internvl, image, "q", "--max-new-tokens", "1", "--threads", many)
    assert r.code == 0, r.err
    assert torch.get_num_threads() == many
    assert r.err.count(f"--threads {many} is more than the") == 1
    r = cli("ask", "--model", tiny_internvl, image, "q", "--max-new-tokens", "1", "--threads", "1")
    assert r.code == 0 and torch.get_num_threads() == 1 and "note:" not in r.err


_TRIGGER = """
import logging, warnings
warnings.simplefilter("default")
from facellm_cli.cli import quiet_libraries
quiet_libraries()
import bitsandbytes  # logs the kernels-community line on CPUs with AVX512-BF16
from transformers import Qwen2Config, Qwen2ForCausalLM
m = Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
m.is_gradient_checkpointing  # peft reads this deprecated property during qlora preparation
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another bitsandbytes warning stays visible")
warnings.warn("an unrelated FutureWarning stays visible", FutureWarning)
"""


@pytest.mark.slow  # two fresh interpreters importing torch, transformers and bitsandbytes
def test_known_harmless_library_warnings_are_silent_unless_debugging() -> None:
    pytest.importorskip("bitsandbytes")
    env = subprocess_env()
    quiet = subprocess.run([sys.executable, "-c", _TRIGGER], env=env, capture_output=True, text=True)
    debug = subprocess.run(
        [sys.executable, "-c", _TRIGGER], env={**env, "FACELLM_DEBUG": "1"}, capture_output=True, text=True
    )
    assert quiet.returncode == 0 and debug.returncode == 0, quiet.stderr + debug.stderr
    assert "is_gradient_checkpointing` is deprecated" in debug.stderr
    assert "is_gradient_checkpointing` is deprecated" not in quiet.stderr
    if "Failed to load CPU gemm_4bit_forward" in debug.stderr:  # only CPUs with AVX512-BF16 log it
        assert "Failed to load CPU gemm_4bit_forward" not in quiet.stderr
    for kept in ("another bitsandbytes warning stays visible", "an unrelated FutureWarning stays visible"):
        assert kept in quiet.stderr and kept in debug.stderr
