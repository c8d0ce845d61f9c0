"""facellm evaluate: FaceXBench loading and prompts, likelihood/generate/endpoint answering, resume, reports."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from facellm_cli.config import EvalConfig, ModelConfig, validate_config
from facellm_cli.errors import ConfigError, DataError, OutputExistsError
from facellm_cli.eval.facexbench import CATEGORY_NAMES, category_display, load_facexbench
from facellm_cli.eval.report import build_results, compare, render_compare
from facellm_cli.eval.runner import LocalBackend, evaluate, select_questions
from facellm_cli.eval.sets import load_jsonl_set
from facellm_cli.schema import format_mcq_prompt
from facellm_cli.testing.facexbench import (
    FULL_BENCHMARK_MISSING,
    SHARED_BENCHMARK,
    SUBSET_BENCHMARK,
    find_facexbench,
    make_facexbench,
    png_bytes,
)
from facellm_cli.testing.fake_openai import Behaviour, FakeOpenAI
from facellm_cli.testing.paths import ASSETS, REPO_ROOT

README_COUNTS = {
    "bias_fairness": 1500,
    "face_recognition": 800,
    "fas_deepfakes": 700,
    "attributes_expression": 800,
    "face_localization": 1100,
    "tools_use": 100,
}
PAPER = json.loads((ASSETS / "facellm_1b_facexbench.json").read_text())


@pytest.fixture(scope="module")
def fxb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FaceXBench checkout of the committed subset (12 real files, 360 questions), placeholder PNGs at every path."""
    return make_facexbench(tmp_path_factory.mktemp("facexbench"))


@pytest.fixture(scope="module")
def fxb_full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All 48 question files with placeholder PNGs; skips (saying why) where they are not beside the repository."""
    if SHARED_BENCHMARK is None:
        pytest.skip(FULL_BENCHMARK_MISSING)
    return make_facexbench(tmp_path_factory.mktemp("facexbench-full"), source=SHARED_BENCHMARK)


@pytest.fixture(scope="module")
def questions(fxb_full: Path) -> list[Any]:
    return load_facexbench(fxb_full)


@pytest.fixture(scope="module")
def subset_questions(fxb: Path) -> list[Any]:
    return load_facexbench(fxb)


@pytest.fixture(scope="module")
def lm(tiny_internvl: Path) -> Any:
    from facellm_cli.models.loader import load_model_and_processor

    return load_model_and_processor(ModelConfig(model=str(tiny_internvl)))


def _cfg(fxb: Path, out: Path, model: Path | str = "unused", **kw: Any) -> EvalConfig:
    data = {"benchmark": "facexbench", "data_dir": str(fxb), "out": str(out), "model": {"model": str(model)}}
    data.update(kw)
    return validate_config(EvalConfig, data)


# ------------------------------------------------------------------ loading and prompts


def test_the_benchmark_is_found_beside_the_repository_or_from_the_environment(tmp_path: Path) -> None:
    assert find_facexbench(str(tmp_path / "nowhere")) is None
    bench = tmp_path / "fxb" / "benchmark"
    bench.mkdir(parents=True)
    for i in range(48):
        (bench / f"f{i}.json").write_text("{}")
    assert find_facexbench(str(tmp_path / "fxb")) == bench  # a checkout
    assert find_facexbench(str(bench)) == bench  # or its benchmark/ folder


def test_the_committed_subset_covers_every_category_and_setting(subset_questions: list[Any], fxb: Path) -> None:
    qs = subset_questions
    assert len(qs) == 360 and len({q.task for q in qs}) == 12 and len({q.id for q in qs}) == 360
    assert set(Counter(q.category for q in qs)) == set(README_COUNTS)
    assert Counter(q.setting for q in qs) == {"single": 210, "multiple": 120, "zero": 30}
    q = next(q for q in qs if q.id == "wmca_single_mcq/1")
    assert q.images == [str(fxb / "benchmark" / "data/WMCA/RGB/012_03_004_4_03/Frame_25.png")]
    assert (q.options, q.answer, q.category, q.subtask) == (["Yes", "No"], "A", "fas_deepfakes", "fas")
    assert next(q for q in qs if q.id == "fairface_single_mcq_age_test/1").labels == {"age": "30-39"}
    assert next(q for q in qs if q.id == "fairface_single_mcq_age_test/2").labels == {"age": "20-29"}
    assert next(q for q in qs if q.id == "fairface_multiple_mcq_gender_test/1").labels == {}
    assert len(select_questions(qs, ["tools_use"], None)) == 30
    assert len(select_questions(qs, ["Face Authentication"], None)) == 30
    assert len(select_questions(qs, ["age", "lapa_single_mcq"], 45)) == 45
    with pytest.raises(ConfigError, match="tasks: nosuch not in this set"):
        select_questions(qs, ["nosuch"], None)


def test_all_48_files_load_with_readme_counts(questions: list[Any], fxb_full: Path) -> None:
    fxb = fxb_full
    assert len(questions) == 5000
    assert len({q.task for q in questions}) == 48
    assert len({q.id for q in questions}) == 5000
    assert dict(Counter(q.category for q in questions)) == README_COUNTS
    assert len({q.subtask for q in questions}) == 14
    assert Counter(q.setting for q in questions) == {"multiple": 2750, "single": 2150, "zero": 100}
    q = next(q for q in questions if q.id == "wmca_single_mcq/1")
    assert q.images == [str(fxb / "benchmark" / "data/WMCA/RGB/012_03_004_4_03/Frame_25.png")]
    assert (q.options, q.answer, q.category, q.subtask) == (["Yes", "No"], "A", "fas_deepfakes", "fas")
    # Labels come from single-image bias questions whose answer names the group.
    assert next(q for q in questions if q.id == "fairface_single_mcq_age_test/1").labels == {"age": "30-39"}
    assert next(q for q in questions if q.id == "fairface_single_mcq_age_test/2").labels == {"age": "20-29"}
    assert next(q for q in questions if q.id == "fairface_multiple_mcq_gender_test/1").labels == {}
    assert sum(1 for q in questions if q.labels) > 400


def test_category_display_names_follow_the_paper() -> None:
    assert [category_display(k) for k in CATEGORY_NAMES] == [
        "Bias & Fairness",
        "Face Recognition",
        "Face Authentication",
        "Face Analysis",
        "Face Localization",
        "Face Tools Use",
    ]


def _reference_prompt(meta: dict[str, Any], q: dict[str, Any], prepend: bool) -> str:
    """FaceXBench evaluate.py's prompt construction, rewritten from its description."""
    text = ""
    if meta["category"] == "tools_use":
        text += meta["context"] + "\n"
    if prepend and meta.get("prepend_text"):
        text += meta["prepend_text"] + "\n"
    text += q["question_text"] + "\n"
    if meta.get("postpend_text"):
        text += meta["postpend_text"] + "\n"
    for idx, option in enumerate(q["options"]):
        text += f"({'ABCD'[idx]}) {option}\n"
    return text


@pytest.mark.parametrize("which", ["subset", "full"])
def test_prompts_match_the_benchmark_wording(which: str, request: pytest.FixtureRequest) -> None:
    questions = request.getfixturevalue("subset_questions" if which == "subset" else "questions")
    source = SUBSET_BENCHMARK if which == "subset" else SHARED_BENCHMARK
    assert source is not None
    by_id = {q.id: q for q in questions}
    checked = 0
    for path in sorted(source.glob("*.json")):
        meta = json.loads(path.read_text())
        for n, raw in meta["questions"].items():
            q = by_id[f"{path.stem}/{n}"]
            for prepend in (False, True):
                assert format_mcq_prompt(q, with_task_description=prepend) == _reference_prompt(meta, raw, prepend)
            checked += 1
    assert checked == len(questions) == (360 if which == "subset" else 5000)
    tools = by_id["tools_retrieval/1"]
    assert format_mcq_prompt(tools).startswith("Ignore the black image provided.\n1. Age Estimation:")


def test_missing_images_are_listed_in_one_error(tmp_path: Path) -> None:
    root = make_facexbench(tmp_path, ["wmca_single_mcq.json", "lapa_single_mcq.json"])
    (root / "benchmark/images/lapa_single_mcq/question_7.png").unlink()
    (root / "benchmark/data/WMCA/RGB/012_03_004_4_03/Frame_25.png").unlink()
    with pytest.raises(DataError) as e:
        load_facexbench(root)
    msg = str(e.value)
    assert msg.startswith("2 image(s) listed by the questions are missing under")
    assert "images/lapa_single_mcq/question_7.png" in msg and "data/WMCA/RGB/012_03_004_4_03/Frame_25.png" in msg


def test_data_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="FaceXBench folder not found"):
        load_facexbench(tmp_path / "nope")
    with pytest.raises(DataError, match=r"no FaceXBench question files \(\*\.json\)"):
        load_facexbench(tmp_path)


def test_task_selection(questions: list[Any]) -> None:
    assert len(select_questions(questions, ["tools_use"], None)) == 100
    assert len(select_questions(questions, ["Face Authentication"], None)) == 700
    assert len(select_questions(questions, ["age", "lapa_single_mcq"], 250)) == 250
    with pytest.raises(ConfigError, match="tasks: nosuch not in this set"):
        select_questions(questions, ["nosuch"], None)


# ------------------------------------------------------------------ answering on tiny models


def test_likelihood_answers_every_question_single_multi_zero(fxb: Path, lm: Any, tmp_path: Path) -> None:
    cfg = _cfg(
        fxb,
        tmp_path / "run",
        mode="likelihood",
        batch_size=4,
        tasks=["tools_retrieval", "affectnet_multiple_mcq", "wmca_single_mcq"],
    )
    chosen = select_questions(load_facexbench(fxb), cfg.tasks, None)
    by_id = {q.id: q for q in chosen}
    ids = ["affectnet_multiple_mcq/1", "affectnet_multiple_mcq/3", "wmca_single_mcq/1", "wmca_single_mcq/2"]
    picked = [by_id[i] for i in ids]  # multi-image (2 and 3 images), 2-option wmca
    assert [len(q.images) for q in picked] == [2, 3, 1, 1]
    backend = LocalBackend(lm, cfg)
    batch_scores = backend.score(picked)
    assert backend.calls == 1  # one forward pass for the whole batch
    assert [len(s) for s in batch_scores] == [len(q.options) for q in picked]
    # Right padding: a (padded) question scores the same alone as in the batch.
    for i in (0, 2):
        assert backend.score([picked[i]])[0] == pytest.approx(batch_scores[i], abs=1e-4)
    tools = by_id["tools_retrieval/1"]  # FaceXBench's "zero" setting: a black image and a long API context
    assert tools.setting == "zero" and tools.task == "tools_retrieval"
    assert len(backend.score([tools])[0]) == 4
    outcome = evaluate(
        cfg.model_copy(update={"limit": 6, "tasks": ["affectnet_multiple_mcq", "wmca_single_mcq"]}), lm=lm
    )
    recs = [json.loads(line) for line in (tmp_path / "run/predictions.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and outcome.asked == 6
    for r in recs:
        assert r["prediction"] in "ABCD"[: len(r["options"])] and r["how"] == "likelihood"
    assert outcome.results["overall"]["unparseable"] == 0


def test_likelihood_on_qwen2_vl(fxb: Path, tiny_qwen2_vl: Path, tmp_path: Path) -> None:
    cfg = _cfg(
        fxb,
        tmp_path / "q",
        model=tiny_qwen2_vl,
        mode="likelihood",
        batch_size=3,
        limit=3,
        tasks=["celeba_multiple_mcq"],
    )
    outcome = evaluate(cfg)
    assert outcome.asked == 3 and outcome.model_calls == 1
    recs = [json.loads(x) for x in (tmp_path / "q/predictions.jsonl").read_text().splitlines()]
    assert all(r["prediction"] in "ABCD" for r in recs)
    assert {r["num_images"] for r in recs} - {1}  # multi-image questions went through


def test_generate_mode_parses_or_counts_unparseable(fxb: Path, lm: Any, tmp_path: Path) -> None:
    cfg = _cfg(
        fxb,
        tmp_path / "g",
        mode="generate",
        batch_size=2,
        limit=2,
        tasks=["rafdb_single_mcq_train"],
        generation={"max_new_tokens": 4},
    )
    outcome = evaluate(cfg, lm=lm)
    recs = [json.loads(x) for x in (tmp_path / "g/predictions.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(isinstance(r["raw"], str) for r in recs)
    assert all(r["prediction"] is None or r["prediction"] in "ABCD" for r in recs)
    unparseable = sum(r["prediction"] is None for r in recs)
    assert outcome.results["overall"]["unparseable"] == unparseable


# ------------------------------------------------------------------ resume


def test_interrupted_run_resumes_without_reasking(fxb: Path, lm: Any, tiny_internvl: Path, tmp_path: Path) -> None:
    from facellm_cli.testing.reporter import RecordingReporter

    out = tmp_path / "r"
    cfg = _cfg(fxb, out, tiny_internvl, mode="likelihood", batch_size=2, limit=6, tasks=["lapa_single_mcq"])

    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg, lm=lm, reporter=RecordingReporter(stop_at=2))
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 2
    with open(out / "predictions.jsonl", "a") as f:  # a write torn by kill -9
        f.write('{"id": "lapa_single_mcq/3", "pred')
    rec = RecordingReporter()
    outcome = evaluate(cfg, reporter=rec)
    assert (outcome.asked, outcome.cached, outcome.model_calls) == (4, 2, 2)
    assert rec.stages() == [f"loading {tiny_internvl} (transformers)", "answering questions"]
    # The count starts at what was cached, then one batch of 2 at a time.
    assert rec.calls[-3:] == [("advance", 2), ("advance", 2), ("advance", 2)]
    ids = [json.loads(x)["id"] for x in (out / "predictions.jsonl").read_text().splitlines()]
    expected = [q.id for q in select_questions(load_facexbench(fxb), cfg.tasks, 6, cfg.sample_seed)]
    assert sorted(ids) == sorted(expected) and len(set(ids)) == 6  # each asked once, torn line dropped
    # Everything answered: a rerun loads no model and asks nothing.
    rec = RecordingReporter()
    again = evaluate(cfg, reporter=rec)
    assert (again.asked, again.cached, again.model_calls) == (0, 6, 0)
    assert rec.stages() == ["answering questions"]
    assert again.results["overall"] == outcome.results["overall"]


def test_evaluate_with_the_silent_default_prints_nothing(
    fxb: Path, lm: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluate(_cfg(fxb, tmp_path / "q", mode="likelihood", limit=2, tasks=["lapa_single_mcq"]), lm=lm)
    assert capsys.readouterr() == ("", "")


def test_other_setup_in_same_folder_is_refused(fxb: Path, lm: Any, tmp_path: Path) -> None:
    cfg = _cfg(fxb, tmp_path / "s", mode="likelihood", limit=1, tasks=["lapa_single_mcq"])
    evaluate(cfg, lm=lm)
    with pytest.raises(
        OutputExistsError,
        match=r"different setup \(changed: max_new_tokens, mode, temperature, top_p\); use another --out",
    ):
        evaluate(cfg.model_copy(update={"mode": "generate"}), lm=lm)


# ------------------------------------------------------------------ aggregation and reports


def _paper_counts() -> dict[str, int]:
    """Correct answers per category implied by the paper's percentages (each one is unique)."""
    counts = {}
    for cat, acc in PAPER["accuracy"].items():
        n = PAPER["questions_per_category"][cat]
        ks = [k for k in range(n + 1) if round(100 * k / n, 2) == acc]
        assert len(ks) == 1, (cat, ks)
        counts[cat] = ks[0]
    return counts


def test_aggregator_reproduces_facellm_1b_scores(questions: list[Any]) -> None:
    correct = _paper_counts()
    deepfakes = [q for q in questions if q.subtask == "deepfakes"]
    dropped = {q.id for q in deepfakes[:2]}  # the paper's run had 298 deepfake questions
    assert len(deepfakes) - len(dropped) == PAPER["deepfake_questions_in_run"]
    records, seen = [], Counter()
    for q in questions:
        if q.id in dropped:
            continue
        ok = seen[q.category] < correct[q.category]
        seen[q.category] += 1
        records.append(
            {
                "category": q.category,
                "subtask": q.subtask,
                "task": q.task,
                "setting": q.setting,
                "num_images": len(q.images),
                "labels": q.labels,
                "prediction": q.answer if ok else None,
                "correct": ok,
                "how": "explicit",
            }
        )
    res = build_results(records)
    assert res["overall"]["n"] == 4998
    assert round(res["overall"]["accuracy"], 2) == PAPER["overall"]
    got = {c["key"]: round(c["accuracy"], 2) for c in res["categories"]}
    assert got == PAPER["accuracy"]
    assert [c["name"] for c in res["categories"]] == list(CATEGORY_NAMES.values())
    # Question-weighted, as FaceXBench aggregates: the mean of category means would be 37.08,
    # and the same answers over all 5,000 questions 38.84.
    assert round(sum(PAPER["accuracy"].values()) / 6, 2) == 37.08
    assert round(100 * sum(correct.values()) / 5000, 2) == 38.84


def test_reports_fairness_and_compare(fxb: Path, lm: Any, tmp_path: Path, cli: Any) -> None:
    runs = []
    for name, desc in (("a", False), ("b", True)):
        cfg = _cfg(
            fxb,
            tmp_path / name,
            mode="likelihood",
            batch_size=4,
            limit=8,
            with_task_description=desc,
            tasks=["fairface_single_mcq_gender_test", "utkface_single_mcq_race_test"],
        )
        runs.append(evaluate(cfg, lm=lm))
    out = tmp_path / "a"
    res = json.loads((out / "results.json").read_text())
    assert res["overall"]["n"] == 8 and res["meta"]["mode"] == "likelihood"
    # --limit samples both tasks (stratified), not the first 8 of the first file
    assert set(res["fairness"]) == {"gender", "race"} and res["tasks"].keys() == {
        "fairface_single_mcq_gender_test",
        "utkface_single_mcq_race_test",
    }
    assert "random sample of 8 (seed 0, stratified over tasks)" in res["meta"]["selection"]
    groups = res["fairness"]["gender"]["groups"]
    n_gender = res["tasks"]["fairface_single_mcq_gender_test"]["n"]
    assert sum(g["n"] for g in groups.values()) == n_gender and set(groups) <= {"Male", "Female"}
    gap = res["fairness"]["gender"]["gap"]
    assert gap == pytest.approx(
        max(g["accuracy"] for g in groups.values()) - min(g["accuracy"] for g in groups.values())
    )
    md = (out / "report.md").read_text()
    assert "| Bias & Fairness |" in md and "## Fairness" in md and "| gender |" in md
    assert (out / "accuracy_by_category.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg_saved = (out / "config.yaml").read_text()
    assert "mode: likelihood" in cfg_saved and "fairface_single_mcq_gender_test" in cfg_saved
    table = compare([tmp_path / "a", tmp_path / "b"])
    assert list(table["rows"])[:2] == ["Overall", "Bias & Fairness"]
    assert len(table["rows"]["Overall"]) == 2
    text = render_compare(table)
    assert text.splitlines()[2] == "| questions | 8 | 8 |"
    r = cli("evaluate", "--compare", tmp_path / "a", "--compare", tmp_path / "b", "--out", tmp_path / "cmp")
    assert r.code == 0 and r.out == text
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = cli("evaluate", "--compare", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "cmp2")  # the README's form
    assert r.code == 0 and r.out == text and (tmp_path / "cmp2" / "comparison.png").is_file()
    r = cli("evaluate", "--compare", tmp_path / "nope")
    assert r.code == 1 and "no results.json in" in r.err


# ------------------------------------------------------------------ other sets


def test_generic_jsonl_set_with_zero_image_questions(lm: Any, tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png_bytes((200, 10, 10)))
    (tmp_path / "imgs" / "b.png").write_bytes(png_bytes((10, 200, 10)))
    lines = [
        {
            "images": ["a.png"],
            "question": "What colour dominates?",
            "options": ["red", "green"],
            "answer": "red",
            "labels": {"gender": "Female"},
        },
        {
            "images": ["a.png", "b.png"],
            "question": "Which image is green?",
            "options": ["Image 1", "Image 2"],
            "answer": "B",
            "labels": {"gender": "Male"},
        },
        {
            "images": [],
            "question": "Which API detects spoofing?",
            "options": ["api_4", "api_1", "api_2"],
            "answer": "A",
        },
    ]
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    qs = load_jsonl_set(data, image_root=tmp_path / "imgs")
    assert [q.answer for q in qs] == ["A", "B", "A"] and [q.setting for q in qs] == ["single", "multiple", "zero"]
    assert qs[0].images == [str(tmp_path / "imgs" / "a.png")] and qs[0].id == "set/1"
    with pytest.raises(DataError, match=r"2 image\(s\) listed by the questions are missing"):
        load_jsonl_set(data)  # relative to the file's folder by default, where they are not
    cfg = validate_config(
        EvalConfig,
        {
            "data": str(data),
            "image_root": str(tmp_path / "imgs"),
            "mode": "likelihood",
            "out": str(tmp_path / "o"),
            "batch_size": 3,
        },
    )
    outcome = evaluate(cfg, lm=lm)
    assert outcome.asked == 3 and outcome.model_calls == 1
    assert set(outcome.results["image_settings"]) == {"zero", "single", "multiple"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"images": [], "question": "q", "options": ["x", "y"], "answer": "z"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 1: answer 'z' is neither an option letter \(A, B\)"):
        load_jsonl_set(bad)


def test_build_dataset_mcq_export_folder(tmp_path: Path) -> None:
    (tmp_path / "faces").mkdir()
    (tmp_path / "faces" / "1.png").write_bytes(png_bytes())
    rec = {
        "id": "fairface/1/gender",
        "images": ["faces/1.png"],
        "question": "What is the gender?",
        "options": ["Male", "Female"],
        "answer": "B",
        "task": "gender",
        "category": "bias_fairness",
        "labels": {"gender": "Female", "age": "20-29"},
    }
    (tmp_path / "mcq_test.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "train.jsonl").write_text("not read\n")
    qs = load_jsonl_set(tmp_path)
    assert len(qs) == 1 and qs[0].id == "fairface/1/gender" and qs[0].labels["age"] == "20-29"
    assert qs[0].images == [str(tmp_path / "faces" / "1.png")]


# ------------------------------------------------------------------ endpoint mode


def test_endpoint_mode_retries_bounded_concurrency_no_key_saved(fxb: Path, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("FAKE_KEY", "sk-secret-123")
    with FakeOpenAI(default="A woman; the answer is (B)", latency=0.05) as server:
        server.script(Behaviour.server_error(500), Behaviour.rate_limited(retry_after=None))
        cfg = _cfg(
            fxb,
            tmp_path / "e",
            limit=6,
            tasks=["lapa_single_mcq"],
            endpoint={
                "base_url": server.base_url,
                "model": "gpt-fake",
                "api_key_env": "FAKE_KEY",
                "concurrency": 2,
                "max_retries": 3,
            },
        )
        outcome = evaluate(cfg, api_key="sk-secret-123")
    assert outcome.asked == 6 and outcome.model_calls == 8  # 6 answers + 2 retried failures
    assert server.max_in_flight <= 2
    assert server.headers[0]["authorization"] == "Bearer sk-secret-123"
    content = server.requests[0]["messages"][0]["content"]
    assert content[0]["type"] == "image_url" and content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert content[1]["text"].startswith("Which of the following regions is not present")
    recs = [json.loads(x) for x in (tmp_path / "e/predictions.jsonl").read_text().splitlines()]
    assert {r["prediction"] for r in recs} == {"B"} and {r["how"] for r in recs} == {"explicit"}
    for f in (tmp_path / "e").iterdir():
        if f.is_file() and f.suffix in (".yaml", ".json", ".jsonl", ".md"):
            assert "sk-secret-123" not in f.read_text()


def test_endpoint_gives_up_with_a_clear_error(fxb: Path, tmp_path: Path) -> None:
    from facellm_cli.errors import EndpointError

    with FakeOpenAI(default="The answer is (B).", latency=0.02) as server:
        server.script(*[Behaviour.server_error(503)] * 3)
        cfg = _cfg(
            fxb,
            tmp_path / "e",
            limit=1,
            tasks=["lapa_single_mcq"],
            endpoint={"base_url": server.base_url, "model": "m", "max_retries": 2, "concurrency": 1},
        )
        with pytest.raises(EndpointError, match=r"failed question lapa_single_mcq/\d+ after 3 attempts \(HTTP 503"):
            evaluate(cfg)


# ------------------------------------------------------------------ config and CLI


def test_config_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        validate_config(
            EvalConfig,
            {
                "benchmark": "facexbench",
                "data": "x.jsonl",
                "mode": "likelihood",
                "endpoint": {"base_url": "http://127.0.0.1:1/v1", "model": "m"},
            },
        )
    msg = str(e.value)
    assert "give either --benchmark facexbench --data-dir DIR or --data FILE, not both" in msg
    assert "--benchmark facexbench needs --data-dir" in msg
    assert "likelihood needs the model's logits; endpoints support mode generate only" in msg
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        validate_config(EvalConfig, {})


def test_cli_evaluate_end_to_end(fxb: Path, tiny_internvl: Path, tmp_path: Path, cli: Any) -> None:
    r = cli("evaluate", "--help")
    assert r.code == 0 and "--with-task-description" in r.out and "--compare" in r.out
    out = tmp_path / "cli"
    args = ["evaluate", "--benchmark", "facexbench", "--data-dir", fxb, "--model", tiny_internvl]
    args += ["--mode", "likelihood", "--limit", "3", "--tasks", "wmca_single_mcq", "--out", out]
    r = cli(*args, "--batch-size", "3", "--json")
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert res["overall"]["n"] == 3 and res["categories"][0]["name"] == "Face Authentication"
    assert "3 answered, 0 from cache" in r.err
    r = cli(*args)
    assert r.code == 0 and "0 answered, 3 from cache" in r.err and r.out.startswith("| | accuracy %")
    r = cli("evaluate", "--data", tmp_path / "missing.jsonl", "--model", tiny_internvl, "--out", out / "x")
    assert r.code == 1 and "evaluation set not found" in r.err


def test_shipped_example_config_loads() -> None:
    from facellm_cli.config import resolve_config

    example = REPO_ROOT / "examples" / "evaluate_facexbench.yaml"
    cfg = resolve_config(EvalConfig, example, {"generation.temperature": 0.0}, ["batch_size=4"])
    assert (cfg.benchmark, cfg.mode, cfg.batch_size, cfg.generation.max_new_tokens) == (
        "facexbench",
        "likelihood",
        4,
        32,
    )
    assert cfg.model.model == "Idiap/FaceLLM-1B" and cfg.model.subfolder == "model"


def test_named_api_key_variable_must_be_set(tmp_path: Path, cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes())
    q = {"id": "q1", "images": ["a.png"], "question": "Which?", "options": ["x", "y"], "answer": "A"}
    (tmp_path / "set.jsonl").write_text(json.dumps(q) + "\n")
    monkeypatch.delenv("FACELLM_TEST_UNSET_KEY", raising=False)
    with FakeOpenAI(default="The answer is (B).", latency=0.02) as server:
        args = ["evaluate", "--data", tmp_path / "set.jsonl", "--base-url", server.base_url, "--model", "m"]
        r = cli(*args, "--api-key-env", "FACELLM_TEST_UNSET_KEY", "--out", tmp_path / "e1")
        assert r.code == 1 and server.requests == []  # nothing sent without the key
        assert [x for x in r.err.splitlines() if x.startswith("error:")] == [
            "error: api_key_env: environment variable FACELLM_TEST_UNSET_KEY is not set or empty "
            "(export FACELLM_TEST_UNSET_KEY=..., or name another with --api-key-env)"
        ]
        r = cli(*args, "--out", tmp_path / "e2")  # no variable named: a local endpoint may go without a key
        assert r.code == 0, r.err
        assert len(server.requests) == 1
