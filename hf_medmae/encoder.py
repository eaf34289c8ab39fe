"""Encoder conversion: any hf_medmae / ViT-MAE / ViT checkpoint -> a plain, trainable `transformers.ViTModel`.

Weights are read only from safetensors files and loaded strictly: every encoder tensor of the
checkpoint must land in the model and every model tensor must come from the checkpoint, so a
renamed or truncated checkpoint fails loudly instead of leaving randomly initialised layers.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedConfig, ViTConfig, ViTModel

from .errors import CheckpointError, ConfigError

MAE_TYPES = ("medmae", "vit_mae")
OWN_TYPES = ("medmae_classifier", "medmae_segmenter")
VIT_TYPES = ("vit",)
SUPPORTED_TYPES = MAE_TYPES + OWN_TYPES + VIT_TYPES

# ViTConfig fields that define the encoder's architecture (and its dropout), copied between configs.
VIT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "layer_norm_eps",
    "image_size",
    "patch_size",
    "num_channels",
    "qkv_bias",
)
NORM_FIELDS = ("image_mean", "image_std")

# transformers 5.23 `save_pretrained` writes ViT blocks under their pre-v5 names (and reloads either).
# We accept both spellings; current names pass through unchanged.
_LEGACY_RENAMES = (
    (re.compile(r"^encoder\.layer\.(\d+)\."), r"layers.\1."),
    (re.compile(r"\.attention\.attention\.query\."), ".attention.q_proj."),
    (re.compile(r"\.attention\.attention\.key\."), ".attention.k_proj."),
    (re.compile(r"\.attention\.attention\.value\."), ".attention.v_proj."),
    (re.compile(r"\.attention\.output\.dense\."), ".attention.o_proj."),
    (re.compile(r"\.intermediate\.dense\."), ".mlp.fc1."),
    (re.compile(r"^(layers\.\d+)\.output\.dense\."), r"\1.mlp.fc2."),
)
# Checkpoint entries of a ViTModel that our pooler-free ViTModel does not have, on purpose.
_IGNORED_ENCODER_KEYS = re.compile(r"^(pooler\.|embeddings\.mask_token$)")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _as_pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value), int(value))


def vit_config_from(config: PreTrainedConfig | dict) -> ViTConfig:
    """A `ViTConfig` with the encoder dimensions of an MAE, ViT, classifier or segmenter config.

    Args:
        config: A `MedMAEConfig` / `ViTMAEConfig` / `ViTConfig`, one of our fine-tuned configs
            (which hold the encoder under `vit_config`), or the `config.json` dict of any of them.
            Saved per-channel normalisation (`image_mean` / `image_std`) is carried along.

    Returns:
        A fresh `ViTConfig` (model_type "vit").

    Example:
        >>> from hf_medmae import MedMAEConfig
        >>> vit_config_from(MedMAEConfig(hidden_size=32, num_attention_heads=2)).hidden_size
        32
    """
    values = config if isinstance(config, dict) else config.to_dict()
    if isinstance(values.get("vit_config"), dict):
        values = values["vit_config"]
    kwargs = {k: values[k] for k in VIT_FIELDS + NORM_FIELDS if values.get(k) is not None}
    return ViTConfig(**kwargs)


def vit_config_dict(config: ViTConfig) -> dict:
    """The architecture fields of a `ViTConfig` (plus normalisation) as a plain JSON-able dict.

    Args:
        config: The encoder's config.

    Example:
        >>> vit_config_dict(ViTConfig(hidden_size=32, num_attention_heads=2))["hidden_size"]
        32
    """
    values = {k: getattr(config, k) for k in VIT_FIELDS}
    values.update({k: list(getattr(config, k)) for k in NORM_FIELDS if getattr(config, k, None) is not None})
    for key in ("image_size", "patch_size"):
        if isinstance(values[key], tuple):
            values[key] = list(values[key])
    return values


def mae_encoder_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder tensors of a model, under `transformers.ViTModel` names (no pooler).

    Args:
        model: A `MedMAEForPreTraining` / `ViTMAEForPreTraining`, one of our classifier or
            segmenter models (anything with a `.vit` encoder), or a `ViTMAEModel` / `ViTModel`.

    Returns:
        `{name: tensor}` loadable with `ViTModel(..., add_pooling_layer=False).load_state_dict(strict=True)`.

    Example:
        >>> state = mae_encoder_state_dict(mae_model)  # doctest: +SKIP
        >>> state["embeddings.position_embeddings"].shape  # [1, 1 + L, D]
    """
    encoder = model.vit if hasattr(model, "vit") else model
    return {k: v for k, v in encoder.state_dict().items() if not _IGNORED_ENCODER_KEYS.match(k)}


def interpolate_pos_embed(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """Resize patch position embeddings bicubically to a new patch grid; the CLS position is kept.

    Args:
        pos_embed: [1, 1 + gh*gw, D] position embeddings (CLS first).
        old_grid: (gh, gw) grid the embeddings were made for.
        new_grid: (gh', gw') target grid.

    Returns:
        [1, 1 + gh'*gw', D]; the input itself when the grids are equal.

    Example:
        >>> interpolate_pos_embed(torch.zeros(1, 65, 32), (8, 8), (12, 12)).shape
        torch.Size([1, 145, 32])
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    dim = pos_embed.shape[-1]
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.reshape(1, *old_grid, dim).permute(0, 3, 1, 2)  # [1, D, gh, gw]
    patch_pos = nn.functional.interpolate(patch_pos.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)  # [1, gh'*gw', D]
    return torch.cat([cls_pos, patch_pos], dim=1)


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or flag


def _resolve(name_or_path: str | os.PathLike, revision, token, cache_dir, local_files_only) -> Path:
    """A local directory holding the checkpoint: the path itself, or a Hub snapshot (json/safetensors/md only)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")):
        raise CheckpointError(
            f"{name_or_path} is not a checkpoint directory.",
            "pass the folder written by save_pretrained (holding config.json and model.safetensors) or a Hub repo id.",
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    offline = _offline() if local_files_only is None else local_files_only
    try:
        return Path(
            snapshot_download(
                str(name_or_path),
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=offline,
                allow_patterns=["*.json", "*.safetensors", "*.md"],
            )
        )
    except LocalEntryNotFoundError as err:
        raise CheckpointError(
            f"{name_or_path} (revision {revision or 'main'}) is not in the local Hub cache and downloads are off "
            f"(offline={offline}).",
            "download it once with network access (unset HF_HUB_OFFLINE), or pass a local checkpoint folder.",
        ) from err
    except HFValidationError as err:
        raise CheckpointError(
            f"{name_or_path!r} is neither an existing folder nor a valid Hub repo id.",
            "check the path (it must exist) or use a repo id such as 'user/medmae-wbc'.",
        ) from err
    except Exception as err:  # network, auth, missing repo/revision: all end in the same advice
        raise CheckpointError(
            f"could not fetch {name_or_path} (revision {revision or 'main'}) from the Hub: {err}",
            "check the repo id, revision and access token (token=... or `hf auth login`).",
        ) from err


def _read_config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise CheckpointError(
            f"{folder} has no config.json.", "save the model with save_pretrained, which writes config.json."
        )
    config = json.loads(file.read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise CheckpointError(
            f"{folder} holds a model of type {model_type!r}, which load_encoder cannot convert.",
            f"use a checkpoint of one of the supported types: {', '.join(SUPPORTED_TYPES)}.",
        )
    if model_type in OWN_TYPES and not isinstance(config.get("vit_config"), dict):
        raise CheckpointError(
            f"the {model_type} config in {folder} has no vit_config.",
            "re-save the model with hf_medmae (its config stores the encoder as vit_config).",
        )
    return config


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickled weights ({', '.join(pickles)}); pickled weights are refused because "
            "unpickling can run arbitrary code.",
            "re-save the model with save_pretrained(..., safe_serialization=True) (the default) to write "
            "model.safetensors, then load that.",
        )
    raise CheckpointError(
        f"{folder} has no model.safetensors (nor model.safetensors.index.json). A Hub repo holding only "
        "pytorch_model.bin is refused too: pickled weights are never loaded.",
        "save the model with save_pretrained (safe_serialization, the default) and point to that folder.",
    )


def _encoder_keys(state: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of the encoder, under current ViTModel names; decoders and heads dropped."""
    if model_type in OWN_TYPES or any(k.startswith("vit.") for k in state):
        state = {k[len("vit.") :]: v for k, v in state.items() if k.startswith("vit.")}
    # else: a bare encoder (ViTModel / ViTMAEModel) saved on its own, keys without a prefix
    out = {}
    for key, value in state.items():
        for pattern, target in _LEGACY_RENAMES:
            key = pattern.sub(target, key)
        if not _IGNORED_ENCODER_KEYS.match(key):
            out[key] = value
    return out


def _check_keys(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], folder: Path) -> None:
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"the encoder weights in {folder} do not match the architecture in its config: "
            f"missing {missing or 'none'}, unexpected {unexpected or 'none'}.",
            "the checkpoint is truncated or was saved from a different architecture; re-save it with "
            "save_pretrained from the model that produced it (no layer is left randomly initialised).",
        )
    for key, value in found.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"tensor {key} in {folder} has shape {tuple(value.shape)} but the config implies "
                f"{tuple(expected[key].shape)}.",
                "the config.json and the weights disagree: re-save both together with save_pretrained.",
            )


def _read_normalisation(folder: Path, vit_config: ViTConfig) -> tuple[list[float] | None, list[float] | None]:
    """image_mean / image_std from preprocessor_config.json, else from the config (a saved fine-tuned model)."""
    file = folder / "preprocessor_config.json"
    if file.is_file():
        values = json.loads(file.read_text())
        if values.get("image_mean") is not None and values.get("image_std") is not None:
            return [float(x) for x in values["image_mean"]], [float(x) for x in values["image_std"]]
    mean, std = getattr(vit_config, "image_mean", None), getattr(vit_config, "image_std", None)
    if mean is None or std is None:
        return None, None
    return [float(x) for x in mean], [float(x) for x in std]


def _check_image_size(image_size: int | tuple[int, int], patch_size) -> None:
    (h, w), (ph, pw) = _as_pair(image_size), _as_pair(patch_size)
    if h <= 0 or w <= 0 or h % ph or w % pw:
        raise ConfigError(
            f"image_size {h}x{w} is not a positive multiple of the checkpoint's patch_size {ph}x{pw}.",
            f"use a multiple of the patch size, e.g. {max(ph, h // ph * ph)}.",
        )


def _resize(model: ViTModel, image_size: int | tuple[int, int]) -> ViTModel:
    """A copy of `model` for a new image size, with bicubically interpolated patch position embeddings."""
    config = model.config
    (h, w), (ph, pw) = _as_pair(image_size), _as_pair(config.patch_size)
    old_h, old_w = _as_pair(config.image_size)
    state = model.state_dict()
    state["embeddings.position_embeddings"] = interpolate_pos_embed(
        state["embeddings.position_embeddings"], (old_h // ph, old_w // pw), (h // ph, w // pw)
    )
    config.image_size = image_size if isinstance(image_size, int) else list(image_size)
    resized = ViTModel(config, add_pooling_layer=False)
    resized.load_state_dict(state, strict=True)
    return resized


def load_encoder(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> ViTModel:
    """Load the encoder of an MAE, ViT or hf_medmae fine-tuned checkpoint as a trainable `ViTModel`.

    Args:
        name_or_path: A local checkpoint folder or a Hub repo id. Supported `model_type`s: medmae,
            vit_mae (the MAE encoder `vit.*`), medmae_classifier / medmae_segmenter (their `vit`
            backbone), vit (a `ViTModel` / `ViTForImageClassification`).
        revision: Hub branch, tag or commit (repo ids only).
        image_size: Target image size (int or (h, w)); position embeddings are interpolated
            bicubically when it differs from the checkpoint's. Must be a multiple of the patch size.
        token: Hub token for private repos.
        cache_dir: Hub cache folder.
        local_files_only: Use only the local Hub cache; `None` follows `HF_HUB_OFFLINE`.

    Returns:
        `ViTModel(add_pooling_layer=False)` whose position embeddings are a learnable parameter
        (MAE's are fixed sin-cos; fine-tuning learns them from there, as in seed 002). The saved
        normalisation is attached as `encoder.image_mean` / `encoder.image_std` and in the config
        (None when the checkpoint has none).

    Raises:
        CheckpointError: unsupported model type, only pickled weights, missing / unexpected /
            mis-shaped encoder tensors, or a repo that cannot be fetched.
        ConfigError: `image_size` not divisible by the patch size.

    Example:
        >>> encoder = load_encoder("runs/mae-wbc", image_size=96)  # doctest: +SKIP
        >>> encoder(torch.randn(2, 3, 96, 96)).last_hidden_state.shape  # [B, 1 + L, D]
    """
    folder = _resolve(name_or_path, revision, token, cache_dir, local_files_only)
    config = _read_config(folder)
    vit_config = vit_config_from(config)
    if image_size is not None:
        _check_image_size(image_size, vit_config.patch_size)
    model = ViTModel(vit_config, add_pooling_layer=False)
    expected = model.state_dict()
    found = _encoder_keys(_read_safetensors(folder), config["model_type"])
    _check_keys(found, expected, folder)
    model.load_state_dict(found, strict=True)
    model.embeddings.position_embeddings.requires_grad_(True)
    if image_size is not None and _as_pair(image_size) != _as_pair(vit_config.image_size):
        model = _resize(model, image_size)
    mean, std = _read_normalisation(folder, vit_config)
    model.config.image_mean, model.config.image_std = mean, std
    model.image_mean, model.image_std = mean, std
    return model


__all__ = [
    "load_encoder",
    "vit_config_from",
    "vit_config_dict",
    "mae_encoder_state_dict",
    "interpolate_pos_embed",
    "SUPPORTED_TYPES",
]
