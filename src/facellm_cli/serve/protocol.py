"""Request and response shapes of OpenAI's chat completions API, as far as ``serve`` implements them.

Requests are validated strictly (``extra="forbid"`` everywhere): a field we do not know
is a 400 naming the field, so a client never silently gets behaviour it did not ask
for. Fields OpenAI defines but we cannot honour (tools, logprobs, penalties, n > 1,
audio ...) are refused with a message saying so, unless they carry their neutral value.
Fields that cannot change the answer (``service_tier``, ``prompt_cache_key``, ``user``,
``metadata`` ...), which official clients and proxies send, are accepted and ignored
(``IGNORED_FIELDS``; the server logs each once), as vLLM does.
Responses are plain dicts built by the helpers at the end, in OpenAI's exact layout.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "IGNORED_FIELDS",
    "ChatCompletionRequest",
    "ProtocolError",
    "chunk",
    "completion",
    "decode_request",
    "error_body",
    "format_validation_error",
    "parse_request",
]


class ProtocolError(Exception):
    """A request the server refuses; rendered as OpenAI-style error JSON with ``status``."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


UserPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: str | list[UserPart]
    name: str | None = None


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    refusal: str | None = None


Message = Annotated[SystemMessage | UserMessage | AssistantMessage, Field(discriminator="role")]


class JsonSchemaFormat(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("schema_")
    @classmethod
    def _schema_shape(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            _check_schema(v, "schema")
        return v


_JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def _check_schema(node: Any, where: str) -> None:
    """Structural check of a JSON schema (no jsonschema dependency): types, properties, items, required."""
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise ValueError(f"{where} must be a JSON schema object, got {type(node).__name__}")
    t = node.get("type")
    types = t if isinstance(t, list) else [t] if t is not None else []
    for item in types:
        if item not in _JSON_TYPES:
            raise ValueError(f"{where}.type '{item}' is not a JSON schema type ({', '.join(sorted(_JSON_TYPES))})")
    props = node.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            raise ValueError(f"{where}.properties must be an object")
        for key, sub in props.items():
            _check_schema(sub, f"{where}.properties.{key}")
    if "items" in node:
        _check_schema(node["items"], f"{where}.items")
    req = node.get("required")
    if req is not None and not (isinstance(req, list) and all(isinstance(r, str) for r in req)):
        raise ValueError(f"{where}.required must be a list of property names")


class ResponseFormatText(_Strict):
    type: Literal["text"]


class ResponseFormatJsonObject(_Strict):
    type: Literal["json_object"]


class ResponseFormatJsonSchema(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")
]


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class ChatCompletionRequest(_Strict):
    """``POST /v1/chat/completions`` body. Omitted sampling fields take the server's defaults."""

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # Accepted and ignored: they cannot change the answer (see IGNORED_FIELDS).
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    verbosity: str | None = None
    parallel_tool_calls: bool | None = None
    # Accepted only at their neutral value, refused otherwise (see _refuse_unsupported).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, int] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(items)}")
        if any(not s for s in items):
            raise ValueError("stop sequences must not be empty strings")
        return v

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> ChatCompletionRequest:
        if self.n not in (None, 1):
            raise ProtocolError(f"n={self.n} is not supported: this server returns one choice (use n=1)", param="n")
        neutral = {
            "frequency_penalty": lambda v: v == 0,
            "presence_penalty": lambda v: v == 0,
            "logprobs": lambda v: v is False,
            "top_logprobs": lambda v: v == 0,
            "tools": lambda v: v == [],
            "tool_choice": lambda v: v in ("none", "auto"),
            "functions": lambda v: v == [],
            "function_call": lambda v: v in ("none", "auto"),
            "logit_bias": lambda v: v == {},
            "prediction": lambda v: False,  # only null is neutral
            "audio": lambda v: False,
        }
        for field, is_neutral in neutral.items():
            value = getattr(self, field)
            if value is not None and not is_neutral(value):
                raise ProtocolError(f"{field}={value!r} is not supported by this server (leave it out)", param=field)
        if self.modalities not in (None, ["text"]):
            raise ProtocolError(
                f"modalities={self.modalities!r} is not supported: this server answers text only", param="modalities"
            )
        if self.stream_options is not None and not self.stream:
            raise ProtocolError("stream_options is only allowed when stream is true", param="stream_options")
        if not any(isinstance(m, UserMessage) for m in self.messages):
            raise ProtocolError("messages must contain at least one user message", param="messages")
        return self

    def ignored_fields(self) -> list[str]:
        """Fields this request sent that the server accepts without acting on them."""
        return [f for f in IGNORED_FIELDS if f in self.model_fields_set and getattr(self, f) is not None]

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# Sent by official clients and proxies; none of them can change the generated answer. The
# neutral-valued ones (penalties 0, tools [], ...) are listed too, so each is logged once.
IGNORED_FIELDS = (
    "service_tier",
    "reasoning_effort",
    "prompt_cache_key",
    "safety_identifier",
    "verbosity",
    "user",
    "metadata",
    "store",
    "parallel_tool_calls",
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
)

_ROLE_OR_PART_TAGS = {"system", "developer", "user", "assistant", "text", "image_url"}
_FORMAT_TAGS = {"text", "json_object", "json_schema"}


def _clean_loc(loc: tuple[Any, ...]) -> str:
    """Pydantic's location without union-branch and tag segments, e.g. ``messages.0.content.1.image_url.url``."""
    kept: list[Any] = []
    expect_tag: set[str] = set()
    for part in loc:
        if isinstance(part, str) and ("[" in part or part == "str"):
            continue
        if expect_tag and part in expect_tag:
            expect_tag = set()
            continue  # the tag pydantic inserts after a discriminated union
        expect_tag = set()
        if isinstance(part, int) and kept and kept[-1] in ("messages", "content"):
            expect_tag = _ROLE_OR_PART_TAGS
        elif part == "response_format":
            expect_tag = _FORMAT_TAGS
        kept.append(part)
    return ".".join(str(p) for p in kept)


def format_validation_error(err: ValidationError) -> ProtocolError:
    """Pydantic problems as one OpenAI-style 400 whose message names each field and what is wrong."""
    items = [(_clean_loc(e["loc"]), e) for e in err.errors()]
    # Union branches: "content should be a string" is noise when the list branch got deeper.
    locs = [loc for loc, _ in items]
    items = [(loc, e) for loc, e in items if not any(o != loc and o.startswith(loc + ".") for o in locs)]
    problems = []
    for loc, e in items:
        if e["type"] == "extra_forbidden":
            msg = "unknown field (not part of the chat completions API this server implements)"
        else:
            msg = e["msg"][len("Value error, ") :] if e["msg"].startswith("Value error, ") else e["msg"]
        problems.append(f"{loc}: {msg}" if loc else msg)
    unique = list(dict.fromkeys(problems))
    return ProtocolError("invalid request: " + "; ".join(unique[:5]), param=items[0][0] or None if items else None)


MAX_JSON_DEPTH = 64  # deeper than any real request (a JSON schema in response_format is the deepest part)


def decode_request(body: bytes, max_parts: int) -> ChatCompletionRequest:
    """Raw body -> validated request, every problem a :class:`ProtocolError` (400).

    Cheap shape checks run before pydantic sees the data: nesting deeper than
    ``MAX_JSON_DEPTH`` and more than ``max_parts`` content parts are refused, so a
    small body cannot make validation recurse without end or build 200,000 objects.
    The server runs this in a worker thread, off the event loop.
    """
    try:
        data = json.loads(body)
    except RecursionError:
        raise _too_deep() from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"request body is not valid JSON ({e})", code="invalid_json") from None
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        parts = sum(
            len(m["content"]) if isinstance(m, dict) and isinstance(m.get("content"), list) else 1
            for m in data["messages"]
        )
        if parts > max_parts:
            raise ProtocolError(
                f"too many content parts: {parts:,} in this request, the server allows {max_parts:,} "
                "(join the texts, or start the server with a higher --set max_content_parts)",
                param="messages",
                code="too_many_parts",
            )
    if _depth_exceeds(data, MAX_JSON_DEPTH):
        raise _too_deep()
    try:
        return parse_request(data)
    except RecursionError:
        raise _too_deep() from None


def _too_deep() -> ProtocolError:
    return ProtocolError(f"request body is nested more than {MAX_JSON_DEPTH} levels deep", code="invalid_json")


def _depth_exceeds(data: Any, limit: int) -> bool:
    """Whether lists/objects nest deeper than ``limit`` (iterative: deep input cannot overflow the stack)."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def parse_request(data: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; every problem becomes a :class:`ProtocolError` (400)."""
    if not isinstance(data, dict):
        raise ProtocolError(f"request body must be a JSON object, got {type(data).__name__}")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ProtocolError:
        raise
    except ValidationError as e:
        raise format_validation_error(e) from None


def completion(
    request_id: str,
    model: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    created: int | None = None,
) -> dict[str, Any]:
    """A ``chat.completion`` object with one choice and usage counts."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "system_fingerprint": None,
    }


def chunk(
    request_id: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``; ``delta=None`` with usage gives the final usage-only chunk (no choices).

    Every other chunk carries ``"usage": null``, as OpenAI's do.
    """
    out: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [],
        "usage": usage,
    }
    if delta is not None:
        out["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    return out
