"""``stats.json`` and ``report.md`` for a built dataset.

Only counters go in (no per-record lists), and nothing time- or
machine-dependent besides the image root, so two runs on the same inputs give
the same bytes.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from ..schema import IMAGE_PLACEHOLDER
from .splits import SPLITS
from .validate import NOT_ERRORS, REASONS

if TYPE_CHECKING:
    from ..config import DatasetConfig
    from .build import _Accumulator

MISSING = "(missing)"


def distribution(counts: Counter[int]) -> dict[str, float | int]:
    """min / p10 / p50 / p90 / max / mean of a histogram (exact, nearest-rank percentiles)."""
    total = sum(counts.values())
    if not total:
        return {"count": 0}
    keys = sorted(counts)

    def pct(p: float) -> int:
        target = max(1, -(-total * p // 100))  # ceil(total * p / 100)
        run = 0
        for k in keys:
            run += counts[k]
            if run >= target:
                return k
        return keys[-1]

    mean = sum(k * c for k, c in counts.items()) / total
    return {
        "count": total,
        "min": keys[0],
        "p10": pct(10),
        "p50": pct(50),
        "p90": pct(90),
        "max": keys[-1],
        "mean": round(mean, 2),
    }


def build_stats(
    *,
    cfg: DatasetConfig,
    media_dir: str,
    records_read: int,
    filtered: Counter[str],
    filtered_images: Counter[str],
    acc: _Accumulator,
    units_per_split: Counter[str],
    group_key: str | None,
    max_balance_values: int,
) -> dict[str, Any]:
    splits = {
        s: {
            "images": acc.images[s],
            "groups": units_per_split[s],
            "qa_pairs": acc.qa_pairs[s],
            "conversations": acc.conversations.get(s, 0),
            "mcq": acc.mcq[s],
        }
        for s in SPLITS
    }
    return {
        "media_dir": media_dir,
        "records_read": records_read,
        "qa_pairs": sum(acc.qa_pairs.values()),
        "images": sum(acc.images.values()),
        "splits": splits,
        "aspects": dict(sorted(acc.aspects.items())),
        "aspects_per_split": {s: dict(sorted(acc.aspects_per_split[s].items())) for s in SPLITS},
        "answer_words": distribution(acc.answer_words),
        "answer_chars": distribution(acc.answer_chars),
        "filtered": {
            "records": dict(sorted(filtered.items())),
            "images": dict(sorted(filtered_images.items())),
        },
        "mcq": {
            "labels": list(cfg.mcq),
            "per_split": {s: acc.mcq[s] for s in SPLITS},
            "in_training_files": acc.mcq_train,
            "images_without_label": dict(sorted(acc.mcq_skipped.items())),
        },
        "label_balance": _label_balance(acc, group_key, max_balance_values),
    }


def _label_balance(acc: _Accumulator, group_key: str | None, max_values: int) -> dict[str, dict[str, Any]]:
    """Per label column, images per value per split; a count only for the group column and many-valued ones."""
    balance: dict[str, dict[str, Any]] = {}
    for col in sorted(acc.label_columns):
        values: set[str] = set()
        for s in SPLITS:
            values.update(acc.labels[s].get(col, {}))
        if col == group_key or len(values) > max_values:
            balance[col] = {"distinct_values": len(values), "note": "too many values for a balance table"}
            continue
        per_split: dict[str, dict[str, int]] = {}
        for s in SPLITS:
            c = acc.labels[s].get(col, Counter())
            row = {v: c[v] for v in sorted(values)}
            missing = acc.images[s] - sum(c.values())
            if missing:
                row[MISSING] = missing
            per_split[s] = row
        balance[col] = per_split
    return balance


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _pct(n: int, total: int) -> str:
    return f"{n} ({100 * n / total:.1f}%)" if total else str(n)


def render_report(stats: dict[str, Any], cfg: DatasetConfig) -> str:
    """A short markdown summary of ``stats`` for people."""
    out = [
        "# facellm dataset",
        "",
        f"{stats['qa_pairs']} question-answer pairs over {stats['images']} images "
        f"({stats['records_read']} records read; seed {cfg.seed}; split {','.join(f'{r:g}' for r in cfg.split)}; "
        f"{'aspects merged per image' if cfg.merge_aspects else 'one QA pair per conversation'}).",
    ]
    sections = [_splits_section, _usage_section, _aspects_section, _lengths_section, _filtered_section]
    if cfg.mcq:
        sections.append(_mcq_section)
    sections.append(_balance_section)
    for section in sections:
        out += ["", *section(stats, cfg)]
    return "\n".join(out).rstrip() + "\n"


def _splits_section(stats: dict[str, Any], cfg: DatasetConfig) -> list[str]:
    sp = stats["splits"]
    return ["## Splits", ""] + _table(
        ["split", "images", "groups", "QA pairs", "conversations", "MCQs"],
        [[s, *(sp[s][k] for k in ("images", "groups", "qa_pairs", "conversations", "mcq"))] for s in SPLITS],
    )


def _usage_section(stats: dict[str, Any], cfg: DatasetConfig) -> list[str]:
    out = [
        "## Using it",
        "",
        "Image paths in every file are relative to the image root:",
        "",
        f"    media_dir: {stats['media_dir']}",
        "",
        "- LLaMA-Factory: copy or point `dataset_dir` at this folder (it has `dataset_info.json`), use "
        f"`dataset: {cfg.name}_train` and pass `media_dir: {stats['media_dir']}`.",
        "- 🤗 datasets / `facellm finetune`: `train.jsonl`, `val.jsonl`, `test.jsonl` "
        f"(`{{id, messages, images}}`, `{IMAGE_PLACEHOLDER}` placeholders in the user text).",
    ]
    if cfg.mcq:
        out.append("- `facellm evaluate`: `mcq_test.jsonl` with `--image-root " + stats["media_dir"] + "`.")
    return out


def _aspects_section(stats: dict[str, Any], cfg: DatasetConfig) -> list[str]:
    return ["## Records per aspect", ""] + _table(
        ["aspect", "total", *SPLITS],
        [[a, n, *(stats["aspects_per_split"][s].get(a, 0) for s in SPLITS)] for a, n in stats["aspects"].items()],
    )


def _lengths_section(stats: dict[str, Any], cfg: DatasetConfig) -> list[str]:
    keys = ["min", "p10", "p50", "p90", "max", "mean"]
    rows = [[unit, *(stats[f"answer_{unit}"].get(k, "-") for k in keys)] for unit in ("words", "chars")]
    return ["## Answer length", ""] + _table(["unit", *keys], rows)


def _filtered_section(stats: dict[str, Any], cfg: DatasetConfig) -> list[str]:
    filtered = stats["filtered"]["records"]
    if not filtered:
        return ["## Filtered", "", "Nothing filtered."]
    return ["## Filtered", ""] + _table(
        ["reason", "records", "images", "meaning"],
        [
            [r, n, stats["filtered"]["images"].get(r, ""), REASONS.get(r, r) + (" (skipped)" * (r in NOT_ERRORS))]
            for r, n in filtered.items()
        ],
    )


def _mcq_section(stats: dict[str, Any], cfg: DatasetConfig) -> list[str]:
    m = stats["mcq"]
    out = [
        "## Multiple choice",
        "",
        f"Labels {', '.join(m['labels'])}: "
        + ", ".join(f"{s} {m['per_split'][s]}" for s in SPLITS)
        + f"; {m['in_training_files']} train MCQs added to the training files.",
    ]
    if m["images_without_label"]:
        out.append(f"Images without the label (no question): {m['images_without_label']}.")
    return out


def _balance_section(stats: dict[str, Any], cfg: DatasetConfig) -> list[str]:
    out = ["## Label balance per split (images)", ""]
    if not stats["label_balance"]:
        out.append("No labels (give them in the records or with --labels).")
    sp = stats["splits"]
    for col, per_split in stats["label_balance"].items():
        out += [f"### {col}", ""]
        if "distinct_values" in per_split:
            out += [f"{per_split['distinct_values']} distinct values (no table).", ""]
            continue
        values = list(dict.fromkeys(v for s in SPLITS for v in per_split[s]))
        out += _table(
            ["value", *SPLITS],
            [[v, *(_pct(per_split[s].get(v, 0), sp[s]["images"]) for s in SPLITS)] for v in values],
        )
        out.append("")
    return out
