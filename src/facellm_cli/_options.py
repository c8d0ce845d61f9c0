"""Shared ``Annotated`` option aliases so every command spells its options the same way.

Flags default to ``None`` so that only what the user typed overrides the config file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file (flags override it).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any config key, repeatable: --set generation.max_new_tokens=64."),
]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Hub id or local model folder.")]
SubfolderOpt = Annotated[str | None, typer.Option("--subfolder", help="Folder inside the checkpoint with config.json.")]
AdapterOpt = Annotated[str | None, typer.Option("--adapter", help="PEFT adapter folder (e.g. a finetune output).")]
QuantOpt = Annotated[str | None, typer.Option("--quantization", "-q", help="none | 8bit | 4bit (bitsandbytes).")]
EngineOpt = Annotated[
    str | None,
    typer.Option("--engine", help="transformers (default) | vllm (pip install 'facellm[vllm]'; see README)."),
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps.")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16.")]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", min=1, help="torch CPU threads (default: the idle cores this process may use)."),
]
MaxNewTokensOpt = Annotated[int | None, typer.Option("--max-new-tokens", help="Most tokens to generate.")]
TemperatureOpt = Annotated[float | None, typer.Option("--temperature", help="0 = greedy.")]
SystemOpt = Annotated[str | None, typer.Option("--system", help="System prompt.")]
BatchSizeOpt = Annotated[int | None, typer.Option("--batch-size", "-b", help="Items per batch.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON lines on stdout.")]
OutDirOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Output folder.")]
EndpointOpt = Annotated[
    str | None, typer.Option("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1.")
]
ApiKeyEnvOpt = Annotated[
    str | None, typer.Option("--api-key-env", help="Name of the environment variable holding the API key.")
]


def model_flags(
    model: str | None,
    subfolder: str | None = None,
    adapter: str | None = None,
    quantization: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    prefix: str = "model",
    engine: str | None = None,
    threads: int | None = None,
) -> dict[str, object]:
    """Dotted-key flag overrides for a ModelConfig nested at ``prefix``."""
    values = {
        "model": model,
        "subfolder": subfolder,
        "adapter": adapter,
        "quantization": quantization,
        "device": device,
        "dtype": dtype,
        "engine": engine,
        "threads": threads,
    }
    return {f"{prefix}.{k}": v for k, v in values.items()}
