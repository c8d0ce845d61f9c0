"""build-dataset at FairFaceGPT scale: time and peak memory, ours vs a naive load-everything builder.

Generates a corpus shaped like FairFaceGPT (10,954 images, 8 aspects each =
87,632 QA pairs of ~100-word answers, age/gender/race labels), then runs in
fresh subprocesses (so each peak RSS is its own):

- ``ours``   facellm's ``build_dataset`` (two passes, packed per-record index);
- ``naive``  the obvious reference: ``json.loads`` every line into a list,
             validate, split, and ``json.dump`` whole lists per split;
- ``ours`` again on a quarter of the records, to show memory does not track corpus size.

Both builders do the same work: decode each image once, refusal/empty checks,
(image, question) de-duplication, the same seeded split, ShareGPT + messages
outputs. Usage::

    python bench/build_dataset_scale.py [--images 10954] [--aspects 8] [--workdir /tmp/facellm-bench]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ASPECTS = ["expression", "age", "gender", "race", "pose", "hair", "eyes", "accessories"]
_TEXT = (
    "the person appears to have a calm neutral expression with relaxed eyebrows soft gaze slightly parted lips "
    "visible cheekbones smooth skin short dark hair neatly combed face turned slightly toward the camera in even "
    "lighting no glasses or jewellery features suggest a young adult with balanced proportions"
)
WORDS = _TEXT.split()
AGES = ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+"]
RACES = ["White", "Black", "East Asian", "Southeast Asian", "Indian", "Middle Eastern", "Latino_Hispanic"]


def rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def generate(workdir: Path, n_images: int, n_aspects: int) -> Path:
    """Images + annotate JSONL (+ a quarter-size JSONL); cached by a marker file."""
    marker = workdir / f"corpus-{n_images}x{n_aspects}.done"
    if marker.exists():
        return workdir
    from PIL import Image

    shutil.rmtree(workdir, ignore_errors=True)
    faces = workdir / "faces"
    rng = random.Random(0)
    t0 = time.perf_counter()
    quarter = n_images // 4
    faces.mkdir(parents=True)
    with open(workdir / "annotations.jsonl", "w") as f, open(workdir / "quarter.jsonl", "w") as fq:
        for i in range(n_images):
            rel = f"train/{i:05d}.png"
            path = faces / rel
            path.parent.mkdir(exist_ok=True)
            Image.frombytes("RGB", (16, 16), rng.randbytes(16 * 16 * 3)).save(path, format="PNG")
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            labels = {"age": AGES[i % 9], "gender": "Male" if i % 2 else "Female", "race": RACES[i % 7]}
            for a in ASPECTS[:n_aspects]:
                answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(70, 130))).capitalize() + "."
                rec = {
                    "image": rel,
                    "image_sha256": sha,
                    "aspect": a,
                    "question": f"Describe the {a} of the person in this image.",
                    "answer": answer,
                    "status": "ok",
                    "model": "gpt-4o",
                    "provider": "openai",
                    "prompt_version": "v1",
                    "labels": labels,
                    "usage": {"prompt_tokens": 900, "completion_tokens": 160},
                    "attempts": 1,
                    "created": "2026-01-01T00:00:00Z",
                }
                line = json.dumps(rec) + "\n"
                f.write(line)
                if i < quarter:
                    fq.write(line)
    marker.write_text(f"generated in {time.perf_counter() - t0:.1f}s\n")
    return workdir


def worker_ours(corpus: Path, jsonl: str, out: Path) -> dict:
    from facellm_cli.config import DatasetConfig, resolve_config
    from facellm_cli.data.build import build_dataset

    base = rss_now_mb()
    t0 = time.perf_counter()
    cfg = resolve_config(
        DatasetConfig,
        None,
        {"inputs": [str(corpus / jsonl)], "image_root": str(corpus / "faces"), "out": str(out), "overwrite": True},
    )
    report = build_dataset(cfg)
    return {
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": peak_rss_mb(),
        "baseline_rss_mb": base,
        "qa_pairs": report.qa_pairs,
        "images": report.images,
    }


def worker_naive(corpus: Path, jsonl: str, out: Path) -> dict:
    """The load-everything reference: every record as a dict in one list, outputs built as whole lists."""
    from facellm_cli.data.splits import assign_splits
    from facellm_cli.images import open_image
    from facellm_cli.refusals import is_refusal

    base = rss_now_mb()
    t0 = time.perf_counter()
    with open(corpus / jsonl, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    root = corpus / "faces"
    ok_images: dict[str, bool] = {}
    seen: set[tuple[str, str]] = set()
    kept = []
    for r in records:
        if r.get("status") != "ok" or not r["answer"].strip() or is_refusal(r["answer"]):
            continue
        key = (r["image"], " ".join(r["question"].split()).casefold())
        if key in seen:
            continue
        seen.add(key)
        if r["image"] not in ok_images:
            try:
                open_image(root / r["image"])
                ok_images[r["image"]] = True
            except Exception:
                ok_images[r["image"]] = False
        if ok_images[r["image"]]:
            kept.append(r)
    splits = assign_splits({r["image"]: "" for r in kept}, [0.8, 0.1, 0.1], 0)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train", "val", "test"):
        part = sorted((r for r in kept if splits[r["image"]] == name), key=lambda r: (r["image"], r["aspect"]))
        share = [
            {
                "conversations": [
                    {"from": "human", "value": "<image>\n" + r["question"]},
                    {"from": "gpt", "value": r["answer"]},
                ],
                "images": [r["image"]],
            }
            for r in part
        ]
        msgs = [
            {
                "id": f"{r['image']}#{r['aspect']}",
                "messages": [
                    {"role": "user", "content": "<image>\n" + r["question"]},
                    {"role": "assistant", "content": r["answer"]},
                ],
                "images": [r["image"]],
            }
            for r in part
        ]
        (out / f"{name}.json").write_text(json.dumps(share, ensure_ascii=False))
        (out / f"{name}.jsonl").write_text("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in msgs))
    return {
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": peak_rss_mb(),
        "baseline_rss_mb": base,
        "qa_pairs": len(kept),
        "images": sum(ok_images.values()),
    }


def run_worker(kind: str, corpus: Path, jsonl: str) -> dict:
    out = corpus / f"out-{kind}-{Path(jsonl).stem}"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    )
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", kind, "--workdir", str(corpus), "--jsonl", jsonl, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode:
        raise SystemExit(f"{kind} worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10_954)
    ap.add_argument("--aspects", type=int, default=8, choices=range(1, len(ASPECTS) + 1))
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "facellm-bench-build-dataset")
    ap.add_argument("--worker", choices=["ours", "naive"])
    ap.add_argument("--jsonl", default="annotations.jsonl")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    if args.worker:
        fn = worker_ours if args.worker == "ours" else worker_naive
        print(json.dumps(fn(args.workdir, args.jsonl, args.out)))
        return

    t0 = time.perf_counter()
    corpus = generate(args.workdir, args.images, args.aspects)
    size_mb = (corpus / "annotations.jsonl").stat().st_size / 1e6
    print(
        f"corpus: {args.images:,} images x {args.aspects} aspects = {args.images * args.aspects:,} QA pairs, "
        f"annotations.jsonl {size_mb:.0f} MB (ready in {time.perf_counter() - t0:.1f}s)"
    )
    ours = run_worker("ours", corpus, "annotations.jsonl")
    naive = run_worker("naive", corpus, "annotations.jsonl")
    quarter = run_worker("ours", corpus, "quarter.jsonl")
    assert ours["qa_pairs"] == naive["qa_pairs"] == args.images * args.aspects, (ours, naive)

    def row(name: str, r: dict) -> str:
        delta = r["peak_rss_mb"] - r["baseline_rss_mb"]
        return (
            f"{name:<28} {r['qa_pairs']:>8,} pairs  {r['seconds']:7.1f} s  peak RSS {r['peak_rss_mb']:7.1f} MB "
            f"(+{delta:6.1f} MB over {r['baseline_rss_mb']:.0f} MB after imports)"
        )

    print(row("naive (load everything)", naive))
    print(row("facellm build_dataset", ours))
    print(row("facellm, 1/4 of the records", quarter))
    grow_naive = naive["peak_rss_mb"] - naive["baseline_rss_mb"]
    grow_ours = ours["peak_rss_mb"] - ours["baseline_rss_mb"]
    grow_quarter = quarter["peak_rss_mb"] - quarter["baseline_rss_mb"]
    print(
        f"ratio naive/ours: time {naive['seconds'] / ours['seconds']:.2f}x, "
        f"peak RSS {naive['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x, "
        f"RSS growth over baseline {grow_naive / max(grow_ours, 0.1):.1f}x"
    )
    print(
        f"ours: 4x the records -> +{grow_ours - grow_quarter:.1f} MB peak growth "
        f"({grow_quarter:.1f} -> {grow_ours:.1f} MB); corpus text is {size_mb:.0f} MB"
    )


if __name__ == "__main__":
    main()
