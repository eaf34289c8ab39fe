"""Config files for the run scripts: `--config cfg.yaml` (or .json), with command-line flags on top.

Every key of the file and every `--flag` must name a field of one of the script's argument
dataclasses (transformers' `TrainingArguments` among them). A typo is an error that suggests the
closest key, and a value of the wrong type is an error that names the expected type — silently
ignored keys cost researchers whole training runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import types
import typing
from enum import Enum
from pathlib import Path

import yaml

from .errors import ConfigError


def read_config_file(path: str | Path) -> dict:
    """A YAML or JSON mapping from `path`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.", "pass --config with the path of a .yaml or .json file (see configs/).")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid YAML/JSON: {err}", "fix the syntax at the position shown.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value.", "write one `key: value` per line.")
    return data


def parse_cli_flags(argv: list[str]) -> tuple[str | None, dict]:
    """(config path, {key: value}) from `--key value`, `--key=value` and bare `--flag` (= true)."""
    config, flags, i = None, {}, 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}.", "pass options as --key value (see --help).")
        key, eq, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            value = argv[i + 1] if has_value else "true"
            i += 1 if has_value else 0
        i += 1
        if key == "config":
            config = value
        else:
            flags[key] = _parse_flag_value(value)
    return config, flags


class FlagText(str):
    """A command-line value kept as typed, for fields that want text (`--image_glob *.bmp`, `--eval_strategy no`)."""

    parsed = None


def _parse_flag_value(text: str):
    """YAML-parse a flag (numbers, lists, dicts, booleans), remembering the text it came from."""
    raw = FlagText(text)
    try:
        raw.parsed = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        raw.parsed = text
    return raw


def _allowed_types(annotation) -> tuple:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(annotation) for t in _allowed_types(arg))
    if origin is typing.Literal:
        return (str,)
    return (origin or annotation,)


def _coerce(key: str, value, annotation):
    """Check `value` against a field's type, converting the safe cases (int -> float, '1e-3' -> float)."""
    allowed = _allowed_types(annotation)
    if isinstance(value, FlagText):  # from the command line: text where text is wanted, else parsed
        wants_text = str in allowed or any(isinstance(t, type) and issubclass(t, Enum) for t in allowed)
        value = str(value) if wants_text and not isinstance(value.parsed, tuple(t for t in allowed if isinstance(t, type))) else value.parsed
    if isinstance(value, bool) and bool not in allowed and value is False:
        value = "no"  # YAML 1.1 reads `save_strategy: no` as False; "no" is what such fields mean
    if value is None or any(t in (typing.Any, object) for t in allowed):
        return value
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            if kind is int and float(value) != int(value):
                continue
            return kind(value)
        if kind in (list, tuple, dict) and isinstance(value, kind):
            return value
        if kind is str and isinstance(value, str):
            return value
        if isinstance(kind, type) and issubclass(kind, Enum) and isinstance(value, str):
            return value
    if isinstance(value, str):  # YAML reads 1e-3 as a string; numbers given as text are fine
        for kind in (int, float):
            if kind in allowed:
                try:
                    return kind(value)
                except ValueError:
                    pass
    names = "/".join(sorted({getattr(t, "__name__", str(t)) for t in allowed}))
    raise ConfigError(f"config key {key!r} expects {names}, got {value!r} ({type(value).__name__}).", f"give {key} a value of type {names}.")


def parse_config(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """Build one instance of each dataclass from `--config FILE` and command-line flags (flags win).

    Example:
        >>> from transformers import TrainingArguments
        >>> (args,) = parse_config((TrainingArguments,), ["--output_dir", "out", "--learning_rate", "1e-3"])
        >>> args.learning_rate
        0.001
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in {"-h", "--help"}:
        print_help(dataclass_types)
        raise SystemExit(0)
    config_path, flags = parse_cli_flags(argv)
    values = {**(read_config_file(config_path) if config_path else {}), **flags}
    fields = {f.name: (cls, f) for cls in dataclass_types for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in values if k not in fields]
    if unknown:
        hints = {k: difflib.get_close_matches(k, list(fields), n=1) for k in unknown}
        said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        raise ConfigError(f"unknown config key(s): {said}.", "fix the spelling or remove the key; `--help` lists every key.")
    per_class = {cls: {} for cls in dataclass_types}
    for key, value in values.items():
        cls, field = fields[key]
        hints = typing.get_type_hints(cls)
        per_class[cls][key] = _coerce(key, value, hints.get(key, field.type))
    instances = []
    for cls in dataclass_types:
        missing = [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in per_class[cls]]
        if missing:
            raise ConfigError(f"missing config key(s): {missing}.", f"add them to the config file or pass --{missing[0]} VALUE.")
        try:
            instances.append(cls(**per_class[cls]))
        except ConfigError:
            raise
        except (ValueError, TypeError) as err:
            raise ConfigError(f"invalid {cls.__name__} settings: {err}", "correct the value named above in the config.") from None
    return tuple(instances)


def print_help(dataclass_types: tuple) -> None:
    print("usage: SCRIPT --config cfg.yaml [--key value ...]   (flags override the file)\n")
    for cls in dataclass_types:
        print(f"{cls.__name__}:")
        for f in dataclasses.fields(cls):
            if f.init and not f.name.startswith("_"):
                text = (f.metadata or {}).get("help", "")
                print(f"  --{f.name}  {text[:100]}")
