"""facellm data overlap, build-dataset --exclude-overlap-with and evaluate --train-data, on generated faces."""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import pytest

from facellm_cli.config import DatasetConfig, EvalConfig, resolve_config
from facellm_cli.data.build import build_dataset
from facellm_cli.data.overlap import (
    DEFAULT_MAX_COLOUR_DISTANCE,
    DEFAULT_MAX_DISTANCE,
    match,
    signature,
    signatures_from,
)
from facellm_cli.eval.runner import evaluate
from facellm_cli.images import open_image
from facellm_cli.synth import draw_face, random_attributes
from facellm_cli.testing.corpus import annotation, write_jsonl
from facellm_cli.testing.facexbench import FULL_BENCHMARK_MISSING, SHARED_BENCHMARK, make_facexbench
from facellm_cli.testing.fake_openai import FakeOpenAI

pytest.importorskip("imagehash")

SIZE = 256  # FairFace crops are 224-448 px; "a few pixels" of crop is judged at that scale


def faces(seed: int, n: int, size: int = SIZE) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = random.Random(rng.getrandbits(64))
        out.append(draw_face(random_attributes(r), size, r))
    return out


def jpeg(img, quality: int = 70):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return open_image(buf.getvalue())


def transformed(img, kind: str, rng: random.Random):
    w, h = img.size
    if kind == "jpeg70":
        return jpeg(img)
    if kind == "half":
        return img.resize((w // 2, h // 2))
    if kind == "double":
        return img.resize((w * 2, h * 2))
    if kind == "crop":
        return img.crop((rng.randint(1, 3), rng.randint(1, 3), w - rng.randint(1, 3), h - rng.randint(1, 3)))
    if kind == "gray":
        return img.convert("L").convert("RGB")
    assert kind == "all"
    s = rng.uniform(0.5, 2.0)
    return jpeg(img.crop((2, 3, w - 3, h - 1)).resize((round(w * s), round(h * s))).convert("L"))


KINDS = ("jpeg70", "half", "double", "crop", "gray", "all")


def save(img, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def faces_with_attrs(seed: int, n: int, size: int = SIZE) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = random.Random(rng.getrandbits(64))
        attrs = random_attributes(r)
        out.append((attrs, draw_face(attrs, size, r)))
    return out


@pytest.fixture(scope="module")
def generated() -> dict:
    train = faces_with_attrs(1, 24)
    others = faces_with_attrs(99, 36)
    return {
        "train": train,
        "others": others,
        "base": signatures_from([signature(f) for _, f in train], [str(i) for i in range(len(train))]),
        "osig": signatures_from([signature(f) for _, f in others], [f"o{i}" for i in range(len(others))]),
    }


def test_transformed_copies_are_found(generated: dict) -> None:
    """JPEG q70, 0.5x and 2x, a crop of 1-3 px per side, grayscale, and all at once: every copy matches its source."""
    train, base = generated["train"], generated["base"]
    rng = random.Random(2)
    names = [str(i) for i in range(len(train))]
    for kind in KINDS:
        sig = signatures_from([signature(transformed(f, kind, rng)) for _, f in train], names)
        found = {(a, b) for a, b, _, _ in match(base, sig, DEFAULT_MAX_DISTANCE, DEFAULT_MAX_COLOUR_DISTANCE)}
        missed = [i for i in range(len(train)) if (i, i) not in found]
        assert not missed, f"{kind}: copies of faces {missed} not found"
    # The threshold is what finds the crops: at 0 bits most are missed.
    crops = signatures_from([signature(transformed(f, "crop", rng)) for _, f in train], names)
    exact = {(a, b) for a, b, _, _ in match(base, crops, 0, DEFAULT_MAX_COLOUR_DISTANCE)}
    assert sum((i, i) in exact for i in range(len(train))) < len(train) // 2


def test_unrelated_faces_are_not_found(generated: dict) -> None:
    """Faces of other people in another background colour or pose never match; over all pairs of different
    generated faces (same colours and pose included) the false-positive rate stays under 0.5%."""
    train, others = generated["train"], generated["others"]
    pairs = match(generated["base"], generated["osig"], DEFAULT_MAX_DISTANCE, DEFAULT_MAX_COLOUR_DISTANCE)
    differ = [
        (a, b)
        for a, b, _, _ in pairs
        if train[a][0].background != others[b][0].background or train[a][0].pose != others[b][0].pose
    ]
    assert differ == []
    total = len(train) * len(others)
    print(f"\nfalse positives: {len(pairs)} of {total} pairs of different generated faces")
    assert len(pairs) / total < 0.005


def test_colour_separates_same_structure() -> None:
    """The same drawing in other colours is another image; a grayscale copy still matches its colour original."""
    from facellm_cli.synth import FaceAttributes

    a = FaceAttributes("smiling", "open", "upright", "no", "light", "blue")
    b = FaceAttributes("smiling", "open", "upright", "no", "medium", "green")
    fa, fb = draw_face(a, SIZE, random.Random(3)), draw_face(b, SIZE, random.Random(3))
    sa = signatures_from([signature(fa), signature(fb)], ["a", "b"])
    sb = signatures_from([signature(fb), signature(fb.convert("L").convert("RGB"))], ["b", "b-gray"])
    got = {
        (sa.paths[i], sb.paths[j]) for i, j, _, _ in match(sa, sb, DEFAULT_MAX_DISTANCE, DEFAULT_MAX_COLOUR_DISTANCE)
    }
    assert got == {("b", "b"), ("b", "b-gray")}


def _train(tmp_path: Path, n: int = 30) -> tuple[Path, list[Path]]:
    train_dir = tmp_path / "train"
    return train_dir, [save(f, train_dir / f"face_{i:03d}.png") for i, f in enumerate(faces(11, n))]


def test_cli_overlap_table_json_sheet_and_cache(tmp_path: Path, cli) -> None:
    train_dir, train = _train(tmp_path)
    bench = tmp_path / "bench"
    rng = random.Random(4)
    picks = {3: "jpeg70", 7: "crop", 12: "gray", 20: "half"}
    for i, kind in picks.items():
        save(transformed(open_image(train[i]), kind, rng), bench / f"renamed_{kind}.jpg")
    for j, f in enumerate(faces(77, 10)):
        save(f, bench / f"other_{j}.png")
    sheet = tmp_path / "sheet.png"
    r = cli("data", "overlap", train_dir, "--against", bench, "--json", "--sheet", sheet)
    assert r.code == 0, r.err
    res = json.loads(r.out)
    got = {(Path(p["train"]).name, Path(p["bench"]).name) for p in res["pairs"]}
    assert got == {(train[i].name, f"renamed_{k}.jpg") for i, k in picks.items()}
    assert res["matched_train_images"] == 4 and res["bench_images"] == 14 and res["train_images"] == 30
    assert res["images_hashed_this_run"] == 44
    distances = [p["distance"] for p in res["pairs"]]
    assert distances == sorted(distances)
    img = open_image(sheet)
    assert img.height > 4 * 112 and img.width > 2 * 112  # four rows of pairs side by side
    # Second run: every hash from the cache; a touched file is hashed again.
    os.utime(train[0], ns=(1, 1))
    r2 = cli("data", "overlap", train_dir, "--against", bench, "--json", "--sheet", tmp_path / "s2.png")
    assert json.loads(r2.out)["images_hashed_this_run"] == 1
    table = cli("data", "overlap", train_dir, "--against", bench, "--sheet", tmp_path / "s3.png")
    assert table.code == 0 and "4 matched pair(s): 4 of 30 training images match 4 of 14 benchmark images" in table.out


def test_cli_overlap_facexbench_questions(tmp_path: Path, cli) -> None:
    fxb = make_facexbench(tmp_path / "fxb", ["lapa_single_mcq.json", "fairface_single_mcq_age_test.json"])
    meta = json.loads((fxb / "benchmark" / "lapa_single_mcq.json").read_text())
    first = meta["questions"]["1"]["image_paths"][0]
    face = faces(21, 1)[0]
    jpeg(face).save(fxb / "benchmark" / first, format="PNG")  # the benchmark's copy: re-encoded, renamed
    save(face, tmp_path / "train" / "mine.png")
    save(faces(22, 1)[0], tmp_path / "train" / "other.png")
    r = cli(
        "data", "overlap", tmp_path / "train", "--benchmark", "facexbench", "--data-dir", fxb, "--json",
        "--sheet", tmp_path / "s.png",
    )  # fmt: skip
    assert r.code == 0, r.err
    res = json.loads(r.out)
    users = sorted(n for n, q in meta["questions"].items() if first in q["image_paths"])
    assert [Path(p["train"]).name for p in res["pairs"]] == ["mine.png"]
    assert res["pairs"][0]["questions"] == [f"lapa_single_mcq/{n}" for n in users]
    assert res["by_task"] == {
        "lapa_single_mcq": {"questions": len(meta["questions"]), "questions_seen": len(users), "images_seen": 1}
    }
    assert res["by_category"][meta["category"]]["questions_seen"] == len(users)
    assert res["bench_questions"] > len(meta["questions"])
    table = cli("data", "overlap", tmp_path / "train", "--benchmark", "facexbench", "--data-dir", fxb, "--sheet",
                tmp_path / "s.png").out  # fmt: skip
    assert f"| Face Localization | {len(users)} | {len(meta['questions'])} | 1 |" in table
    assert f"| lapa_single_mcq | {len(users)} | {len(meta['questions'])} | 1 |" in table


def test_cli_overlap_errors(tmp_path: Path, cli) -> None:
    save(faces(1, 1)[0], tmp_path / "t" / "a.png")
    r = cli("data", "overlap", tmp_path / "t", "--benchmark", "facexbench")
    assert r.code == 1 and "data_dir: --benchmark facexbench needs --data-dir" in r.err
    r = cli("data", "overlap", tmp_path / "t")
    assert r.code == 1 and "against: nothing to compare with" in r.err
    bad = write_jsonl(
        tmp_path / "set.jsonl", [{"images": ["gone.png"], "question": "q", "options": ["a", "b"], "answer": "A"}]
    )
    r = cli("data", "overlap", tmp_path / "t", "--against", bad)
    assert r.code == 1 and "1 image(s) not found" in r.err and "gone.png" in r.err
    r = cli("data", "overlap", tmp_path / "t", "--against", tmp_path / "nope")
    assert r.code == 1 and "not found" in r.err and "nope" in r.err
    r = cli("data", "overlap", tmp_path / "t", "--against", tmp_path / "t", "--max-distance", "200")
    assert r.code == 1 and "max_distance: Input should be less than 128" in r.err
    (tmp_path / "bad.sqlite").write_bytes(b"not a database" * 100)
    r = cli("data", "overlap", tmp_path / "t", "--against", tmp_path / "t", "--cache", tmp_path / "bad.sqlite")
    assert r.code == 1 and "hash cache" in r.err and "delete it or pass another --cache" in r.err
    (tmp_path / "t" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 50)
    r = cli("data", "overlap", tmp_path / "t", "--against", tmp_path / "t", "--json", "--sheet", tmp_path / "s.png")
    res = json.loads(r.out)
    assert r.code == 0 and list(res["unreadable"]) == [str(tmp_path / "t" / "broken.png")]
    assert [(Path(p["train"]).name, Path(p["bench"]).name) for p in res["pairs"]] == [("a.png", "a.png")]


def test_build_dataset_excludes_overlap(tmp_path: Path) -> None:
    root = tmp_path / "faces"
    from facellm_cli.synth import BACKGROUNDS, POSES, FaceAttributes

    # Twelve people, each with their own (background, pose): no two match (test_unrelated_faces_are_not_found).
    combos = [(bg, pose) for bg in sorted(BACKGROUNDS) for pose in POSES][:12]
    people = [FaceAttributes("smiling", "open", pose, "no", "medium", bg) for bg, pose in combos]
    imgs = [save(draw_face(a, SIZE, random.Random(i)), root / f"f{i:02d}.png") for i, a in enumerate(people)]
    recs = [annotation(p.name, a, f"about {p.name}", root=root) for p in imgs for a in ("expression", "pose")]
    jsonl = write_jsonl(tmp_path / "ann.jsonl", recs)
    bench = tmp_path / "bench"
    save(jpeg(open_image(imgs[2]).resize((128, 128))), bench / "x.jpg")
    save(open_image(imgs[9]).convert("L"), bench / "y.png")
    cfg = resolve_config(
        DatasetConfig,
        None,
        {
            "inputs": [str(jsonl)],
            "image_root": str(root),
            "out": str(tmp_path / "out"),
            "exclude_overlap_with": str(bench),
            "overlap_cache": str(tmp_path / "cache.sqlite"),
        },
    )
    report = build_dataset(cfg)
    assert report.filtered["benchmark_overlap"] == 4 and report.images == 10 and report.qa_pairs == 20
    written = {i for s in ("train", "val", "test") for line in (tmp_path / "out" / f"{s}.jsonl").read_text().splitlines()
               for i in json.loads(line)["images"]}  # fmt: skip
    assert "f02.png" not in written and "f09.png" not in written and len(written) == 10
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["benchmark_overlap"]["images_dropped"] == 2
    assert stats["filtered"]["images"]["benchmark_overlap"] == 2
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Benchmark overlap" in md and "2 of 12 images matched" in md and "benchmark_overlap" in md


def test_evaluate_reports_unseen_split(tmp_path: Path) -> None:
    root = tmp_path / "bench"
    imgs = [save(f, root / f"q{i}.png") for i, f in enumerate(faces(41, 8))]
    lines = [
        {"id": f"q{i}", "images": [p.name], "question": "Expression?", "options": ["smiling", "neutral"],
         "answer": "A" if i % 2 == 0 else "B", "task": "expr", "category": "cat_even" if i < 4 else "cat_odd"}
        for i, p in enumerate(imgs)
    ]  # fmt: skip
    data = write_jsonl(root / "set.jsonl", lines)
    train = tmp_path / "train"
    for i in (0, 1, 4):  # q0 (correct), q1 (wrong), q4 (correct) were trained on
        save(jpeg(open_image(imgs[i])), train / f"t{i}.jpg")
    with FakeOpenAI(default="(A)") as server:
        cfg = resolve_config(
            EvalConfig,
            None,
            {
                "data": str(data),
                "out": str(tmp_path / "e"),
                "endpoint": {"base_url": server.base_url, "model": "m"},
                "train_data": [str(train)],
                "overlap_cache": str(tmp_path / "c.sqlite"),
            },
        )
        outcome = evaluate(cfg)
    split = outcome.results["unseen_in_training"]
    assert sorted(split["seen_question_ids"]) == ["q0", "q1", "q4"] and split["questions_seen"] == 3
    assert split["overall"]["all"]["n"] == 8 and split["overall"]["all"]["correct"] == 4
    assert split["overall"]["unseen"]["n"] == 5 and split["overall"]["unseen"]["correct"] == 2
    cats = {c["key"]: c for c in split["categories"]}
    assert cats["cat_even"]["unseen"]["n"] == 2 and cats["cat_odd"]["unseen"]["n"] == 3
    saved = json.loads((tmp_path / "e" / "results.json").read_text())
    assert saved["unseen_in_training"]["questions_seen"] == 3
    md = (tmp_path / "e" / "report.md").read_text()
    assert "## Questions whose images were not in training" in md
    assert "| **Overall** | 50.00 (4/8) | 40.00 (2/5) |" in md


def test_collect_reads_every_kind_of_source(tmp_path: Path) -> None:
    """Image folders, training JSONL, a finetune run's recorded data.train, build-dataset outputs, MCQ sets."""
    from facellm_cli.config import FinetuneConfig, dump_config
    from facellm_cli.data.overlap import collect

    root = tmp_path / "faces"
    imgs = [save(f, root / f"f{i}.png") for i, f in enumerate(faces(51, 3))]
    msgs = write_jsonl(
        tmp_path / "train.jsonl",
        [{"id": str(i), "messages": [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}],
          "images": [p.name]} for i, p in enumerate(imgs[:2])],
    )  # fmt: skip
    run = tmp_path / "run"
    run.mkdir()
    dump_config(
        resolve_config(FinetuneConfig, None, {"data.train": str(msgs), "data.image_root": str(root)}),
        run / "finetune_config.yaml",
    )
    assert collect([run], side="train").paths == [str(root / "f0.png"), str(root / "f1.png")]
    assert collect([msgs], side="train", image_root=root).paths == [str(root / "f0.png"), str(root / "f1.png")]
    assert collect([root], side="train").paths == [str(p) for p in imgs]
    ann = write_jsonl(tmp_path / "ann.jsonl", [annotation(p.name, "pose", "x") for p in imgs])
    assert collect([ann], side="train", image_root=root).paths == [str(p) for p in imgs]
    recs = [annotation(p.name, a, f"about {p.name}", root=root) for p in imgs for a in ("expression", "pose")]
    for r in recs:
        r["labels"] = {"expression": ["smiling", "neutral", "frowning"][int(r["image"][1])]}
    cfg = resolve_config(
        DatasetConfig,
        None,
        {"inputs": [str(write_jsonl(tmp_path / "a2.jsonl", recs))], "image_root": str(root),
         "out": str(tmp_path / "ds"), "mcq": "expression", "split": "0.34,0.33,0.33"},
    )  # fmt: skip
    build_dataset(cfg)
    train_side = collect([tmp_path / "ds"], side="train")
    bench_side = collect([tmp_path / "ds"], side="bench")
    assert sorted(train_side.paths + bench_side.paths) == sorted(str(p.resolve()) for p in imgs)
    assert bench_side.n_questions == len(bench_side.paths) and all(bench_side.questions[p] for p in bench_side.paths)


def test_cli_flags_reach_build_dataset_and_evaluate(tmp_path: Path, cli) -> None:
    """--exclude-overlap-with and --train-data from the command line, with the default hash cache under FACELLM_HOME."""
    root = tmp_path / "faces"
    imgs = [save(f, root / f"f{i}.png") for i, f in enumerate(faces(61, 4))]
    jsonl = write_jsonl(
        tmp_path / "ann.jsonl", [annotation(p.name, "pose", f"about {p.name}", root=root) for p in imgs]
    )
    save(jpeg(open_image(imgs[1])), tmp_path / "bench" / "b.jpg")
    r = cli(
        "build-dataset", jsonl, "--image-root", root, "--out", tmp_path / "ds", "--split", "1,0,0",
        "--exclude-overlap-with", tmp_path / "bench", "--json",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert json.loads(r.out.splitlines()[0])["filtered"] == {"benchmark_overlap": 1}
    cache = Path(os.environ["FACELLM_HOME"]) / "cache" / "overlap-hashes.sqlite"
    assert cache.is_file()
    data = write_jsonl(
        tmp_path / "set.jsonl",
        [{"id": p.stem, "images": [str(p)], "question": "q?", "options": ["x", "y"], "answer": "A"} for p in imgs],
    )
    with FakeOpenAI(default="(B)") as server:
        r = cli(
            "evaluate", "--data", data, "--base-url", server.base_url, "--model", "m", "--out", tmp_path / "e",
            "--train-data", tmp_path / "ds",
        )  # fmt: skip
    assert r.code == 0, r.err
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    assert res["unseen_in_training"]["seen_question_ids"] == ["f0", "f2", "f3"]  # f1 was excluded from training


def test_all_facexbench_question_files_load(tmp_path: Path, cli) -> None:
    """All 48 shared question files: 5,000 questions and their images; without the images, one clear error."""
    if SHARED_BENCHMARK is None:
        pytest.skip(FULL_BENCHMARK_MISSING)
    from facellm_cli.data.overlap import collect

    bench = collect([], side="bench", facexbench_dir=SHARED_BENCHMARK)
    assert bench.n_questions == 5000
    assert len({r.category for r in bench.all_questions}) == 6
    links = [
        (f"{f.stem}/{n}", str(SHARED_BENCHMARK / rel))
        for f in sorted(SHARED_BENCHMARK.glob("*.json"))
        for n, q in json.loads(f.read_text(encoding="utf-8"))["questions"].items()
        for rel in q["image_paths"]
    ]
    assert sorted((r.id, p) for p, refs in bench.questions.items() for r in refs) == sorted(links)
    save(faces(1, 1)[0], tmp_path / "t" / "a.png")
    r = cli("data", "overlap", tmp_path / "t", "--benchmark", "facexbench", "--data-dir", SHARED_BENCHMARK)
    assert r.code == 1 and f"{len(bench.paths)} image(s) not found" in r.err


@pytest.mark.parametrize("numpy_popcount", [True, False], ids=["bitwise_count", "byte-table"])
def test_hamming_pairs_is_exact(numpy_popcount: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pair within the threshold and no other, as a Python loop over all pairs finds them (both popcounts)."""
    import numpy as np

    from facellm_cli.data import overlap

    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**63, size=(300, 2), dtype=np.uint64)
    b = rng.integers(0, 2**63, size=(70, 2), dtype=np.uint64)
    b[5] = a[7]
    b[5, 0] ^= np.uint64(0b1011)  # 3 bits from a[7]
    if not numpy_popcount:
        monkeypatch.delattr(np, "bitwise_count", raising=False)
    monkeypatch.setattr(overlap, "_BLOCK_PAIRS", 1000)  # many blocks, a short last one
    i, j, d = overlap.hamming_pairs(a, b, 52)
    got = sorted(zip(i.tolist(), j.tolist(), d.tolist(), strict=True))
    want = [
        (x, y, n)
        for x in range(len(a))
        for y in range(len(b))
        if (n := int(a[x, 0] ^ b[y, 0]).bit_count() + int(a[x, 1] ^ b[y, 1]).bit_count()) <= 52
    ]
    assert got == want and (7, 5, 3) in got and len(got) > 10


def test_train_data_auto_reads_the_run_next_to_the_adapter(tmp_path: Path) -> None:
    from facellm_cli.config import FinetuneConfig, dump_config
    from facellm_cli.data.overlap import resolve_train_data
    from facellm_cli.errors import ConfigError

    run = tmp_path / "runs" / "lora"
    run.mkdir(parents=True)
    dump_config(
        resolve_config(FinetuneConfig, None, {"data.train": str(tmp_path / "t.jsonl")}), run / "finetune_config.yaml"
    )
    base = {"data": "x.jsonl", "train_data": ["auto"]}
    cfg = resolve_config(EvalConfig, None, {**base, "model": {"model": "base-model", "adapter": str(run)}})
    assert resolve_train_data(cfg) == [str(run)]
    cfg = resolve_config(EvalConfig, None, {**base, "model": {"model": str(tmp_path)}})
    with pytest.raises(ConfigError, match=r"train_data: auto found no finetune_config.yaml .* in " + str(tmp_path)):
        resolve_train_data(cfg)
    cfg = resolve_config(EvalConfig, None, {**base, "train_data": [str(run)], "model": {"model": "m"}})
    assert resolve_train_data(cfg) == [str(run)]


def test_cli_overlap_reads_a_config_file(tmp_path: Path, cli) -> None:
    """--config YAML, then flags, then --set: the usual precedence; an unknown key is named."""
    train_dir, train = _train(tmp_path, n=3)
    save(jpeg(open_image(train[1])), tmp_path / "bench" / "copy.jpg")
    yaml_file = tmp_path / "overlap.yaml"
    yaml_file.write_text(
        f"train: [{train_dir}]\nagainst: [{tmp_path / 'bench'}]\nmax_distance: 0\nsheet: null\n", encoding="utf-8"
    )
    r = cli("data", "overlap", "--config", yaml_file, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["max_distance"] == 0
    r = cli("data", "overlap", "--config", yaml_file, "--set", "max_distance=14", "--json")
    res = json.loads(r.out)
    assert [Path(p["train"]).name for p in res["pairs"]] == [train[1].name] and res["contact_sheet"] is None
    yaml_file.write_text(f"train: [{train_dir}]\nagainst: [{train_dir}]\nmax_distanse: 3\n", encoding="utf-8")
    r = cli("data", "overlap", "--config", yaml_file)
    assert r.code == 1 and "max_distanse" in r.err
