"""Aggregate predictions into accuracies and write them as results.json, report.md and a bar chart.

Accuracies are question-weighted, as FaceXBench's ``aggregate_results.py``
computes them: a category's accuracy is its correct answers over its
questions, the overall accuracy is all correct answers over all questions (not
a mean of category means). Unparseable answers count as wrong and are
reported next to every figure.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..io import atomic_write_json, atomic_write_text
from .facexbench import CATEGORY_NAMES, category_display
from .scoring import Tally

RESULTS = "results.json"
REPORT = "report.md"
CHART = "accuracy_by_category.png"
SETTING_ORDER = ("zero", "single", "multiple")


def _tallies(records: Iterable[dict[str, Any]], key: Any) -> dict[str, Tally]:
    out: dict[str, Tally] = {}
    for r in records:
        k = key(r)
        if k is None:
            continue
        out.setdefault(str(k), Tally()).add(bool(r.get("correct")), r.get("prediction") is None)
    return out


def _category_order(keys: Iterable[str]) -> list[str]:
    known = [k for k in CATEGORY_NAMES if k in keys]
    return known + sorted(k for k in keys if k not in CATEGORY_NAMES)


def fairness(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per demographic group for every label key present, with the best-worst gap."""
    attrs = sorted({k for r in records for k in (r.get("labels") or {})})
    out: dict[str, Any] = {}
    for attr in attrs:
        groups = _tallies(records, lambda r, a=attr: (r.get("labels") or {}).get(a))
        if not groups:
            continue
        best = max(groups, key=lambda g: groups[g].accuracy)
        worst = min(groups, key=lambda g: groups[g].accuracy)
        out[attr] = {
            "groups": {g: groups[g].to_json() for g in sorted(groups)},
            "best": best,
            "worst": worst,
            "gap": groups[best].accuracy - groups[worst].accuracy,
        }
    return out


def build_results(records: Sequence[dict[str, Any]], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Overall, per category, sub-task, task, image setting and image count; fairness when labels exist."""
    overall = Tally()
    for r in records:
        overall.add(bool(r.get("correct")), r.get("prediction") is None)
    cats = _tallies(records, lambda r: r.get("category"))
    settings = _tallies(records, lambda r: r.get("setting"))
    counts = _tallies(records, lambda r: r.get("num_images"))
    hows = _tallies(records, lambda r: r.get("how"))
    return {
        "meta": dict(meta or {}),
        "overall": overall.to_json(),
        "categories": [{"key": k, "name": category_display(k), **cats[k].to_json()} for k in _category_order(cats)],
        "subtasks": {
            k: t.to_json() for k, t in sorted(_tallies(records, lambda r: r.get("subtask") or r.get("task")).items())
        },
        "tasks": {k: t.to_json() for k, t in sorted(_tallies(records, lambda r: r.get("task")).items())},
        "image_settings": {
            k: settings[k].to_json()
            for k in [*SETTING_ORDER, *sorted(set(settings) - set(SETTING_ORDER))]
            if k in settings
        },
        "num_images": {k: counts[k].to_json() for k in sorted(counts, key=int)},
        "answer_rules": {k: v.n for k, v in sorted(hows.items())},
        "fairness": fairness(records),
    }


def _row(name: str, t: dict[str, Any]) -> str:
    return f"| {name} | {t['accuracy']:.2f} | {t['correct']}/{t['n']} | {t['unparseable']} |"


def render_markdown(results: dict[str, Any]) -> str:
    """The report as markdown tables: overall, categories, sub-tasks, image settings, fairness."""
    meta = results.get("meta", {})
    who = meta.get("model") or "?"
    if meta.get("endpoint"):
        who = f"{who} @ {meta['endpoint']}"
    lines = [
        f"# Evaluation: {who}",
        "",
        f"set: {meta.get('set')} · mode: {meta.get('mode')} · "
        f"task description: {bool(meta.get('with_task_description'))}"
        + (f" · adapter: {meta['adapter']}" if meta.get("adapter") else ""),
        "",
        "| | accuracy % | correct / questions | unparseable |",
        "|---|---:|---:|---:|",
        _row("**Overall**", results["overall"]),
    ]
    lines += [_row(c["name"], c) for c in results["categories"]]
    sections = [
        ("Sub-task", results["subtasks"]),
        ("Task (file)", results["tasks"]),
        ("Images", results["image_settings"]),
        ("Number of images", results["num_images"]),
    ]
    for title, table in sections:
        lines += ["", f"| {title} | accuracy % | correct / questions | unparseable |", "|---|---:|---:|---:|"]
        lines += [_row(k, t) for k, t in table.items()]
    if results.get("unseen_in_training"):
        from ..data.overlap import unseen_markdown

        lines += unseen_markdown(results["unseen_in_training"])
    if results.get("fairness"):
        lines += ["", "## Fairness", ""]
        for attr, f in results["fairness"].items():
            lines += [f"| {attr} | accuracy % | correct / questions | unparseable |", "|---|---:|---:|---:|"]
            lines += [_row(g, t) for g, t in f["groups"].items()]
            lines += ["", f"{attr}: best {f['best']}, worst {f['worst']}, gap {f['gap']:.2f} points", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_chart(results: dict[str, Any], path: Path) -> Path | None:
    """Bar chart of accuracy by category (matplotlib, Agg backend); None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cats = results["categories"]
    names = [c["name"] for c in cats] + ["Overall"]
    values = [c["accuracy"] for c in cats] + [results["overall"]["accuracy"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names)), 4.0))
    bars = ax.bar(names, values, color=["#4C72B0"] * len(cats) + ["#DD8452"])
    for b, v in zip(bars, values, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{results.get('meta', {}).get('model') or ''} ({results['overall']['n']} questions)")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_reports(results: dict[str, Any], out: Path) -> dict[str, str]:
    """results.json, report.md and the chart in ``out``; returns their paths by kind."""
    files = {
        "results": str(atomic_write_json(out / RESULTS, results)),
        "report": str(atomic_write_text(out / REPORT, render_markdown(results))),
    }
    chart = write_chart(results, out / CHART)
    if chart:
        files["chart"] = str(chart)
    return files


def load_results(folder: str | Path) -> dict[str, Any]:
    p = Path(folder).expanduser()
    f = p / RESULTS if p.is_dir() else p
    if not f.is_file():
        raise DataError(f"no {RESULTS} in {p} (pass folders written by facellm evaluate --out)")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{f}: not valid JSON ({e})") from None


def compare(folders: Sequence[str | Path]) -> dict[str, Any]:
    """Several runs side by side: one column per run, rows for overall, categories and sub-tasks."""
    runs = [(str(f), load_results(f)) for f in folders]
    names = []
    for folder, res in runs:
        label = res.get("meta", {}).get("model") or Path(folder).name
        names.append(label if label not in names else f"{label} ({Path(folder).name})")
    rows: dict[str, list[float | None]] = {"Overall": [r["overall"]["accuracy"] for _, r in runs]}
    cat_keys = _category_order({c["key"] for _, r in runs for c in r["categories"]})
    for key in cat_keys:
        rows[category_display(key)] = [
            next((c["accuracy"] for c in r["categories"] if c["key"] == key), None) for _, r in runs
        ]
    for sub in sorted({s for _, r in runs for s in r["subtasks"]}):
        rows[f"· {sub}"] = [r["subtasks"].get(sub, {}).get("accuracy") for _, r in runs]
    return {
        "runs": [
            {"name": n, "folder": f, "questions": r["overall"]["n"]} for n, (f, r) in zip(names, runs, strict=True)
        ],
        "rows": rows,
    }


def render_compare(table: dict[str, Any]) -> str:
    names = [r["name"] for r in table["runs"]]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines.append("| questions | " + " | ".join(str(r["questions"]) for r in table["runs"]) + " |")
    for row, vals in table["rows"].items():
        cells = ["–" if v is None else f"{v:.2f}" for v in vals]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_table(results: dict[str, Any]) -> str:
    """Overall and per-category lines: what ``facellm evaluate`` prints on stdout."""
    lines = [
        "| | accuracy % | correct / questions | unparseable |",
        "|---|---:|---:|---:|",
        _row("Overall", results["overall"]),
    ]
    lines += [_row(c["name"], c) for c in results["categories"]]
    return "\n".join(lines) + "\n"
