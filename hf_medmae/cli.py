"""Command lines: transformers' `HfArgumentParser`, plus `--config cfg.yaml` (or .json) and messages that name the fix.

`HfArgumentParser` turns the argument dataclasses into flags (help texts, `--no_<flag>` for booleans,
`Literal` fields as choices). On top: a config file whose keys are overridden by flags, values checked
against each field's type (a YAML file gives numbers, lists and mappings; a flag gives text, read as
YAML where the field wants something else), `Literal` values checked in files too, and unknown keys
answered with the closest known one: silently ignored keys cost researchers whole training runs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import sys
import types
import typing
from enum import Enum
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from .errors import ConfigError


def read_config_file(path: str | Path) -> dict:
    """A YAML or JSON mapping from `path`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist.",
            "pass --config with the path of a .yaml or .json file (see configs/).",
        )
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"config file {path} is not valid YAML/JSON: {err}", "fix the syntax at the position shown."
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value.", "write one `key: value` per line.")
    return data


class FlagText(str):
    """A command-line value kept as typed, for fields that want text (`--image_glob *.bmp`, `--eval_strategy no`)."""


def _yaml(text: str):
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _allowed_types(annotation) -> tuple:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(annotation) for t in _allowed_types(arg))
    if origin is typing.Literal:
        return (str,)
    return (origin or annotation,)


def _literal_choices(annotation) -> tuple | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is typing.Literal:
            return typing.get_args(arg)
    return None


def coerce(key: str, value, annotation):
    """Check `value` against a field's type, converting the safe cases (int -> float, '1e-3' -> float, flag text)."""
    allowed = _allowed_types(annotation)
    if isinstance(value, FlagText):  # from the command line: text where text is wanted, else read as YAML
        parsed = _yaml(value)
        wants_text = str in allowed or any(isinstance(t, type) and issubclass(t, Enum) for t in allowed)
        value = (
            str(value)
            if wants_text and not isinstance(parsed, tuple(t for t in allowed if isinstance(t, type)))
            else parsed
        )
    if isinstance(value, bool) and bool not in allowed and value is False:
        value = "no"  # YAML 1.1 reads `save_strategy: no` as False; "no" is what such fields mean
    choices = _literal_choices(annotation)
    if choices is not None and value is not None and value not in choices:
        raise ConfigError(
            f"{key}={value!r} is not one of {list(choices)}.", f"set {key} to one of {', '.join(map(str, choices))}."
        )
    if value is None or any(t in (typing.Any, object) for t in allowed):
        return value
    if isinstance(value, str) and list in allowed and str not in allowed:
        value = [value]  # one value for a list field (`predict_images: folder/`) is a list of one
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            if kind is int and float(value) != int(value):
                continue
            return kind(value)
        if kind in (list, tuple, dict, str) and isinstance(value, kind):
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
    raise ConfigError(
        f"config key {key!r} expects {names}, got {value!r} ({type(value).__name__}).",
        f"give {key} a value of type {names}.",
    )


class MedArgumentParser(HfArgumentParser):
    """`HfArgumentParser` with `--config FILE` (flags win over the file) and `ConfigError`s that name the fix.

    Example:
        >>> from transformers import TrainingArguments
        >>> (args,) = MedArgumentParser(TrainingArguments).parse(["--output_dir", "out", "--learning_rate", "1e-3"])
        >>> args.learning_rate
        0.001
    """

    def __init__(self, dataclass_types, **kwargs):
        super().__init__(dataclass_types, allow_abbrev=False, **kwargs)
        self.add_argument("--config", help="YAML or JSON file of key: value; command-line flags override it")
        self.fields = {
            f.name: (cls, f, typing.get_type_hints(cls)[f.name])
            for cls in self.dataclass_types
            for f in dataclasses.fields(cls)
            if f.init
        }
        for action in self._actions:  # keep only what was given; the dataclasses hold the defaults
            if action.dest in self.fields:
                action.default, action.required, action.type = argparse.SUPPRESS, False, FlagText
                if action.choices is not None:  # Literal: checked in `coerce`, for file values too
                    action.choices = None

    def error(self, message: str):
        raise ConfigError(f"command line: {message}.", "see --help for every option.")

    def parse(self, argv: list[str] | None = None) -> tuple:
        """One instance per dataclass, from `--config FILE` and flags (flags win)."""
        namespace, unknown = self.parse_known_args(sys.argv[1:] if argv is None else argv)
        if unknown:
            self._unknown(
                [token.lstrip("-").partition("=")[0].replace("-", "_") for token in unknown if token.startswith("-")]
                or unknown
            )
        given = vars(namespace)
        config_path = given.pop("config", None)
        file_values = read_config_file(config_path) if config_path else {}
        self._unknown([k for k in file_values if k not in self.fields])
        values = {**file_values, **{k: self._flag_value(k, v) for k, v in given.items()}}
        per_class = {cls: {} for cls in self.dataclass_types}
        for key, value in values.items():
            cls, _, annotation = self.fields[key]
            per_class[cls][key] = coerce(key, value, annotation)
        return tuple(self._build(cls, per_class[cls]) for cls in self.dataclass_types)

    def _flag_value(self, key: str, value):
        """Flags of list fields come as several tokens, or as one YAML list (`--crop_scale "[0.5, 1.0]"`)."""
        if isinstance(value, list):
            parsed = [_yaml(v) if isinstance(v, FlagText) else v for v in value]
            return parsed[0] if len(parsed) == 1 and isinstance(parsed[0], list) else parsed
        return value

    def _unknown(self, keys: list[str]) -> None:
        if keys:
            other = {k: d for cls in self.dataclass_types for k, d in getattr(cls, "other_dimension_keys", {}).items()}
            hints = {k: difflib.get_close_matches(k, list(self.fields), n=1) for k in keys}
            said = ", ".join(
                f"{k!r}"
                + (f" ({k} is a key of {other[k]}D runs, and this is a {5 - other[k]}D run)" if k in other else "")
                + (f" (did you mean {h[0]!r}?)" if h and k not in other else "")
                for k, h in hints.items()
            )
            fix = "fix the spelling or remove the key; `--help` lists every key."
            if any(other.get(k) == 2 for k in keys):
                fix += " Volumes are cropped to roi_size: leave the 2D keys out."
            elif any(other.get(k) == 3 for k in keys):
                fix += " For volumes, set spatial_dims: 3."
            raise ConfigError(f"unknown config key(s): {said}.", fix)

    @staticmethod
    def _build(cls, values: dict):
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.init
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and f.name not in values
        ]
        if missing:
            raise ConfigError(
                f"missing config key(s): {missing}.", f"add them to the config file or pass --{missing[0]} VALUE."
            )
        try:
            return cls(**values)
        except ConfigError:
            raise
        except (ValueError, TypeError) as err:
            raise ConfigError(
                f"invalid {cls.__name__} settings: {err}", "correct the value named above in the config."
            ) from None


def dimension_view(
    cls: type, spatial_dims: int, only: dict[int, tuple[str, ...]], defaults: dict[int, dict] | None = None
) -> type:
    """`cls` as the arguments of `spatial_dims`-D runs: one dataclass for 2D and 3D, one view per dimension.

    The view drops the fields that only the other dimension takes, so the parser names them as that dimension's
    keys instead of letting them pass unused, and carries this dimension's own defaults (shown by `--help`).

    Args:
        cls: the argument dataclass shared by both dimensions.
        spatial_dims: 2 (images) or 3 (volumes).
        only: dimension -> the fields only runs of that dimension take.
        defaults: dimension -> {field: default} where that dimension's default differs from `cls`'s.

    Example:
        >>> @dataclasses.dataclass
        ... class Args:
        ...     image_size: int = 64
        ...     loss: str = "ce"
        >>> View = dimension_view(Args, 3, {2: ("image_size",)}, {3: {"loss": "dice_ce"}})
        >>> View(), View.other_dimension_keys
        (Args3D(loss='dice_ce'), {'image_size': 2})
    """
    dropped = {name: dims for dims, names in only.items() if dims != spatial_dims for name in names}
    own = (defaults or {}).get(spatial_dims, {})

    def spec(f: dataclasses.Field):
        if f.name not in own:
            return dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)
        value = own[f.name]  # a fresh copy per instance for lists and dicts, as default_factory gives
        if isinstance(value, (list, dict)):
            return dataclasses.field(default_factory=lambda: copy.deepcopy(value), metadata=f.metadata)
        return dataclasses.field(default=value, metadata=f.metadata)

    kept = [(f.name, f.type, spec(f)) for f in dataclasses.fields(cls) if f.name not in dropped]
    view = dataclasses.make_dataclass(f"{cls.__name__}{spatial_dims}D", kept)
    view.__module__, view.__doc__ = cls.__module__, cls.__doc__  # its annotations resolve in cls's module
    view.other_dimension_keys = dropped
    return view


def parse_config(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """`MedArgumentParser(dataclass_types).parse(argv)`: the dataclasses from `--config FILE` and flags."""
    return MedArgumentParser(dataclass_types).parse(argv)


def spatial_dims(argv: list[str] | None = None) -> int:
    """`spatial_dims` of a command line: from `--spatial_dims N`, else its `--config` file, else 2.

    `Task.main` reads it first to pick the task's 2D (image) or 3D (volume) argument dataclasses.
    """
    argv = sys.argv[1:] if argv is None else argv
    value = None
    for i, arg in enumerate(argv):
        key, _, inline = arg.partition("=")
        if key in ("--spatial_dims", "--config"):
            given = inline or (argv[i + 1] if i + 1 < len(argv) else "")
            if key == "--spatial_dims":
                return int(given) if given.isdigit() else 2
            value = read_config_file(given).get("spatial_dims") if given else None
    return int(value) if isinstance(value, int) else 2


__all__ = ["MedArgumentParser", "coerce", "dimension_view", "parse_config", "read_config_file", "spatial_dims"]
