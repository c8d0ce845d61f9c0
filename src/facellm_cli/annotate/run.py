"""What one annotate run is: its plan (images x aspects still to do), its counters, and the ``Run`` handed to a strategy.

A strategy (``strategies/template``, ``strategies/live``, ``strategies/batch``)
takes a :class:`Run` and fills the output through :mod:`.store`; ``pipeline``
builds the run, picks the strategy and settles the output afterwards.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..config import AnnotateConfig
from ..errors import DataError
from ..images import file_sha256
from ..reporting import SILENT, Reporter
from ..schema import Annotation, FaceRef, Usage
from .labels import ImageItem, Problems, collect_inputs
from .prompts import AspectTemplate, PromptSet, load_prompt_set
from .store import read_annotations

MAX_PROBLEMS_SHOWN = 20


@dataclass
class ProgressState:
    """Live counters of a run; :meth:`Run.report` passes them to the reporter."""

    total: int = 0
    done: int = 0
    failed: int = 0
    in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


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

    def reject(self, kind: str) -> None:
        """Count an answer thrown away (refusal, empty, malformed) before it is re-asked."""
        self.rejected[kind] = self.rejected.get(kind, 0) + 1


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


def _crop_faces_first(cfg: AnnotateConfig, out: Path) -> AnnotateConfig:
    """Crop the photos; the chips' manifest then lists the images, as --labels would."""
    from ..faces import crop_files

    manifest = crop_files(cfg.images, Path(cfg.faces_dir or f"{out}.faces"), cfg.face_crop).manifest
    return cfg.model_copy(
        update={"images": [], "labels": str(manifest), "labels_image_column": None, "image_root": None}
    )


def make_plan(cfg: AnnotateConfig, out: Path) -> Plan:
    """Join inputs, hash images, drop duplicates and pairs already done."""
    prompt_set = load_prompt_set(cfg.prompts)
    aspects = prompt_set.select(cfg.aspects) if cfg.provider == "openai" else list(prompt_set.aspects)
    if cfg.faces:
        cfg = _crop_faces_first(cfg, out)
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
    seen: dict[str, str] = {}
    work: list[WorkImage] = []
    for item, sha in zip(inputs.items, _hash_all(inputs.items), strict=True):
        if sha is None:
            problems.skip(f"cannot read image: {item.path}")
        elif sha in seen:
            problems.append(f"duplicate image skipped: {item.path} (same bytes as {seen[sha]})")
        else:
            seen[sha] = str(item.path)
            pending = [] if cfg.provider == "template" else [a for a in aspects if (sha, a.key) not in done_ok]
            work.append(WorkImage(item, sha, pending))
    items_total = len(work) * len(aspects)
    done_before = sum(1 for w in work for a in aspects if (w.sha, a.key) in done_ok)
    if cfg.provider == "template":
        done_before = sum(1 for (sha, _a) in done_ok if sha in seen)
    return Plan(prompt_set, aspects, work, len(work), items_total, done_before, problems, failed_before)


@dataclass
class Run:
    """One annotate invocation as a strategy sees it: config, output, plan, counters and progress."""

    cfg: AnnotateConfig
    out: Path
    plan: Plan
    summary: AnnotateSummary
    state: ProgressState
    api_key: str | None = None
    reporter: Reporter = SILENT
    _counted: int = field(default=-1, init=False)
    _total: int = field(default=-1, init=False)

    @property
    def problems(self) -> Problems:
        return self.plan.problems

    def report(self) -> None:
        """Pass the live counters to the reporter: the items done since the last report, and the rest as status."""
        st = self.state
        if st.total != self._total:  # the first report, or a re-ask round that added items: a fresh count
            self.reporter.stage("annotating", st.total)
            self._counted, self._total = 0, st.total
        tokens = st.prompt_tokens + st.completion_tokens
        self.reporter.advance(st.done - self._counted, failed=st.failed, in_flight=st.in_flight, tokens=tokens)
        self._counted = st.done

    def add_usage(self, prompt_tokens: int, completion_tokens: int, image_tokens: int) -> None:
        self.summary.prompt_tokens += prompt_tokens
        self.summary.completion_tokens += completion_tokens
        self.summary.image_tokens += image_tokens
        self.state.prompt_tokens += prompt_tokens
        self.state.completion_tokens += completion_tokens

    def answer_record(
        self,
        *,
        image: str,
        sha: str,
        labels: dict[str, str],
        face: FaceRef | dict[str, Any] | None,
        aspect: AspectTemplate,
        answer: str,
        error: str | None,
        usage: tuple[int, int],
        attempts: int,
    ) -> Annotation:
        """One endpoint answer (``error`` None) or failure, as the record the store keeps."""
        ok = error is None
        return Annotation(
            image=image,
            image_sha256=sha,
            aspect=aspect.key,
            question=aspect.question.format(name=aspect.name),
            answer=answer if ok else "",
            status="ok" if ok else "failed",
            error=error,
            model=self.cfg.endpoint.model,
            provider="openai",
            prompt_version=self.plan.prompt_set.version,
            labels=labels,
            face=face,
            usage=Usage(prompt_tokens=usage[0], completion_tokens=usage[1]),
            attempts=attempts,
            created=now_iso(),
        )


def new_summary(
    cfg: AnnotateConfig, out: Path, plan: Plan, *, dry_run: bool, config_file: Path | None
) -> AnnotateSummary:
    return AnnotateSummary(
        out=str(out),
        config=str(config_file) if config_file else None,
        provider=cfg.provider,
        mode=cfg.mode,
        model="template" if cfg.provider == "template" else cfg.endpoint.model,
        prompt_version=plan.prompt_set.version,
        dry_run=dry_run,
        batch=cfg.batch,
        images=plan.images,
        items_total=plan.items_total,
        items_done_before=plan.done_before,
        items_pending=sum(len(w.pending) for w in plan.work),
        failed_before=plan.failed_before,
    )


def finish(summary: AnnotateSummary, problems: Problems, started: float) -> AnnotateSummary:
    summary.problems_total = len(problems)
    summary.problems = problems[:MAX_PROBLEMS_SHOWN]
    summary.images_skipped = problems.skipped
    summary.wall_s = round(time.monotonic() - started, 3)
    return summary
