"""One endpoint client behind annotate, evaluate and ``ask --base-url``, against one real local server."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from facellm_cli.testing.fake_openai import Behaviour, FakeOpenAI
from facellm_cli.testing.files import write_image

RETRY_AFTER = 1.0  # seconds the server asks for; every backoff below is far shorter
FAST_BACKOFF = ["--set", "endpoint.backoff_base=0.01", "--set", "endpoint.backoff_max=0.05"]


def _gap_after_429(server: FakeOpenAI) -> float:
    """Seconds from the server's 429 answer to the next request it received (the client's wait, at least)."""
    log = server.chat_requests()
    i = next(i for i, r in enumerate(log) if r.outcome == "429")
    assert len(log) > i + 1, "the rate-limited request was never retried"
    return log[i + 1].started - log[i].finished


def test_annotate_evaluate_and_ask_share_the_client_and_honour_retry_after(cli, tmp_path: Path) -> None:
    face = write_image(tmp_path / "faces" / "a.png", (180, 140, 120), 24)
    question = {"id": "q1", "images": ["faces/a.png"], "question": "Which?", "options": ["x", "y"], "answer": "B"}
    (tmp_path / "set.jsonl").write_text(json.dumps(question) + "\n")
    with FakeOpenAI() as server:
        runs = {
            "annotate": [
                "annotate",
                tmp_path / "faces",
                "--out",
                tmp_path / "ann.jsonl",
                "--concurrency",
                "1",
                "--set",
                "aspects=[detail]",
            ],
            "evaluate": [
                "evaluate",
                "--data",
                tmp_path / "set.jsonl",
                "--model",
                "fake-vlm",
                "--concurrency",
                "1",
                "--out",
                tmp_path / "eval",
            ],
            "ask": ["ask", face, "how old?", "--model", "fake-vlm"],
        }
        results = {}
        for name, args in runs.items():
            server.log.clear()
            server.script(Behaviour.rate_limited(retry_after=RETRY_AFTER), Behaviour.ok("The answer is (B)."))
            r = cli(*args, "--base-url", server.base_url, *FAST_BACKOFF)
            assert r.code == 0, (name, r.err)
            assert [x.outcome for x in server.chat_requests()] == ["429", "200"], name
            assert _gap_after_429(server) >= RETRY_AFTER, name
            results[name] = (r, server.chat_requests()[-1].body)
    assert json.loads((tmp_path / "ann.jsonl").read_text())["answer"] == "The answer is (B)."
    assert json.loads((tmp_path / "eval" / "predictions.jsonl").read_text())["prediction"] == "B"
    ask, body = results["ask"]
    assert body["stream"] is True and ask.out == "The answer is (B).\n"  # streamed, word by word
    assert "stream" not in results["evaluate"][1] and "stream" not in results["annotate"][1]


def test_ask_base_url_many_images_in_order(cli, tmp_path: Path) -> None:
    images = [write_image(tmp_path / f"{i}.png", (40 * i, 90, 200 - 40 * i), 24) for i in range(3)]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    with FakeOpenAI(api_key="sk-remote") as server:
        # the first request to arrive answers last: results still come back in the order given
        server.script(Behaviour.ok("one", delay=0.3), Behaviour.ok("two"), Behaviour.ok("three"))
        args = ["ask", *images, bad, "age?", "--base-url", server.base_url, "--model", "m", "--json"]
        r = cli(*args, "--api-key-env", "REMOTE_KEY_FOR_TEST", "--set", "endpoint.concurrency=3")
        assert r.code == 1 and "REMOTE_KEY_FOR_TEST is not set" in r.err and server.count() == 0
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("REMOTE_KEY_FOR_TEST", "sk-remote")
            r = cli(*args, "--api-key-env", "REMOTE_KEY_FOR_TEST", "--set", "endpoint.concurrency=3")
        r_unnamed = cli("ask", images[0], "age?", "--base-url", server.base_url)
    assert r_unnamed.code == 1 and "error: endpoint.model: name the model the endpoint serves" in r_unnamed.err
    rows = [json.loads(line) for line in r.out.splitlines()]
    assert [row["image"] for row in rows] == [*map(str, images), str(bad)]
    assert sorted(row["answer"] for row in rows[:3]) == ["one", "three", "two"]
    assert rows[3]["answer"] is None and "not an image file" in rows[3]["error"]
    assert r.code == 1 and "1 of 4 images could not be read" in r.err
    assert {x.authorization for x in server.chat_requests()} == {"Bearer sk-remote"}


@pytest.mark.parametrize("command", ["ask", "evaluate"])
def test_local_model_flags_with_base_url_are_rejected(cli, tmp_path: Path, command: str) -> None:
    face = write_image(tmp_path / "a.png", (10, 20, 30), 24)
    target = [face, "q?"] if command == "ask" else ["--data", tmp_path / "set.jsonl", "--out", tmp_path / "e"]
    (tmp_path / "set.jsonl").write_text(
        json.dumps({"id": "q", "images": ["a.png"], "question": "?", "options": ["x", "y"], "answer": "A"}) + "\n"
    )
    r = cli(
        command,
        *target,
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--model",
        "m",
        "--adapter",
        "runs/lora",
        "--dtype",
        "auto",
    )
    assert r.code == 1
    errors = [line for line in r.err.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: model.adapter: --adapter set up a local model, but the endpoint (--base-url) answers; "
        "drop --adapter or --base-url"
    ]


def test_flat_endpoint_keys_still_work_with_one_deprecation_line(cli, tmp_path: Path) -> None:
    from facellm_cli.config import AnnotateConfig, QuickstartConfig, resolve_config
    from facellm_cli.errors import ConfigDeprecationWarning

    with pytest.warns(ConfigDeprecationWarning, match=r"timeout: renamed to endpoint.timeout_s"):
        cfg = resolve_config(AnnotateConfig, None, {"images": ["x"]}, ["timeout=3", "model=m1", "image_max_side=64"])
    assert (cfg.endpoint.timeout_s, cfg.endpoint.model, cfg.endpoint.max_image_side) == (3, "m1", 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flag_wins = resolve_config(AnnotateConfig, None, {"images": ["x"], "endpoint.model": "new"}, ["model=old"])
        qs = QuickstartConfig.model_validate({"base_url": "http://127.0.0.1:1/v1", "annotate_model": "m2"})
    assert flag_wins.endpoint.model == "new"
    assert qs.annotate_endpoint is not None and qs.annotate_endpoint.model == "m2"
    assert QuickstartConfig().annotate_endpoint is None

    write_image(tmp_path / "faces" / "a.png", (1, 2, 3), 24)
    args = ["annotate", tmp_path / "faces", "--out", tmp_path / "d.jsonl", "--dry-run"]
    r = cli(*args, "--set", "timeout=5", "--set", "concurrency=2")
    assert r.code == 0, r.err
    notes = [line for line in r.err.splitlines() if line.startswith("deprecated:")]
    assert notes == [
        "deprecated: concurrency: renamed to endpoint.concurrency (the old key works until the next release)",
        "deprecated: timeout: renamed to endpoint.timeout_s (the old key works until the next release)",
    ]


def test_a_rejected_key_stops_evaluate_at_once(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_image(tmp_path / "a.png", (5, 5, 5), 24)
    rows = [
        {"id": f"q{i}", "images": ["a.png"], "question": "?", "options": ["x", "y"], "answer": "A"} for i in range(4)
    ]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("WRONG_KEY_FOR_TEST", "sk-wrong")
    with FakeOpenAI(api_key="sk-right") as server:
        args = ["evaluate", "--data", tmp_path / "set.jsonl", "--base-url", server.base_url, "--model", "m"]
        r = cli(*args, "--api-key-env", "WRONG_KEY_FOR_TEST", "--concurrency", "1", "--out", tmp_path / "e")
        assert server.count() == 1  # not retried, and no other question sent
        assert r.code == 1
        assert f"error: endpoint {server.base_url} rejected the API key (HTTP 401" in r.err
