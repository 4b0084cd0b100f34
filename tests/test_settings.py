"""The one settings mechanism (leangpt/cli.py): flags, --config and --set from a dataclass, converted at parse
time, and the same one-line error for every command."""

from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from leangpt import cli
from leangpt.__main__ import COMMANDS
from leangpt.cli import setting
from leangpt.config import ModelConfig
from leangpt.errors import UserError
from tests.conftest import run_cli


@dataclass
class Inner:
    lr: float = setting(1e-3, "learning rate")
    steps: int = setting(10, "steps")


@dataclass
class Example:
    model: Path | None = setting(None, "a path", required=True)
    method: str = setting("a", "a choice", choices=["a", "b"])
    count: int = setting(3, "a number")
    ratio: float | None = setting(None, "optional number")
    source: list[str] = setting(["x"], "repeatable")
    fast: bool = setting(True, "on unless --no-fast")
    verbose: bool = setting(False, "off unless --verbose")
    inner: Inner = setting(Inner(), "nested", flatten=True)
    overrides: dict[str, typing.Any] = setting({}, "model overrides", schema=ModelConfig)


def parse(argv: list[str]) -> Example:
    return cli.parse(cli.build_parser(Example, "example", "test"), argv)[0]


def test_flags_are_derived_and_converted():
    s = parse(["--model", "m", "--method", "b", "--count", "7", "--ratio", "0.5", "--source", "p", "--source", "q",
               "--no-fast", "--verbose"])
    assert s == Example(model=Path("m"), method="b", count=7, ratio=0.5, source=["p", "q"], fast=False, verbose=True)
    assert parse(["--model", "m"]) == Example(model=Path("m"))  # defaults; the list default is a fresh copy
    assert parse(["--model", "m"]).source is not Example().source


def test_a_flag_value_is_never_unset_but_set_none_is(capsys):
    assert parse(["--model", "none"]).model == Path("none")
    assert parse(["--model", "m", "--ratio", "0.5", "--set", "ratio=none"]).ratio is None
    with pytest.raises(SystemExit):
        cli.parse(cli.build_parser(Example, "example", "test"), ["--model", "m", "--print-config"])
    assert "model: m" in capsys.readouterr().out


def test_precedence_defaults_config_flags_set(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: from_config\ncount: 5\ninner:\n  lr: 0.5\n")
    s = parse(["--config", str(config), "--count", "6"])
    assert (s.model, s.count, s.inner.lr) == (Path("from_config"), 6, 0.5)
    s = parse(["--config", str(config), "--count", "6", "--set", "count=8", "--set", "lr=0.25"])
    assert (s.count, s.inner.lr) == (8, 0.25)  # --set wins; a flattened nested key works without its prefix
    assert parse(["--model", "m", "--set", "inner.steps=4"]).inner.steps == 4


def test_schema_dict_is_typed_at_parse_time():
    s = parse(["--model", "m", "--set", "overrides.n_layer=2", "--set", "overrides.bias=false"])
    assert s.overrides == {"n_layer": 2, "bias": False}
    with pytest.raises(UserError, match="bad value for overrides.n_layer"):
        parse(["--model", "m", "--set", "overrides.n_layer=two"])
    with pytest.raises(UserError, match="unknown setting 'overrides.n_layr'"):
        parse(["--model", "m", "--set", "overrides.n_layr=2"])


@pytest.mark.parametrize("argv, message", [
    ([], "--model is required"),
    (["--model", "m", "--count", "x"], "bad value for --count: expected int"),
    (["--model", "m", "--method", "c"], "expected one of a, b"),
    (["--model", "m", "--set", "nope=1"], "unknown setting 'nope'"),
    (["--model", "m", "--set", "inner.nope=1"], "unknown setting 'inner.nope'"),
    (["--model", "m", "--set", "count"], "KEY=VALUE"),
    (["--model", "m", "--set", "fast=maybe"], "expected true/false"),
    (["--model", "m", "--set", "count.x=1"], "has no sub-settings"),
])
def test_mistakes_are_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        parse(argv)


def test_help_states_each_default_once():
    text = " ".join(cli.build_parser(Example, "example", "test").format_help().split())
    assert "a number (default: 3)" in text and "a path (required)" in text and "default: None" not in text
    assert "(default: x)" in text and ") (default" not in text


def _settings_cls(command: str) -> type:
    return importlib.import_module(COMMANDS[command][0]).build_parser().settings_cls


def _a_typed_field(cls: type) -> tuple[str, str]:
    """A setting with a value its type refuses: a number field, else a true/false one."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    number = [f.name for f in fields if hints[f.name] in (int, float, int | None, float | None)]
    return (number[0], "not-a-number") if number else (next(f.name for f in fields if hints[f.name] is bool), "maybe")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_rejects_a_bad_key_and_a_bad_value(command, tmp_path, capsys):
    assert _settings_cls(command) is not None, f"{command} does not build its parser from a settings dataclass"
    code, _, err = run_cli([command, "--set", "no_such_setting=1"], capsys)
    assert code == 2 and "unknown setting 'no_such_setting'" in err and len(err.strip().splitlines()) == 1
    key, value = _a_typed_field(_settings_cls(command))
    code, _, err = run_cli([command, "--set", f"{key}={value}"], capsys)
    assert code == 2 and f"bad value for {key}" in err and len(err.strip().splitlines()) == 1
    config = tmp_path / "bad.yaml"
    config.write_text("no_such_setting: 1\n")
    code, _, err = run_cli([command, "--config", str(config)], capsys)
    assert code == 2 and "unknown setting 'no_such_setting'" in err and len(err.strip().splitlines()) == 1
