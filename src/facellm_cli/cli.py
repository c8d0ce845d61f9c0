"""The ``facellm`` command line: one thin function per subcommand, one exit point.

Commands resolve their config, call one library function and render the
result: results to stdout, progress and logs to stderr. Heavy libraries are
imported inside commands so ``facellm --help`` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from ._options import (
    AdapterOpt,
    BatchSizeOpt,
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxNewTokensOpt,
    ModelOpt,
    OutDirOpt,
    QuantOpt,
    SetOpt,
    SubfolderOpt,
    SystemOpt,
    TemperatureOpt,
    model_flags,
)
from .errors import FacellmError

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


def err_console():  # noqa: ANN201 - rich is imported lazily
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


def _version(value: bool) -> None:
    if value:
        typer.echo(f"facellm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = None,
) -> None:
    """FaceLLM as a tool (paper: arXiv 2507.10300)."""


@app.command()
def ask(
    inputs: Annotated[list[str], typer.Argument(help="IMAGE... QUESTION: image files, folders, globs or - (stdin), then the question.")],
    model: ModelOpt = None,
    subfolder: SubfolderOpt = None,
    adapter: AdapterOpt = None,
    quantization: QuantOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    temperature: TemperatureOpt = None,
    system: SystemOpt = None,
    batch_size: BatchSizeOpt = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Answer a question about face images. One image streams its answer; several print one line each."""
    from .config import AskConfig, resolve_config
    from .infer.ask import ask_many, ask_stream, resolve_inputs

    if len(inputs) < 2:
        raise typer.BadParameter("give at least one image and a question: facellm ask face.jpg 'what expression is this?'")
    *image_args, question = inputs
    flags = model_flags(model, subfolder, adapter, quantization, device, dtype)
    flags.update({"generation.max_new_tokens": max_new_tokens, "generation.temperature": temperature,
                  "generation.system": system, "batch_size": batch_size})
    cfg = resolve_config(AskConfig, config, flags, set_)
    images = resolve_inputs(image_args)
    stdin_bytes = sys.stdin.buffer.read() if "-" in images else None
    lm = _load(cfg.model)
    if len(images) == 1 and not json_out:
        for piece in ask_stream(lm, cfg, images[0], question, stdin_bytes):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    failed = []
    for r in ask_many(lm, cfg, images, question, stdin_bytes):
        if r.error:
            failed.append(r.image)
            err_console().print(f"[red]error:[/red] {r.error} (skipped)")
            if json_out:
                print(json.dumps(r.to_json(), ensure_ascii=False), flush=True)
            continue
        if json_out:
            print(json.dumps(r.to_json(), ensure_ascii=False), flush=True)
        else:
            print(f"{r.image}\t{' '.join((r.answer or '').split())}", flush=True)
    if failed:
        raise FacellmError(f"{len(failed)} of {len(images)} images could not be read: {', '.join(failed)}")


def _load(model_cfg):  # noqa: ANN001, ANN202 - torch types are imported lazily
    quiet_libraries()
    from .models.loader import load_model_and_processor

    with err_console().status(f"loading {model_cfg.model} ..."):
        return load_model_and_processor(model_cfg)


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
        Optional[str], typer.Option("--data", help="Training file (messages .jsonl or ShareGPT .json).")
    ] = None,
    model: ModelOpt = None,
    method: Annotated[Optional[str], typer.Option("--method", help="lora | qlora | full.")] = None,
    out: OutDirOpt = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop after N optimiser steps.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the latest complete checkpoint in --out.")
    ] = False,
    resume_from: Annotated[
        Optional[str], typer.Option("--resume-from", help="Continue from this checkpoint folder (implies --resume).")
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

    flags = {"data.train": data, "model.model": model, "method": method, "output_dir": str(out) if out else None,
             "train.max_steps": max_steps}
    cfg = resolve_config(FinetuneConfig, config, flags, set_)
    quiet_libraries()
    console = err_console()
    res = run_finetune(cfg, resume=resume_from or ("latest" if resume else None), overwrite=overwrite,
                       source=str(config) if config else None, log=lambda m: console.print(m, markup=False))
    mem = f"{res.peak_memory_bytes / 2**30:.2f} GiB ({res.peak_memory_kind})"
    console.print(f"done: {res.global_step} steps, {res.samples_per_second:.2f} samples/s, peak memory {mem}, "
                  f"final train loss {res.final_train_loss}, eval loss {res.final_eval_loss}; "
                  f"saved to {res.output_dir}")
    print(json.dumps(res.to_json()) if json_out else res.output_dir)


@finetune_app.command("merge")
def finetune_merge(
    adapter: Annotated[Path, typer.Option("--adapter", help="LoRA adapter folder (a finetune output).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the merged standalone model.")],
    base: Annotated[
        Optional[str], typer.Option("--base", help="Base model (default: the one the adapter records).")
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
    from .train.finetune import merge_adapter

    with err_console().status("merging ..."):
        res = merge_adapter(adapter, out, base=base, max_shard_size=max_shard_size, dtype=dtype or "auto",
                            overwrite=overwrite)
    size = f"{res.total_bytes / 1e6:.1f} MB"
    err_console().print(f"merged {res.adapter} into {res.base_model}: {len(res.files)} files, {size}")
    print(json.dumps(res.__dict__) if json_out else res.output_dir)


# ---- synth-faces ----
@dev_app.command("synth-faces")
def synth_faces_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write face PNGs and labels.csv to.")],
    n: Annotated[int, typer.Option("--n", help="Number of faces (expressions are balanced).")] = 300,
    seed: Annotated[int, typer.Option("--seed", help="Seed: the same seed gives byte-identical files.")] = 0,
    size: Annotated[int, typer.Option("--size", help="Image side in pixels (32 or more).")] = 64,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty folder.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Draw synthetic faces with known expression, eyes, pose, glasses, skin tone and background."""
    from .synth import synth_faces

    res = synth_faces(out_dir, n, seed=seed, size=size, overwrite=overwrite)
    err_console().print(f"{res.count} faces written; expressions: {res.counts['expression']}")
    if json_out:
        info = {"out_dir": str(res.out_dir), "labels": str(res.labels_csv), "count": res.count, "counts": res.counts}
        print(json.dumps(info))
    else:
        print(res.labels_csv)


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


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; the single place known errors are rendered.

    Usage errors are rendered by typer (exit 2); FacellmError prints one red line
    per problem (exit 1); anything else shows its traceback. FACELLM_DEBUG=1
    shows tracebacks for known errors too.
    """
    try:
        app(args=argv, prog_name="facellm")
    except SystemExit as e:
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except FacellmError as e:
        if os.environ.get("FACELLM_DEBUG"):
            raise
        console = err_console()
        for line in str(e).splitlines() or [type(e).__name__]:
            console.print(f"[red]error:[/red] {line}", markup=True, highlight=False)
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
