"""finetune end to end on tiny models: LoRA on two families, outputs, CLI, config checks, merge, QLoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from facellm_cli.config import FinetuneConfig, resolve_config
from facellm_cli.errors import ConfigError
from facellm_cli.models.processor_files import has_video_config
from facellm_cli.testing.paths import REPO_ROOT
from facellm_cli.testing.records import describe_records, face_rows, write_jsonl


@pytest.fixture(scope="module")
def face_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ftdata") / "faces"
    rows = face_rows(folder, 8)
    write_jsonl(folder / "eval.jsonl", describe_records(rows[6:]))
    return write_jsonl(folder / "train.jsonl", describe_records(rows[:6]))


def _state(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(model_dir / "model.safetensors")).items()}


def _write_config(path: Path, model: Path, data: Path, out: Path, **train: object) -> Path:
    cfg = {
        "model": {"model": str(model), "device": "cpu"},
        "method": "lora",
        "data": {"train": str(data), "eval": str(data.parent / "eval.jsonl")},
        "lora": {"r": 4, "alpha": 8},
        "train": {
            "learning_rate": 5e-3,
            "batch_size": 2,
            "max_steps": 3,
            "logging_steps": 1,
            "save_steps": 2,
            "eval_steps": 3,
            **train,
        },
        "out": str(out),
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow  # trains
@pytest.mark.parametrize("family", ["internvl", "qwen2_vl"])
def test_lora_trains_adapter_only_and_ask_uses_it(
    family: str,
    tmp_path: Path,
    face_data: Path,
    tiny_internvl: Path,
    tiny_qwen2_vl: Path,
    cli,
) -> None:
    import torch
    from safetensors.torch import load_file

    base = tiny_internvl if family == "internvl" else tiny_qwen2_vl
    before = _state(base)
    out = tmp_path / "run"
    config = _write_config(tmp_path / "run.yaml", base, face_data, out)
    r = cli("finetune", "--config", config, "--json")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["global_step"] == 3 and summary["method"] == "lora"
    assert summary["peak_memory_bytes"] > 0 and summary["samples_per_second"] > 0
    assert summary["final_eval_loss"] is not None and summary["final_train_loss"] is not None
    assert "done: 3 steps" in r.err and "peak memory" in r.err

    # outputs a person and the other commands rely on
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "finetune_config.yaml",
        "metrics.jsonl",
        "samples.jsonl",
        "trainer_state.json",
        "loss.png",
        "summary.json",
        "checkpoint-2",
        "checkpoint-3",
    ):
        assert (out / name).exists(), name
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert has_video_config(out)  # a complete processor, as the base checkpoint has (vLLM needs it)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    assert any("eval_loss" in m for m in metrics)
    saved = yaml.safe_load((out / "finetune_config.yaml").read_text())
    assert saved["lora"]["r"] == 4 and saved["out"] == str(out)

    # base weights untouched on disk; LoRA weights moved away from their zero init; only LM layers adapted
    after = _state(base)
    assert all(torch.equal(before[k], after[k]) for k in before)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    assert all("language_model" in k for k in adapter)
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["base_model_name_or_path"] == str(base)

    # the adapter reloads through the loader and changes the model's outputs
    from facellm_cli.config import ModelConfig
    from facellm_cli.models.loader import load_model_and_processor

    lm_a = load_model_and_processor(ModelConfig(model=str(base), adapter=str(out), device="cpu"))
    lm_b = load_model_and_processor(ModelConfig(model=str(base), device="cpu"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert not torch.allclose(lm_a.model(input_ids=ids).logits, lm_b.model(input_ids=ids).logits)
    img = face_data.parent / "face_00000.png"
    r = cli("ask", "--model", base, "--adapter", out, "--max-new-tokens", "3", img, "what is the expression?")
    assert r.code == 0, r.err
    r2 = cli("ask", "--model", base, "--adapter", tmp_path / "nope", img, "q")
    assert r2.code == 1 and "adapter folder not found" in r2.err


@pytest.mark.slow  # trains
def test_full_finetune_changes_lm_keeps_vision_frozen(tmp_path: Path, face_data: Path, tiny_internvl: Path) -> None:
    import torch

    from facellm_cli.train.finetune import finetune, is_projector, is_vision

    cfg = resolve_config(
        FinetuneConfig,
        _write_config(tmp_path / "f.yaml", tiny_internvl, face_data, tmp_path / "o"),
        {"method": "full", "train.max_steps": 2},
        ["train.eval_steps=null", "data.eval=null"],
    )
    res = finetune(cfg)
    assert res.global_step == 2
    before, after = _state(tiny_internvl), _state(tmp_path / "o")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("language_model" in k and ".layers." in k for k in changed)
    assert not any(is_vision(k) or is_projector(k) for k in changed)
    assert (tmp_path / "o" / "processor_config.json").is_file()


def _config_errors(cli, config: Path, settings: dict) -> list[str]:
    """Write ``settings`` to ``config``, run ``facellm finetune --config`` and return its error lines (exit 1)."""
    config.write_text(yaml.safe_dump(settings))
    r = cli("finetune", "--config", config)
    assert r.code == 1, r.err
    return [ln for ln in r.err.splitlines() if ln.startswith("error:")]


def test_config_problems_reported_together_before_loading(tmp_path: Path, cli) -> None:
    config = tmp_path / "bad.yaml"
    settings = {
        "method": "full",
        "model": {"model": str(tmp_path / "no-model"), "quantization": "8bit"},
        "data": {"train": str(tmp_path / "none.jsonl")},
        "train": {"eval_steps": 5},
    }
    # Settings that contradict each other: all of them, when the config is read (before any file is looked at).
    lines = _config_errors(cli, config, settings)
    assert len(lines) == 2, lines
    assert any("model.quantization: 8bit base weights cannot be trained with method full" in ln for ln in lines)
    assert any("train.eval_steps: set, but there is no data.eval file" in ln for ln in lines)
    assert all(ln.endswith(f"({config})") for ln in lines)
    # Then what needs files: every missing input at once, still before any model loads.
    del settings["model"]["quantization"], settings["train"]
    lines = _config_errors(cli, config, settings)
    assert len(lines) == 3, lines
    assert any("out: no output folder given (set out or pass --out)" in ln for ln in lines)
    missing = f"data.train: data file not found: {tmp_path / 'none.jsonl'} (check data.train / --data)"
    assert any(missing in ln for ln in lines)
    assert any(f"model.model: model folder not found: {tmp_path / 'no-model'}" in ln for ln in lines)
    assert all(ln.endswith(f"({config})") for ln in lines)
    r = cli("finetune", "--config", config, "--set", "train.lora_rank=3")
    assert r.code == 1 and "train.lora_rank: unknown key" in r.err


def test_one_mistake_one_error_fp16_on_cpu(tmp_path: Path, cli) -> None:
    """device cpu + precision fp16 is one mistake: one line, from the config check, not again from preflight."""
    config = tmp_path / "fp16.yaml"
    settings = {
        "model": {"model": str(tmp_path / "no-model"), "device": "cpu"},
        "data": {"train": str(tmp_path / "none.jsonl")},
        "out": str(tmp_path / "o"),
        "train": {"precision": "fp16"},
    }
    assert _config_errors(cli, config, settings) == [
        f"error: train.precision: fp16 training needs a GPU; use fp32 or bf16 on CPU ({config})"
    ]


@pytest.mark.slow  # trains
def test_refuses_non_empty_output_and_bad_records(tmp_path: Path, face_data: Path, tiny_internvl: Path, cli) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    config = _write_config(tmp_path / "r.yaml", tiny_internvl, face_data, out)
    r = cli("finetune", "--config", config)
    assert r.code == 1 and f"out: {out} is not empty; pass --overwrite" in r.err
    r = cli("finetune", "--config", config, "--resume")
    assert r.code == 1 and "resume: no complete checkpoint-N folder" in r.err
    bad = face_data.parent / "bad.jsonl"
    recs = describe_records([{"file": "face_00000.png", "expression": "smiling", "eyes": "open"}])
    recs[0]["messages"][0]["content"] = "<image><image> two?"
    write_jsonl(bad, recs)
    r = cli("finetune", "--config", config, "--data", bad, "--overwrite")
    assert r.code == 1
    assert "record 'rec-0' (bad.jsonl line 1): 2 <image> placeholder(s) in its messages but 1 image(s) listed" in r.err


def test_every_example_config_validates() -> None:
    examples = sorted((REPO_ROOT / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        data = yaml.safe_load(path.read_text())
        if "method" not in data and "lora" not in data:
            continue  # another command's example
        cfg = resolve_config(FinetuneConfig, path)
        assert cfg.problems() == [], path


def test_paper_example_is_the_paper_recipe() -> None:
    cfg = resolve_config(FinetuneConfig, REPO_ROOT / "examples" / "facellm-1b-lora.yaml")
    assert cfg.model.model == "OpenGVLab/InternVL3-1B-hf" and cfg.method == "lora"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (16, 32, 0.0, "all-linear")
    t = cfg.train
    assert (t.learning_rate, t.epochs, t.lr_scheduler, t.warmup_ratio, t.max_grad_norm, t.precision) == (
        1e-5,
        1.0,
        "cosine",
        0.0,
        1.0,
        "bf16",
    )
    assert (t.batch_size, t.grad_accumulation, cfg.data.max_seq_length) == (10, 8, 2048)
    q = resolve_config(FinetuneConfig, REPO_ROOT / "examples" / "facellm-8b-qlora-consumer.yaml")
    assert q.method == "qlora" and q.model.quantization == "4bit" and q.train.gradient_checkpointing


@pytest.mark.slow  # trains
def test_merge_gives_a_standalone_model_with_the_adapter_applied(
    tmp_path: Path,
    face_data: Path,
    tiny_internvl: Path,
    cli,
) -> None:
    import torch

    from facellm_cli.config import ModelConfig
    from facellm_cli.models.loader import load_model_and_processor
    from facellm_cli.train.finetune import finetune

    run = tmp_path / "run"
    cfg = resolve_config(
        FinetuneConfig,
        _write_config(tmp_path / "m.yaml", tiny_internvl, face_data, run),
        {"train.max_steps": 2},
        ["train.save_steps=null", "train.eval_steps=null", "data.eval=null"],
    )
    finetune(cfg)
    merged = tmp_path / "merged"
    r = cli("finetune", "merge", "--adapter", run, "--out", merged, "--max-shard-size", "200KB", "--json")
    assert r.code == 0, r.err
    info = json.loads(r.out)
    shards = sorted(merged.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (merged / "model.safetensors.index.json").is_file()
    assert "processor_config.json" in info["files"] and has_video_config(merged)
    a = load_model_and_processor(ModelConfig(model=str(merged), device="cpu"))
    b = load_model_and_processor(ModelConfig(model=str(tiny_internvl), adapter=str(run), device="cpu"))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(a.model(input_ids=ids).logits, b.model(input_ids=ids).logits, atol=1e-5)
    r = cli("finetune", "merge", "--adapter", run, "--out", merged)
    assert r.code == 1 and "output folder is not empty" in r.err


def test_config_error_is_raised_before_any_model_loads(tmp_path: Path) -> None:
    from facellm_cli.train.finetune import preflight

    cfg = FinetuneConfig.model_validate(
        {"model": {"model": str(tmp_path)}, "data": {"train": str(tmp_path / "x.jsonl")}}
    )
    with pytest.raises(ConfigError) as e:
        preflight(cfg)
    assert len(e.value.problems) == 3  # no out folder, no data file, no config.json in the model folder


@pytest.mark.slow  # trains
def test_qlora_trains_on_a_4bit_base_on_cpu(tmp_path: Path, face_data: Path, tiny_internvl: Path) -> None:
    """bitsandbytes 0.50 runs 4-bit on CPU: the language model's linear layers are NF4, LoRA trains on top."""
    import bitsandbytes as bnb
    import torch
    from safetensors.torch import load_file

    from facellm_cli.config import ModelConfig
    from facellm_cli.models.loader import load_model_and_processor
    from facellm_cli.train import finetune as ft

    seen: dict[str, int] = {}
    real_prepare = ft.prepare_model

    def spy(model, cfg):
        seen["4bit"] = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        return real_prepare(model, cfg)

    ft.prepare_model = spy
    try:
        cfg = resolve_config(
            FinetuneConfig,
            _write_config(tmp_path / "q.yaml", tiny_internvl, face_data, tmp_path / "q"),
            {"method": "qlora", "train.max_steps": 2},
            ["train.eval_steps=null", "data.eval=null", "train.save_steps=null"],
        )
        assert cfg.model.quantization == "4bit"
        res = ft.finetune(cfg)
    finally:
        ft.prepare_model = real_prepare
    assert res.global_step == 2 and res.method == "qlora"
    assert seen["4bit"] == 14  # 2 layers x 7 linear layers of the language model; vision and lm_head stay full
    adapter = load_file(str(tmp_path / "q" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    lm = load_model_and_processor(
        ModelConfig(model=str(tiny_internvl), adapter=str(tmp_path / "q"), quantization="4bit", device="cpu")
    )
    with torch.no_grad():
        assert torch.isfinite(lm.model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_qlora_error_suggests_lora_where_bitsandbytes_cannot_run(
    tmp_path: Path,
    face_data: Path,
    tiny_internvl: Path,
    monkeypatch: pytest.MonkeyPatch,
    cli,
) -> None:
    from facellm_cli.errors import QuantizationError
    from facellm_cli.models import loader

    def broken(cfg, device):
        raise QuantizationError(
            "--quantization 4bit: bitsandbytes is installed but cannot run here (OSError: libbitsandbytes)"
        )

    monkeypatch.setattr(loader, "quantization_config", broken)
    config = _write_config(tmp_path / "q.yaml", tiny_internvl, face_data, tmp_path / "q")
    r = cli("finetune", "--config", config, "--method", "qlora")
    assert r.code == 1
    assert "qlora cannot run here: --quantization 4bit: bitsandbytes is installed but cannot run here" in r.err
    assert "train with --method lora instead" in r.err


def test_help_of_every_finetune_command(cli) -> None:
    r = cli("finetune", "--help")
    assert r.code == 0 and "--resume-from" in r.out and "merge" in r.out and "accelerate launch" in r.out
    r = cli("finetune", "merge", "--help")
    assert r.code == 0 and "--max-shard-size" in r.out
    r = cli("dev", "synth-faces", "--help")
    assert r.code == 0 and "--seed" in r.out
    r = cli("finetune")
    assert r.code == 1 and "data.train: no training file given" in r.err and "out: no output folder" in r.err
