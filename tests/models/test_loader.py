from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from facellm_cli.config import GenerationConfig, ModelConfig
from facellm_cli.errors import AdapterError, ModelLoadError, QuantizationError
from facellm_cli.infer.generate import Prompt, generate_batch
from facellm_cli.models import loader
from facellm_cli.models.loader import choose_device, choose_dtype, load_model_and_processor
from facellm_cli.testing import build_tiny_model
from facellm_cli.testing.cli import FACELLM, subprocess_env
from facellm_cli.testing.hub import hub_style_internvl, hub_style_qwen2_vl

IMG = Image.new("RGB", (70, 50), (180, 120, 90))


def answer(lm, n: int = 3) -> str:
    return generate_batch(lm, [Prompt([IMG], "What expression is this?")], GenerationConfig(max_new_tokens=n))[0]


@pytest.mark.parametrize("fixture", ["tiny_internvl", "tiny_qwen2_vl"])
def test_tiny_models_load_on_cpu_fp32_and_generate(request: pytest.FixtureRequest, fixture: str) -> None:
    import torch

    path: Path = request.getfixturevalue(fixture)
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 5_000_000
    lm = load_model_and_processor(ModelConfig(model=str(path)))
    assert (lm.device, lm.dtype) == ("cpu", "float32")
    assert next(lm.model.parameters()).dtype == torch.float32
    assert lm.model.config._attn_implementation == "sdpa"
    assert not lm.model.training
    gen = answer(lm, 4)
    assert gen.completion_tokens >= 1 and gen.prompt_tokens > 10


@pytest.mark.parametrize("family", ["internvl", "qwen2_vl"])
def test_tiny_model_text_init_std_sets_the_language_model_weights(family: str, tmp_path: Path) -> None:
    import torch

    def q_proj_std(std: float) -> tuple[float, float]:
        path = build_tiny_model(tmp_path / f"{family}-{std}", family, text_init_std=std, text_hidden=128)
        lm = load_model_and_processor(ModelConfig(model=str(path)))
        weights = torch.cat([m.weight.flatten() for n, m in lm.model.named_modules() if n.endswith("self_attn.q_proj")])
        return lm.model.config.text_config.initializer_range, float(weights.std())

    saved, measured = q_proj_std(0.02)
    assert saved == 0.02 and measured == pytest.approx(0.02, rel=0.1)
    saved, measured = q_proj_std(0.08)
    assert saved == 0.08 and measured == pytest.approx(0.08, rel=0.1)


def test_dtype_and_device_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    assert choose_device("auto") == "cpu"  # no CUDA on CI
    assert choose_dtype("auto", "cpu") == "float32"
    assert choose_dtype("float16", "cpu") == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_dtype("auto", "cuda") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_dtype("auto", "cuda:1") == "float16"
    with pytest.raises(
        ModelLoadError, match="device 'cuda' asked for but CUDA is not available here; use --device cpu"
    ):
        choose_device("cuda")


def test_explicit_dtype_is_applied(tiny_internvl: Path) -> None:
    import torch

    lm = load_model_and_processor(ModelConfig(model=str(tiny_internvl), dtype="bfloat16"))
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert answer(lm).completion_tokens >= 1


def test_hub_layout_checkpoint_in_subfolder_loads_image_only(tiny_internvl: Path, tmp_path: Path) -> None:
    repo = hub_style_internvl(tiny_internvl, tmp_path / "FaceLLM-1B")
    if not loader.torchvision_available():
        from transformers import AutoProcessor

        with pytest.raises(ImportError, match="Torchvision"):
            AutoProcessor.from_pretrained(repo / "model")  # the trap the loader avoids
    with pytest.raises(ModelLoadError, match="it has one in subfolder 'model' \\(pass --subfolder model\\)"):
        load_model_and_processor(ModelConfig(model=str(repo)))
    lm = load_model_and_processor(ModelConfig(model=str(repo), subfolder="model"))
    assert type(lm.processor).__name__ == "InternVLProcessor"
    if not loader.torchvision_available():
        assert lm.image_only_processor and type(lm.processor.image_processor).__name__ == "GotOcr2ImageProcessorPil"
    assert answer(lm).completion_tokens >= 1


def test_hub_layout_qwen2_vl(tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    lm = load_model_and_processor(ModelConfig(model=str(hub_style_qwen2_vl(tiny_qwen2_vl, tmp_path / "qwen"))))
    assert type(lm.processor).__name__ == "Qwen2VLProcessor"
    assert answer(lm).completion_tokens >= 1


def test_missing_local_folder_and_unreachable_hub(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as e:
        load_model_and_processor(ModelConfig(model=str(tmp_path / "nope")))
    assert str(e.value) == f"model folder not found: {tmp_path / 'nope'} (check the path given to --model)"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json in model folder"):
        load_model_and_processor(ModelConfig(model=str(tmp_path / "empty")))
    with pytest.raises(ModelLoadError) as e:
        load_model_and_processor(ModelConfig(model="Idiap/FaceLLM-1B"))
    msg = str(e.value)
    assert msg.startswith(
        "model 'Idiap/FaceLLM-1B' is not a local folder and could not be loaded from the Hugging Face hub"
    )
    assert "hf download Idiap/FaceLLM-1B --include 'model/*' --local-dir ./FaceLLM-1B" in msg


def test_quantization_without_bitsandbytes(monkeypatch: pytest.MonkeyPatch, tiny_internvl: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(QuantizationError) as e:
        load_model_and_processor(ModelConfig(model=str(tiny_internvl), quantization="4bit"))
    assert (
        str(e.value)
        == "--quantization 4bit needs bitsandbytes: pip install 'facellm[quant]' (or use --quantization none)"
    )


def test_quantization_with_broken_bitsandbytes(monkeypatch: pytest.MonkeyPatch, tiny_internvl: Path) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(
        QuantizationError, match="bitsandbytes is installed but cannot run here .*use --quantization none"
    ):
        load_model_and_processor(ModelConfig(model=str(tiny_internvl), quantization="8bit"))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize(("mode", "cls"), [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_load_keeps_vision_and_head_full_precision(tiny_internvl: Path, mode: str, cls: str) -> None:
    lm = load_model_and_processor(ModelConfig(model=str(tiny_internvl), quantization=mode))
    kinds = {name: type(m).__name__ for name, m in lm.model.named_modules()}
    lm_linears = [k for k, v in kinds.items() if "language_model" in k and k.endswith("q_proj")]
    assert lm_linears and all(kinds[k] == cls for k in lm_linears)
    vision = [k for k in kinds if "vision_tower" in k and k.endswith("q_proj")]
    assert vision and all(kinds[k] == "Linear" for k in vision)
    assert kinds["lm_head"] == "Linear"
    assert all(
        kinds[k] == "Linear" for k in kinds if "multi_modal_projector" in k and k.endswith(("linear_1", "linear_2"))
    )
    assert answer(lm).completion_tokens >= 1


def _lora_adapter(base: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    )
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # non-zero so the adapter changes outputs
    peft_model.save_pretrained(out)
    return out


def test_adapter_load_and_merge(tiny_internvl: Path, tmp_path: Path) -> None:
    import torch

    adapter = _lora_adapter(tiny_internvl, tmp_path / "adapter")
    base = load_model_and_processor(ModelConfig(model=str(tiny_internvl)))
    with_adapter = load_model_and_processor(ModelConfig(model=str(tiny_internvl), adapter=str(adapter)))
    assert type(with_adapter.model).__name__ == "PeftModel"
    merged = load_model_and_processor(ModelConfig(model=str(tiny_internvl), adapter=str(adapter), merge_adapter=True))
    assert type(merged.model).__name__ == "InternVLForConditionalGeneration"
    batch = base.processor(
        text=[
            base.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                add_generation_prompt=True,
            )
        ],
        images=[IMG],
        return_tensors="pt",
    )
    with torch.no_grad():
        l_base = base.model(**batch).logits
        l_adapter = with_adapter.model(**batch).logits
        l_merged = merged.model(**batch).logits
    assert not torch.allclose(l_base, l_adapter, atol=1e-4)
    assert torch.allclose(l_adapter, l_merged, atol=1e-4)


def test_adapter_errors(tiny_internvl: Path, tmp_path: Path) -> None:
    with pytest.raises(
        AdapterError, match="adapter folder not found or not a PEFT adapter: .*expected adapter_config.json"
    ):
        load_model_and_processor(ModelConfig(model=str(tiny_internvl), adapter=str(tmp_path / "none")))
    other = build_tiny_model(tmp_path / "other", "internvl", text_hidden=32)
    adapter = _lora_adapter(other, tmp_path / "other-adapter")
    with pytest.raises(AdapterError) as e:
        load_model_and_processor(ModelConfig(model=str(tiny_internvl), adapter=str(adapter)))
    msg = str(e.value)
    assert msg.startswith(f"adapter {adapter} does not match base model {tiny_internvl} (it was trained on '{other}')")
    assert msg.endswith("Load the base model the adapter was trained on")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(other)


def _copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupt_or_truncated_weights_name_the_file(tiny_internvl: Path, tmp_path: Path) -> None:
    truncated = _copy_model(tiny_internvl, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut short
    with pytest.raises(ModelLoadError) as e:
        load_model_and_processor(ModelConfig(model=str(truncated), device="cpu"))
    assert str(e.value).startswith(f"model weights {weights} is corrupt or incomplete (")
    assert str(e.value).endswith("); re-download it")
    garbage = _copy_model(tiny_internvl, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"<html>rate limited</html>")
    with pytest.raises(ModelLoadError, match=r"model weights .*garbage/model.safetensors is corrupt or incomplete"):
        load_model_and_processor(ModelConfig(model=str(garbage), device="cpu"))


def test_corrupt_adapter_weights_name_the_file(tiny_internvl: Path, tmp_path: Path) -> None:
    adapter = _lora_adapter(tiny_internvl, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=rf"adapter weights {weights} is corrupt or incomplete .*re-download it"):
        load_model_and_processor(ModelConfig(model=str(tiny_internvl), adapter=str(adapter), device="cpu"))


def test_local_folder_errors_say_what_is_wrong_with_it(tiny_internvl: Path, tmp_path: Path) -> None:
    broken = _copy_model(tiny_internvl, tmp_path / "broken")
    (broken / "config.json").write_text('{"model_type": ')
    with pytest.raises(ModelLoadError) as e:
        load_model_and_processor(ModelConfig(model=str(broken), device="cpu"))
    assert str(e.value) == (
        f"{broken / 'config.json'} is not valid JSON (Expecting value: line 1 column 16 (char 15)); "
        "re-download the model or fix the file"
    )
    from transformers import Qwen2Config, Qwen2ForCausalLM

    text_only = tmp_path / "text-only"
    Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
        )
    ).save_pretrained(text_only)
    with pytest.raises(ModelLoadError) as e:
        load_model_and_processor(ModelConfig(model=str(text_only), device="cpu"))
    assert str(e.value).startswith(
        f"'{text_only}' is a 'qwen2' model (Qwen2ForCausalLM), not an image-text-to-text model; "
        "facellm needs a vision-language checkpoint"
    )
    no_processor = _copy_model(tiny_internvl, tmp_path / "no-processor")
    for f in no_processor.glob("*"):
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            f.unlink()
    with pytest.raises(ModelLoadError) as e:
        load_model_and_processor(ModelConfig(model=str(no_processor), device="cpu"))
    assert str(e.value).startswith(f"cannot load model folder {no_processor}: ")
    assert "not a local folder" not in str(e.value)


@pytest.mark.slow  # two fresh processes
def test_unreachable_hub_fails_fast_and_the_cache_still_serves(tiny_internvl: Path, tmp_path: Path) -> None:
    """Online mode with the hub down: one request, no five retries; a model in the cache loads from it."""
    import shutil
    import socket
    import subprocess

    with socket.socket() as s:  # a port nothing listens on: the hub's connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hf_home = tmp_path / "hf"
    snapshot = hf_home / "hub" / "models--org--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_internvl, snapshot)
    (hf_home / "hub" / "models--org--tiny" / "refs").mkdir()
    (hf_home / "hub" / "models--org--tiny" / "refs" / "main").write_text("0" * 40)
    env = {k: v for k, v in subprocess_env().items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=f"http://127.0.0.1:{port}")
    image = tmp_path / "face.png"
    IMG.save(image)

    def ask(model: str) -> subprocess.CompletedProcess[str]:
        cmd = [*FACELLM, "ask", "--model", model, str(image), "q", "--max-new-tokens", "2"]
        return subprocess.run(cmd, env=env, capture_output=True, text=True)  # ends when the command does

    r = ask("org/missing")
    assert r.returncode == 1
    assert "Retrying" not in r.stderr and "Retry" not in r.stderr
    assert (
        "model 'org/missing' is not a local folder and could not be loaded from the Hugging Face hub "
        "(the hub cannot be reached (ConnectError: "
    ) in r.stderr
    assert "and it is not in the local cache)" in r.stderr
    r = ask("org/tiny")
    assert r.returncode == 0, r.stderr
    assert "Retry" not in r.stderr
