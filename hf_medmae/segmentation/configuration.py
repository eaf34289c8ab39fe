"""Segmenter configurations: the loss settings both segmenters share, the UNETR segmenter's and the U-Net's.

Each config checks itself in `check()` at the end of `__post_init__` (so also on `from_pretrained`).
`spatial_dims` enters here: it is recorded in the config and passed to every MONAI block.
"""

from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig, ViTConfig

from ..encoder import encoder_fields
from ..errors import ConfigError
from ..modeling_mae3d import MedMAE3DConfig
from ..validation import as_pair

LOSSES = ("ce", "dice_ce")
DECODERS = ("unetr", "light")
# BasicUNet halves the resolution four times and instance-normalises the bottleneck: it needs >= 2x2 there.
UNET_MULTIPLE = 16


def default_skip_layers(num_hidden_layers: int, num_stages: int) -> list[int]:
    """1-based encoder blocks feeding the `num_stages - 1` intermediate decoder stages, spread over the depth.

    Skip j (j = 1 .. num_stages-1, shallow to deep) takes block round(j * depth / num_stages); the deepest
    stage takes the final encoder output. Depth 12 with 4 stages gives MONAI UNETR's [3, 6, 9].

    Args:
        num_hidden_layers: encoder depth.
        num_stages: upsampling stages, log2(patch size).

    Example:
        >>> default_skip_layers(6, 3)
        [2, 4]
    """
    # floor(x + 0.5), not round(): Python's round() sends 0.5 and 2.5 to the even neighbour.
    return [
        min(num_hidden_layers, max(1, math.floor(j * num_hidden_layers / num_stages + 0.5)))
        for j in range(1, num_stages)
    ]


@strict
class SegmentationLossConfig(PreTrainedConfig):
    r"""Loss settings shared by [`MedSegConfig`] and [`MedUNetConfig`] (not a model on its own).

    Args:
        ignore_index (`int`, defaults to 255): label value of unlabelled pixels (sparse labels, seed 001).
        loss (`str`, defaults to `"ce"`): `"ce"` cross-entropy that skips `ignore_index` (sparse labels),
            or `"dice_ce"` MONAI `DiceCELoss` (with sparse labels: `MaskedDiceLoss` on the labelled pixels + CE).
        class_weights (`list[float]`, *optional*): one weight per class for either loss.
    """

    ignore_index: int = 255
    loss: str = "ce"
    class_weights: list[float] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check()  # the package's one validation style: our ConfigError, not wrapped by @strict

    def check(self):
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}.", f"use one of {list(LOSSES)}: ce for sparse labels.")
        if self.class_weights is not None and len(self.class_weights) != self.num_labels:
            raise ConfigError(
                f"class_weights has {len(self.class_weights)} entries but there are {self.num_labels} labels.",
                "give one weight per class, or leave class_weights unset.",
            )
        if 0 <= self.ignore_index < self.num_labels:
            raise ConfigError(
                f"ignore_index={self.ignore_index} is a real class index (num_labels={self.num_labels}).",
                "use a value outside [0, num_labels), e.g. 255, for unlabelled pixels.",
            )


@strict
class MedSegConfig(SegmentationLossConfig):
    r"""Configuration of [`MedSegForSegmentation`]: a ViT encoder config plus a UNETR decoder.

    Args:
        vit_config (`dict`, *optional*): the encoder, e.g. `ViTConfig(...).to_dict()` or an MAE config's
            dict (only `ViTConfig` fields are kept). Defaults to `ViTConfig()` (ViT-B/16).
        decoder (`str`, defaults to `"unetr"`): `unetr` (skips from `skip_layers` and the image) or `light` (the
            last block upsampled progressively with a few convolutions, no skips; `decoder.LightDecoder`).
        feature_size (`int`, defaults to 32): decoder channels at input resolution; doubled per stage (unetr).
        skip_layers (`list[int]`, *optional*): 1-based encoder blocks feeding the intermediate stages,
            shallow (high resolution) to deep; length log2(patch) - 1. Default: `default_skip_layers`.
            Seed 001 used [3, 5] at patch 8 and [4] at patch 4 with 6 layers.
        norm_name (`str`, defaults to `"instance"`): MONAI norm of the decoder blocks.
        res_block (`bool`, defaults to `True`): residual MONAI blocks.
        spatial_dims (`int`, defaults to 2): 2 for a ViT encoder; 3 for the 3D MAE's encoder
            (`MedMAE3DModel`, cubic patches: `tubelet_size == patch_size`) and a 3D UNETR decoder.

    Example:
        >>> config = MedSegConfig(vit_config={"image_size": 32, "patch_size": 8, "hidden_size": 32,
        ...     "num_hidden_layers": 6, "num_attention_heads": 2, "intermediate_size": 64}, num_labels=3)
        >>> config.num_stages, config.skip_layers
        (3, [2, 4])
    """

    model_type = "medmae_segmenter"

    vit_config: dict | None = None
    decoder: str = "unetr"
    feature_size: int = 32
    skip_layers: list[int] | None = None
    norm_name: str = "instance"
    res_block: bool = True
    spatial_dims: int = 2

    def __post_init__(self, **kwargs):
        self.vit_config = encoder_fields(self.vit_config or {}, self.spatial_dims)
        if self.skip_layers is None and self._patch_is_power_of_two():
            # Written into the config so a checkpoint records exactly which blocks feed the decoder.
            self.skip_layers = default_skip_layers(self.vit_config["num_hidden_layers"], self.num_stages)
        super().__post_init__(**kwargs)

    def _patch_is_power_of_two(self) -> bool:
        ph, pw = as_pair(self.vit_config["patch_size"])
        return ph == pw and ph >= 2 and ph & (ph - 1) == 0

    @property
    def encoder_config(self) -> PreTrainedConfig:
        """A `ViTConfig` (2D) or an encoder-only `MedMAE3DConfig` (3D)."""
        if self.spatial_dims == 3:
            return MedMAE3DConfig(**{k: v for k, v in self.vit_config.items() if k not in ("image_mean", "image_std")})
        return ViTConfig(**self.vit_config)

    @property
    def input_size(self) -> tuple[int, ...]:
        """The encoder's input size: (H, W), or (D, H, W) for 3D."""
        hw = as_pair(self.vit_config["image_size"])
        return (self.vit_config["num_frames"], *hw) if self.spatial_dims == 3 else hw

    @property
    def patch_size(self) -> int:
        return as_pair(self.vit_config["patch_size"])[0]

    @property
    def num_stages(self) -> int:
        return int(math.log2(self.patch_size))

    def check(self):
        super().check()
        vit = self.vit_config
        if not self._patch_is_power_of_two():
            raise ConfigError(
                f"patch_size {vit['patch_size']} is not a square power of two >= 2.",
                "use patch_size 2, 4, 8 or 16: each UNETR stage upsamples by 2.",
            )
        if self.spatial_dims not in (2, 3):
            raise ConfigError(
                f"spatial_dims={self.spatial_dims} is not supported.", "use 2 for images or 3 for volumes."
            )
        p = self.patch_size
        if self.spatial_dims == 3 and vit["tubelet_size"] != p:
            raise ConfigError(
                f"the 3D encoder's patches are {vit['tubelet_size']}x{p}x{p} voxels; UNETR upsamples every "
                "axis by 2 per stage, so it needs cubic patches.",
                f"pre-train with tubelet_size: {p} (= patch_size), or resample the volumes to near-isotropic voxels.",
            )
        if any(s % p for s in self.input_size):
            shown = "x".join(map(str, self.input_size))
            raise ConfigError(
                f"input size {shown} is not divisible by patch_size {p}.",
                f"choose an image_size (and depth) that is a multiple of {p}.",
            )
        depth = vit["num_hidden_layers"]
        if len(self.skip_layers) != self.num_stages - 1 or not all(1 <= i <= depth for i in self.skip_layers):
            raise ConfigError(
                f"skip_layers={self.skip_layers} must hold {self.num_stages - 1} block indices in [1, {depth}] "
                f"(patch {p} has {self.num_stages} stages).",
                f"leave skip_layers unset for {default_skip_layers(depth, self.num_stages)}, or give that many.",
            )
        if self.decoder not in DECODERS or self.feature_size < 1:
            raise ConfigError(
                f"decoder={self.decoder!r}, feature_size={self.feature_size} is not supported.",
                f"use decoder: one of {list(DECODERS)} with a positive feature_size such as 32.",
            )


@strict
class MedUNetConfig(SegmentationLossConfig):
    r"""Configuration of [`MedUNetForSegmentation`], the supervised MONAI `BasicUNet` baseline of seed 001.

    Args:
        in_channels (`int`, defaults to 1): image channels.
        spatial_dims (`int`, defaults to 2): 3 for the 3D U-Net baseline.
        features (`list[int]`, defaults to MONAI's (32, 32, 64, 128, 256, 32)): six channel counts.
    """

    model_type = "medmae_unet"

    in_channels: int = 1
    spatial_dims: int = 2
    features: list[int] | tuple[int, ...] = (32, 32, 64, 128, 256, 32)

    def check(self):
        super().check()
        if len(self.features) != 6 or self.in_channels < 1:
            raise ConfigError(
                f"features={list(self.features)}, in_channels={self.in_channels} do not fit BasicUNet.",
                "give six positive channel counts, e.g. [32, 32, 64, 128, 256, 32].",
            )


AutoConfig.register(MedSegConfig.model_type, MedSegConfig, exist_ok=True)
AutoConfig.register(MedUNetConfig.model_type, MedUNetConfig, exist_ok=True)

__all__ = [
    "DECODERS",
    "LOSSES",
    "UNET_MULTIPLE",
    "MedSegConfig",
    "MedUNetConfig",
    "SegmentationLossConfig",
    "default_skip_layers",
]
