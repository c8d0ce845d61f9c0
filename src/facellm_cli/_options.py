"""Command-line options, each declared once: by the config field it sets.

``opt(AskConfig, "generation.max_new_tokens")`` looks the field up when the
module is imported (a renamed field fails right there, not when a user runs the
command) and returns ``Annotated[int | None, typer.Option(...)]`` whose help is
the field's description and whose default is ``None`` (= not given). When the
user gives the flag, its callback records ``path -> value`` on the click context;
:func:`resolve` lays those over the YAML file and under ``--set``. So precedence is
defaults < ``--config`` < flags < ``--set``, and no command keeps a dict of keys.

Options that set no config field (``--json``, ``--config``, ``--set``, ``--draw``)
are plain typer options below.
"""

from __future__ import annotations

import types
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .config import resolve_config
from .errors import ConfigDeprecationWarning

try:  # typer >= 0.20 runs on its own copy of click
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover - older typer on click
    from click import get_current_context  # type: ignore[no-redef]  # the same function from older typer's click

C = TypeVar("C", bound=BaseModel)
_GIVEN = "facellm.flags"  # ctx.meta key: {dotted path: (config class, value)} for the flags the user typed


class OptionDeclarationError(TypeError):
    """An option names a config field that does not exist (a programming error, raised at import)."""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model behind ``M`` or ``M | None``, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (typing.Union, types.UnionType):
        models = [m for a in get_args(annotation) if (m := _model_of(a)) is not None]
        return models[0] if len(models) == 1 else None
    return None


def config_field(cls: type[BaseModel], path: str) -> FieldInfo:
    """The pydantic field at dotted ``path`` under ``cls``; OptionDeclarationError naming the missing part."""
    model: type[BaseModel] | None = cls
    field: FieldInfo | None = None
    walked = cls.__name__
    for part in path.split("."):
        if model is None:
            raise OptionDeclarationError(f"option '{path}': {walked} is not a config section, it has no '{part}'")
        if part not in model.model_fields:
            raise OptionDeclarationError(
                f"option '{path}': {model.__name__} has no field '{part}' (renamed? update the option declaration)"
            )
        field = model.model_fields[part]
        walked = f"{walked}.{part}"
        model = _model_of(field.annotation)
    if field is None or model is not None:
        raise OptionDeclarationError(f"option '{path}': {walked} is a config section, not a value")
    return field


def _cli_type(annotation: Any) -> Any:
    """The type typer parses the flag as; pydantic validates the value afterwards, as for YAML."""
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return _cli_type(args[0]) if len(args) == 1 else str
    if origin is Literal:
        return str
    if origin is list:
        return types.GenericAlias(list, (_cli_type(get_args(annotation)[0]),))  # list[X] for an X known at run time
    if annotation in (str, int, float, bool):
        return annotation
    raise OptionDeclarationError(f"a field of type {annotation!r} cannot be a flag (use --set)")


def _choices(annotation: Any) -> list[str]:
    origin = get_origin(annotation)
    if origin is Literal:
        return [str(a) for a in get_args(annotation)]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return _choices(args[0]) if len(args) == 1 else []
    return []


def _shown_default(field: FieldInfo) -> str | bool:
    """The config default, as ``--help`` shows it (False: nothing to show)."""
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    else:
        return False
    if value is None or value == []:
        return False
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value) if isinstance(value, (str, int, float)) else False


def _recorder(cls: type[BaseModel], path: str, note: str | None) -> Any:
    def record(ctx: typer.Context, param: Any, value: Any) -> Any:
        if value is None or (isinstance(value, (list, tuple)) and not value):
            return value  # not given: the config file or the default decides
        if note:
            warnings.warn(note, ConfigDeprecationWarning, stacklevel=1)
        given = list(value) if isinstance(value, (list, tuple)) else value
        ctx.meta.setdefault(_GIVEN, {})[path] = (cls, str(given) if isinstance(given, Path) else given)
        return value

    return record


def opt(
    cls: type[BaseModel],
    path: str,
    *decls: str,
    old: str | None = None,
    cli_type: Any = None,
    argument: bool = False,
    **kwargs: Any,
) -> Any:
    """``Annotated[T | None, typer.Option]`` for the field of ``cls`` at dotted ``path``.

    ``decls`` are the flag names; without a long one, ``--<last part, kebab-case>`` is added.
    ``old`` marks a hidden, deprecated flag name that sets the same field with a note on stderr.
    ``cli_type`` overrides the parsed type (``str`` for ``--split 0.8,0.1,0.1``, which the
    config splits); ``argument`` makes it a positional argument.
    """
    field = config_field(cls, path)
    typ = cli_type or _cli_type(field.annotation)
    help_text = (field.description or "").replace("[", r"\[")  # rich markup: 'facellm[train]' is text
    if argument:
        info = typer.Argument(help=kwargs.pop("help", help_text), callback=_recorder(cls, path, None), **kwargs)
        return Annotated[typ | None, info]
    long_name = "--" + path.rsplit(".", 1)[-1].replace("_", "-")
    if not any(d.startswith("--") for d in decls):
        decls = (long_name, *decls)
    note = None
    if old is not None:
        new = decls[0].split("/")[0]
        note = f"{old.split('/')[0]}: renamed to {new} (the old flag works until the next release)"
        decls = (old,)
        kwargs["hidden"] = True
    choices = _choices(field.annotation)
    if choices and not all(c in help_text for c in choices):
        help_text = f"{help_text} One of: {', '.join(choices)}."
    info = typer.Option(
        *decls,
        help=kwargs.pop("help", help_text),
        show_default=kwargs.pop("show_default", _shown_default(field)),
        callback=_recorder(cls, path, note),
        **kwargs,
    )
    return Annotated[typ | None, info]


class Options:
    """``O = Options(AskConfig)``; ``O("generation.temperature")`` is ``opt(AskConfig, ...)``."""

    def __init__(self, cls: type[BaseModel]) -> None:
        self.cls = cls

    def __call__(self, path: str, *decls: str, **kwargs: Any) -> Any:
        return opt(self.cls, path, *decls, **kwargs)


def given_flags(cls: type[BaseModel]) -> dict[str, Any]:
    """The flags the user typed in this command, as ``{dotted path: value}``."""
    given = get_current_context().meta.get(_GIVEN, {})
    for path, (owner, _) in given.items():
        if not issubclass(cls, owner):
            raise OptionDeclarationError(f"option '{path}' was declared for {owner.__name__}, not {cls.__name__}")
    return {path: value for path, (_, value) in given.items()}


def resolve(cls: type[C], config: str | Path | None, sets: list[str] | None, flags: dict[str, Any] | None = None) -> C:
    """defaults < ``--config`` YAML < the flags given (``given_flags`` unless passed) < ``--set``."""
    return resolve_config(cls, config, given_flags(cls) if flags is None else flags, sets)


def renamed_flag(old: str, new: str) -> Any:
    """A hidden, deprecated switch for a flag that sets no config field; the command ORs it with ``new``."""

    def note(value: bool) -> bool:
        if value:
            warnings.warn(
                f"{old}: renamed to {new} (the old flag works until the next release)",
                ConfigDeprecationWarning,
                stacklevel=1,
            )
        return value

    return Annotated[bool, typer.Option(old, hidden=True, callback=note)]


# ---- options that set no config field ----
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file (flags override it).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any config key, repeatable: --set generation.max_new_tokens=64."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON lines on stdout.")]
