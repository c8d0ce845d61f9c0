"""Benchmark hygiene: which training images are also benchmark images, found by their pixels.

Benchmarks rename and re-encode the images they take from public sets
(FaceXBench's bias questions come from FairFace, whose validation images are
FaceLLM's training set), so file names and bytes say nothing; only a
perceptual comparison finds the copies.

Each image gets a 144-byte signature, computed once and cached per file
(path, size, mtime):

* **structure**: a 128-bit difference hash of the grayscale image
  (``imagehash.dhash`` and ``dhash_vertical``, 64 bits each: is each cell of a
  9x8 / 8x9 thumbnail brighter than its neighbour). It survives JPEG
  re-encoding, resizing and grayscale conversion almost unchanged, and a crop
  of a few pixels moves only a few bits. Pairs are compared by the Hamming
  distance of these 128 bits, exactly, for all pairs: XOR and popcount over
  packed uint64 in numpy blocks (1e9 pairs, FairFace x FaceXBench scale, take
  4-8 s on one core; ``bench/overlap_scale.py``), so no index can miss a pair
  within the threshold.
* **colour**: the chroma (Cb, Cr) of an 8x8 box thumbnail. Structure alone
  cannot tell two faces apart that differ only in skin tone or background, so
  a pair within the Hamming threshold must also agree in colour (mean absolute
  chroma difference), unless either image is grayscale, where colour says
  nothing.

Images are decoded only through :func:`images.open_image`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DataError, FacellmError, ImageError, MissingDependencyError
from ..images import find_images, is_image_path, open_image
from ..reporting import SILENT, Reporter

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

    from ..config import EvalConfig, OverlapConfig
    from ..schema import MCQuestion

SIGNATURE_VERSION = "dhash128+chroma8-v1"
HASH_BITS = 128
DEFAULT_MAX_DISTANCE = 14  # of 128 bits; see the measured rates in README "Benchmark overlap"
DEFAULT_MAX_COLOUR_DISTANCE = 3.0  # mean |delta Cb|, |delta Cr| of the 8x8 thumbnails (0-255); copies measured <= 2.3
GRAY_CHROMA = 4  # an image whose chroma stays within 128 +- this everywhere is grayscale
_CHROMA_CELLS = 8
_SIG_BYTES = 16 + 2 * _CHROMA_CELLS * _CHROMA_CELLS
_BLOCK_PAIRS = 1_000_000  # pairs per numpy block (see hamming_pairs)


# ---------------------------------------------------------------- sources


@dataclass(frozen=True)
class QuestionRef:
    """A benchmark question that shows an image."""

    id: str
    task: str
    category: str


@dataclass
class Collection:
    """Images of one side (training or benchmark), with the questions that show each benchmark image."""

    paths: list[str] = field(default_factory=list)
    questions: dict[str, list[QuestionRef]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    n_questions: int = 0
    all_questions: list[QuestionRef] = field(default_factory=list)

    def add(self, path: str | Path, ref: QuestionRef | None = None) -> None:
        p = str(path)
        if p not in self.questions:
            self.questions[p] = []
            self.paths.append(p)
        if ref is not None:
            self.questions[p].append(ref)


def _first_record(path: Path) -> Any:
    """The first JSON value of a .jsonl line or of a .json file's list (None when neither)."""
    if path.suffix.lower() == ".jsonl":
        return _first_jsonl_record(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, list):
        return data[0] if data else None
    return data


def _first_jsonl_record(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        line = next((line for line in f if line.strip()), None)
    if line is None:
        return None
    try:
        return json.loads(line)
    except ValueError:
        raise DataError(f"{path}: first line is not valid JSON") from None


def _is_facexbench(folder: Path) -> bool:
    for cand in (folder / "benchmark", folder):
        for f in sorted(cand.glob("*.json"))[:3] if cand.is_dir() else []:
            try:
                meta = json.loads(f.read_text(encoding="utf-8"))
            except (ValueError, OSError):
                return False
            if isinstance(meta, dict) and isinstance(meta.get("questions"), dict):
                return True
    return False


def _media_dir(build_dir: Path) -> Path:
    """The image root of a build-dataset output (recorded in its stats.json, else its config.yaml)."""
    stats = build_dir / "stats.json"
    if stats.is_file():
        media = json.loads(stats.read_text(encoding="utf-8")).get("media_dir")
        if media:
            return Path(media)
    import yaml

    cfg = yaml.safe_load((build_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    if not cfg.get("image_root"):
        raise DataError(f"{build_dir}: no media_dir in stats.json nor image_root in config.yaml; pass --image-root")
    return Path(cfg["image_root"])


def _add_questions(coll: Collection, questions: Iterable[MCQuestion]) -> None:
    for q in questions:
        ref = QuestionRef(q.id, q.task, q.category)
        coll.n_questions += 1
        coll.all_questions.append(ref)
        for img in q.images:
            coll.add(img, ref)


def _add_samples(coll: Collection, path: Path, image_root: Path | None) -> None:
    from ..train.data import read_samples

    for s in read_samples(path, image_root=image_root, check_images=False):
        for img in s.images:
            coll.add(img)


def _add_annotations(coll: Collection, path: Path, image_root: Path | None) -> None:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                raw = str(rec["image"])
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{path} line {lineno}: not an annotate record (needs an 'image' field)") from None
            p = Path(raw).expanduser()
            if not p.is_absolute():
                p = (image_root / p) if image_root else p
            coll.add(p)


def _add_finetune_run(coll: Collection, run: Path) -> None:
    """The training file a finetune run recorded in its finetune_config.yaml (a run or adapter folder)."""
    import yaml

    cfg = yaml.safe_load((run / "finetune_config.yaml").read_text(encoding="utf-8")) or {}
    data = cfg.get("data") or {}
    train = data.get("train")
    if not train or not Path(train).expanduser().is_file():
        raise DataError(
            f"{run / 'finetune_config.yaml'}: data.train {train!r} is not a file here; pass the training data itself"
        )
    root = Path(data["image_root"]).expanduser() if data.get("image_root") else None
    _add_samples(coll, Path(train).expanduser(), root)


def collect(
    inputs: Sequence[str | Path],
    *,
    side: str,
    image_root: str | Path | None = None,
    facexbench_dir: str | Path | None = None,
) -> Collection:
    """Images named by ``inputs``: image files or folders, annotate JSONL, training JSONL/ShareGPT,
    build-dataset outputs, finetune run folders (the data.train in their finetune_config.yaml),
    multiple-choice JSONL sets, FaceXBench checkouts.

    ``side`` is "train" or "bench": a build-dataset folder gives its ``train.jsonl`` images on the
    training side and its held-out ``mcq_val``/``mcq_test`` questions on the benchmark side.
    """
    from ..eval.facexbench import load_facexbench
    from ..eval.sets import load_jsonl_set

    coll = Collection()
    root = Path(image_root).expanduser() if image_root else None
    items: list[tuple[str, str | Path]] = [("path", i) for i in inputs]
    if facexbench_dir:
        items.append(("facexbench", facexbench_dir))
    for kind, item in items:
        p = Path(item).expanduser()
        coll.sources.append(str(item))
        if kind == "facexbench" or (p.is_dir() and _is_facexbench(p)):
            _add_questions(coll, load_facexbench(p, check_images=False))
        elif p.is_dir() and (p / "finetune_config.yaml").is_file() and side == "train":
            _add_finetune_run(coll, p)
        elif p.is_dir() and (p / "dataset_info.json").is_file():
            media = root or _media_dir(p)
            if side == "train":
                if not (p / "train.jsonl").is_file():
                    raise DataError(f"{p}: a build-dataset folder without train.jsonl")
                _add_samples(coll, p / "train.jsonl", media)
            else:
                sets = [f for f in (p / "mcq_val.jsonl", p / "mcq_test.jsonl") if f.is_file()]
                if not sets:
                    raise DataError(f"{p}: no mcq_val.jsonl or mcq_test.jsonl (build it with --mcq LABELS)")
                for f in sets:
                    _add_questions(coll, load_jsonl_set(f, image_root=media, check_images=False))
        elif p.is_dir():
            found = find_images([p])
            if not found:
                raise DataError(f"no images (or known data files) in folder {p}")
            for img in found:
                coll.add(img)
        elif p.is_file() and is_image_path(p):
            coll.add(p)
        elif p.is_file() and p.suffix.lower() in (".jsonl", ".json"):
            first = _first_record(p)
            if isinstance(first, dict) and "options" in first and "question" in first:
                _add_questions(coll, load_jsonl_set(p, image_root=root, check_images=False))
            elif isinstance(first, dict) and ("messages" in first or "conversations" in first):
                _add_samples(coll, p, root)
            elif isinstance(first, dict) and "image" in first:
                _add_annotations(coll, p, root)
            else:
                raise DataError(
                    f"{p}: not a multiple-choice set, training file or annotate output "
                    "(expected lines with options+question, messages/conversations, or image)"
                )
        elif not p.exists():
            raise DataError(f"not found: {item} (give image folders, data files or a FaceXBench checkout)")
        else:
            raise DataError(f"{item}: not an image, folder, .jsonl or .json file")
    if not coll.paths:
        raise DataError(f"no images in {', '.join(map(str, coll.sources)) or 'the inputs'}")
    return coll


# ---------------------------------------------------------------- signatures


def _require_imagehash() -> Any:
    try:
        import imagehash
    except ImportError:
        raise MissingDependencyError("the overlap check", "overlap", "imagehash") from None
    return imagehash


def signature(img: PILImage.Image) -> bytes:
    """16 bytes of structure hash then 128 bytes of chroma thumbnail."""
    import numpy as np
    from PIL import Image

    imagehash = _require_imagehash()
    bits = np.concatenate([imagehash.dhash(img).hash.ravel(), imagehash.dhash_vertical(img).hash.ravel()])
    chroma = np.asarray(
        img.convert("YCbCr").resize((_CHROMA_CELLS, _CHROMA_CELLS), Image.Resampling.BOX), dtype=np.uint8
    )[:, :, 1:]
    return np.packbits(bits).tobytes() + np.ascontiguousarray(chroma.transpose(2, 0, 1)).tobytes()


def _sign_files(paths: list[str]) -> list[bytes | str]:
    """Signatures of files (runs in worker processes too); an unreadable image gives its error text."""
    out: list[bytes | str] = []
    for p in paths:
        try:
            out.append(signature(open_image(p)))
        except ImageError as e:
            out.append(str(e))
    return out


class HashCache:
    """Signatures keyed by (absolute path, size, mtime_ns) in a small SQLite file, so a re-run skips decoding."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path).expanduser() if path else None
        self._db: sqlite3.Connection | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._db = sqlite3.connect(self.path)
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS sig (path TEXT, size INTEGER, mtime INTEGER, version TEXT, "
                    "value BLOB, PRIMARY KEY (path, size, mtime, version))"
                )
            except sqlite3.DatabaseError as e:
                raise FacellmError(
                    f"hash cache {self.path} is unusable ({e}); delete it or pass another --cache"
                ) from None

    def get_many(self, keys: list[tuple[str, int, int]]) -> dict[tuple[str, int, int], bytes]:
        if self._db is None or not keys:
            return {}
        found: dict[tuple[str, int, int], bytes] = {}
        cur = self._db.cursor()
        for i in range(0, len(keys), 300):  # 3 values a key: under SQLite's older limit of 999 variables
            chunk = keys[i : i + 300]
            q = " OR ".join(["(path=? AND size=? AND mtime=?)"] * len(chunk))
            args = [v for k in chunk for v in k]
            for path, size, mtime, value in cur.execute(
                f"SELECT path, size, mtime, value FROM sig WHERE version=? AND ({q})", [SIGNATURE_VERSION, *args]
            ):
                found[(path, size, mtime)] = value
        return found

    def put_many(self, rows: list[tuple[tuple[str, int, int], bytes]]) -> None:
        if self._db is None or not rows:
            return
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO sig VALUES (?, ?, ?, ?, ?)",
                [(k[0], k[1], k[2], SIGNATURE_VERSION, v) for k, v in rows],
            )

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


@dataclass
class Signatures:
    """Per image: structure hash as two uint64 words, chroma thumbnail, grayscale flag."""

    paths: list[str]
    words: np.ndarray  # (n, 2) uint64
    chroma: np.ndarray  # (n, 128) int16
    gray: np.ndarray  # (n,) bool
    unreadable: dict[str, str]
    hashed: int  # decoded this run (the rest came from the cache)


def compute_signatures(
    paths: Sequence[str],
    *,
    cache: HashCache | None = None,
    workers: int | None = None,
    reporter: Reporter = SILENT,
    label: str = "hashing",
) -> Signatures:
    """Signatures of ``paths`` (cached ones read back, the rest decoded, ``workers`` processes when > 1;
    None: :func:`default_workers` of the images to decode).

    Missing files are an error (a wrong image root would otherwise report "no overlap"); files that
    exist but cannot be decoded are skipped and returned in ``unreadable``.
    """

    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"{len(missing)} image(s) not found: {shown} (check the paths or --image-root)")
    keys: list[tuple[str, int, int]] = []
    for p in paths:
        st = os.stat(p)
        keys.append((os.path.abspath(p), st.st_size, st.st_mtime_ns))
    cached = cache.get_many(keys) if cache else {}
    todo = [i for i, k in enumerate(keys) if k not in cached]
    values: dict[int, bytes | str] = {i: cached[k] for i, k in enumerate(keys) if k in cached}
    total = len(paths)
    reporter.stage(label, total)
    reporter.advance(len(values))
    if todo:
        workers = default_workers(len(todo)) if workers is None else workers
        chunk = 256
        jobs = [[paths[i] for i in todo[s : s + chunk]] for s in range(0, len(todo), chunk)]
        idx = [todo[s : s + chunk] for s in range(0, len(todo), chunk)]
        if workers > 1 and len(jobs) > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: the caller may hold OpenMP threads (torch) that a forked child can deadlock on
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
                results: Iterable[list[bytes | str]] = pool.map(_sign_files, jobs)
                _gather(results, idx, values, keys, cache, reporter)
        else:
            _gather(map(_sign_files, jobs), idx, values, keys, cache, reporter)
    return signatures_from([values[i] for i in range(total)], list(paths), hashed=len(todo))


def signatures_from(values: Sequence[bytes | str], paths: Sequence[str], hashed: int = 0) -> Signatures:
    """Pack :func:`signature` bytes (or error texts, skipped) into arrays."""
    import numpy as np

    good = [i for i, v in enumerate(values) if isinstance(v, bytes)]
    unreadable = {paths[i]: str(v) for i, v in enumerate(values) if not isinstance(v, bytes)}
    blob = b"".join(v for v in values if isinstance(v, bytes))  # the values at `good`, in order
    raw = np.frombuffer(blob, dtype=np.uint8).reshape(len(good), _SIG_BYTES)
    words = np.ascontiguousarray(raw[:, :16]).view(">u8").astype(np.uint64).reshape(len(good), 2)
    chroma = raw[:, 16:].astype(np.int16)
    gray = np.asarray((np.abs(chroma - 128) <= GRAY_CHROMA).all(axis=1))  # (numpy types all(axis) as bool | array)
    return Signatures([paths[i] for i in good], words, chroma, gray, unreadable, hashed=hashed)


def default_workers(n: int) -> int:
    """Processes worth starting to decode ``n`` images: one per 2,000 (a process takes ~1 s to start), at most the
    usable CPUs or 8."""
    from ..runtime import worker_processes

    return worker_processes(n, per_process=2000)


def _gather(
    results: Iterable[list[bytes | str]],
    idx: list[list[int]],
    values: dict[int, bytes | str],
    keys: list[tuple[str, int, int]],
    cache: HashCache | None,
    reporter: Reporter,
) -> None:
    for chunk_idx, sigs in zip(idx, results, strict=True):
        rows: list[tuple[tuple[str, int, int], bytes]] = []
        for i, v in zip(chunk_idx, sigs, strict=True):
            values[i] = v
            if isinstance(v, bytes):
                rows.append((keys[i], v))
        if cache:
            cache.put_many(rows)
        reporter.advance(len(chunk_idx))


# ---------------------------------------------------------------- matching


def _popcount(x: np.ndarray) -> np.ndarray:
    import numpy as np

    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[np.ascontiguousarray(x).view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8)


def hamming_pairs(a: np.ndarray, b: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (i, j, distance) with Hamming(a[i], b[j]) <= max_distance over 128-bit rows, exactly, in numpy blocks.

    Blocks of ~1M pairs reuse preallocated buffers (8 MB of XOR words, 2 MB of counts), which keeps them in cache.
    """
    import numpy as np

    ii, jj, dd = [], [], []
    b0, b1 = b[:, 0][None, :], b[:, 1][None, :]
    rows = max(16, _BLOCK_PAIRS // max(1, len(b)))
    fast = hasattr(np, "bitwise_count")  # numpy >= 2.0
    x = np.empty((rows, len(b)), dtype=np.uint64)
    d = np.empty((rows, len(b)), dtype=np.uint8)
    d2 = np.empty_like(d)
    for s in range(0, len(a), rows):
        blk = a[s : s + rows]
        k = len(blk)
        if fast:
            np.bitwise_xor(blk[:, 0:1], b0, out=x[:k])
            np.bitwise_count(x[:k], out=d[:k])
            np.bitwise_xor(blk[:, 1:2], b1, out=x[:k])
            np.bitwise_count(x[:k], out=d2[:k])
            np.add(d[:k], d2[:k], out=d[:k])
        else:
            d[:k] = _popcount(blk[:, 0:1] ^ b0) + _popcount(blk[:, 1:2] ^ b1)
        i, j = np.nonzero(d[:k] <= max_distance)
        ii.append(i + s)
        jj.append(j)
        dd.append(d[i, j])
    if not ii:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return np.concatenate(ii), np.concatenate(jj), np.concatenate(dd).astype(np.int64)


def match(
    train: Signatures, bench: Signatures, max_distance: int, max_colour_distance: float
) -> list[tuple[int, int, int, float | None]]:
    """(train index, bench index, distance, colour distance or None when grayscale), closest first."""
    import numpy as np

    i, j, d = hamming_pairs(train.words, bench.words, max_distance)
    if len(i) == 0:
        return []
    colour = np.abs(train.chroma[i] - bench.chroma[j]).mean(axis=1)
    either_gray = train.gray[i] | bench.gray[j]
    keep = either_gray | (colour <= max_colour_distance)
    out = [
        (int(a), int(b), int(c), None if g else round(float(col), 2))
        for a, b, c, col, g in zip(i[keep], j[keep], d[keep], colour[keep], either_gray[keep], strict=True)
    ]
    out.sort(key=lambda t: (t[2], t[3] or 0.0, train.paths[t[0]], bench.paths[t[1]]))
    return out


# ---------------------------------------------------------------- report


@dataclass
class OverlapResult:
    """Matched pairs and what they touch in the benchmark."""

    pairs: list[dict[str, Any]]
    train_images: int
    bench_images: int
    bench_questions: int
    max_distance: int
    max_colour_distance: float
    by_task: dict[str, dict[str, int]]
    by_category: dict[str, dict[str, int]]
    unreadable: dict[str, str]
    seen_questions: set[str]
    matched_train: set[str]
    matched_bench: set[str]
    hashed: int
    elapsed_s: float
    sheet: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "train_images": self.train_images,
            "bench_images": self.bench_images,
            "bench_questions": self.bench_questions,
            "max_distance": self.max_distance,
            "max_colour_distance": self.max_colour_distance,
            "hash": SIGNATURE_VERSION,
            "matched_pairs": len(self.pairs),
            "matched_train_images": len(self.matched_train),
            "matched_bench_images": len(self.matched_bench),
            "questions_with_seen_images": len(self.seen_questions),
            "by_task": self.by_task,
            "by_category": self.by_category,
            "pairs": self.pairs,
            "unreadable": self.unreadable,
            "images_hashed_this_run": self.hashed,
            "elapsed_s": round(self.elapsed_s, 3),
            "contact_sheet": self.sheet,
        }


def find_overlap(
    train: Collection,
    bench: Collection,
    *,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    max_colour_distance: float = DEFAULT_MAX_COLOUR_DISTANCE,
    cache: HashCache | None = None,
    workers: int | None = None,
    reporter: Reporter = SILENT,
) -> OverlapResult:
    """Every (training image, benchmark image) pair within the thresholds, and the benchmark questions they touch."""
    if not 0 <= max_distance < HASH_BITS:
        raise FacellmError(
            f"--max-distance {max_distance}: must be between 0 and {HASH_BITS - 1} (bits of {HASH_BITS})"
        )
    if max_colour_distance < 0:
        raise FacellmError(f"--max-colour-distance {max_colour_distance}: must be >= 0")
    t0 = time.perf_counter()
    ts = compute_signatures(
        train.paths, cache=cache, workers=workers, reporter=reporter, label="hashing training images"
    )
    bs = compute_signatures(
        bench.paths, cache=cache, workers=workers, reporter=reporter, label="hashing benchmark images"
    )
    pairs: list[dict[str, Any]] = []
    seen: set[str] = set()
    matched_bench: set[str] = set()
    matched_train: set[str] = set()
    for ti, bi, dist, colour in match(ts, bs, max_distance, max_colour_distance):
        tpath, bpath = ts.paths[ti], bs.paths[bi]
        refs = bench.questions.get(bpath, [])
        pairs.append(
            {
                "train": tpath,
                "bench": bpath,
                "distance": dist,
                "colour_distance": colour,
                "questions": [r.id for r in refs],
                "tasks": sorted({r.task for r in refs}),
                "categories": sorted({r.category for r in refs}),
            }
        )
        seen.update(r.id for r in refs)
        matched_bench.add(bpath)
        matched_train.add(tpath)
    return OverlapResult(
        pairs=pairs,
        train_images=len(train.paths),
        bench_images=len(bench.paths),
        bench_questions=bench.n_questions,
        max_distance=max_distance,
        max_colour_distance=max_colour_distance,
        by_task=_counts(bench, seen, matched_bench, lambda r: r.task),
        by_category=_counts(bench, seen, matched_bench, lambda r: r.category),
        unreadable={**ts.unreadable, **bs.unreadable},
        seen_questions=seen,
        matched_train=matched_train,
        matched_bench=matched_bench,
        hashed=ts.hashed + bs.hashed,
        elapsed_s=time.perf_counter() - t0,
    )


def _counts(
    bench: Collection, seen: set[str], matched: set[str], key: Callable[[QuestionRef], str]
) -> dict[str, dict[str, int]]:
    """Per task (or category): questions, questions showing a matched image, matched images."""
    questions: Counter[str] = Counter()
    hit: Counter[str] = Counter()
    images: dict[str, set[str]] = {}
    for ref in bench.all_questions:
        questions[key(ref)] += 1
        if ref.id in seen:
            hit[key(ref)] += 1
    for path in matched:
        for ref in bench.questions.get(path, []):
            images.setdefault(key(ref), set()).add(path)
    return {
        k: {"questions": questions[k], "questions_seen": hit[k], "images_seen": len(images.get(k, ()))}
        for k in sorted(questions)
        if hit[k]
    }


def render_table(result: OverlapResult, show: int = 20) -> str:
    """Markdown: summary line, the closest pairs, and counts per category and task."""
    r = result
    lines = [
        f"{len(r.pairs)} matched pair(s): {len(r.matched_train)} of {r.train_images} training images match "
        f"{len(r.matched_bench)} of {r.bench_images} benchmark images"
        + (f", shown in {len(r.seen_questions)} of {r.bench_questions} questions" if r.bench_questions else "")
        + f" (distance <= {r.max_distance} of {HASH_BITS} bits, colour <= {r.max_colour_distance:g})",
    ]
    if r.pairs:
        lines += ["", "| distance | training image | benchmark image | questions |", "|---:|---|---|---|"]
        for p in r.pairs[:show]:
            qs = ", ".join(p["questions"][:3]) + (f" (+{len(p['questions']) - 3})" if len(p["questions"]) > 3 else "")
            lines.append(f"| {p['distance']} | {p['train']} | {p['bench']} | {qs or '-'} |")
        if len(r.pairs) > show:
            lines.append(f"| | ... {len(r.pairs) - show} more (--json for all) | | |")
    from ..eval.facexbench import category_display

    by_category = {category_display(k): v for k, v in r.by_category.items()}
    for title, table in (("category", by_category), ("task", r.by_task)):
        if table:
            lines += [
                "",
                f"| {title} | questions with a seen image | questions | images seen |",
                "|---|---:|---:|---:|",
            ]
            lines += [
                f"| {k} | {v['questions_seen']} | {v['questions']} | {v['images_seen']} |" for k, v in table.items()
            ]
    if r.unreadable:
        lines += ["", f"{len(r.unreadable)} image(s) could not be decoded and were skipped (listed in --json)."]
    return "\n".join(lines) + "\n"


def contact_sheet(pairs: Sequence[dict[str, Any]], path: str | Path, *, n: int = 12, thumb: int = 112) -> Path:
    """A PNG of the ``n`` closest pairs: training image left, benchmark image right, distance between."""
    from PIL import Image, ImageDraw

    chosen = list(pairs[:n])
    if not chosen:
        raise DataError("no matched pairs to draw; the contact sheet needs at least one")
    label_w, pad, text_h = 56, 6, 14
    row_h = thumb + text_h + pad
    width = pad + thumb + label_w + thumb + pad
    sheet = Image.new("RGB", (width, pad + row_h * len(chosen)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, p in enumerate(chosen):
        y = pad + k * row_h
        for x, src in ((pad, p["train"]), (pad + thumb + label_w, p["bench"])):
            img = open_image(src)
            img.thumbnail((thumb, thumb))
            sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
            draw.text((x, y + thumb + 1), Path(src).name[:18], fill=(60, 60, 60))
        draw.text((pad + thumb + 8, y + thumb // 2 - 6), f"d={p['distance']}", fill=(200, 30, 30))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return out


def overlap(cfg: OverlapConfig, reporter: Reporter = SILENT) -> OverlapResult:
    """``facellm data overlap``: collect both sides, match them, draw the contact sheet of the closest pairs."""
    _require_imagehash()
    train = collect(cfg.train, side="train", image_root=cfg.image_root)
    bench = collect(cfg.against, side="bench", image_root=cfg.image_root, facexbench_dir=cfg.data_dir)
    cache = HashCache(cfg.cache)
    try:
        result = find_overlap(
            train,
            bench,
            max_distance=cfg.max_distance,
            max_colour_distance=cfg.max_colour_distance,
            cache=cache,
            workers=cfg.workers,
            reporter=reporter,
        )
    finally:
        cache.close()
    if cfg.sheet and result.pairs:
        result.sheet = str(contact_sheet(result.pairs, cfg.sheet, n=cfg.sheet_pairs))
    return result


def seen_question_ids(
    questions: Sequence[MCQuestion],
    train_inputs: Sequence[str],
    *,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    max_colour_distance: float = DEFAULT_MAX_COLOUR_DISTANCE,
    cache_path: str | Path | None = None,
) -> OverlapResult:
    """The overlap of already-loaded benchmark questions with training data (used by ``evaluate --train-data``)."""
    _require_imagehash()
    bench = Collection(sources=["evaluated questions"])
    _add_questions(bench, questions)
    train = collect(train_inputs, side="train")
    cache = HashCache(cache_path)
    try:
        return find_overlap(
            train, bench, max_distance=max_distance, max_colour_distance=max_colour_distance, cache=cache
        )
    finally:
        cache.close()


def default_cache_path(env: dict[str, str]) -> Path:
    """Where signatures are cached: $FACELLM_HOME/cache, else $XDG_CACHE_HOME/facellm, else ~/.cache/facellm."""
    if env.get("FACELLM_HOME"):
        return Path(env["FACELLM_HOME"]).expanduser() / "cache" / "overlap-hashes.sqlite"
    base = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "facellm" / "overlap-hashes.sqlite"


# ---------------------------------------------------------------- build-dataset and evaluate hooks


def benchmark_matches(
    train_paths: Sequence[str], bench_inputs: Sequence[str], max_distance: int, cache_path: str | Path | None
) -> tuple[set[str], dict[str, Any]]:
    """Training images (of ``train_paths``) that match a benchmark image, and a summary for stats.json."""
    _require_imagehash()
    train = Collection(sources=["training images"])
    for p in train_paths:
        train.add(p)
    bench = collect(bench_inputs, side="bench")
    cache = HashCache(cache_path)
    try:
        res = find_overlap(train, bench, max_distance=max_distance, cache=cache)
    finally:
        cache.close()
    summary = {
        "against": list(bench_inputs),
        "max_distance": max_distance,
        "max_colour_distance": res.max_colour_distance,
        "hash": SIGNATURE_VERSION,
        "training_images_checked": res.train_images,
        "benchmark_images": res.bench_images,
        "images_dropped": len(res.matched_train),
        "matched_pairs": len(res.pairs),
        "by_category": res.by_category,
        "closest_pairs": res.pairs[:20],
    }
    return res.matched_train, summary


def overlap_report_section(summary: dict[str, Any]) -> str:
    """The report.md section of build-dataset --exclude-overlap-with."""
    lines = [
        "",
        "## Benchmark overlap",
        "",
        f"{summary['images_dropped']} of {summary['training_images_checked']} images matched one of "
        f"{summary['benchmark_images']} benchmark images ({', '.join(summary['against'])}; distance <= "
        f"{summary['max_distance']} of {HASH_BITS} bits) and were dropped with all their records.",
    ]
    if summary["closest_pairs"]:
        lines += ["", "| distance | training image | benchmark image |", "|---:|---|---|"]
        lines += [f"| {p['distance']} | {p['train']} | {p['bench']} |" for p in summary["closest_pairs"][:10]]
    return "\n".join(lines) + "\n"


def resolve_train_data(cfg: EvalConfig) -> list[str]:
    """``evaluate``'s training inputs; ``auto`` is the finetune run recorded next to the adapter (or model) evaluated."""
    if list(cfg.train_data) != ["auto"]:
        return list(cfg.train_data)
    tried = [] if cfg.endpoint is not None else [c for c in (cfg.model.adapter, cfg.model.model) if c]
    for cand in tried:
        if (Path(cand).expanduser() / "finetune_config.yaml").is_file():
            return [cand]
    where = ", ".join(tried) if tried else "an endpoint (no local run folder)"
    raise ConfigError(
        f"train_data: auto found no finetune_config.yaml (written by facellm finetune) in {where}; "
        "pass --train-data with the training data (folder, JSONL or run folder)"
    )


def check_train_data(cfg: EvalConfig) -> None:
    """Fail before any question is answered: the extra is missing or ``auto`` names no run."""
    _require_imagehash()
    resolve_train_data(cfg)


def add_unseen_split(
    results: dict[str, Any], records: Sequence[dict[str, Any]], questions: Sequence[MCQuestion], cfg: EvalConfig
) -> None:
    """Add ``results["unseen_in_training"]``: accuracy on all questions and on those whose images no training image
    matches, overall and per category (``evaluate --train-data``)."""
    from ..eval.report import build_results

    train_inputs = resolve_train_data(cfg)
    res = seen_question_ids(
        questions, train_inputs, max_distance=cfg.overlap_max_distance, cache_path=cfg.overlap_cache
    )
    seen = res.seen_questions
    unseen = build_results([r for r in records if r["id"] not in seen])
    by_key = {c["key"]: c for c in unseen["categories"]}
    results["unseen_in_training"] = {
        "train_data": train_inputs,
        "max_distance": cfg.overlap_max_distance,
        "hash": SIGNATURE_VERSION,
        "training_images": res.train_images,
        "questions_seen": len(seen),
        "overall": {"all": results["overall"], "unseen": unseen["overall"]},
        "categories": [
            {"key": c["key"], "name": c["name"], "all": _tally(c), "unseen": _tally(by_key.get(c["key"]))}
            for c in results["categories"]
        ],
        "seen_question_ids": sorted(seen),
    }


def _tally(c: dict[str, Any] | None) -> dict[str, Any]:
    if not c:
        return {"n": 0, "correct": 0, "accuracy": None, "unparseable": 0}
    return {k: c[k] for k in ("n", "correct", "accuracy", "unparseable") if k in c}


def unseen_markdown(split: dict[str, Any]) -> list[str]:
    """report.md lines: all questions vs questions whose images were not in the training data, per category."""

    def cell(t: dict[str, Any]) -> str:
        return "–" if not t.get("n") else f"{t['accuracy']:.2f} ({t['correct']}/{t['n']})"

    lines = [
        "",
        "## Questions whose images were not in training",
        "",
        f"{split['questions_seen']} question(s) show an image that matches one of {split['training_images']} "
        f"training images ({', '.join(split['train_data'])}; distance <= {split['max_distance']} of {HASH_BITS} bits).",
        "",
        "| | all questions: accuracy % (correct/n) | unseen images only |",
        "|---|---:|---:|",
        f"| **Overall** | {cell(split['overall']['all'])} | {cell(split['overall']['unseen'])} |",
    ]
    lines += [f"| {c['name']} | {cell(c['all'])} | {cell(c['unseen'])} |" for c in split["categories"]]
    return lines
