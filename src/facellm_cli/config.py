"""Pydantic configs shared by every command, and how they are resolved.

Precedence (lowest first): model defaults < ``--config file.yaml`` < explicit
flags < repeatable ``--set a.b=c``. Flags default to ``None`` so only what the
user typed overrides. Every run writes its resolved config (secrets removed)
next to its outputs with :func:`dump_config`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from .errors import ConfigError

DEFAULT_MODEL = "Idiap/FaceLLM-1B"
# Released FaceLLM checkpoints keep the transformers weights in a subfolder.
KNOWN_SUBFOLDERS = {
    "Idiap/FaceLLM-1B": "model",
    "Idiap/FaceLLM-8B": "model",
    "Idiap/FaceLLM-38B": "model",
}


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(StrictModel):
    """How to get a model: the one input of ``load_model_and_processor``."""

    model: str = Field(DEFAULT_MODEL, description="Hub id or local folder of an image-text-to-text checkpoint.")
    subfolder: str | None = Field(
        None, description="Folder inside the checkpoint that holds config.json (FaceLLM releases use 'model')."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto is bfloat16 on CUDA with bf16 support, float16 on older CUDA, float32 on CPU."
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to transformers."
    )
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none", description="bitsandbytes quantization of the language model (vision tower, projector, lm_head stay unquantized)."
    )
    adapter: str | None = Field(None, description="PEFT adapter folder to apply on top of the base model.")
    merge_adapter: bool = Field(False, description="Merge the adapter into the base weights after loading.")
    trust_remote_code: bool = Field(False, description="Allow code from the checkpoint to run (off unless asked).")

    @model_validator(mode="after")
    def _defaults_and_checks(self) -> ModelConfig:
        if self.subfolder is None and self.model in KNOWN_SUBFOLDERS:
            object.__setattr__(self, "subfolder", KNOWN_SUBFOLDERS[self.model])
        problems = []
        if self.merge_adapter and not self.adapter:
            problems.append("merge_adapter: needs an adapter folder (set adapter)")
        if self.merge_adapter and self.quantization != "none":
            problems.append("merge_adapter: cannot merge into a quantized model (set quantization: none)")
        dev = self.device
        if not (dev in {"auto", "cpu", "cuda", "mps"} or (dev.startswith("cuda:") and dev[5:].isdigit())):
            problems.append(f"device: '{dev}' is not one of auto, cpu, cuda, cuda:N, mps")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class GenerationConfig(StrictModel):
    """Decoding settings shared by ask, evaluate and serve."""

    max_new_tokens: int = Field(256, gt=0, description="Most tokens to generate per answer.")
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (when temperature > 0).")
    system: str | None = Field(None, description="Optional system prompt.")
    seed: int | None = Field(None, description="Seed for sampling.")


class AskConfig(StrictModel):
    """``facellm ask``: answer a question about one or more images."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Model to load.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Decoding settings.")
    batch_size: int = Field(4, gt=0, description="Images answered per generate call.")


C = TypeVar("C", bound=BaseModel)


def _format_validation_error(err: ValidationError, source: str | None) -> ConfigError:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the command's --help)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        problems.append(f"{loc}: {msg}")
    return ConfigError(problems, source)


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (check the path given to --config)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}".replace("\n", " "), str(p)) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"top level must be a mapping of keys, got {type(data).__name__}", str(p))
    return data


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        nxt = cur.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[k] = nxt
        cur = nxt
    cur[keys[-1]] = value


def parse_set(item: str) -> tuple[str, Any]:
    """``a.b=c`` -> ("a.b", parsed c). The value is read as YAML, so 16 is an int and [a, b] a list."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}' is not KEY=VALUE (example: --set generation.max_new_tokens=64)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set '{item}' has an empty key (example: --set model.dtype=float32)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def resolve_config(
    cls: type[C],
    config_path: str | os.PathLike[str] | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> C:
    """Build a config from defaults, a YAML file, flags (dotted keys, None = not given) and ``--set`` items."""
    data: dict[str, Any] = load_yaml(config_path) if config_path else {}
    source = str(config_path) if config_path else None
    for key, value in (flags or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    for item in sets or []:
        key, value = parse_set(item)
        _set_dotted(data, key, value)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise _format_validation_error(e, source) from None


def validate_config(cls: type[C], data: dict[str, Any], source: str | None = None) -> C:
    """Validate a mapping into ``cls``, turning pydantic errors into one-line-per-problem ConfigError."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise _format_validation_error(e, source) from None


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """Plain data with every secret removed (SecretStr fields become None)."""

    def scrub(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return None
        if isinstance(value, BaseModel):
            return {k: scrub(getattr(value, k)) for k in type(value).model_fields}
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [scrub(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return scrub(cfg)


def dump_config(cfg: BaseModel, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config as YAML (atomically, secrets removed) and return its path."""
    from .io import atomic_write_text

    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    return atomic_write_text(Path(path), text)


# ---- evaluate ----


class EvalEndpointConfig(StrictModel):
    """An OpenAI-compatible server to evaluate instead of a local model (GPT-4o, vLLM, ``facellm serve``)."""

    base_url: str = Field(description="Endpoint base URL, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(description="Model name the endpoint serves.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (never stored).")
    concurrency: int = Field(8, gt=0, le=256, description="Requests in flight at once.")
    max_retries: int = Field(4, ge=0, description="Retries per question on 429, 5xx, timeouts and dropped connections.")
    timeout_s: float = Field(120.0, gt=0, description="Seconds to wait for one answer.")
    max_image_side: int | None = Field(1024, gt=0, description="Downscale images so the longer side is at most this.")


class EvalGenerationConfig(GenerationConfig):
    """Decoding for generate mode: the benchmark asks for a letter, so answers are short by default."""

    max_new_tokens: int = Field(32, gt=0, description="Most tokens per answer (a letter, or a short sentence).")


class EvalConfig(StrictModel):
    """``facellm evaluate``: multiple-choice accuracy of a model on FaceXBench or a JSONL set."""

    benchmark: Literal["facexbench"] | None = Field(None, description="Built-in benchmark to run (needs data_dir).")
    data_dir: str | None = Field(None, description="FaceXBench checkout (or its benchmark/ folder) with the images.")
    data: str | None = Field(
        None, description="JSONL set ({images, question, options, answer} lines or build-dataset mcq_*.jsonl), or a folder of mcq_*.jsonl."
    )
    image_root: str | None = Field(None, description="Folder relative image paths in --data resolve against (default: the file's folder).")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Local model to evaluate (ignored with endpoint).")
    endpoint: EvalEndpointConfig | None = Field(None, description="Evaluate an OpenAI-compatible endpoint instead.")
    mode: Literal["generate", "likelihood"] = Field(
        "generate", description="generate: answer then parse; likelihood: pick the option letter the model scores highest."
    )
    generation: EvalGenerationConfig = Field(
        default_factory=EvalGenerationConfig, description="Decoding settings for generate mode (greedy by default)."
    )
    batch_size: int = Field(8, gt=0, description="Questions per forward pass / generate call.")
    limit: int | None = Field(None, gt=0, description="Evaluate only the first N questions (after --tasks).")
    tasks: list[str] | None = Field(None, description="Only these tasks (file stems), sub-tasks or categories.")
    with_task_description: bool = Field(False, description="Prepend each task's description (FaceXBench 'in-context' setting).")
    out: str = Field("facellm-eval", description="Output folder: predictions.jsonl (resume cache), results.json, report.md, chart.")

    @model_validator(mode="after")
    def _checks(self) -> EvalConfig:
        problems = []
        if self.benchmark and self.data:
            problems.append("data: give either --benchmark facexbench --data-dir DIR or --data FILE, not both")
        if not self.benchmark and not self.data:
            problems.append("benchmark: nothing to evaluate; give --benchmark facexbench --data-dir DIR or --data FILE.jsonl")
        if self.benchmark and not self.data_dir:
            problems.append("data_dir: --benchmark facexbench needs --data-dir (a FaceXBench checkout with its images)")
        if self.data_dir and not self.benchmark:
            problems.append("benchmark: --data-dir is only used with --benchmark facexbench")
        if self.image_root and not self.data:
            problems.append("image_root: --image-root only applies to --data sets")
        if self.endpoint is not None and self.mode == "likelihood":
            problems.append("mode: likelihood needs the model's logits; endpoints support mode generate only")
        if problems:
            raise ValueError("; ".join(problems))
        return self
