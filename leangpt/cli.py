"""Shared command-line plumbing: one-line errors, --config/--set overrides, JSON results."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from leangpt.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line and exits 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser(command: str, description: str) -> ArgumentParser:
    return ArgumentParser(prog=f"leangpt {command}", description=description,
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML file of settings (keys as for --set)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set max_steps=60 or --set model.n_layer=4; repeatable")


def _convert(value: Any, typ: Any, key: str) -> Any:
    """Coerce a YAML/--set value to a dataclass field's type, or raise a UserError naming the key."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"bad value for {key}: {value!r}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise UserError(f"bad value for {key}: expected true/false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise UserError(f"bad value for {key}: expected {typ.__name__}, got {value!r}")
        try:
            converted = typ(value) if typ is float else int(str(value).replace("_", ""))
        except (TypeError, ValueError):
            raise UserError(f"bad value for {key}: expected {typ.__name__}, got {value!r}") from None
        return converted
    if typ is str:
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise UserError(f"bad value for {key}: expected a list, got {value!r}")
        return [_convert(v, args[0], key) for v in value] if args else value
    return value


def _set_field(obj: Any, key: str, value: Any) -> None:
    head, _, rest = key.partition(".")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj) if f.init}
    if head not in names:
        raise UserError(f"unknown setting {key!r}; known: {', '.join(sorted(names))}")
    if rest:
        inner = getattr(obj, head)
        if isinstance(inner, dict):
            inner[rest] = value
            return
        if not dataclasses.is_dataclass(inner):
            raise UserError(f"setting {head!r} has no sub-settings (got {key!r})")
        _set_field(inner, rest, value)
        return
    setattr(obj, head, _convert(value, hints[head], key))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML (or JSON) file holding a mapping of settings; a missing or malformed file is a UserError."""
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of settings")
    return data


def apply_overrides(obj: Any, config_file: Path | None, overrides: list[str]) -> Any:
    """Apply a YAML file then KEY=VALUE strings to a dataclass (nested keys with dots)."""
    if config_file is not None:
        for k, v in _flatten(read_mapping(config_file, "config")).items():
            _set_field(obj, k, v)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        _set_field(obj, key.strip(), value.strip())
    return obj


def print_json(obj: Any) -> None:
    """The command's result as one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
