"""The resumable annotate run: images x aspects -> an append-only JSONL of ``Annotation`` records.

The output holds exactly one answer record per (image_sha256, aspect), so anyone
can read it directly (pandas, ``datasets``, training scripts). Pairs that failed
(refusals, HTTP errors, ...) are written with their reasons to a sidecar,
``<out>.failures.jsonl``; resume reads both, retries the failures, and a pair that
later succeeds is dropped from the sidecar at the end of that run.

Resume works from those files alone: every pair with an answer is done and
skipped, so re-running the same command after a crash (even ``kill -9``; a torn
last line is cut on open) continues where it stopped. Within a run each pending
pair is scheduled exactly once, and a lock file stops two runs appending to the
same output, so answers are never duplicated.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..config import AnnotateConfig, dump_config
from ..errors import DataError, ImageError, OutputExistsError
from ..images import encode_data_uri, file_sha256, fit_within, open_image
from ..io import JsonlAppender, atomic_write_text, read_jsonl
from ..schema import Annotation, Usage
from .labels import ImageItem, Problems, collect_inputs
from .prompts import AspectTemplate, PromptSet, load_prompt_set

MAX_PROBLEMS_SHOWN = 20


# ---- reading an output ------------------------------------------------------------------------


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
    done: set[tuple[str, str]] = set()
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


# ---- images ------------------------------------------------------------------------------------


def image_tokens(width: int, height: int, detail: str = "auto") -> int:
    """Prompt tokens OpenAI's gpt-4o family bills for one image (85 base + 170 per 512px tile)."""
    if detail == "low":
        return 85
    w, h = float(width), float(height)
    s = min(1.0, 2048.0 / max(w, h))
    w, h = w * s, h * s
    s = min(1.0, 768.0 / min(w, h))
    w, h = w * s, h * s
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


@dataclass
class EncodedImage:
    data_uri: str
    width: int
    height: int
    tokens: int


def encode_image(path: Path, max_side: int | None, detail: str) -> EncodedImage:
    """Validate (decode) the image, then send the original JPEG/PNG bytes when they fit, else a resized JPEG.

    Sending the file's own bytes keeps the exact pixels the labels were made for
    and costs no re-encoding; only oversized or exotic formats are re-encoded.
    """
    img = open_image(path)
    w, h = img.size
    fits = not max_side or max(w, h) <= max_side
    head = path.read_bytes()[:8] if fits else b""
    if fits and head.startswith(b"\xff\xd8\xff"):
        uri = "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    elif fits and head.startswith(b"\x89PNG"):
        uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    else:
        img = fit_within(img, max_side)
        w, h = img.size
        uri = encode_data_uri(img, "JPEG")
    return EncodedImage(uri, w, h, image_tokens(w, h, detail))


def build_messages(system: str, text: str, image: EncodedImage, detail: str) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": system},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": image.data_uri, "detail": detail}},
            ],
        },
    ]


# ---- grouped answers ---------------------------------------------------------------------------


def parse_grouped(text: str | None, keys: list[str]) -> dict[str, str | None]:
    """JSON object (bare, or fenced/embedded in text) -> {key: answer or None}. Raises ValueError when malformed."""
    from pydantic import ConfigDict, ValidationError, create_model

    if text is None:
        raise ValueError("no content")
    s = text.strip()
    start, end = s.find("{"), s.rfind("}")
    if start == -1 or end <= start:
        raise ValueError("no JSON object in the answer")
    data = json.loads(s[start : end + 1])
    if not isinstance(data, dict):
        raise ValueError("answer is not a JSON object")
    model = create_model(  # type: ignore[call-overload]
        "GroupedAnswers", __config__=ConfigDict(extra="ignore"), **{k: (str | None, None) for k in keys}
    )
    try:
        parsed = model.model_validate(data)
    except ValidationError as e:
        raise ValueError(f"answer does not match the schema ({e.error_count()} problems)") from None
    return {k: getattr(parsed, k) for k in keys}


# ---- run state ---------------------------------------------------------------------------------


@dataclass
class ProgressState:
    """Live counters shared with the progress display (read-only for it)."""

    total: int = 0
    done: int = 0
    failed: int = 0
    in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    phase: str = "starting"


@dataclass
class AnnotateSummary:
    out: str
    config: str | None
    provider: str
    mode: str
    model: str
    prompt_version: str
    dry_run: bool = False
    batch: bool = False
    images: int = 0
    images_skipped: int = 0
    items_total: int = 0
    items_done_before: int = 0
    items_pending: int = 0
    written_ok: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    reasks: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    image_tokens: int = 0
    cost_usd: float | None = None
    wall_s: float = 0.0
    batch_ids: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    problems_total: int = 0
    failed_before: int = 0
    failures: str | None = None
    failures_outstanding: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def price_for(cfg: AnnotateConfig, prompt_tokens: int, completion_tokens: int, *, batch: bool = False) -> float | None:
    """USD from the price table (exact model name, else the longest matching prefix); None when unknown."""
    price = cfg.prices.get(cfg.model)
    if price is None:
        matches = [k for k in cfg.prices if cfg.model.startswith(k)]
        price = cfg.prices[max(matches, key=len)] if matches else None
    if price is None:
        return None
    cost = (prompt_tokens * price.input + completion_tokens * price.output) / 1e6
    return round(cost * (cfg.batch_discount if batch else 1.0), 6)


@dataclass
class WorkImage:
    item: ImageItem
    sha: str
    pending: list[AspectTemplate]


@dataclass
class Plan:
    """What a run has to do, after joining labels, hashing and reading the output."""

    prompt_set: PromptSet
    aspects: list[AspectTemplate]
    work: list[WorkImage]
    images: int
    items_total: int
    done_before: int
    problems: Problems
    failed_before: int = 0


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _hash_all(items: list[ImageItem]) -> list[str | None]:
    def one(item: ImageItem) -> str | None:
        try:
            return file_sha256(item.path)
        except OSError:
            return None

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, items))


def make_plan(cfg: AnnotateConfig, out: Path) -> Plan:
    """Join inputs, hash images, drop duplicates and pairs already done."""
    prompt_set = load_prompt_set(cfg.prompts)
    aspects = prompt_set.select(cfg.aspects) if cfg.provider == "openai" else list(prompt_set.aspects)
    if cfg.faces:  # crop the photos first; the chips' manifest then lists the images, as --labels would
        from ..faces import crop_files

        manifest = crop_files(cfg.images, Path(cfg.faces_dir or f"{out}.faces"), cfg.face_crop).manifest
        cfg = cfg.model_copy(
            update={"images": [], "labels": str(manifest), "labels_image_column": None, "image_root": None}
        )
    inputs = collect_inputs(
        cfg.images,
        cfg.labels,
        image_column=cfg.labels_image_column,
        ignore=cfg.label_ignore,
        image_root=cfg.image_root,
        label_values=prompt_set.label_values,
    )
    problems = inputs.problems
    if not inputs.items:
        first = f" ({problems[0]})" if problems else ""
        where = " ".join(cfg.images) if cfg.images else str(cfg.labels)
        raise DataError(f"no images to annotate in: {where}{first}; give image files, folders or globs")
    done = read_annotations(out)
    done_ok = {k for k, a in done.items() if a.status == "ok"}
    failed_before = sum(1 for a in done.values() if a.status != "ok")
    hashes = _hash_all(inputs.items)
    seen: dict[str, str] = {}
    work: list[WorkImage] = []
    for item, sha in zip(inputs.items, hashes, strict=True):
        if sha is None:
            problems.skip(f"cannot read image: {item.path}")
            continue
        if sha in seen:
            problems.append(f"duplicate image skipped: {item.path} (same bytes as {seen[sha]})")
            continue
        seen[sha] = str(item.path)
        if cfg.provider == "template":
            work.append(WorkImage(item, sha, []))
        else:
            work.append(WorkImage(item, sha, [a for a in aspects if (sha, a.key) not in done_ok]))
    items_total = len(work) * len(aspects)
    done_before = sum(1 for w in work for a in aspects if (w.sha, a.key) in done_ok)
    if cfg.provider == "template":
        done_before = sum(1 for (sha, _a) in done_ok if sha in seen)
    return Plan(prompt_set, aspects, work, len(work), items_total, done_before, problems, failed_before)


def _summary(cfg: AnnotateConfig, out: Path, plan: Plan, *, dry_run: bool, config_file: Path | None) -> AnnotateSummary:
    return AnnotateSummary(
        out=str(out),
        config=str(config_file) if config_file else None,
        provider=cfg.provider,
        mode=cfg.mode,
        model="template" if cfg.provider == "template" else cfg.model,
        prompt_version=plan.prompt_set.version,
        dry_run=dry_run,
        batch=cfg.batch,
        images=plan.images,
        items_total=plan.items_total,
        items_done_before=plan.done_before,
        items_pending=sum(len(w.pending) for w in plan.work),
        failed_before=plan.failed_before,
    )


def _finish(summary: AnnotateSummary, problems: Problems, started: float) -> AnnotateSummary:
    summary.problems_total = len(problems)
    summary.problems = problems[:MAX_PROBLEMS_SHOWN]
    summary.images_skipped = problems.skipped
    summary.wall_s = round(time.monotonic() - started, 3)
    return summary


# ---- entry point -------------------------------------------------------------------------------


def annotate(
    cfg: AnnotateConfig,
    *,
    api_key: str | None = None,
    dry_run: bool = False,
    on_progress: Callable[[ProgressState], None] | None = None,
) -> AnnotateSummary:
    """Run (or estimate) an annotate job; returns the summary. The API key is used, never stored."""
    started = time.monotonic()
    out = Path(cfg.out)
    if out.exists() and out.is_dir():
        raise OutputExistsError(f"--out {out} is a folder; give a .jsonl file path such as {out / 'annotations.jsonl'}")
    plan = make_plan(cfg, out)
    problems = plan.problems
    if dry_run:
        summary = _summary(cfg, out, plan, dry_run=True, config_file=None)
        _estimate(cfg, plan, summary, problems)
        return _finish(summary, problems, started)

    with output_lock(out):
        config_file = dump_config(cfg, config_path_for(out))
        summary = _summary(cfg, out, plan, dry_run=False, config_file=config_file)
        state = ProgressState(total=summary.items_pending)
        if cfg.provider == "template":
            _run_template(cfg, out, plan, summary, state, problems, on_progress)
        elif cfg.batch:
            from .batch import run_batch

            assert api_key is not None
            run_batch(cfg, out, plan, summary, state, problems, api_key=api_key, on_progress=on_progress)
        else:
            assert api_key is not None
            asyncio.run(_run_live(cfg, out, plan, summary, state, problems, api_key, on_progress))
        summary.failures_outstanding = settle_failures(out)
        if summary.failures_outstanding:
            summary.failures = str(failures_path_for(out))
    summary.cost_usd = price_for(cfg, summary.prompt_tokens, summary.completion_tokens, batch=cfg.batch)
    if cfg.provider == "template":
        summary.cost_usd = 0.0
    return _finish(summary, problems, started)


def _estimate(cfg: AnnotateConfig, plan: Plan, summary: AnnotateSummary, problems: Problems) -> None:
    """Requests, tokens and cost the run would need (no re-asks or retries counted)."""
    if cfg.provider == "template":
        summary.cost_usd = 0.0
        return
    from .prompts import render_aspect, render_grouped

    ps = plan.prompt_set
    system_tokens = len(ps.system) // 4
    for w in plan.work:
        if not w.pending:
            continue
        try:
            img = open_image(w.item.path)
        except ImageError as e:
            problems.skip(str(e))
            summary.items_pending -= len(w.pending)
            continue
        width, height = img.size
        if cfg.max_image_side and max(width, height) > cfg.max_image_side:
            width, height = fit_within(img, cfg.max_image_side).size
        tokens = image_tokens(width, height, cfg.image_detail)
        if cfg.mode == "per-aspect":
            for a in w.pending:
                summary.requests += 1
                summary.image_tokens += tokens
                summary.prompt_tokens += system_tokens + len(render_aspect(ps, a, w.item.labels)[0]) // 4 + tokens
        else:
            summary.requests += 1
            summary.image_tokens += tokens
            summary.prompt_tokens += system_tokens + len(render_grouped(ps, w.pending, w.item.labels)) // 4 + tokens
        summary.completion_tokens += cfg.expected_completion_tokens * len(w.pending)
    summary.cost_usd = price_for(cfg, summary.prompt_tokens, summary.completion_tokens, batch=cfg.batch)


def _run_template(
    cfg: AnnotateConfig,
    out: Path,
    plan: Plan,
    summary: AnnotateSummary,
    state: ProgressState,
    problems: Problems,
    on_progress: Callable[[ProgressState], None] | None,
) -> None:
    from .template import TEMPLATE_VERSION, template_qa

    done_ok = done_pairs(out)
    wanted = set(cfg.aspects) if cfg.aspects else None
    unlabelled = 0
    summary.items_total = 0
    summary.prompt_version = TEMPLATE_VERSION
    state.phase = "writing"
    todo: list[tuple[WorkImage, list[Any]]] = []
    for w in plan.work:
        try:
            open_image(w.item.path)
        except ImageError as e:
            problems.skip(str(e))
            continue
        qas = [qa for qa in template_qa(w.item.labels, plan.prompt_set) if wanted is None or qa.aspect in wanted]
        if not qas:
            unlabelled += 1
        summary.items_total += len(qas)
        todo.append((w, [qa for qa in qas if (w.sha, qa.aspect) not in done_ok]))
    state.total = sum(len(qas) for _, qas in todo)
    with AnnotationWriter(out) as writer:
        for w, qas in todo:
            for qa in qas:
                record = Annotation(
                    image=w.item.name,
                    image_sha256=w.sha,
                    aspect=qa.aspect,
                    question=qa.question,
                    answer=qa.answer,
                    model="template",
                    provider="template",
                    prompt_version=TEMPLATE_VERSION,
                    labels=w.item.labels,
                    face=w.item.face,
                    attempts=1,
                    created=now_iso(),
                )
                writer.write(record)
                summary.written_ok += 1
                state.done += 1
            if on_progress:
                on_progress(state)
    summary.items_pending = summary.written_ok
    if unlabelled:
        problems.append(
            f"{unlabelled} image(s) have no usable labels, so the template provider wrote nothing for them "
            "(give --labels)"
        )


# ---- live requests -----------------------------------------------------------------------------


class _ImageCache:
    """Each image is decoded and encoded once, shared by its aspects, and freed when they are done."""

    def __init__(self, cfg: AnnotateConfig) -> None:
        self.cfg = cfg
        self._tasks: dict[str, asyncio.Future[EncodedImage]] = {}
        self._refs: dict[str, int] = {}

    def add_refs(self, sha: str, n: int) -> None:
        self._refs[sha] = self._refs.get(sha, 0) + n

    async def get(self, w: WorkImage) -> EncodedImage:
        fut = self._tasks.get(w.sha)
        if fut is None:
            fut = asyncio.ensure_future(
                asyncio.to_thread(encode_image, w.item.path, self.cfg.max_image_side, self.cfg.image_detail)
            )
            self._tasks[w.sha] = fut
        return await asyncio.shield(fut)

    def release(self, sha: str) -> None:
        self._refs[sha] -= 1
        if self._refs[sha] <= 0:
            self._refs.pop(sha, None)
            self._tasks.pop(sha, None)


class _LiveRun:
    def __init__(
        self,
        cfg: AnnotateConfig,
        plan: Plan,
        summary: AnnotateSummary,
        state: ProgressState,
        problems: Problems,
        writer: AnnotationWriter,
        client: Any,
    ) -> None:
        self.cfg = cfg
        self.ps = plan.prompt_set
        self.summary = summary
        self.state = state
        self.problems = problems
        self.writer = writer
        self.client = client
        self.images = _ImageCache(cfg)
        self.structured = cfg.structured_output != "text"
        self.bad_images: set[str] = set()

    def _reject(self, kind: str) -> None:
        self.summary.rejected[kind] = self.summary.rejected.get(kind, 0) + 1

    def _write(
        self,
        w: WorkImage,
        aspect: AspectTemplate,
        answer: str,
        *,
        ok: bool,
        error: str | None,
        usage: tuple[int, int],
        attempts: int,
    ) -> None:
        record = Annotation(
            image=w.item.name,
            image_sha256=w.sha,
            aspect=aspect.key,
            question=aspect.question.format(name=aspect.name),
            answer=answer if ok else "",
            status="ok" if ok else "failed",
            error=error,
            model=self.cfg.model,
            provider="openai",
            prompt_version=self.ps.version,
            labels=w.item.labels,
            face=w.item.face,
            usage=Usage(prompt_tokens=usage[0], completion_tokens=usage[1]),
            attempts=attempts,
            created=now_iso(),
        )
        self.writer.write(record)
        self.state.done += 1
        if ok:
            self.summary.written_ok += 1
        else:
            self.summary.failed += 1
            self.state.failed += 1

    async def _image(self, w: WorkImage) -> EncodedImage | None:
        try:
            return await self.images.get(w)
        except ImageError as e:
            if w.sha not in self.bad_images:
                self.bad_images.add(w.sha)
                self.problems.skip(str(e))
            return None

    def _account(self, prompt_tokens: int, completion_tokens: int, image: EncodedImage) -> None:
        self.summary.prompt_tokens += prompt_tokens
        self.summary.completion_tokens += completion_tokens
        self.summary.image_tokens += image.tokens
        self.state.prompt_tokens += prompt_tokens
        self.state.completion_tokens += completion_tokens

    async def per_aspect(self, w: WorkImage, aspect: AspectTemplate) -> None:
        from .client import RequestFailed, classify_answer
        from .prompts import render_aspect

        try:
            image = await self._image(w)
            if image is None:
                self.state.total -= 1
                return
            prompt, _question = render_aspect(self.ps, aspect, w.item.labels)
            messages = build_messages(self.ps.system, prompt, image, self.cfg.image_detail)
            used = [0, 0]
            reason = "no answer"
            for ask in range(self.cfg.max_reasks + 1):
                if ask:
                    self.summary.reasks += 1
                try:
                    result = await self.client.chat(messages)
                except RequestFailed as e:
                    reason = str(e)
                    break
                used[0] += result.prompt_tokens
                used[1] += result.completion_tokens
                self._account(result.prompt_tokens, result.completion_tokens, image)
                problem = (
                    "malformed"
                    if result.malformed
                    else classify_answer(result.text, self.cfg.refusal_patterns, self.cfg.min_answer_chars)
                )
                if problem is None:
                    self._write(
                        w,
                        aspect,
                        (result.text or "").strip(),
                        ok=True,
                        error=None,
                        usage=(used[0], used[1]),
                        attempts=ask + 1,
                    )
                    return
                self._reject(problem)
                reason = f"{problem} answer" + (f" ({result.malformed})" if result.malformed else "")
            self._write(w, aspect, "", ok=False, error=reason, usage=(used[0], used[1]), attempts=ask + 1)
        finally:
            self.images.release(w.sha)

    async def grouped(self, w: WorkImage) -> None:
        from .client import RequestFailed, classify_answer
        from .prompts import grouped_json_schema, render_grouped

        try:
            image = await self._image(w)
            if image is None:
                self.state.total -= len(w.pending)
                return
            remaining = list(w.pending)
            answers: dict[str, str] = {}
            used: dict[str, list[int]] = {a.key: [0, 0] for a in remaining}
            asks: dict[str, int] = {a.key: 0 for a in remaining}
            reasons: dict[str, str] = {}
            ask = 0
            while remaining and ask <= self.cfg.max_reasks:
                structured = self.structured
                text = render_grouped(self.ps, remaining, w.item.labels)
                messages = build_messages(self.ps.system, text, image, self.cfg.image_detail)
                rf = grouped_json_schema(remaining) if structured else None
                if ask:
                    self.summary.reasks += 1
                for a in remaining:
                    asks[a.key] += 1
                try:
                    result = await self.client.chat(messages, response_format=rf)
                except RequestFailed as e:
                    if structured and e.status == 400 and self.cfg.structured_output == "auto":
                        self.structured = False  # endpoint has no structured outputs: JSON-in-text from now on
                        for a in remaining:
                            asks[a.key] -= 1
                        continue
                    for a in remaining:
                        reasons[a.key] = str(e)
                    break
                self._account(result.prompt_tokens, result.completion_tokens, image)
                share_p, share_c = result.prompt_tokens // len(remaining), result.completion_tokens // len(remaining)
                for i, a in enumerate(remaining):  # split the request's usage so records sum to the total
                    used[a.key][0] += share_p + (result.prompt_tokens % len(remaining) if i == 0 else 0)
                    used[a.key][1] += share_c + (result.completion_tokens % len(remaining) if i == 0 else 0)
                try:
                    if result.malformed:
                        raise ValueError(result.malformed)
                    parsed = parse_grouped(result.text, [a.key for a in remaining])
                except ValueError as e:
                    self._reject("malformed")
                    for a in remaining:
                        reasons[a.key] = f"malformed answer ({e})"
                    ask += 1
                    continue
                still = []
                for a in remaining:
                    value = parsed.get(a.key)
                    problem = classify_answer(value, self.cfg.refusal_patterns, self.cfg.min_answer_chars)
                    if problem is None:
                        answers[a.key] = (value or "").strip()
                    else:
                        self._reject(problem)
                        reasons[a.key] = f"{problem} answer"
                        still.append(a)
                remaining = still
                ask += 1
            for a in w.pending:
                ok = a.key in answers
                self._write(
                    w,
                    a,
                    answers.get(a.key, ""),
                    ok=ok,
                    error=None if ok else reasons.get(a.key, "no answer"),
                    usage=(used[a.key][0], used[a.key][1]),
                    attempts=max(1, asks[a.key]),
                )
        finally:
            self.images.release(w.sha)


async def _run_live(
    cfg: AnnotateConfig,
    out: Path,
    plan: Plan,
    summary: AnnotateSummary,
    state: ProgressState,
    problems: Problems,
    api_key: str,
    on_progress: Callable[[ProgressState], None] | None,
) -> None:
    from .client import ChatClient

    client = ChatClient(
        api_key=api_key,
        base_url=cfg.base_url,
        model=cfg.model,
        concurrency=cfg.concurrency,
        rpm=cfg.rpm,
        max_retries=cfg.max_retries,
        timeout=cfg.timeout_s,
        backoff_base=cfg.backoff_base,
        backoff_max=cfg.backoff_max,
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
    )
    state.phase = "annotating"
    try:
        with AnnotationWriter(out) as writer:
            run = _LiveRun(cfg, plan, summary, state, problems, writer, client)
            jobs: asyncio.Queue[Any] = asyncio.Queue(maxsize=cfg.concurrency * 2)
            n_workers = cfg.concurrency * 2  # workers sleeping in backoff must not starve the endpoint

            async def producer() -> None:
                for w in plan.work:
                    if not w.pending:
                        continue
                    if cfg.mode == "per-aspect":
                        run.images.add_refs(w.sha, len(w.pending))
                        for a in w.pending:
                            await jobs.put((w, a))
                    else:
                        run.images.add_refs(w.sha, 1)
                        await jobs.put((w, None))
                for _ in range(n_workers):
                    await jobs.put(None)

            async def worker() -> None:
                while True:
                    job = await jobs.get()
                    if job is None:
                        return
                    w, a = job
                    if a is None:
                        await run.grouped(w)
                    else:
                        await run.per_aspect(w, a)

            async def ticker() -> None:
                while True:
                    state.in_flight = client.stats.in_flight
                    if on_progress:
                        on_progress(state)
                    await asyncio.sleep(0.1)

            tasks = [asyncio.create_task(producer())] + [asyncio.create_task(worker()) for _ in range(n_workers)]
            tick = asyncio.create_task(ticker())
            try:
                done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    if t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
            finally:
                for t in [*tasks, tick]:
                    t.cancel()
                await asyncio.gather(*tasks, tick, return_exceptions=True)
            state.in_flight = 0
            if on_progress:
                on_progress(state)
    finally:
        summary.requests = client.stats.requests
        summary.retries = client.stats.retries
        await client.aclose()
