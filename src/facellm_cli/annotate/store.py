"""An annotate output on disk: reading it, appending to it, settling its failures sidecar, locking it.

The output holds exactly one answer record per (image_sha256, aspect), so anyone
can read it directly (pandas, ``datasets``, training scripts). Pairs that failed
(refusals, HTTP errors, ...) are written with their reasons to a sidecar,
``<out>.failures.jsonl``; resume reads both, retries the failures, and a pair that
later succeeds is dropped from the sidecar at the end of that run. A torn last
line left by a killed run is cut when the file is opened for appending, and a
lock file stops two runs appending to the same output.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import DataError, OutputExistsError
from ..io import JsonlAppender, atomic_write_text, read_jsonl
from ..schema import Annotation


def failures_path_for(out: str | Path) -> Path:
    """annotations.jsonl -> annotations.failures.jsonl, next to the output."""
    out = Path(out)
    return out.with_name(out.stem + ".failures.jsonl")


def _read_records(p: Path) -> Iterator[Annotation]:
    if not p.exists():
        return
    for lineno, rec in read_jsonl(p):
        try:
            yield Annotation.model_validate(rec)
        except ValueError as e:
            raise DataError(f"{p} line {lineno}: not an annotation record ({e}); fix or delete that line") from None


def read_annotations(path: str | Path) -> dict[tuple[str, str], Annotation]:
    """The record that counts for each (image_sha256, aspect): its answer, else its last failure.

    Failures come from the sidecar (and, for outputs of older versions, from
    ``failed`` lines in the output itself).
    """
    out: dict[tuple[str, str], Annotation] = {}
    p = Path(path)
    for a in [*_read_records(p), *_read_records(failures_path_for(p))]:
        key = (a.image_sha256, a.aspect)
        prev = out.get(key)
        if prev is None or a.status == "ok" or prev.status != "ok":
            out[key] = a
    return out


def done_pairs(path: str | Path) -> set[tuple[str, str]]:
    """Pairs with an answer in the output (what a resumed run skips)."""
    return {(a.image_sha256, a.aspect) for a in _read_records(Path(path)) if a.status == "ok"}


class AnnotationWriter:
    """Appends answers to the output and failures to its sidecar (opened on the first failure).

    Each record is one flushed line, so a killed run loses at most the line it was writing.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self._ok = JsonlAppender(out)
        self._failed: JsonlAppender | None = None

    def write(self, record: Annotation) -> None:
        if record.status == "ok":
            self._ok.write(record.model_dump(mode="json"))
            return
        if self._failed is None:
            self._failed = JsonlAppender(failures_path_for(self.out))
        self._failed.write(record.model_dump(mode="json"))

    def close(self) -> None:
        self._ok.close()
        if self._failed is not None:
            self._failed.close()

    def __enter__(self) -> AnnotationWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def settle_failures(out: Path) -> int:
    """Leave the answers alone in the output and the unanswered pairs (their last failure) in the sidecar.

    Returns how many pairs are still unanswered. Called at the end of a run, under the
    output lock. Outputs of older versions held ``failed`` lines among the answers:
    those move to the sidecar here. Every rewrite is atomic and the sidecar is written
    first, so a kill at any point loses neither answers nor failure reasons.
    """
    sidecar = failures_path_for(out)
    legacy: list[Annotation] = []
    done: set[tuple[str | None, str | None]] = set()  # (image_sha256, aspect) of the answered lines
    if out.exists():
        for _, rec in read_jsonl(out):  # plain JSON: the records were validated when the run read them
            if rec.get("status", "ok") == "ok":
                done.add((rec.get("image_sha256"), rec.get("aspect")))
            else:
                legacy.append(Annotation.model_validate(rec))
    last: dict[tuple[str, str], Annotation] = {}
    for a in [*legacy, *_read_records(sidecar)]:
        if (a.image_sha256, a.aspect) not in done:
            last[(a.image_sha256, a.aspect)] = a
    if last:
        text = "".join(json.dumps(a.model_dump(mode="json"), ensure_ascii=False) + "\n" for a in last.values())
        atomic_write_text(sidecar, text)
    else:
        sidecar.unlink(missing_ok=True)
    if legacy:
        kept = [line for _, line in _raw_lines(out) if json.loads(line).get("status", "ok") == "ok"]
        atomic_write_text(out, "".join(kept))
    return len(last)


def _raw_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text with its newline) of every complete, non-blank line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.endswith("\n") and line.strip():
                yield lineno, line


def config_path_for(out: Path) -> Path:
    """annotations.jsonl -> annotations.config.yaml, next to the output."""
    return out.with_name(out.stem + ".config.yaml")


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<out>.lock`` so two runs never append to one file.

    The kernel drops the lock when the process dies, so a killed run never leaves it stale.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one writer is the user's job there
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.with_name(out.name + ".lock")
    with open(lock_path, "w") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputExistsError(
                f"another facellm annotate is writing {out} (lock {lock_path} is held); "
                "wait for it or choose another --out"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
