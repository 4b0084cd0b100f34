"""The one settings mechanism of every command: a typed dataclass gives the flags, `--config FILE` and
`--set KEY=VALUE`, with values converted and checked against the field types at parse time.

A command declares its settings as a dataclass whose fields are made with `setting(...)` (help text, an
optional flag name, choices, required). `build_parser(Settings, ...)` derives the argparse parser from it;
`parse(parser, argv)` returns the filled-in settings. Values are applied in this order: the defaults, then
`--config FILE`, then the flags given, then each `--set` — so a `--set` always wins. Nested dataclass fields
(and dict fields with a `schema` dataclass, e.g. model overrides) are reached with dotted keys
(`--set train.model.n_layer=2`) and converted with the nested field's type too. Every mistake is a UserError:
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from leangpt.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line and exits 2."""

    settings_cls: Any = None

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------- declaring settings

def setting(default: Any = None, help: str = "", *, flag: str | None = None, choices: typing.Sequence[Any] | None = None,
            required: bool = False, metavar: str | None = None, schema: type | None = None,
            cli: bool = True, flatten: bool = False) -> Any:
    """A settings field. `flag` overrides the flag name (default `--field-name`; for a bool that defaults to
    True, `--no-field-name`); `required` is checked after --config and --set, so a config file can supply it;
    `schema` types the keys of a dict field; `cli=False` leaves the field to --config / --set only;
    `flatten` makes a nested dataclass's keys reachable without its prefix too (`--set lr=...` for
    `recovery.lr`) where the outer settings have no field of that name."""
    meta = {"help": help, "flag": flag, "choices": tuple(choices) if choices is not None else None,
            "required": required, "metavar": metavar, "schema": schema, "cli": cli, "flatten": flatten}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        value = default
        return dataclasses.field(default_factory=lambda: copy.deepcopy(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _fields(cls_or_obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls_or_obj) if f.init}


def _hints(cls_or_obj: Any) -> dict[str, Any]:
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    return typing.get_type_hints(cls)


def _is_union(origin: Any) -> bool:
    return origin is typing.Union or origin is types.UnionType


def _convert(value: Any, typ: Any, key: str) -> Any:
    """Coerce a YAML / flag / --set value to a field's type, or raise a UserError naming the key."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if _is_union(origin):
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
    if origin is typing.Literal:
        for a in args:
            if str(a) == str(value):
                return a
        raise UserError(f"bad value for {key}: expected one of {', '.join(map(str, args))}, got {value!r}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise UserError(f"bad value for {key}: expected true/false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool) or value is None:
            raise UserError(f"bad value for {key}: expected {typ.__name__}, got {value!r}")
        try:
            return float(value) if typ is float else int(str(value).replace("_", ""))
        except (TypeError, ValueError):
            raise UserError(f"bad value for {key}: expected {typ.__name__}, got {value!r}") from None
    if typ is str:
        if isinstance(value, (dict, list)) or value is None:
            raise UserError(f"bad value for {key}: expected text, got {value!r}")
        return str(value)
    if typ is Path:
        if not isinstance(value, (str, Path)) or not str(value):
            raise UserError(f"bad value for {key}: expected a path, got {value!r}")
        return Path(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"bad value for {key}: expected a list, got {value!r}")
        items = [_convert(v, args[0], key) for v in value] if args else list(value)
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise UserError(f"bad value for {key}: expected a mapping of settings, got {value!r}")
        obj = typ()
        for k, v in _flatten(value).items():
            _set_field(obj, k, v, f"{key}.")
        return obj
    return value


def _check_choices(value: Any, f: dataclasses.Field, key: str) -> Any:
    choices = f.metadata.get("choices")
    items = value if isinstance(value, list) else [value]
    if choices and value is not None and any(v not in choices for v in items):
        bad = next(v for v in items if v not in choices)
        raise UserError(f"bad value for {key}: expected one of {', '.join(map(str, choices))}, got {bad!r}")
    return value


def _set_field(obj: Any, key: str, value: Any, prefix: str = "") -> None:
    """Set a dotted key on a dataclass, converting the value to the field's type."""
    head, _, rest = key.partition(".")
    fields = _fields(obj)
    if head not in fields:
        for f in fields.values():
            if f.metadata.get("flatten") and head in _fields(getattr(obj, f.name)):
                return _set_field(getattr(obj, f.name), key, value, f"{prefix}{f.name}.")
        raise UserError(f"unknown setting {prefix + key!r}; known: {', '.join(sorted(fields))}")
    f, typ = fields[head], _hints(obj)[head]
    if rest:
        inner = getattr(obj, head)
        schema = f.metadata.get("schema")
        if isinstance(inner, dict) and schema is not None:
            sub, _, deeper = rest.partition(".")
            known = {g.name for g in dataclasses.fields(schema) if g.init}
            if sub not in known or deeper:
                raise UserError(f"unknown setting {prefix + key!r}; known under {prefix + head}: {', '.join(sorted(known))}")
            inner[sub] = _convert(value, _hints(schema)[sub], prefix + key)
            return
        if not dataclasses.is_dataclass(inner):
            raise UserError(f"setting {prefix + head!r} has no sub-settings (got {prefix + key!r})")
        _set_field(inner, rest, value, f"{prefix}{head}.")
        return
    if f.metadata.get("schema") is not None:
        if not isinstance(value, dict):
            raise UserError(f"bad value for {prefix + key}: expected a mapping, got {value!r}")
        setattr(obj, head, {})
        for k, v in _flatten(value).items():
            _set_field(obj, f"{head}.{k}", v, prefix)
        return
    setattr(obj, head, _check_choices(_convert(value, typ, prefix + key), f, prefix + key))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
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
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        _set_field(obj, key.strip(), value.strip())
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """A settings dataclass as plain JSON/YAML values (paths as strings)."""
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


# ---------------------------------------------------------------- the parser derived from a dataclass

def _flag(f: dataclasses.Field) -> str | None:
    if not f.metadata.get("cli", True) or f.metadata.get("schema") is not None:
        return None
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


def _help(f: dataclasses.Field, typ: Any) -> str:
    text = f.metadata.get("help") or f.name.replace("_", " ")
    if f.metadata.get("required"):
        return f"{text} (required)"
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if isinstance(default, bool) or default is None or default == [] or "default" in text:
        return text
    shown = ", ".join(map(str, default)) if isinstance(default, list) else default
    return f"{text} (default: {shown})"


def build_parser(settings_cls: type, command: str, description: str) -> ArgumentParser:
    """`leangpt COMMAND`'s parser: a flag per settings field, plus --config, --set, --print-config, --json."""
    p = ArgumentParser(prog=f"leangpt {command}", description=description, argument_default=argparse.SUPPRESS)
    p.settings_cls = settings_cls
    hints = _hints(settings_cls)
    for f in _fields(settings_cls).values():
        flag, typ = _flag(f), hints[f.name]
        if flag is None or dataclasses.is_dataclass(typ):
            continue
        kw: dict[str, Any] = {"dest": f.name, "help": _help(f, typ)}
        if typ is bool:
            kw["action"] = "store_false" if f.default is True else "store_true"
        else:
            kw["metavar"] = f.metadata.get("metavar") or (
                "{" + ",".join(map(str, f.metadata["choices"])) + "}" if f.metadata.get("choices") else f.name.upper())
            if any(typing.get_origin(t) is list for t in (typ, *typing.get_args(typ))):
                kw["action"] = "append"
        p.add_argument(flag, **kw)
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML file of settings (keys as for --set)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (dotted for nested ones, e.g. --set model.n_layer=4); repeatable, "
                        "applied after --config and the flags")
    p.add_argument("--print-config", action="store_true", help="print the settings as YAML and exit")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    return p


@dataclasses.dataclass
class Output:
    json: bool = False


def fill(settings: Any, flags: dict[str, Any], config_file: Path | None, overrides: list[str]) -> Any:
    """Defaults < --config < flags < --set, every value converted; then the required fields and validate()."""
    fields = _fields(settings)
    if config_file is not None:
        for k, v in _flatten(read_mapping(config_file, "config")).items():
            _set_field(settings, k, v)
    for name, value in flags.items():
        key = _flag(fields[name]) or name
        if isinstance(value, bool):
            setattr(settings, name, value)
        else:  # a flag given is a value, never "unset": --model-name none names a model "none"
            typ = _hints(settings)[name]
            if _is_union(typing.get_origin(typ)):
                typ = typing.Union[tuple(a for a in typing.get_args(typ) if a is not type(None))]
            setattr(settings, name, _check_choices(_convert(value, typ, key), fields[name], key))
    apply_overrides(settings, None, overrides)
    for f in fields.values():
        if f.metadata.get("required") and getattr(settings, f.name) in (None, []):
            raise UserError(f"{_flag(f) or f.name} is required")
    if hasattr(settings, "validate"):
        settings.validate()
    return settings


def parse(p: ArgumentParser, argv: list[str] | None, settings: Any = None) -> tuple[Any, Output]:
    """The command's settings (a fresh `settings_cls()` unless given) filled from argv, and its output options."""
    ns = vars(p.parse_args(argv))
    config_file, overrides = ns.pop("config", None), ns.pop("overrides", [])
    print_config, output = ns.pop("print_config", False), Output(json=ns.pop("json", False))
    settings = fill(p.settings_cls() if settings is None else settings, ns, config_file, overrides)
    if print_config:
        sys.stdout.write(yaml.safe_dump(to_dict(settings), sort_keys=False))
        p.exit(0)
    return settings, output


# ---------------------------------------------------------------- the older hand-written parsers (being replaced)

def parser(command: str, description: str) -> ArgumentParser:
    return ArgumentParser(prog=f"leangpt {command}", description=description)


def add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML file of settings (keys as for --set)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set max_steps=60 or --set model.n_layer=4; repeatable")


# ---------------------------------------------------------------- output

def print_json(obj: Any) -> None:
    """The command's result as one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
