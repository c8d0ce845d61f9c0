"""OpenAI chat messages -> a :class:`Prompt` with decoded images.

Images arrive as ``data:`` URIs (base64 JPEG, PNG or WebP) and are decoded only
through :func:`images.open_image`, which enforces the pixel budget before decoding.
``http(s)`` URLs are fetched only when the server was started with
``--allow-remote-images`` (a server that fetches arbitrary URLs can be pointed at
internal hosts), and every other scheme is refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ImageError
from ..images import open_image
from ..infer.generate import Prompt
from .protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    ImagePart,
    ProtocolError,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    SystemMessage,
    TextPart,
)

if TYPE_CHECKING:
    from PIL import Image as PILImage

_DATA_URI = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.DOTALL)
_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"))


@dataclass(frozen=True)
class ImageLimits:
    """What one request may send: image count, decoded pixels per image, remote fetching."""

    max_images: int
    max_pixels: int
    allow_remote: bool = False
    remote_max_bytes: int = 20_000_000
    remote_timeout_s: float = 10.0


def sniff_format(data: bytes) -> str | None:
    """JPEG, PNG or WEBP from the first bytes, else None (the formats the API accepts)."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_data_uri(url: str, param: str) -> bytes:
    """The raw bytes of a base64 ``data:image/...`` URI (400 for anything else)."""
    m = _DATA_URI.match(url)
    if not m:
        raise ProtocolError(
            "image_url must be a base64 data URI like data:image/jpeg;base64,... "
            f"(got '{url[:40]}{'...' if len(url) > 40 else ''}')",
            param=param,
            code="invalid_image_url",
        )
    mime = m.group("mime").lower()
    if mime and not mime.startswith("image/"):
        raise ProtocolError(
            f"data URI media type '{mime}' is not an image (use image/jpeg, image/png or image/webp)",
            param=param,
            code="invalid_image_format",
        )
    payload = re.sub(r"\s+", "", m.group("data"))
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("image data is not valid base64", param=param, code="invalid_base64") from None
    if not raw:
        raise ProtocolError("image data is empty", param=param, code="invalid_image")
    return raw


def fetch_remote(url: str, param: str, limits: ImageLimits) -> bytes:
    """GET an http(s) image with a timeout and a byte cap (only when remote images are allowed)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"User-Agent": "facellm-serve"})
    try:
        with urllib.request.urlopen(req, timeout=limits.remote_timeout_s) as resp:  # noqa: S310 - scheme checked by caller
            data = resp.read(limits.remote_max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ProtocolError(f"could not fetch image {url}: {reason}", param=param, code="image_fetch_failed") from None
    if len(data) > limits.remote_max_bytes:
        raise ProtocolError(
            f"remote image {url} is larger than {limits.remote_max_bytes:,} bytes",
            status=413,
            param=param,
            code="image_too_large",
        )
    return data


def load_image(url: str, param: str, limits: ImageLimits) -> PILImage.Image:
    """Bytes from a data URI (or an allowed remote URL), checked to be JPEG/PNG/WebP, decoded by open_image."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        raw = decode_data_uri(url, param)
    elif scheme in ("http", "https"):
        if not limits.allow_remote:
            raise ProtocolError(
                "remote image URLs are disabled on this server: send the image inline as a base64 data URI "
                "(or start the server with --allow-remote-images)",
                param=param,
                code="remote_images_disabled",
            )
        raw = fetch_remote(url, param, limits)
    else:
        raise ProtocolError(
            f"unsupported image URL scheme '{scheme or url[:20]}' (send a base64 data: URI)",
            param=param,
            code="invalid_image_url",
        )
    if sniff_format(raw) is None:
        raise ProtocolError("image data is not a JPEG, PNG or WebP image", param=param, code="invalid_image_format")
    try:
        return open_image(raw, max_pixels=limits.max_pixels, name=param)
    except ImageError as e:
        if e.reason.startswith("image too large"):
            raise ProtocolError(f"{e.reason}", status=413, param=param, code="image_too_large") from None
        raise ProtocolError(f"{e.reason}", param=param, code="invalid_image") from None


def json_instruction(req: ChatCompletionRequest) -> str | None:
    """The instruction that asks for JSON output when ``response_format`` wants it (no constrained decoding)."""
    rf = req.response_format
    if isinstance(rf, ResponseFormatJsonObject):
        return "Respond with a single valid JSON object and nothing else."
    if isinstance(rf, ResponseFormatJsonSchema):
        schema = rf.json_schema.schema_
        text = "Respond with a single valid JSON value and nothing else"
        if schema is not None:
            text += f", matching this JSON schema: {json.dumps(schema, separators=(',', ':'))}"
        return text + "."
    return None


def extract_json(text: str) -> str:
    """The JSON in a reply asked to be JSON: unchanged when it parses, else the outermost {...} that parses."""
    try:
        json.loads(text)
        return text
    except ValueError:
        pass
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        inner = text[start : end + 1]
        try:
            json.loads(inner)
            return inner
        except ValueError:
            pass
    return text


def _text_of(content: str | list[TextPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content)


def to_prompt(req: ChatCompletionRequest, limits: ImageLimits, default_system: str | None = None) -> Prompt:
    """The conversation in transformers' multimodal format, with its images decoded in order.

    Raises ProtocolError (400/413) for too many images and for any image that cannot be used.
    """
    n_images = sum(
        1
        for m in req.messages
        if not isinstance(m, (SystemMessage, AssistantMessage)) and not isinstance(m.content, str)
        for p in m.content
        if isinstance(p, ImagePart)
    )
    if n_images > limits.max_images:
        raise ProtocolError(
            f"too many images: {n_images} in this request, the server allows {limits.max_images} "
            "(send fewer or start the server with a higher --set max_images_per_request)",
            param="messages",
            code="too_many_images",
        )
    messages: list[dict[str, Any]] = []
    images: list[PILImage.Image] = []
    last_user_text = ""
    for i, m in enumerate(req.messages):
        if isinstance(m, SystemMessage):
            messages.append({"role": "system", "content": [{"type": "text", "text": _text_of(m.content)}]})
        elif isinstance(m, AssistantMessage):
            messages.append({"role": "assistant", "content": [{"type": "text", "text": _text_of(m.content)}]})
        else:
            parts: list[dict[str, Any]] = []
            texts: list[str] = []
            content = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else m.content
            for j, part in enumerate(content):
                if isinstance(part, ImagePart):
                    images.append(load_image(part.image_url.url, f"messages.{i}.content.{j}.image_url.url", limits))
                    parts.append({"type": "image"})
                else:
                    parts.append({"type": "text", "text": part.text})
                    texts.append(part.text)
            messages.append({"role": "user", "content": parts})
            last_user_text = "\n".join(texts)
    instruction = json_instruction(req)
    has_system = bool(messages) and messages[0]["role"] == "system"
    if default_system and not has_system:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": default_system}]})
        has_system = True
    if instruction:
        if has_system:
            messages[0]["content"].append({"type": "text", "text": "\n\n" + instruction})
        else:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": instruction}]})
    return Prompt(images=images, text=last_user_text, system=None, messages=messages)
