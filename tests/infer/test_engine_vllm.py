"""The vLLM engine against the transformers engine on tiny models of two families (InternVL-hf, Qwen2-VL).

Runs only where vLLM imports — CI's second virtual environment (see ``.ci/run``); the main
environment skips this module and tests the missing-extra error instead (test_engine.py).
Each vLLM engine start costs ~30-40 s on CPU, so engines are module-scoped: one per family,
one more with a LoRA adapter from ``facellm finetune``, and one ``facellm ask --engine vllm``.

The models are 256 wide, 4 layers, init std 0.1: greedy answers differ from image to image
(64-wide ones repeat one token and would agree by accident).
"""

from __future__ import annotations

import base64
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; CI runs these tests in its vLLM venv (.ci/run)")

from facellm_cli.config import AskConfig, EvalConfig, GenerationConfig, ModelConfig, ServeConfig  # noqa: E402
from facellm_cli.infer.engine import Engine, TransformersEngine, load_engine  # noqa: E402
from facellm_cli.testing.cli import FACELLM, subprocess_env

pytestmark = pytest.mark.slow
FAMILIES = ("internvl", "qwen2_vl")
QUESTION = "What is the facial expression of the person?"
SIZES = dict(text_hidden=256, vision_hidden=64, layers=4, text_init_std=0.1)


def _vllm_cfg(model: Path, **more: Any) -> ModelConfig:
    return ModelConfig(
        model=str(model), engine="vllm", device="cpu", vllm={"cpu_kv_cache_gb": 1, "max_model_len": 1024}, **more
    )


def _images(folder: Path, n: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = (np.random.RandomState(100 + i).rand(64, 64, 3) * 255).astype("uint8")
        paths.append(folder / f"face_{i:02d}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _images(tmp_path_factory.mktemp("faces"), 16)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from facellm_cli.testing import build_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {f: build_tiny_model(root / f, f, **SIZES) for f in FAMILIES}


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request: pytest.FixtureRequest, models: dict[str, Path]) -> Any:
    """(family, vLLM engine, transformers engine) — one vLLM start per family for every test below."""
    family = request.param
    vllm_engine = load_engine(_vllm_cfg(models[family]))
    hf = load_engine(ModelConfig(model=str(models[family]), device="cpu"))
    yield family, vllm_engine, hf
    vllm_engine.close()


def _same(text: str | None) -> str:
    """Text as compared across engines: an answer cut inside a multi-byte character ends in U+FFFD when
    transformers decodes its tokens, while vLLM's incremental detokenizer holds those bytes back."""
    return (text or "").rstrip("\ufffd").strip()


def _answers(engine: Engine, paths: list[Path], batch_size: int, max_new_tokens: int = 8) -> list[str]:
    from facellm_cli.infer.ask import ask_many

    cfg = AskConfig(batch_size=batch_size, generation=GenerationConfig(max_new_tokens=max_new_tokens))
    return [_same(r.answer) for r in ask_many(engine, cfg, [str(p) for p in paths], QUESTION)]


def test_ask_greedy_answers_match_transformers(pair: Any, images: list[Path]) -> None:
    family, vl, hf = pair
    assert vl.kind == "vllm" and isinstance(hf, TransformersEngine)
    one_v = _answers(vl, images[:2], batch_size=1)
    one_h = _answers(hf, images[:2], batch_size=1)
    assert one_v == one_h, family
    many_v = _answers(vl, images, batch_size=16)
    many_h = _answers(hf, images, batch_size=16)
    same = sum(a == b for a, b in zip(many_v, many_h, strict=True))
    assert same >= 0.9 * len(images), (family, same, list(zip(many_v, many_h, strict=True)))
    assert len(set(many_h)) > 1, "the tiny model answers every image alike; the comparison would prove nothing"


def test_stream_gives_the_generated_answer(pair: Any, images: list[Path]) -> None:
    from facellm_cli.infer.ask import ask_stream

    family, vl, hf = pair
    cfg = AskConfig(generation=GenerationConfig(max_new_tokens=8))
    pieces = list(ask_stream(vl, cfg, str(images[3]), QUESTION))
    assert _same("".join(pieces)) == _answers(hf, [images[3]], 1)[0], family
    assert all(pieces)


def _mcq_set(folder: Path, images: list[Path]) -> Path:
    options = ["smiling", "neutral", "frowning", "surprised"]
    lines = []
    for i, img in enumerate(images[:8]):
        q = {"id": f"q{i}", "images": [str(img)], "question": QUESTION, "options": options, "answer": "ABCD"[i % 4]}
        if i % 3 == 0:
            q["images"].append(str(images[(i + 5) % len(images)]))  # some multi-image questions, as in FaceXBench
        lines.append(json.dumps(q))
    path = folder / "mcq.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("mode", ["generate", "likelihood"])
def test_evaluate_matches_transformers(pair: Any, images: list[Path], tmp_path: Path, mode: str) -> None:
    from facellm_cli.eval.runner import evaluate

    family, vl, hf = pair
    data = _mcq_set(tmp_path, images)
    preds = {}
    for name, engine in (("vllm", vl), ("transformers", hf)):
        cfg = EvalConfig(
            data=str(data),
            mode=mode,
            batch_size=8,
            out=str(tmp_path / name),
            model={"model": engine.name, "engine": engine.kind},
            generation={"max_new_tokens": 8},
        )
        outcome = evaluate(cfg, lm=engine)
        assert outcome.asked == 8
        rows = [json.loads(line) for line in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
        preds[name] = {r["id"]: r for r in rows}
    run = json.loads((tmp_path / "vllm" / "run.json").read_text())
    assert (
        run["setup"]["engine"] == "vllm"
        and "engine" not in json.loads((tmp_path / "transformers" / "run.json").read_text())["setup"]
    )
    v, h = preds["vllm"], preds["transformers"]
    if mode == "likelihood":
        for qid in h:
            assert v[qid]["prediction"] == h[qid]["prediction"], (family, qid, v[qid]["scores"], h[qid]["scores"])
            assert v[qid]["scores"] == pytest.approx(h[qid]["scores"], abs=5e-3), (family, qid)
    else:
        same = sum(_same(v[q]["raw"]) == _same(h[q]["raw"]) for q in h)
        assert same >= 0.9 * len(h) - 1e-9, (family, [(v[q]["raw"], h[q]["raw"]) for q in h])


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_serve_keeps_the_api_surface_over_vllm(pair: Any, images: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    from facellm_cli.serve.app import background_server

    family, vl, hf = pair
    monkeypatch.setenv("FACELLM_TEST_KEY", "s3cret")
    cfg = ServeConfig(model=_vllm_cfg(Path(vl.name)), api_key_env="FACELLM_TEST_KEY", max_tokens_limit=64)
    expected = [_answers(hf, [p], 1, max_new_tokens=8)[0] for p in images[:8]]

    def body(i: int, **more: Any) -> dict[str, Any]:
        content = [
            {"type": "image_url", "image_url": {"url": _data_uri(images[i])}},
            {"type": "text", "text": QUESTION},
        ]
        return {"model": "any", "messages": [{"role": "user", "content": content}], "max_tokens": 8, **more}

    with background_server(cfg, vl, api_key="s3cret") as (url, _app):
        auth = {"Authorization": "Bearer s3cret"}
        with httpx.Client(timeout=120) as client:
            r = client.post(f"{url}/chat/completions", json=body(0))
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = client.post(f"{url}/chat/completions", json=body(0, max_tokens=1000), headers=auth)
            assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
            r = client.post(f"{url}/chat/completions", json={"model": "x", "messages": "hi"}, headers=auth)
            assert r.status_code == 400 and "error" in r.json()

            r = client.post(f"{url}/chat/completions", json=body(0), headers=auth)
            assert r.status_code == 200, r.text
            out = r.json()
            assert _same(out["choices"][0]["message"]["content"]) == expected[0], family
            assert out["usage"]["completion_tokens"] > 0 and out["usage"]["prompt_tokens"] > 0

            text = ""
            with client.stream("POST", f"{url}/chat/completions", json=body(1, stream=True), headers=auth) as s:
                assert s.status_code == 200
                for line in s.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        delta = json.loads(line[6:])["choices"][0]["delta"]
                        text += delta.get("content") or ""
            assert _same(text) == expected[1], family

            def ask(i: int) -> str:
                r = client.post(f"{url}/chat/completions", json=body(i), headers=auth)
                assert r.status_code == 200, r.text
                return _same(r.json()["choices"][0]["message"]["content"])

            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(ask, range(8)))
            same = sum(a == b for a, b in zip(answers, expected, strict=True))
            assert same >= 7, (family, answers, expected)  # concurrent rows batch together (>= 90% as at batch 16)
            health = client.get(f"{url.removesuffix('/v1')}/health").json()
            assert health["batcher"]["engine"] == "vllm" and health["batcher"]["max_in_flight_seen"] > 1


@pytest.fixture(scope="module")
def adapter(models: dict[str, Path], images: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter trained by ``facellm finetune`` on the tiny InternVL (a few steps, high learning rate)."""
    from facellm_cli.config import FinetuneConfig
    from facellm_cli.train.finetune import finetune

    root = tmp_path_factory.mktemp("lora")
    records = [
        {
            "messages": [
                {"role": "user", "content": "<image>\n" + QUESTION},
                {"role": "assistant", "content": "The person is smiling."},
            ],
            "images": [str(p)],
        }
        for p in images[:8]
    ]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = FinetuneConfig(
        model={"model": str(models["internvl"]), "device": "cpu"},
        data={"train": str(data)},
        lora={"r": 8, "alpha": 16},
        train={"learning_rate": 2e-2, "batch_size": 4, "max_steps": 4, "logging_steps": 1, "save_steps": 100},
        output_dir=str(root / "run"),
    )
    finetune(cfg)
    return root / "run"


def test_lora_adapter_from_finetune_is_applied(models: dict[str, Path], adapter: Path, images: list[Path]) -> None:
    base = load_engine(ModelConfig(model=str(models["internvl"]), device="cpu"))
    hf = load_engine(ModelConfig(model=str(models["internvl"]), adapter=str(adapter), device="cpu"))
    with_adapter = _answers(hf, images[:4], 1)
    assert with_adapter != _answers(base, images[:4], 1), "the adapter changes nothing; the test would prove nothing"
    vl = load_engine(_vllm_cfg(models["internvl"], adapter=str(adapter)))
    try:
        assert _answers(vl, images[:4], 1) == with_adapter
    finally:
        vl.close()


def test_ask_cli_with_engine_vllm(models: dict[str, Path], images: list[Path]) -> None:
    hf = load_engine(ModelConfig(model=str(models["qwen2_vl"]), device="cpu"))
    expected = _answers(hf, [images[5]], 1)[0]
    env = subprocess_env()
    cmd = [*FACELLM, "ask", "--model", str(models["qwen2_vl"]), "--engine", "vllm"]
    cmd += ["--max-new-tokens", "8", "--set", "model.vllm.cpu_kv_cache_gb=1", str(images[5]), QUESTION]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _same(r.stdout) == expected


def test_a_checkpoint_without_video_config_still_loads_with_torchvision(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """Checkpoints saved image-only (facellm before complete processors) load where torchvision imports."""
    import shutil

    from facellm_cli.models.loader import load_model_and_processor, torchvision_available

    assert torchvision_available()
    old = tmp_path / "old"
    shutil.copytree(models["internvl"], old)
    (old / "video_preprocessor_config.json").unlink()
    lm = load_model_and_processor(ModelConfig(model=str(old), device="cpu"))
    assert lm.image_only_processor
    full = load_model_and_processor(ModelConfig(model=str(models["internvl"]), device="cpu"))
    assert not full.image_only_processor and full.processor.video_processor is not None
