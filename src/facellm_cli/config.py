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


# ---- finetune ----
class FinetuneDataConfig(StrictModel):
    """Where the training conversations are and how they are turned into tokens."""

    train: str | None = Field(None, description="Training file: build-dataset's messages .jsonl or a ShareGPT .json.")
    eval: str | None = Field(None, description="Optional evaluation file in the same format (eval loss in loss.png).")
    format: Literal["auto", "messages", "sharegpt"] = Field(
        "auto", description="auto: .jsonl = messages, .json = ShareGPT."
    )
    image_root: str | None = Field(
        None, description="Folder relative image paths resolve against (default: the data file's folder)."
    )
    max_seq_length: int = Field(
        2048,
        gt=0,
        description="Longest sequence in tokens (the paper's cutoff is 2048); longer samples are truncated at the "
        "end, never through image tokens, or dropped.",
    )
    max_image_side: int | None = Field(
        None, gt=0, description="Downscale images whose longer side exceeds this many pixels before the processor."
    )
    max_samples: int | None = Field(None, gt=0, description="Use only the first N training records (quick trials).")


class LoraSettings(StrictModel):
    """LoRA adapter shape and what else trains alongside it."""

    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="all-linear = every linear layer of the language model (vision tower, projector and lm_head "
        "excluded), "
        "or a list of layer names (q_proj, v_proj...) matched inside the language model.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Extra modules trained fully and saved with the adapter."
    )
    train_embeddings: bool = Field(
        False, description="Also train the language model's input embeddings and lm_head fully."
    )
    train_norms: bool = Field(False, description="Also train the language model's normalisation layers fully.")


class TrainSettings(StrictModel):
    """Optimiser, schedule, batching and checkpointing (passed to transformers' Trainer)."""

    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    optimizer: str = Field(
        "adamw_torch", description="transformers optim name (adamw_torch, adamw_8bit, paged_adamw_8bit, sgd...)."
    )
    lr_scheduler: str = Field("cosine", description="transformers scheduler name (cosine, linear, constant...).")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm (0 disables).")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimiser steps.")
    batch_size: int = Field(1, gt=0, description="Samples per device per forward pass.")
    grad_accumulation: int = Field(1, gt=0, description="Forward passes per optimiser step.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on CUDA with bf16 support, fp16 on older CUDA, fp32 on CPU."
    )
    seed: int = Field(42, description="Seed for weights init of adapters, data order and dropout.")
    logging_steps: int = Field(10, gt=0, description="Log the training loss every N steps.")
    eval_steps: int | None = Field(
        None, gt=0, description="Evaluate every N steps (default: at the end of each epoch when data.eval is set)."
    )
    save_steps: int | None = Field(
        500, gt=0, description="Write a resumable checkpoint every N steps (None: only at the end)."
    )
    save_total_limit: int | None = Field(2, gt=0, description="Keep at most this many checkpoints.")
    train_vision_tower: bool = Field(False, description="Train the vision tower fully (frozen by default).")
    train_projector: bool = Field(False, description="Train the vision-language projector fully (frozen by default).")
    dataloader_workers: int = Field(0, ge=0, description="Processes that load images and tokenise ahead of the model.")


class FinetuneConfig(StrictModel):
    """``facellm finetune``: LoRA / QLoRA / full fine-tuning of an image-text-to-text model."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model to fine-tune.")
    method: Literal["lora", "qlora", "full"] = Field("lora", description="lora, qlora (4-bit base + LoRA) or full.")
    data: FinetuneDataConfig = Field(default_factory=FinetuneDataConfig, description="Training data.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings (lora and qlora).")
    train: TrainSettings = Field(default_factory=TrainSettings, description="Optimisation settings.")
    output_dir: str | None = Field(
        None, description="Folder for the adapter or weights, checkpoints, config and plots."
    )

    @model_validator(mode="after")
    def _qlora_is_4bit(self) -> FinetuneConfig:
        if self.method == "qlora" and self.model.quantization == "none":
            object.__setattr__(self.model, "quantization", "4bit")
        return self

    def problems(self) -> list[str]:
        """Cross-field problems, all of them (checked before any file is read or model loads)."""
        problems = []
        if not self.data.train:
            problems.append("data.train: no training file given (set data.train or pass --data)")
        if not self.output_dir:
            problems.append("output_dir: no output folder given (set output_dir or pass --out)")
        if self.method == "qlora" and self.model.quantization == "8bit":
            problems.append(
                "model.quantization: qlora loads the base in 4bit; remove quantization: 8bit or use method: lora"
            )
        if self.method != "qlora" and self.model.quantization != "none":
            problems.append(
                f"model.quantization: {self.model.quantization} base weights cannot be trained with method "
                f"{self.method}; "
                "use method: qlora (4bit) or quantization: none"
            )
        if self.model.adapter:
            problems.append(
                "model.adapter: fine-tuning on top of an adapter is not supported; "
                "merge it first (facellm finetune merge)"
            )
        if self.method != "full" and not isinstance(self.lora.target_modules, str) and not self.lora.target_modules:
            problems.append("lora.target_modules: empty list; use all-linear or name at least one layer")
        if self.train.eval_steps and not self.data.eval:
            problems.append("train.eval_steps: set, but there is no data.eval file to evaluate on")
        if self.model.device == "cpu" and self.train.precision == "fp16":
            problems.append("train.precision: fp16 training needs a GPU; use fp32 or bf16 on CPU")
        if self.method == "full" and (self.lora.train_embeddings or self.lora.train_norms or self.lora.modules_to_save):
            problems.append(
                "lora: train_embeddings/train_norms/modules_to_save apply to lora and qlora; "
                "method full trains every language-model weight already"
            )
        return problems
