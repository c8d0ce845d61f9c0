"""Overlap check at scale: 20,000 training x 2,000 benchmark generated faces, cold and cached, vs all pairs in Python.

Prints, in one run:

* the cold run (decode + hash every image in ``--workers`` processes, then match), and the same with 1 process;
* the warm run (every hash from the cache);
* the Hamming step alone against the naive way: a Python loop over all pairs with ``int.bit_count``;
* the matching step alone at FairFace x FaceXBench scale (100,000 x 10,000 random hashes = 1e9 pairs).

    python bench/overlap_scale.py                 # 20,000 x 2,000
    python bench/overlap_scale.py --train 2000 --bench 200   # quick look
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from facellm_cli.data.overlap import (
        DEFAULT_MAX_COLOUR_DISTANCE,
        DEFAULT_MAX_DISTANCE,
        HashCache,
        collect,
        compute_signatures,
        find_overlap,
        hamming_pairs,
        match,
    )
    from facellm_cli.images import open_image
    from facellm_cli.synth import synth_faces

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=20_000)
    ap.add_argument("--bench", type=int, default=2_000)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-single", action="store_true", help="Skip the 1-process cold run.")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="overlap-bench-"))
    try:
        t = time.perf_counter()
        synth_faces(tmp / "train", args.train, seed=1, size=args.size, workers=args.workers)
        (tmp / "train" / "labels.csv").unlink()
        synth_faces(tmp / "other", args.bench // 2, seed=2, size=args.size, workers=args.workers)
        bench = tmp / "bench"
        bench.mkdir()
        rng = random.Random(0)
        copies = rng.sample(sorted((tmp / "train").glob("*.png")), args.bench - args.bench // 2)
        for i, p in enumerate(copies):  # re-encoded, renamed copies of training faces
            open_image(p).save(bench / f"copy_{i:05d}.jpg", quality=70)
        for p in sorted((tmp / "other").glob("*.png")):
            shutil.move(p, bench / f"other_{p.name}")
        print(f"generated {args.train} + {args.bench} faces of {args.size} px in {time.perf_counter() - t:.1f} s")

        train_c = collect([tmp / "train"], side="train")
        bench_c = collect([bench], side="bench")

        def run(workers: int, cache_file: Path) -> tuple[float, object]:
            cache = HashCache(cache_file)
            t0 = time.perf_counter()
            res = find_overlap(train_c, bench_c, cache=cache, workers=workers)
            cache.close()
            return time.perf_counter() - t0, res

        cold, res = run(args.workers, tmp / "cache.sqlite")
        found = sum(1 for p in res.pairs if Path(p["bench"]).name.startswith("copy_"))
        print(
            f"cold, {args.workers} processes: {cold:.1f} s for {args.train:,} x {args.bench:,}; "
            f"{len(res.pairs)} pairs, {len(res.matched_bench)} benchmark images matched "
            f"({len(copies)} are copies; copy pairs {found})"
        )
        if not args.skip_single:
            single, _ = run(1, tmp / "cache1.sqlite")
            print(f"cold, 1 process: {single:.1f} s (processes speed-up {single / cold:.2f}x)")
        warm, _ = run(args.workers, tmp / "cache.sqlite")
        print(f"warm (all hashes cached): {warm:.2f} s ({cold / warm:.1f}x faster than cold)")

        ts = compute_signatures(train_c.paths, cache=HashCache(tmp / "cache.sqlite"))
        bs = compute_signatures(bench_c.paths, cache=HashCache(tmp / "cache.sqlite"))
        t0 = time.perf_counter()
        i, _, _ = hamming_pairs(ts.words, bs.words, DEFAULT_MAX_DISTANCE)
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = match(ts, bs, DEFAULT_MAX_DISTANCE, DEFAULT_MAX_COLOUR_DISTANCE)
        t_match = time.perf_counter() - t0
        tw = [(int(a) << 64) | int(b) for a, b in ts.words]
        bw = [(int(a) << 64) | int(b) for a, b in bs.words]
        t0 = time.perf_counter()
        naive = [
            (i, j) for i, x in enumerate(tw) for j, y in enumerate(bw) if (x ^ y).bit_count() <= DEFAULT_MAX_DISTANCE
        ]
        t_naive = time.perf_counter() - t0
        assert len(naive) == len(i), (len(naive), len(i))
        print(
            f"Hamming over all {len(tw) * len(bw):,} pairs: numpy blocks {t_fast:.2f} s vs Python loop with "
            f"int.bit_count {t_naive:.1f} s ({t_naive / t_fast:.0f}x), both {len(i)} pairs; with the colour check "
            f"and sorting {t_match:.2f} s -> {len(fast)} pairs"
        )
        r = np.random.default_rng(0)
        a = r.integers(0, 2**63, size=(100_000, 2), dtype=np.uint64)
        b = r.integers(0, 2**63, size=(10_000, 2), dtype=np.uint64)
        t0 = time.perf_counter()
        hamming_pairs(a, b, DEFAULT_MAX_DISTANCE)
        print(f"matching only, 100,000 x 10,000 = 1e9 pairs (random hashes): {time.perf_counter() - t0:.1f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
