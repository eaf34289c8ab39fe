"""Loading checkpoints: one resolver (local folder or Hub snapshot) and one strict, safetensors-only loader.

Every model of ours, the MAE encoder conversion, `run_mae.py --model_name_or_path` and the reload of
the best checkpoint go through `load_checkpoint`: transformers' own `from_pretrained` (its key
mapping renames pre-5.0 weight names, shards are read from the index) with `use_safetensors=True`,
and any missing, unexpected or mis-shaped key is a `CheckpointError` rather than a layer silently left
at its random initialisation. Pickled weights are refused by name and never opened.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from .errors import CheckpointError
from .hub import check_safetensors, pull_checkpoint


class CurrentKeyNamesMixin:
    """Save weights under the key names the model uses now.

    transformers 5.x `save_pretrained` defaults to `save_original_format=True`, which writes ViT
    blocks under their pre-5.0 names (`encoder.layer.N.attention.attention.query`, ...). The Trainer
    restores checkpoints (resume) with a non-strict `load_state_dict` that does not rename, so every
    renamed weight would silently keep its stale value. With current names both `from_pretrained`
    and the Trainer load every weight.
    """

    def save_pretrained(self, *args, save_original_format: bool = False, **kwargs):
        return super().save_pretrained(*args, save_original_format=save_original_format, **kwargs)


def resolve_checkpoint(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """A local folder holding the checkpoint: the path itself, or a Hub snapshot of its JSON, safetensors and Markdown.

    Args:
        name_or_path: a `save_pretrained` folder or a Hub repo id (`namespace/name`).
        revision, token, cache_dir: Hub arguments (repo ids only).
        local_files_only: use only the Hub cache; None follows `HF_HUB_OFFLINE`.

    Example:
        >>> resolve_checkpoint("outputs/quickstart")  # doctest: +SKIP
        PosixPath('outputs/quickstart')
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1:
        raise CheckpointError(
            f"{name_or_path} is not a checkpoint directory.",
            "pass the folder written by save_pretrained (holding config.json and model.safetensors) "
            "or a Hub repo id such as 'user/medmae-wbc'.",
        )
    if local_files_only is None:  # read now: huggingface_hub reads HF_HUB_OFFLINE once, at import
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return Path(
        pull_checkpoint(
            str(name_or_path), revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
        )
    )


def read_config(folder: Path, model_types: tuple[str, ...], what: str = "a supported checkpoint") -> dict:
    """`config.json` of a checkpoint, whose `model_type` must be one of `model_types` (`what` names them in errors)."""
    file = folder / "config.json"
    if not file.is_file():
        raise CheckpointError(
            f"{folder} has no config.json.", "save the model with save_pretrained, which writes config.json."
        )
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{file} is not valid JSON ({err}).", "re-save the checkpoint with save_pretrained."
        ) from None
    if config.get("model_type") not in model_types:
        raise CheckpointError(
            f"{folder} holds a model of type {config.get('model_type')!r}, not {what} ({', '.join(model_types)}).",
            f"use a checkpoint of one of the supported types: {', '.join(model_types)}.",
        )
    return config


@contextlib.contextmanager
def _quiet_load_report():
    """transformers prints a table of unexpected keys; we check them ourselves and raise, so keep the log clean."""
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def load_checkpoint(
    model_class: type[PreTrainedModel],
    name_or_path: str | os.PathLike,
    *,
    model_types: tuple[str, ...] | None = None,
    what: str = "a supported checkpoint",
    ignore_unexpected: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    **kwargs,
) -> PreTrainedModel:
    """`model_class.from_pretrained` from safetensors, every weight accounted for, else a `CheckpointError`.

    Args:
        model_class: a transformers model class (`MedMAEForPreTraining`, `ViTModel`, an Auto class, ...).
        name_or_path: a local folder or a Hub repo id (see `resolve_checkpoint`).
        model_types: accepted `config.json` model types; default: `model_class`'s own.
        ignore_unexpected: regex of checkpoint keys that may be left out on purpose (e.g. an MAE decoder
            when only the encoder is loaded); any other unexpected key is an error.
        **kwargs: passed to `from_pretrained` (`config=`, `attn_implementation=`, ...).

    Example:
        >>> model = load_checkpoint(MedMAEForPreTraining, "outputs/quickstart")  # doctest: +SKIP
    """
    folder = resolve_checkpoint(name_or_path, revision, token, cache_dir, local_files_only)
    check_safetensors(folder)  # first: a pickle-only folder is named as such, whatever its config says
    own = getattr(getattr(model_class, "config_class", None), "model_type", None)
    if model_types or own:  # Auto classes have no own type: from_pretrained dispatches on config.json
        read_config(folder, model_types or (own,), what)
    try:
        with _quiet_load_report():
            model, info = model_class.from_pretrained(
                folder, use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
    except OSError as err:
        raise CheckpointError(
            f"cannot load a checkpoint from {folder} ({err}).",
            "point at a folder written by save_pretrained (config.json + model.safetensors).",
        ) from None
    skip = re.compile(ignore_unexpected) if ignore_unexpected else None
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not (skip and skip.search(k)))
    missing, mismatched = sorted(info.get("missing_keys", ())), sorted(info.get("mismatched_keys", ()))
    if missing or unexpected:
        raise CheckpointError(
            f"the weights in {folder} do not match the architecture in its config (from_pretrained's missing_keys / "
            f"unexpected_keys): missing {missing or 'none'}, unexpected {unexpected or 'none'}.",
            "the checkpoint is truncated or was saved from a different architecture; re-save it with save_pretrained "
            "from the model that produced it (no layer is left randomly initialised).",
        )
    if mismatched:
        shapes = "; ".join(f"{key}: checkpoint {tuple(a)} vs config {tuple(b)}" for key, a, b in mismatched)
        raise CheckpointError(
            f"tensors in {folder} do not have the shapes its config implies ({shapes}).",
            "the config.json and the weights disagree: re-save both together with save_pretrained.",
        )
    return model


__all__ = ["CurrentKeyNamesMixin", "check_safetensors", "load_checkpoint", "read_config", "resolve_checkpoint"]
