"""``facellm ask``: answer one question about one or many images with a loaded model."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import AskConfig
from ..errors import FacellmError, ImageError
from ..images import find_images, open_image
from .engine import Engine, as_engine
from .generate import Prompt

if TYPE_CHECKING:
    from ..models.loader import LoadedModel


@dataclass
class AskResult:
    image: str
    question: str
    answer: str | None
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "image": self.image,
            "question": self.question,
            "answer": self.answer,
            "model": self.model,
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens},
            "seconds": round(self.seconds, 4),
        }
        if self.error:
            out["error"] = self.error
        return out


def resolve_inputs(inputs: Sequence[str]) -> list[str]:
    """Paths, folders and globs -> image paths (``-`` kept for stdin). Errors if nothing matched."""
    paths = [str(p) for p in find_images(inputs)]
    if not paths:
        raise FacellmError(f"no images found in: {' '.join(inputs)} (give image files, folders or globs)")
    if paths.count("-") > 1:
        raise FacellmError("'-' (stdin) can be given only once")
    return paths


def _open(path: str, stdin_bytes: bytes | None) -> object:
    if path == "-":
        return open_image(stdin_bytes or b"", name="<stdin>")
    return open_image(path)


def ask_stream(
    lm: LoadedModel | Engine, cfg: AskConfig, image: str, question: str, stdin_bytes: bytes | None = None
) -> Iterator[str]:
    """Stream the answer for a single image (raises ImageError if it cannot be opened)."""
    img = _open(image, stdin_bytes)
    prompt = Prompt(images=[img], text=question, system=cfg.generation.system)  # type: ignore[list-item]
    yield from as_engine(lm).stream(prompt, cfg.generation)


def ask_many(
    lm: LoadedModel | Engine, cfg: AskConfig, images: Sequence[str], question: str, stdin_bytes: bytes | None = None
) -> Iterator[AskResult]:
    """Answer ``question`` for each image in batches; a bad image yields a result with ``error`` and is skipped."""
    engine = as_engine(lm)
    pending: list[tuple[str, object]] = []

    def flush() -> Iterator[AskResult]:
        if not pending:
            return
        t0 = time.perf_counter()
        prompts = [Prompt(images=[img], text=question, system=cfg.generation.system) for _, img in pending]  # type: ignore[list-item]
        gens = engine.generate(prompts, cfg.generation)
        per = (time.perf_counter() - t0) / len(pending)
        for (path, _), g in zip(pending, gens, strict=True):
            yield AskResult(path, question, g.text, engine.name, g.prompt_tokens, g.completion_tokens, per)
        pending.clear()

    for path in images:
        try:
            img = _open(path, stdin_bytes)
        except ImageError as e:
            yield AskResult(path if path != "-" else "<stdin>", question, None, engine.name, error=str(e))
            continue
        pending.append((path if path != "-" else "<stdin>", img))
        if len(pending) >= cfg.batch_size:
            yield from flush()
    yield from flush()
