"""The ``facellm`` command line: one thin function per subcommand, one exit point.

Commands resolve their config, call one library function and render the
result: results to stdout, progress and logs to stderr. Heavy libraries are
imported inside commands so ``facellm --help`` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
)

import typer

from . import __version__
from ._options import (
    AdapterOpt,
    ApiKeyEnvOpt,
    BatchSizeOpt,
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    EndpointOpt,
    EngineOpt,
    JsonOpt,
    MaxNewTokensOpt,
    ModelOpt,
    OutDirOpt,
    QuantOpt,
    SetOpt,
    SubfolderOpt,
    SystemOpt,
    TemperatureOpt,
    ThreadsOpt,
    model_flags,
)
from .errors import FacellmError

if TYPE_CHECKING:
    from .config import AskConfig
    from .infer.ask import AskResult

app = typer.Typer(
    name="facellm",
    help="FaceLLM as a tool: annotate faces, build datasets, fine-tune, ask, serve and evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
dev_app = typer.Typer(help="Developer tools: throwaway models and data for testing pipelines.", no_args_is_help=True)
app.add_typer(dev_app, name="dev")


def err_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def quiet_libraries() -> None:
    """Keep transformers' own progress bars and info logs off stderr unless debugging."""
    if os.environ.get("FACELLM_DEBUG"):
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    from .runtime import silence_known_warnings

    silence_known_warnings(debug=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"facellm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = None,
) -> None:
    """FaceLLM as a tool (paper: arXiv 2507.10300)."""


@app.command()
def ask(
    inputs: Annotated[
        list[str],
        typer.Argument(help="IMAGE... QUESTION: image files, folders, globs or - (stdin), then the question."),
    ],
    model: ModelOpt = None,
    subfolder: SubfolderOpt = None,
    adapter: AdapterOpt = None,
    quantization: QuantOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    engine: EngineOpt = None,
    threads: ThreadsOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    temperature: TemperatureOpt = None,
    system: SystemOpt = None,
    batch_size: BatchSizeOpt = None,
    json_out: JsonOpt = False,
    faces: Annotated[
        bool | None,
        typer.Option("--faces", help="Photos: detect every face, crop it FairFace-style and answer per face."),
    ] = None,
    draw: Annotated[
        Path | None,
        typer.Option(
            "--draw", help="With --faces: write the photo with numbered boxes and answers (a folder for many)."
        ),
    ] = None,
    base_url: EndpointOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Answer a question about face images. One image streams its answer; several print one line each.

    With --base-url, a model served by an OpenAI-compatible endpoint answers (--model names it).
    """
    from .config import AskConfig, resolve_config
    from .infer.ask import resolve_inputs

    if len(inputs) < 2:
        raise typer.BadParameter(
            "give at least one image and a question: facellm ask face.jpg 'what expression is this?'"
        )
    if api_key_env and not base_url:
        raise typer.BadParameter("--api-key-env names the key of an endpoint: give --base-url too")
    *image_args, question = inputs
    # With --base-url, --model names the served model; local-model flags are kept so the config rejects them.
    flags = model_flags(
        None if base_url else model, subfolder, adapter, quantization, device, dtype, engine=engine, threads=threads
    )
    flags.update(
        {
            "generation.max_new_tokens": max_new_tokens,
            "generation.temperature": temperature,
            "generation.system": system,
            "batch_size": batch_size,
            "faces": faces,
        }
    )
    if base_url:
        flags.update({"endpoint.base_url": base_url, "endpoint.model": model, "endpoint.api_key_env": api_key_env})
    cfg = resolve_config(AskConfig, config, flags, set_)
    if draw is not None and not cfg.faces:
        raise typer.BadParameter("--draw needs --faces (it draws the face boxes)")
    images = resolve_inputs(image_args)
    stdin_bytes = sys.stdin.buffer.read() if "-" in images else None
    if cfg.faces:
        from .faces import check_available

        check_available()  # the install hint before a model loads
        _ask_faces(_load(cfg.model), cfg, images, question, stdin_bytes, json_out, draw)
        return
    stream, many = _answerers(cfg, images, question, stdin_bytes)
    if len(images) == 1 and not json_out:
        for piece in stream():
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    failed = []
    for r in many():
        if r.error:
            failed.append(r.image)
            err_console().print(f"[red]error:[/red] {r.error} (skipped)")
        if json_out:
            print(json.dumps(r.to_json(), ensure_ascii=False), flush=True)
        elif not r.error:
            print(f"{r.image}\t{' '.join((r.answer or '').split())}", flush=True)
    if failed:
        raise FacellmError(f"{len(failed)} of {len(images)} images could not be read: {', '.join(failed)}")


def _answerers(
    cfg: AskConfig, images: list[str], question: str, stdin_bytes: bytes | None
) -> tuple[Callable[[], Iterator[str]], Callable[[], Iterator[AskResult]]]:
    """(stream the one image's answer, answer every image): from the endpoint, or a model loaded here."""
    if cfg.endpoint is not None:
        from .endpoint.ask import ask_remote_many, ask_remote_stream

        key = _api_key(cfg.endpoint.api_key_env, cfg.endpoint.base_url)
        return (
            lambda: ask_remote_stream(cfg, key, images[0], question, stdin_bytes),
            lambda: ask_remote_many(cfg, key, images, question, stdin_bytes),
        )
    from .infer.ask import ask_many, ask_stream

    lm = _load(cfg.model)
    return (
        lambda: ask_stream(lm, cfg, images[0], question, stdin_bytes),
        lambda: ask_many(lm, cfg, images, question, stdin_bytes),
    )


def _ask_faces(lm, cfg, images, question, stdin_bytes, json_out, draw) -> None:
    from rich.markup import escape

    from .faces import draw_path, save_drawing
    from .infer.ask import AskResult, ask_faces

    if draw is not None and len(images) > 1 and draw.suffix:
        raise typer.BadParameter(f"--draw {draw}: several photos need a folder, not a file name")
    if len(images) == 1 and not json_out:  # one photo with one face streams, as plain ask does
        from .infer.ask import ask_face_stream, detect_photo

        img, found = detect_photo(images[0], cfg, stdin_bytes)
        if len(found) == 1:
            name = images[0] if images[0] != "-" else "<stdin>"
            sys.stdout.write(f"{name}\tface 0 [{','.join(str(v) for v in found[0].int_box())}]\t")
            pieces = []
            for piece in ask_face_stream(lm, cfg, img, found[0], question):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            if draw is not None:
                target = save_drawing(img, found, ["".join(pieces)], draw_path(draw, name, many=False))
                err_console().print(f"drew 1 face: {escape(str(target))}")
            return
    failed = []
    for photo in ask_faces(lm, cfg, images, question, stdin_bytes):
        if photo.error:
            failed.append(photo.image)
            err_console().print(f"[red]error:[/red] {escape(photo.error)}")
            if json_out:
                print(
                    json.dumps(AskResult(photo.image, question, None, lm.name, error=photo.error).to_json()), flush=True
                )
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


def _load(model_cfg):
    quiet_libraries()
    from ._progress import ProgressBar
    from .infer.engine import load_engine

    with ProgressBar(err_console(), "loading", transient=True) as bar:
        return load_engine(model_cfg, reporter=bar)  # its notes (the CPU thread choice) print above the bar


# ---- build-dataset ----
@app.command("build-dataset")
def build_dataset(
    inputs: Annotated[
        list[str] | None, typer.Argument(help="Annotate JSONL files and/or paper-layout folders ({id}/question_i.txt).")
    ] = None,
    image_root: Annotated[
        str | None, typer.Option("--image-root", help="Folder the image paths are relative to.")
    ] = None,
    out: OutDirOpt = None,
    labels: Annotated[str | None, typer.Option("--labels", help="Labels CSV: a 'file' column + attributes.")] = None,
    split: Annotated[str | None, typer.Option("--split", help="train,val,test fractions: 0.8,0.1,0.1.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Split and MCQ seed.")] = None,
    merge_aspects: Annotated[
        bool | None, typer.Option("--merge-aspects/--no-merge-aspects", help="One multi-turn conversation per image.")
    ] = None,
    mcq: Annotated[str | None, typer.Option("--mcq", help="Labels to export as MCQ: expression,age.")] = None,
    mcq_train: Annotated[
        bool | None,
        typer.Option("--mcq-train/--no-mcq-train", help="Train MCQs into training files (default with --mcq)."),
    ] = None,
    group_key: Annotated[
        str | None, typer.Option("--group-key", help="Identity label; a group stays in one split.")
    ] = None,
    stratify: Annotated[str | None, typer.Option("--stratify", help="Label column to stratify the split by.")] = None,
    skip_invalid: Annotated[
        bool | None,
        typer.Option("--skip-invalid/--no-skip-invalid", help="Drop and count invalid records, don't fail."),
    ] = None,
    force: Annotated[
        bool | None, typer.Option("--force/--no-force", help="Replace outputs in a non-empty --out.")
    ] = None,
    exclude_overlap_with: Annotated[
        list[str] | None,
        typer.Option("--exclude-overlap-with", help="Drop images that match these benchmark images/sets (repeatable)."),
    ] = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Validate annotations, split them by image and write ShareGPT, messages JSONL and MCQ files."""
    from .config import DatasetConfig, resolve_config
    from .data.build import build_dataset as run_build

    flags = {
        "inputs": inputs or None,
        "image_root": image_root,
        "out": str(out) if out else None,
        "labels": labels,
        "split": split,
        "seed": seed,
        "merge_aspects": merge_aspects,
        "mcq": mcq,
        "mcq_train": mcq_train,
        "group_key": group_key,
        "stratify": stratify,
        "skip_invalid": skip_invalid,
        "force": force,
        "exclude_overlap_with": exclude_overlap_with,
    }
    cfg = resolve_config(DatasetConfig, config, flags, set_)
    if cfg.exclude_overlap_with and cfg.overlap_cache is None:
        cfg.overlap_cache = str(_overlap_cache())
    from ._progress import ProgressBar

    with ProgressBar(err_console(), "build-dataset", transient=True) as bar:
        report = run_build(cfg, reporter=bar)
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
            + (f" / {v['mcq']} MCQs" if cfg.mcq else "")
            for s, v in report.splits.items()
        )
    )
    if report.filtered:
        console.print("  filtered: " + ", ".join(f"{k} {v}" for k, v in report.filtered.items()))
    console.print(f"  LLaMA-Factory: dataset_dir={report.out_dir} media_dir={report.media_dir}")


# ---- evaluate ----


@app.command()
def evaluate(
    benchmark: Annotated[str | None, typer.Option("--benchmark", help="Built-in benchmark: facexbench.")] = None,
    data_dir: Annotated[
        str | None, typer.Option("--data-dir", help="FaceXBench checkout (or its benchmark/ folder).")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", help="JSONL set, or a build-dataset folder (its mcq_test.jsonl; see --split)."),
    ] = None,
    image_root: Annotated[
        str | None, typer.Option("--image-root", help="Root for relative image paths in --data.")
    ] = None,
    model: ModelOpt = None,
    subfolder: SubfolderOpt = None,
    adapter: AdapterOpt = None,
    quantization: QuantOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    engine: EngineOpt = None,
    threads: ThreadsOpt = None,
    base_url: EndpointOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    concurrency: Annotated[int | None, typer.Option("--concurrency", help="Endpoint requests in flight.")] = None,
    split: Annotated[
        str | None,
        typer.Option("--split", help="With --data DIR (build-dataset output): train | val | test (default) | all."),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            "--mode",
            help="generate (default: answer, then parse the letter) | likelihood (score the option letters; "
            "best for small or base models).",
        ),
    ] = None,
    batch_size: BatchSizeOpt = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="A seeded sample of N questions, stratified over tasks.")
    ] = None,
    tasks: Annotated[
        list[str] | None,
        typer.Option("--tasks", help="Tasks, sub-tasks or categories to run (repeat or comma-separate)."),
    ] = None,
    with_task_description: Annotated[
        bool | None, typer.Option("--with-task-description", help="Prepend each task's description.")
    ] = None,
    max_new_tokens: MaxNewTokensOpt = None,
    out: OutDirOpt = None,
    compare: Annotated[
        list[str] | None,
        typer.Option(
            "--compare",
            help="Result folders to show side by side (--compare DIR1 DIR2 ...); alone, only compares "
            "(table on stdout, comparison.png in --out or the current folder).",
        ),
    ] = None,
    train_data: Annotated[
        list[str] | None,
        typer.Option(
            "--train-data",
            help="The model's training data (or auto: its finetune run): also accuracy on unseen images.",
        ),
    ] = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Multiple-choice accuracy on FaceXBench or a JSONL set: batched, resumable, with per-task and fairness reports."""
    from .config import EvalConfig, resolve_config

    if compare and not (benchmark or data or config or set_):
        _show_compare(compare, Path(out) if out else Path("."), json_out)
        return
    from .eval.runner import evaluate as run_eval

    # With --base-url, --model names the served model; local-model flags are kept so the config rejects them.
    flags = model_flags(
        None if base_url else model, subfolder, adapter, quantization, device, dtype, engine=engine, threads=threads
    )
    if base_url:
        flags.update(
            {
                "endpoint.base_url": base_url,
                "endpoint.model": model,
                "endpoint.api_key_env": api_key_env,
                "endpoint.concurrency": concurrency,
            }
        )
    flags.update(
        {
            "benchmark": benchmark,
            "data_dir": data_dir,
            "data": data,
            "image_root": image_root,
            "split": split,
            "mode": mode,
            "batch_size": batch_size,
            "limit": limit,
            "with_task_description": with_task_description,
            "generation.max_new_tokens": max_new_tokens,
            "out": str(out) if out else None,
            "tasks": [t.strip() for item in tasks for t in item.split(",") if t.strip()] if tasks else None,
            "train_data": train_data,
        }
    )
    cfg = resolve_config(EvalConfig, config, flags, set_)
    if cfg.train_data and cfg.overlap_cache is None:
        cfg.overlap_cache = str(_overlap_cache())
    api_key = _api_key(cfg.endpoint.api_key_env, cfg.endpoint.base_url) if cfg.endpoint else None
    from ._progress import ProgressBar

    console = err_console()
    with ProgressBar(console, "evaluate", unit="questions", cpu_bound=cfg.endpoint is None) as bar:
        outcome = run_eval(cfg, api_key=api_key, reporter=bar)
    meta = outcome.results["meta"]
    scored = f"{meta['set_name']}" + (f" (split {meta['split']})" if meta.get("split") else "")
    console.print(
        f"{outcome.asked} answered, {outcome.cached} from cache on {scored}; report: {outcome.files['report']}"
        + (f", chart: {outcome.files['chart']}" if outcome.files.get("chart") else "")
    )
    if meta.get("selection"):
        console.print(f"questions: {meta['selection']}", markup=False)
    overall = outcome.results["overall"]
    if cfg.endpoint is None and cfg.mode == "generate" and overall["unparseable"] > overall["n"] / 2:
        console.print(
            f"[yellow]hint:[/yellow] {overall['unparseable']} of {overall['n']} answers named no option letter; "
            "small or base models often do better with --mode likelihood (scores the letters, nothing to parse)"
        )
    if json_out:
        print(json.dumps(outcome.results, ensure_ascii=False))
    else:
        from .eval.report import summary_table

        print(summary_table(outcome.results), end="")
        if outcome.results.get("unseen_in_training"):
            from .data.overlap import unseen_markdown

            print("\n".join(unseen_markdown(outcome.results["unseen_in_training"])))
    if compare:
        if not json_out:
            print()
        _show_compare([*compare, str(outcome.out_dir)], outcome.out_dir, json_out)


def _show_compare(folders: list[str], chart_dir: Path, json_out: bool) -> None:
    """The comparison table on stdout and comparison.png in ``chart_dir``."""
    from .eval.report import compare as compare_runs
    from .eval.report import render_compare, write_compare_chart

    table = compare_runs(folders)
    print(json.dumps(table, ensure_ascii=False) if json_out else render_compare(table), end="\n" if json_out else "")
    chart = write_compare_chart(folders, chart_dir / "comparison.png")
    if chart:
        err_console().print(f"chart: {chart}")


# ---- annotate ----
@app.command()
def annotate(
    images: Annotated[
        list[str] | None,
        typer.Argument(help="Image files, folders or globs (optional when --labels lists the images)."),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option("--labels", "-l", help="FairFace CSV or a CSV/JSONL with an image column and attribute columns."),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option("--out", "-o", help="Output JSONL, default annotations.jsonl (re-running resumes it)."),
    ] = None,
    base_url: EndpointOpt = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model name at the endpoint (default gpt-4o-2024-11-20).")
    ] = None,
    api_key_env: ApiKeyEnvOpt = None,
    provider: Annotated[
        str | None,
        typer.Option("--provider", help="openai (any compatible endpoint) | template (offline, from labels)."),
    ] = None,
    mode: Annotated[
        str | None, typer.Option("--mode", help="per-aspect (one request per aspect) | grouped (one per image).")
    ] = None,
    prompts: Annotated[
        str | None, typer.Option("--prompts", help="Prompt set name or YAML file (default fairfacegpt-v1).")
    ] = None,
    concurrency: Annotated[int | None, typer.Option("--concurrency", help="Requests in flight (default 64).")] = None,
    rpm: Annotated[int | None, typer.Option("--rpm", help="Cap on requests per minute.")] = None,
    max_retries: Annotated[
        int | None, typer.Option("--max-retries", help="Retries per request on 429/5xx/timeouts.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Estimate requests, tokens and cost; send nothing.")
    ] = False,
    batch: Annotated[
        bool | None, typer.Option("--batch", help="Use the OpenAI Batch API (resumable by batch id).")
    ] = None,
    faces: Annotated[
        bool | None,
        typer.Option(
            "--faces", help="The images are photos: crop every face first (into <out>.faces/), annotate chips."
        ),
    ] = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write question-answer pairs about face images (FairFaceGPT pipeline): resumable, concurrent, fault-tolerant."""
    from .annotate.pipeline import annotate as run_annotate
    from .annotate.progress import AnnotateProgress, summary_lines
    from .config import AnnotateConfig, resolve_config

    flags = {
        "images": list(images) if images else None,
        "labels": labels,
        "out": out,
        "endpoint.base_url": base_url,
        "endpoint.model": model,
        "endpoint.api_key_env": api_key_env,
        "provider": provider,
        "mode": mode,
        "prompts": prompts,
        "endpoint.concurrency": concurrency,
        "endpoint.rpm": rpm,
        "endpoint.max_retries": max_retries,
        "batch": batch,
        "faces": faces,
    }
    cfg = resolve_config(AnnotateConfig, config, flags, set_)
    ep = cfg.endpoint
    api_key = None if cfg.provider == "template" or dry_run else _api_key(ep.api_key_env, ep.base_url)
    console = err_console()
    with AnnotateProgress(console, "annotate") as bar:
        summary = run_annotate(cfg, api_key=api_key, dry_run=dry_run, reporter=bar)
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


def _api_key(env_name: str | None, base_url: str | None = None, *, serving: bool = False) -> str | None:
    """The API key from the environment: the one place every command reads it.

    A variable named with --api-key-env (or api_key_env) must be set: an unset one is an
    error, never a request without a key or an open server. Unnamed, clients read
    OPENAI_API_KEY, which local endpoints may go without; ``serve`` runs without auth.
    """
    from .endpoint.messages import is_local_endpoint
    from .errors import ConfigError

    if env_name is None:
        if serving:
            return None
        key = os.environ.get("OPENAI_API_KEY", "").strip()
        if key:
            return key
        if is_local_endpoint(base_url):
            return "no-key-needed"
        raise FacellmError(
            "environment variable OPENAI_API_KEY is not set: export OPENAI_API_KEY=... "
            "(or name another with --api-key-env)"
        )
    key = os.environ.get(env_name, "").strip()
    if not key:
        hint = "or leave out --api-key-env to serve without a key" if serving else "or name another with --api-key-env"
        raise ConfigError(
            f"api_key_env: environment variable {env_name} is not set or empty (export {env_name}=..., {hint})"
        )
    return key


# ---- serve ----
@app.command()
def serve(
    model: ModelOpt = None,
    subfolder: SubfolderOpt = None,
    adapter: AdapterOpt = None,
    quantization: QuantOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    engine: EngineOpt = None,
    threads: ThreadsOpt = None,
    host: Annotated[str | None, typer.Option("--host", help="Interface to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option("--port", "-p", help="TCP port (default 8000; 0 = any free).")] = None,
    api_key_env: ApiKeyEnvOpt = None,
    served_model_name: Annotated[
        str | None, typer.Option("--served-model-name", help="Model id reported to clients (default: folder name).")
    ] = None,
    max_batch_size: Annotated[
        int | None, typer.Option("--max-batch-size", help="Most requests per generate call (1 = no batching).")
    ] = None,
    max_wait_ms: Annotated[
        float | None, typer.Option("--max-wait-ms", help="How long a request waits for others to batch with.")
    ] = None,
    allow_remote_images: Annotated[
        bool, typer.Option("--allow-remote-images", help="Fetch http(s) image URLs (default: data: URIs only).")
    ] = False,
    log_json: Annotated[bool, typer.Option("--log-json", help="One JSON object per request on stderr.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/models, /health)."""
    from .config import ServeConfig, resolve_config
    from .serve.app import require_serve_extras, serve_forever

    flags = model_flags(model, subfolder, adapter, quantization, device, dtype, engine=engine, threads=threads)
    flags.update(
        {
            "host": host,
            "port": port,
            "api_key_env": api_key_env,
            "served_model_name": served_model_name,
            "max_batch_size": max_batch_size,
            "max_wait_ms": max_wait_ms,
            "allow_remote_images": allow_remote_images or None,
            "log_json": log_json or None,
        }
    )
    cfg = resolve_config(ServeConfig, config, flags, set_)
    require_serve_extras()
    api_key = _api_key(cfg.api_key_env, serving=True)
    console = err_console()
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        console.print(f"[yellow]warning:[/yellow] serving on {cfg.host} without an API key (see --api-key-env)")
    lm = _load(cfg.model)
    serve_forever(cfg, lm, api_key=api_key, on_ready=lambda url: console.print(f"serving {url} (Ctrl-C to stop)"))


# ---- finetune ----
finetune_app = typer.Typer(
    help="Fine-tune a vision-language model (LoRA, QLoRA or full) on conversations from build-dataset. "
    "Several GPUs: accelerate launch -m facellm_cli finetune --config run.yaml",
    invoke_without_command=True,
)
app.add_typer(finetune_app, name="finetune")


@finetune_app.callback()
def finetune(
    ctx: typer.Context,
    config: ConfigOpt = None,
    data: Annotated[
        str | None,
        typer.Option("--data", help="Training file (messages .jsonl or ShareGPT .json), or a build-dataset folder."),
    ] = None,
    model: ModelOpt = None,
    method: Annotated[str | None, typer.Option("--method", help="lora | qlora | full.")] = None,
    out: OutDirOpt = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after N optimiser steps.")] = None,
    threads: ThreadsOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the latest complete checkpoint in --out.")
    ] = False,
    resume_from: Annotated[
        str | None, typer.Option("--resume-from", help="Continue from this checkpoint folder (implies --resume).")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start afresh in a non-empty output folder.")] = False,
    json_out: JsonOpt = False,
    set_: SetOpt = None,
) -> None:
    """Train (without a sub-command); `finetune merge` merges an adapter into its base."""
    if ctx.invoked_subcommand is not None:
        return
    from .config import FinetuneConfig, resolve_config
    from .train.finetune import finetune as run_finetune

    flags = {
        "data.train": data,
        "model.model": model,
        "method": method,
        "output_dir": str(out) if out else None,
        "train.max_steps": max_steps,
        "model.threads": threads,
    }
    cfg = resolve_config(FinetuneConfig, config, flags, set_)
    quiet_libraries()
    from ._progress import ProgressBar

    console = err_console()
    # Under accelerate/torchrun only the first process draws the bar (the others report no steps).
    with ProgressBar(console, "finetune", unit="steps", disable=os.environ.get("RANK", "0") != "0") as bar:
        res = run_finetune(
            cfg,
            resume=resume_from or ("latest" if resume else None),
            overwrite=overwrite,
            source=str(config) if config else None,
            reporter=bar,
        )
    mem = f"{res.peak_memory_bytes / 2**30:.2f} GiB ({res.peak_memory_kind})"
    losses = [
        f"{name} {value:.4g}"
        for name, value in (("final train loss", res.final_train_loss), ("eval loss", res.final_eval_loss))
        if value is not None
    ]
    console.print(
        f"done: {res.global_step} steps, {res.samples_per_second:.2f} samples/s, peak memory {mem}"
        + (", " + ", ".join(losses) if losses else "")
        + f"; saved to {res.output_dir}"
    )
    print(json.dumps(res.to_json()) if json_out else res.output_dir)


@finetune_app.command("merge")
def finetune_merge(
    adapter: Annotated[Path, typer.Option("--adapter", help="LoRA adapter folder (a finetune output).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the merged standalone model.")],
    base: Annotated[
        str | None, typer.Option("--base", help="Base model (default: the one the adapter records).")
    ] = None,
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="Largest safetensors shard, e.g. 2GB.")
    ] = "5GB",
    dtype: DtypeOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty folder.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Merge a LoRA adapter into its base model and save a standalone model with its processor."""
    quiet_libraries()
    from ._progress import ProgressBar
    from .train.finetune import merge_adapter

    with ProgressBar(err_console(), "merge (load, save weights, save processor)", unit="parts") as bar:
        res = merge_adapter(
            adapter,
            out,
            base=base,
            max_shard_size=max_shard_size,
            dtype=dtype or "auto",
            overwrite=overwrite,
            reporter=bar,
        )
    err_console().print(
        f"merged {res.adapter} into {res.base_model}: {len(res.files)} files, {res.total_bytes / 1e6:.1f} MB"
    )
    print(json.dumps(res.__dict__) if json_out else res.output_dir)


# ---- synth-faces ----
@dev_app.command("synth-faces")
def synth_faces_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write face PNGs and labels.csv to.")],
    n: Annotated[int, typer.Option("--n", help="Number of faces (expressions are balanced).")] = 300,
    seed: Annotated[int, typer.Option("--seed", help="Seed: the same seed gives byte-identical files.")] = 0,
    size: Annotated[int, typer.Option("--size", help="Image side in pixels (32 or more).")] = 64,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty folder.")] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=1,
            help="Processes drawing faces (default: one per 100 faces, up to the usable CPUs or 8; same files).",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Draw synthetic faces with known expression, eyes, pose, glasses, skin tone and background."""
    from ._progress import ProgressBar
    from .synth import default_workers, synth_faces

    with ProgressBar(err_console(), "synth-faces", unit="faces", transient=True) as bar:
        res = synth_faces(
            out_dir, n, seed=seed, size=size, overwrite=overwrite, workers=workers or default_workers(n), reporter=bar
        )
    err_console().print(f"{res.count} faces written; expressions: {res.counts['expression']}")
    if json_out:
        info = {"out_dir": str(res.out_dir), "labels": str(res.labels_csv), "count": res.count, "counts": res.counts}
        print(json.dumps(info))
    else:
        print(res.labels_csv)


# ---- quickstart ----
@app.command()
def quickstart(
    out: OutDirOpt = None,
    faces: Annotated[int | None, typer.Option("--faces", help="Synthetic faces to draw (default 4000).")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", help="Training epochs (default 4.5).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for everything (default 0).")] = None,
    base_url: EndpointOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    force: Annotated[bool | None, typer.Option("--force", help="Replace an earlier quickstart in --out.")] = None,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run the whole FaceLLM loop offline: synthetic faces -> annotate -> build-dataset -> finetune -> evaluate -> ask."""
    from .config import QuickstartConfig, resolve_config
    from .quickstart import quickstart as run_quickstart

    flags = {
        "out": str(out) if out else None,
        "faces": faces,
        "epochs": epochs,
        "seed": seed,
        "endpoint.base_url": base_url,
        "endpoint.api_key_env": api_key_env,
        "force": force,
        "threads": threads,
    }
    cfg = resolve_config(QuickstartConfig, config, flags, set_)
    endpoint = cfg.annotate_endpoint
    api_key = _api_key(endpoint.api_key_env, endpoint.base_url) if endpoint else None
    quiet_libraries()
    from ._progress import ProgressBar

    console = err_console()
    with ProgressBar(console, "quickstart", headers=True, log_prefix="   ") as bar:
        result = run_quickstart(cfg, api_key=api_key, reporter=bar)
    if json_out:
        print(json.dumps(result.to_json(), ensure_ascii=False))
        return
    _print_quickstart(result)


def _print_quickstart(result) -> None:
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


def _overlap_cache() -> Path:
    from .data.overlap import default_cache_path

    return default_cache_path(dict(os.environ))


# ---- data ----
data_app = typer.Typer(help="Dataset hygiene: compare training data with benchmarks.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("overlap")
def data_overlap(
    train: Annotated[
        list[str] | None,
        typer.Argument(help="Training images: folders, annotate/build-dataset outputs, training or mcq JSONL files."),
    ] = None,
    against: Annotated[
        list[str] | None, typer.Option("--against", help="Benchmark images or sets, same kinds (repeatable).")
    ] = None,
    benchmark: Annotated[str | None, typer.Option("--benchmark", help="Built-in benchmark: facexbench.")] = None,
    data_dir: Annotated[str | None, typer.Option("--data-dir", help="FaceXBench checkout (with --benchmark).")] = None,
    image_root: Annotated[
        str | None, typer.Option("--image-root", help="Root for relative image paths in JSONL inputs.")
    ] = None,
    max_distance: Annotated[
        int | None, typer.Option("--max-distance", help="Most differing bits of the 128-bit hash (default 14).")
    ] = None,
    max_colour_distance: Annotated[
        float | None, typer.Option("--max-colour-distance", help="Most mean chroma difference (default 3).")
    ] = None,
    sheet: Annotated[
        str | None, typer.Option("--sheet", help="Contact sheet PNG of the closest pairs (default overlap_pairs.png).")
    ] = None,
    sheet_pairs: Annotated[int | None, typer.Option("--sheet-pairs", help="Pairs drawn on the contact sheet.")] = None,
    show: Annotated[int, typer.Option("--show", help="Pairs listed in the table.")] = 20,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Processes decoding images (default: one per 2,000).")
    ] = None,
    cache: Annotated[str | None, typer.Option("--cache", help="Hash cache file (default under FACELLM_HOME).")] = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Find training images that are also benchmark images (perceptual hash: survives re-encoding, resizing, crops)."""
    from .config import OverlapConfig, resolve_config
    from .data.overlap import overlap, render_table

    flags = {
        "train": train or None,
        "against": against or None,
        "benchmark": benchmark,
        "data_dir": data_dir,
        "image_root": image_root,
        "max_distance": max_distance,
        "max_colour_distance": max_colour_distance,
        "sheet": sheet,
        "sheet_pairs": sheet_pairs,
        "workers": workers,
        "cache": cache,
    }
    cfg = resolve_config(OverlapConfig, config, flags, set_)
    if cfg.cache is None:
        cfg.cache = str(_overlap_cache())
    from ._progress import ProgressBar

    with ProgressBar(err_console(), "hashing", unit="images", transient=True) as bar:
        result = overlap(cfg, reporter=bar)
    if json_out:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        print(render_table(result, show), end="")
    if result.sheet:
        err_console().print(f"contact sheet of the closest pairs: {result.sheet}")


@dev_app.command("tiny-model")
def tiny_model(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the model to.")],
    family: Annotated[str, typer.Option("--family", help="internvl | qwen2_vl.")] = "internvl",
    seed: Annotated[int, typer.Option("--seed", help="Weights seed.")] = 0,
    image_size: Annotated[int, typer.Option("--image-size", help="Input image side in pixels.")] = 64,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty folder.")] = False,
) -> None:
    """Build a randomly initialised few-MB model of a real VLM family (for testing pipelines offline)."""
    from .errors import OutputExistsError
    from .testing import build_tiny_model

    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise OutputExistsError(f"output folder is not empty: {out_dir} (choose another or pass --force)")
    quiet_libraries()
    path = build_tiny_model(out_dir, family, seed=seed, image_size=image_size)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    err_console().print(f"tiny {family} model written ({size / 1e6:.1f} MB)")
    print(path)


# ---- faces ----
faces_app = typer.Typer(help="Faces in photos: detect them and crop FairFace-style chips.", no_args_is_help=True)
app.add_typer(faces_app, name="faces")
ThresholdOpt = Annotated[float | None, typer.Option("--threshold", help="Lowest detector score kept (default 0.9).")]
MinSizeOpt = Annotated[
    float | None, typer.Option("--min-size", help="Smallest face kept, shorter box side in pixels (default 0).")
]
ImagesArg = Annotated[list[str], typer.Argument(help="Photos: files, folders or globs.")]


@faces_app.command("detect")
def faces_detect(
    images: ImagesArg,
    threshold: ThresholdOpt = None,
    min_size: MinSizeOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per image on stdout.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Find faces: a box, 5 landmarks (eyes, nose, mouth corners) and a score per face."""
    from rich.markup import escape

    from .config import FaceDetectConfig, resolve_config
    from .faces import detect_files

    cfg = resolve_config(FaceDetectConfig, config, {"threshold": threshold, "min_size": min_size}, set_)
    failed = []
    for det in detect_files(images, cfg):
        if isinstance(det, FacellmError):
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


@faces_app.command("crop")
def faces_crop(
    images: ImagesArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the chips and manifest.csv.")],
    margin: Annotated[float | None, typer.Option("--margin", help="Added on each side, x face size (0.25).")] = None,
    size: Annotated[int | None, typer.Option("--size", help="Chip side in pixels (224).")] = None,
    align: Annotated[
        bool | None, typer.Option("--align/--no-align", help="Level the eye line (default: align).")
    ] = None,
    threshold: ThresholdOpt = None,
    min_size: MinSizeOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Crop every face into FairFace-style chips plus a manifest.csv that annotate --labels and build-dataset read."""
    from rich.markup import escape

    from ._progress import ProgressBar
    from .config import FaceCropConfig, resolve_config
    from .faces import crop_files

    flags = {"margin": margin, "size": size, "align": align, "threshold": threshold, "min_size": min_size}
    cfg = resolve_config(FaceCropConfig, config, flags, set_)
    console = err_console()
    with ProgressBar(console, "cropping faces", unit="photos", transient=True) as bar:
        report = crop_files(images, out, cfg, reporter=bar)
    for name in report.no_face:
        console.print(f"no face found: {escape(name)}")
    for problem in report.problems:
        console.print(f"[red]error:[/red] {escape(problem)} (skipped)")
    skipped = f", {report.skipped_images} photo(s) already cropped" if report.skipped_images else ""
    console.print(f"{report.written} chip(s) written{skipped}; {len(report.rows)} in {escape(str(report.manifest))}")
    print(report.manifest)
    if report.problems:
        raise FacellmError(f"{len(report.problems)} image(s) could not be read")


@contextmanager
def _deprecation_notes() -> Iterator[None]:
    """Print each config deprecation (an old key or flag that still works) once, as one line on stderr."""
    from rich.markup import escape

    from .errors import ConfigDeprecationWarning

    shown: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("always", ConfigDeprecationWarning)
        default = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if not issubclass(category, ConfigDeprecationWarning):
                default(message, category, *args, **kwargs)
            elif str(message) not in shown:
                shown.add(str(message))
                err_console().print(f"[yellow]deprecated:[/yellow] {escape(str(message))}")

        warnings.showwarning = show
        yield


def expand_compare(argv: list[str]) -> list[str]:
    """``evaluate --compare A B C`` -> ``--compare A --compare B --compare C``.

    click options take a fixed number of values; the README's (and users') form
    lists the folders after one ``--compare``.
    """
    if "evaluate" not in argv:
        return argv
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] != "--compare":
            out.append(argv[i])
            i += 1
            continue
        j = i + 1
        while j < len(argv) and not argv[j].startswith("-"):
            out += ["--compare", argv[j]]
            j += 1
        if j == i + 1:
            out.append("--compare")  # no folder: click reports the missing value
        i = j
    return out


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; the single place known errors are rendered.

    Usage errors are rendered by typer (exit 2); FacellmError prints one red line
    per problem (exit 1); anything else shows its traceback. FACELLM_DEBUG=1
    shows tracebacks for known errors too.
    """
    try:
        with _deprecation_notes():
            app(args=expand_compare(sys.argv[1:] if argv is None else argv), prog_name="facellm")
    except SystemExit as e:
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except FacellmError as e:
        if os.environ.get("FACELLM_DEBUG"):
            raise
        from rich.markup import escape

        console = err_console()
        for line in str(e).splitlines() or [type(e).__name__]:  # escaped: "pip install 'facellm[faces]'" is not markup
            console.print(f"[red]error:[/red] {escape(line)}", markup=True, highlight=False)
        return e.exit_code
    except KeyboardInterrupt:
        err_console().print("[yellow]interrupted[/yellow]")
        return 130
    except BrokenPipeError:
        return 0
    return 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
