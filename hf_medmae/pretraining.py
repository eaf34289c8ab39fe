"""The MAE a pre-training run trains, for images (`MedMAEForPreTraining`) or volumes (`MedMAE3DForPreTraining`):
a new one from the run's model arguments, or a checkpoint continued with this run's masking.

The model arguments are any object with the fields of `run_mae.py`'s `ModelArguments` (architecture, the masking
fields of `RECIPE_FIELDS`, unset = `MASKING_DEFAULTS` for a new MAE and the checkpoint's own when continuing).

    >>> from types import SimpleNamespace
    >>> args = SimpleNamespace(patch_size=8, tubelet_size=None, hidden_size=48, num_hidden_layers=2,
    ...     num_attention_heads=2, intermediate_size=96, decoder_hidden_size=48, decoder_num_hidden_layers=1,
    ...     decoder_num_attention_heads=2, decoder_intermediate_size=96, layer_norm_eps=1e-6, norm_pix_loss=None,
    ...     mask_ratio=None, mask_generator=None, mask_generator_kwargs=None, throw_ratio=None)
    >>> mae_config(args, 1, volume_size=(16, 32, 32)).grid_size  # cubic 8-voxel patches: tubelet_size = patch_size
    (2, 4, 4)
"""

from __future__ import annotations

import logging
from dataclasses import fields, is_dataclass

from .configuration import MedMAEConfig
from .data.pretraining import Supervision
from .errors import ConfigError, DataError
from .loading import load_checkpoint
from .modeling_mae import RECIPE_FIELDS, MedMAEForPreTraining, apply_recipe, fresh_masking
from .modeling_mae3d import MedMAE3DConfig, MedMAE3DForPreTraining

logger = logging.getLogger(__name__)

MAE = MedMAEForPreTraining | MedMAE3DForPreTraining


def _given(model_args) -> dict:
    """The fields of the model arguments (a dataclass or any namespace)."""
    if is_dataclass(model_args):
        return {f.name: getattr(model_args, f.name) for f in fields(model_args)}
    return dict(vars(model_args))


def mae_config(
    model_args, num_channels: int, volume_size: tuple[int, int, int] | None = None, **extra
) -> MedMAEConfig | MedMAE3DConfig:
    """The config of a new MAE the arguments describe: 2D for images of `num_channels` channels, or 3D for crops of
    `volume_size` (D, H, W), whose patches are `tubelet_size` (default: `patch_size`, cubic) x `patch_size`^2.

    Args:
        model_args: the run's model arguments (see the module docstring).
        num_channels: the data's channel count.
        volume_size: the 3D MAE's crop (the run's `roi_size`); None for the 2D MAE.
        extra: more config fields (e.g. the supervised head's `id2label`, `class_weights`).
    """
    given = _given(model_args)
    masking = fresh_masking(model_args)
    if volume_size is None:
        keys = set(MedMAEConfig.__dataclass_fields__) & set(given) - {"num_channels"} - set(extra) - set(RECIPE_FIELDS)
        return MedMAEConfig(num_channels=num_channels, **{k: given[k] for k in keys}, **masking, **extra)
    shape = {"num_channels", "num_frames", "image_size", "tubelet_size"}
    keys = set(MedMAE3DConfig.__dataclass_fields__) & set(given) - shape - set(extra) - set(RECIPE_FIELDS)
    d, h, w = volume_size
    return MedMAE3DConfig(
        num_channels=num_channels,
        num_frames=d,
        image_size=[h, w],
        tubelet_size=given.get("tubelet_size") or given["patch_size"],
        **{k: given[k] for k in keys},
        **masking,
        **extra,
    )


def build_mae(
    model_args,
    num_channels: int,
    volume_size: tuple[int, int, int] | None = None,
    supervision: Supervision | None = None,
) -> MAE:
    """The MAE to pre-train: new (`mae_config`), or `model_args.model_name_or_path` continued with this run's masking
    (`apply_recipe`), checked against the data (channels; the crop size of a 3D MAE; the classes of a supervised head).

    Args:
        model_args: the run's model arguments (see the module docstring).
        num_channels: the data's channel count.
        volume_size: the crop (D, H, W) of a 3D MAE; None for the 2D MAE.
        supervision: the labels of an MSMAE pre-training (2D only), or None.
    """
    given = _given(model_args)
    if volume_size is not None and given.get("supervised_loss_weight", 0) > 0:
        raise ConfigError(
            "the supervised head (supervised_loss_weight > 0) is for 2D images only.",
            "pre-train volumes with supervised_loss_weight: 0.",
        )
    choice = given.get("attn_implementation", "auto")
    attn = {"attn_implementation": "sdpa" if choice == "auto" else choice} if volume_size is None else {}
    if not given.get("model_name_or_path"):
        if volume_size is not None:
            return MedMAE3DForPreTraining(mae_config(model_args, num_channels, volume_size))
        extra = supervision.config_fields() if supervision else {}
        return MedMAEForPreTraining._from_config(mae_config(model_args, num_channels, **extra), **attn)
    path = given["model_name_or_path"]
    if volume_size is not None:
        model = load_checkpoint(MedMAE3DForPreTraining, path, what="a 3D MAE")
        if model.config.num_channels != num_channels or tuple(model.config.volume_size) != tuple(volume_size):
            raise DataError(
                f"the checkpoint takes {model.config.num_channels}-channel crops of {list(model.config.volume_size)}, "
                f"the data has {num_channels} channels and roi_size {list(volume_size)}.",
                f"set roi_size: {list(model.config.volume_size)} and use {model.config.num_channels}-channel volumes.",
            )
    else:
        model = load_checkpoint(MedMAEForPreTraining, path, model_types=("medmae", "vit_mae"), what="an MAE", **attn)
        if model.config.num_channels != num_channels:
            raise DataError(
                f"the checkpoint expects {model.config.num_channels} channels, the data has {num_channels}.",
                "use data with the checkpoint's channel count, or pre-train from scratch.",
            )
        check_head(model, supervision)
    apply_recipe(model, model_args)
    return model


def check_head(model: MedMAEForPreTraining, supervision: Supervision | None) -> None:
    """A continued MSMAE needs a checkpoint with a supervised head for the same classes."""
    head = model.classifier is not None
    if supervision is not None and not (head and model.config.num_labels == len(supervision.class_names)):
        raise ConfigError(
            f"labels_csv has {len(supervision.class_names)} classes but the checkpoint "
            + (f"has a supervised head for {model.config.num_labels}." if head else "has no supervised head."),
            "continue from a checkpoint pre-trained with the same classes, or pre-train from scratch with labels_csv.",
        )
    if supervision is None and head:
        logger.warning("the checkpoint has a supervised head but no labels_csv is given: its cross-entropy term is 0")


__all__ = ["build_mae", "check_head", "mae_config"]
