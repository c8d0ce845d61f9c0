"""How commands show their results: answers and tables on stdout, notes on stderr.

Kept out of ``cli.py`` so each command there reads as resolve config -> call the
library -> render. rich is imported lazily: ``facellm --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FacellmError, ImageError

if TYPE_CHECKING:
    from rich.console import Console

    from .config import AskConfig
    from .faces import Detection
    from .infer.engine import Engine


def err_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def stream(pieces: Iterable[str]) -> str:
    """Write text pieces to stdout as they come, then a newline; returns the whole text."""
    parts = []
    for piece in pieces:
        parts.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(parts)


def ask_results(results: Iterator[Any], json_out: bool, total: int) -> None:
    """One line (or JSON object) per image; unreadable images are skipped, then reported."""
    failed = []
    for r in results:
        if r.error:
            failed.append(r.image)
            err_console().print(f"[red]error:[/red] {r.error} (skipped)")
        if json_out:
            print(json.dumps(r.to_json(), ensure_ascii=False), flush=True)
        elif not r.error:
            print(f"{r.image}\t{' '.join((r.answer or '').split())}", flush=True)
    if failed:
        raise FacellmError(f"{len(failed)} of {total} images could not be read: {', '.join(failed)}")


def ask_faces(
    lm: Engine,
    cfg: AskConfig,
    images: list[str],
    question: str,
    stdin_bytes: bytes | None,
    json_out: bool,
    draw: Path | None,
) -> None:
    """``ask --faces``: per-face answers, streamed for one photo with one face; optional drawings."""
    from rich.markup import escape

    from .faces import draw_path, save_drawing
    from .infer.ask import AskResult
    from .infer.ask import ask_faces as run_ask_faces

    if len(images) == 1 and not json_out and _one_face_streamed(lm, cfg, images[0], question, stdin_bytes, draw):
        return
    failed = []
    for photo in run_ask_faces(lm, cfg, images, question, stdin_bytes):
        if photo.error:
            failed.append(photo.image)
            err_console().print(f"[red]error:[/red] {escape(photo.error)}")
            if json_out:
                result = AskResult(photo.image, question, None, lm.name, error=photo.error)
                print(json.dumps(result.to_json()), flush=True)
        for r in photo.results:
            if json_out:
                print(json.dumps(r.to_json(), ensure_ascii=False), flush=True)
            else:
                box = ",".join(str(v) for v in r.box or [])
                print(f"{r.image}\tface {r.face} [{box}]\t{' '.join((r.answer or '').split())}", flush=True)
        if draw is not None and photo.photo is not None and photo.faces:
            target = draw_path(draw, photo.image, many=len(images) > 1)
            save_drawing(photo.photo, photo.faces, [r.answer or "" for r in photo.results], target)
            err_console().print(f"drew {len(photo.faces)} face(s): {escape(str(target))}")
    if failed:
        raise FacellmError(
            f"{len(failed)} of {len(images)} photos gave no answer: {', '.join(failed)} "
            "(a photo without a detected face: try --set face_crop.threshold=0.5)"
        )


def _one_face_streamed(
    lm: Engine, cfg: AskConfig, image: str, question: str, stdin_bytes: bytes | None, draw: Path | None
) -> bool:
    """One photo with one face streams its answer, as plain ask does; False when it has another count."""
    from rich.markup import escape

    from .faces import draw_path, save_drawing
    from .infer.ask import ask_face_stream, detect_photo

    img, found = detect_photo(image, cfg, stdin_bytes)
    if len(found) != 1:
        return False
    name = image if image != "-" else "<stdin>"
    sys.stdout.write(f"{name}\tface 0 [{','.join(str(v) for v in found[0].int_box())}]\t")
    answer = stream(ask_face_stream(lm, cfg, img, found[0], question))
    if draw is not None:
        target = save_drawing(img, found, [answer], draw_path(draw, name, many=False))
        err_console().print(f"drew 1 face: {escape(str(target))}")
    return True


def dataset_report(report: Any, with_mcq: bool, json_out: bool) -> None:
    if json_out:
        print(json.dumps(report.to_json(), ensure_ascii=False))
    console = err_console()
    console.print(
        f"{report.qa_pairs:,} QA pairs over {report.images:,} images from {report.records_read:,} records "
        f"in {report.elapsed_s:.1f}s -> {report.out_dir}"
    )
    console.print(
        "  "
        + ", ".join(
            f"{s}: {v['images']} images / {v['conversations']} conversations"
            + (f" / {v['mcq']} MCQs" if with_mcq else "")
            for s, v in report.splits.items()
        )
    )
    if report.filtered:
        console.print("  filtered: " + ", ".join(f"{k} {v}" for k, v in report.filtered.items()))
    console.print(f"  LLaMA-Factory: dataset_dir={report.out_dir} media_dir={report.media_dir}")


def eval_outcome(outcome: Any, local_generate: bool, json_out: bool) -> None:
    """Where the report went and hints on stderr; the summary table (or JSON) on stdout."""
    console = err_console()
    meta = outcome.results["meta"]
    scored = f"{meta['set_name']}" + (f" (split {meta['split']})" if meta.get("split") else "")
    console.print(
        f"{outcome.asked} answered, {outcome.cached} from cache on {scored}; report: {outcome.files['report']}"
        + (f", chart: {outcome.files['chart']}" if outcome.files.get("chart") else "")
    )
    if meta.get("selection"):
        console.print(f"questions: {meta['selection']}", markup=False)
    overall = outcome.results["overall"]
    if local_generate and overall["unparseable"] > overall["n"] / 2:
        console.print(
            f"[yellow]hint:[/yellow] {overall['unparseable']} of {overall['n']} answers named no option letter; "
            "small or base models often do better with --mode likelihood (scores the letters, nothing to parse)"
        )
    if json_out:
        print(json.dumps(outcome.results, ensure_ascii=False))
        return
    from .eval.report import summary_table

    print(summary_table(outcome.results), end="")
    if outcome.results.get("unseen_in_training"):
        from .data.overlap import unseen_markdown

        print("\n".join(unseen_markdown(outcome.results["unseen_in_training"])))


def compare(folders: list[str], chart_dir: Path, json_out: bool) -> None:
    """The comparison table on stdout and comparison.png in ``chart_dir``."""
    from .eval.report import compare as compare_runs
    from .eval.report import render_compare, write_compare_chart

    table = compare_runs(folders)
    print(json.dumps(table, ensure_ascii=False) if json_out else render_compare(table), end="\n" if json_out else "")
    chart = write_compare_chart(folders, chart_dir / "comparison.png")
    if chart:
        err_console().print(f"chart: {chart}")


def annotate_summary(summary: Any, json_out: bool) -> None:
    """Summary lines on stderr, the output path (or JSON) on stdout; failures make the exit code 1."""
    from .annotate.progress import summary_lines

    console = err_console()
    for line in summary_lines(summary):
        console.print(line, markup=False)
    print(json.dumps(summary.to_json(), ensure_ascii=False) if json_out else summary.out)
    reasons = []
    if summary.failed:
        reasons.append(
            f"{summary.failed} item(s) failed (reasons in {summary.failures}); re-run the same command to retry them"
        )
    if summary.images_skipped:
        reasons.append(
            f"{summary.images_skipped} input image(s) skipped as unreadable or missing (see the problems above); "
            "fix or remove them"
        )
    if reasons:
        raise FacellmError("; ".join(reasons))


def finetune_result(res: Any, json_out: bool) -> None:
    mem = f"{res.peak_memory_bytes / 2**30:.2f} GiB ({res.peak_memory_kind})"
    losses = [
        f"{name} {value:.4g}"
        for name, value in (("final train loss", res.final_train_loss), ("eval loss", res.final_eval_loss))
        if value is not None
    ]
    err_console().print(
        f"done: {res.global_step} steps, {res.samples_per_second:.2f} samples/s, peak memory {mem}"
        + (", " + ", ".join(losses) if losses else "")
        + f"; saved to {res.output_dir}"
    )
    print(json.dumps(res.to_json()) if json_out else res.output_dir)


def quickstart_result(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False)
    acc = Table(title=f"Expression accuracy on {result.test_questions} held-out faces (chance {result.chance:.1f}%)")
    acc.add_column("model")
    acc.add_column("accuracy", justify="right")
    acc.add_row("tiny model, random weights", f"{result.accuracy_before:.1f}%")
    acc.add_row("after facellm finetune", f"{result.accuracy_after:.1f}%")
    out.print(acc)
    stages = Table(title=f"Time per stage (total {result.total_seconds:.0f} s)")
    stages.add_column("stage")
    stages.add_column("seconds", justify="right")
    for s in result.stages:
        stages.add_row(s.name, f"{s.seconds:.1f}")
    out.print(stages)
    ask = result.ask
    verdict = "correct" if ask["correct"] else f"wrong, truth: {ask['truth']}"
    out.print("Ask the fine-tuned model yourself (this command runs as printed):")
    out.print(ask["command"], markup=False, highlight=False, soft_wrap=True)  # never wrapped: it must paste as is
    out.print(f"  -> {ask['answer']} = {ask['picked']} ({verdict})", markup=False)
    arts = Table(title="Artefacts")
    arts.add_column("what")
    arts.add_column("where")
    for k, v in result.artefacts.items():
        arts.add_row(k, v)
    out.print(arts)


def detections(found: Iterable[Detection | ImageError], json_out: bool) -> None:
    """``faces detect``: one line per face (or one JSON object per image); unreadable images reported last."""
    from rich.markup import escape

    failed = []
    for det in found:
        if isinstance(det, ImageError):
            failed.append(det.path)
            err_console().print(f"[red]error:[/red] {escape(str(det))} (skipped)")
            continue
        if json_out:
            print(json.dumps(det.to_json()), flush=True)
            continue
        if not det.faces:
            err_console().print(f"no face found: {escape(det.image)}")
        for i, f in enumerate(det.faces):
            box = ",".join(str(v) for v in f.int_box())
            print(f"{det.image}\tface {i}\t[{box}]\tscore {f.score:.3f}", flush=True)
    if failed:
        raise FacellmError(f"{len(failed)} image(s) could not be read: {', '.join(failed)}")


def crop_report(report: Any) -> None:
    from rich.markup import escape

    console = err_console()
    for name in report.no_face:
        console.print(f"no face found: {escape(name)}")
    for problem in report.problems:
        console.print(f"[red]error:[/red] {escape(problem)} (skipped)")
    skipped = f", {report.skipped_images} photo(s) already cropped" if report.skipped_images else ""
    console.print(f"{report.written} chip(s) written{skipped}; {len(report.rows)} in {escape(str(report.manifest))}")
    print(report.manifest)
    if report.problems:
        raise FacellmError(f"{len(report.problems)} image(s) could not be read")
