"""What annotate costs: image tokens as OpenAI bills them, prices per model, and the ``--dry-run`` estimate."""

from __future__ import annotations

import math

from ..config import AnnotateConfig
from ..errors import ImageError
from ..images import fit_within, open_image
from .run import AnnotateSummary, Plan, WorkImage


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


def price_for(cfg: AnnotateConfig, prompt_tokens: int, completion_tokens: int, *, batch: bool = False) -> float | None:
    """USD from the price table (exact model name, else the longest matching prefix); None when unknown."""
    model = cfg.endpoint.model
    price = cfg.prices.get(model)
    if price is None:
        matches = [k for k in cfg.prices if model.startswith(k)]
        price = cfg.prices[max(matches, key=len)] if matches else None
    if price is None:
        return None
    cost = (prompt_tokens * price.input + completion_tokens * price.output) / 1e6
    return round(cost * (cfg.batch_discount if batch else 1.0), 6)


def _estimate_image(cfg: AnnotateConfig, plan: Plan, w: WorkImage, summary: AnnotateSummary) -> None:
    from .prompts import render_aspect, render_grouped

    img = open_image(w.item.path)
    max_side = cfg.endpoint.max_image_side
    width, height = fit_within(img, max_side).size
    tokens = image_tokens(width, height, cfg.image_detail)
    ps = plan.prompt_set
    system_tokens = len(ps.system) // 4
    if cfg.mode == "per-aspect":
        texts = [render_aspect(ps, a, w.item.labels)[0] for a in w.pending]
    else:
        texts = [render_grouped(ps, w.pending, w.item.labels)]
    for text in texts:
        summary.requests += 1
        summary.image_tokens += tokens
        summary.prompt_tokens += system_tokens + len(text) // 4 + tokens
    summary.completion_tokens += cfg.expected_completion_tokens * len(w.pending)


def estimate(cfg: AnnotateConfig, plan: Plan, summary: AnnotateSummary) -> None:
    """Requests, tokens and cost the run would need (no re-asks or retries counted)."""
    if cfg.provider == "template":
        summary.cost_usd = 0.0
        return
    for w in plan.work:
        if not w.pending:
            continue
        try:
            _estimate_image(cfg, plan, w, summary)
        except ImageError as e:
            plan.problems.skip(str(e))
            summary.items_pending -= len(w.pending)
    summary.cost_usd = price_for(cfg, summary.prompt_tokens, summary.completion_tokens, batch=cfg.batch)
