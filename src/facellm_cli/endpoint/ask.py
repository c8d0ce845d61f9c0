"""``facellm ask --base-url``: the same question about images, answered by a model behind an OpenAI-compatible endpoint.

One image streams its answer; several are asked ``concurrency`` at a time through
the shared :class:`~.client.ChatClient` and come back in the order given.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ..config import AskConfig
from ..errors import ImageError
from ..images import encode_for_request
from ..infer.ask import AskResult
from .client import ChatClient, RequestFailed, as_completed, iterate_sync
from .messages import chat_messages


def _messages(cfg: AskConfig, image: str, question: str, stdin_bytes: bytes | None) -> list[dict[str, Any]]:
    """The request for one image (``-`` is stdin); raises ImageError before anything is sent."""
    assert cfg.endpoint is not None
    if image == "-":
        enc = encode_for_request(stdin_bytes or b"", cfg.endpoint.max_image_side, name="<stdin>")
    else:
        enc = encode_for_request(image, cfg.endpoint.max_image_side)
    return chat_messages(cfg.generation.system, question, [enc.data_uri])


def _client(cfg: AskConfig, api_key: str | None) -> ChatClient:
    assert cfg.endpoint is not None
    gen = cfg.generation
    return ChatClient(cfg.endpoint, api_key, max_tokens=gen.max_new_tokens, temperature=gen.temperature)


def ask_remote_stream(
    cfg: AskConfig, api_key: str | None, image: str, question: str, stdin_bytes: bytes | None = None
) -> Iterator[str]:
    """Stream the endpoint's answer for one image (raises ImageError if it cannot be opened)."""
    messages = _messages(cfg, image, question, stdin_bytes)
    client = _client(cfg, api_key)
    return iterate_sync(client, client.stream(messages))


def ask_remote_many(
    cfg: AskConfig, api_key: str | None, images: Sequence[str], question: str, stdin_bytes: bytes | None = None
) -> Iterator[AskResult]:
    """Answer ``question`` for each image, in the given order; a bad image or request yields a result with ``error``."""
    assert cfg.endpoint is not None
    client = _client(cfg, api_key)
    model = cfg.endpoint.model

    async def one(item: tuple[int, str]) -> AskResult:
        name = "<stdin>" if item[1] == "-" else item[1]
        t0 = time.perf_counter()
        try:
            messages = await asyncio.to_thread(_messages, cfg, item[1], question, stdin_bytes)
            r = await client.chat(messages)
        except (ImageError, RequestFailed) as e:
            return AskResult(name, question, None, model, error=str(e))
        answer = r.text if r.malformed is None else None
        error = f"malformed response ({r.malformed})" if r.malformed else None
        seconds = time.perf_counter() - t0
        return AskResult(name, question, answer, model, r.prompt_tokens, r.completion_tokens, seconds, error=error)

    ready: dict[int, AskResult] = {}
    nxt = 0
    for (i, _), result in iterate_sync(client, as_completed(enumerate(images), one, cfg.endpoint.concurrency)):
        ready[i] = result
        while nxt in ready:
            yield ready.pop(nxt)
            nxt += 1
