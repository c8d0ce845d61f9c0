"""Each option is declared once, by the config field it sets: help from the field, checked paths, one override."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from pydantic import Field
from typer.main import get_command
from typer.testing import CliRunner

from facellm_cli._options import ConfigOpt, OptionDeclarationError, Options, SetOpt, config_field, opt, resolve
from facellm_cli.cli import app
from facellm_cli.config import (
    AnnotateConfig,
    AskConfig,
    DatasetConfig,
    EvalConfig,
    FaceCropConfig,
    FinetuneConfig,
    OverlapConfig,
    QuickstartConfig,
    ServeConfig,
    StrictModel,
    resolve_config,
)
from facellm_cli.errors import ConfigDeprecationWarning
from facellm_cli.testing.corpus import make_corpus


class _RenamedGeneration(StrictModel):
    """GenerationConfig after someone renamed max_new_tokens."""

    max_tokens: int = Field(256, gt=0, description="Most tokens to generate per answer.")


class _RenamedAsk(AskConfig):
    generation: _RenamedGeneration = Field(default_factory=_RenamedGeneration, description="Decoding settings.")


def test_an_option_for_a_renamed_field_fails_at_declaration() -> None:
    assert opt(AskConfig, "generation.max_new_tokens") is not None
    with pytest.raises(OptionDeclarationError, match="_RenamedGeneration has no field 'max_new_tokens'"):
        opt(_RenamedAsk, "generation.max_new_tokens")
    with pytest.raises(OptionDeclarationError, match="AskConfig has no field 'genration'"):
        opt(AskConfig, "genration.max_new_tokens")
    with pytest.raises(OptionDeclarationError, match="AskConfig.generation is a config section, not a value"):
        opt(AskConfig, "generation")


def test_a_command_module_declaring_a_renamed_field_fails_at_import(tmp_path: Path) -> None:
    """The same declaration cli.py uses, in a module: importing it raises, before any command runs."""
    source = textwrap.dedent(
        """
        import typer
        from facellm_cli._options import Options

        app = typer.Typer()
        A = Options(_RenamedAsk)

        @app.command()
        def ask(max_new_tokens: A("generation.max_new_tokens") = None) -> None:
            raise AssertionError("never reached: the module must not import")
        """
    )
    (tmp_path / "renamed_cli.py").write_text(source)
    spec = importlib.util.spec_from_file_location("renamed_cli", tmp_path / "renamed_cli.py")
    module = importlib.util.module_from_spec(spec)
    module._RenamedAsk = _RenamedAsk  # the renamed config, handed in (tests are not importable by name)
    sys.modules.pop("renamed_cli", None)
    with pytest.raises(OptionDeclarationError, match="has no field 'max_new_tokens'"):
        spec.loader.exec_module(module)


HELP_CASES = [
    (("ask",), "--max-new-tokens", AskConfig, "generation.max_new_tokens"),
    (("ask",), "--quantization", AskConfig, "model.quantization"),
    (("evaluate",), "--limit", EvalConfig, "limit"),
    (("evaluate",), "--concurrency", EvalConfig, "endpoint.concurrency"),
    (("annotate",), "--concurrency", AnnotateConfig, "endpoint.concurrency"),
    (("serve",), "--max-wait-ms", ServeConfig, "max_wait_ms"),
    (("build-dataset",), "--group-key", DatasetConfig, "group_key"),
    (("finetune",), "--max-steps", FinetuneConfig, "train.max_steps"),
    (("finetune",), "--out", FinetuneConfig, "out"),
    (("quickstart",), "--epochs", QuickstartConfig, "epochs"),
    (("data", "overlap"), "--max-colour-distance", OverlapConfig, "max_colour_distance"),
    (("faces", "crop"), "--margin", FaceCropConfig, "margin"),
]


def _flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


@pytest.mark.parametrize(("command", "flag", "cls", "path"), HELP_CASES, ids=[f"{c[0]} {c[1]}" for c in HELP_CASES])
def test_help_shows_the_fields_description(cli, command, flag, cls, path) -> None:  # noqa: ANN001
    r = cli(*command, "--help")
    assert r.code == 0
    description = _flat(config_field(cls, path).description)
    text = _flat(r.out)
    assert flag in text and description in text


def _config_options(group: Any, prefix: tuple[str, ...] = ()):  # noqa: ANN202
    """(command path, click parameter) for every visible option that records a config value."""
    for name, cmd in getattr(group, "commands", {}).items():
        for param in cmd.params:
            if param.callback is not None and not getattr(param, "hidden", False) and param.name != "version":
                yield (*prefix, name), param
        yield from _config_options(cmd, (*prefix, name))


def test_every_option_defaults_to_not_given() -> None:
    """Only what the user typed overrides the config file: no config-backed flag has a default of its own."""
    found = list(_config_options(get_command(app)))
    assert len(found) > 60
    with_default = [(" ".join(path), p.name, p.default) for path, p in found if p.default not in (None, (), [])]
    assert with_default == []


_A = Options(AskConfig)
probe = typer.Typer()


@probe.command()
def show(
    max_new_tokens: _A("generation.max_new_tokens") = None,
    temperature: _A("generation.temperature") = None,
    faces: _A("faces") = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    cfg = resolve(AskConfig, config, set_)
    print(cfg.generation.max_new_tokens, cfg.generation.temperature, cfg.generation.top_p, cfg.faces)


def test_flags_sit_between_the_config_file_and_set(tmp_path: Path) -> None:
    """defaults < --config < flags < --set, through the one generic mechanism."""
    run = CliRunner()
    yml = tmp_path / "c.yaml"
    yml.write_text(yaml.safe_dump({"generation": {"max_new_tokens": 10, "temperature": 0.5}}))
    assert run.invoke(probe, []).output.split() == ["256", "0.0", "1.0", "False"]
    assert run.invoke(probe, ["--config", yml]).output.split() == ["10", "0.5", "1.0", "False"]
    r = run.invoke(probe, ["--config", yml, "--max-new-tokens", "20", "--faces"])
    assert r.output.split() == ["20", "0.5", "1.0", "True"]
    r = run.invoke(probe, ["--config", yml, "--max-new-tokens", "20", "--set", "generation.max_new_tokens=30"])
    assert r.output.split() == ["30", "0.5", "1.0", "False"]


def test_old_config_keys_still_load_with_a_warning() -> None:
    cases = [
        (FinetuneConfig, {"output_dir": "runs/x"}, "out", "runs/x"),
        (DatasetConfig, {"inputs": ["a"], "image_root": "r", "out": "o", "force": True}, "overwrite", True),
        (QuickstartConfig, {"force": True}, "overwrite", True),
        (AnnotateConfig, {"labels": "l.csv", "refusal_phrases": ["nope"]}, "refusal_patterns", ["nope"]),
        (AnnotateConfig, {"labels": "l.csv", "label_image_column": "img"}, "labels_image_column", "img"),
    ]
    for cls, data, new, value in cases:
        old = next(k for k in data if k in cls.renamed)
        with pytest.warns(ConfigDeprecationWarning, match=f"^{old}: renamed to {new} \\(the old key works until"):
            cfg = cls.model_validate(data)
        assert getattr(cfg, new) == value
    with pytest.warns(ConfigDeprecationWarning):  # both given: the new name (a flag, or a newer file) wins
        assert resolve_config(FinetuneConfig, None, {"output_dir": "a", "out": "b"}).out == "b"


def test_old_config_key_prints_one_note(tmp_path: Path, cli) -> None:  # noqa: ANN001
    yml = tmp_path / "run.yaml"
    yml.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "model": {"model": str(tmp_path)}}))
    r = cli("finetune", "--config", yml)
    assert r.code == 1 and "data.train: no training file given" in r.err
    notes = [ln for ln in r.err.splitlines() if ln.startswith("deprecated:")]
    assert notes == ["deprecated: output_dir: renamed to out (the old key works until the next release)"]


def test_old_flag_works_and_prints_one_note(tmp_path: Path, cli) -> None:  # noqa: ANN001
    jsonl, _ = make_corpus(tmp_path, n_images=10)
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.json").write_text("[]")  # an earlier run's output
    base = ("build-dataset", jsonl, "--image-root", tmp_path / "faces", "--out", out)
    r = cli(*base)
    assert r.code == 1 and "pass --overwrite" in r.err and "deprecated:" not in r.err
    r = cli(*base, "--force")
    assert r.code == 0, r.err
    assert [ln for ln in r.err.splitlines() if ln.startswith("deprecated:")] == [
        "deprecated: --force: renamed to --overwrite (the old flag works until the next release)"
    ]
    assert yaml.safe_load((out / "config.yaml").read_text())["overwrite"] is True
    r = cli(*base, "--overwrite")
    assert r.code == 0 and "deprecated:" not in r.err


def test_tiny_model_old_force_flag(tmp_path: Path, cli) -> None:  # noqa: ANN001
    out = tmp_path / "m"
    out.mkdir()
    (out / "x").write_text("x")
    r = cli("dev", "tiny-model", "--help")
    assert r.code == 0 and "--overwrite" in r.out and "--force" not in r.out  # hidden: only the new name is shown
    r = cli("dev", "tiny-model", out)
    assert r.code == 1 and "pass --overwrite" in r.err
    r = cli("dev", "tiny-model", out, "--force")
    assert r.code == 0, r.err
    assert (out / "model.safetensors").is_file()
    assert r.err.count("deprecated: --force: renamed to --overwrite") == 1


def _all_flags(group: Any) -> set[str]:
    flags = {"--help"}
    for cmd in getattr(group, "commands", {}).values():
        for param in cmd.params:
            flags.update(getattr(param, "opts", []), getattr(param, "secondary_opts", []))
        flags |= _all_flags(cmd)
    return flags


def test_flags_named_in_library_messages_exist() -> None:
    """A hint like 'use --attn-implementation eager' must name a flag some command has (or a --set key)."""
    import re

    root = get_command(app)
    known = _all_flags(root) | {o for p in root.params for o in p.opts}
    other_tools = {"--include", "--local-dir"}  # huggingface-cli download, in the offline-weights hint
    unknown = {}
    for path in (Path(__file__).parents[1] / "src/facellm_cli").rglob("*.py"):
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", path.read_text(encoding="utf-8")):
            if flag not in known and flag not in other_tools:
                unknown.setdefault(flag, path.name)
    assert unknown == {}
    loader = (Path(__file__).parents[1] / "src/facellm_cli/models/loader.py").read_text(encoding="utf-8")
    assert "--set model.attn_implementation=" in loader and "--set model.trust_remote_code=true" in loader
    config_field(AskConfig, "model.attn_implementation")
    config_field(AskConfig, "model.trust_remote_code")
