"""The workflow connects: dataset manifest, evaluate's splits/compare/subsets/defaults, error wording, charts, progress."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from facellm_cli.config import DatasetConfig, EvalConfig, ModelConfig, validate_config
from facellm_cli.errors import ConfigError, DataError
from facellm_cli.testing.corpus import annotation, make_corpus, write_jsonl, write_png

PNG = b"\x89PNG\r\n\x1a\n"


def _build(tmp: Path, out: str = "data/ds", **kw: Any):
    from facellm_cli.data.build import build_dataset

    jsonl, _ = make_corpus(tmp)
    cfg = {"inputs": [str(jsonl)], "image_root": str(tmp / "faces"), "out": str(tmp / out), "mcq": ["expression"]}
    cfg.update(kw)
    return build_dataset(validate_config(DatasetConfig, cfg))


@pytest.fixture(scope="module")
def lm(tiny_internvl: Path) -> Any:
    from facellm_cli.models.loader import load_model_and_processor

    return load_model_and_processor(ModelConfig(model=str(tiny_internvl), device="cpu"))


# ---------------------------------------------------------------- 1: the dataset folder carries its image root


def test_dataset_folder_or_its_files_find_the_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from facellm_cli.eval.sets import load_jsonl_set
    from facellm_cli.train.data import read_samples

    _build(tmp_path)
    ds = tmp_path / "data/ds"
    manifest = json.loads((ds / "facellm_dataset.json").read_text())
    assert manifest["image_root"] == "../../faces" and manifest["kind"] == "facellm build-dataset"
    monkeypatch.chdir(tmp_path / "data")  # not where build-dataset ran
    faces = (tmp_path / "faces").resolve()
    for given in (ds, ds / "train.jsonl"):
        samples = read_samples(given)
        assert samples and all(p.resolve().parent == faces and p.is_file() for s in samples for p in s.images)
    assert read_samples(ds, key="data.eval")[0].source.startswith("val.jsonl")
    qs = load_jsonl_set(ds)
    assert qs and all(Path(i).resolve().parent == faces for q in qs for i in q.images)
    # An explicit image root still wins over the manifest.
    with pytest.raises(DataError, match=r"image not found: .*elsewhere/img_"):
        read_samples(ds / "train.jsonl", image_root=tmp_path / "elsewhere")
    # Dataset and images moved together: the relative root still finds them.
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(str(tmp_path / "faces"), moved / "faces")
    (moved / "data").mkdir()
    shutil.move(str(ds), moved / "data" / "ds")
    assert read_samples(moved / "data" / "ds")[0].images[0].is_file()


def test_finetune_preflight_accepts_the_dataset_folder(tmp_path: Path, tiny_internvl: Path) -> None:
    from facellm_cli.config import FinetuneConfig
    from facellm_cli.train.finetune import preflight

    _build(tmp_path)
    cfg = validate_config(
        FinetuneConfig,
        {
            "model": {"model": str(tiny_internvl)},
            "data": {"train": str(tmp_path / "data/ds"), "eval": str(tmp_path / "data/ds/val.jsonl")},
            "out": str(tmp_path / "run"),
        },
    )
    plan = preflight(cfg)
    assert plan.train and plan.eval and plan.train[0].images[0].is_file()


# ---------------------------------------------------------------- 4 and 7: evaluate on a dataset folder


def test_evaluate_dataset_folder_scores_the_test_split(
    tmp_path: Path, lm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from facellm_cli.eval.runner import default_out_dir, evaluate

    _build(tmp_path)
    ds = tmp_path / "data/ds"
    n_test = len((ds / "mcq_test.jsonl").read_text().splitlines())
    n_all = sum(len((ds / f"mcq_{s}.jsonl").read_text().splitlines()) for s in ("train", "val", "test"))
    assert 0 < n_test < n_all
    monkeypatch.chdir(tmp_path)
    cfg = validate_config(EvalConfig, {"data": str(ds), "model": {"model": lm.config.model}, "mode": "likelihood"})
    # Default output folder: named after the model and the set, so a second model gets its own.
    name = Path(lm.config.model).name
    assert default_out_dir(cfg) == Path(f"eval-{name}-ds-test")
    other = cfg.model_copy(update={"model": ModelConfig(model=lm.config.model, adapter=str(tmp_path / "lora-a"))})
    assert default_out_dir(other) == Path(f"eval-{name}+lora-a-ds-test")
    outcome = evaluate(cfg, lm=lm)
    assert outcome.out_dir == Path(f"eval-{name}-ds-test")
    assert outcome.results["overall"]["n"] == n_test and outcome.results["meta"]["split"] == "test"
    assert "(split: test)" in (outcome.out_dir / "report.md").read_text()
    every = evaluate(cfg.model_copy(update={"split": "all", "out": str(tmp_path / "all")}), lm=lm)
    assert every.results["overall"]["n"] == n_all and every.results["meta"]["split"] == "all"
    with pytest.raises(DataError, match="no mcq_bogus"):
        from facellm_cli.eval.sets import set_files

        set_files(ds, "bogus")
    with pytest.raises(DataError, match="--split val picks a file of a build-dataset folder"):
        set_files(ds / "mcq_test.jsonl", "val")


def test_evaluate_help_names_the_default_mode_and_split(cli: Any) -> None:
    r = cli("evaluate", "--help")
    assert r.code == 0
    text = " ".join(r.out.replace("│", " ").split())
    assert "generate (default" in text and "--split" in text and "stratified over tasks" in text


def test_unparseable_answers_suggest_likelihood(tmp_path: Path, tiny_internvl: Path, cli: Any) -> None:
    _build(tmp_path)
    out = tmp_path / "gen"
    r = cli("evaluate", "--data", tmp_path / "data/ds", "--model", tiny_internvl, "--max-new-tokens", "2", "--out", out)
    assert r.code == 0, r.err
    overall = json.loads((out / "results.json").read_text())["overall"]
    hinted = "--mode likelihood" in r.err
    assert hinted == (overall["unparseable"] > overall["n"] / 2)
    assert overall["unparseable"] > overall["n"] / 2  # a random tiny model names no letter in 2 tokens


# ---------------------------------------------------------------- 3: --compare DIR DIR


def test_compare_takes_several_folders_after_one_flag() -> None:
    from facellm_cli.cli import expand_compare

    assert expand_compare(["evaluate", "--compare", "a", "b", "--json"]) == [
        "evaluate",
        "--compare",
        "a",
        "--compare",
        "b",
        "--json",
    ]
    assert expand_compare(["evaluate", "--data", "x", "--compare", "a"]) == [
        "evaluate",
        "--data",
        "x",
        "--compare",
        "a",
    ]
    assert expand_compare(["ask", "--compare", "a", "b"]) == ["ask", "--compare", "a", "b"]  # other commands untouched


# ---------------------------------------------------------------- 5 and issue 12 item 7: FaceXBench subsets


@pytest.fixture
def small_fxb(tmp_path: Path) -> Path:
    from facellm_cli.testing.facexbench import make_facexbench

    return make_facexbench(tmp_path / "fxb", files=["lapa_single_mcq.json", "fairface_single_mcq_gender_test.json"])


def test_bogus_task_is_named_before_missing_images(small_fxb: Path, tmp_path: Path) -> None:
    from facellm_cli.eval.runner import evaluate

    shutil.rmtree(small_fxb / "benchmark" / "images")  # every image gone
    cfg = validate_config(
        EvalConfig,
        {"benchmark": "facexbench", "data_dir": str(small_fxb), "tasks": ["bogus_task"], "out": str(tmp_path / "o")},
    )
    with pytest.raises(ConfigError) as e:
        evaluate(cfg)
    msg = str(e.value)
    assert "bogus_task not in this set" in msg
    assert "lapa_single_mcq" in msg and "fairface_single_mcq_gender_test" in msg  # the valid names are listed


def test_limit_is_a_seeded_sample_stratified_over_tasks(small_fxb: Path) -> None:
    from facellm_cli.eval.facexbench import load_facexbench
    from facellm_cli.eval.runner import select_questions

    qs = load_facexbench(small_fxb)
    per_task = {t: sum(q.task == t for q in qs) for t in {q.task for q in qs}}
    picked = select_questions(qs, None, 20, seed=0)
    assert len(picked) == 20
    counts = {t: sum(q.task == t for q in picked) for t in per_task}
    for t, n in per_task.items():  # each task keeps its share (largest remainder: within one question)
        assert abs(counts[t] - 20 * n / len(qs)) < 1
    assert [q.id for q in select_questions(qs, None, 20, seed=0)] == [q.id for q in picked]
    assert [q.id for q in select_questions(qs, None, 20, seed=1)] != [q.id for q in picked]
    assert [q.id for q in picked] != [q.id for q in qs[:20]]  # not the first N in file order


def test_limit_needs_only_the_selected_images(small_fxb: Path, tmp_path: Path, lm: Any) -> None:
    from facellm_cli.eval.facexbench import load_facexbench
    from facellm_cli.eval.runner import evaluate, select_questions

    qs = load_facexbench(small_fxb)
    keep = {img for q in select_questions(qs, ["lapa_single_mcq"], 3, seed=0) for img in q.images}
    for q in qs:
        for img in q.images:
            if img not in keep:
                Path(img).unlink(missing_ok=True)
    cfg = validate_config(
        EvalConfig,
        {
            "benchmark": "facexbench",
            "data_dir": str(small_fxb),
            "tasks": ["lapa_single_mcq"],
            "limit": 3,
            "mode": "likelihood",
            "model": {"model": lm.config.model},
            "out": str(tmp_path / "o"),
        },
    )
    outcome = evaluate(cfg, lm=lm)
    assert outcome.results["overall"]["n"] == 3
    assert "random sample of 3 (seed 0, stratified over tasks)" in outcome.results["meta"]["selection"]
    with pytest.raises(DataError, match="image"):  # the whole set still needs every image
        evaluate(cfg.model_copy(update={"limit": None, "out": str(tmp_path / "all")}), lm=lm)


# ---------------------------------------------------------------- 10 and issue 12 item 12: error wording


def test_missing_image_error_has_no_doubled_path_and_counts_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from facellm_cli.data.build import build_dataset

    jsonl, records = make_corpus(tmp_path)
    for aspect in ("expression", "age", "pose", "glasses"):  # four records of one missing image
        records.append(annotation("faces/gone.png", aspect, "A face."))
    write_jsonl(jsonl, records)
    monkeypatch.chdir(tmp_path)  # paths written relative to here, as annotate does with `annotate faces`
    cfg = validate_config(DatasetConfig, {"inputs": [str(jsonl)], "image_root": "faces", "out": str(tmp_path / "o")})
    with pytest.raises(DataError) as e:
        build_dataset(cfg)
    msg = str(e.value)
    assert msg.splitlines()[0].startswith("4 invalid records (1 unusable image(s), each listed once)")
    assert f"image not found: {(tmp_path / 'faces').resolve()}/gone.png" in msg
    assert "faces/faces" not in msg


def test_image_outside_the_root_is_named_as_such(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from facellm_cli.data.build import build_dataset

    jsonl, records = make_corpus(tmp_path)
    write_png(tmp_path / "other" / "x.png", 99)
    records.append(annotation("other/x.png", "expression", "A face."))
    write_jsonl(jsonl, records)
    monkeypatch.chdir(tmp_path)
    cfg = validate_config(DatasetConfig, {"inputs": [str(jsonl)], "image_root": "faces", "out": str(tmp_path / "o")})
    with pytest.raises(DataError) as e:
        build_dataset(cfg)
    msg = str(e.value)
    assert "image other/x.png is outside the image root" in msg
    assert f"the file exists at {tmp_path / 'other' / 'x.png'}" in msg and "image not found" not in msg


def test_annotating_a_few_images_with_the_full_labels_file(
    tmp_path: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    rows = ["file,age,gender,race"]
    for i in range(6):
        write_png(tmp_path / "fairface" / "train" / f"{i}.png", i)
        rows.append(f"train/{i}.png,20-29,Male,White")
    rows.append("val/0.png,30-39,Female,Black")  # another split's row, not asked for
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    r = cli(
        "annotate", "fairface/train/0.png", "fairface/train/1.png", "--labels", "labels.csv",
        "--provider", "template", "--out", "a.jsonl",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert "problem" not in r.err and "label row without an image" not in r.err
    # Folders asked for still report their own missing label rows.
    (tmp_path / "fairface" / "train" / "5.png").unlink()
    r = cli("annotate", "fairface/train", "--labels", "labels.csv", "--provider", "template", "--out", "b.jsonl")
    assert "label row without an image: train/5.png" in r.err and "val/0.png" not in r.err


# ---------------------------------------------------------------- 11: charts


def test_results_carry_chance_and_the_chart_title_names_no_path(tmp_path: Path) -> None:
    from facellm_cli.eval.report import build_results, chart_title, write_chart

    recs = [
        {"category": "a", "options": ["x", "y"], "correct": True, "prediction": "A"},
        {"category": "a", "options": ["x", "y", "z", "w"], "correct": False, "prediction": "B"},
        {"category": "b", "options": ["x", "y", "z"], "correct": True, "prediction": "A"},
    ]
    meta = {"model": "/abs/path/to/my-model", "model_name": "my-model", "set": "/abs/data/ds", "set_name": "ds-test"}
    res = build_results(recs, meta)
    chance = {c["key"]: c["chance"] for c in res["categories"]}
    assert chance["a"] == pytest.approx(100 * (1 / 2 + 1 / 4) / 2) and chance["b"] == pytest.approx(100 / 3)
    assert res["overall"]["chance"] == pytest.approx(100 * (1 / 2 + 1 / 4 + 1 / 3) / 3)
    assert chart_title(res["meta"]) == "my-model on ds-test"
    assert write_chart(res, tmp_path / "c.png").read_bytes()[:8] == PNG


def test_loss_plot_names_the_run_and_adds_a_log_panel(tmp_path: Path) -> None:
    from PIL import Image

    from facellm_cli.train.plots import plot_losses

    flat = [{"step": i, "loss": 2.0 - i * 0.1} for i in range(1, 6)]
    steep = [{"step": i, "loss": 10.0 ** (1 - i)} for i in range(1, 6)]  # 1 .. 1e-4
    a = plot_losses(flat, tmp_path / "a.png", title="facellm finetune: run-a")
    b = plot_losses(steep, tmp_path / "b.png", title="facellm finetune: run-b")
    assert a and b
    assert Image.open(b).width > Image.open(a).width  # the second, log-scale panel


# ---------------------------------------------------------------- 8: progress and throughput


def test_throughput_drop_is_reported_once() -> None:
    from facellm_cli._progress import ThroughputWatch

    w = ThroughputWatch()
    t, done = 0.0, 0.0
    for _ in range(90):  # 90 s at 10 items/s: no warning
        t += 1
        done += 10
        assert w.update(done, t) is None
    warned = []
    for _ in range(30):  # then 1 item/s
        t += 1
        done += 1
        hit = w.update(done, t)
        if hit:
            warned.append(hit)
    assert len(warned) == 1
    earlier, recent = warned[0]
    assert earlier == pytest.approx(10) and recent < 0.35 * earlier


def test_steady_or_short_runs_do_not_warn() -> None:
    from facellm_cli._progress import ThroughputWatch

    w = ThroughputWatch()
    assert all(w.update(i * 3.0, float(i)) is None for i in range(1, 200))
    w = ThroughputWatch()
    assert all(w.update(i * 3.0 if i < 20 else 60 + i * 0.1, float(i)) is None for i in range(1, 30))  # < a minute


def _ticking_clock() -> type:
    """A ThroughputWatch whose clock advances one second per update, shared by every instance of the class returned."""
    from facellm_cli._progress import ThroughputWatch

    class Clock(ThroughputWatch):
        now = 0.0

        def update(self, done: float, now: float | None = None):
            Clock.now += 1
            return super().update(done, Clock.now)

    return Clock


def test_progress_bar_prints_the_warning_once_with_the_fix() -> None:
    from rich.console import Console

    from facellm_cli._progress import ProgressBar

    Clock = _ticking_clock()

    console = Console(record=True, width=200, force_terminal=False)
    done = 0
    with ProgressBar(console, "finetune", unit="steps", watch=Clock()) as bar:
        for i in range(120):
            done += 10 if i < 90 else 1
            bar(done, 2000)
    text = console.export_text()
    assert text.count("throughput fell") == 1 and "OMP_NUM_THREADS" in text and "--threads" in text


def test_progress_bar_is_the_clis_reporter() -> None:
    """Stages, counts and notes from library code; a callee inside a caller's stage keeps its label."""
    from rich.console import Console

    from facellm_cli._progress import ProgressBar
    from facellm_cli.reporting import Within

    console = Console(record=True, width=200, force_terminal=False)
    with ProgressBar(console, "quickstart", headers=True, log_prefix="   ") as bar:
        bar.stage("evaluate before training")
        inner = Within(bar, "evaluate before training")
        inner.stage("answering questions", 30)  # no new bar: the caller's stage gets the size
        inner.advance(10)
        inner.advance(20)
        inner.log("a [note] with brackets")
        task = bar.progress.tasks[-1]
        assert (task.description, task.completed, task.total) == ("evaluate before training", 30, 30)
        assert len(bar.progress.tasks) == 1  # the opening bar, which counted nothing, was dropped
    text = console.export_text()
    assert text.count(">> evaluate before training") == 1
    assert "   a [note] with brackets" in text  # notes are plain text, not rich markup


# ---------------------------------------------------------------- 8 and 10: finetune's output


@pytest.mark.slow
def test_finetune_shows_steps_and_prints_eval_loss_once(tmp_path: Path, tiny_internvl: Path, cli: Any) -> None:
    import re

    from facellm_cli.testing.records import describe_records, face_rows
    from facellm_cli.testing.records import write_jsonl as write_messages

    rows = face_rows(tmp_path / "faces", 8)
    train = write_messages(tmp_path / "faces" / "train.jsonl", describe_records(rows[:6]))
    write_messages(tmp_path / "faces" / "val.jsonl", describe_records(rows[6:]))
    r = cli(
        "finetune", "--data", train, "--model", tiny_internvl, "--out", tmp_path / "run",
        "--set", "data.eval=" + str(tmp_path / "faces" / "val.jsonl"), "--set", "model.device=cpu",
        "--set", "train.batch_size=2", "--set", "train.logging_steps=1", "--set", "train.max_steps=3",
    )  # fmt: skip
    assert r.code == 0, r.err
    # 6 samples / batch 2 = one epoch of 3 steps: the epoch-end evaluation is the final one, shown once
    assert r.err.count("eval_loss") == 1, r.err
    assert "None" not in r.err
    final = re.search(r"final train loss (\S+), eval loss (\S+);", r.err)
    assert final and all(len(v.replace(".", "").lstrip("0")) <= 4 for v in final.groups()), r.err
    assert (tmp_path / "run" / "loss.png").is_file()


def test_new_stages_and_remote_work_do_not_warn() -> None:
    from rich.console import Console

    from facellm_cli._progress import ProgressBar

    Clock = _ticking_clock()

    console = Console(record=True, width=200, force_terminal=False)
    with ProgressBar(console, "quickstart", watch=Clock()) as bar:
        bar.stage("synthesize faces")
        for i in range(1, 91):
            bar(i * 10, 900)  # 10/s
        bar.stage("annotate")
        for i in range(1, 91):
            bar(1000 + i, 1090)  # 1/s from a higher count: a slower stage, not a slowdown
    with ProgressBar(console, "annotate", watch=Clock(), cpu_bound=False) as bar:
        for i in range(120):
            bar(i * 10 if i < 90 else 900 + i, 2000)  # an endpoint's rate limit, not this machine
    assert "throughput fell" not in console.export_text()
