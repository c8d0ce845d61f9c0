"""build-dataset's three steps, each on its own: scan -> plan splits -> write splits; and the record schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from facellm_cli.config import DatasetConfig, resolve_config
from facellm_cli.data.build import plan_splits, scan_records, write_splits
from facellm_cli.data.mcq import image_questions, label_values
from facellm_cli.data.readers import open_sources
from facellm_cli.errors import ConfigError, DataError
from facellm_cli.schema import IMAGE_PLACEHOLDER, TrainingRecord
from facellm_cli.testing.corpus import annotation, make_corpus, read_jsonl, write_jsonl, write_png
from facellm_cli.train.data import read_samples


def _cfg(tmp_path: Path, inputs: list[Path], **kw: object) -> DatasetConfig:
    flags = {"inputs": [str(p) for p in inputs], "image_root": str(tmp_path / "faces"), "out": str(tmp_path / "out")}
    return resolve_config(DatasetConfig, None, {**flags, **kw})


def _scan(cfg: DatasetConfig):
    root = Path(cfg.image_root or "").resolve()
    sources = open_sources(cfg.inputs, root)
    return scan_records(cfg, root, sources), sources


def test_scan_indexes_records_and_marks_duplicates(tmp_path: Path) -> None:
    jsonl, records = make_corpus(tmp_path, n_images=4, aspects=("expression", "age"))
    dup = dict(records[0], question="  WHAT is the facial expression of this person? ")  # same key, folded
    write_jsonl(jsonl, [*records, dup])
    scan, sources = _scan(_cfg(tmp_path, [jsonl], skip_invalid=True))
    try:
        assert scan.records_read == 9
        assert sorted(scan.image_names) == [f"img_{i:03d}.png" for i in range(4)]
        assert scan.keep.tolist() == [True] * 8 + [False]  # the later copy is the one dropped
        assert scan.filtered == {"duplicate": 1}
        assert scan.images["img_001.png"].labels["gender"] == "Female"
    finally:
        for s in sources:
            s.close()


def test_scan_lists_invalid_records_and_counts_a_bad_image_once(tmp_path: Path) -> None:
    jsonl, records = make_corpus(tmp_path, n_images=3, aspects=("expression", "age"))
    (tmp_path / "faces" / "img_002.png").write_bytes(b"not a png")
    write_jsonl(jsonl, [*records, annotation("img_000.png", "pose", "", root=tmp_path / "faces")])
    cfg = _cfg(tmp_path, [jsonl], check_sha256=False)
    with pytest.raises(DataError) as e:
        _scan(cfg)
    lines = str(e.value).splitlines()
    assert lines[0].startswith("3 invalid records (1 unusable image(s), each listed once)")
    assert len(lines) == 3  # the empty answer, the image (once, for its two records)
    assert any("answer is empty" in ln for ln in lines) and any("img_002.png" in ln for ln in lines)


def test_plan_keeps_groups_together_and_checks_label_columns(tmp_path: Path) -> None:
    jsonl, _ = make_corpus(tmp_path, n_images=30, aspects=("expression",))
    cfg = _cfg(tmp_path, [jsonl], group_key="person", mcq="expression")
    scan, sources = _scan(cfg)
    for s in sources:
        s.close()
    plan = plan_splits(cfg, scan)
    assert len(plan.kept_images) == 30 and len(set(plan.unit_of.values())) == 15  # person = two images each
    for i in range(0, 30, 2):
        a, b = f"img_{i:03d}.png", f"img_{i + 1:03d}.png"
        assert plan.split_of(a) == plan.split_of(b)
    assert sum(plan.units_per_split().values()) == 15
    assert plan.mcq_values == {"expression": ["angry", "happy", "neutral", "sad", "surprised"]}
    assert [plan.records.img[j] for j in plan.order] == sorted(plan.records.img)  # sorted by image name
    assert plan_splits(cfg, scan).split_of_unit == plan.split_of_unit  # deterministic
    with pytest.raises(ConfigError, match="--group-key identity: no kept image has a 'identity' label"):
        plan_splits(cfg.model_copy(update={"group_key": "identity"}), scan)


def test_write_splits_writes_the_plan_and_nothing_when_it_fails(tmp_path: Path) -> None:
    jsonl, records = make_corpus(tmp_path, n_images=10, aspects=("expression", "age"))
    cfg = _cfg(tmp_path, [jsonl], mcq="gender", split="0.6,0.2,0.2")
    scan, sources = _scan(cfg)
    try:
        plan = plan_splits(cfg, scan)
        out = tmp_path / "out"
        stats, files = write_splits(cfg, scan, plan, sources, out)
        for split in ("train", "val", "test"):
            rows = read_jsonl(out / f"{split}.jsonl")
            assert {r["images"][0] for r in rows} == {rel for rel in plan.kept_images if plan.split_of(rel) == split}
            assert stats["splits"][split]["qa_pairs"] == 2 * sum(plan.split_of(r) == split for r in plan.kept_images)
        assert "mcq_test.jsonl" in files and (out / "report.md").is_file()
        # The input changes between plan and write: nothing half-written appears.
        write_jsonl(jsonl, [dict(r, question=r["question"] + " changed") for r in records])
        with pytest.raises(DataError, match="changed while build-dataset was reading it"):
            write_splits(cfg, scan, plan, sources, tmp_path / "out2")
        assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2.building-*"))
    finally:
        for s in sources:
            s.close()


def test_mcq_emission_one_question_per_labelled_column() -> None:
    values = label_values(["gender", "age"], [{"gender": "Male", "age": "20-29"}, {"gender": "Female", "age": "3-9"}])
    assert values == {"gender": ["Female", "Male"], "age": ["20-29", "3-9"]}
    qs, missing = image_questions("a.png", {"gender": "Male"}, values, seed=0, max_options=4, option_order="fixed")
    assert missing == ["age"] and [q.id for q in qs] == ["a.png#mcq-gender"]
    assert qs[0].options == ["Female", "Male"] and qs[0].answer == "B" and qs[0].images == ["a.png"]
    with pytest.raises(ConfigError, match=r"--mcq age: the label has 1 distinct value\(s\) \['3-9'\]"):
        label_values(["age"], [{"age": "3-9"}, {"age": ""}])


def test_training_record_is_what_the_writer_writes_and_the_reader_reads(tmp_path: Path) -> None:
    rec = TrainingRecord.from_pairs("x#1", [("Q1?", "A1."), ("Q2?", "A2.")], "faces/a.png")
    assert rec.messages[0].content == f"{IMAGE_PLACEHOLDER}\nQ1?" and rec.placeholder_count == 1
    share = rec.to_sharegpt()
    assert [t["from"] for t in share["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert TrainingRecord.from_sharegpt(share, "x#1") == rec
    write_png(tmp_path / "faces" / "a.png", 1)
    (tmp_path / "d.jsonl").write_text(json.dumps(rec.model_dump(mode="json")) + "\n")
    (sample,) = read_samples(tmp_path / "d.jsonl", image_root=tmp_path)
    assert sample.id == "x#1" and sample.images == [tmp_path / "faces" / "a.png"]
    assert sample.messages == [m.model_dump() for m in rec.messages]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "b", "messages": [{"role": "bot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"record 'b' \(bad.jsonl line 1\): messages.0.role: Input should be"):
        read_samples(tmp_path / "bad.jsonl", image_root=tmp_path)
