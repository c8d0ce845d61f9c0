"""Benchmark: the paper's sequential annotation loop vs ``facellm annotate`` on the same local endpoint.

Both talk to facellm_cli.testing.fake_openai (a real HTTP server on 127.0.0.1) with a fixed
300 ms latency per request, on the same 200 images x 8 aspects (1,600 requests).

* reference: the loop of the paper's released ``fairfacegpt.py`` reimplemented
  from its description: one request at a time with the official ``openai``
  client, the image re-encoded for every aspect, two text files written per
  answer, then ``time.sleep(1)``. At ~1.3 s per request the full set takes ~35
  minutes, so it runs on the first ``--ref-items`` requests and its rate is
  extrapolated to 1,600 (the output says so).
* ours: ``facellm annotate`` as a real subprocess, default settings, full set;
  then again with ``--mode grouped`` to count image tokens sent.

Run: PYTHONPATH=src python bench/annotate_throughput.py [--images 200] [--ref-items 40]
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from facellm_cli.annotate.prompts import FAIRFACEGPT_V1, render_aspect
from facellm_cli.config import EndpointConfig
from facellm_cli.testing.fake_openai import FakeOpenAI

ROOT = Path(__file__).resolve().parents[1]

AGES = ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70"]
RACES = ["White", "Black", "Indian", "East Asian", "Southeast Asian", "Middle Eastern", "Latino_Hispanic"]


def make_dataset(root: Path, n: int) -> Path:
    """n FairFace-sized (448x448) JPEG faces-like images and a FairFace-style label CSV."""
    from PIL import Image, ImageDraw

    (root / "val").mkdir(parents=True)
    rows = []
    for i in range(n):
        img = Image.new("RGB", (448, 448), (30 + i % 200, 60 + (i * 3) % 150, 90 + (i * 7) % 120))
        d = ImageDraw.Draw(img)
        d.ellipse((104, 64, 344, 384), fill=(200 - i % 80, 160, 130))
        d.ellipse((170, 180, 200, 200), fill=(20, 20, 20))
        d.ellipse((250, 180, 280, 200), fill=(20, 20, 20))
        d.arc((180, 260, 270, 320), 0, 180, fill=(120, 40, 40), width=4)
        img.save(root / "val" / f"{i + 1}.jpg", quality=90)
        rows.append(
            [f"val/{i + 1}.jpg", AGES[i % len(AGES)], "Male" if i % 2 else "Female", RACES[i % len(RACES)], "True"]
        )
    with open(root / "fairface_label_val.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "age", "gender", "race", "service_test"])
        w.writerows(rows)
    return root / "fairface_label_val.csv"


def reference_loop(base_url: str, labels_csv: Path, out_dir: Path, limit: int) -> tuple[int, float]:
    """The paper's loop: per image, per aspect, one blocking request, write two files, sleep 1 s."""
    from openai import OpenAI

    client = OpenAI(api_key="sk-bench", base_url=base_url)
    root = labels_csv.parent
    done = 0
    t0 = time.perf_counter()
    with open(labels_csv) as f:
        rows = list(csv.reader(f))[1:]
    for line in rows:
        image_path, age, gender, _race = root / line[0], line[1], line[2], line[3]
        labels = {"age": age, "gender": gender, "race": line[3]}
        b64 = base64.b64encode(image_path.read_bytes()).decode("utf-8")
        for i, aspect in enumerate(FAIRFACEGPT_V1.aspects):
            if done >= limit:
                return done, time.perf_counter() - t0
            prompt, question = render_aspect(FAIRFACEGPT_V1, aspect, labels)
            response = client.chat.completions.create(
                model="gpt-4o-2024-11-20",
                messages=[
                    {"role": "system", "content": FAIRFACEGPT_V1.system},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": prompt},
                            {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{b64}"}},
                        ],
                    },
                ],
            )
            answer = response.choices[0].message.content
            user = line[0].split(".")[0]
            (out_dir / user).mkdir(parents=True, exist_ok=True)
            (out_dir / user / f"question_{i}.txt").write_text(question)
            (out_dir / user / f"answer_{i}.txt").write_text(answer or "")
            done += 1
            time.sleep(1)
    return done, time.perf_counter() - t0


def run_ours(base_url: str, labels_csv: Path, out: Path, *extra: str) -> tuple[dict, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OPENAI_API_KEY="sk-bench")
    cmd = [
        sys.executable,
        "-m",
        "facellm_cli",
        "annotate",
        "--labels",
        str(labels_csv),
        "--out",
        str(out),
        "--base-url",
        base_url,
        "--json",
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"facellm annotate failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout), wall


def count_records(out: Path, images: int, aspects: int) -> tuple[int, int, int]:
    """(ok records, lost pairs, duplicated pairs)."""
    pairs: dict[tuple[str, str], int] = {}
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        if rec["status"] == "ok":
            key = (rec["image_sha256"], rec["aspect"])
            pairs[key] = pairs.get(key, 0) + 1
    expected = images * aspects
    return sum(pairs.values()), expected - len(pairs), sum(v - 1 for v in pairs.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--ref-items", type=int, default=40, help="requests the reference loop runs before extrapolating")
    ap.add_argument("--latency", type=float, default=0.3, help="server latency per request (s)")
    args = ap.parse_args()
    n_aspects = len(FAIRFACEGPT_V1.aspects)
    default_concurrency = EndpointConfig.model_fields["concurrency"].default
    total = args.images * n_aspects
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        labels = make_dataset(tmp_path / "fairface", args.images)
        with FakeOpenAI(latency=args.latency) as server:
            ref_n, ref_wall = reference_loop(
                server.base_url, labels, tmp_path / "reference", min(args.ref_items, total)
            )
            ref_rate = ref_n / ref_wall
            ref_full = total / ref_rate

            before = server.count()
            ours, our_wall = run_ours(server.base_url, labels, tmp_path / "ours.jsonl")
            our_requests = server.count() - before
            ok, lost, dup = count_records(tmp_path / "ours.jsonl", args.images, n_aspects)
            our_rate = ok / our_wall

            images_before = server.images_received()
            grouped, grouped_wall = run_ours(server.base_url, labels, tmp_path / "grouped.jsonl", "--mode", "grouped")
            g_images = server.images_received() - images_before
            g_ok, g_lost, g_dup = count_records(tmp_path / "grouped.jsonl", args.images, n_aspects)

    print(
        f"workload: {args.images} images x {n_aspects} aspects = {total} requests, "
        f"server latency {args.latency * 1000:.0f} ms"
    )
    print(
        f"reference (paper's sequential loop, 1 s sleep): ran {ref_n} requests in {ref_wall:.1f} s "
        f"= {ref_rate:.3f} req/s; EXTRAPOLATED to {total}: {ref_full:.0f} s ({ref_full / 60:.1f} min)"
    )
    print(
        f"facellm annotate (per-aspect, default concurrency {default_concurrency}): {ok} records in {our_wall:.1f} s "
        "(process start included) "
        f"= {our_rate:.1f} req/s; {our_requests} HTTP requests; lost {lost}, duplicated {dup}"
    )
    print(f"speed-up: {our_rate / ref_rate:.0f}x throughput (target >= 50x); wall {ref_full:.0f} s -> {our_wall:.1f} s")
    print(f"facellm annotate --mode grouped: {g_ok} records in {grouped_wall:.1f} s; lost {g_lost}, duplicated {g_dup}")
    print(
        f"image tokens sent: per-aspect {ours['image_tokens']:,} vs grouped {grouped['image_tokens']:,} "
        f"= {ours['image_tokens'] / max(1, grouped['image_tokens']):.1f}x fewer (target >= 6x); "
        f"images received by the server in grouped mode: {g_images} for {args.images} images"
    )
    print(
        f"tokens reported: per-aspect {ours['prompt_tokens']:,} prompt / {ours['completion_tokens']:,} completion; "
        f"grouped {grouped['prompt_tokens']:,} / {grouped['completion_tokens']:,}"
    )


if __name__ == "__main__":
    main()
