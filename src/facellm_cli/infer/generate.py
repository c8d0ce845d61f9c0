"""Prompt building and batched / streamed generation over a :class:`LoadedModel`.

Prompts are rendered with the checkpoint's own chat template through its
processor, so any ``AutoModelForImageTextToText`` family works unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from ..config import GenerationConfig
from ..errors import ConfigError

if TYPE_CHECKING:
    import torch
    from PIL import Image as PILImage

    from ..models.loader import LoadedModel
    from .engine import Engine


@dataclass
class Prompt:
    """One request: images (in order) and the user's text, plus an optional system prompt.

    ``messages`` (optional) is a whole transformers-format conversation (multi-turn, as
    ``serve`` receives it); when given it is rendered instead of the single turn built from
    ``system`` and ``text``, and ``images`` must follow the order of its image parts.
    """

    images: Sequence[PILImage.Image]
    text: str
    system: str | None = None
    messages: list[dict[str, Any]] | None = None


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (eos) or "length"


def build_messages(prompt: Prompt) -> list[dict[str, Any]]:
    """Chat messages in the transformers multimodal format: image parts first, then the text."""
    if prompt.messages is not None:
        return prompt.messages
    messages: list[dict[str, Any]] = []
    if prompt.system:
        messages.append({"role": "system", "content": [{"type": "text", "text": prompt.system}]})
    content: list[dict[str, Any]] = [{"type": "image"} for _ in prompt.images]
    content.append({"type": "text", "text": prompt.text})
    messages.append({"role": "user", "content": content})
    return messages


def render_prompt(lm: LoadedModel | Engine, prompt: Prompt) -> str:
    text = lm.processor.apply_chat_template(build_messages(prompt), add_generation_prompt=True, tokenize=False)
    return cast(str, text)  # tokenize=False renders text (the tokenizer's signature also covers token ids)


def encode(lm: LoadedModel, texts: list[str], images: list[PILImage.Image], *, padding_side: str = "left") -> Any:
    """Tokenize texts with their images, on the model's device.

    Generation pads on the left (new tokens follow each prompt directly); likelihood scoring pads on the
    right. The side is passed per call, so the tokenizer's own ``padding_side`` is never changed.
    """
    with lm.tokenizer_lock:
        batch = lm.processor(
            text=texts, images=images or None, return_tensors="pt", padding=True, padding_side=padding_side
        )
    batch.pop("token_type_ids", None)
    return batch.to(lm.device)


def eos_ids(lm: LoadedModel) -> set[int]:
    """Token ids that end an answer: the generation config's and the tokenizer's."""
    ids: set[int] = set()
    gen_eos = getattr(lm.model.generation_config, "eos_token_id", None)
    for value in (gen_eos, lm.tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def context_length(lm: LoadedModel | Engine) -> int | None:
    """Positions the language model was built for (``max_position_embeddings``), or None when not recorded.

    An engine may be given too: the vLLM engine's context is its ``max_model_len``."""
    fixed = getattr(lm, "context_length", None)
    if isinstance(fixed, int):
        return fixed
    loaded = cast("LoadedModel", getattr(lm, "lm", lm))  # the transformers engine's loaded model
    conf = getattr(loaded.model, "config", None)
    for c in (getattr(conf, "text_config", None), conf):
        n = getattr(c, "max_position_embeddings", None) if c is not None else None
        if isinstance(n, int) and n > 0:
            return n
    return None


def check_max_new_tokens(lm: LoadedModel | Engine, cfg: GenerationConfig) -> None:
    """Refuse an answer budget the model's context cannot hold (it would otherwise decode for hours)."""
    n = context_length(lm)
    if n is not None and cfg.max_new_tokens >= n:
        raise ConfigError(
            f"generation.max_new_tokens: {cfg.max_new_tokens:,} does not fit the model's context of {n:,} tokens "
            f"(prompt and answer share it); use --max-new-tokens below {n:,}"
        )


def _generate_kwargs(lm: LoadedModel, cfg: GenerationConfig) -> dict[str, Any]:
    import torch

    kwargs: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "pad_token_id": lm.tokenizer.pad_token_id}
    if cfg.temperature > 0:
        kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p)
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def generate_batch(
    lm: LoadedModel,
    prompts: Sequence[Prompt],
    cfg: GenerationConfig,
    *,
    stopping_criteria: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> list[Generation]:
    """Answer several prompts in one ``generate`` call.

    ``stopping_criteria`` (a transformers ``StoppingCriteria``) may stop rows one by one
    (``serve`` uses it for per-request token limits, stop strings, streaming and cancelled
    clients); stopped rows are padded, so their text ends where the criteria stopped them.
    """
    import torch

    if not prompts:
        return []
    texts = [render_prompt(lm, p) for p in prompts]
    images = [img for p in prompts for img in p.images]
    batch = encode(lm, texts, images)
    with torch.inference_mode():
        extra: dict[str, Any] = {}
        if stopping_criteria is not None:
            from transformers import StoppingCriteriaList

            extra["stopping_criteria"] = StoppingCriteriaList([stopping_criteria])
        out = lm.model.generate(**batch, **_generate_kwargs(lm, cfg), **extra)
    prompt_len = batch["input_ids"].shape[1]
    new = out[:, prompt_len:]
    eos = eos_ids(lm)
    pad = lm.tokenizer.pad_token_id
    results = []
    for row, mask in zip(new.tolist(), batch["attention_mask"].tolist(), strict=True):
        n = 0
        finish = "length"
        for t in row:
            if t in eos:
                finish = "stop"
                break
            if t == pad and pad not in eos:
                finish = "stop"
                break
            n += 1
        text = cast(str, lm.tokenizer.decode(row[:n], skip_special_tokens=True))  # one id list: one string
        results.append(
            Generation(text=text.strip(), prompt_tokens=int(sum(mask)), completion_tokens=n, finish_reason=finish)
        )
    return results


class _StreamRow:
    """The single row of :func:`stream_generate`: its text goes to a queue read by the caller's thread."""

    stream = True
    stop: tuple[str, ...] = ()

    def __init__(self, max_tokens: int) -> None:
        import queue

        self.max_tokens = max_tokens
        self.pieces: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.cancelled = threading.Event()

    def is_cancelled(self) -> bool:
        return self.cancelled.is_set()

    def emit(self, text: str) -> None:
        self.pieces.put(text)


def stream_generate(lm: LoadedModel, prompt: Prompt, cfg: GenerationConfig) -> Iterator[str]:
    """Yield text pieces as they are generated (one prompt), through the same per-row control as ``serve``.

    Generation runs in a worker thread; closing the iterator early stops it at the next token."""
    from .rows import RowControl

    row = _StreamRow(cfg.max_new_tokens)
    control = RowControl(lm, [row])
    error: list[BaseException] = []

    def work() -> None:
        try:
            generate_batch(lm, [prompt], cfg, stopping_criteria=control)
            control.finish()
        except BaseException as e:  # surfaced in the caller's thread below
            error.append(e)
        finally:
            row.pieces.put(None)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (piece := row.pieces.get()) is not None:
            yield piece
    finally:
        row.cancelled.set()
        thread.join()
    if error:
        raise error[0]
