"""The resumable annotate run: images x aspects -> an append-only JSONL of ``Annotation`` records.

Resume works from the output files alone (see :mod:`.store`): every pair with an
answer is done and skipped, so re-running the same command after a crash (even
``kill -9``; a torn last line is cut on open) continues where it stopped. Within
a run each pending pair is scheduled exactly once, and a lock file stops two runs
appending to the same output, so answers are never duplicated.

This module only builds the :class:`~.run.Run` and hands it to one strategy:
``strategies.template`` (labels only), ``strategies.live`` (requests) or
``strategies.batch`` (the Batch API).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..config import AnnotateConfig, dump_config
from ..errors import OutputExistsError
from ..reporting import SILENT, Reporter
from .pricing import estimate, price_for
from .run import AnnotateSummary, ProgressState, Run, finish, make_plan, new_summary
from .store import config_path_for, failures_path_for, output_lock, read_annotations, settle_failures

__all__ = ["annotate", "read_annotations"]


def _strategy(cfg: AnnotateConfig) -> Callable[[Run], None]:
    if cfg.provider == "template":
        from .strategies import template

        return template.run
    if cfg.batch:
        from .strategies import batch

        return batch.run
    from .strategies import live

    return live.run


def annotate(
    cfg: AnnotateConfig,
    *,
    api_key: str | None = None,
    dry_run: bool = False,
    reporter: Reporter = SILENT,
) -> AnnotateSummary:
    """Run (or estimate) an annotate job; returns the summary. The API key is used, never stored."""
    started = time.monotonic()
    out = Path(cfg.out)
    if out.exists() and out.is_dir():
        raise OutputExistsError(f"--out {out} is a folder; give a .jsonl file path such as {out / 'annotations.jsonl'}")
    plan = make_plan(cfg, out)
    if dry_run:
        summary = new_summary(cfg, out, plan, dry_run=True, config_file=None)
        estimate(cfg, plan, summary)
        return finish(summary, plan.problems, started)

    with output_lock(out):
        config_file = dump_config(cfg, config_path_for(out))
        summary = new_summary(cfg, out, plan, dry_run=False, config_file=config_file)
        state = ProgressState(total=summary.items_pending)
        _strategy(cfg)(Run(cfg, out, plan, summary, state, api_key=api_key, reporter=reporter))
        summary.failures_outstanding = settle_failures(out)
        if summary.failures_outstanding:
            summary.failures = str(failures_path_for(out))
    summary.cost_usd = price_for(cfg, summary.prompt_tokens, summary.completion_tokens, batch=cfg.batch)
    if cfg.provider == "template":
        summary.cost_usd = 0.0
    return finish(summary, plan.problems, started)
