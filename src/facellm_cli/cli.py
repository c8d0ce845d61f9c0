"""The ``facellm`` command line: one thin function per subcommand, one exit point.

Commands resolve their config, call one library function and render the
result: results to stdout, progress and logs to stderr. Every option that sets a
config value is declared once, by the field it sets (``_options.opt``), and
checked when this module is imported. Heavy libraries are imported inside
commands so ``facellm --help`` stays fast.
"""

# No ``from __future__ import annotations``: the option declarations in the signatures below
# are evaluated at import, so a renamed config field fails here, not when a user runs a command.

import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from . import __version__
from ._options import ConfigOpt, JsonOpt, Options, SetOpt, config_field, given_flags, renamed_flag, resolve
from ._render import err_console
from .config import (
    AnnotateConfig,
    AskConfig,
    DatasetConfig,
    EvalConfig,
    FaceCropConfig,
    FaceDetectConfig,
    FinetuneConfig,
    ModelConfig,
    OverlapConfig,
    QuickstartConfig,
    ServeConfig,
)
from .errors import ConfigDeprecationWarning, FacellmError

if TYPE_CHECKING:
    from .infer.engine import Engine

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


def _load(model_cfg: ModelConfig) -> "Engine":
    quiet_libraries()
    from ._progress import ProgressBar
    from .infer.engine import load_engine

    with ProgressBar(err_console(), "loading", transient=True) as bar:
        return load_engine(model_cfg, reporter=bar)  # its notes (the CPU thread choice) print above the bar


# With --base-url, --model names the served model (_endpoint_flags moves it to endpoint.model).
MODEL_OR_SERVED = "Hub id or local model folder; with --base-url, the model name the endpoint serves."

# ---- ask ----
A = Options(AskConfig)


@app.command()
def ask(
    inputs: Annotated[
        list[str],
        typer.Argument(help="IMAGE... QUESTION: image files, folders, globs or - (stdin), then the question."),
    ],
    model: A("model.model", "-m", help=MODEL_OR_SERVED) = None,
    subfolder: A("model.subfolder") = None,
    adapter: A("model.adapter") = None,
    quantization: A("model.quantization", "-q") = None,
    device: A("model.device") = None,
    dtype: A("model.dtype") = None,
    engine: A("model.engine") = None,
    threads: A("model.threads", min=1) = None,
    max_new_tokens: A("generation.max_new_tokens") = None,
    temperature: A("generation.temperature") = None,
    system: A("generation.system") = None,
    batch_size: A("batch_size", "-b") = None,
    json_out: JsonOpt = False,
    faces: A("faces") = None,
    base_url: A("endpoint.base_url") = None,
    api_key_env: A("endpoint.api_key_env") = None,
    draw: Annotated[
        Path | None,
        typer.Option(
            "--draw", help="With --faces: write the photo with numbered boxes and answers (a folder for many)."
        ),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Answer a question about face images. One image streams its answer; several print one line each.

    With --base-url, a model served by an OpenAI-compatible endpoint answers (--model names it).
    """
    from . import _render
    from .infer.ask import resolve_inputs

    if len(inputs) < 2:
        raise typer.BadParameter(
            "give at least one image and a question: facellm ask face.jpg 'what expression is this?'"
        )
    if api_key_env and not base_url:
        raise typer.BadParameter("--api-key-env names the key of an endpoint: give --base-url too")
    *image_args, question = inputs
    cfg = resolve(AskConfig, config, set_, _endpoint_flags(given_flags(AskConfig)))
    if draw is not None and not cfg.faces:
        raise typer.BadParameter("--draw needs --faces (it draws the face boxes)")
    images = resolve_inputs(image_args)
    if draw is not None and len(images) > 1 and draw.suffix:
        raise typer.BadParameter(f"--draw {draw}: several photos need a folder, not a file name")
    stdin_bytes = sys.stdin.buffer.read() if "-" in images else None
    if cfg.faces:
        from .faces import check_available

        check_available()  # the install hint before a model loads
        _render.ask_faces(_load(cfg.model), cfg, images, question, stdin_bytes, json_out, draw)
        return
    stream, many = _answerers(cfg, images, question, stdin_bytes)
    if len(images) == 1 and not json_out:
        _render.stream(stream())
    else:
        _render.ask_results(many(), json_out, len(images))


def _answerers(
    cfg: AskConfig, images: list[str], question: str, stdin_bytes: bytes | None
) -> tuple[Callable[[], Iterator[str]], Callable[[], Iterator[Any]]]:
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


# ---- build-dataset ----
D = Options(DatasetConfig)


@app.command("build-dataset")
def build_dataset(
    inputs: D("inputs", argument=True) = None,
    image_root: D("image_root") = None,
    out: D("out", "-o") = None,
    labels: D("labels") = None,
    split: D("split", cli_type=str) = None,
    seed: D("seed") = None,
    merge_aspects: D("merge_aspects", "--merge-aspects/--no-merge-aspects") = None,
    mcq: D("mcq", cli_type=str) = None,
    mcq_train: D("mcq_train", "--mcq-train/--no-mcq-train") = None,
    group_key: D("group_key") = None,
    stratify: D("stratify") = None,
    skip_invalid: D("skip_invalid", "--skip-invalid/--no-skip-invalid") = None,
    overwrite: D("overwrite", "--overwrite/--no-overwrite") = None,
    force: D("overwrite", "--overwrite/--no-overwrite", old="--force/--no-force") = None,
    exclude_overlap_with: D("exclude_overlap_with") = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Validate annotations, split them by image and write ShareGPT, messages JSONL and MCQ files."""
    from ._render import dataset_report
    from .data.build import build_dataset as run_build

    cfg = resolve(DatasetConfig, config, set_)
    if cfg.exclude_overlap_with and cfg.overlap_cache is None:
        cfg.overlap_cache = str(_overlap_cache())
    from ._progress import ProgressBar

    with ProgressBar(err_console(), "build-dataset", transient=True) as bar:
        report = run_build(cfg, reporter=bar)
    dataset_report(report, bool(cfg.mcq), json_out)


# ---- evaluate ----
E = Options(EvalConfig)


@app.command()
def evaluate(
    benchmark: E("benchmark") = None,
    data_dir: E("data_dir") = None,
    data: E("data") = None,
    image_root: E("image_root") = None,
    model: E("model.model", "-m", help=MODEL_OR_SERVED) = None,
    subfolder: E("model.subfolder") = None,
    adapter: E("model.adapter") = None,
    quantization: E("model.quantization", "-q") = None,
    device: E("model.device") = None,
    dtype: E("model.dtype") = None,
    engine: E("model.engine") = None,
    threads: E("model.threads", min=1) = None,
    base_url: E("endpoint.base_url") = None,
    api_key_env: E("endpoint.api_key_env") = None,
    concurrency: E("endpoint.concurrency") = None,
    split: E("split") = None,
    mode: E("mode") = None,
    batch_size: E("batch_size", "-b") = None,
    limit: E("limit") = None,
    tasks: E("tasks") = None,
    with_task_description: E("with_task_description") = None,
    max_new_tokens: E("generation.max_new_tokens") = None,
    out: E("out", "-o") = None,
    compare: Annotated[
        list[str] | None,
        typer.Option(
            "--compare",
            help="Result folders to show side by side (--compare DIR1 DIR2 ...); alone, only compares "
            "(table on stdout, comparison.png in --out or the current folder).",
        ),
    ] = None,
    train_data: E("train_data") = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Multiple-choice accuracy on FaceXBench or a JSONL set: batched, resumable, with per-task and fairness reports."""
    from . import _render

    if compare and not (benchmark or data or config or set_):
        _render.compare(compare, Path(out) if out else Path("."), json_out)
        return
    from ._progress import ProgressBar
    from .eval.runner import evaluate as run_eval

    cfg = resolve(EvalConfig, config, set_, _endpoint_flags(given_flags(EvalConfig)))
    if cfg.train_data and cfg.overlap_cache is None:
        cfg.overlap_cache = str(_overlap_cache())
    api_key = _api_key(cfg.endpoint.api_key_env, cfg.endpoint.base_url) if cfg.endpoint else None
    with ProgressBar(err_console(), "evaluate", unit="questions", cpu_bound=cfg.endpoint is None) as bar:
        outcome = run_eval(cfg, api_key=api_key, reporter=bar)
    _render.eval_outcome(outcome, cfg.endpoint is None and cfg.mode == "generate", json_out)
    if compare:
        if not json_out:
            print()
        _render.compare([*compare, str(outcome.out_dir)], outcome.out_dir, json_out)


def _endpoint_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """With --base-url, --model names the served model; local-model flags are kept so the config rejects them."""
    if "endpoint.base_url" not in flags or "model.model" not in flags:
        return flags
    routed = dict(flags)
    routed["endpoint.model"] = routed.pop("model.model")
    return routed


# ---- annotate ----
N = Options(AnnotateConfig)


@app.command()
def annotate(
    images: N("images", argument=True) = None,
    labels: N("labels", "-l") = None,
    out: N("out", "-o") = None,
    base_url: N("endpoint.base_url") = None,
    model: N("endpoint.model", "-m") = None,
    api_key_env: N("endpoint.api_key_env") = None,
    provider: N("provider") = None,
    mode: N("mode") = None,
    prompts: N("prompts") = None,
    concurrency: N("endpoint.concurrency") = None,
    rpm: N("endpoint.rpm") = None,
    max_retries: N("endpoint.max_retries") = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Estimate requests, tokens and cost; send nothing.")
    ] = False,
    batch: N("batch") = None,
    faces: N("faces") = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write question-answer pairs about face images (FairFaceGPT pipeline): resumable, concurrent, fault-tolerant."""
    from ._render import annotate_summary
    from .annotate.pipeline import annotate as run_annotate
    from .annotate.progress import AnnotateProgress

    cfg = resolve(AnnotateConfig, config, set_)
    ep = cfg.endpoint
    api_key = None if cfg.provider == "template" or dry_run else _api_key(ep.api_key_env, ep.base_url)
    with AnnotateProgress(err_console(), "annotate") as bar:
        summary = run_annotate(cfg, api_key=api_key, dry_run=dry_run, reporter=bar)
    annotate_summary(summary, json_out)


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
S = Options(ServeConfig)


@app.command()
def serve(
    model: S("model.model", "-m") = None,
    subfolder: S("model.subfolder") = None,
    adapter: S("model.adapter") = None,
    quantization: S("model.quantization", "-q") = None,
    device: S("model.device") = None,
    dtype: S("model.dtype") = None,
    engine: S("model.engine") = None,
    threads: S("model.threads", min=1) = None,
    host: S("host") = None,
    port: S("port", "-p") = None,
    api_key_env: S("api_key_env") = None,
    served_model_name: S("served_model_name") = None,
    max_batch_size: S("max_batch_size") = None,
    max_wait_ms: S("max_wait_ms") = None,
    allow_remote_images: S("allow_remote_images") = None,
    log_json: S("log_json") = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/models, /health)."""
    from .serve.app import require_serve_extras, serve_forever

    cfg = resolve(ServeConfig, config, set_)
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
T = Options(FinetuneConfig)


@finetune_app.callback()
def finetune(
    ctx: typer.Context,
    config: ConfigOpt = None,
    data: T("data.train", "--data") = None,
    model: T("model.model", "-m") = None,
    method: T("method") = None,
    out: T("out", "-o") = None,
    max_steps: T("train.max_steps") = None,
    threads: T("model.threads", min=1) = None,
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
    from ._progress import ProgressBar
    from ._render import finetune_result
    from .train.finetune import finetune as run_finetune

    cfg = resolve(FinetuneConfig, config, set_)
    quiet_libraries()
    # Under accelerate/torchrun only the first process draws the bar (the others report no steps).
    with ProgressBar(err_console(), "finetune", unit="steps", disable=os.environ.get("RANK", "0") != "0") as bar:
        res = run_finetune(
            cfg,
            resume=resume_from or ("latest" if resume else None),
            overwrite=overwrite,
            source=str(config) if config else None,
            reporter=bar,
        )
    finetune_result(res, json_out)


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
    dtype: Annotated[str | None, typer.Option("--dtype", help=config_field(ModelConfig, "dtype").description)] = None,
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
Q = Options(QuickstartConfig)


@app.command()
def quickstart(
    out: Q("out", "-o") = None,
    faces: Q("faces") = None,
    epochs: Q("epochs") = None,
    seed: Q("seed") = None,
    base_url: Q("endpoint.base_url") = None,
    api_key_env: Q("endpoint.api_key_env") = None,
    overwrite: Q("overwrite") = None,
    force: Q("overwrite", old="--force") = None,
    threads: Q("threads", min=1) = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run the whole FaceLLM loop offline: synthetic faces -> annotate -> build-dataset -> finetune -> evaluate -> ask."""
    from ._progress import ProgressBar
    from ._render import quickstart_result
    from .quickstart import quickstart as run_quickstart

    cfg = resolve(QuickstartConfig, config, set_)
    endpoint = cfg.annotate_endpoint
    api_key = _api_key(endpoint.api_key_env, endpoint.base_url) if endpoint else None
    quiet_libraries()
    with ProgressBar(err_console(), "quickstart", headers=True, log_prefix="   ") as bar:
        result = run_quickstart(cfg, api_key=api_key, reporter=bar)
    if json_out:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        quickstart_result(result)


def _overlap_cache() -> Path:
    from .data.overlap import default_cache_path

    return default_cache_path(dict(os.environ))


# ---- data ----
data_app = typer.Typer(help="Dataset hygiene: compare training data with benchmarks.", no_args_is_help=True)
app.add_typer(data_app, name="data")
V = Options(OverlapConfig)


@data_app.command("overlap")
def data_overlap(
    train: V("train", argument=True) = None,
    against: V("against") = None,
    benchmark: V("benchmark") = None,
    data_dir: V("data_dir") = None,
    image_root: V("image_root") = None,
    max_distance: V("max_distance") = None,
    max_colour_distance: V("max_colour_distance") = None,
    sheet: V("sheet") = None,
    sheet_pairs: V("sheet_pairs") = None,
    show: Annotated[int, typer.Option("--show", help="Pairs listed in the table.")] = 20,
    workers: V("workers") = None,
    cache: V("cache") = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Find training images that are also benchmark images (perceptual hash: survives re-encoding, resizing, crops)."""
    from ._progress import ProgressBar
    from .data.overlap import overlap, render_table

    cfg = resolve(OverlapConfig, config, set_)
    if cfg.cache is None:
        cfg.cache = str(_overlap_cache())
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
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty folder.")] = False,
    force: renamed_flag("--force", "--overwrite") = False,
) -> None:
    """Build a randomly initialised few-MB model of a real VLM family (for testing pipelines offline)."""
    from .errors import OutputExistsError
    from .testing import build_tiny_model

    if out_dir.exists() and any(out_dir.iterdir()) and not (overwrite or force):
        raise OutputExistsError(f"output folder is not empty: {out_dir} (choose another or pass --overwrite)")
    quiet_libraries()
    path = build_tiny_model(out_dir, family, seed=seed, image_size=image_size)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    err_console().print(f"tiny {family} model written ({size / 1e6:.1f} MB)")
    print(path)


# ---- faces ----
faces_app = typer.Typer(help="Faces in photos: detect them and crop FairFace-style chips.", no_args_is_help=True)
app.add_typer(faces_app, name="faces")
ImagesArg = Annotated[list[str], typer.Argument(help="Photos: files, folders or globs.")]
F = Options(FaceDetectConfig)
K = Options(FaceCropConfig)


@faces_app.command("detect")
def faces_detect(
    images: ImagesArg,
    threshold: F("threshold") = None,
    min_size: F("min_size") = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per image on stdout.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Find faces: a box, 5 landmarks (eyes, nose, mouth corners) and a score per face."""
    from ._render import detections
    from .faces import detect_files

    detections(detect_files(images, resolve(FaceDetectConfig, config, set_)), json_out)


@faces_app.command("crop")
def faces_crop(
    images: ImagesArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the chips and manifest.csv.")],
    margin: K("margin") = None,
    size: K("size") = None,
    align: K("align", "--align/--no-align") = None,
    threshold: K("threshold") = None,
    min_size: K("min_size") = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Crop every face into FairFace-style chips plus a manifest.csv that annotate --labels and build-dataset read."""
    from ._progress import ProgressBar
    from ._render import crop_report
    from .faces import crop_files

    cfg = resolve(FaceCropConfig, config, set_)
    with ProgressBar(err_console(), "cropping faces", unit="photos", transient=True) as bar:
        report = crop_files(images, out, cfg, reporter=bar)
    crop_report(report)


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


@contextmanager
def _deprecation_notes() -> Iterator[None]:
    """Print each deprecation (an old key or flag that still works) once, as one line on stderr."""
    from rich.markup import escape

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
