"""Shared ``Annotated`` option aliases so every command spells its options the same way.

Flags default to ``None`` so that only what the user typed overrides the config file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (flags override it).")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override any config key, repeatable: --set generation.max_new_tokens=64."),
]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Hub id or local model folder.")]
SubfolderOpt = Annotated[Optional[str], typer.Option("--subfolder", help="Folder inside the checkpoint with config.json.")]
AdapterOpt = Annotated[Optional[str], typer.Option("--adapter", help="PEFT adapter folder (e.g. a finetune output).")]
QuantOpt = Annotated[Optional[str], typer.Option("--quantization", "-q", help="none | 8bit | 4bit (bitsandbytes).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps.")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="auto | float32 | bfloat16 | float16.")]
MaxNewTokensOpt = Annotated[Optional[int], typer.Option("--max-new-tokens", help="Most tokens to generate.")]
TemperatureOpt = Annotated[Optional[float], typer.Option("--temperature", help="0 = greedy.")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", help="System prompt.")]
BatchSizeOpt = Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Items per batch.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON lines on stdout.")]
OutDirOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder.")]
EndpointOpt = Annotated[
    Optional[str], typer.Option("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1.")
]
ApiKeyEnvOpt = Annotated[
    Optional[str], typer.Option("--api-key-env", help="Name of the environment variable holding the API key.")
]


def model_flags(
    model: str | None,
    subfolder: str | None = None,
    adapter: str | None = None,
    quantization: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    prefix: str = "model",
) -> dict[str, object]:
    """Dotted-key flag overrides for a ModelConfig nested at ``prefix``."""
    values = {
        "model": model,
        "subfolder": subfolder,
        "adapter": adapter,
        "quantization": quantization,
        "device": device,
        "dtype": dtype,
    }
    return {f"{prefix}.{k}": v for k, v in values.items()}
