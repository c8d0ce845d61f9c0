"""build-dataset end to end: formats, validation errors, splits, determinism, MCQ export, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from facellm_cli.config import DatasetConfig, load_yaml, resolve_config
from facellm_cli.data.build import build_dataset
from facellm_cli.errors import ConfigError, DataError, OutputExistsError
from facellm_cli.schema import LETTERS, MCQuestion, format_mcq_prompt
from facellm_cli.testing.corpus import EXPRESSIONS, annotation, make_corpus, read_jsonl, write_jsonl, write_png
from facellm_cli.testing.paths import REPO_ROOT

SPLITS = ("train", "val", "test")


def build(tmp_path: Path, inputs: list[Path], out: str = "out", **kw):
    cfg = resolve_config(
        DatasetConfig,
        None,
        {"inputs": [str(p) for p in inputs], "image_root": str(tmp_path / "faces"), "out": str(tmp_path / out), **kw},
    )
    return build_dataset(cfg)


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[dict]]:
    return make_corpus(tmp_path, n_images=20)


def _images(out: Path, split: str) -> set[str]:
    return {img for rec in read_jsonl(out / f"{split}.jsonl") for img in rec["images"]}


def test_three_formats_written(tmp_path: Path, corpus) -> None:
    jsonl, records = corpus
    report = build(tmp_path, [jsonl])
    out = tmp_path / "out"
    assert report.qa_pairs == len(records) == 60 and report.images == 20
    assert sorted(report.files) == sorted(
        [f"{s}.json" for s in SPLITS]
        + [f"{s}.jsonl" for s in SPLITS]
        + ["dataset_info.json", "stats.json", "report.md", "config.yaml", "facellm_dataset.json"]
    )
    total = 0
    for split in SPLITS:
        share = json.loads((out / f"{split}.json").read_text())
        msgs = read_jsonl(out / f"{split}.jsonl")
        assert len(share) == len(msgs) == report.splits[split]["conversations"]
        total += len(share)
        for s, m in zip(share, msgs, strict=True):
            text = "".join(t["value"] for t in s["conversations"])
            assert text.count("<image>") == len(s["images"]) == 1
            assert [t["from"] for t in s["conversations"]] == ["human", "gpt"]
            assert s["conversations"][0]["value"].startswith("<image>\n")
            assert (tmp_path / "faces" / s["images"][0]).is_file()  # relative to the image root
            assert set(m) == {"id", "messages", "images"} and m["images"] == s["images"]
            assert [x["role"] for x in m["messages"]] == ["user", "assistant"]
            assert all(isinstance(x["content"], str) for x in m["messages"])
            assert m["messages"][0]["content"] == s["conversations"][0]["value"]
    assert total == 60
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["facellm_train"] == {
        "file_name": "train.json",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "images": "images"},
        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"},
    }
    stats = json.loads((out / "stats.json").read_text())
    assert stats["aspects"] == {"age": 20, "expression": 20, "pose": 20}
    assert stats["answer_words"]["p50"] == 7
    assert stats["media_dir"] == str((tmp_path / "faces").resolve()) == report.media_dir
    assert sum(stats["label_balance"]["gender"][s].get("Male", 0) for s in SPLITS) == 10
    report_md = (out / "report.md").read_text()
    assert "media_dir: " + report.media_dir in report_md and "## Label balance per split" in report_md
    cfg = DatasetConfig.model_validate(load_yaml(out / "config.yaml"))  # the resolved config reloads
    assert cfg.inputs == [str(jsonl)]


def test_messages_jsonl_loads_with_datasets(tmp_path: Path, corpus) -> None:
    datasets = pytest.importorskip("datasets")
    build(tmp_path, [corpus[0]], mcq=["expression"])
    out = tmp_path / "out"
    ds = datasets.load_dataset("json", data_files={s: str(out / f"{s}.jsonl") for s in SPLITS})
    assert ds["train"].num_rows == len(read_jsonl(out / "train.jsonl"))
    row = ds["train"][0]
    assert row["messages"][0]["role"] == "user" and row["messages"][0]["content"].startswith("<image>\n")
    assert isinstance(row["images"], list) and row["images"][0].endswith(".png")
    mcq = datasets.load_dataset("json", data_files=str(out / "mcq_test.jsonl"))["train"]
    assert mcq.num_rows == len(read_jsonl(out / "mcq_test.jsonl")) > 0


def test_missing_image_names_the_record(tmp_path: Path, corpus) -> None:
    jsonl, records = corpus
    records.append(annotation("gone.png", "expression", "A happy face."))
    write_jsonl(jsonl, records)
    with pytest.raises(DataError) as e:
        build(tmp_path, [jsonl])
    msg = str(e.value)
    assert msg.splitlines()[0].startswith("1 invalid records; fix them or pass --skip-invalid")
    assert f"{jsonl} line 61: image not found: {(tmp_path / 'faces').resolve()}/gone.png" in msg
    assert not (tmp_path / "out").exists()  # nothing half-written
    report = build(tmp_path, [jsonl], skip_invalid=True)
    assert report.filtered == {"missing_image": 1} and report.qa_pairs == 60
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["filtered"] == {"records": {"missing_image": 1}, "images": {"missing_image": 1}}


def test_corrupt_image_names_the_record(tmp_path: Path, corpus) -> None:
    jsonl, records = corpus
    bad = tmp_path / "faces" / "broken.png"
    from PIL import Image

    Image.frombytes("RGB", (32, 32), random.Random(0).randbytes(32 * 32 * 3)).save(bad, format="PNG")
    png = bad.read_bytes()
    bad.write_bytes(png[: len(png) // 2])  # truncated PNG: header fine, pixel data cut
    records += [annotation("broken.png", a, "An answer.", root=tmp_path / "faces") for a in ("expression", "age")]
    write_jsonl(jsonl, records)
    with pytest.raises(DataError) as e:
        build(tmp_path, [jsonl])
    lines = str(e.value).splitlines()
    assert len(lines) == 2  # the image is reported once, with its first record
    assert lines[1].startswith(f"{jsonl} line 61: cannot decode image")
    assert lines[1].endswith("broken.png")
    report = build(tmp_path, [jsonl], skip_invalid=True)
    assert report.filtered == {"corrupt_image": 2}
    assert "broken.png" not in set().union(*(_images(tmp_path / "out", s) for s in SPLITS))


def test_refusal_and_empty_answers(tmp_path: Path, corpus) -> None:
    jsonl, records = corpus
    records[3]["answer"] = "I\u2019m sorry, but I can't help with identifying people."
    records[5]["answer"] = "   "
    write_jsonl(jsonl, records)
    with pytest.raises(DataError) as e:
        build(tmp_path, [jsonl])
    lines = str(e.value).splitlines()
    assert lines[0].startswith("2 invalid records")
    assert lines[1] == (
        f"{jsonl} line 4: answer is a refusal (image img_001.png): "
        '"I\u2019m sorry, but I can\'t help with identifying people."'
    )
    assert lines[2].startswith(f"{jsonl} line 6: answer is empty (image img_001.png)")
    report = build(tmp_path, [jsonl], skip_invalid=True)
    assert report.filtered == {"empty_answer": 1, "refusal": 1} and report.qa_pairs == 58


def test_duplicate_names_both_records(tmp_path: Path, corpus) -> None:
    jsonl, records = corpus
    dup = dict(records[0], answer="Another answer to the same question.")
    dup["question"] = "  what is the FACIAL expression of this person? "  # case/space variants are duplicates too
    records.append(dup)
    write_jsonl(jsonl, records)
    with pytest.raises(DataError) as e:
        build(tmp_path, [jsonl])
    assert str(e.value).splitlines()[1] == (
        f"{jsonl} line 61: same (image, question) as an earlier record ({jsonl} line 1) for image img_000.png: "
        "'what is the FACIAL expression of this person?'"
    )
    report = build(tmp_path, [jsonl], skip_invalid=True)
    assert report.filtered == {"duplicate": 1}
    train = (
        read_jsonl(tmp_path / "out" / "train.jsonl")
        + read_jsonl(tmp_path / "out" / "val.jsonl")
        + read_jsonl(tmp_path / "out" / "test.jsonl")
    )
    kept = [r for r in train if r["id"] == "img_000.png#expression"]
    assert len(kept) == 1 and kept[0]["messages"][1]["content"] == records[0]["answer"]  # the first one wins


def test_failed_status_is_skipped_not_an_error(tmp_path: Path, corpus) -> None:
    jsonl, records = corpus
    records.append(annotation("img_001.png", "extra", "", status="failed", error="HTTP 500"))
    write_jsonl(jsonl, records)
    with open(jsonl, "a") as f:
        f.write('{"image": "img_002.png", "aspe')  # torn tail of an interrupted annotate run
    report = build(tmp_path, [jsonl])
    assert report.filtered == {"annotate_failed": 1, "torn_line": 1} and report.qa_pairs == 60


def test_other_image_checks(tmp_path: Path, corpus) -> None:
    jsonl, records = corpus
    write_png(tmp_path / "faces" / "img_004.png", 999)  # changed after annotation: sha256 no longer matches
    with pytest.raises(DataError, match=r"line 13: image bytes differ from image_sha256"):
        build(tmp_path, [jsonl])
    with pytest.raises(DataError, match=r"line 1: image too large \(8x8 = 64 pixels > limit 10"):
        build(tmp_path, [jsonl], max_pixels=10, check_sha256=False)
    records.append(annotation("../outside.png", "age", "Some answer."))
    write_jsonl(jsonl, records)
    with pytest.raises(DataError, match=r"line 61: image \.\./outside\.png is outside the image root"):
        build(tmp_path, [jsonl], check_sha256=False)


def test_splits_are_disjoint_and_grouped(tmp_path: Path, corpus) -> None:
    jsonl, _ = corpus
    build(tmp_path, [jsonl], split=[0.6, 0.2, 0.2])
    out = tmp_path / "out"
    sets = {s: _images(out, s) for s in SPLITS}
    assert sets["train"].isdisjoint(sets["val"]) and sets["train"].isdisjoint(sets["test"])
    assert sets["val"].isdisjoint(sets["test"])
    assert [len(sets[s]) for s in SPLITS] == [12, 4, 4]
    build(tmp_path, [jsonl], out="grouped", group_key="person", split=[0.6, 0.2, 0.2])
    persons = {s: {f"p{int(img[4:7]) // 2}" for img in _images(tmp_path / "grouped", s)} for s in SPLITS}
    assert persons["train"].isdisjoint(persons["val"] | persons["test"]) and persons["val"].isdisjoint(persons["test"])
    assert [len(persons[s]) for s in SPLITS] == [6, 2, 2]
    stats = json.loads((tmp_path / "grouped" / "stats.json").read_text())
    assert stats["splits"]["train"]["groups"] == 6
    assert stats["label_balance"]["person"]["distinct_values"] == 10  # the group key gets no balance table


def test_stratified_split_keeps_every_class_in_train(tmp_path: Path) -> None:
    jsonl, _ = make_corpus(tmp_path, n_images=50, aspects=("expression",))
    build(tmp_path, [jsonl], stratify="expression")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    balance = stats["label_balance"]["expression"]
    for value in EXPRESSIONS:  # 10 images each -> 8 / 1 / 1 per class
        assert [balance[s][value] for s in SPLITS] == [8, 1, 1]


def test_same_inputs_give_identical_bytes(tmp_path: Path, corpus) -> None:
    jsonl, records = corpus
    build(tmp_path, [jsonl], out="a", mcq=["expression", "gender"], overwrite=True)  # the same command twice
    first = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    assert "mcq_test.jsonl" in first and len(first) == 14
    build(tmp_path, [jsonl], out="a", mcq=["expression", "gender"], overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == first
    shuffled = tmp_path / "shuffled.jsonl"
    write_jsonl(shuffled, random.Random(1).sample(records, len(records)))  # annotate's concurrency reorders lines
    build(tmp_path, [shuffled], out="c", mcq=["expression", "gender"])
    for name, data in first.items():
        if name != "config.yaml":  # the config names its own input and output paths
            assert data == (tmp_path / "c" / name).read_bytes(), name
    build(tmp_path, [jsonl], out="d", mcq=["expression", "gender"], seed=7)
    assert (tmp_path / "a" / "train.json").read_bytes() != (tmp_path / "d" / "train.json").read_bytes()


def test_mcq_export_is_well_formed(tmp_path: Path, corpus) -> None:
    jsonl, _ = corpus
    report = build(tmp_path, [jsonl], mcq=["expression", "gender"])
    out = tmp_path / "out"
    n = 0
    for split in SPLITS:
        for raw in read_jsonl(out / f"mcq_{split}.jsonl"):
            q = MCQuestion.model_validate(raw)
            n += 1
            label = q.task.removeprefix("facellm_")
            truth = q.labels[label]
            assert len(set(q.options)) == len(q.options) == (4 if label == "expression" else 2)
            assert q.options[LETTERS.index(q.answer)] == truth
            assert q.images[0] in _images(out, split) and (tmp_path / "faces" / q.images[0]).is_file()
    assert n == 40 and sum(v["mcq"] for v in report.splits.values()) == 40
    train_mcq = read_jsonl(out / "mcq_train.jsonl")
    convs = {r["id"]: r for r in read_jsonl(out / "train.jsonl")}
    for raw in train_mcq:  # taught in exactly the evaluated format
        conv = convs[raw["id"]]
        q = MCQuestion.model_validate(raw)
        assert conv["messages"][0]["content"] == "<image>\n" + format_mcq_prompt(q)
        assert conv["messages"][1]["content"] == q.answer
    answers = [q["answer"] for q in train_mcq if q["task"] == "facellm_expression"]
    assert len(set(answers)) > 1  # shuffled, not always A
    build(tmp_path, [jsonl], out="no-train", mcq=["expression"], mcq_train=False)
    assert not any("#mcq-" in r["id"] for r in read_jsonl(tmp_path / "no-train" / "train.jsonl"))


def test_fixed_option_order_and_mcq_only_training(tmp_path: Path, corpus) -> None:
    jsonl, _ = corpus
    build(tmp_path, [jsonl], mcq=["expression"], mcq_option_order="fixed", mcq_max_options=5, qa=False)
    out = tmp_path / "out"
    questions = [MCQuestion.model_validate(r) for s in SPLITS for r in read_jsonl(out / f"mcq_{s}.jsonl")]
    assert {tuple(q.options) for q in questions} == {tuple(sorted(EXPRESSIONS))}  # one order: a letter = one value
    assert all(q.options[LETTERS.index(q.answer)] == q.labels["expression"] for q in questions)
    train = read_jsonl(out / "train.jsonl")
    assert train and all("#mcq-" in r["id"] for r in train)  # no free-text QA written
    assert read_jsonl(out / "val.jsonl") == [] and read_jsonl(out / "test.jsonl") == []
    with pytest.raises(ConfigError, match="qa: false leaves nothing to train on"):
        build(tmp_path, [jsonl], out="none", qa=False)


def test_mcq_needs_a_label_with_two_values(tmp_path: Path) -> None:
    jsonl, _ = make_corpus(tmp_path, n_images=4, with_labels=False)
    with pytest.raises(ConfigError, match=r"--mcq expression: no kept image has a 'expression' label"):
        build(tmp_path, [jsonl], mcq=["expression"])


def test_merge_aspects(tmp_path: Path, corpus) -> None:
    jsonl, _ = corpus
    report = build(tmp_path, [jsonl], merge_aspects=True)
    convs = [c for s in SPLITS for c in json.loads((tmp_path / "out" / f"{s}.json").read_text())]
    assert len(convs) == 20 and report.qa_pairs == 60
    for c in convs:
        turns = c["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 3
        assert sum(t["value"].count("<image>") for t in turns) == 1 and turns[0]["value"].startswith("<image>\n")
        assert turns[1]["value"].startswith("The age of")  # aspects in name order: age, expression, pose


def test_paper_layout_with_labels_csv(tmp_path: Path) -> None:
    paper = tmp_path / "FairFaceGPT"
    rows = ["file,age,gender,race"]
    for i in range(10):
        write_png(tmp_path / "faces" / "train" / f"{i}.jpg".replace(".jpg", ".png"), i)
        d = paper / "train" / str(i)
        d.mkdir(parents=True)
        for t in (1, 2):
            (d / f"question_{t}.txt").write_text(f"Question {t} about the face?\n")
            (d / f"answer_{t}.txt").write_text(f"Answer {t} for face {i}.\n")
        rows.append(f"train/{i}.png,{20 + i}-{29 + i},{'Male' if i % 2 else 'Female'},White")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    report = build(tmp_path, [paper], labels=str(tmp_path / "labels.csv"), mcq=["gender"])
    assert report.qa_pairs == 20 and report.images == 10
    recs = [r for s in SPLITS for r in read_jsonl(tmp_path / "out" / f"{s}.jsonl")]
    qa = sorted(r["id"] for r in recs if "#mcq" not in r["id"])
    assert qa[:2] == ["train/0.png#q1", "train/0.png#q2"]
    first = next(r for r in recs if r["id"] == "train/0.png#q1")
    assert first["messages"] == [
        {"role": "user", "content": "<image>\nQuestion 1 about the face?"},
        {"role": "assistant", "content": "Answer 1 for face 0."},
    ]
    mcqs = [q for s in SPLITS for q in read_jsonl(tmp_path / "out" / f"mcq_{s}.jsonl")]
    assert {q["labels"]["race"] for q in mcqs} == {"White"} and len(mcqs) == 10
    # a paper folder whose image is missing is reported with the suffixes tried
    (paper / "train" / "99").mkdir()
    (paper / "train" / "99" / "question_1.txt").write_text("Q?")
    (paper / "train" / "99" / "answer_1.txt").write_text("A.")
    with pytest.raises(DataError, match=r"answer_1\.txt: image not found: .*train/99\.jpg; no train/99\.\{jpg/"):
        build(tmp_path, [paper], out="again")


def test_out_folder_rules(tmp_path: Path, corpus) -> None:
    jsonl, _ = corpus
    build(tmp_path, [jsonl], mcq=["expression"])
    with pytest.raises(OutputExistsError, match="output folder is not empty: .*pass --overwrite"):
        build(tmp_path, [jsonl])
    (tmp_path / "out" / "notes.txt").write_text("mine")
    build(tmp_path, [jsonl], overwrite=True)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "mcq_test.jsonl" not in names  # stale outputs of the earlier run are removed
    assert "notes.txt" in names  # files that are not ours are left alone
    assert not list(tmp_path.glob(".out.building-*"))


def test_config_validation() -> None:
    with pytest.raises(ConfigError) as e:
        resolve_config(DatasetConfig, None, {"inputs": ["a.jsonl"], "split": "0.8,0.3,0.1"})
    msg = str(e.value)
    assert "image_root: required" in msg and "out: required" in msg and "sums to 1.2, not 1" in msg
    cfg = resolve_config(DatasetConfig, None, {"inputs": ["a"], "image_root": "r", "out": "o", "mcq": "age,gender"})
    assert cfg.mcq == ["age", "gender"] and cfg.mcq_train is True and cfg.stratify == "age"


# ---- CLI ----


def test_cli_build_dataset(tmp_path: Path, corpus, cli) -> None:
    jsonl, records = corpus
    res = cli(
        "build-dataset",
        jsonl,
        "--image-root",
        tmp_path / "faces",
        "--out",
        tmp_path / "out",
        "--mcq",
        "expression",
        "--split",
        "0.8,0.1,0.1",
        "--seed",
        "3",
        "--json",
    )
    assert res.code == 0, res.err
    summary = json.loads(res.out)
    assert summary["qa_pairs"] == 60 and summary["splits"]["train"]["mcq"] == 16
    assert "LLaMA-Factory: dataset_dir=" in res.err and "media_dir=" in res.err
    assert load_yaml(tmp_path / "out" / "config.yaml")["seed"] == 3
    records[2]["answer"] = "As an AI, I cannot analyze faces."
    write_jsonl(jsonl, records)
    res = cli("build-dataset", jsonl, "--image-root", tmp_path / "faces", "--out", tmp_path / "out2")
    assert res.code == 1
    assert "error: 1 invalid records" in res.err and f"error: {jsonl} line 3: answer is a refusal" in res.err
    res = cli("build-dataset", jsonl, "--image-root", tmp_path / "faces", "--out", tmp_path / "out2", "--skip-invalid")
    assert res.code == 0 and "filtered: refusal 1" in res.err


def test_cli_help(cli) -> None:
    res = cli("build-dataset", "--help")
    assert res.code == 0 and "--merge-aspects" in res.out and "--skip-invalid" in res.out


def test_example_config_loads() -> None:
    example = REPO_ROOT / "examples" / "build-dataset-fairfacegpt.yaml"
    cfg = resolve_config(DatasetConfig, example)
    assert cfg.mcq == ["age", "gender", "race"] and cfg.stratify == "race" and cfg.skip_invalid


def test_image_paths_absolute_or_relative_to_cwd(tmp_path: Path, corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    jsonl, records = corpus
    faces = tmp_path / "faces"
    records[0]["image"] = str(faces / "img_000.png")  # absolute, under the root
    for r in records[1:3]:
        r["image"] = "faces/" + r["image"]  # annotate was run from tmp_path with paths like faces/x.png
    write_jsonl(jsonl, records)
    monkeypatch.chdir(tmp_path)
    report = build(tmp_path, [jsonl])
    assert report.qa_pairs == 60 and report.images == 20
    images = set().union(*(_images(tmp_path / "out", s) for s in SPLITS))
    assert images == {f"img_{i:03d}.png" for i in range(20)}


def test_build_reports_its_two_passes_and_prints_nothing(
    tmp_path: Path, corpus, capsys: pytest.CaptureFixture[str]
) -> None:
    from facellm_cli.testing.reporter import RecordingReporter

    jsonl, records = corpus
    build(tmp_path, [jsonl], out="quiet")
    assert capsys.readouterr() == ("", "")
    rec = RecordingReporter()
    cfg = resolve_config(
        DatasetConfig, None, {"inputs": [str(jsonl)], "image_root": str(tmp_path / "faces"), "out": str(tmp_path / "o")}
    )
    build_dataset(cfg, reporter=rec)
    assert rec.stages() == ["reading records", "writing images"]
    write = rec.calls.index(("stage", "writing images", 20))
    assert sum(c[1] for c in rec.calls[:write] if c[0] == "advance") == len(records)
    assert sum(c[1] for c in rec.calls[write:] if c[0] == "advance") == 20
    assert capsys.readouterr() == ("", "")
