"""Reading config values with their types: a mapping into a config dataclass, a YAML or command-line string
into the type of its field, a YAML file into a mapping. Every error is a :class:`ConfigError` naming the key.

Below ``solq.config`` (which holds the fields, their defaults and the presets).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "from_mapping", "coerce", "read_yaml_mapping", "positive_int"]


class ConfigError(ValueError):
    """A config file, preset or override is wrong; the message names the key and the problem."""


def from_mapping(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(prefix + k for k in unknown)}; "
                          f"valid keys under '{prefix or '.'}': {sorted(names)}")
    obj = cls()
    for k, v in d.items():
        hint = hints[k]
        if dataclasses.is_dataclass(hint):
            setattr(obj, k, from_mapping(hint, v, f"{prefix}{k}."))
        else:
            setattr(obj, k, coerce(v, hint, prefix + k))
    return obj


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type ``hint``; convert YAML/CLI strings where it is unambiguous."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:  # Optional[...]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return coerce(value, args[0], key)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [
                v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def read_yaml_mapping(path: Path, error: type[Exception] = ConfigError, what: str = "a mapping") -> dict:
    """The YAML mapping in ``path`` (empty file: {}); ``error`` naming the file when it is not valid YAML or
    not a mapping (``what`` says what was expected)."""
    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise error(f"{path}: expected {what}")
    return tree


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--steps``, ``--jobs``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
