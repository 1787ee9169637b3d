"""YAML ↔ typed dataclasses, with strict keys and type-checked ``key.path=value`` overrides.

Every config in the project is a (frozen) dataclass. :func:`from_dict` builds one from plain data and
rejects unknown keys by name, listing the valid ones; :func:`to_dict` is its inverse, so
``from_dict(C, to_dict(c)) == c`` for every config ``c``.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ldm.errors import ConfigError

T = TypeVar("T")
YAML_MAX_BYTES = 1 << 20  # a config file or model.yaml above this is not a config
SHOWN_CHARS = 80  # of a value quoted back in an error message: one line whatever the input
INT_LIMIT = 1 << 63  # config integers are int64: seeds, sizes and counts beyond it are typos or attacks


def show(value: Any) -> str:
    """``repr(value)``, cut to :data:`SHOWN_CHARS` so that an error message stays one readable line."""
    text = " ".join(repr(value).split())
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors and aliases: configs never need them, and nested aliases expand
    exponentially (a "billion laughs" file of a few hundred bytes fills the memory)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            line = event.start_mark.line + 1 if event.start_mark else "?"
            raise ConfigError(f"YAML alias *{event.anchor} at line {line}: aliases are not allowed in configs; "
                              "write the value out")  # fmt: skip
        return super().compose_node(parent, index)


def parse_yaml(text: str, *, what: str) -> Any:
    """Plain data from YAML text a user controls (``what`` names it in errors): no aliases, no tags beyond
    the safe ones, at most :data:`YAML_MAX_BYTES`."""
    if len(text.encode("utf-8", errors="replace")) > YAML_MAX_BYTES:
        raise ConfigError(f"{what} is larger than {YAML_MAX_BYTES >> 20} MiB; a config is a few kilobytes, pass "
                          "the right file")  # fmt: skip
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"{what} is not valid YAML{where}; fix the syntax") from None


def _describe(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


def _unknown_key_message(key: str, where: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown config key '{where}{key}'{hint}; valid keys here: {', '.join(valid)}"


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (lists → tuples, str → Enum)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"'{where}': {show(value)} fits none of {tp}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{where}' must be a list, got {show(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"'{where}' must have {len(args)} items, got {len(value)}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping of {tp.__name__} fields, got {show(value)}")
        return from_dict(tp, value, prefix=f"{where}.")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no/off/yes/on as a bool: map it back
            value = next((m.value for m in tp if isinstance(m.value, str) and yaml.safe_load(m.value) is value), value)
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"'{where}' must be {_describe(tp)}, got {show(value)}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{where}' must be true or false, got {show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{where}' must be an integer, got {show(value)}")
        if not -INT_LIMIT <= value < INT_LIMIT:
            raise ConfigError(f"'{where}' must be an integer of at most 63 bits, got {show(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"'{where}' must be a number, got {show(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{where}' must be a number, got {show(value)}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            raise ConfigError(f"'{where}' must be a finite number, got {show(value)}") from None
        if not math.isfinite(value):
            raise ConfigError(f"'{where}' must be a finite number, got {show(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{where}' must be a string, got {show(value)}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"config field '{where}' has an unsupported annotation {tp!r}")


def from_dict(cls: type[T], data: dict[str, Any], *, prefix: str = "") -> T:
    """Build the dataclass ``cls`` from ``data``; missing keys take their defaults. A section whose field defaults
    to a config with values of its own (a run's ``train`` settings) keeps those values for the keys it leaves out:
    a run file that sets ``train.batch_size`` alone keeps that run's learning rate, not TrainConfig's."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or cls.__name__}' must be a mapping, got {show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(str(key), prefix, sorted(fields)))
        default = _default(fields[key])
        if isinstance(value, dict) and dataclasses.is_dataclass(default) and not isinstance(default, type):
            value = _merged(to_dict(default), value)  # a partial section keeps the rest of this field's default
        kwargs[key] = _convert(value, hints[key], f"{prefix}{key}")
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing config key(s) {', '.join(prefix + m for m in missing)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {cls.__name__}{' at ' + prefix.rstrip('.') if prefix else ''}: {exc}") from None


def _default(f: dataclasses.Field) -> Any:
    """A field's default value (its factory called), or ``dataclasses.MISSING``."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _merged(base: dict, update: dict) -> dict:
    """``base`` with ``update``'s entries put in, nested mappings merged key by key."""
    out = dict(base)
    for key, value in update.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-ready data: dataclasses → dicts, enums → values, tuples → lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Read a YAML file into ``cls``; a missing or malformed file is a :class:`ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; check the path") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; pass a .yaml file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; pass a .yaml file") from None
    return from_dict(cls, parse_yaml(text, what=f"config file {path}") or {})


class _Dumper(yaml.SafeDumper):
    """Lists of scalars on one line: ``block_out_channels: [128, 256, 512, 512]``."""


_Dumper.add_representer(
    list,
    lambda dumper, data: dumper.represent_sequence(
        "tag:yaml.org,2002:seq", data, flow_style=all(not isinstance(v, (list, dict)) for v in data)
    ),
)


def dump_yaml(obj: Any) -> str:
    return yaml.dump(to_dict(obj), Dumper=_Dumper, sort_keys=False)


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML, then type-checked).

    >>> apply_overrides(cfg, ["unet.layers_per_block=1", "vae.block_out_channels=[32,64,64,64]"])
    """
    data = to_dict(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ConfigError(f"override {show(item)} must look like key.path=value")
        value = parse_yaml(raw, what=f"override {show(item)}")
        node, parts = data, key.split(".")
        for depth, part in enumerate(parts):
            where = ".".join(parts[:depth])
            if not isinstance(node, dict) or part not in node:
                valid = sorted(node) if isinstance(node, dict) else []
                raise ConfigError(_unknown_key_message(part, f"{where}." if where else "", valid))
            if depth == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return from_dict(type(cfg), data)
