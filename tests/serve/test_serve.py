"""``facellm serve``: a real uvicorn server on 127.0.0.1 with the tiny model, driven by the official openai client."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from facellm_cli.testing.cli import FACELLM, subprocess_env
from facellm_cli.testing.files import write_image
from facellm_cli.testing.paths import REPO_ROOT
from facellm_cli.testing.servers import image_message, png_data_uri, running_server, wait_for

if TYPE_CHECKING:
    import openai

KEY = "sk-test-7f3c9a"
QUESTIONS = ["What is the facial expression?", "Are the eyes open?", "Describe the face.", "Is the head tilted?"]


@pytest.fixture(scope="module")
def lm(tiny_internvl: Path) -> Any:
    """The tiny model with its matrices scaled up, so different inputs give visibly different answers.

    (With its small random init, every prompt decodes to the same run of newlines; a sharper
    random model makes the cross-talk test below able to tell answers apart.)
    """
    import torch

    from facellm_cli.config import ModelConfig
    from facellm_cli.models.loader import load_model_and_processor

    loaded = load_model_and_processor(ModelConfig(model=str(tiny_internvl)))
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    return loaded


@pytest.fixture(scope="module")
def server(lm: Any) -> Any:
    from facellm_cli.config import ServeConfig
    from facellm_cli.serve.logs import configure_logging

    cfg = ServeConfig.model_validate(
        {
            "model": {"model": "unused-here"},
            "served_model_name": "facellm-tiny",
            "generation": {"max_new_tokens": 6},
            "max_batch_size": 8,
            "max_wait_ms": 300,
            "max_body_mb": 0.2,
            "max_images_per_request": 2,
            "max_image_pixels": 100 * 100,
            "max_tokens_limit": 512,
        }
    )
    logs = io.StringIO()
    handler = configure_logging(log_json=True, stream=logs)
    with running_server(cfg, lm, api_key=KEY) as (url, app):
        yield {"url": url, "app": app, "logs": logs, "cfg": cfg}
    import logging

    logging.getLogger("facellm.serve").removeHandler(handler)


@pytest.fixture
def client(server: dict[str, Any]) -> openai.OpenAI:
    import openai

    return openai.OpenAI(base_url=server["url"], api_key=KEY, max_retries=0, timeout=60)


def raw(
    url: str, body: bytes | None = None, key: str | None = KEY, method: str | None = None
) -> tuple[int, Any, bytes]:
    """(status, parsed JSON or None, raw bytes) for a request sent without the SDK."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            data = resp.read()
            status = resp.status
    except urllib.error.HTTPError as e:
        data, status = e.read(), e.code
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    return status, parsed, data


def health(server: dict[str, Any]) -> dict[str, Any]:
    status, body, _ = raw(server["url"].removesuffix("/v1") + "/health", key=None)
    assert status == 200
    return body


def direct_answer(lm: Any, color: tuple[int, int, int], question: str, max_tokens: int) -> str:
    """The same prompt answered by generate_batch directly, without the server."""
    from facellm_cli.config import GenerationConfig
    from facellm_cli.images import open_image
    from facellm_cli.infer.generate import Prompt, generate_batch

    raw_png = base64.b64decode(png_data_uri(color).split(",", 1)[1])
    prompt = Prompt(images=[open_image(raw_png)], text=question)
    return generate_batch(lm, [prompt], GenerationConfig(max_new_tokens=max_tokens))[0].text


def ask(client: openai.OpenAI, color: tuple[int, int, int], question: str, **kw: Any) -> Any:
    return client.chat.completions.create(
        model="facellm-tiny", messages=image_message(question, png_data_uri(color)), **kw
    )


def assert_alive(client: openai.OpenAI) -> None:
    r = ask(client, (10, 20, 30), QUESTIONS[0], max_tokens=2)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_chat_completion_with_image_matches_direct_generation(client: openai.OpenAI, lm: Any) -> None:
    r = ask(client, (200, 30, 30), QUESTIONS[2], max_tokens=5)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == "facellm-tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == direct_answer(lm, (200, 30, 30), QUESTIONS[2], 5)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    # the prompt counts the image's tokens too: 64x64 tiny InternVL image = 16 context tokens + markup
    text_only = client.chat.completions.create(
        model="facellm-tiny", messages=[{"role": "user", "content": QUESTIONS[2]}], max_tokens=1
    )
    assert r.usage.prompt_tokens >= text_only.usage.prompt_tokens + 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_any_model_name_is_served_by_the_one_model(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.model == "facellm-tiny"


def test_models_endpoint(client: openai.OpenAI) -> None:
    import openai

    assert [m.id for m in client.models.list()] == ["facellm-tiny"]
    assert client.models.retrieve("facellm-tiny").owned_by == "facellm"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("other")
    assert e.value.code == "model_not_found"


def test_streaming_gives_the_same_answer_in_openai_chunks(client: openai.OpenAI, server: dict[str, Any]) -> None:
    whole = ask(client, (30, 200, 30), QUESTIONS[1], max_tokens=6)
    stream = ask(client, (30, 200, 30), QUESTIONS[1], max_tokens=6, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    # on the wire: SSE data lines ending with [DONE]
    body = json.dumps(
        {
            "model": "m",
            "messages": image_message(QUESTIONS[1], png_data_uri((30, 200, 30))),
            "max_tokens": 6,
            "stream": True,
        }
    ).encode()
    status, _, data = raw(server["url"] + "/chat/completions", body)
    assert status == 200
    events = [e for e in data.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks_on_wire = [json.loads(e[6:]) for e in events[:-1]]
    assert all("usage" in c and c["usage"] is None for c in chunks_on_wire)  # null, as OpenAI's, unless asked for
    body = json.loads(body)
    body["stream_options"] = {"include_usage": True}
    status, _, data = raw(server["url"] + "/chat/completions", json.dumps(body).encode())
    chunks_on_wire = [json.loads(e[6:]) for e in data.decode().split("\n\n") if e and e != "data: [DONE]"]
    assert (
        all(c["usage"] is None for c in chunks_on_wire[:-1]) and chunks_on_wire[-1]["usage"]["completion_tokens"] == 6
    )


def test_stop_sequence_cuts_the_answer_early(client: openai.OpenAI) -> None:
    for color in [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 0)]:
        for q in QUESTIONS:
            full = ask(client, color, q, max_tokens=8).choices[0].message.content
            # an ASCII-letter pair that first appears after the start of the answer
            cands = [
                full[i : i + 2]
                for i in range(1, len(full) - 1)
                if full[i : i + 2].isascii() and full[i : i + 2].isalpha() and full.find(full[i : i + 2]) == i
            ]
            if cands:
                stop = cands[0]
                r = ask(client, color, q, max_tokens=8, stop=[stop, "never-appears"])
                assert r.choices[0].message.content == full[: full.find(stop)].strip()
                assert r.choices[0].finish_reason == "stop"
                assert r.usage.completion_tokens < 8
                streamed = ask(client, color, q, max_tokens=8, stop=stop, stream=True)
                text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
                assert text.strip() == r.choices[0].message.content and stop not in text
                return
    pytest.fail("no answer of the tiny model had a usable stop string")


def test_response_format_json_is_validated_and_passed_as_instruction(client: openai.OpenAI) -> None:
    import openai

    plain = ask(client, (1, 2, 3), QUESTIONS[0], max_tokens=2)
    schema = {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}
    r = ask(
        client,
        (1, 2, 3),
        QUESTIONS[0],
        max_tokens=2,
        response_format={"type": "json_schema", "json_schema": {"name": "face", "schema": schema}},
    )
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 10  # the schema instruction is in the prompt
    with pytest.raises(openai.BadRequestError) as e:
        ask(
            client,
            (1, 2, 3),
            QUESTIONS[0],
            max_tokens=2,
            response_format={"type": "json_schema", "json_schema": {"name": "face", "schema": {"type": "dict"}}},
        )
    assert "schema.type 'dict' is not a JSON schema type" in e.value.message
    assert e.value.param == "response_format.json_schema.schema"
    assert ask(client, (1, 2, 3), QUESTIONS[0], max_tokens=2, response_format={"type": "json_object"}).choices


def test_401_without_the_key(server: dict[str, Any], client: openai.OpenAI) -> None:
    import openai

    bad = openai.OpenAI(base_url=server["url"], api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    status, body, _ = raw(server["url"] + "/models", key=None)
    assert status == 401
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert health(server)["status"] == "ok"  # /health stays open for load balancers
    assert_alive(client)


def _noise_png(side: int) -> str:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _b64(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _truncated_png() -> str:
    full = base64.b64decode(png_data_uri((9, 9, 9), (90, 90)).split(",", 1)[1])
    return _b64(full[: len(full) // 2])


BAD_REQUESTS = {
    # name: (create kwargs, status, code or param)
    "body-too-large": (dict(messages=image_message("q", _noise_png(300))), 413, "request_too_large"),
    "body-far-too-large": (dict(messages=[{"role": "user", "content": "a" * 2_000_000}]), 413, "request_too_large"),
    "image-too-many-pixels": (
        dict(messages=image_message("q", png_data_uri((5, 5, 5), (120, 120)))),
        413,
        "image_too_large",
    ),
    "too-many-images": (dict(messages=image_message("q", *[png_data_uri((1, 1, 1))] * 3)), 400, "too_many_images"),
    "malformed-base64": (
        dict(messages=image_message("q", "data:image/png;base64,iVBOR%%%w0KGgo=")),
        400,
        "invalid_base64",
    ),
    "not-an-image": (dict(messages=image_message("q", _b64(b"hello, I am text"))), 400, "invalid_image_format"),
    "gif-not-accepted": (
        dict(messages=image_message("q", png_data_uri((1, 1, 1), fmt="GIF"))),
        400,
        "invalid_image_format",
    ),
    "truncated-png": (dict(messages=image_message("q", _truncated_png())), 400, "invalid_image"),
    "not-a-data-uri": (dict(messages=image_message("q", "file:///etc/passwd")), 400, "invalid_image_url"),
    "remote-url-refused": (
        dict(messages=image_message("q", "http://127.0.0.1:9/face.png")),
        400,
        "remote_images_disabled",
    ),
    "unknown-field": (dict(messages=[{"role": "user", "content": "q"}], extra_body={"best_of": 3}), 400, "best_of"),
    "unknown-part-field": (
        dict(messages=[{"role": "user", "content": [{"type": "text", "text": "q", "x": 1}]}]),
        400,
        "messages.0.content.0.x",
    ),
    "tool-role": (dict(messages=[{"role": "tool", "content": "q", "tool_call_id": "1"}]), 400, "messages.0"),
    "n-above-1": (dict(messages=[{"role": "user", "content": "q"}], n=2), 400, "n"),
    "max-tokens-over-limit": (dict(messages=[{"role": "user", "content": "q"}], max_tokens=100_000), 400, "max_tokens"),
    "tools": (
        dict(messages=[{"role": "user", "content": "q"}], tools=[{"type": "function", "function": {"name": "f"}}]),
        400,
        "tools",
    ),
    "temperature-range": (dict(messages=[{"role": "user", "content": "q"}], temperature=3), 400, "temperature"),
    "context-length": (dict(messages=[{"role": "user", "content": "face " * 2100}]), 400, "context_length_exceeded"),
    "no-user-message": (dict(messages=[{"role": "system", "content": "q"}]), 400, "messages"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_openai_errors_and_the_server_keeps_answering(client: openai.OpenAI, case: str) -> None:
    import openai

    kwargs, status, code_or_param = BAD_REQUESTS[case]
    kwargs = dict(kwargs)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="facellm-tiny", max_tokens=kwargs.pop("max_tokens", 2), **kwargs)
    assert e.value.status_code == status
    body = e.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert code_or_param in (body["error"]["code"], body["error"]["param"]), body
    assert_alive(client)


def test_malformed_bodies(server: dict[str, Any], client: openai.OpenAI) -> None:
    url = server["url"] + "/chat/completions"
    status, body, _ = raw(url, b'{"model": "m", "messages": [')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body, _ = raw(url, b"[1, 2]")
    assert status == 400 and "must be a JSON object" in body["error"]["message"]
    status, body, _ = raw(url, b"\xff\xfe\x00garbage")
    assert status == 400
    status, body, _ = raw(server["url"] + "/nope", key=KEY)
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body, _ = raw(url, key=KEY, method="GET")
    assert status == 405 and set(body["error"]) == {"message", "type", "param", "code"}
    assert_alive(client)


NEWER_FIELDS: dict[str, Any] = {
    "service_tier": "auto",
    "reasoning_effort": "low",
    "prompt_cache_key": "faces-v1",
    "safety_identifier": "user-123",
    "verbosity": "low",
    "user": "someone",
    "metadata": {"run": "a"},
    "store": False,
    "parallel_tool_calls": False,
    "prediction": None,
    "audio": None,
    "functions": [],
    "function_call": "none",
    "frequency_penalty": 0,
    "presence_penalty": 0,
}


def test_newer_openai_fields_that_cannot_change_the_answer_are_ignored(
    client: openai.OpenAI, server: dict[str, Any]
) -> None:
    import openai

    logs: io.StringIO = server["logs"]
    plain = ask(client, (60, 90, 120), QUESTIONS[2], max_tokens=5).choices[0].message.content
    for _ in range(2):
        r = ask(client, (60, 90, 120), QUESTIONS[2], max_tokens=5, **NEWER_FIELDS)
        assert r.choices[0].message.content == plain
    ignored = [json.loads(x) for x in logs.getvalue().splitlines() if '"ignored request field"' in x]
    named = [x["field"] for x in ignored]
    sent = [f for f, v in NEWER_FIELDS.items() if v is not None]
    assert sorted(named) == sorted(sent)  # each logged once, however many requests send it
    # fields that would change the answer and are not implemented keep their 400
    refused = {
        "prediction": {"type": "content", "content": "A smiling face."},
        "audio": {"voice": "alloy", "format": "wav"},
        "functions": [{"name": "lookup", "parameters": {"type": "object"}}],
        "function_call": {"name": "lookup"},
        "frequency_penalty": 0.5,
    }
    for field, value in refused.items():
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, (60, 90, 120), QUESTIONS[2], max_tokens=2, **{field: value})
        assert e.value.body["param"] == field and "not supported" in e.value.body["message"], field
    assert_alive(client)


def _post(url: str, body: bytes, content_type: str) -> tuple[int, Any]:
    req = urllib.request.Request(
        url, data=body, headers={"Content-Type": content_type, "Authorization": f"Bearer {KEY}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_deep_nesting_content_type_and_part_count_are_refused(server: dict[str, Any], client: openai.OpenAI) -> None:
    url = server["url"] + "/chat/completions"
    head = b'{"model": "m", "messages": [{"role": "user", "content": "q"}], "metadata": '
    for depth in (50_000, 100):  # deeper than Python's parser recursion, and deeper than the server allows
        status, body, _ = raw(url, head + b"[" * depth + b"]" * depth + b"}")
        assert status == 400 and body["error"]["code"] == "invalid_json", (depth, body)
        assert "nested more than 64 levels deep" in body["error"]["message"]
    good = json.dumps({"model": "m", "messages": [{"role": "user", "content": "q"}], "max_tokens": 1}).encode()
    status, body = _post(url, good, "text/plain")
    assert status == 415 and body["error"]["code"] == "unsupported_media_type"
    assert "application/json" in body["error"]["message"]
    assert _post(url, good, "application/json; charset=utf-8")[0] == 200
    # many tiny parts in a small body: refused by count before validation builds them
    parts = [{"type": "text", "text": ""}] * 1025
    many = json.dumps({"model": "m", "messages": [{"role": "user", "content": parts}], "max_tokens": 1}).encode()
    status, body, _ = raw(url, many)
    assert status == 400 and body["error"]["code"] == "too_many_parts" and body["error"]["param"] == "messages"
    assert "1,025 in this request, the server allows 1,024" in body["error"]["message"]
    assert_alive(client)


def test_a_huge_many_part_body_is_refused_without_stalling_health(lm: Any) -> None:
    """200,000 text parts (5.4 MB): one 400 before validation builds them; /health answers meanwhile."""
    from facellm_cli.config import ServeConfig

    cfg = ServeConfig.model_validate({"model": {"model": "unused-here"}, "generation": {"max_new_tokens": 2}})
    parts = [{"type": "text", "text": "a"}] * 200_000
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": parts}]}, separators=(",", ":"))
    assert len(body) < cfg.max_body_mb * 1_000_000
    with running_server(cfg, lm) as (url, _app):
        results: dict[str, Any] = {}

        def big() -> None:
            results["big"] = raw(url + "/chat/completions", body.encode(), key=None)

        t = threading.Thread(target=big)
        t.start()
        healths = []
        while t.is_alive():
            status, h, _ = raw(url.removesuffix("/v1") + "/health", key=None)
            healths.append(status)
        t.join()
        status, err, _ = results["big"]
        assert status == 400 and err["error"]["code"] == "too_many_parts"
        assert healths and set(healths) == {200}


def test_concurrent_requests_are_batched_without_cross_talk(client: openai.OpenAI, server: dict[str, Any]) -> None:
    colors = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (200, 200, 0), (0, 200, 200), (90, 30, 160)]
    jobs = [(c, QUESTIONS[i % len(QUESTIONS)], i % 3 == 2) for i, c in enumerate(colors)]  # every 3rd one streams

    def one(job: tuple[tuple[int, int, int], str, bool]) -> str:
        color, q, stream = job
        if not stream:
            return ask(client, color, q, max_tokens=6).choices[0].message.content
        return "".join(
            c.choices[0].delta.content or "" for c in ask(client, color, q, max_tokens=6, stream=True) if c.choices
        ).strip()

    alone = [one(j) for j in jobs]  # one by one: each request is a batch of its own
    assert len(set(alone)) >= 4, alone  # answers differ, so a mix-up would show
    before = health(server)["batcher"]
    barrier = threading.Barrier(len(jobs))

    def together(job: tuple[tuple[int, int, int], str, bool]) -> str:
        barrier.wait()
        return one(job)

    with ThreadPoolExecutor(len(jobs)) as pool:
        batched = list(pool.map(together, jobs))
    after = health(server)["batcher"]
    assert batched == alone
    new_batches = after["batches"] - before["batches"]
    assert after["requests"] - before["requests"] == len(jobs)
    assert new_batches < len(jobs), (before, after)  # at least one batch held more than one request
    grew = {k: v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    assert any(int(k) > 1 and v > 0 for k, v in grew.items()), grew


def _open_stream(server: dict[str, Any], max_tokens: int, stream: bool) -> socket.socket:
    host, port = server["url"].removeprefix("http://").removesuffix("/v1").split(":")
    body = json.dumps(
        {
            "model": "m",
            "messages": image_message("Describe the face.", png_data_uri((3, 4, 5))),
            "max_tokens": max_tokens,
            "stream": stream,
        }
    ).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def _wait_for(server: dict[str, Any], key: str, at_least: int, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = health(server)["batcher"]
        if stats[key] >= at_least:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"waited {timeout:.0f} s for batcher {key} to reach {at_least}: {health(server)['batcher']}")


def test_disconnected_clients_free_their_slot(server: dict[str, Any], client: openai.OpenAI) -> None:
    start = health(server)["batcher"]
    # 1. a streaming client that leaves after its first generated text: its row stops long before 400 tokens
    sock = _open_stream(server, 400, stream=True)
    received = b""
    while b'"delta": {"content": ' not in received:
        piece = sock.recv(65536)
        assert piece, received
        received += piece
    t0 = time.monotonic()
    sock.close()
    _wait_for(server, "cancelled_during_generation", start["cancelled_during_generation"] + 1)
    assert time.monotonic() - t0 < 20
    # 2. a client that leaves while queued behind a long request is dropped before batching
    busy = _open_stream(server, 250, stream=False)
    time.sleep(0.5)  # the long request is generating now
    queued = _open_stream(server, 5, stream=False)
    time.sleep(0.2)
    queued.close()
    time.sleep(0.3)  # the server notices (it polls every 50 ms) while the long request still holds the model
    busy.close()  # then the long one leaves too, so the test does not wait for it
    _wait_for(server, "cancelled_before_batch", start["cancelled_before_batch"] + 1)
    assert_alive(client)


def test_one_log_line_per_request_and_never_the_key(server: dict[str, Any], client: openai.OpenAI) -> None:
    logs: io.StringIO = server["logs"]
    n_before = len(logs.getvalue().splitlines())
    r = ask(client, (7, 7, 7), QUESTIONS[0], max_tokens=3)
    raw(server["url"] + "/models", key="sk-wrong-key-123")
    lines = [json.loads(x) for x in logs.getvalue().splitlines()[n_before:]]
    ok = [x for x in lines if x.get("id") == r.id]
    assert len(ok) == 1
    assert ok[0]["status"] == 200 and ok[0]["images"] == 1
    assert ok[0]["prompt_tokens"] == r.usage.prompt_tokens and ok[0]["completion_tokens"] == 3
    assert ok[0]["latency_ms"] > 0 and ok[0]["batch"] >= 1
    assert any(x["status"] == 401 for x in lines)
    everything = logs.getvalue()
    assert KEY not in everything and "sk-wrong-key-123" not in everything


def test_serve_cli_help_and_config_errors(cli: Any, tiny_internvl: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = cli("serve", "--help")
    assert r.code == 0 and "--api-key-env" in r.out and "--max-batch-size" in r.out
    monkeypatch.delenv("FACELLM_TEST_UNSET_KEY", raising=False)
    r = cli("serve", "--model", tiny_internvl, "--api-key-env", "FACELLM_TEST_UNSET_KEY")
    assert r.code == 1 and "environment variable FACELLM_TEST_UNSET_KEY is not set or empty" in r.err
    r = cli("serve", "--model", tiny_internvl, "--max-batch-size", "0")
    assert r.code == 1 and "max_batch_size: Input should be greater than 0" in r.err
    r = cli("serve", "--model", tiny_internvl, "--set", "nope=1")
    assert r.code == 1 and "nope: unknown key" in r.err


def test_serve_config_defaults_bind_localhost() -> None:
    from facellm_cli.config import ServeConfig

    cfg = ServeConfig()
    assert cfg.host == "127.0.0.1" and cfg.api_key_env is None and not cfg.allow_remote_images


@pytest.mark.slow
def test_cli_serve_subprocess_end_to_end(tiny_internvl: Path, tmp_path: Path) -> None:
    """The real ``facellm serve`` process: starts, answers the openai client, logs JSON lines, stops on SIGINT."""
    import signal

    import openai

    env = subprocess_env(FACELLM_SERVE_TEST_KEY=KEY)
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [
                *FACELLM,
                "serve",
                "--model",
                str(tiny_internvl),
                "--port",
                "0",
                "--api-key-env",
                "FACELLM_SERVE_TEST_KEY",
                "--log-json",
                "--set",
                "generation.max_new_tokens=3",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
    try:

        def listening() -> str | None:
            return next((w for w in err_path.read_text().split() if w.startswith("http://127.0.0.1:")), None)

        wait_for(lambda: listening() is not None, proc, f"the server printed its URL ({err_path.read_text()!r})")
        url = listening()
        c = openai.OpenAI(base_url=url, api_key=KEY, max_retries=5)
        r = c.chat.completions.create(model="x", messages=image_message("q", png_data_uri((1, 2, 3))))
        assert r.usage.completion_tokens <= 3
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait()  # a graceful shutdown, however long a busy machine makes it
    assert proc.returncode in (0, 130)  # uvicorn re-raises the SIGINT after a graceful shutdown
    text = err_path.read_text()
    assert "Traceback" not in text
    lines = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
    assert [x["id"] for x in lines] == [r.id] and lines[0]["images"] == 1
    assert KEY not in text


def test_seeded_sampling_is_repeatable(client: openai.OpenAI) -> None:
    a = ask(client, (50, 60, 70), QUESTIONS[2], max_tokens=6, temperature=1.5, seed=7).choices[0].message.content
    b = ask(client, (50, 60, 70), QUESTIONS[2], max_tokens=6, temperature=1.5, seed=7).choices[0].message.content
    assert a == b


def test_qwen2_vl_family_serves_text_image_and_stream(tiny_qwen2_vl: Path) -> None:
    import openai

    from facellm_cli.config import ModelConfig, ServeConfig
    from facellm_cli.models.loader import load_model_and_processor

    cfg = ServeConfig(model=ModelConfig(model=str(tiny_qwen2_vl)))
    qlm = load_model_and_processor(cfg.model)
    with running_server(cfg, qlm) as (url, _app):
        c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        messages = [
            {"role": "system", "content": "You describe faces."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look:"},
                    {"type": "image_url", "image_url": {"url": png_data_uri((9, 9, 9), (80, 48))}},
                ],
            },
            {"role": "assistant", "content": "A face."},
            {"role": "user", "content": "More detail?"},
        ]
        r = c.chat.completions.create(model=tiny_qwen2_vl.name, messages=messages, max_tokens=3)
        assert r.model == tiny_qwen2_vl.name and r.usage.completion_tokens <= 3
        chunks = list(c.chat.completions.create(model="x", messages=messages, max_tokens=3, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_a_conversation_the_chat_template_refuses_is_a_400() -> None:
    from types import SimpleNamespace

    import jinja2

    from facellm_cli.infer.generate import Prompt
    from facellm_cli.serve.app import PromptCheck
    from facellm_cli.serve.protocol import ProtocolError

    def refuse(*_a: Any, **_k: Any) -> str:
        raise jinja2.TemplateError("Conversation roles must alternate user/assistant/user/assistant")

    lm = SimpleNamespace(processor=SimpleNamespace(apply_chat_template=refuse), model=None)
    with pytest.raises(ProtocolError) as e:
        PromptCheck(lm)(Prompt(images=[], text="q", messages=[{"role": "user", "content": "q"}]), 16)
    assert e.value.status == 400 and e.value.code == "invalid_messages"
    assert "cannot render these messages: Conversation roles must alternate" in e.value.message


def test_a_request_that_breaks_its_batch_fails_alone(lm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """If generate fails for a batch, each request is retried alone: only the culprit gets the error."""
    import asyncio

    from facellm_cli.infer.generate import Prompt
    from facellm_cli.serve import batcher as batcher_mod

    real = batcher_mod.generate_batch
    calls: list[int] = []

    def flaky(lm_: Any, prompts: Any, cfg: Any, **kw: Any) -> Any:
        calls.append(len(prompts))
        if any(p.text == "poison" for p in prompts):
            raise RuntimeError("CUDA error: device-side assert triggered")
        return real(lm_, prompts, cfg, **kw)

    monkeypatch.setattr(batcher_mod, "generate_batch", flaky)

    async def main() -> list[Any]:
        b = batcher_mod.Batcher(lm, max_batch_size=4, max_wait_s=0.5)
        b.start()
        loop = asyncio.get_running_loop()
        jobs = [
            batcher_mod.Job(
                id=str(i), prompt=Prompt(images=[], text=t), loop=loop, params=batcher_mod.SamplingParams(max_tokens=3)
            )
            for i, t in enumerate(["a face", "poison", "two eyes"])
        ]
        for j in jobs:
            b.submit(j)
        out = await asyncio.gather(*(j.result() for j in jobs), return_exceptions=True)
        await asyncio.to_thread(b.stop)
        assert b.stats.failed == 1
        return out

    good1, bad, good2 = asyncio.run(main())
    assert calls == [3, 1, 1, 1]
    assert isinstance(bad, RuntimeError)
    assert good1.completion_tokens == 3 and good2.completion_tokens == 3 and good1.batch_size == 1


def test_example_serve_config_loads() -> None:
    from facellm_cli.config import ServeConfig, resolve_config

    path = REPO_ROOT / "examples" / "serve.yaml"
    cfg = resolve_config(ServeConfig, path, {"port": 9001}, ["max_batch_size=4"])
    assert cfg.served_model_name == "facellm-1b" and cfg.model.subfolder == "model"
    assert (cfg.port, cfg.max_batch_size, cfg.host) == (9001, 4, "127.0.0.1")


def test_remote_images_only_when_allowed(lm: Any) -> None:
    """--allow-remote-images fetches http(s) URLs (here a local static server); missing ones are a 400."""
    import http.server

    import openai

    from facellm_cli.config import ServeConfig

    png = base64.b64decode(png_data_uri((200, 100, 50)).split(",", 1)[1])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path != "/face.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args: Any) -> None:
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    cfg = ServeConfig.model_validate(
        {"model": {"model": "x"}, "allow_remote_images": True, "generation": {"max_new_tokens": 3}}
    )
    try:
        with running_server(cfg, lm) as (url, _app):
            c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
            r = c.chat.completions.create(model="x", messages=image_message(QUESTIONS[0], f"{base}/face.png"))
            inline_msgs = image_message(QUESTIONS[0], png_data_uri((200, 100, 50)))
            inline = c.chat.completions.create(model="x", messages=inline_msgs)
            assert r.choices[0].message.content == inline.choices[0].message.content
            assert r.usage.prompt_tokens == inline.usage.prompt_tokens
            with pytest.raises(openai.BadRequestError) as e:
                c.chat.completions.create(model="x", messages=image_message(QUESTIONS[0], f"{base}/missing.png"))
            assert e.value.code == "image_fetch_failed" and "missing.png" in e.value.message
    finally:
        files.shutdown()


def test_a_full_queue_is_refused(lm: Any) -> None:
    from facellm_cli.infer.generate import Prompt
    from facellm_cli.serve.batcher import Batcher, Job, QueueFull, SamplingParams

    b = Batcher(lm, max_batch_size=2, max_queue=2)  # not started: nothing leaves the queue
    for i in range(2):
        b.submit(Job(id=str(i), prompt=Prompt(images=[], text="q"), params=SamplingParams(max_tokens=1)))
    with pytest.raises(QueueFull, match="2 requests are already queued"):
        b.submit(Job(id="x", prompt=Prompt(images=[], text="q"), params=SamplingParams(max_tokens=1)))
    assert b.snapshot()["queued"] == 2


def test_json_replies_are_trimmed_to_the_json_only_when_it_parses() -> None:
    from facellm_cli.serve.messages import extract_json

    assert extract_json('{"a": 1}') == '{"a": 1}'
    fenced = 'Sure! ```json\n{"age": "20-29", "x": {"y": 2}}\n``` hope it helps'
    assert extract_json(fenced) == '{"age": "20-29", "x": {"y": 2}}'
    assert extract_json("no json {here") == "no json {here"
    assert extract_json("[1, 2]") == "[1, 2]"


@pytest.fixture
def open_server(lm: Any) -> Any:
    """A key-less server (as a local annotate/evaluate run would use) with the sharpened tiny model."""
    from facellm_cli.config import ServeConfig

    cfg = ServeConfig.model_validate(
        {
            "model": {"model": "x"},
            "served_model_name": "facellm-tiny",
            "generation": {"max_new_tokens": 8},
            "max_wait_ms": 20,
        }
    )
    with running_server(cfg, lm) as (url, app):
        yield url, app


def _faces(folder: Path, n: int) -> list[Path]:
    return [write_image(folder / f"face{i}.jpg", (70 * i, 120, 200 - 60 * i), 96) for i in range(n)]


def test_evaluate_runs_end_to_end_against_the_server(cli: Any, open_server: Any, tmp_path: Path) -> None:
    url, app = open_server
    faces = _faces(tmp_path / "imgs", 3)
    data = tmp_path / "set.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"q{i}",
                    "images": [p.name],
                    "question": "What is the facial expression?",
                    "options": ["smiling", "neutral", "frowning", "surprised"],
                    "answer": "ABC"[i],
                }
            )
            + "\n"
            for i, p in enumerate(faces)
        )
    )
    r = cli(
        "evaluate",
        "--data",
        data,
        "--image-root",
        tmp_path / "imgs",
        "--base-url",
        url,
        "--set",
        "endpoint.model=facellm-tiny",
        "--concurrency",
        "3",
        "--max-new-tokens",
        "4",
        "--out",
        tmp_path / "eval",
    )
    assert r.code == 0, r.err
    preds = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(p["id"] for p in preds) == ["q0", "q1", "q2"]
    assert app.state.batcher.snapshot()["requests"] == 3


def test_annotate_runs_end_to_end_against_the_server(cli: Any, open_server: Any, tmp_path: Path) -> None:
    url, app = open_server
    _faces(tmp_path / "imgs", 2)
    out = tmp_path / "ann.jsonl"
    r = cli(
        "annotate",
        tmp_path / "imgs",
        "--base-url",
        url,
        "--model",
        "facellm-tiny",
        "--concurrency",
        "8",
        "--max-retries",
        "0",
        "--set",
        "max_tokens=8",
        "--out",
        out,
    )
    assert r.code == 0, r.err
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 16  # 2 images x 8 aspects of the default prompt set, one request each
    assert {x["status"] for x in lines} == {"ok"} and {x["model"] for x in lines} == {"facellm-tiny"}
    assert all(x["answer"] and x["usage"]["completion_tokens"] > 0 for x in lines)
    stats = app.state.batcher.snapshot()
    assert stats["requests"] == 16 and stats["failed"] == 0
