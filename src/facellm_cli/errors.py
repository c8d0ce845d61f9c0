"""Typed errors. Library code raises these; only ``cli.py`` renders them.

Every message names the failing value and the next step, so the CLI can print
it as one line and exit 1 without a traceback.
"""

from __future__ import annotations


class FacellmError(Exception):
    """Base class for errors a user can act on."""

    exit_code = 1


class ConfigError(FacellmError):
    """A config file, flag or ``--set`` override is invalid."""

    def __init__(self, problems: list[str] | str, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        suffix = f" ({source})" if source else ""
        super().__init__("\n".join(f"{p}{suffix}" for p in self.problems))


class ImageError(FacellmError):
    """An image is missing, empty, truncated, too large or not an image."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{reason}: {path}")


class MissingDependencyError(FacellmError):
    """An optional extra is not installed."""

    def __init__(self, what: str, extra: str, package: str | None = None) -> None:
        self.extra = extra
        pkg = f" ({package} is not importable)" if package else ""
        super().__init__(f"{what} needs the '{extra}' extras{pkg}: pip install 'facellm[{extra}]'")


class ModelLoadError(FacellmError):
    """A model, processor or adapter cannot be loaded."""


class QuantizationError(ModelLoadError):
    """4/8-bit was asked for where bitsandbytes cannot run."""


class AdapterError(ModelLoadError):
    """A PEFT adapter does not exist or does not match the base model."""


class EndpointError(FacellmError):
    """An OpenAI-compatible endpoint refused, failed or answered nonsense."""


class DataError(FacellmError):
    """An input record (label row, JSONL line, dataset entry) is invalid."""


class OutputExistsError(FacellmError):
    """An output would overwrite earlier work."""


class ConfigDeprecationWarning(FutureWarning):
    """A config key or flag that still works but has a new name; the CLI prints it as one line."""
