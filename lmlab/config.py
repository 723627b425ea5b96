"""Dataclass configs <-> YAML, with dotted command-line overrides.

A config is a tree of dataclasses. `from_dict` builds one from plain data and rejects unknown keys
with the list of valid ones; `apply_overrides` takes `["model.n_layer=4", "train.lr=1e-3"]`.
A dataclass field typed with a *polymorphic* base (one that defines `resolve_class(data)`) picks its
concrete subclass from the data, so `model: {family: gpt, ...}` builds a GPTConfig.

Command-line values are parsed by the type the field declares, never by YAML's rules: a `str` field
keeps the exact text (`--train.out_dir=no` is "no", `007` is "007"), an `int` must be an integer,
a `bool` is true/false/yes/no/on/off/1/0, a list is comma-separated, an Optional field takes
`null` or `none`. A bad value is an error naming the key.

Why not jsonargparse, tyro or draccus: see docs/config.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lmlab.errors import LmlabError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


class CliValue(str):
    """A value typed on the command line: parsed by the field's declared type (see the module docstring)."""


_NULLS = ("null", "none", "~")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _parse_cli(text: str, tp: Any, optional: bool, where: str) -> Any:
    """Parse a command-line string strictly as type `tp` (already unwrapped from Optional)."""
    if optional and text.strip().lower() in _NULLS:
        return None
    if dataclasses.is_dataclass(tp):
        raise LmlabError(f"config key '{where}' is a section, not a value; set its keys as --{where}.KEY=VALUE")
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        body = text.strip()
        if body.startswith("[") and body.endswith("]"):
            body = body[1:-1]
        (item_tp, *_) = typing.get_args(tp) or (str,)
        item_tp, item_opt = _unwrap_optional(item_tp)
        items = [_parse_cli(v.strip(), item_tp, item_opt, where) for v in body.split(",") if v.strip() != ""]
        return tuple(items) if origin is tuple else items
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        for a in allowed:
            if str(a) == text or (isinstance(a, bool) and text.lower() in (_TRUE if a else _FALSE)):
                return a
        raise LmlabError(f"config key '{where}' must be one of {list(allowed)}, got {text!r}")
    if tp is str:
        return str(text)
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise LmlabError(f"config key '{where}' expects a boolean (true/false), got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            pass
        try:  # 1e6 and 2.0 are integers written as floats; 2.5 is not
            f = float(text)
        except ValueError:
            f = math.nan
        if math.isfinite(f) and f.is_integer():
            return int(f)
        raise LmlabError(f"config key '{where}' expects an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise LmlabError(f"config key '{where}' expects a number, got {text!r}") from None
    if tp is Any:  # no declared type to go by: a YAML scalar is the best guess
        return yaml.safe_load(text)
    if origin is dict or tp is dict:
        value = yaml.safe_load(text)
        if not isinstance(value, dict):
            raise LmlabError(f"config key '{where}' must be a mapping such as {{a: 1}}, got {text!r}")
        return value
    raise LmlabError(f"config key '{where}' has type {tp!r}, which cannot be set from the command line")


def _convert(value: Any, tp: Any, where: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if isinstance(value, CliValue):
        return _parse_cli(str(value), tp, optional, where)
    if value is None:
        if optional or tp is Any:
            return None
        raise LmlabError(f"config key '{where}' may not be null")
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise LmlabError(f"config key '{where}' must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=where + ".")
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        out = [_convert(v, item_tp, where) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise LmlabError(f"config key '{where}' must be a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise LmlabError(f"config key '{where}' must be one of {list(allowed)}, got {value!r}")
        return value
    try:
        if tp is bool:
            if isinstance(value, str):
                lowered = value.lower()
                if lowered in ("true", "1", "yes", "on"):
                    return True
                if lowered in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise LmlabError(f"config key '{where}' expects {tp.__name__}, got {value!r}") from None
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys raise an error listing the valid ones."""
    resolve = getattr(cls, "resolve_class", None)
    if resolve is not None:
        cls = resolve(data)
    fields = _field_types(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        valid = ", ".join(prefix + k for k in fields)
        raise LmlabError(f"unknown config key '{prefix}{unknown[0]}'. Valid keys here: {valid}")
    kwargs = {k: _convert(v, fields[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain data (dicts, lists, scalars) for YAML/JSON; tuples become lists."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Return a copy of `cfg` with dotted `key=value` overrides applied (validated as a whole). Each value
    is parsed by the declared type of its field (`CliValue`), so a string stays exactly as typed."""
    data = to_dict(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key:
            raise LmlabError(f"override '{item}' must look like section.key=value")
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                valid = ", ".join(k for k in node)
                raise LmlabError(f"unknown config section '{where}' (in --{key}). Valid keys here: {valid}")
            node = child
        node[parts[-1]] = CliValue(raw)
    return from_dict(type(cfg), data)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise LmlabError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LmlabError(f"cannot parse config file {p}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LmlabError(f"config file {p} must hold a mapping at the top level")
    return data


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: type, prefix: str = "") -> list[str]:
    """`key (type) = default` lines for help texts."""
    lines = []
    inst = cls()
    for f in dataclasses.fields(cls):
        v = getattr(inst, f.name)
        if dataclasses.is_dataclass(v):
            lines += describe(type(v), prefix + f.name + ".")
        else:
            lines.append(f"  --{prefix}{f.name}={v!r}")
    return lines
