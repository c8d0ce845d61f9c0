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
from types import ModuleType
from typing import Any

from ..errors import DataError
from ..io import atomic_write_json, atomic_write_text
from .facexbench import CATEGORY_NAMES, category_display
from .scoring import Tally

RESULTS = "results.json"
REPORT = "report.md"
CHART = "accuracy_by_category.png"
SETTING_ORDER = ("zero", "single", "multiple")


def chance(records: Iterable[dict[str, Any]]) -> float:
    """Expected accuracy (%) of guessing uniformly among each question's options."""
    inv = [1.0 / len(r["options"]) for r in records if r.get("options")]
    return 100.0 * sum(inv) / len(inv) if inv else 0.0


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
        "overall": {**overall.to_json(), "chance": chance(records)},
        "categories": [
            {
                "key": k,
                "name": category_display(k),
                **cats[k].to_json(),
                "chance": chance(r for r in records if str(r.get("category")) == k),
            }
            for k in _category_order(cats)
        ],
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
        f"set: {meta.get('set')}"
        + (f" (split: {meta['split']})" if meta.get("split") else "")
        + f" · mode: {meta.get('mode')} · "
        f"task description: {bool(meta.get('with_task_description'))}"
        + (f" · adapter: {meta['adapter']}" if meta.get("adapter") else ""),
        "",
        *([f"questions: {meta['selection']}", ""] if meta.get("selection") else []),
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


def _pyplot() -> ModuleType | None:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib (optional) is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


# A white box behind value labels keeps chance lines and error bars from running through the numbers.
_LABEL_BOX = {"facecolor": "white", "edgecolor": "none", "pad": 0.6, "alpha": 0.85}


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion, in percent (an error bar that stays inside 0..100)."""
    if n == 0:
        return 0.0, 0.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def chart_title(meta: dict[str, Any]) -> str:
    """'<model> on <set>': names, never absolute paths."""
    model = meta.get("model_name") or Path(str(meta.get("model") or "model").rstrip("/")).name
    the_set = meta.get("set_name") or Path(str(meta.get("set") or "set").rstrip("/")).name
    return f"{model} on {the_set}"


def write_chart(results: dict[str, Any], path: Path) -> Path | None:
    """Accuracy by category with 95% error bars, counts, and each category's chance level; None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    cats = list(results["categories"])
    if len(cats) != 1:  # with one category "Overall" would repeat it
        cats.append({**results["overall"], "name": "Overall"})
    names = [c["name"] for c in cats]
    values = [c["accuracy"] for c in cats]
    lo_hi = [wilson(c["correct"], c["n"]) for c in cats]
    err = [
        [v - lo for v, (lo, _) in zip(values, lo_hi, strict=True)],
        [hi - v for v, (_, hi) in zip(values, lo_hi, strict=True)],
    ]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(names)), 4.6))
    x = range(len(names))
    bars = ax.bar(
        x,
        values,
        color=["#DD8452" if c["name"] == "Overall" else "#4C72B0" for c in cats],
        yerr=err,
        capsize=3,
        ecolor="#333333",
    )
    for i, (b, c) in enumerate(zip(bars, cats, strict=True)):
        if c.get("chance") is not None:
            ax.hlines(
                c["chance"],
                b.get_x() + 0.04,
                b.get_x() + b.get_width() - 0.04,
                colors="#C44E52",
                linestyles="--",
                linewidth=1.5,
                label="chance" if i == 0 else None,
                zorder=3,
            )
        top = lo_hi[i][1]
        ax.text(
            b.get_x() + b.get_width() / 2,
            top + 1.5,
            f"{c['accuracy']:.1f}%\n{c['correct']}/{c['n']}",
            ha="center",
            va="bottom",
            bbox=_LABEL_BOX,
            zorder=4,
            fontsize=8,
        )
    ax.set_xticks(list(x), names)
    ax.set_ylim(0, 118)  # room above 100% for the value labels, below the title
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{chart_title(results.get('meta', {}))} ({results['overall']['n']} questions)")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return _save_chart(plt, fig, ax, path)


def write_compare_chart(
    folders: Sequence[str | Path], path: Path, labels: Sequence[str] | None = None, title: str | None = None
) -> Path | None:
    """Side-by-side bars per category (and overall), one colour per run, with each category's chance level."""
    plt = _pyplot()
    if plt is None:
        return None
    runs = [load_results(f) for f in folders]
    names = list(labels) if labels else compare(folders)["runs"]
    names = [n if isinstance(n, str) else n["name"] for n in names]
    keys = _category_order({c["key"] for r in runs for c in r["categories"]})
    rows = [*keys, "__overall__"] if len(keys) != 1 else keys
    fig, ax = plt.subplots(figsize=(max(7.5, 1.1 * len(rows) * max(2, len(runs)) / 2 + 2), 4.8))
    for ri, r in enumerate(runs):
        _run_bars(ax, r, ri, len(runs), rows, names[ri])
    _compare_chance_lines(ax, runs, rows)
    ax.set_xticks(range(len(rows)), [("Overall" if k == "__overall__" else category_display(k)) for k in rows])
    ax.set_ylim(0, 118)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("accuracy (%)")
    sets = {chart_title(r.get("meta", {})).split(" on ", 1)[-1] for r in runs}
    ax.set_title(title or f"{' vs '.join(names)} on {', '.join(sorted(sets))}", fontsize=11)
    ax.legend(loc="upper left", fontsize=8, frameon=False, ncol=min(4, len(runs) + 1))
    return _save_chart(plt, fig, ax, path)


_RUN_COLORS = ["#8C8C8C", "#4C72B0", "#DD8452", "#55A868", "#8172B3", "#937860"]


def _row_result(run: dict[str, Any], key: str) -> dict[str, Any] | None:
    """A run's result for one chart row: a category by key, or ``__overall__``; None where the run lacks it."""
    if key == "__overall__":
        return run["overall"]
    return next((c for c in run["categories"] if c["key"] == key), None)


def _run_bars(ax: Any, run: dict[str, Any], ri: int, n_runs: int, rows: list[str], name: str) -> None:
    """Run ``ri``'s bar (with its 95% interval and value) in every row it has a result for."""
    width = 0.8 / n_runs
    for gi, key in enumerate(rows):
        c = _row_result(run, key)
        if c is None:
            continue
        xpos = gi - 0.4 + width * (ri + 0.5)
        lo, hi = wilson(c["correct"], c["n"])
        ax.bar(
            xpos,
            c["accuracy"],
            width * 0.92,
            color=_RUN_COLORS[ri % len(_RUN_COLORS)],
            label=name if gi == 0 else None,
            yerr=[[c["accuracy"] - lo], [hi - c["accuracy"]]],
            capsize=2,
            ecolor="#333333",
        )
        ax.text(xpos, hi + 1.5, f"{c['accuracy']:.1f}", ha="center", va="bottom", bbox=_LABEL_BOX, zorder=4, fontsize=7)


def _compare_chance_lines(ax: Any, runs: list[dict[str, Any]], rows: list[str]) -> None:
    """Each row's chance level, as the first run says it, across the row's bars."""
    for gi, key in enumerate(rows):
        ref = _row_result(runs[0], key)
        if ref is not None and ref.get("chance") is not None:
            ax.hlines(
                ref["chance"],
                gi - 0.4,
                gi + 0.4,
                colors="#C44E52",
                linestyles="--",
                linewidth=1.5,
                label="chance" if gi == 0 else None,
                zorder=3,
            )


def _save_chart(plt: Any, fig: Any, ax: Any, path: Path) -> Path:
    """Slanted category names, no top/right frame, saved to ``path`` (its folder made) and closed."""
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    ax.spines[["top", "right"]].set_visible(False)
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
        meta = res.get("meta", {})
        label = meta.get("model_name") or Path(str(meta.get("model") or folder).rstrip("/")).name
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
