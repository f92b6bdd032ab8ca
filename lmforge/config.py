"""Config machinery shared by every concern (model, data, train).

Each concern has one plain dataclass, validated in `__post_init__`. This module turns files
(TOML/YAML/JSON) and `--set key=value` overrides into those dataclasses, with errors that name the
bad key and list what is valid. It deliberately knows nothing about any particular config.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from lmforge.errors import LmforgeError

T = TypeVar("T")


def check(condition: bool, message: str) -> None:
    """Validation helper for `__post_init__`: raise a user-facing error when `condition` fails."""
    if not condition:
        raise LmforgeError(message)


def check_choice(name: str, value: Any, choices: tuple) -> None:
    check(value in choices, f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert `value` (from a file or a command-line string) to the annotated type `tp`."""
    origin = get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if len(args) < len(get_args(tp)):
                return None
        errors = []
        for arg in args:
            try:
                return _coerce(name, value, arg)
            except LmforgeError as e:
                errors.append(str(e))
        raise LmforgeError(errors[0] if errors else f"{name}: cannot use {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, str) and value not in choices:
            # allow e.g. "1" for Literal[1] from the command line
            for c in choices:
                if str(c) == value:
                    return c
        check_choice(name, value, choices)
        return value
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        check(isinstance(value, (list, tuple)), f"{name} must be a list, got {value!r}")
        return [_coerce(name, v, item_tp) for v in value]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise LmforgeError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise LmforgeError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if "e" in value.lower() else int(value)
            except ValueError:
                pass
        raise LmforgeError(f"{name} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise LmforgeError(f"{name} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise LmforgeError(f"{name} must be a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], section: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and coercing types."""
    prefix = f"{section}." if section else ""
    types_ = _field_types(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise LmforgeError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys are: {', '.join(sorted(fields))}"
        )
    kwargs = {k: _coerce(prefix + k, v, types_[k]) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def replace(obj: T, **changes: Any) -> T:
    """`dataclasses.replace` with the same coercion and validation as `from_dict`."""
    merged = {**to_dict(obj), **changes}
    return from_dict(type(obj), merged)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON file into a dict of sections."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise LmforgeError(f"config file {str(path)!r}: use a .toml, .yaml/.yml or .json file")
    except LmforgeError:
        raise
    except Exception as e:  # parser errors carry line numbers; keep them in one line
        raise LmforgeError(f"config file {str(path)!r} could not be parsed: {e}".replace("\n", " ")) from e
    if not isinstance(data, dict):
        raise LmforgeError(f"config file {str(path)!r} must hold a mapping of sections")
    return data


def parse_overrides(pairs: list[str], sections: dict[str, type]) -> dict[str, dict[str, str]]:
    """Parse `--set key=value` pairs into {section: {key: value}}.

    `section.key=value` is explicit; a bare `key=value` is accepted when exactly one section has
    that key (so `--set lr=3e-4` works, but an ambiguous key asks for its section).
    """
    out: dict[str, dict[str, str]] = {name: {} for name in sections}
    for pair in pairs:
        if "=" not in pair:
            raise LmforgeError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        key = key.strip()
        if "." in key:
            section, name = key.split(".", 1)
            if section not in sections:
                raise LmforgeError(
                    f"--set {pair!r}: unknown section {section!r}; valid sections are: {', '.join(sections)}"
                )
        else:
            owners = [s for s, cls in sections.items() if key in {f.name for f in dataclasses.fields(cls)}]
            if not owners:
                valid = sorted(f"{s}.{f.name}" for s, cls in sections.items() for f in dataclasses.fields(cls))
                raise LmforgeError(f"unknown config key {key!r}; valid keys are: {', '.join(valid)}")
            if len(owners) > 1:
                raise LmforgeError(
                    f"--set {pair!r} is ambiguous; write it as one of: {', '.join(f'{s}.{key}' for s in owners)}"
                )
            section, name = owners[0], key
        out[section][name] = value
    return out
