"""``build_dataset(cfg)``: annotate JSONL / paper folders -> validated, leakage-free training sets.

Two passes over the inputs, so memory does not grow with the text of the corpus:

1. **Scan.** Every record is parsed and checked (text, image, duplicates).
   What is kept is small: per image its labels and validity, per record five
   integers (image, aspect, question hash, source, location) in packed arrays
   (24 bytes a record). Each unique image is read and fully decoded once.
2. **Write.** Splits are decided per image (or group) from that state; kept
   records are then re-read one image at a time, in a canonical order (image
   path, aspect, question hash), and streamed into the per-split files.

The canonical order makes the output independent of the order annotate wrote
its lines in (concurrent runs interleave them): the same records, images and
seed give byte-identical files. Everything is written into a private staging
folder and moved into place at the end, so an interrupted run leaves the old
outputs (or nothing) behind, never a half-written dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..config import DatasetConfig, dump_config
from ..errors import ConfigError, DataError, OutputExistsError
from ..reporting import SILENT, Reporter
from ..schema import SHAREGPT_TAGS, MCQuestion, TrainingRecord, format_mcq_prompt
from .manifest import MANIFEST_NAME, write_manifest
from .mcq import image_questions, label_values
from .readers import Problem, RawRecord, Source, open_sources, read_labels_csv
from .report import build_stats, render_report
from .splits import SPLITS, assign_splits
from .validate import NOT_ERRORS, REASONS, check_conversation, check_image, check_text

if TYPE_CHECKING:
    import numpy as np

CONFIG_NAME = "config.yaml"
OUTPUT_NAMES = (
    *(f"{s}.json" for s in SPLITS),
    *(f"{s}.jsonl" for s in SPLITS),
    *(f"mcq_{s}.jsonl" for s in SPLITS),
    "dataset_info.json",
    "stats.json",
    "report.md",
    CONFIG_NAME,
    MANIFEST_NAME,
)
# Label columns with more distinct values than this (ids, file names) get a count, not a balance table.
MAX_BALANCE_VALUES = 50


@dataclass
class BuildReport:
    """What build-dataset did: returned to the CLI, also the basis of ``--json``."""

    out_dir: str
    media_dir: str
    records_read: int
    qa_pairs: int
    images: int
    splits: dict[str, dict[str, int]]
    filtered: dict[str, int]
    files: list[str]
    dataset_names: list[str]
    elapsed_s: float
    stats: dict[str, Any] = field(repr=False, default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "out_dir": self.out_dir,
            "media_dir": self.media_dir,
            "records_read": self.records_read,
            "qa_pairs": self.qa_pairs,
            "images": self.images,
            "splits": self.splits,
            "filtered": self.filtered,
            "files": self.files,
            "dataset_names": self.dataset_names,
            "elapsed_s": round(self.elapsed_s, 3),
        }


class _Image:
    """Per-image state kept between the passes (small: labels and validity)."""

    __slots__ = ("labels", "bad")

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self.bad: str | None = None


def _question_key(question: str) -> int:
    """Hash of the question with case and whitespace folded: the duplicate key within one image."""
    norm = " ".join(question.split()).casefold().encode("utf-8")
    return int.from_bytes(hashlib.blake2b(norm, digest_size=8).digest(), "big")


def _excerpt(text: str, n: int = 60) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= n else flat[: n - 1] + "…")


class Scan:
    """Step 1's state: per image its labels and validity, per record five packed integers."""

    def __init__(self, cfg: DatasetConfig, root: Path, label_table: dict[str, dict[str, str]]) -> None:
        self.cfg = cfg
        self.root = root
        self.label_table = label_table
        self.images: dict[str, _Image] = {}
        self.image_names: list[str] = []
        self._image_index: dict[str, int] = {}
        self._resolved: dict[str, str | None] = {}
        self._root_str = str(root)
        self.aspects: dict[str, int] = {}
        self.aspect_names: list[str] = []
        self.rec_img = array("i")
        self.rec_aspect = array("i")
        self.rec_qhash = array("Q")
        self.rec_src = array("i")
        self.rec_loc = array("q")
        self.records_read = 0
        self.filtered: Counter[str] = Counter()
        self.filtered_images: Counter[str] = Counter()
        self.problems: list[str] = []
        self.n_problems = 0
        self.keep: Any = None  # numpy bool mask over the records: not a duplicate, not a benchmark image
        self.overlap: dict[str, Any] | None = None  # benchmark overlap summary (exclude_overlap_with)

    # -- helpers --
    def reject(self, reason: str, message: str | None) -> None:
        self.filtered[reason] += 1
        if reason in NOT_ERRORS or message is None:
            return
        self.n_problems += 1
        if len(self.problems) < self.cfg.max_errors_shown:
            self.problems.append(message)

    def resolve_image(self, raw: str) -> str | None:
        """Record image path -> posix path relative to the image root, or None when outside it.

        Relative paths are tried against the image root first, then against the
        working folder (annotate may have been given ``faces/x.jpg`` with the
        root ``faces``). Cached per distinct path string: per-image state.
        """
        if raw in self._resolved:
            return self._resolved[raw]
        s = raw.replace("\\", "/")
        chosen: str | None = None
        if os.path.isabs(s):
            chosen = self._inside(s)
        else:
            rel = os.path.normpath(s)
            if rel != ".." and not rel.startswith("../"):
                chosen = Path(rel).as_posix()
            if chosen is None or not (self.root / chosen).exists():
                via_cwd = self._inside(os.path.abspath(s))
                if via_cwd is not None:
                    # Read from the working folder the path lands inside the root: that reading wins, also for
                    # a missing file (``fairface/x.jpg`` with root ``fairface`` is not ``fairface/fairface/x.jpg``).
                    chosen = via_cwd
                elif os.path.exists(s):
                    chosen = None  # a real file, outside the root: say so, not "image not found"
        self._resolved[raw] = chosen
        return chosen

    def _inside(self, path: str) -> str | None:
        """Posix path of ``path`` relative to the root, or None when outside (symlinks resolved if needed)."""
        for p in (os.path.normpath(path), os.path.realpath(path)):
            rel = os.path.relpath(p, self._root_str)
            if rel != ".." and not rel.startswith("../") and not os.path.isabs(rel):
                return Path(rel).as_posix()
        return None

    def labels_for(self, rel: str, record_labels: dict[str, str]) -> dict[str, str]:
        base = self.label_table.get(rel) or self.label_table.get(os.path.splitext(rel)[0]) or {}
        merged = dict(base)
        for k, v in record_labels.items():
            if v.strip():
                merged[sys.intern(k)] = sys.intern(v.strip())
        return merged

    # -- the pass --
    def run(self, sources: list[Source], reporter: Reporter) -> None:
        for si, src in enumerate(sources):
            for loc, where, item in src.scan():
                self.records_read += 1
                if self.records_read % 2000 == 0:
                    reporter.advance(2000)
                if isinstance(item, Problem):
                    self.reject(item.reason, item.message)
                elif item.status != "ok":
                    self.reject("annotate_failed", None)
                else:
                    self._record(si, loc, where, item)

    def _record(self, si: int, loc: int, where: str, rec: RawRecord) -> None:
        """Check one record and index it when usable."""
        reason = check_text(rec.question, rec.answer, self.cfg.refusal_patterns)
        if reason:
            shown = rec.question if reason in ("empty_question", "image_token_in_text") else rec.answer
            self.reject(reason, f"{where}: {REASONS[reason]} (image {rec.image}): {_excerpt(shown)}")
            return
        rel = self.resolve_image(rec.image)
        if rel is None:
            exists = os.path.exists(rec.image)
            found = f" (the file exists at {os.path.abspath(rec.image)})" if exists else ""
            self.reject(
                "image_outside_root",
                f"{where}: image {rec.image} is outside the image root {self.root}{found}; "
                "pass an --image-root that contains it",
            )
            return
        if not self._image_usable(rel, rec, where):
            return
        aspect = self.aspects.get(rec.aspect)
        if aspect is None:
            aspect = self.aspects[rec.aspect] = len(self.aspect_names)
            self.aspect_names.append(rec.aspect)
        self.rec_img.append(self._image_index[rel])
        self.rec_aspect.append(aspect)
        self.rec_qhash.append(_question_key(rec.question))
        self.rec_src.append(si)
        self.rec_loc.append(loc)

    def _image_usable(self, rel: str, rec: RawRecord, where: str) -> bool:
        """Check an image the first time a record names it (later records reuse the verdict, merge labels)."""
        state = self.images.get(rel)
        if state is not None:
            if state.bad:
                self.reject(state.bad, None)  # counted; the image was reported with its first record
                return False
            for k, v in rec.labels.items():
                if v.strip() and k not in state.labels:
                    state.labels[sys.intern(k)] = sys.intern(v.strip())
            return True
        state = self.images[rel] = _Image(self.labels_for(rel, rec.labels))
        self._image_index[rel] = len(self.image_names)
        self.image_names.append(rel)
        bad = check_image(
            self.root / rel,
            expected_sha256=rec.image_sha256 if self.cfg.check_sha256 else None,
            max_pixels=self.cfg.max_pixels,
            max_bytes=int(self.cfg.max_image_mb * 1e6),
        )
        if bad:
            state.bad = bad[0]
            self.filtered_images[bad[0]] += 1
            hint = f"; {rec.image_hint}" if rec.image_hint else ""
            self.reject(bad[0], f"{where}: {bad[1]}: {self.root / rel}{hint}")
            return False
        return True

    def find_duplicates(self, sources: list[Source]) -> np.ndarray:
        """Mark every record whose (image, question) appeared earlier in input order; return the keep mask."""
        import numpy as np

        n = len(self.rec_img)
        keep = np.ones(n, dtype=bool)
        if n < 2:
            return keep
        img = np.frombuffer(self.rec_img, dtype=np.int32)
        qh = np.frombuffer(self.rec_qhash, dtype=np.uint64)
        src = np.frombuffer(self.rec_src, dtype=np.int32)
        loc = np.frombuffer(self.rec_loc, dtype=np.int64)
        order = np.lexsort((loc, src, qh, img))
        same = (img[order][1:] == img[order][:-1]) & (qh[order][1:] == qh[order][:-1])
        dup_positions = np.nonzero(same)[0] + 1
        if len(dup_positions) == 0:
            return keep
        keep[order[dup_positions]] = False
        # Report the first few with the record they repeat (error path only: re-read to name them).
        starts = np.concatenate(([True], ~same))
        group_first = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
        for pos in dup_positions[: self.cfg.max_errors_shown]:
            dup, first = int(order[pos]), int(order[group_first[pos]])
            dsrc, fsrc = sources[self.rec_src[dup]], sources[self.rec_src[first]]
            rec = dsrc.read_at(self.rec_loc[dup])
            self.n_problems += 1
            if len(self.problems) < self.cfg.max_errors_shown:
                self.problems.append(
                    f"{dsrc.describe(self.rec_loc[dup])}: {REASONS['duplicate']} "
                    f"({fsrc.describe(self.rec_loc[first])}) for image {self.image_names[self.rec_img[dup]]}: "
                    f"{_excerpt(rec.question)}"
                )
        extra = len(dup_positions) - min(len(dup_positions), self.cfg.max_errors_shown)
        self.n_problems += extra
        self.filtered["duplicate"] += len(dup_positions)
        return keep


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path is a file, not a folder: {out} (choose another --out)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder is not empty: {out} (choose another --out or pass --overwrite)")


def _need_column(column: str, option: str, seen: set[str]) -> None:
    if column not in seen:
        cols = ", ".join(sorted(seen)) or "none"
        raise ConfigError(
            f"{option} {column}: no kept image has a '{column}' label (label columns seen: {cols}); "
            "labels come from the records or a --labels CSV"
        )


class _SplitWriter:
    """Streams one split's ShareGPT JSON array, messages JSONL and MCQ JSONL."""

    def __init__(self, folder: Path, split: str, with_mcq: bool) -> None:
        self.sharegpt: IO[str] = open(folder / f"{split}.json", "w", encoding="utf-8")  # noqa: SIM115
        self.messages: IO[str] = open(folder / f"{split}.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        self.mcq: IO[str] | None = open(folder / f"mcq_{split}.jsonl", "w", encoding="utf-8") if with_mcq else None  # noqa: SIM115
        self.sharegpt.write("[")
        self._first = True
        self.conversations = 0

    def add(self, rid: str, pairs: list[tuple[str, str]], image: str) -> None:
        record = TrainingRecord.from_pairs(rid, pairs, image)
        sharegpt = record.to_sharegpt()
        check_conversation(sharegpt["conversations"], [image], where=f"conversation {rid}")
        self.sharegpt.write(("\n" if self._first else ",\n") + json.dumps(sharegpt, ensure_ascii=False))
        self._first = False
        self.messages.write(json.dumps(record.model_dump(mode="json"), ensure_ascii=False) + "\n")
        self.conversations += 1

    def add_mcq(self, q: MCQuestion) -> None:
        assert self.mcq is not None
        self.mcq.write(json.dumps(q.model_dump(mode="json"), ensure_ascii=False) + "\n")

    def abort(self) -> None:
        for f in (self.sharegpt, self.messages, self.mcq):
            if f is not None and not f.closed:
                f.close()

    def close(self) -> None:
        self.sharegpt.write("\n]\n")
        for f in (self.sharegpt, self.messages, self.mcq):
            if f is not None:
                f.close()


def _dataset_info(cfg: DatasetConfig) -> dict[str, Any]:
    return {
        f"{cfg.name}_{split}": {
            "file_name": f"{split}.json",
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "images": "images"},
            "tags": dict(SHAREGPT_TAGS),
        }
        for split in SPLITS
    }


def _finalize(staging: Path, out: Path) -> None:
    """Move the staged files into ``out``: one rename for a new folder, per-file replaces otherwise."""
    if not out.exists():
        os.rename(staging, out)
        return
    for name in OUTPUT_NAMES:
        if not (staging / name).exists():
            (out / name).unlink(missing_ok=True)  # stale output of an earlier run with other options
    for f in sorted(staging.iterdir()):
        os.replace(f, out / f.name)
    staging.rmdir()


# ---------------------------------------------------------------- step 1: scan


def scan_records(
    cfg: DatasetConfig,
    root: Path,
    sources: list[Source],
    label_table: dict[str, dict[str, str]] | None = None,
    reporter: Reporter = SILENT,
) -> Scan:
    """Read and check every record once; drop duplicates (and benchmark images when asked).

    Raises DataError listing the invalid records (unless ``skip_invalid``) or when nothing usable is left.
    """
    scan = Scan(cfg, root, label_table or {})
    reporter.stage("reading records")
    scan.run(sources, reporter)
    reporter.advance(scan.records_read % 2000)
    scan.keep = scan.find_duplicates(sources)
    if cfg.exclude_overlap_with:
        scan.overlap = _drop_benchmark_overlap(scan, scan.keep, root, cfg)
    if scan.n_problems and not cfg.skip_invalid:
        raise _invalid_records_error(scan)
    if not scan.keep.any():
        raise DataError(
            f"no usable records in {', '.join(cfg.inputs)} ({scan.records_read} read; "
            f"filtered: {dict(sorted(scan.filtered.items())) or 'none'})"
        )
    return scan


def _invalid_records_error(scan: Scan) -> DataError:
    shown = len(scan.problems)
    invalid = sum(n for reason, n in scan.filtered.items() if reason not in NOT_ERRORS)
    more = f"; first {shown} problems listed" if scan.n_problems > shown else ""
    bad_images = sum(scan.filtered_images.values())
    # An unusable image is listed once, with its first record; its other records count too.
    images = f" ({bad_images} unusable image(s), each listed once)" if invalid > scan.n_problems else ""
    head = f"{invalid} invalid records{images}{more}; fix them or pass --skip-invalid to drop and count them:"
    return DataError("\n".join([head, *scan.problems]))


# ---------------------------------------------------------------- step 2: plan splits


@dataclass
class Kept:
    """The kept records' packed fields (numpy arrays, one entry per record, scan order)."""

    img: Any
    aspect: Any
    qhash: Any
    src: Any
    loc: Any


@dataclass
class SplitPlan:
    """Which images are kept, the split of each, the values MCQs draw from, and the order records are written in."""

    kept_images: list[str]
    unit_of: dict[str, str]
    split_of_unit: dict[str, str]
    mcq_values: dict[str, list[str]]
    records: Kept
    order: Any  # indexes into ``records`` in canonical order (image path, aspect, question hash, input position)

    def split_of(self, rel: str) -> str:
        return self.split_of_unit[self.unit_of[rel]]

    def units_per_split(self) -> Counter[str]:
        return Counter(self.split_of_unit[u] for u in set(self.unit_of.values()))


def plan_splits(cfg: DatasetConfig, scan: Scan) -> SplitPlan:
    """Assign every kept image (or its group) to a split; raise ConfigError when a named label column is unusable."""
    import numpy as np

    keep = scan.keep
    kept = Kept(
        img=np.frombuffer(scan.rec_img, dtype=np.int32)[keep],
        aspect=np.frombuffer(scan.rec_aspect, dtype=np.int32)[keep],
        qhash=np.frombuffer(scan.rec_qhash, dtype=np.uint64)[keep],
        src=np.frombuffer(scan.rec_src, dtype=np.int32)[keep],
        loc=np.frombuffer(scan.rec_loc, dtype=np.int64)[keep],
    )
    kept_images = sorted({scan.image_names[i] for i in np.unique(kept.img).tolist()})
    labels = {rel: scan.images[rel].labels for rel in kept_images}
    _check_label_columns(cfg, labels)
    unit_of: dict[str, str] = {}
    unit_stratum: dict[str, str] = {}
    for rel, lab in labels.items():
        unit = f"group:{lab[cfg.group_key]}" if cfg.group_key and lab.get(cfg.group_key) else f"image:{rel}"
        unit_of[rel] = unit
        unit_stratum.setdefault(unit, lab.get(cfg.stratify, "") if cfg.stratify else "")
    return SplitPlan(
        kept_images=kept_images,
        unit_of=unit_of,
        split_of_unit=assign_splits(unit_stratum, cfg.split, cfg.seed),
        mcq_values=label_values(cfg.mcq, labels.values()),
        records=kept,
        order=_canonical_order(scan, kept),
    )


def _check_label_columns(cfg: DatasetConfig, labels: dict[str, dict[str, str]]) -> None:
    seen: set[str] = set()
    for lab in labels.values():
        seen.update(lab)
    for col in cfg.mcq:
        _need_column(col, "--mcq", seen)
    if cfg.group_key:
        _need_column(cfg.group_key, "--group-key", seen)
    if cfg.stratify:
        _need_column(cfg.stratify, "--stratify", seen)


def _canonical_order(scan: Scan, kept: Kept) -> Any:
    """Record order independent of input order: image path, aspect name, question hash, then input position."""
    import numpy as np

    def ranks(names: list[str]) -> Any:
        rank = np.empty(max(1, len(names)), dtype=np.int64)
        rank[sorted(range(len(names)), key=names.__getitem__)] = np.arange(len(names))
        return rank

    name_rank, aspect_rank = ranks(scan.image_names), ranks(scan.aspect_names)
    return np.lexsort((kept.loc, kept.src, kept.qhash, aspect_rank[kept.aspect], name_rank[kept.img]))


# ---------------------------------------------------------------- step 3: write splits


def write_splits(
    cfg: DatasetConfig,
    scan: Scan,
    plan: SplitPlan,
    sources: list[Source],
    out: Path,
    reporter: Reporter = SILENT,
) -> tuple[dict[str, Any], list[str]]:
    """Write every split and its metadata into a staging folder, then move it to ``out``; (stats, file names)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.building-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    writers: dict[str, _SplitWriter] = {}
    try:
        for s in SPLITS:
            writers[s] = _SplitWriter(staging, s, bool(cfg.mcq))
        acc = _RecordWriter(cfg, scan, plan, sources, writers).run(reporter)
        stats = _write_metadata(cfg, scan, plan, acc, staging, out)
        files = sorted(p.name for p in staging.iterdir())
        _finalize(staging, out)
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return stats, files


def _image_groups(img: Any, order: Any) -> Iterator[list[int]]:
    """Runs of ``order`` that share an image (``order`` sorts by image first)."""
    group: list[int] = []
    prev = -1
    for chunk in range(0, len(order), 65536):  # chunks: no Python int list as long as the corpus
        for j in order[chunk : chunk + 65536].tolist():
            cur = int(img[j])
            if cur != prev and group:
                yield group
                group = []
            group.append(j)
            prev = cur
    if group:
        yield group


class _RecordWriter:
    """Re-reads the kept records one image at a time and writes its conversations and questions to its split."""

    def __init__(
        self, cfg: DatasetConfig, scan: Scan, plan: SplitPlan, sources: list[Source], writers: dict[str, _SplitWriter]
    ) -> None:
        self.cfg, self.scan, self.plan, self.sources, self.writers = cfg, scan, plan, sources, writers
        self.acc = _Accumulator()

    def run(self, reporter: Reporter) -> _Accumulator:
        reporter.stage("writing images", len(self.plan.kept_images))
        done = 0
        for done, group in enumerate(_image_groups(self.plan.records.img, self.plan.order), 1):
            self.image(group)
            if done % 500 == 0:
                reporter.advance(500)
        reporter.advance(done % 500)
        for s in SPLITS:
            self.writers[s].close()
            self.acc.conversations[s] = self.writers[s].conversations
        return self.acc

    def _read(self, group: list[int]) -> list[RawRecord]:
        k = self.plan.records
        recs = [self.sources[int(k.src[j])].read_at(int(k.loc[j])) for j in group]
        for j, r in zip(group, recs, strict=True):
            if _question_key(r.question) != int(k.qhash[j]):  # the input changed between the passes
                where = self.sources[int(k.src[j])].describe(int(k.loc[j]))
                raise DataError(f"{where}: changed while build-dataset was reading it; run again")
        return recs

    def image(self, group: list[int]) -> None:
        rel = self.scan.image_names[int(self.plan.records.img[group[0]])]
        labels = self.scan.images[rel].labels
        split = self.plan.split_of(rel)
        recs = self._read(group)
        pairs = [(r.question.strip(), r.answer.strip()) for r in recs]
        self.acc.image(split, labels)
        for r, (_, a) in zip(recs, pairs, strict=True):
            self.acc.qa(split, r.aspect, a)
        if self.cfg.qa:  # otherwise validated and counted, but only the multiple-choice conversations are written
            self._conversations(self.writers[split], rel, recs, pairs)
        self._questions(split, rel, labels)

    def _conversations(self, w: _SplitWriter, rel: str, recs: list[RawRecord], pairs: list[tuple[str, str]]) -> None:
        if self.cfg.merge_aspects:
            w.add(rel, pairs, rel)
            return
        used: Counter[str] = Counter()
        for r, pair in zip(recs, pairs, strict=True):
            used[r.aspect] += 1
            rid = f"{rel}#{r.aspect}" + (f"-{used[r.aspect]}" if used[r.aspect] > 1 else "")
            w.add(rid, [pair], rel)

    def _questions(self, split: str, rel: str, labels: dict[str, str]) -> None:
        cfg = self.cfg
        questions, missing = image_questions(
            rel,
            labels,
            self.plan.mcq_values,
            seed=cfg.seed,
            max_options=cfg.mcq_max_options,
            option_order=cfg.mcq_option_order,
        )
        self.acc.mcq_skipped.update(missing)
        w = self.writers[split]
        for q in questions:
            w.add_mcq(q)
            self.acc.mcq[split] += 1
            if split == "train" and cfg.mcq_train:
                w.add(q.id, [(format_mcq_prompt(q), q.answer)], rel)
                self.acc.mcq_train += 1


def _write_metadata(
    cfg: DatasetConfig, scan: Scan, plan: SplitPlan, acc: _Accumulator, staging: Path, out: Path
) -> dict[str, Any]:
    """dataset_info.json, stats.json, report.md, the resolved config and the manifest; returns the stats."""
    stats = build_stats(
        cfg=cfg,
        media_dir=str(scan.root),
        records_read=scan.records_read,
        filtered=scan.filtered,
        filtered_images=scan.filtered_images,
        acc=acc,
        units_per_split=plan.units_per_split(),
        group_key=cfg.group_key,
        max_balance_values=MAX_BALANCE_VALUES,
    )
    _write_json(staging / "dataset_info.json", _dataset_info(cfg))
    report_md = render_report(stats, cfg)
    if scan.overlap is not None:
        from .overlap import overlap_report_section

        stats["benchmark_overlap"] = scan.overlap
        report_md += overlap_report_section(scan.overlap)
    _write_json(staging / "stats.json", stats)
    (staging / "report.md").write_text(report_md, encoding="utf-8")
    dump_config(cfg, staging / CONFIG_NAME)
    write_manifest(staging, out, scan.root)
    return stats


# ---------------------------------------------------------------- the three steps


def build_dataset(cfg: DatasetConfig, reporter: Reporter = SILENT) -> BuildReport:
    """Build the dataset described by ``cfg`` into ``cfg.out``; raise DataError naming invalid records."""
    t0 = time.perf_counter()
    assert cfg.image_root and cfg.out  # guaranteed by DatasetConfig's validator
    root_given = Path(cfg.image_root).expanduser()
    if not root_given.is_dir():
        raise DataError(f"image root not found: {cfg.image_root} (check --image-root)")
    root = root_given.resolve()
    out = Path(cfg.out).expanduser()
    _check_out(out, cfg.overwrite)
    label_table, _ = read_labels_csv(Path(cfg.labels), cfg.labels_image_column) if cfg.labels else ({}, [])

    sources = open_sources(cfg.inputs, root)
    try:
        scan = scan_records(cfg, root, sources, label_table, reporter)
        plan = plan_splits(cfg, scan)
        stats, files = write_splits(cfg, scan, plan, sources, out, reporter)
    finally:
        for source in sources:
            source.close()

    return BuildReport(
        out_dir=str(out.resolve()),
        media_dir=str(root),
        records_read=scan.records_read,
        qa_pairs=int(len(plan.order)),
        images=len(plan.kept_images),
        splits=stats["splits"],
        filtered=dict(stats["filtered"]["records"]),
        files=files,
        dataset_names=list(_dataset_info(cfg)),
        elapsed_s=time.perf_counter() - t0,
        stats=stats,
    )


def _drop_benchmark_overlap(scan: Scan, keep: Any, root: Path, cfg: DatasetConfig) -> dict[str, Any]:
    """Mark the records of images that match a benchmark image as filtered ("benchmark_overlap")."""
    import numpy as np

    from .overlap import benchmark_matches

    good = [rel for rel in scan.image_names if not scan.images[rel].bad]
    found, summary = benchmark_matches(
        [str(root / rel) for rel in good], cfg.exclude_overlap_with, cfg.overlap_max_distance, cfg.overlap_cache
    )
    drop = np.array([str(root / rel) in found for rel in scan.image_names] or [False], dtype=bool)
    rec_drop = drop[np.frombuffer(scan.rec_img, dtype=np.int32)] & keep
    if rec_drop.any():
        scan.filtered["benchmark_overlap"] += int(rec_drop.sum())
        scan.filtered_images["benchmark_overlap"] += len(found)
        keep &= ~rec_drop
    return summary


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


class _Accumulator:
    """Streaming statistics: counters only, no per-record lists."""

    def __init__(self) -> None:
        self.images: Counter[str] = Counter()
        self.qa_pairs: Counter[str] = Counter()
        self.conversations: dict[str, int] = {}
        self.aspects: Counter[str] = Counter()
        self.aspects_per_split: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
        self.answer_words: Counter[int] = Counter()
        self.answer_chars: Counter[int] = Counter()
        self.labels: dict[str, dict[str, Counter[str]]] = {s: {} for s in SPLITS}
        self.label_columns: set[str] = set()
        self.mcq: Counter[str] = Counter()
        self.mcq_skipped: Counter[str] = Counter()
        self.mcq_train = 0

    def image(self, split: str, labels: dict[str, str]) -> None:
        self.images[split] += 1
        self.label_columns.update(labels)
        for col, value in labels.items():
            self.labels[split].setdefault(col, Counter())[value] += 1

    def qa(self, split: str, aspect: str, answer: str) -> None:
        self.qa_pairs[split] += 1
        self.aspects[aspect] += 1
        self.aspects_per_split[split][aspect] += 1
        self.answer_words[len(answer.split())] += 1
        self.answer_chars[len(answer)] += 1
