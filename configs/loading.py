"""YAML (or dict) -> typed `ExperimentConfig`, with errors that name the key.

Only `yaml.safe_load` is used. An unknown key is an error naming the closest valid
key; a value of the wrong type is an error naming the field, the expected type and
what was given. Overrides use dotted keys: `loader.batch_size=256`.
"""

from __future__ import annotations

import dataclasses
import datetime
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from configs.schema import ExperimentConfig, did_you_mean


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and what was expected.
    `key`: the dotted key at fault, when one is (to say whether it came from the file or
    from a command-line override)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; nested dataclasses are built recursively."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}", key)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}{did_you_mean(value, get_args(tp))}", key)
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}", key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}", key)
        return build_dataclass(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string; accept it as the number it is.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is Any:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})", key)


def build_dataclass(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build `cls` from a plain dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            hint = did_you_mean(key, fields, prefix) or f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}", prefix + key)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required config key(s): {', '.join(prefix + m for m in missing)}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        # The schema's checks start with the key they are about: "loader.batch_size: ...".
        message = str(e)
        head = message.split(":", 1)[0]
        raise ConfigError(message, head if ":" in message and " " not in head else None) from None


def _yaml_problem(error: yaml.YAMLError, position: bool) -> str:
    """PyYAML's error in one line (its own message spans several, quoting the text), with
    the line and column when `position` (a file; an override is one short line)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    text = f"{problem} ({context})" if context else problem
    if isinstance(error, yaml.constructor.ConstructorError):
        text += "; only plain YAML values are read (no tags that build objects)"
    mark = getattr(error, "problem_mark", None)
    if position and mark is not None:
        text = f"line {mark.line + 1}, column {mark.column + 1}: {text}"
    return text


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML scalar)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. loader.batch_size=256")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except (yaml.YAMLError, ValueError) as e:  # ValueError: a YAML date that is no date (2024-02-30)
        quoted = "'" + raw.replace("'", "''") + "'"  # YAML's single-quoted string
        problem = _yaml_problem(e, position=False) if isinstance(e, yaml.YAMLError) else str(e)
        raise ConfigError(
            f"override {text!r}: the value is not valid YAML: {problem} "
            f"(quote it to pass it as a string: {key}={quoted})",
            key,
        ) from None
    return key.split("."), _dates_as_text(value)


def _dates_as_text(value: Any) -> Any:
    """YAML reads `2004-06-01` as a date; every date this schema takes is an ISO string."""
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _dates_as_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_dates_as_text(v) for v in value]
    return value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
        node[path[-1]] = value
    return values


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML run config, apply `key=value` overrides and validate it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); expected a YAML config") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
    try:
        values = _dates_as_text(yaml.safe_load(text) or {})
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e, position=True)}") from None
    except ValueError as e:  # a YAML date that is no date
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
    values = apply_overrides(values, overrides or [])
    try:
        return build_dataclass(ExperimentConfig, values)
    except ConfigError as e:
        # Name where the bad key was set: the last override of it wins, as it did in values.
        source = str(path)
        for text in reversed(overrides or []):
            key = text.split("=", 1)[0]
            if e.key is None:
                # A rule over several keys ("model.embedding_dim (16) must be divisible by
                # model.num_heads (3)"): the override of a key it names.
                named = key in str(e)
            else:
                named = e.key == key or e.key.startswith(key + ".") or key.startswith(e.key + ".")
            if named:
                source = f"override {text!r}"
                break
        raise ConfigError(f"{source}: {e}", e.key) from None


CONFIG_DIR = Path(__file__).resolve().parent


def resolve_config_path(name: str) -> Path:
    """`configs/x.yaml`, a path anywhere, or a bare name of a shipped config (`collegemsg`)."""
    path = Path(name)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    return CONFIG_DIR / f"{name}.yaml"


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
