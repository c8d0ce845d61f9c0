"""A real, scriptable OpenAI-compatible HTTP server for tests and benchmarks (stdlib only).

It listens on 127.0.0.1 at a free port and implements what facellm's clients
call: ``POST /v1/chat/completions`` (``stream: true`` answers as server-sent events), ``POST /v1/files``, ``GET /v1/files/{id}``,
``GET /v1/files/{id}/content``, ``POST /v1/batches``, ``GET /v1/batches/{id}``
and ``GET /v1/models``. Tests drive the real ``openai`` SDK against it, so
nothing inside the SDK is patched.

Each chat request takes the first queued :class:`Behaviour` whose ``match``
occurs in the request's text (or that has no ``match``); with none queued it
answers sensibly: a short description naming the aspect asked about, or, when a
JSON object is requested (``response_format`` json_schema, or a prompt listing
"exactly these keys: a, b"), a JSON object with one description per key.

    with FakeOpenAI(latency=0.05, api_key="sk-test") as server:
        server.script(Behaviour.rate_limited(retry_after=1), Behaviour.server_error())
        ...  # point a client at server.base_url
        assert server.count("/v1/chat/completions") == ...

``default`` fixes the answer to every unscripted chat request (evaluate's tests answer "(B)");
``requests``/``headers`` are the chat bodies and their lower-cased headers, in arrival order, and
``max_in_flight`` the most chat requests the server held at once.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Behaviour:
    """What the server does with one chat request."""

    kind: str = "ok"  # ok | status | drop | raw
    status: int = 200
    delay: float = 0.0
    retry_after: float | None = None
    text: str | None = None  # answer content (None: the default answer)
    usage: tuple[int, int] | None = None  # (prompt_tokens, completion_tokens)
    body: bytes | None = None  # raw body for kind="raw"
    content_type: str = "application/json"
    match: str | None = None  # only requests whose text contains this

    @classmethod
    def ok(
        cls,
        text: str | None = None,
        *,
        delay: float = 0.0,
        usage: tuple[int, int] | None = None,
        match: str | None = None,
    ) -> Behaviour:
        return cls(text=text, delay=delay, usage=usage, match=match)

    @classmethod
    def rate_limited(cls, retry_after: float | None = 1.0, *, match: str | None = None) -> Behaviour:
        return cls(kind="status", status=429, retry_after=retry_after, match=match)

    @classmethod
    def server_error(cls, status: int = 500, *, match: str | None = None) -> Behaviour:
        return cls(kind="status", status=status, match=match)

    @classmethod
    def drop(cls, *, match: str | None = None) -> Behaviour:
        """Read the request, then close the connection without answering."""
        return cls(kind="drop", match=match)

    @classmethod
    def slow(cls, delay: float, *, match: str | None = None) -> Behaviour:
        """Answer normally after ``delay`` seconds (longer than the client timeout = a timeout)."""
        return cls(delay=delay, match=match)

    @classmethod
    def refusal(
        cls, text: str = "I'm sorry, but I can't help with analyzing this image.", *, match: str | None = None
    ) -> Behaviour:
        return cls(text=text, match=match)

    @classmethod
    def empty(cls, *, match: str | None = None) -> Behaviour:
        return cls(text="", match=match)

    @classmethod
    def malformed_json(cls, *, match: str | None = None) -> Behaviour:
        """A 200 whose body claims to be JSON but is cut off."""
        return cls(kind="raw", body=b'{"id": "chatcmpl-x", "choices": [{"message": ', match=match)


@dataclass
class RequestLog:
    method: str
    path: str
    body: Any
    authorization: str | None
    started: float
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased names
    finished: float = 0.0
    outcome: str = ""


@dataclass
class _State:
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    polls: dict[str, int] = field(default_factory=dict)


def _request_text(body: dict[str, Any]) -> str:
    parts = []
    for m in body.get("messages", []):
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "\n".join(parts)


def _image_count(body: dict[str, Any]) -> int:
    n = 0
    for m in body.get("messages", []):
        content = m.get("content")
        if isinstance(content, list):
            n += sum(1 for p in content if isinstance(p, dict) and p.get("type") == "image_url")
    return n


def _sse(completion: dict[str, Any]) -> bytes:
    """A completion as the server-sent events of ``stream: true``: one chunk per word, then ``[DONE]``."""
    text = completion["choices"][0]["message"]["content"]
    pieces = re.findall(r"\S+\s*|\s+", text) or [""]
    events = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        chunk = {
            "id": completion["id"],
            "object": "chat.completion.chunk",
            "created": completion["created"],
            "model": completion["model"],
            "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": "stop" if last else None}],
        }
        events.append(f"data: {json.dumps(chunk)}\n\n")
    events.append("data: [DONE]\n\n")
    return "".join(events).encode("utf-8")


class FakeOpenAI:
    """The server. ``start()``/``stop()`` or use it as a context manager."""

    IMAGE_TOKENS = 255  # what gpt-4o bills for one image up to 512x512 at high detail

    def __init__(
        self,
        *,
        latency: float = 0.0,
        api_key: str | None = None,
        structured_outputs: bool = True,
        batch_polls: int = 1,
        model: str = "fake-vlm",
        default: str | None = None,
    ) -> None:
        self.latency = latency
        self.default = default
        self.in_flight = 0
        self.max_in_flight = 0
        self.api_key = api_key
        self.structured_outputs = structured_outputs
        self.batch_polls = batch_polls
        self.model = model
        self.log: list[RequestLog] = []
        self._queue: list[Behaviour] = []
        self._lock = threading.RLock()
        self._state = _State()
        self._ids = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FakeOpenAI:
        server = self

        class Handler(_Handler):
            fake = server

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        httpd.daemon_threads = True
        httpd.request_queue_size = 1024  # many clients connect at once; the default backlog of 5 resets them
        httpd.allow_reuse_address = True
        httpd.server_bind()
        httpd.server_activate()
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "call start() first"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ---- scripting and inspection ------------------------------------------------------------
    def script(self, *behaviours: Behaviour) -> None:
        with self._lock:
            self._queue.extend(behaviours)

    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def _next_behaviour(self, text: str) -> Behaviour:
        with self._lock:
            for i, b in enumerate(self._queue):
                if b.match is None or b.match in text:
                    return self._queue.pop(i)
        return Behaviour()

    def count(self, path: str = "/v1/chat/completions", outcome: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.log if r.path == path and (outcome is None or r.outcome == outcome))

    def chat_requests(self) -> list[RequestLog]:
        with self._lock:
            return [r for r in self.log if r.path == "/v1/chat/completions"]

    @property
    def requests(self) -> list[dict[str, Any]]:
        """The bodies of the chat requests received, in order."""
        return [r.body for r in self.chat_requests()]

    @property
    def headers(self) -> list[dict[str, str]]:
        """The (lower-cased) headers of the chat requests received, in order."""
        return [r.headers for r in self.chat_requests()]

    def images_received(self) -> int:
        """Images in all chat requests answered 200 (retries included), for image-token accounting."""
        return sum(
            _image_count(r.body) for r in self.chat_requests() if isinstance(r.body, dict) and r.outcome == "200"
        )

    def _new_id(self, prefix: str) -> str:
        with self._lock:
            self._ids += 1
            return f"{prefix}-{self._ids}"

    # ---- answers -----------------------------------------------------------------------------
    def default_answer(self, body: dict[str, Any]) -> str:
        if self.default is not None:
            return self.default
        text = _request_text(body)
        keys: list[str] = []
        rf = body.get("response_format")
        if isinstance(rf, dict) and rf.get("type") == "json_schema":
            keys = list(rf.get("json_schema", {}).get("schema", {}).get("properties", {}))
        else:
            m = re.search(r"exactly these keys: ([a-z0-9_, ]+)", text)
            if m:
                keys = [k.strip() for k in m.group(1).split(",") if k.strip()]
        if keys:
            return json.dumps(
                {k: f"The {k.replace('_', ' ')} of the face is clearly visible and described here." for k in keys}
            )
        m = re.search(r"Describe only the (.+?) of the image", text)
        topic = m.group(1) if m else "whole image"
        return f"Regarding the {topic}: the face is centred, evenly lit and seen from the front."

    def chat_completion(self, body: dict[str, Any], behaviour: Behaviour) -> dict[str, Any]:
        answer = behaviour.text if behaviour.text is not None else self.default_answer(body)
        if behaviour.usage is not None:
            prompt_tokens, completion_tokens = behaviour.usage
        else:
            prompt_tokens = len(_request_text(body)) // 4 + self.IMAGE_TOKENS * _image_count(body)
            completion_tokens = max(1, len(answer) // 4)
        return {
            "id": self._new_id("chatcmpl"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    # ---- batch -------------------------------------------------------------------------------
    def _batch_json(self, batch: dict[str, Any]) -> dict[str, Any]:
        return dict(batch)

    def _run_batch(self, batch: dict[str, Any]) -> None:
        source = self._state.files[batch["input_file_id"]]["content"].decode("utf-8")
        out_lines, err_lines = [], []
        completed = failed = 0
        for line in source.splitlines():
            if not line.strip():
                continue
            req = json.loads(line)
            body = req["body"]
            behaviour = self._next_behaviour(_request_text(body))
            rid = self._new_id("batch_req")
            if behaviour.kind == "status":
                failed += 1
                out_lines.append(
                    {
                        "id": rid,
                        "custom_id": req["custom_id"],
                        "response": {
                            "status_code": behaviour.status,
                            "request_id": rid,
                            "body": {"error": {"message": f"scripted {behaviour.status}", "type": "server_error"}},
                        },
                        "error": None,
                    }
                )
            elif behaviour.kind in ("drop", "raw"):
                failed += 1
                err_lines.append(
                    {
                        "id": rid,
                        "custom_id": req["custom_id"],
                        "response": None,
                        "error": {"code": "server_error", "message": "scripted failure"},
                    }
                )
            else:
                completed += 1
                out_lines.append(
                    {
                        "id": rid,
                        "custom_id": req["custom_id"],
                        "response": {
                            "status_code": 200,
                            "request_id": rid,
                            "body": self.chat_completion(body, behaviour),
                        },
                        "error": None,
                    }
                )
        batch["output_file_id"] = self._store_file(
            b"".join(json.dumps(x).encode() + b"\n" for x in out_lines), "batch_output.jsonl", "batch_output"
        )
        if err_lines:
            batch["error_file_id"] = self._store_file(
                b"".join(json.dumps(x).encode() + b"\n" for x in err_lines), "batch_errors.jsonl", "batch_output"
            )
        batch["status"] = "completed"
        batch["completed_at"] = int(time.time())
        batch["request_counts"] = {"total": completed + failed, "completed": completed, "failed": failed}

    def _store_file(self, content: bytes, filename: str, purpose: str) -> str:
        fid = self._new_id("file")
        self._state.files[fid] = {
            "id": fid,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "content": content,
        }
        return fid

    def file_meta(self, fid: str) -> dict[str, Any]:
        return {k: v for k, v in self._state.files[fid].items() if k != "content"}

    def file_content(self, fid: str) -> bytes:
        return self._state.files[fid]["content"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeOpenAI

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _send(
        self,
        status: int,
        payload: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        data = raw if raw is not None else json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._send(
            status,
            {
                "error": {
                    "message": message,
                    "type": "invalid_request_error" if status < 500 else "server_error",
                    "code": None,
                }
            },
            headers=headers,
        )

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _authorised(self) -> bool:
        key = self.fake.api_key
        if key is None:
            return True
        if self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._error(401, "Incorrect API key provided.")
        return False

    def _record(self, body: Any) -> RequestLog:
        entry = RequestLog(
            self.command,
            self.path.split("?")[0],
            body,
            self.headers.get("Authorization"),
            time.monotonic(),
            {k.lower(): v for k, v in self.headers.items()},
        )
        with self.fake._lock:
            self.fake.log.append(entry)
        return entry

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        entry = self._record(None)
        if not self._authorised():
            entry.outcome = "401"
            return
        path = entry.path
        fake = self.fake
        if path == "/v1/models":
            self._send(
                200,
                {"object": "list", "data": [{"id": fake.model, "object": "model", "created": 0, "owned_by": "fake"}]},
            )
        elif m := re.fullmatch(r"/v1/files/([\w-]+)/content", path):
            if m.group(1) not in fake._state.files:
                self._error(404, f"No such file: {m.group(1)}")
            else:
                self._send(200, raw=fake.file_content(m.group(1)), content_type="application/octet-stream")
        elif m := re.fullmatch(r"/v1/files/([\w-]+)", path):
            if m.group(1) not in fake._state.files:
                self._error(404, f"No such file: {m.group(1)}")
            else:
                self._send(200, fake.file_meta(m.group(1)))
        elif m := re.fullmatch(r"/v1/batches/([\w-]+)", path):
            with fake._lock:
                batch = fake._state.batches.get(m.group(1))
            if batch is None:
                self._error(404, f"No such batch: {m.group(1)}")
                return
            fake._state.polls[batch["id"]] = fake._state.polls.get(batch["id"], 0) + 1
            if batch["status"] != "completed":
                if fake._state.polls[batch["id"]] >= fake.batch_polls:
                    fake._run_batch(batch)
                else:
                    batch["status"] = "in_progress"
            self._send(200, fake._batch_json(batch))
        else:
            self._error(404, f"Unknown path {path}")
        entry.outcome = "200"

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        raw = self._read_body()
        path = self.path.split("?")[0]
        if path == "/v1/files":
            entry = self._record(None)
            if self._authorised():
                self._upload(raw)
                entry.outcome = "200"
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        entry = self._record(body)
        if not self._authorised():
            entry.outcome = "401"
            return
        if body is None:
            self._error(400, "request body is not JSON")
            return
        if path == "/v1/chat/completions":
            self._chat(body, entry)
        elif path == "/v1/batches":
            self._create_batch(body)
            entry.outcome = "200"
        else:
            self._error(404, f"Unknown path {path}")

    def _chat(self, body: dict[str, Any], entry: RequestLog) -> None:
        fake = self.fake
        if body.get("response_format") is not None and not fake.structured_outputs:
            entry.outcome = "400"
            self._error(400, "response_format is not supported by this server")
            return
        behaviour = fake._next_behaviour(_request_text(body))
        with fake._lock:
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            if fake.latency or behaviour.delay:
                time.sleep(fake.latency + behaviour.delay)
        finally:
            with fake._lock:
                fake.in_flight -= 1
        entry.finished = time.monotonic()
        if behaviour.kind == "drop":
            entry.outcome = "drop"
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if behaviour.kind == "status":
            entry.outcome = str(behaviour.status)
            headers = {"Retry-After": f"{behaviour.retry_after:g}"} if behaviour.retry_after is not None else None
            self._error(behaviour.status, f"scripted {behaviour.status}", headers)
            return
        if behaviour.kind == "raw":
            entry.outcome = "raw"
            self._send(behaviour.status, raw=behaviour.body or b"", content_type=behaviour.content_type)
            return
        entry.outcome = "200"
        completion = fake.chat_completion(body, behaviour)
        if body.get("stream"):
            self._send(200, raw=_sse(completion), content_type="text/event-stream")
            return
        self._send(200, completion)

    def _upload(self, raw: bytes) -> None:
        ctype = self.headers.get("Content-Type", "")
        msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw)
        content: bytes | None = None
        filename, purpose = "upload.jsonl", "batch"
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            data = part.get_payload(decode=True)  # bytes for a non-multipart part
            if name == "file" and isinstance(data, bytes):
                content = data
                filename = part.get_filename() or filename
            elif name == "purpose" and isinstance(data, bytes):
                purpose = data.decode()
        if content is None:
            self._error(400, "multipart form has no 'file' part")
            return
        with self.fake._lock:
            fid = self.fake._store_file(content, filename, purpose)
        self._send(200, self.fake.file_meta(fid))

    def _create_batch(self, body: dict[str, Any]) -> None:
        fake = self.fake
        fid = body.get("input_file_id")
        if fid not in fake._state.files:
            self._error(400, f"input_file_id {fid} does not exist")
            return
        bid = fake._new_id("batch")
        batch = {
            "id": bid,
            "object": "batch",
            "endpoint": body.get("endpoint"),
            "input_file_id": fid,
            "completion_window": body.get("completion_window", "24h"),
            "status": "validating",
            "created_at": int(time.time()),
            "metadata": body.get("metadata"),
        }
        with fake._lock:
            fake._state.batches[bid] = batch
        self._send(200, fake._batch_json(batch))
