"""Building a segmenter for 2D images or 3D volumes: UNETR on a pre-trained (or re-initialised) encoder, or the
U-Net baseline. The dimension is the length of the input size: (H, W) for images, (D, H, W) for volumes.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..encoder import encoder_fields, load_encoder
from ..errors import ConfigError, DataError
from .configuration import UNET_MULTIPLE, MedSegConfig
from .modeling import MedSegForSegmentation, MedUNetForSegmentation, build_unet_baseline

MODELS = ("unetr", "unet")
INITS = ("mae", "scratch")


def _size_name(input_size: Sequence[int]) -> str:
    return f"image_size {input_size[0]}" if len(input_size) == 2 else f"roi_size {list(input_size)}"


def check_segmenter_choice(model: str, init: str, model_name_or_path: str | None, input_size: Sequence[int]) -> None:
    """Refuse, before any data is read, a model / init / checkpoint / input size that cannot go together.

    Args:
        model: "unetr" (ViT encoder + UNETR decoder) or "unet" (MONAI BasicUNet baseline).
        init: "mae" (the checkpoint's encoder weights) or "scratch" (its architecture, random weights).
        model_name_or_path: the MAE / ViT checkpoint UNETR takes its encoder from.
        input_size: (H, W) for images, (D, H, W) for volume crops.

    Raises:
        ConfigError: UNETR without a checkpoint, a U-Net with init mae or a checkpoint, or a U-Net input not a
            multiple of 16.

    Example:
        >>> check_segmenter_choice("unet", "scratch", None, (64, 64))
    """
    dims = len(input_size)
    if model not in MODELS or init not in INITS:
        raise ConfigError(f"model={model!r}, init={init!r} is unknown.", f"use model in {MODELS}, init in {INITS}.")
    if model == "unetr" and not model_name_or_path:
        example = "outputs/nuclei3d_mae (run_mae.py with spatial_dims: 3)" if dims == 3 else "outputs/quickstart"
        raise ConfigError(
            "model unetr needs model_name_or_path (its encoder architecture, and weights with init mae).",
            f"pass the folder written by run_mae.py, e.g. {example}.",
        )
    if model == "unet" and init == "mae":
        raise ConfigError(
            "the U-Net baseline has no ViT encoder to take MAE weights.", "use init: scratch with model: unet."
        )
    if model == "unet" and model_name_or_path:  # else an MAE passed to a U-Net config would be silently unused
        raise ConfigError(
            f"model unet takes no checkpoint, but model_name_or_path={model_name_or_path!r} is set.",
            "to fine-tune that MAE add --model unetr --init mae; for the U-Net drop model_name_or_path.",
        )
    if model == "unet" and any(s % UNET_MULTIPLE for s in input_size):
        good = [max(UNET_MULTIPLE, s // UNET_MULTIPLE * UNET_MULTIPLE) for s in input_size]
        raise ConfigError(
            f"{_size_name(input_size)} is not divisible by {UNET_MULTIPLE} (the U-Net's stride).",
            f"use multiples of {UNET_MULTIPLE}, e.g. {_size_name(good)}.",
        )


def load_segmentation_encoder(
    name_or_path: str, input_size: Sequence[int], channels: int, source: str = "the data"
) -> nn.Module:
    """The encoder of an MAE / ViT checkpoint for UNETR, checked against the data's channels and input size.

    Args:
        name_or_path: checkpoint folder or Hub id (a 2D or a 3D MAE, or a segmenter built on one).
        input_size: (H, W): 2D position embeddings are interpolated to it; (D, H, W): it must be the 3D
            encoder's crop size (its 3D positions are made for it).
        channels: the data's channel count.
        source: the data's name, for messages.

    Raises:
        ConfigError: a 2D encoder for volumes (or a 3D one for images), an image size not a multiple of the patch.
        DataError: another channel count or crop size than the encoder's.
    """
    dims = len(input_size)
    encoder = load_encoder(name_or_path, image_size=tuple(input_size) if dims == 2 else None)
    is_3d = getattr(encoder.config, "num_frames", None) is not None
    if is_3d != (dims == 3):
        how = "run_mae.py with spatial_dims: 3" if dims == 3 else "run_mae.py"
        raise ConfigError(
            f"{name_or_path} is a {'3D' if is_3d else '2D'} encoder but the data are {dims}D.",
            f"pre-train a {dims}D MAE on this kind of data ({how}).",
        )
    size = list(encoder.config.volume_size) if dims == 3 else list(input_size)
    if encoder.config.num_channels != channels or size != list(input_size):
        what = "images" if dims == 2 else f"crops of {size}"
        raise DataError(
            f"the checkpoint expects {encoder.config.num_channels}-channel {what} but {source} has {channels} "
            f"channels{f' and roi_size {list(input_size)}' if dims == 3 else ''}.",
            "use an encoder pre-trained on data with this channel count (run_mae.py on these data)"
            + (f", and roi_size: {size} (the 3D positions are made for it)." if dims == 3 else "."),
        )
    return encoder


def build_segmenter(
    model: str,
    init: str,
    encoder: nn.Module | None,
    channels: int,
    class_names: list[str],
    spatial_dims: int = 2,
    ignore_index: int = 255,
    loss: str = "ce",
    class_weights: list[float] | None = None,
    feature_size: int = 16,
    skip_layers: list[int] | None = None,
    unet_features: Sequence[int] = (32, 32, 64, 128, 256, 32),
    decoder: str = "unetr",
) -> MedSegForSegmentation | MedUNetForSegmentation:
    """The segmenter of a run: UNETR on `encoder` (its weights with init mae, its architecture with scratch), or
    the U-Net baseline, for images (`spatial_dims` 2) or volumes (3).

    Args:
        model: "unetr" or "unet".
        init: "mae" or "scratch".
        encoder: from `load_segmentation_encoder` (UNETR); None for the U-Net.
        channels: input channels.
        class_names: one name per class id.
        spatial_dims: 2 or 3.
        ignore_index, loss, class_weights: the loss settings (`SegmentationLossConfig`).
        feature_size, skip_layers: UNETR's decoder width and the encoder blocks it takes skips from.
        unet_features: BasicUNet's six channel counts.
        decoder: the ViT's decoder, "unetr" or "light" (`MedSegConfig.decoder`).

    Example:
        >>> unet = build_segmenter("unet", "scratch", None, 1, ["bg", "cell"], unet_features=(4, 4, 8, 8, 16, 4))
        >>> unet.config.num_labels
        2
    """
    labels = dict(
        num_labels=len(class_names),
        id2label=dict(enumerate(class_names)),
        label2id={n: i for i, n in enumerate(class_names)},
    )
    losses = dict(loss=loss, class_weights=class_weights, ignore_index=ignore_index)
    if model == "unet":
        return build_unet_baseline(
            channels, spatial_dims=spatial_dims, features=tuple(unet_features), **labels, **losses
        )
    decoder = dict(feature_size=feature_size, skip_layers=skip_layers, decoder=decoder)
    if init == "mae":
        return MedSegForSegmentation.from_encoder(encoder, **labels, **losses, **decoder)
    config = MedSegConfig(
        vit_config=encoder_fields(encoder.config, spatial_dims),
        spatial_dims=spatial_dims,
        **labels,
        **losses,
        **decoder,
    )
    return MedSegForSegmentation(config)  # the same architecture, random weights


__all__ = ["build_segmenter", "check_segmenter_choice", "load_segmentation_encoder"]
