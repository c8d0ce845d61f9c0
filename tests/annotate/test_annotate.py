"""``facellm annotate`` end to end against a real local HTTP server (facellm_cli.testing.fake_openai), no client mocks."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from facellm_cli.annotate.labels import read_labels
from facellm_cli.annotate.pipeline import read_annotations
from facellm_cli.annotate.prompts import FAIRFACEGPT_V1, load_prompt_set, render_aspect
from facellm_cli.errors import ConfigError, DataError
from facellm_cli.refusals import is_refusal
from facellm_cli.testing.cli import FACELLM, subprocess_env
from facellm_cli.testing.fake_openai import Behaviour, FakeOpenAI
from facellm_cli.testing.files import write_image
from facellm_cli.testing.paths import REPO_ROOT
from facellm_cli.testing.servers import wait_for

KEY = "sk-test-DO-NOT-LEAK-4f9a2c"
ASPECTS = [a.key for a in FAIRFACEGPT_V1.aspects]


def make_faces(folder: Path, n: int, size: int = 32) -> list[Path]:
    """n small JPEGs with different pixels (so different sha256)."""
    colours = [(i * 7 % 256, 80 + i % 100, 200 - i % 150) for i in range(n)]
    return [write_image(folder / f"{i:03d}.jpg", c, size) for i, c in enumerate(colours)]


@pytest.fixture
def faces(tmp_path: Path) -> Path:
    make_faces(tmp_path / "faces", 3)
    (tmp_path / "labels.csv").write_text(
        "file,age,gender,race,service_test\n"
        "faces/000.jpg,3-9,Male,Latino_Hispanic,True\n"
        "faces/001.jpg,20-29,Female,East Asian,False\n"
        "faces/002.jpg,more than 70,Male,Black,False\n"
        "faces/404.jpg,30-39,Female,White,False\n"
    )
    return tmp_path


@pytest.fixture
def server():
    with FakeOpenAI(api_key=KEY) as s:
        yield s


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def fast(*extra: str) -> list[str]:
    """Flags that keep retries quick in tests."""
    return ["--set", "backoff_base=0.02", "--set", "timeout=2", *extra]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# ---- prompts, labels, refusal detector -------------------------------------------------------


def test_default_prompt_set_follows_the_paper() -> None:
    assert ASPECTS == [
        "demographics",
        "facial_structure",
        "skin_texture",
        "expression_emotion",
        "lighting_quality",
        "face_pose",
        "forensic",
        "detail",
    ]
    pose = next(a for a in FAIRFACEGPT_V1.aspects if a.key == "face_pose")
    prompt, question = render_aspect(
        FAIRFACEGPT_V1, pose, {"age": "3-9", "gender": "Female", "race": "Latino_Hispanic"}
    )
    assert prompt.startswith("We know that this is a face image of a girl of Latino/Hispanic ethnicity, 3-9 years old.")
    assert "Describe only the face pose of the image" in prompt
    assert question == "Describe the face pose of the image based on the visual information."
    assert "girl" not in question
    adult, _ = render_aspect(FAIRFACEGPT_V1, pose, {"age": "0-2", "gender": "Male", "race": "White"})
    assert "a boy of White ethnicity, 0-2 years old" in adult
    adult, _ = render_aspect(FAIRFACEGPT_V1, pose, {"age": "20-29", "gender": "Male", "expression": "smiling"})
    assert "a man, 20-29 years old. Other known attributes of the face: expression: smiling." in adult
    detail = FAIRFACEGPT_V1.aspects[-1]
    assert render_aspect(FAIRFACEGPT_V1, detail, {})[0] == "Describe this image."


def test_user_prompt_set_yaml_is_validated(tmp_path: Path) -> None:
    good = tmp_path / "mine.yaml"
    good.write_text(
        "version: mine-v2\nsystem: Describe faces.\naspects:\n"
        "  - {key: hair, name: hair, prompt: '{labels} Describe the {name}.', question: 'What about the {name}?'}\n"
    )
    ps = load_prompt_set(str(good))
    assert ps.version == "mine-v2" and [a.key for a in ps.aspects] == ["hair"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: x\nsystem: s\ncolour: red\naspects:\n  - {key: hair, name: hair, prompt: '{lables}', question: q}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_prompt_set(str(bad))
    text = str(e.value)
    assert "colour: unknown key" in text and str(bad) in text
    bad.write_text("version: x\nsystem: s\naspects:\n  - {key: hair, name: hair, prompt: '{lables}', question: q}\n")
    with pytest.raises(ConfigError, match=r"aspects.0.prompt: unknown placeholder \{lables\}"):
        load_prompt_set(str(bad))
    with pytest.raises(ConfigError, match="neither a built-in prompt set"):
        load_prompt_set("no-such-set")


def test_label_files(tmp_path: Path) -> None:
    csv_path = tmp_path / "l.csv"
    csv_path.write_text("file,age,gender,race,service_test\nval/1.jpg,50-59,Male,Middle Eastern,True\n,1,2,3,4\n")
    t = read_labels(csv_path, ignore=["service_test"])
    assert t.image_column == "file"
    assert [(r.image, r.labels) for r in t.rows] == [
        ("val/1.jpg", {"age": "50-59", "gender": "Male", "race": "Middle Eastern"})
    ]
    assert t.problems == [f"label row without an image: {csv_path} line 3 (empty 'file')"]
    jl = tmp_path / "l.jsonl"
    jl.write_text('{"image_path": "a.png", "expression": "smiling", "glasses": "no", "extra": null}\n')
    t = read_labels(jl)
    assert t.image_column == "image_path" and t.rows[0].labels == {"expression": "smiling", "glasses": "no"}
    (tmp_path / "n.csv").write_text("name,age\nx.jpg,3\n")
    with pytest.raises(DataError, match="has no image column .* columns are: name, age"):
        read_labels(tmp_path / "n.csv")


def test_fairface_label_values_are_checked_before_any_request(
    cli, faces: Path, server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.chdir(faces)
    (faces / "bad.csv").write_text(
        "file,age,gender,race,service_test\n"
        "faces/000.jpg,3-9,Male,Martian,True\n"
        "faces/001.jpg,banana,Robot,East Asian,False\n"
        "faces/002.jpg,more than 70,Male,Black,False\n"
    )
    r = cli("annotate", "faces", "--labels", "bad.csv", "--base-url", server.base_url, *fast())
    assert r.code == 1 and server.count() == 0
    races = "White, Black, Latino_Hispanic, East Asian, Southeast Asian, Indian, Middle Eastern"
    assert error_lines(r.err) == [
        f"error: bad.csv line 2: race 'Martian' is not a known value (one of: {races})",
        "error: bad.csv line 3: age 'banana' is not a known value "
        "(one of: 0-2, 3-9, 10-19, 20-29, 30-39, 40-49, 50-59, 60-69, more than 70)",
        "error: bad.csv line 3: gender 'Robot' is not a known value (one of: Male, Female)",
        "error: 3 label value(s) would go into the prompts as written: fix them, "
        "or give --prompts a prompt set YAML whose label_values allow them",
    ]
    assert not (faces / "annotations.jsonl").exists()
    # the template provider and dry runs check them too; FairFace's spellings with other case or '_' pass
    assert cli("annotate", "--labels", "bad.csv", "--provider", "template").code == 1
    assert cli("annotate", "faces", "--labels", "bad.csv", "--dry-run").code == 1
    (faces / "ok.csv").write_text("file,age,gender,race\nfaces/000.jpg,20-29,female,east_asian\n")
    r = cli("annotate", "faces/000.jpg", "--labels", "ok.csv", "--provider", "template", "--out", "ok.jsonl")
    assert r.code == 0, r.err


def test_ragged_and_malformed_csv_rows_name_their_lines(cli, faces: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(faces)
    (faces / "ragged.csv").write_text(
        "file,age,gender,race\n"
        "faces/000.jpg,3-9,Male\n"
        "faces/001.jpg,20-29,Female,White\n"
        "faces/002.jpg,20-29,Female,White,extra\n"
    )
    r = cli("annotate", "--labels", "ragged.csv", "--provider", "template")
    assert r.code == 1
    assert error_lines(r.err) == [
        "error: ragged.csv line 2: 3 cells but the header has 4 (file, age, gender, race); too few cells in that row",
        "error: ragged.csv line 4: 5 cells but the header has 4 (file, age, gender, race); too many cells in that row",
    ]
    # a stray quote opens a cell that swallows the next rows: a CSV error at its line, not a missing image
    (faces / "quote.csv").write_text(
        "file,age,gender,race\n"
        "faces/000.jpg,3-9,Male,White\n"
        'faces/001.jpg,"20-29,Female,White\n'
        'faces/002.jpg,20-29,Female,White"\n'
    )
    r = cli("annotate", "--labels", "quote.csv", "--provider", "template")
    assert r.code == 1
    assert error_lines(r.err) == [
        'error: quote.csv line 3: a quoted cell runs on to line 4, merging rows (a stray " in the file?); '
        "fix the quoting (not a valid CSV)"
    ]
    (faces / "open.csv").write_text('file,age\nfaces/000.jpg,3-9\nfaces/001.jpg,"20-29\nfaces/002.jpg,3-9\n')
    r = cli("annotate", "--labels", "open.csv", "--provider", "template")
    assert error_lines(r.err) == [
        "error: open.csv line 3: not a valid CSV (unexpected end of data); check the quoting from that line on"
    ]
    assert not (faces / "annotations.jsonl").exists()


def test_refusal_detector() -> None:
    assert is_refusal("I\u2019m sorry, but I can\u2019t help with that.")
    assert is_refusal("Sorry, I can't assist with identifying people.")
    assert not is_refusal("The face is frontal. " * 20 + "The blur leaves the eye colour unable to be seen.")
    # one detector for annotate and build-dataset: a refusal tacked on after a description still counts
    assert is_refusal("The face is frontal. " * 20 + "However, I'm unable to determine the person's ethnicity.")
    assert not is_refusal("The person is smiling broadly.")


# ---- template provider -----------------------------------------------------------------------


def test_template_provider_offline(cli, tmp_path: Path, faces: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(faces)
    (faces / "syn.csv").write_text(
        "image,expression,eyes,glasses,pose,background\n"
        "faces/000.jpg,smiling,open,yes,frontal,plain white\n"
        "faces/001.jpg,neutral,closed,no,turned left,\n"
    )
    # no API key and an endpoint nobody listens on: the template provider must not need either
    r = cli(
        "annotate",
        "faces",
        "--labels",
        "syn.csv",
        "--provider",
        "template",
        "--out",
        "syn.jsonl",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--json",
    )
    assert r.code == 0, r.err
    recs = lines(faces / "syn.jsonl")
    qa = {(x["image"], x["aspect"]): (x["question"], x["answer"]) for x in recs}
    assert qa[("faces/000.jpg", "expression")] == (
        "What is the facial expression of the person in the image?",
        "The person is smiling.",
    )
    assert qa[("faces/001.jpg", "expression")][1] == "The person has a neutral expression."
    assert qa[("faces/000.jpg", "eyes")] == (
        "Are the eyes of the person in the image open or closed?",
        "The person's eyes are open.",
    )
    assert qa[("faces/000.jpg", "glasses")][1] == "Yes, the person is wearing glasses."
    assert qa[("faces/001.jpg", "glasses")][1] == "No, the person is not wearing glasses."
    assert qa[("faces/000.jpg", "pose")][1] == "The head pose is frontal."
    assert ("faces/001.jpg", "background") not in qa  # empty cell: nothing to say
    assert len(recs) == 9 and all(x["provider"] == "template" and x["model"] == "template" for x in recs)
    summary = json.loads(r.out)
    assert summary["written_ok"] == 9 and summary["requests"] == 0
    assert (faces / "syn.config.yaml").exists()

    r = cli("annotate", "faces", "--labels", "labels.csv", "--provider", "template", "--out", "ff.jsonl")
    assert r.code == 0, r.err
    qa = {(x["image"], x["aspect"]): x["answer"] for x in lines(faces / "ff.jsonl")}
    assert (
        qa[("faces/000.jpg", "demographics")]
        == "The person appears to be a boy of Latino/Hispanic ethnicity, 3-9 years old."
    )
    assert qa[("faces/000.jpg", "gender")] == "The person is a boy."
    assert qa[("faces/001.jpg", "race")] == "The person appears to be of East Asian ethnicity."
    assert qa[("faces/002.jpg", "age")] == "The person is more than 70 years old."
    assert not any(k[1] == "service_test" for k in qa)
    assert "label row without an image: faces/404.jpg" in r.err
    before = (faces / "ff.jsonl").read_text()
    r = cli("annotate", "faces", "--labels", "labels.csv", "--provider", "template", "--out", "ff.jsonl", "--json")
    assert r.code == 0 and json.loads(r.out)["written_ok"] == 0  # deterministic and resumable: nothing new
    assert (faces / "ff.jsonl").read_text() == before


def test_complete_last_line_without_newline_is_kept(cli, faces: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(faces)
    args = ["annotate", "faces", "--labels", "labels.csv", "--provider", "template", "--out", "ff.jsonl", "--json"]
    assert cli(*args).code == 0
    out = faces / "ff.jsonl"
    full = out.read_text()
    n = full.count("\n")
    out.write_text(full.rstrip("\n"))  # a complete record, only its newline missing (e.g. edited by hand)
    r = cli(*args)
    assert r.code == 0, r.err
    assert json.loads(r.out)["written_ok"] == 0 and json.loads(r.out)["items_done_before"] == n
    assert out.read_text() == full  # kept, newline added
    with open(out, "a") as f:  # a torn tail is still cut
        f.write('{"image": "faces/000.jpg", "image_sha')
    r = cli(*args)
    assert r.code == 0 and json.loads(r.out)["written_ok"] == 0
    assert out.read_text() == full


# ---- live endpoint ---------------------------------------------------------------------------


def test_all_items_complete_despite_faults(
    cli, faces: Path, server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.chdir(faces)
    server.script(
        Behaviour.rate_limited(retry_after=1),
        Behaviour.server_error(500),
        Behaviour.server_error(503),
        Behaviour.drop(),
        Behaviour.slow(3.0),  # longer than the 2 s client timeout
        Behaviour.malformed_json(),
        Behaviour.refusal(),
        Behaviour.refusal("I am unable to analyze faces."),
        Behaviour.empty(),
        Behaviour.ok("A clear frontal face.", usage=(1000, 7)),
    )
    r = cli(
        "annotate",
        "faces",
        "--labels",
        "labels.csv",
        "--out",
        "ann.jsonl",
        "--base-url",
        server.base_url,
        "--concurrency",
        "4",
        "--json",
        *fast(),
    )
    assert r.code == 0, r.err
    recs = lines(faces / "ann.jsonl")
    assert sorted((x["image"], x["aspect"]) for x in recs) == sorted(
        (f"faces/00{i}.jpg", a) for i in range(3) for a in ASPECTS
    )
    assert all(x["status"] == "ok" for x in recs)
    assert not any(is_refusal(x["answer"]) or not x["answer"].strip() for x in recs)
    summary = json.loads(r.out)
    assert summary["written_ok"] == 24 and summary["failed"] == 0
    assert summary["retries"] == 5  # 429, 500, 503, drop, timeout
    assert summary["rejected"] == {"malformed": 1, "refusal": 2, "empty": 1} and summary["reasks"] == 4
    assert summary["prompt_tokens"] == sum(x["usage"]["prompt_tokens"] for x in recs) >= 1000
    assert summary["cost_usd"] > 0
    # the 429's Retry-After (1 s) was honoured: the same request came back no sooner than a second later
    chats = server.chat_requests()
    i = next(i for i, x in enumerate(chats) if x.outcome == "429")
    retry = next(x for x in chats[i + 1 :] if x.body == chats[i].body)
    assert retry.started - chats[i].finished >= 0.95
    # labels went into the prompt, the stored question is label-free
    demo = next(x for x in recs if x["image"] == "faces/000.jpg" and x["aspect"] == "demographics")
    assert demo["labels"] == {"age": "3-9", "gender": "Male", "race": "Latino_Hispanic"}
    assert demo["question"] == "Describe the demographic attributes of the image based on the visual information."
    assert any("a boy of Latino/Hispanic ethnicity, 3-9 years old" in json.dumps(x.body) for x in chats)
    assert "label row without an image: faces/404.jpg" in r.err


def test_grouped_mode_sends_each_image_once(
    cli, faces: Path, server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.chdir(faces)
    first = "faces/000.jpg"
    (faces / "faces" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    server.script(Behaviour.ok('{"demographics": "I\'m sorry, I cannot help."}'))  # partial + refusal: re-ask the rest
    r = cli(
        "annotate", "faces", "--out", "g.jsonl", "--base-url", server.base_url, "--mode", "grouped", "--json", *fast()
    )
    assert r.code == 1, r.err  # the broken image makes the exit code non-zero, after the others are all done
    assert error_lines(r.err) == [
        "error: 1 input image(s) skipped as unreadable or missing (see the problems above); fix or remove them"
    ]
    recs = lines(faces / "g.jsonl")
    assert len(recs) == 24 and all(x["status"] == "ok" for x in recs)
    assert len({(x["image_sha256"], x["aspect"]) for x in recs}) == 24
    chats = server.chat_requests()
    assert len(chats) == 4  # 3 images + 1 re-ask of the image whose answer was unusable
    assert all(x.body["response_format"]["type"] == "json_schema" for x in chats)
    assert server.images_received() == 4
    summary = json.loads(r.out)
    assert summary["rejected"] == {"empty": 7, "refusal": 1}
    assert summary["prompt_tokens"] == sum(x["usage"]["prompt_tokens"] for x in recs)
    assert {x["question"] for x in recs if x["aspect"] == "face_pose"} == {
        "Describe the face pose of the image based on the visual information."
    }
    assert first in {x["image"] for x in recs}
    assert "not an image file (format not recognised): faces/broken.jpg" in r.err  # reported; the rest done
    assert json.loads(r.out)["images_skipped"] == 1


def test_grouped_falls_back_to_json_in_text(cli, faces: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(faces)
    with FakeOpenAI(structured_outputs=False) as srv:  # local server: no key needed
        srv.script(Behaviour.ok("Here you go:\n```json\nnot json at all\n```"))
        r = cli(
            "annotate",
            "faces",
            "--out",
            "t.jsonl",
            "--base-url",
            srv.base_url,
            "--mode",
            "grouped",
            "--concurrency",
            "1",
            "--json",
            *fast(),
        )
        assert r.code == 0, r.err
        chats = srv.chat_requests()
    assert len(lines(faces / "t.jsonl")) == 24
    # structured outputs were tried (only by requests already prepared when the first 400 came back)
    tried = [x for x in chats if "response_format" in x.body]
    assert 1 <= len(tried) <= 2 and all(x.outcome == "400" for x in tried)
    assert sum(1 for x in chats if x.outcome == "200") == 4  # 3 images + 1 re-ask after the malformed answer
    assert json.loads(r.out)["rejected"] == {"malformed": 1}


def test_failed_items_are_recorded_then_retried_by_a_later_run(
    cli, faces: Path, server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.chdir(faces)
    server.script(*[Behaviour.server_error(500, match="Describe only the face pose")] * 3)
    args = [
        "annotate",
        "faces",
        "--out",
        "a.jsonl",
        "--base-url",
        server.base_url,
        "--max-retries",
        "0",
        "--json",
        *fast(),
    ]
    r = cli(*args)
    assert r.code == 1
    assert error_lines(r.err) == [
        "error: 3 item(s) failed (reasons in a.failures.jsonl); re-run the same command to retry them"
    ]
    # the output holds answers only, one per pair; the failures and their reasons are in the sidecar
    assert len(lines(faces / "a.jsonl")) == 21 and all(x["status"] == "ok" for x in lines(faces / "a.jsonl"))
    failed = lines(faces / "a.failures.jsonl")
    assert sorted(x["aspect"] for x in failed) == ["face_pose"] * 3
    assert all(x["status"] == "failed" and x["answer"] == "" and "HTTP 500" in x["error"] for x in failed)
    assert json.loads(r.out)["failures_outstanding"] == 3
    server.script(Behaviour.server_error(500, match="Describe only the face pose"))  # one of the three fails again
    r = cli(*args)
    assert r.code == 1 and json.loads(r.out)["failed_before"] == 3
    assert json.loads(r.out)["written_ok"] == 2 and json.loads(r.out)["failures_outstanding"] == 1
    assert len(lines(faces / "a.failures.jsonl")) == 1  # the two answered pairs left the sidecar
    r = cli(*args)
    assert r.code == 0, r.err
    assert json.loads(r.out)["written_ok"] == 1 and json.loads(r.out)["items_done_before"] == 23
    assert not (faces / "a.failures.jsonl").exists()
    final = read_annotations(faces / "a.jsonl")
    assert len(final) == 24 and all(a.status == "ok" for a in final.values())
    recs = lines(faces / "a.jsonl")
    assert len(recs) == len({(x["image_sha256"], x["aspect"]) for x in recs}) == 24
    assert all(x["status"] == "ok" and x["answer"] for x in recs)


def test_failed_lines_left_by_older_versions_move_to_the_sidecar(
    cli, faces: Path, server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.chdir(faces)
    args = ["annotate", "faces", "--out", "a.jsonl", "--base-url", server.base_url, "--max-retries", "0", "--json"]
    args += fast("--set", "aspects=[detail,face_pose]")
    server.script(*[Behaviour.server_error(500, match="Describe only the face pose")] * 3)
    assert cli(*args).code == 1
    out, sidecar = faces / "a.jsonl", faces / "a.failures.jsonl"
    with open(out, "a") as f:  # what an older facellm wrote: failures among the answers
        f.write(sidecar.read_text())
    sidecar.unlink()
    server.script(Behaviour.server_error(500, match="Describe only the face pose"))
    r = cli(*args)
    assert r.code == 1 and json.loads(r.out)["failed_before"] == 3 and json.loads(r.out)["written_ok"] == 2
    recs = lines(out)
    assert len(recs) == len({(x["image_sha256"], x["aspect"]) for x in recs}) == 5
    assert all(x["status"] == "ok" for x in recs)
    assert [x["aspect"] for x in lines(sidecar)] == ["face_pose"]


def test_api_key_is_never_written(cli, faces: Path, server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_VLM_KEY", KEY)
    monkeypatch.chdir(faces)
    server.script(Behaviour.rate_limited(retry_after=0), Behaviour.server_error())
    r = cli(
        "annotate",
        "faces",
        "--out",
        "out/k.jsonl",
        "--base-url",
        server.base_url,
        "--api-key-env",
        "MY_VLM_KEY",
        "--json",
        *fast("--set", "aspects=[detail]"),
    )
    assert r.code == 0, r.err
    assert all(x.authorization == f"Bearer {KEY}" for x in server.chat_requests())  # the key was used...
    assert KEY not in r.out and KEY not in r.err  # ...and never shown
    files = [p for p in (faces / "out").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"k.jsonl", "k.config.yaml"}
    for p in files:
        assert KEY not in p.read_text(errors="replace"), p
    assert "api_key_env: MY_VLM_KEY" in (faces / "out" / "k.config.yaml").read_text()
    # a wrong key: one clear line, still without the key
    monkeypatch.setenv("MY_VLM_KEY", "sk-wrong-0000")
    r = cli(
        "annotate",
        "faces",
        "--out",
        "out/k2.jsonl",
        "--base-url",
        server.base_url,
        "--api-key-env",
        "MY_VLM_KEY",
        *fast(),
    )
    assert r.code == 1 and len(error_lines(r.err)) == 1
    assert "rejected the API key (HTTP 401" in r.err and "sk-wrong-0000" not in r.err


def test_named_api_key_variable_must_be_set(
    cli, faces: Path, server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(faces)
    monkeypatch.delenv("FACELLM_TEST_UNSET_KEY", raising=False)
    r = cli("annotate", "faces", "--base-url", server.base_url, "--api-key-env", "FACELLM_TEST_UNSET_KEY", *fast())
    assert r.code == 1 and server.count() == 0
    assert error_lines(r.err) == [
        "error: api_key_env: environment variable FACELLM_TEST_UNSET_KEY is not set or empty "
        "(export FACELLM_TEST_UNSET_KEY=..., or name another with --api-key-env)"
    ]
    assert not (faces / "annotations.jsonl").exists()


def _bomb_png(path: Path, side: int = 100_000) -> Path:
    """A PNG whose header claims side x side pixels (10 G): a decompression bomb for any decoder that trusts it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    data = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + data)
    return path


def test_skipped_inputs_make_the_exit_code_non_zero(
    cli, tmp_path: Path, server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (bad / "b.png").write_text("not an image")
    r = cli("annotate", "bad", "--out", "b.jsonl", "--base-url", server.base_url, "--json", *fast())
    assert r.code == 1 and server.count() == 0
    summary = json.loads(r.out)  # the summary is still printed
    assert summary["images_skipped"] == 2 and summary["written_ok"] == 0
    assert error_lines(r.err) == [
        "error: 2 input image(s) skipped as unreadable or missing (see the problems above); fix or remove them"
    ]
    assert "not an image file (format not recognised): bad/a.jpg" in r.err
    make_faces(bad, 1)  # one good image: the batch path reports the two bad ones once and fails the run
    r = cli("annotate", "bad", "--out", "c.jsonl", "--base-url", server.base_url, "--json", "--batch", *fast())
    assert r.code == 1 and json.loads(r.out)["images_skipped"] == 2 and json.loads(r.out)["written_ok"] == 8

    make_faces(tmp_path / "mixed", 1)
    _bomb_png(tmp_path / "mixed" / "bomb.png")
    (tmp_path / "l.csv").write_text("file,expression\nmixed/000.jpg,smiling\nmixed/bomb.png,neutral\n")
    r = cli("annotate", "--labels", "l.csv", "--provider", "template", "--out", "t.jsonl", "--json")
    assert r.code == 1
    summary = json.loads(r.out)
    assert summary["images_skipped"] == 1 and summary["written_ok"] == 1
    assert "image too large (decompression bomb guard" in " ".join(r.err.split())
    assert error_lines(r.err) == [
        "error: 1 input image(s) skipped as unreadable or missing (see the problems above); fix or remove them"
    ]


def test_bad_inputs_give_one_line_errors(cli, faces: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(faces)
    cases = [
        (
            ["annotate", "nowhere/", "--provider", "template"],
            "error: no images to annotate in: nowhere/ (image not found: nowhere)",
        ),
        (["annotate", "faces", "--mode", "sideways"], "error: mode: Input should be 'per-aspect' or 'grouped'"),
        (
            ["annotate", "faces", "--labels", "missing.csv", "--provider", "template"],
            "error: labels file not found: missing.csv (check --labels)",
        ),
        (
            ["annotate", "faces"],
            "error: environment variable OPENAI_API_KEY is not set: export OPENAI_API_KEY=... "
            "(or name another with --api-key-env)",
        ),
        (
            ["annotate", "faces", "--base-url", "127.0.0.1:8000/v1"],
            "error: endpoint.base_url: '127.0.0.1:8000/v1' must start with http:// or https://",
        ),
        (
            [
                "annotate",
                "faces",
                "--prompts",
                "fairfacegpt-v1",
                "--set",
                "aspects=[hair]",
                "--base-url",
                "http://127.0.0.1:9/v1",
            ],
            "error: aspects: unknown aspect 'hair' for prompt set fairfacegpt-v1",
        ),
        (
            [
                "annotate",
                "faces",
                "--base-url",
                "http://127.0.0.1:9/v1",
                "--max-retries",
                "0",
                "--set",
                "aspects=[detail]",
            ],
            "error: cannot reach endpoint http://127.0.0.1:9/v1",
        ),
    ]
    for args, expected in cases:
        r = cli(*args)
        assert r.code == 1, (args, r.err)
        errs = error_lines(r.err)
        assert len(errs) == 1 and errs[0].startswith(expected), (args, r.err)
        assert "Traceback" not in r.err


def test_dry_run_estimates_without_calling(
    cli, faces: Path, server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(faces)
    r = cli("annotate", "faces", "--labels", "labels.csv", "--dry-run", "--json")
    assert r.code == 0, r.err
    est = json.loads(r.out)
    assert est["dry_run"] and est["requests"] == 24 and est["image_tokens"] == 24 * 255
    assert est["completion_tokens"] == 24 * 300 and 0 < est["cost_usd"] < 1
    r = cli("annotate", "faces", "--dry-run", "--json", "--mode", "grouped", "--batch")
    grouped = json.loads(r.out)
    assert grouped["requests"] == 3 and grouped["image_tokens"] == 3 * 255
    assert not (faces / "annotations.jsonl").exists() and server.count() == 0
    r = cli("annotate", "faces", "--dry-run", "--model", "my-local-vlm")
    assert r.code == 0 and "estimated cost unknown" in r.err


def test_rpm_cap_spaces_requests(cli, faces: Path, server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.chdir(faces)
    r = cli(
        "annotate",
        "faces",
        "--out",
        "r.jsonl",
        "--base-url",
        server.base_url,
        "--rpm",
        "300",
        *fast("--set", "aspects=[detail,face_pose]"),
    )
    assert r.code == 0, r.err
    starts = sorted(x.started for x in server.chat_requests())
    assert len(starts) == 6 and starts[-1] - starts[0] >= 5 * 0.2 * 0.9  # 300 rpm = one start per 0.2 s


# ---- crash safety (real processes) -----------------------------------------------------------


def _wait_lines(path: Path, n: int, proc: subprocess.Popen) -> None:
    wait_for(lambda: path.exists() and path.read_text().count("\n") >= n, proc, f"{path} reached {n} lines")


def test_killed_run_resumes_without_duplicates(tmp_path: Path) -> None:
    make_faces(tmp_path / "faces", 12)
    out = tmp_path / "ann.jsonl"
    cmd = [
        *FACELLM,
        "annotate",
        str(tmp_path / "faces"),
        "--out",
        str(out),
        "--concurrency",
        "4",
    ]
    failures = tmp_path / "ann.failures.jsonl"
    with FakeOpenAI(api_key=KEY, latency=0.05) as srv:
        srv.script(*[Behaviour.server_error(500, match="Describe only the face pose")] * 3)
        cmd += ["--base-url", srv.base_url, "--json", "--max-retries", "0"]
        proc = subprocess.Popen(
            cmd, env=subprocess_env(OPENAI_API_KEY=KEY), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        _wait_lines(failures, 3, proc)  # the three failures are in the sidecar...
        _wait_lines(out, 20, proc)  # ...and at least 20 answers in the output
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        partial = out.read_text().count("\n")
        assert 20 <= partial < 93
        with open(out, "a") as f:  # what a kill in the middle of a write leaves behind
            f.write('{"image": "faces/011.jpg", "image_sha256": "ab')
        with open(failures, "a") as f:
            f.write('{"image": "faces/011.jpg", "ima')
        done = subprocess.run(
            cmd, env=subprocess_env(OPENAI_API_KEY=KEY), capture_output=True, text=True
        )  # until it ends
        assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["items_done_before"] == partial and summary["written_ok"] == 96 - partial
    assert summary["failed_before"] == 3 and summary["failures_outstanding"] == 0
    recs = lines(out)
    assert len(recs) == 96 and all(x["status"] == "ok" for x in recs)
    assert len({(x["image_sha256"], x["aspect"]) for x in recs}) == 96
    assert not failures.exists()  # every failed pair was answered on resume


# ---- batch API -------------------------------------------------------------------------------


def test_batch_splits_merges_and_reasks(cli, faces: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.chdir(faces)
    with FakeOpenAI(api_key=KEY, batch_polls=2) as srv:
        srv.script(Behaviour.refusal(match="only the skin texture"), Behaviour.server_error(match="only the face pose"))
        r = cli(
            "annotate",
            "faces",
            "--labels",
            "labels.csv",
            "--out",
            "b.jsonl",
            "--base-url",
            srv.base_url,
            "--batch",
            "--json",
            "--set",
            "batch_poll_s=0.01",
            "--set",
            "batch_max_requests=10",
        )
        assert r.code == 0, r.err
        assert srv.count("/v1/files") == 4 and srv.count("/v1/batches") == 4  # 24 requests in 3 files + a re-ask round
    summary = json.loads(r.out)
    assert summary["written_ok"] == 24 and summary["requests"] == 26 and summary["reasks"] == 2
    assert len(summary["batch_ids"]) == 4 and summary["rejected"] == {"refusal": 1}
    recs = lines(faces / "b.jsonl")
    assert len(recs) == 24 and len({(x["image_sha256"], x["aspect"]) for x in recs}) == 24
    assert not any(is_refusal(x["answer"]) for x in recs)
    parts = sorted(p.name for p in (faces / "b.batch").glob("round1_part*.jsonl"))
    assert parts == ["round1_part1.jsonl", "round1_part2.jsonl", "round1_part3.jsonl"]
    assert [len((faces / "b.batch" / p).read_text().splitlines()) for p in parts] == [10, 10, 4]
    # what is still unanswered after the last round goes to the failures sidecar, not the output
    with FakeOpenAI(api_key=KEY, batch_polls=1) as srv:
        srv.script(Behaviour.refusal(match="Describe this image"))
        args = ["annotate", "faces", "--out", "c.jsonl", "--base-url", srv.base_url, "--batch", "--json"]
        r = cli(*args, "--set", "batch_poll_s=0.01", "--set", "max_reasks=0", "--set", "aspects=[detail]")
    assert r.code == 1 and json.loads(r.out)["failures_outstanding"] == 1
    assert len(lines(faces / "c.jsonl")) == 2 and all(x["status"] == "ok" for x in lines(faces / "c.jsonl"))
    assert [(x["status"], x["error"]) for x in lines(faces / "c.failures.jsonl")] == [("failed", "refusal answer")]


def test_batch_resumes_by_batch_id(tmp_path: Path) -> None:
    make_faces(tmp_path / "faces", 2)
    out = tmp_path / "b.jsonl"
    with FakeOpenAI(api_key=KEY, batch_polls=10**9) as srv:  # batches never finish while the first run polls
        cmd = [
            *FACELLM,
            "annotate",
            str(tmp_path / "faces"),
            "--out",
            str(out),
            "--batch",
            "--mode",
            "grouped",
            "--base-url",
            srv.base_url,
            "--json",
            "--set",
            "batch_poll_s=0.05",
        ]
        proc = subprocess.Popen(
            cmd, env=subprocess_env(OPENAI_API_KEY=KEY), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        state = tmp_path / "b.batch" / "state.json"
        wait_for(
            lambda: state.exists() and '"batch_id": "batch' in state.read_text(), proc, "state.json held a batch id"
        )
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        batch_id = json.loads(state.read_text())["parts"][0]["batch_id"]
        assert srv.count("/v1/batches") == 1
        assert not out.exists() or out.read_text() == ""  # killed before any result came back
        srv.batch_polls = 1
        done = subprocess.run(
            cmd, env=subprocess_env(OPENAI_API_KEY=KEY), capture_output=True, text=True
        )  # until it ends
        assert done.returncode == 0, done.stderr
        assert srv.count("/v1/files") == 1 and srv.count("/v1/batches") == 1  # nothing uploaded or submitted twice
    assert json.loads(done.stdout)["batch_ids"] == [batch_id]
    assert len(lines(out)) == 16


def test_annotate_help(cli) -> None:
    r = cli("annotate", "--help")
    assert r.code == 0
    for flag in (
        "--labels",
        "--out",
        "--base-url",
        "--model",
        "--api-key-env",
        "--provider",
        "--mode",
        "--concurrency",
        "--rpm",
        "--max-retries",
        "--dry-run",
        "--batch",
        "--json",
        "--config",
        "--set",
    ):
        assert flag in r.out


def test_shipped_examples_load() -> None:
    from facellm_cli.config import AnnotateConfig, resolve_config

    examples = REPO_ROOT / "examples"
    cfg = resolve_config(AnnotateConfig, examples / "annotate_fairface.yaml")
    assert cfg.labels and cfg.endpoint.model == "gpt-4o-2024-11-20" and cfg.mode == "per-aspect"
    ps = load_prompt_set(str(examples / "annotate_prompts.yaml"))
    assert ps.version and len(ps.aspects) >= 2
    with pytest.raises(ConfigError, match="concurency: unknown key"):
        resolve_config(AnnotateConfig, None, None, ["concurency=4", "images=[x]"])


def test_annotate_reports_through_the_reporter_and_is_silent_by_default(
    faces: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from facellm_cli.annotate.pipeline import annotate
    from facellm_cli.config import AnnotateConfig
    from facellm_cli.testing.reporter import RecordingReporter

    monkeypatch.chdir(faces)
    (faces / "syn.csv").write_text(
        "image,expression\nfaces/000.jpg,smiling\nfaces/001.jpg,neutral\nfaces/002.jpg,frowning\n"
    )

    def cfg(out: str) -> AnnotateConfig:
        return AnnotateConfig(images=["faces"], labels="syn.csv", out=out, provider="template", aspects=["expression"])

    annotate(cfg("quiet.jsonl"))
    assert capsys.readouterr() == ("", "")
    rec = RecordingReporter()
    summary = annotate(cfg("counted.jsonl"), reporter=rec)
    assert summary.written_ok == 3
    assert rec.stages() == ["annotating"] and rec.calls[0] == ("stage", "annotating", 3)
    assert sum(c[1] for c in rec.calls if c[0] == "advance") == 3
    assert capsys.readouterr() == ("", "")
