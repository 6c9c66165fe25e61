# YAML into frozen dataclasses: `base:` chains, dotted key=value overrides, typed and blamed.
"""A typed-YAML loader, generic over any tree of frozen dataclasses (`jaxmamba.config` is its
one schema).

`read_yaml` reads a mapping, merging it onto the file its `base:` names (relative to it);
`parse_override` and `set_dotted` apply `key.sub=value` overrides (values parsed as YAML);
`build` checks the result against the dataclasses' type hints (`Literal` choices, unions,
tuples, free dicts; lists become tuples, ints floats where a float is expected) and builds them.
Every error is one `ConfigError` naming the dotted key and where its value came from (`Source`:
the file, or the command line for an overridden key).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxmamba.errors import UserError


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message names the file and the dotted key."""


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a key's value came from: the config file, or the command line for an override."""

    file: str
    command_line: tuple[str, ...] = ()

    def of(self, key: str) -> str:
        for k in self.command_line:
            if key == k or key.startswith((f"{k}.", f"{k}[")):
                return "command line"
        return self.file


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping in YAML file `path`, merged onto the file its `base:` key names."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `base` chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a path to another YAML file, got {base!r}")
    merged = read_yaml(path.parent / base, seen + (path.resolve(),))
    _deep_merge(merged, data)
    return merged


def _deep_merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        # plan_overrides and other free dicts merge too, which is what a derived config wants.
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


def parse_override(item: str) -> tuple[str, Any]:
    """`"optim.lr=1e-3"` -> `("optim.lr", 0.001)`; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-3")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from err
    return key.strip(), value


def set_dotted(raw: dict, key: str, value: Any, *, source: str) -> None:
    """`raw[a][b][c] = value` for `key` "a.b.c", making the sections on the way."""
    node, parts = raw, key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(parts[:i + 1])} is a value, not a section; "
                              f"cannot set {key}")
        node = child
    node[parts[-1]] = value


def build(cls: type, raw: Any, *, source: Source, prefix: str = ""):
    """The dataclass `cls` from the mapping `raw`, every value checked against its type hint
    (nested dataclasses from nested mappings); unknown keys are errors."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source.of(where)}: {where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{source.of(prefix + unknown[0])}: unknown key {prefix}{unknown[0]} "
                          f"(valid keys in {where}: {', '.join(fields)})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, key=f"{prefix}{name}", source=source)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, *, key: str, source: Source) -> Any:
    """Check `value` against the annotation `tp`; convert lists to tuples and ints to floats."""
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=f"{key}.", source=source)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _coerce(option, value, key=key, source=source)
            except ConfigError as err:
                errors.append(err)
        raise errors[-1] if len(args) == 1 else ConfigError(
            f"{source.of(key)}: {key} = {value!r}: expected {_describe(tp)}")
    if origin is Literal:
        if any(a == value and type(a) is type(value) for a in args):
            return value
        raise ConfigError(f"{source.of(key)}: {key} = {value!r}: expected one of "
                          f"{', '.join(repr(a) for a in args)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{source.of(key)}: {key} = {value!r}: expected null")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source.of(key)}: {key} = {value!r}: expected a list "
                              f"({_describe(tp)})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key=f"{key}[{i}]", source=source)
                         for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{source.of(key)}: {key} = {value!r}: expected {len(args)} entries")
        return tuple(_coerce(a, v, key=f"{key}[{i}]", source=source)
                     for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source.of(key)}: {key} = {value!r}: expected a mapping")
        return copy.deepcopy(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{source.of(key)}: {key} = {value!r}: expected {_describe(tp)}")


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def numbers(node: Any, prefix: str = "") -> Iterator[tuple[str, int | float]]:
    """`(dotted key, value)` of every number in a dataclass tree (tuple entries as `key[i]`)."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            yield from numbers(getattr(node, f.name), f"{prefix}{f.name}.")
    elif isinstance(node, tuple):
        for i, v in enumerate(node):
            yield from numbers(v, f"{prefix.rstrip('.')}[{i}]")
    elif isinstance(node, int | float) and not isinstance(node, bool):
        yield prefix.rstrip("."), node


def plain(value: Any) -> Any:
    """`value` as YAML-safe builtins: tuples become lists, dicts and lists copied through."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
