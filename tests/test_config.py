from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import Field, SecretStr

from facellm_cli.config import AskConfig, ModelConfig, StrictModel, dump_config, parse_set, resolve_config
from facellm_cli.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_precedence_defaults_file_flags_set(tmp_path: Path) -> None:
    cfg_file = write(
        tmp_path, "model:\n  model: from-file\n  dtype: bfloat16\ngeneration:\n  max_new_tokens: 10\nbatch_size: 3\n"
    )
    cfg = resolve_config(
        AskConfig,
        cfg_file,
        flags={"model.model": "from-flag", "generation.max_new_tokens": None, "batch_size": None},
        sets=["generation.max_new_tokens=99", "model.device=cpu"],
    )
    assert cfg.model.model == "from-flag"  # flag beats file
    assert cfg.model.dtype == "bfloat16"  # file beats default
    assert cfg.generation.max_new_tokens == 99  # --set beats file; None flag did not override
    assert cfg.batch_size == 3
    assert cfg.model.device == "cpu"
    assert cfg.generation.temperature == 0.0  # default kept


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    cfg_file = write(tmp_path, "model:\n  modle: x\n")
    with pytest.raises(ConfigError) as e:
        resolve_config(AskConfig, cfg_file)
    assert str(e.value) == f"model.modle: unknown key (check the spelling; see the command's --help) ({cfg_file})"


def test_all_problems_reported_at_once_one_per_line(tmp_path: Path) -> None:
    cfg_file = write(tmp_path, "batch_size: 0\ngeneration:\n  max_new_tokens: -1\nmodel:\n  quantization: 3bit\n")
    with pytest.raises(ConfigError) as e:
        resolve_config(AskConfig, cfg_file)
    lines = str(e.value).splitlines()
    assert len(lines) == 3
    assert any(line.startswith("batch_size: Input should be greater than 0") for line in lines)
    assert any(line.startswith("generation.max_new_tokens: Input should be greater than 0") for line in lines)
    assert any(line.startswith("model.quantization: Input should be 'none', '8bit' or '4bit'") for line in lines)
    assert all(line.endswith(f"({cfg_file})") for line in lines)


def test_set_values_are_typed_and_validated() -> None:
    assert parse_set("a.b=16") == ("a.b", 16)
    assert parse_set("a=[x, y]") == ("a", ["x", "y"])
    assert parse_set("a=true") == ("a", True)
    assert parse_set("a=hello world") == ("a", "hello world")
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        parse_set("novalue")
    with pytest.raises(ConfigError, match="empty key"):
        parse_set("a..b=1")
    with pytest.raises(ConfigError, match="generation.top_p: Input should be less than or equal to 1"):
        resolve_config(AskConfig, sets=["generation.top_p=2"])


def test_missing_and_bad_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        resolve_config(AskConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(AskConfig, write(tmp_path, "a: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        resolve_config(AskConfig, write(tmp_path, "- 1\n- 2\n"))


def test_config_folder_is_named_a_folder(cli, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config path is a folder, not a YAML file"):
        resolve_config(AskConfig, tmp_path)
    r = cli("annotate", "x.jpg", "--provider", "template", "--config", str(tmp_path))
    assert r.code == 1
    errors = [line for line in r.err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: config path is a folder, not a YAML file: {tmp_path} (give the .yaml file inside it to --config)"
    ]


def test_model_config_cross_field_checks() -> None:
    with pytest.raises(ValueError, match="merge_adapter: needs an adapter folder"):
        ModelConfig(merge_adapter=True)
    with pytest.raises(ValueError, match="device: 'gpu' is not one of"):
        ModelConfig(device="gpu")
    assert ModelConfig().subfolder == "model"  # released FaceLLM checkpoints keep weights in model/
    assert ModelConfig(model="./local").subfolder is None


class _WithSecret(StrictModel):
    name: str = Field("x", description="n")
    api_key: SecretStr | None = Field(None, description="k")
    model: ModelConfig = Field(default_factory=ModelConfig, description="m")


def test_dump_config_drops_secrets_and_round_trips(tmp_path: Path) -> None:
    cfg = _WithSecret(api_key=SecretStr("sk-very-secret"), name="run")
    out = dump_config(cfg, tmp_path / "out" / "config.yaml")
    text = out.read_text()
    assert "sk-very-secret" not in text
    data = yaml.safe_load(text)
    assert data["api_key"] is None and data["name"] == "run"
    assert _WithSecret.model_validate(data).model.model == cfg.model.model
    assert not list(out.parent.glob(".*.tmp"))  # atomic write leaves no temp file


def test_cross_field_problems_one_line_each_named_by_their_key(tmp_path: Path) -> None:
    from facellm_cli.config import (
        AnnotateConfig,
        DatasetConfig,
        EvalConfig,
        FinetuneConfig,
        OverlapConfig,
        validate_config,
    )

    with pytest.raises(ConfigError) as e:
        validate_config(DatasetConfig, {"inputs": ["a.jsonl"], "split": "0.8,0.3,0.1"}, "d.yaml")
    assert str(e.value).splitlines() == [
        "image_root: required (--image-root DIR, the folder the image paths are relative to) (d.yaml)",
        "out: required (--out DIR) (d.yaml)",
        "split: [0.8, 0.3, 0.1] sums to 1.2, not 1 (e.g. 0.8,0.1,0.1) (d.yaml)",
    ]
    with pytest.raises(ConfigError) as e:  # a nested model's rule carries the nested key
        validate_config(FinetuneConfig, {"model": {"merge_adapter": True}})
    assert str(e.value) == "model.merge_adapter: needs an adapter folder (set adapter)"
    # One mistake (a forgotten --benchmark), one error.
    with pytest.raises(ConfigError) as e:
        validate_config(EvalConfig, {"data_dir": "fxb"})
    assert str(e.value) == "benchmark: --data-dir is only used with --benchmark facexbench"
    with pytest.raises(ConfigError) as e:
        validate_config(OverlapConfig, {"train": ["t"], "data_dir": "fxb"})
    assert str(e.value) == "benchmark: --data-dir is only used with --benchmark facexbench"
    with pytest.raises(ConfigError) as e:
        validate_config(AnnotateConfig, {"labels": "l.csv", "faces": True, "provider": "template", "batch": True})
    assert str(e.value).splitlines() == [
        "faces: faces crops photos given as images; labels describe whole images (drop one of them)",
        "batch: the template provider makes no requests (drop --batch or use --provider openai)",
    ]


def test_derived_defaults_come_from_the_input_and_nothing_validated_is_mutated() -> None:
    from facellm_cli.config import DatasetConfig, FinetuneConfig

    base = ModelConfig(model="./local")
    q = FinetuneConfig(method="qlora", model=base)
    assert q.model.quantization == "4bit" and base.quantization == "none"  # a copy, the caller's model untouched
    assert FinetuneConfig.model_validate({"method": "qlora"}).model.quantization == "4bit"
    with pytest.raises(ValueError, match="model.quantization: qlora loads the base in 4bit"):
        FinetuneConfig(method="qlora", model={"quantization": "8bit"})  # a named quantization is kept, then checked
    d = DatasetConfig(inputs=["a"], image_root="r", out="o", mcq=["age", "gender"])
    assert (d.mcq_train, d.stratify) == (True, "age")
    assert DatasetConfig(inputs=["a"], image_root="r", out="o").mcq_train is False
    assert ModelConfig(model="Idiap/FaceLLM-8B").subfolder == "model"
