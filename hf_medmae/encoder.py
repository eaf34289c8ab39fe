"""Encoder conversion: any hf_medmae / ViT-MAE / ViT checkpoint -> a plain, trainable `transformers.ViTModel`.

Weights are read only from safetensors files and loaded strictly: every encoder tensor of the
checkpoint must land in the model and every model tensor must come from the checkpoint, so a
renamed or truncated checkpoint fails loudly instead of leaving randomly initialised layers.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedConfig, ViTConfig, ViTModel

from .data.transforms import channel_stats
from .errors import CheckpointError, ConfigError, DataError
from .loading import load_checkpoint, read_config, resolve_checkpoint
from .modeling_mae3d import ENCODER_FIELDS, MedMAE3DConfig, MedMAE3DModel
from .validation import as_pair

logger = logging.getLogger(__name__)

MAE_TYPES = ("medmae", "vit_mae")
OWN_TYPES = ("medmae_classifier", "medmae_segmenter")
VIT_TYPES = ("vit",)
MAE3D_TYPES = ("medmae3d",)
SUPPORTED_TYPES = MAE_TYPES + OWN_TYPES + VIT_TYPES + MAE3D_TYPES
# What a 3D encoder-only load leaves out on purpose: the MAE's decoder side, a segmenter's UNETR decoder.
ENCODER3D_EXTRAS = r"^(decoder\.|encoder_to_decoder\.|mask_token$)"

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

# Checkpoint entries that an encoder-only load leaves out on purpose: an MAE's decoder, a classifier's or
# segmenter's head, a ViTModel's pooler. Anything else that does not fit is an error.
ENCODER_EXTRAS = r"^(decoder\.|head\.|fc_norm\.|classifier\.|pooler\.|embeddings\.mask_token$)"


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
    return {k: v for k, v in encoder.state_dict().items() if not re.match(ENCODER_EXTRAS, k)}


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
    (h, w), (ph, pw) = as_pair(image_size), as_pair(patch_size)
    if h <= 0 or w <= 0 or h % ph or w % pw:
        raise ConfigError(
            f"image_size {h}x{w} is not a positive multiple of the checkpoint's patch_size {ph}x{pw}.",
            f"use a multiple of the patch size, e.g. {max(ph, h // ph * ph)}.",
        )


def _resize(model: ViTModel, image_size: int | tuple[int, int]) -> ViTModel:
    """A copy of `model` for a new image size, with bicubically interpolated patch position embeddings."""
    config = model.config
    (h, w), (ph, pw) = as_pair(image_size), as_pair(config.patch_size)
    old_h, old_w = as_pair(config.image_size)
    state = model.state_dict()
    state["embeddings.position_embeddings"] = interpolate_pos_embed(
        state["embeddings.position_embeddings"], (old_h // ph, old_w // pw), (h // ph, w // pw)
    )
    config.image_size = image_size if isinstance(image_size, int) else list(image_size)
    resized = ViTModel(config, add_pooling_layer=False)
    resized.load_state_dict(state, strict=True)
    return resized


def _load_encoder_3d(folder: Path, config: dict, image_size) -> nn.Module:
    """The 3D MAE's encoder (`MedMAE3DModel`) from a medmae3d or 3D segmenter checkpoint, strictly loaded."""
    if image_size is not None:
        raise ConfigError(
            "image_size cannot be changed for a 3D encoder: its fixed 3D positions are made for its crop size.",
            "leave image_size unset and feed crops of the checkpoint's size (sliding windows for whole volumes).",
        )
    fields = encoder_fields(config, spatial_dims=3)
    encoder_config = MedMAE3DConfig(**{k: v for k, v in fields.items() if k not in NORM_FIELDS})
    # A segmenter keeps its encoder under `vit.`; MedMAE3DModel's own prefix is VideoMAE's `videomae.`.
    mapping = {r"^vit\.": "videomae."} if config["model_type"] in OWN_TYPES else None
    model = load_checkpoint(
        MedMAE3DModel,
        folder,
        model_types=SUPPORTED_TYPES,
        what="a 3D encoder",
        key_mapping=mapping,
        ignore_unexpected=ENCODER3D_EXTRAS,
        config=encoder_config,
    )
    mean, std = _read_normalisation(folder, encoder_config)
    model.config.image_mean, model.config.image_std = mean, std
    model.image_mean, model.image_std = mean, std
    return model


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
        For 3D checkpoints (medmae3d, or a medmae_segmenter with `spatial_dims: 3`) a `MedMAE3DModel`
        (VideoMAE's encoder with fixed 3D sin-cos positions, input [B, C, D, H, W]). Otherwise a
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
    folder = resolve_checkpoint(name_or_path, revision, token, cache_dir, local_files_only)
    config = read_config(folder, SUPPORTED_TYPES, what="a checkpoint load_encoder can convert")
    if config["model_type"] in MAE3D_TYPES or config.get("spatial_dims") == 3:
        return _load_encoder_3d(folder, config, image_size)
    if config["model_type"] in OWN_TYPES and not isinstance(config.get("vit_config"), dict):
        raise CheckpointError(
            f"the {config['model_type']} config in {folder} has no vit_config.",
            "re-save the model with hf_medmae (its config stores the encoder as vit_config).",
        )
    vit_config = vit_config_from(config)
    if image_size is not None:
        _check_image_size(image_size, vit_config.patch_size)
    # ViTModel's learnable position embeddings start from the MAE's fixed sin-cos values.
    model = load_checkpoint(
        ViTModel,
        folder,
        model_types=SUPPORTED_TYPES,
        what="an encoder",
        ignore_unexpected=ENCODER_EXTRAS,
        config=vit_config,
        add_pooling_layer=False,
    )
    if not bool(model.embeddings.position_embeddings.detach().abs().amax()):
        logger.warning(
            "%s has all-zero position embeddings: it was pre-trained position-blind (transformers 5.x built "
            "ViT-MAEs so before hf_medmae set sin-cos values). Its features ignore where patches are; "
            "pre-train it again with this version.",
            folder,
        )
    if image_size is not None and as_pair(image_size) != as_pair(vit_config.image_size):
        model = _resize(model, image_size)
    mean, std = _read_normalisation(folder, vit_config)
    model.config.image_mean, model.config.image_std = mean, std
    model.image_mean, model.image_std = mean, std
    return model


def build_encoder(
    model_name_or_path: str | None,
    init: str,
    channels: int,
    image_size: int,
    patch_size: int | None = None,
    **architecture,
) -> ViTModel:
    """The encoder of a transfer run: the checkpoint's weights (`init="mae"`), or its architecture randomly
    initialised (`init="scratch"`), or without a checkpoint a fresh ViT of `architecture`.

    Args:
        model_name_or_path: An MAE/ViT checkpoint folder or Hub id; None with `init="scratch"` builds a new ViT.
        init: "mae" (the checkpoint's weights) or "scratch" (same architecture, random weights).
        channels: The data's channel count, checked against the checkpoint's.
        image_size: Input size; the checkpoint's position embeddings are interpolated to it.
        patch_size: Must match the checkpoint's when set; default 8 for a new ViT.
        **architecture: `ViTConfig` fields of a new ViT (hidden_size, num_hidden_layers, ...).

    Example:
        >>> encoder = build_encoder("runs/mae", "mae", channels=3, image_size=64)  # doctest: +SKIP
    """
    if model_name_or_path is None:
        if init == "mae":
            raise ConfigError(
                "init: mae needs model_name_or_path.",
                "point model_name_or_path at an MAE checkpoint, or use init: scratch.",
            )
        config = ViTConfig(image_size=image_size, patch_size=patch_size or 8, num_channels=channels, **architecture)
        return ViTModel(config, add_pooling_layer=False)
    encoder = load_encoder(model_name_or_path, image_size=image_size)
    found = encoder.config
    if patch_size is not None and patch_size != found.patch_size:
        raise CheckpointError(
            f"the checkpoint has patch size {found.patch_size}, the config asks for {patch_size}.",
            f"set patch_size: {found.patch_size} (or remove it), or use a checkpoint pre-trained with patch "
            f"{patch_size}.",
        )
    if found.num_channels != channels:
        raise DataError(
            f"the checkpoint expects {found.num_channels}-channel images, the data has {channels} channels.",
            f"use images with {found.num_channels} channels, or pre-train an MAE on {channels}-channel images.",
        )
    if init == "scratch":  # same architecture, fresh weights: the comparison is one flag apart
        encoder = ViTModel(encoder.config, add_pooling_layer=False)
        encoder.image_mean = encoder.image_std = None
    return encoder


def encoder_normalisation(
    encoder: nn.Module | None, init: str, train_images: list[np.ndarray]
) -> tuple[list[float], list[float]]:
    """The checkpoint's image_mean/std when fine-tuning its weights (its inputs were scaled so), else the
    training images' per-channel statistics.

    Args:
        encoder: The encoder (`load_encoder` attaches `image_mean` / `image_std`), or None for a CNN.
        init: "mae" uses the checkpoint's statistics when it has them; "scratch" the images'.
        train_images: The training images, [C, H, W] arrays.
    """
    mean, std = getattr(encoder, "image_mean", None), getattr(encoder, "image_std", None)
    if init == "mae" and mean is not None and std is not None:
        if len(mean) != train_images[0].shape[0]:
            raise DataError(
                f"the checkpoint's image_mean has {len(mean)} entries for {train_images[0].shape[0]}-channel data.",
                "re-save the checkpoint's preprocessor_config.json with per-channel statistics of its data.",
            )
        return list(mean), list(std)
    if init == "mae" and encoder is not None:
        logger.warning("the checkpoint stores no image_mean/std: normalising with the training images' statistics")
    return channel_stats(train_images)


def encoder_fields(config: PreTrainedConfig | dict, spatial_dims: int = 2) -> dict:
    """The encoder fields of any ViT-like config (`ViTConfig`, `ViTMAEConfig`, `MedMAEConfig`, dict), or with
    `spatial_dims=3` of a 3D MAE config (`MedMAE3DConfig`: VideoMAE's fields, incl. `num_frames`, `tubelet_size`).

    Args:
        config: a config object or a dict; only the encoder's architecture (and normalisation) is kept.
        spatial_dims: 2 for a ViT encoder, 3 for the 3D MAE's.

    Example:
        >>> encoder_fields({"hidden_size": 32, "num_attention_heads": 2, "mask_ratio": 0.75})["hidden_size"]
        32
    """
    if spatial_dims == 2:
        return vit_config_dict(vit_config_from(config))
    values = config if isinstance(config, dict) else config.to_dict()
    if isinstance(values.get("vit_config"), dict):
        values = values["vit_config"]
    defaults = MedMAE3DConfig(**{k: values[k] for k in ENCODER_FIELDS if values.get(k) is not None})
    encoder = {k: getattr(defaults, k) for k in ENCODER_FIELDS}
    encoder.update({k: list(values[k]) for k in ("image_mean", "image_std") if values.get(k) is not None})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in encoder.items()}


__all__ = [
    "encoder_fields",
    "build_encoder",
    "encoder_normalisation",
    "load_encoder",
    "vit_config_from",
    "vit_config_dict",
    "mae_encoder_state_dict",
    "interpolate_pos_embed",
    "SUPPORTED_TYPES",
]
