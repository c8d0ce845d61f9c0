"""What goes into a chat request: messages with images as data URIs, and where the endpoint is."""

from __future__ import annotations

from typing import Any

_LOCAL_HOSTS = ("://127.0.0.1", "://localhost", "://[::1]", "://0.0.0.0")


def is_local_endpoint(base_url: str | None) -> bool:
    """Local servers (facellm serve, vLLM, llama.cpp) usually need no API key."""
    return base_url is not None and any(h in base_url for h in _LOCAL_HOSTS)


def chat_messages(
    system: str | None, text: str, images: list[str], *, detail: str | None = None, images_first: bool = False
) -> list[dict[str, Any]]:
    """A system message (when given) and one user message holding ``text`` and each image data URI.

    ``detail`` is OpenAI's image detail level (left out when None). Images go after the
    text unless ``images_first`` (FaceXBench prompts refer to "the image(s) above").
    """
    image_parts: list[dict[str, Any]] = []
    for uri in images:
        part: dict[str, Any] = {"url": uri}
        if detail is not None:
            part["detail"] = detail
        image_parts.append({"type": "image_url", "image_url": part})
    text_part = [{"type": "text", "text": text}]
    content = [*image_parts, *text_part] if images_first else [*text_part, *image_parts]
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": content})
    return messages


def chat_request(
    model: str,
    messages: list[dict[str, Any]],
    max_tokens: int | None = None,
    temperature: float | None = None,
    response_format: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The body of one chat-completions request (live calls and Batch API lines alike); unset options are left out."""
    body: dict[str, Any] = {"model": model, "messages": messages}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    if response_format is not None:
        body["response_format"] = response_format
    return body
