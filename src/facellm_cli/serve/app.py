"""The OpenAI-compatible HTTP app: ``create_app(cfg, lm)`` and ``serve_forever(cfg, lm)``.

Endpoints: ``POST /v1/chat/completions`` (JSON or server-sent events), ``GET /v1/models``,
``GET /v1/models/{id}`` and ``GET /health`` (open, for load balancers; it carries the
batcher's counters). Every refusal is OpenAI's error JSON
``{"error": {"message", "type", "param", "code"}}``.

Model names: the server holds one model and answers every request with it. The
``model`` field of a request is accepted whatever it says (clients such as our own
``annotate``/``evaluate`` send whatever name they were configured with); responses
and ``/v1/models`` report the served name (``served_model_name``, else the model
folder name or hub id), and a request naming another model is logged, not refused.

No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations
at runtime, and ``Request`` is imported inside ``create_app`` (fastapi is an extra).
"""

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from ..config import ServeConfig
from ..errors import FacellmError, MissingDependencyError
from .batcher import Batcher, Cancelled, Job, QueueFull, Result, SamplingParams
from .messages import ImageLimits, extract_json, to_prompt
from .protocol import ChatCompletionRequest, ProtocolError, chunk, completion, decode_request, error_body

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.requests import Request

    from ..infer.engine import Engine, TransformersEngine
    from ..infer.generate import Prompt
    from ..infer.vllm_engine import VllmEngine
    from ..models.loader import LoadedModel

log = logging.getLogger("facellm.serve")


def require_serve_extras() -> None:
    """fastapi and uvicorn come with ``pip install 'facellm[serve]'``."""
    import importlib.util

    for mod in ("fastapi", "uvicorn"):
        if importlib.util.find_spec(mod) is None:
            raise MissingDependencyError("facellm serve", "serve", mod)


def served_name(cfg: ServeConfig, lm: "LoadedModel | Engine") -> str:
    return cfg.served_model_name or lm.name


def _error(
    status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(message, type, param, code), status_code=status)


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class _AuthAndSize:
    """ASGI guard in front of /v1: API key (constant-time compare) and a declared body size cap.

    The key is compared with :func:`hmac.compare_digest` and never logged; bodies whose
    Content-Length is far above the limit are refused before being read (bodies without
    one are counted while read, see ``_read_body``).
    """

    def __init__(self, app: Any, api_key: str | None, limit: int) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.limit = limit
        self.hard_limit = 4 * limit + (1 << 20)  # below this, _read_body drains the body and answers 413 itself

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        if self.api_key is not None:
            given = _bearer(scope.get("headers", []))
            if given is None or not hmac.compare_digest(given.encode(), self.api_key):
                _log_request({"id": None, "path": scope["path"], "status": 401, "error": "missing or invalid API key"})
                body = error_body(
                    "missing or invalid API key: send it as 'Authorization: Bearer <key>'",
                    "invalid_request_error",
                    None,
                    "invalid_api_key",
                )
                await _send_json(send, 401, body)
                return
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length" and value.isdigit() and int(value) > self.hard_limit:
                _log_request({"id": None, "path": scope["path"], "status": 413, "error": "request body too large"})
                await _send_json(
                    send,
                    413,
                    error_body(
                        f"request body is {int(value):,} bytes, more than this server's limit of {self.limit:,} "
                        "(send smaller images, or start the server with a higher --set max_body_mb)",
                        "invalid_request_error",
                        None,
                        "request_too_large",
                    ),
                )
                return
        await self.app(scope, receive, send)


async def _send_json(send: Any, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


def _log_request(fields: dict[str, Any]) -> None:
    """One line per request; ``logs.py`` renders it as text or JSON. Never includes headers or keys."""
    level = logging.INFO if fields.get("status", 200) < 500 else logging.ERROR
    log.log(level, "request", extra={"fields": fields})


async def _read_body(request: "Request", limit: int) -> bytes:
    """The body, or 413 past ``limit``. The rest of an oversized body is drained (up to a cap) so the
    client reads our 413 instead of a reset connection."""
    chunks: list[bytes] = []
    size = 0
    async for piece in request.stream():
        size += len(piece)
        if size <= limit:
            chunks.append(piece)
        elif size > 4 * limit + (1 << 20):
            break
    if size > limit:
        raise ProtocolError(
            f"request body is {size:,} bytes, more than this server's limit of {limit:,} "
            "(send smaller images, or start the server with a higher --set max_body_mb)",
            status=413,
            code="request_too_large",
        )
    return b"".join(chunks)


def _check_content_type(value: str | None) -> None:
    """JSON bodies only (415 otherwise); a missing header is read as JSON, as OpenAI's API does."""
    if value is None:
        return
    media = value.split(";", 1)[0].strip().lower()
    if media in ("", "application/json") or media.endswith("+json"):
        return
    raise ProtocolError(
        f"Content-Type '{media}' is not supported: send the body as JSON with Content-Type: application/json",
        status=415,
        code="unsupported_media_type",
    )


def _log_ignored_once(req: ChatCompletionRequest, seen: set[str]) -> None:
    """Name each accepted-but-ignored field once per server, so operators know it had no effect."""
    for f in req.ignored_fields():
        if f not in seen:
            seen.add(f)
            log.info("ignored request field", extra={"fields": {"field": f, "why": "cannot change the answer here"}})


def _count_images(req: ChatCompletionRequest) -> int:
    return sum(
        1
        for m in req.messages
        if m.role == "user" and not isinstance(m.content, str)
        for p in m.content
        if p.type == "image_url"
    )


def _sampling(req: ChatCompletionRequest, cfg: ServeConfig) -> SamplingParams:
    limit = req.token_limit()
    if limit is not None and limit > cfg.max_tokens_limit:
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        raise ProtocolError(f"{param}={limit} is above this server's limit of {cfg.max_tokens_limit}", param=param)
    gen = cfg.generation
    return SamplingParams(
        max_tokens=limit if limit is not None else min(gen.max_new_tokens, cfg.max_tokens_limit),
        temperature=req.temperature if req.temperature is not None else gen.temperature,
        top_p=req.top_p if req.top_p is not None else gen.top_p,
        seed=req.seed if req.seed is not None else gen.seed,
        stop=tuple(req.stop_list()),
    )


class PromptCheck:
    """Per-request checks that need the model, run before a request joins a batch.

    It renders the conversation, so a chat template that refuses it (e.g. roles that must
    alternate) is this request's 400 instead of a failure inside a shared batch, and it
    refuses prompts that cannot fit the model's context (OpenAI's ``context_length_exceeded``),
    so a huge prompt cannot exhaust memory in the middle of a batch. Counting takes the model's
    tokenizer lock, which the batch worker's encode holds too.
    Image tokens are counted as the processor's per-image sequence length where it has one
    (InternVL), so the count is a lower bound for tiled or dynamic-resolution images.
    """

    def __init__(self, lm: "LoadedModel | Engine", context: int | None = None) -> None:
        import threading

        from ..infer.generate import context_length

        self.lm = lm
        # A loaded model's lock is shared with the batcher's encode; the vLLM engine's processor is ours alone.
        self.lock = getattr(lm, "tokenizer_lock", None) or threading.Lock()

        self.context = context or context_length(lm)
        self.per_image = int(getattr(lm.processor, "image_seq_length", 0) or 0)

    def __call__(self, prompt: "Prompt", max_tokens: int) -> None:
        from ..infer.generate import render_prompt

        try:
            rendered = render_prompt(self.lm, prompt)
        except Exception as e:  # noqa: BLE001 - jinja raises its own types (TemplateError, ...)
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ProtocolError(
                f"the model's chat template cannot render these messages: {first}",
                param="messages",
                code="invalid_messages",
            ) from None
        if self.context is None:
            return
        with self.lock:  # the fast tokenizer changes its padding state on every call: calls take turns
            n = len(self.lm.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        n += self.per_image * len(prompt.images)
        if n + max_tokens > self.context:
            raise ProtocolError(
                f"this request needs at least {n:,} prompt tokens plus max_tokens {max_tokens:,}, more than the "
                f"model's context of {self.context:,} tokens; shorten the messages or lower max_tokens",
                param="messages",
                code="context_length_exceeded",
            )


async def _watch_disconnect(request: "Request", job: Job) -> None:
    """Cancel the job when its client goes away (frees its place in the queue or its row)."""
    while True:
        if await request.is_disconnected():
            job.cancel()
            return
        await asyncio.sleep(0.05)


@dataclass
class _Server:
    """What the endpoints share: the config, the model, its batcher and the per-request limits."""

    cfg: ServeConfig
    lm: "LoadedModel | Engine"
    batcher: Any
    check_prompt: PromptCheck
    name: str
    created: int
    body_limit: int
    limits: ImageLimits
    ignored_seen: set[str] = field(default_factory=set)

    def model_card(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "facellm"}


def _make_server(cfg: ServeConfig, lm: "LoadedModel | Engine") -> _Server:
    """``transformers`` models share the dynamic batcher; ``vllm`` engines go to vLLM's continuous batching."""
    from ..infer.engine import as_engine

    engine = as_engine(lm)
    batcher: Any
    if engine.kind == "vllm":
        from .vllm_scheduler import VllmScheduler

        vllm = cast("VllmEngine", engine)  # as_engine gives kind "vllm" only to a VllmEngine
        batcher = VllmScheduler(vllm, cfg.max_queue)
        check_prompt = PromptCheck(vllm, vllm.context_length)
    else:
        base = cast("TransformersEngine", engine).lm
        batcher = Batcher(base, cfg.max_batch_size, cfg.max_wait_ms / 1000.0, cfg.max_queue)
        check_prompt = PromptCheck(base)
    body_limit = int(cfg.max_body_mb * 1_000_000)
    limits = ImageLimits(
        max_images=cfg.max_images_per_request,
        max_pixels=cfg.max_image_pixels,
        allow_remote=cfg.allow_remote_images,
        remote_max_bytes=body_limit,
        remote_timeout_s=cfg.remote_image_timeout_s,
    )
    return _Server(cfg, lm, batcher, check_prompt, served_name(cfg, lm), int(time.time()), body_limit, limits)


def create_app(cfg: ServeConfig, lm: "LoadedModel | Engine", *, api_key: str | None = None) -> "FastAPI":
    """The FastAPI app serving ``lm`` (a loaded model or an engine: ``transformers`` requests share the
    dynamic batcher, ``vllm`` requests go to vLLM's continuous batching). ``api_key`` (read by the caller
    from ``cfg.api_key_env``) turns on auth."""
    require_serve_extras()
    from fastapi import FastAPI, Request

    server = _make_server(cfg, lm)

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        server.batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.batcher.stop)

    app = FastAPI(title="facellm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.batcher = server.batcher
    app.state.served_model_name = server.name
    _add_error_handlers(app)
    _add_model_routes(app, server)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await _chat_completions(request, server)

    app.add_middleware(_AuthAndSize, api_key=api_key, limit=server.body_limit)
    return app


def _add_error_handlers(app: "FastAPI") -> None:
    """Every refusal, including FastAPI's own 404/405/validation errors, as OpenAI's error JSON."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = str(exc.detail)
        if exc.status_code == 404:
            message = "unknown path (this server offers /v1/chat/completions, /v1/models, /health)"
        return _error(exc.status_code, message, code=code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, f"invalid request: {exc.errors()[0].get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error(500, f"internal server error ({type(exc).__name__})", type="server_error")


def _add_model_routes(app: "FastAPI", server: _Server) -> None:
    """``/health`` (with the batcher's counters), ``/v1/models`` and ``/v1/models/{id}``."""

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": server.name,
            "device": server.lm.device,
            "batcher": server.batcher.snapshot(),
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Any:
        if model_id != server.name:
            return _error(
                404,
                f"model '{model_id}' is not served here (this server serves '{server.name}')",
                param="model",
                code="model_not_found",
            )
        return server.model_card()


class _RequestLog:
    """One log line per request: its id, status, latency and whatever the steps added."""

    def __init__(self, rid: str) -> None:
        self.t0 = time.perf_counter()
        self.fields: dict[str, Any] = {"id": rid, "path": "/v1/chat/completions"}

    def done(self, status: int, **more: Any) -> None:
        self.fields.update(status=status, latency_ms=round((time.perf_counter() - self.t0) * 1000, 1), **more)
        _log_request(self.fields)

    def finish(self, result: Result) -> None:
        self.done(
            200,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            batch=result.batch_size,
            queued_ms=round(result.queued_s * 1000, 1),
            finish=result.finish_reason,
        )


async def _chat_completions(request: "Request", server: _Server) -> Any:
    """Read and check the request, queue its job, then stream the answer or wait for it."""
    rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    rlog = _RequestLog(rid)
    try:
        req, prompt, params = await _parse_chat(request, server, rlog.fields)
    except ProtocolError as e:
        rlog.done(e.status, error=e.message)
        return _error(e.status, e.message, e.type, e.param, e.code)

    job = Job(id=rid, prompt=prompt, params=params, stream=bool(req.stream), loop=asyncio.get_running_loop())
    try:
        server.batcher.submit(job)
    except QueueFull as e:
        rlog.done(429, error=str(e))
        return _error(429, f"server busy: {e}; retry later", type="rate_limit_error", code="server_busy")
    if req.stream:
        return _stream_response(request, job, req, server.name, rlog)
    return await _await_completion(request, job, req, server.name, rlog)


async def _parse_chat(
    request: "Request", server: _Server, fields: dict[str, Any]
) -> tuple[ChatCompletionRequest, "Prompt", SamplingParams]:
    """The request, its prompt and sampling parameters; raises ``ProtocolError`` for anything refused."""
    cfg = server.cfg
    _check_content_type(request.headers.get("content-type"))
    body = await _read_body(request, server.body_limit)
    # Parsing and validating a large body takes CPU time: a worker thread keeps /health and streams going.
    req = await asyncio.to_thread(decode_request, body, cfg.max_content_parts)
    fields.update(stream=bool(req.stream), images=_count_images(req))
    if req.model != server.name:
        fields["requested_model"] = req.model
    _log_ignored_once(req, server.ignored_seen)
    params = _sampling(req, cfg)
    prompt = await asyncio.to_thread(to_prompt, req, server.limits, cfg.generation.system)
    await asyncio.to_thread(server.check_prompt, prompt, params.max_tokens)
    return req, prompt, params


def _stream_response(request: "Request", job: Job, req: ChatCompletionRequest, name: str, rlog: _RequestLog) -> Any:
    from fastapi.responses import StreamingResponse

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return StreamingResponse(
        _sse(request, job, job.id, name, include_usage, rlog.finish, rlog.done),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _await_completion(
    request: "Request", job: Job, req: ChatCompletionRequest, name: str, rlog: _RequestLog
) -> Any:
    """The whole answer as one completion; a client that goes away cancels its job."""
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    try:
        result = await job.result()
    except Cancelled as e:
        rlog.done(499, error=str(e))
        return _error(499, "client closed the request", code="client_closed")
    except FacellmError as e:
        rlog.done(400, error=str(e))
        return _error(400, str(e))
    except Exception as e:  # noqa: BLE001 - a failed generation is this request's 500, not the server's end
        rlog.done(500, error=f"{type(e).__name__}: {e}")
        return _error(500, f"generation failed ({type(e).__name__}); see the server log", type="server_error")
    finally:
        watcher.cancel()
    rlog.finish(result)
    want_json = req.response_format is not None and req.response_format.type != "text"
    text = extract_json(result.text) if want_json else result.text
    return completion(job.id, name, text, result.finish_reason, result.prompt_tokens, result.completion_tokens)


def _sse_data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(
    request: "Request", job: Job, rid: str, name: str, include_usage: bool, finish: Any, done: Any
) -> AsyncIterator[str]:
    """OpenAI's streaming format: a role chunk, content chunks, a finish chunk, [usage chunk], ``data: [DONE]``."""
    created = int(time.time())
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    finished = False
    try:
        yield _sse_data(chunk(rid, name, created, {"role": "assistant", "content": ""}))
        while True:
            kind, value = await job.events.get()
            if kind == "delta":
                yield _sse_data(chunk(rid, name, created, {"content": value}))
            elif kind == "done":
                yield _sse_data(chunk(rid, name, created, {}, finish_reason=value.finish_reason))
                if include_usage:
                    usage = {
                        "prompt_tokens": value.prompt_tokens,
                        "completion_tokens": value.completion_tokens,
                        "total_tokens": value.prompt_tokens + value.completion_tokens,
                    }
                    yield _sse_data(chunk(rid, name, created, None, usage=usage))
                yield "data: [DONE]\n\n"
                finished = True
                finish(value)
                return
            else:
                if isinstance(value, Cancelled):
                    done(499, error=str(value))
                    return
                finished = True
                done(500, error=f"{type(value).__name__}: {value}")
                yield _sse_data(
                    error_body(f"generation failed ({type(value).__name__}); see the server log", "server_error")
                )
                yield "data: [DONE]\n\n"
                return
    finally:
        watcher.cancel()
        if not finished:
            job.cancel()


def serve_forever(
    cfg: ServeConfig, lm: "LoadedModel | Engine", *, api_key: str | None = None, on_ready: Any = None
) -> None:
    """Bind ``cfg.host:cfg.port`` and serve until interrupted, logging requests to stderr.

    ``on_ready(url)`` is called once the port is bound (with the real port when ``port`` is 0).
    """
    require_serve_extras()
    import socket

    import uvicorn

    from .logs import configure_logging

    configure_logging(cfg.log_json)

    app = create_app(cfg, lm, api_key=api_key)
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        sock.close()
        raise FacellmError(
            f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}); choose another --port or --host"
        ) from None
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5, lifespan="on")
    server = uvicorn.Server(config)
    if on_ready is not None:
        host = f"[{cfg.host}]" if family == socket.AF_INET6 else cfg.host
        on_ready(f"http://{host}:{port}/v1")
    server.run(sockets=[sock])


@contextmanager
def background_server(
    cfg: ServeConfig, lm: "LoadedModel | Engine", *, api_key: str | None = None, start_timeout_s: float = 60.0
) -> Iterator[tuple[str, Any]]:
    """Serve on 127.0.0.1 at a free port from a background thread until the block ends.

    Yields ``(base_url, app)`` with ``base_url`` like ``http://127.0.0.1:PORT/v1``. Tests and
    ``bench/serve_load.py`` use it to talk to the real server with a real HTTP client.
    """
    require_serve_extras()
    import socket
    import threading

    import uvicorn

    app = create_app(cfg, lm, api_key=api_key)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="facellm-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise FacellmError("the background server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1", app
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
