"""The README's "real workflow" runs as written, in order, each command reading what the one before wrote.

The test takes every ``bash`` block of that section (annotate -> build-dataset ->
finetune -> merge -> evaluate -> compare -> ask -> serve) and the ``python``
client block, and runs them in a temp folder with three substitutions, listed
below for anyone reading a failure: a tiny local model for the hub model,
synthetic faces laid out as FairFace for the real images, and the offline
template provider for the paid endpoint. Lines that need a GPU, the internet or
a released checkpoint are skipped with the reason. A README command that stops
working (a renamed flag, a path the next step does not find) fails here.
"""

from __future__ import annotations

import base64
import csv
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = "{tiny}"
# Few, small training steps on CPU instead of the paper's schedule.
TINY_TRAIN = (
    f"--model {TINY} --max-steps 2 --set model.dtype=float32 --set train.precision=fp32 "
    "--set train.batch_size=2 --set train.grad_accumulation=1 --set train.save_steps=1 --set train.logging_steps=1"
)

# (text in the README, what runs instead, why) — applied to every line, in this order.
SUBSTITUTIONS: list[tuple[str, str, str]] = [
    ("facellm annotate ", "facellm annotate --provider template ", "paid endpoint -> offline template provider"),
    ("--config examples/facellm-1b-lora.yaml", f"--config examples/facellm-1b-lora.yaml {TINY_TRAIN}", "tiny run"),
    ("OpenGVLab/InternVL3-1B-hf", TINY, "hub model -> tiny random InternVL built locally"),
]
# Lines containing one of these are not run.
SKIPPED: dict[str, str] = {
    "export OPENAI_API_KEY": "the template provider needs no key",
    "facellm-8b-qlora-consumer.yaml": "QLoRA needs a GPU and bitsandbytes",
    "accelerate launch": "several GPUs",
    "git clone": "needs the internet (FaceXBench runs are tested in tests/eval/test_eval.py)",
    "--data-dir facexbench": "needs the FaceXBench download (tested in tests/eval/test_eval.py)",
    "--quantization 4bit": "4-bit needs bitsandbytes and a GPU",
    "facellm ask fairface/val/1.jpg": "the released FaceLLM-1B from the hub",
    "FACELLM_KEY=...": "a variant of the serve line before it (keys are tested in tests/serve/test_serve.py)",
    "examples/serve.yaml": "the released FaceLLM-1B from the hub",
}
# Synthetic FairFace: images at fairface/{train,val}/N.jpg, labels with FairFace's columns and vocabulary.
N_TRAIN, N_VAL = 24, 3
AGES, GENDERS, RACES = ("3-9", "20-29", "50-59"), ("Male", "Female"), ("White", "Black", "East Asian")


def workflow_blocks(readme: str) -> list[tuple[str, str]]:
    """(language, code) of the fenced blocks in the numbered steps ("### 1. ...") of "## The real workflow".

    Other subsections there (faces in real photos) are their own workflow, tested in tests/test_faces.py.
    """
    start = readme.index("## The real workflow")
    end = readme.index("\n## ", start + 1)
    steps = [part for part in readme[start:end].split("\n### ")[1:] if re.match(r"\d+\.", part)]
    return [b for part in steps for b in re.findall(r"```(bash|python)\n(.*?)```", part, flags=re.S)]


def commands(code: str) -> list[str]:
    """Lines of a bash block, backslash continuations joined, trailing ``# comments`` dropped."""
    lines = [re.sub(r"\s+#\s.*$", "", line).strip() for line in code.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line]


def substitute(line: str, values: dict[str, str]) -> str:
    for old, new, _ in SUBSTITUTIONS:
        line = line.replace(old, new)
    for key, value in values.items():
        line = line.replace("{" + key + "}", value)
    return line


def fake_fairface(folder: Path) -> None:
    from PIL import Image

    from facellm_cli.synth import synth_faces

    raw = synth_faces(folder / "raw-faces", N_TRAIN + N_VAL, seed=0, size=64)
    pngs = sorted(raw.out_dir.glob("*.png"))
    rows = []
    for i, png in enumerate(pngs):
        split, n = ("train", i + 1) if i < N_TRAIN else ("val", i - N_TRAIN + 1)
        dest = folder / "fairface" / split / f"{n}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.open(png).convert("RGB").save(dest, quality=95)
        if split == "train":
            rows.append([f"train/{n}.jpg", AGES[i % 3], GENDERS[i % 2], RACES[(i // 2) % 3], "True"])
    shutil.rmtree(raw.out_dir)
    with open(folder / "fairface_label_train.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "age", "gender", "race", "service_test"])
        w.writerows(rows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_line(line: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def wait_healthy(url: str, proc: subprocess.Popen[str]) -> None:
    """Until /health answers (or the server exits); a generous deadline only against a hang."""
    deadline = time.monotonic() + 600
    while proc.poll() is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"serve did not answer {url} within 600 s (model load on a busy machine?)")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"serve exited with {proc.returncode} before /health answered")


def test_workflow_blocks_are_found() -> None:
    blocks = workflow_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    lines = [c for lang, code in blocks if lang == "bash" for c in commands(code)]
    verbs = [ln.split()[1] for ln in lines if ln.startswith("facellm ")]
    for verb in ("annotate", "build-dataset", "finetune", "evaluate", "ask", "serve"):
        assert verb in verbs, f"the README workflow lost its '{verb}' step"
    assert any("--compare" in ln for ln in lines)
    assert any(lang == "python" for lang, _ in blocks)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_readme_workflow_runs_in_order(tmp_path: Path, tiny_internvl: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(ROOT / "examples", work / "examples")
    fake_fairface(work)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    port = free_port()
    values = {"tiny": str(tiny_internvl)}
    blocks = workflow_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    ran: list[str] = []
    server: subprocess.Popen[str] | None = None
    try:
        for lang, code in blocks:
            if lang == "python":
                if server is None:
                    continue
                img = base64.b64encode((work / "fairface/val/1.jpg").read_bytes()).decode()
                code = code.replace("data:image/jpeg;base64,...", f"data:image/jpeg;base64,{img}")
                code = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
                code = code.replace("client.chat.completions.create(", "reply = client.chat.completions.create(", 1)
                scope: dict[str, object] = {}
                exec(compile(code, "README.md python block", "exec"), scope)  # noqa: S102 - the README's own code
                reply = scope["reply"]
                assert reply.choices[0].message.content is not None  # type: ignore[attr-defined]
                ran.append("python client block")
                continue
            for line in commands(code):
                if any(key in line for key in SKIPPED):
                    continue
                cmd = substitute(line, values)
                if cmd.startswith("facellm serve"):
                    if server is not None:
                        continue
                    server = subprocess.Popen(
                        ["bash", "-c", f"exec {cmd} --port {port}"],
                        cwd=work,
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                    wait_healthy(f"http://127.0.0.1:{port}/health", server)
                    ran.append(line)
                    continue
                res = run_line(cmd, work, env)
                assert res.returncode == 0, f"README line failed:\n  {line}\nran as:\n  {cmd}\nstderr:\n{res.stderr}"
                ran.append(line)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    verbs = {ln.split()[1] for ln in ran if ln.startswith("facellm ")}
    assert {"annotate", "build-dataset", "finetune", "evaluate", "ask", "serve"} <= verbs
    assert "python client block" in ran
    # Each step consumed what the one before wrote.
    assert (work / "data/fairfacegpt/facellm_dataset.json").is_file()
    assert (work / "runs/facellm-1b-lora/adapter_model.safetensors").is_file()
    assert (work / "runs/facellm-1b-merged/config.json").is_file()
    for run in ("eval-base", "eval-lora"):
        assert (work / "runs" / run / "results.json").is_file()
    assert (work / "runs/comparison.png").is_file()
