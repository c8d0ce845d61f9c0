"""``load_model_and_processor``: the single way every command gets a model.

Works for any ``AutoModelForImageTextToText`` checkpoint (hub id or local
folder). torch/transformers are imported inside functions so ``facellm --help``
stays fast.

Processors: transformers 5 multimodal processors carry a video processor that
needs torchvision. When torchvision is not importable (the CPU torch wheel has
no matching torchvision) the processor is built image-only: the checkpoint's
own processor class with the video slot removed and the PIL image-processor
backend. Image inputs then go through the same class and code as with
torchvision; only videos are unsupported.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..config import ModelConfig
from ..errors import AdapterError, MissingDependencyError, ModelLoadError, QuantizationError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import (
        BitsAndBytesConfig,
        PreTrainedTokenizerBase,
        ProcessorMixin,
    )

    # What AutoModelForImageTextToText.from_pretrained returns, as transformers itself types it:
    # a PreTrainedModel with GenerationMixin's generate().
    from transformers.models.auto.modeling_auto import _BaseModelWithGenerate as GenerativeModel

    # AutoProcessor gives a tokenizer alone for a checkpoint without a processor config.
    Processor = ProcessorMixin | PreTrainedTokenizerBase
    from ..runtime import ThreadChoice

log = logging.getLogger("facellm.loader")

# Module-name fragments kept unquantized (and frozen by default in finetune):
# vision towers, projectors and lm_head across InternVL, Qwen2-VL, LLaVA, SmolVLM/Idefics3.
VISION_MODULE_KEYS = ("vision_tower", "visual", "vision_model", "multi_modal_projector", "connector", "mlp1")
# transformers 5 matches skip patterns from the start of the dotted name (as regexes), so
# each fragment is prefixed with ".*" to match at any depth ("model.vision_tower.encoder...").
SKIP_QUANT_PATTERNS = (*(rf"(.*\.)?{k}" for k in VISION_MODULE_KEYS), r"(.*\.)?lm_head")


@dataclass
class LoadedModel:
    """A ready-to-use model with its processor and what was chosen for it."""

    model: GenerativeModel | PeftModel  # a PeftModel (which forwards generate) when an adapter is loaded unmerged
    processor: Processor
    config: ModelConfig
    device: str
    dtype: str
    model_type: str
    name: str
    image_only_processor: bool = False
    # The CPU thread choice made while loading (None on GPUs); its note is shown by the caller.
    threads: ThreadChoice | None = None
    # The fast tokenizer keeps its padding state in Rust and changes it on every call, so calls from
    # two threads (serve's prompt check and its batcher) take turns.
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if hasattr(self.processor, "tokenizer"):
            return self.processor.tokenizer
        return cast("PreTrainedTokenizerBase", self.processor)  # AutoProcessor's fallback: the tokenizer alone


def require_model_extras(what: str = "this command") -> None:
    """Raise MissingDependencyError unless torch and transformers import."""
    for mod in ("torch", "transformers"):
        if importlib.util.find_spec(mod) is None:
            raise MissingDependencyError(what, "models", mod)


@cache
def torchvision_available() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # torchvision built for another torch fails with RuntimeError/OSError
        return False
    return True


def choose_device(requested: str) -> str:
    import torch

    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"device '{requested}' asked for but CUDA is not available here; use --device cpu")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise ModelLoadError("device 'mps' asked for but MPS is not available here; use --device cpu")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def choose_dtype(requested: str, device: str) -> str:
    import torch

    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def resolve_source(cfg: ModelConfig) -> tuple[str, dict[str, Any]]:
    """Return (path or hub id, from_pretrained kwargs). Local folders are checked for config.json."""
    kwargs: dict[str, Any] = {}
    if cfg.subfolder:
        kwargs["subfolder"] = cfg.subfolder
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    p = Path(cfg.model).expanduser()
    looks_local = p.exists() or cfg.model.startswith((".", "/", "~")) or cfg.model.count("/") > 1
    if looks_local:
        if not p.exists():
            raise ModelLoadError(f"model folder not found: {cfg.model} (check the path given to --model)")
        root = p / cfg.subfolder if cfg.subfolder else p
        if not (root / "config.json").is_file():
            hint = ""
            if not cfg.subfolder:
                subs = sorted(c.parent.name for c in p.glob("*/config.json"))
                if subs:
                    hint = f"; it has one in subfolder '{subs[0]}' (pass --subfolder {subs[0]})"
            raise ModelLoadError(f"no config.json in model folder {root}{hint}")
        return str(p), kwargs
    if hub_unreachable() is not None:
        kwargs["local_files_only"] = True  # the cache only: no five retries against a hub that is not there
    return cfg.model, kwargs


@cache
def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached (one quick request, once per process), or None.

    huggingface_hub retries a failed metadata request five times with back-off (~25 s) before it
    falls back to the cache; when the hub is down or the machine offline that is pure waiting.
    Offline mode (HF_HUB_OFFLINE=1) is honoured as it is: no request at all.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception as e:  # noqa: BLE001 - any transport failure means: do not wait on the hub
        return f"{type(e).__name__}: {_first_line(e)}"
    return None


def _hub_error(cfg: ModelConfig, err: Exception) -> ModelLoadError:
    sub = f" --include '{cfg.subfolder}/*'" if cfg.subfolder else ""
    down = hub_unreachable()
    why = (
        f"the hub cannot be reached ({down}) and it is not in the local cache"
        if down
        else (f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    )
    return ModelLoadError(
        f"model '{cfg.model}' is not a local folder and could not be loaded from the Hugging Face hub "
        f"({why}). Download it where the hub is reachable "
        f"with: hf download {cfg.model}{sub} --local-dir ./{cfg.model.split('/')[-1]} and pass that folder to --model"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _local_root(source: str, kwargs: dict[str, Any]) -> Path | None:
    """The folder holding config.json when ``source`` is a local model folder, else None."""
    p = Path(source)
    if not p.is_dir():
        return None
    return p / kwargs["subfolder"] if kwargs.get("subfolder") else p


def _load_error(cfg: ModelConfig, source: str, kwargs: dict[str, Any], err: Exception) -> ModelLoadError:
    """What went wrong loading from a local folder, or the hub error (with its download line) otherwise."""
    root = _local_root(source, kwargs)
    if root is None:
        return _hub_error(cfg, err)
    return ModelLoadError(f"cannot load model folder {root}: {_first_line(err)}")


def _check_config_json(root: Path) -> None:
    try:
        json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(
            f"{root / 'config.json'} is not valid JSON ({_first_line(e)}); re-download the model or fix the file"
        ) from None


def read_model_type(source: str, kwargs: dict[str, Any], cfg: ModelConfig) -> str:
    """The checkpoint's model_type; refuses configs that are not JSON and text-only (or other non-VLM) models."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    root = _local_root(source, kwargs)
    if root is not None:
        _check_config_json(root)
    try:
        conf = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except OSError as e:
        raise _load_error(cfg, source, kwargs, e) from None
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot read the config of '{cfg.model}': {_first_line(e)}") from None
    model_type = str(conf.model_type)
    custom = cfg.trust_remote_code and bool(getattr(conf, "auto_map", None))  # its own code decides
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and not custom:
        arch = ", ".join(getattr(conf, "architectures", None) or []) or "no architectures listed"
        raise ModelLoadError(
            f"'{cfg.model}' is a '{model_type}' model ({arch}), not an image-text-to-text model; facellm needs a "
            "vision-language checkpoint such as InternVL3 or Qwen2-VL (for a FaceLLM release, pass its 'model' "
            "subfolder)"
        )
    return model_type


def _weight_files(source: str, kwargs: dict[str, Any]) -> list[Path]:
    """The safetensors files of a local folder or of the hub cache's snapshot of ``source``."""
    root = _local_root(source, kwargs)
    if root is None:
        from transformers.utils import cached_file

        try:
            conf = cached_file(source, "config.json", _raise_exceptions_for_missing_entries=False, **kwargs)
        except OSError:
            conf = None
        root = Path(conf).parent if conf else None
    return sorted(root.glob("*.safetensors")) if root is not None else []


def corrupt_file_error(files: list[Path], err: BaseException, what: str = "model weights") -> ModelLoadError | None:
    """When ``err`` comes from a damaged safetensors file, the error naming that file (None otherwise)."""
    if type(err).__name__ != "SafetensorError" and "safetensor" not in type(err).__module__.lower():
        return None
    from safetensors import safe_open

    bad = None
    for f in files:
        try:
            with safe_open(str(f), framework="pt"):  # opening checks the header covers the whole file
                pass
        except Exception:  # noqa: BLE001 - any failure to open means this is the damaged file
            bad = f
            break
    name = str(bad) if bad else (", ".join(str(f) for f in files) or "a .safetensors file")
    return ModelLoadError(f"{what} {name} is corrupt or incomplete ({_first_line(err)}); re-download it")


def image_only_class(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """The processor class with its video sub-processor slot removed (same name, same behaviour for images)."""

    def get_attributes(c: type) -> list[str]:
        # the parent's classmethod run for the subclass; mypy types a bound classmethod without __func__
        return [a for a in cls.get_attributes.__func__(c) if "video" not in a]  # type: ignore[attr-defined]

    attrs = {"get_attributes": classmethod(get_attributes), "__module__": cls.__module__}
    return type(cls.__name__, (cls,), attrs)


def _processor_class_name(source: str, kwargs: dict[str, Any], model_type: str) -> str | None:
    """processor_class recorded in the checkpoint, else the auto mapping for its model type."""
    from transformers.utils import cached_file

    for fname in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        try:
            resolved = cached_file(source, fname, _raise_exceptions_for_missing_entries=False, **kwargs)
        except OSError:
            resolved = None
        if resolved:
            data = json.loads(Path(resolved).read_text(encoding="utf-8"))
            name = data.get("processor_class")
            if name:
                return str(name)
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    return PROCESSOR_MAPPING_NAMES.get(model_type)


def _lacks_video_config(source: str, kwargs: dict[str, Any], model_type: str) -> bool:
    """A local checkpoint saved image-only (by facellm before it wrote complete processors): loading its
    processor class with torchvision would fail with "Can't load video processor", so it is built image-only."""
    from .processor_files import has_video_config

    root = Path(source) / kwargs.get("subfolder", "")
    if not root.is_dir() or has_video_config(root):
        return False
    name = _processor_class_name(source, kwargs, model_type) or ""
    import transformers

    lacks = hasattr(transformers, name.removesuffix("Processor") + "VideoProcessor")
    if lacks:
        log.warning("%s has no video_preprocessor_config.json; loading its processor image-only", root)
    return lacks


def load_processor(source: str, kwargs: dict[str, Any], cfg: ModelConfig, model_type: str) -> tuple[Processor, bool]:
    """Load the checkpoint's processor; image-only when torchvision is missing. Returns (processor, image_only)."""
    import transformers
    from transformers import AutoProcessor

    if cfg.trust_remote_code or (torchvision_available() and not _lacks_video_config(source, kwargs, model_type)):
        try:
            return AutoProcessor.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **kwargs), False
        except OSError as e:
            raise _load_error(cfg, source, kwargs, e) from None
    name = _processor_class_name(source, kwargs, model_type)
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise ModelLoadError(
            f"no processor class known for model type '{model_type}' of '{cfg.model}' without torchvision; "
            "install a torch/torchvision pair that import together, "
            "or allow custom code with --set model.trust_remote_code=true"
        )
    try:
        proc = image_only_class(cls).from_pretrained(source, backend="pil", **kwargs)
    except OSError as e:
        raise _load_error(cfg, source, kwargs, e) from None
    return proc, True


def quantization_config(cfg: ModelConfig, device: str) -> BitsAndBytesConfig | None:
    """BitsAndBytesConfig for 4/8-bit, or None. Raises QuantizationError where bitsandbytes cannot run."""
    if cfg.quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError(
            f"--quantization {cfg.quantization} needs bitsandbytes: pip install 'facellm[quant]' "
            "(or use --quantization none)"
        )
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # a broken native library surfaces as many exception types
        raise QuantizationError(
            f"--quantization {cfg.quantization}: bitsandbytes is installed but cannot run here "
            f"({type(e).__name__}: {e}); use --quantization none, or reinstall bitsandbytes for this platform"
        ) from None
    if device == "mps":
        raise QuantizationError(f"--quantization {cfg.quantization} is not supported on mps; use --quantization none")
    import torch
    from transformers import BitsAndBytesConfig

    skip = list(SKIP_QUANT_PATTERNS)
    if cfg.quantization == "4bit":
        compute = torch.bfloat16 if (not device.startswith("cuda") or torch.cuda.is_bf16_supported()) else torch.float16
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def _apply_adapter(model: GenerativeModel, cfg: ModelConfig, source: str) -> GenerativeModel | PeftModel:
    adapter = Path(cfg.adapter or "").expanduser()
    if not (adapter / "adapter_config.json").is_file():
        raise AdapterError(
            f"adapter folder not found or not a PEFT adapter: {cfg.adapter} (expected adapter_config.json inside; "
            "point --adapter at a finetune output folder)"
        )
    try:
        from peft import PeftModel
    except ImportError:
        raise MissingDependencyError("loading an adapter", "models", "peft") from None
    try:
        base_name = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except ValueError:
        base_name = None
    try:
        with_adapter = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except Exception as e:
        corrupt = corrupt_file_error(sorted(adapter.glob("*.safetensors")), e, "adapter weights")
        if corrupt is not None:
            raise corrupt from None
        if not isinstance(e, (RuntimeError, ValueError, KeyError)):
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        trained_on = f" (it was trained on '{base_name}')" if base_name else ""
        raise AdapterError(
            f"adapter {cfg.adapter} does not match base model {cfg.model}{trained_on}: {first}. "
            "Load the base model the adapter was trained on"
        ) from None
    if cfg.merge_adapter:
        merged: GenerativeModel = with_adapter.merge_and_unload()
        return merged
    return with_adapter


def load_model_and_processor(cfg: ModelConfig) -> LoadedModel:
    """Load model + processor as ``cfg`` says; every failure is a ModelLoadError that names the fix."""
    require_model_extras("loading a model")
    source, kwargs = resolve_source(cfg)
    model_type = read_model_type(source, kwargs, cfg)
    device = choose_device(cfg.device)
    dtype = choose_dtype(cfg.dtype, device)
    threads = None
    if device == "cpu":
        from ..runtime import configure_threads

        threads = configure_threads(cfg.threads)
    qconf = quantization_config(cfg, device)
    processor, image_only = load_processor(source, kwargs, cfg, model_type)
    load_kwargs = _model_load_kwargs(cfg, kwargs, dtype, qconf, device)
    model = _load_model(cfg, source, kwargs, load_kwargs, model_type)
    if qconf is None:
        # transformers wraps PreTrainedModel.to with functools.wraps, which typeshed types as an unbound callable
        model.to(device)  # type: ignore[arg-type]
    ready: GenerativeModel | PeftModel = _apply_adapter(model, cfg, source) if cfg.adapter else model
    ready.eval()
    _default_pad_token(ready, processor)
    return LoadedModel(
        model=ready,
        processor=processor,
        config=cfg,
        device=device,
        dtype=dtype,
        model_type=model_type,
        name=Path(cfg.model).name if Path(cfg.model).exists() else cfg.model,
        image_only_processor=image_only,
        threads=threads,
    )


def _model_load_kwargs(
    cfg: ModelConfig, kwargs: dict[str, Any], dtype: str, qconf: BitsAndBytesConfig | None, device: str
) -> dict[str, Any]:
    """``from_pretrained``'s arguments: dtype, attention, hub options and, when quantizing, its config."""
    import torch

    load_kwargs: dict[str, Any] = dict(
        dtype=getattr(torch, dtype),
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
        **kwargs,
    )
    if kwargs.get("local_files_only"):  # transformers' adapter lookup does not pass it on by itself
        load_kwargs["adapter_kwargs"] = {"local_files_only": True}
    if qconf is not None:
        load_kwargs["quantization_config"] = qconf
        load_kwargs["device_map"] = {"": device}
    return load_kwargs


def _load_model(
    cfg: ModelConfig, source: str, kwargs: dict[str, Any], load_kwargs: dict[str, Any], model_type: str
) -> GenerativeModel:
    """The model from ``source``; transformers' errors become ones that name the fix (sdpa falls back to eager)."""
    from transformers import AutoModelForImageTextToText

    quantized = "quantization_config" in load_kwargs
    try:
        try:
            return AutoModelForImageTextToText.from_pretrained(source, **load_kwargs)
        except Exception as e:  # a damaged weights file surfaces as safetensors' own error type
            corrupt = corrupt_file_error(_weight_files(source, kwargs), e)
            if corrupt is not None:
                raise corrupt from None
            raise
    except OSError as e:
        raise _load_error(cfg, source, kwargs, e) from None
    except ValueError as e:
        msg = str(e)
        is_attention = "attn" in msg.lower() or "attention" in msg.lower()
        if not (is_attention and cfg.attn_implementation == "sdpa"):
            raise _value_error(cfg, msg, is_attention, quantized) from None
        log.warning("sdpa attention not supported by %s; using eager", model_type)
        load_kwargs["attn_implementation"] = "eager"
        return AutoModelForImageTextToText.from_pretrained(source, **load_kwargs)
    except (RuntimeError, ImportError) as e:
        if quantized:
            raise QuantizationError(
                f"--quantization {cfg.quantization} cannot run here ({type(e).__name__}: {str(e).splitlines()[0]}); "
                "use --quantization none"
            ) from None
        raise


def _value_error(cfg: ModelConfig, msg: str, is_attention: bool, quantized: bool) -> ModelLoadError:
    """The error for a ValueError from ``from_pretrained``: the attention, the quantization, or the model."""
    if is_attention:
        return ModelLoadError(
            f"attention '{cfg.attn_implementation}' cannot be used for '{cfg.model}': {msg.splitlines()[0]}; "
            "use --set model.attn_implementation=sdpa (or eager)"
        )
    if quantized:
        return QuantizationError(
            f"--quantization {cfg.quantization} failed for '{cfg.model}': {msg.splitlines()[0]}; "
            "use --quantization none"
        )
    return ModelLoadError(f"cannot load '{cfg.model}': {msg.splitlines()[0]}")


def _default_pad_token(model: GenerativeModel | PeftModel, processor: Processor) -> None:
    """Generation pads with the tokenizer's pad token (else its end token) when the model names none."""
    tok = getattr(processor, "tokenizer", None)
    gen = getattr(model, "generation_config", None)
    if tok is not None and gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
