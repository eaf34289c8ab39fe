"""Segmentation on a pre-trained ViT encoder: a UNETR decoder built from MONAI blocks, and a U-Net baseline.

MONAI's own `UNETR` fixes patch 16, 12 layers and skips hs[3, 6, 9]. Here the decoder is assembled from
the same MONAI blocks for any power-of-two patch size: log2(patch) upsampling stages, one encoder skip per
intermediate stage (layers spread over the depth unless `skip_layers` says otherwise), a convolutional
skip on the input image, and the final encoder output as the deepest feature (seed 001, section 4.2).
The encoder is a plain `transformers.ViTModel` under the attribute `vit`, so weights live under `vit.*`.
"""

from __future__ import annotations

import math

import torch
from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from monai.networks.nets import BasicUNet
from torch import nn
from transformers import AutoConfig, AutoModelForSemanticSegmentation, PreTrainedConfig, PreTrainedModel
from transformers import ViTConfig, ViTModel
from transformers.modeling_outputs import SemanticSegmenterOutput

from .errors import CheckpointError, ConfigError, DataError
from .checkpoint import CurrentKeyNamesMixin

LOSSES = ("ce", "dice_ce")
DECODERS = ("unetr",)
# The fields that describe a ViT encoder; everything else in a (MAE) config is dropped from `vit_config`.
VIT_FIELDS = tuple(ViTConfig.__annotations__)
# BasicUNet halves the resolution four times and instance-normalises the bottleneck: it needs >= 2x2 there.
UNET_MULTIPLE = 16


def _as_pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def build_config(config_class: type[PreTrainedConfig], **kwargs) -> PreTrainedConfig:
    """`config_class(**kwargs)`, raising our `ConfigError` itself instead of `@strict`'s wrapper around it.

    Args:
        config_class: a `@strict` config class whose validators raise `ConfigError`.
        **kwargs: its fields.

    Example:
        >>> build_config(MedSegConfig, num_labels=3).skip_layers
        [3, 6, 9]
    """
    try:
        return config_class(**kwargs)
    except StrictDataclassError as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise


def encoder_fields(config: PreTrainedConfig) -> dict:
    """The ViT encoder fields of any ViT-like config (`ViTConfig`, `ViTMAEConfig`, `MedMAEConfig`, dict).

    Args:
        config: a config object or a dict; keys that are not `ViTConfig` fields are dropped.

    Example:
        >>> encoder_fields({"hidden_size": 32, "mask_ratio": 0.75})["hidden_size"]
        32
    """
    given = config if isinstance(config, dict) else config.to_dict()
    full = ViTConfig(**{k: v for k, v in given.items() if k in VIT_FIELDS})
    return {k: getattr(full, k) for k in VIT_FIELDS}


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
    return [min(num_hidden_layers, max(1, math.floor(j * num_hidden_layers / num_stages + 0.5)))
            for j in range(1, num_stages)]


@strict
class SegmentationLossConfig(PreTrainedConfig):
    r"""Loss settings shared by [`MedSegConfig`] and [`MedUNetConfig`] (not a model on its own).

    Args:
        ignore_index (`int`, defaults to 255): label value of unlabelled pixels (sparse labels, seed 001).
        loss (`str`, defaults to `"ce"`): `"ce"` cross-entropy that skips `ignore_index` (sparse labels),
            or `"dice_ce"` MONAI `DiceCELoss` (dense labels only).
        class_weights (`list[float]`, *optional*): one weight per class for either loss.
    """

    ignore_index: int = 255
    loss: str = "ce"
    class_weights: list[float] | None = None

    def validate_architecture(self):
        super().validate_architecture()
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
        decoder (`str`, defaults to `"unetr"`): decoder family; only `unetr` exists.
        feature_size (`int`, defaults to 32): decoder channels at input resolution; doubled per stage.
        skip_layers (`list[int]`, *optional*): 1-based encoder blocks feeding the intermediate stages,
            shallow (high resolution) to deep; length log2(patch) - 1. Default: `default_skip_layers`.
            Seed 001 used [3, 5] at patch 8 and [4] at patch 4 with 6 layers.
        norm_name (`str`, defaults to `"instance"`): MONAI norm of the decoder blocks.
        res_block (`bool`, defaults to `True`): residual MONAI blocks.
        spatial_dims (`int`, defaults to 2): kept as a parameter for a future 3D encoder; only 2 now.

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
        self.vit_config = encoder_fields(self.vit_config or {})
        if self.skip_layers is None and self._patch_is_power_of_two():
            # Written into the config so a checkpoint records exactly which blocks feed the decoder.
            self.skip_layers = default_skip_layers(self.vit_config["num_hidden_layers"], self.num_stages)
        super().__post_init__(**kwargs)

    def _patch_is_power_of_two(self) -> bool:
        ph, pw = _as_pair(self.vit_config["patch_size"])
        return ph == pw and ph >= 2 and ph & (ph - 1) == 0

    @property
    def encoder_config(self) -> ViTConfig:
        return ViTConfig(**self.vit_config)

    @property
    def patch_size(self) -> int:
        return _as_pair(self.vit_config["patch_size"])[0]

    @property
    def num_stages(self) -> int:
        return int(math.log2(self.patch_size))

    def validate_architecture(self):
        super().validate_architecture()
        vit = self.vit_config
        if not self._patch_is_power_of_two():
            raise ConfigError(
                f"patch_size {vit['patch_size']} is not a square power of two >= 2.",
                "use patch_size 2, 4, 8 or 16: each UNETR stage upsamples by 2.",
            )
        (h, w), p = _as_pair(vit["image_size"]), self.patch_size
        if h % p or w % p:
            raise ConfigError(f"image_size {h}x{w} is not divisible by patch_size {p}.",
                              f"choose an image_size that is a multiple of {p}.")
        depth = vit["num_hidden_layers"]
        if len(self.skip_layers) != self.num_stages - 1 or not all(1 <= i <= depth for i in self.skip_layers):
            raise ConfigError(
                f"skip_layers={self.skip_layers} must hold {self.num_stages - 1} block indices in [1, {depth}] "
                f"(patch {p} has {self.num_stages} stages).",
                f"leave skip_layers unset for {default_skip_layers(depth, self.num_stages)}, or give that many.",
            )
        if self.decoder not in DECODERS or self.feature_size < 1:
            raise ConfigError(f"decoder={self.decoder!r}, feature_size={self.feature_size} is not supported.",
                              "use decoder: unetr with a positive feature_size such as 32.")
        if self.spatial_dims != 2:
            raise ConfigError(f"spatial_dims={self.spatial_dims}: the ViT encoder is 2D.",
                              "use spatial_dims: 2 (3D needs a 3D patch encoder, not available yet).")


class UnetrDecoder(nn.Module):
    """UNETR decoder from MONAI blocks for `num_stages` = log2(patch) upsampling stages.

    Level k (0 .. num_stages) lives at resolution H / 2**k with `feature_size * 2**k` channels; level 0 is a
    conv block on the image, levels 1 .. num_stages-1 are upsampled encoder skips, the deepest level is
    the final encoder output.

    Args:
        spatial_dims: 2 for images.
        in_channels: image channels.
        hidden_size: encoder width.
        num_stages: upsampling stages.
        feature_size: channels at input resolution.
        out_channels: number of classes.
        norm_name: MONAI norm name.
        res_block: residual blocks.

    Example:
        >>> dec = UnetrDecoder(2, 3, hidden_size=32, num_stages=2, feature_size=8, out_channels=4)
        >>> dec(torch.randn(1, 3, 16, 16), [torch.randn(1, 32, 4, 4)], torch.randn(1, 32, 4, 4)).shape
        torch.Size([1, 4, 16, 16])
    """

    def __init__(self, spatial_dims: int, in_channels: int, hidden_size: int, num_stages: int,
                 feature_size: int, out_channels: int, norm_name: str = "instance", res_block: bool = True):
        super().__init__()
        dims, norm = spatial_dims, norm_name
        self.input_block = UnetrBasicBlock(dims, in_channels, feature_size, kernel_size=3, stride=1,
                                           norm_name=norm, res_block=res_block)
        # A PrUpBlock with num_layer=n upsamples by 2**(n+1): from H/patch up to level k's H/2**k.
        self.skip_blocks = nn.ModuleList(
            UnetrPrUpBlock(dims, hidden_size, feature_size * 2**k, num_layer=num_stages - k - 1, kernel_size=3,
                           stride=1, upsample_kernel_size=2, norm_name=norm, conv_block=True, res_block=res_block)
            for k in range(1, num_stages)
        )
        # Deep to shallow: stage k takes level k+1 (the encoder output for the deepest) up to level k.
        self.up_blocks = nn.ModuleList(
            UnetrUpBlock(dims, hidden_size if k == num_stages - 1 else feature_size * 2 ** (k + 1),
                         feature_size * 2**k, kernel_size=3, upsample_kernel_size=2, norm_name=norm,
                         res_block=res_block)
            for k in reversed(range(num_stages))
        )
        self.out_block = UnetOutBlock(dims, feature_size, out_channels)

    def forward(self, image: torch.Tensor, skips: list[torch.Tensor], deepest: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] image, skips [B, D, h, w] shallow to deep, deepest [B, D, h, w] -> [B, classes, H, W]."""
        levels = [self.input_block(image)] + [block(x) for block, x in zip(self.skip_blocks, skips)]
        x = deepest
        for up, skip in zip(self.up_blocks, reversed(levels)):
            x = up(x, skip)
        return self.out_block(x)


def check_images(pixel_values: torch.Tensor, num_channels: int, multiple: int, source: str) -> None:
    """Raise `DataError` unless `pixel_values` is [B, num_channels, H, W] with H, W multiples of `multiple`."""
    if pixel_values.dim() != 4:
        raise DataError(f"pixel_values must be [batch, channels, height, width], got {tuple(pixel_values.shape)}.",
                        "stack images into a 4-D tensor (add a channel axis for grey images).")
    channels, (h, w) = pixel_values.shape[1], pixel_values.shape[2:]
    if channels != num_channels:
        raise DataError(
            f"the images have {channels} channels but {source} expects {num_channels}.",
            f"convert the images to {num_channels} channels, or use an encoder pre-trained with "
            f"num_channels: {channels} for this data.",
        )
    if h % multiple or w % multiple:
        raise DataError(f"image size {h}x{w} is not divisible by {multiple} (the patch size / network stride).",
                        f"crop or pad the images to a multiple of {multiple}, e.g. {h // multiple * multiple}.")


def check_labels(labels: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, H, W] or [B, 1, H, W] integer masks matching the images -> [B, H, W] long, or `DataError`."""
    if labels.dim() == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.is_floating_point():
        raise DataError(f"labels have dtype {labels.dtype}; class indices must be integers.",
                        "convert the masks with .long() after mapping them to class indices.")
    expected = (pixel_values.shape[0], *pixel_values.shape[2:])
    if tuple(labels.shape) != expected:
        raise DataError(f"labels have shape {tuple(labels.shape)} but the images need {expected} ([B, H, W]).",
                        "resize/crop masks with the same transform as their images (nearest interpolation).")
    return labels.long()


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, config: SegmentationLossConfig) -> torch.Tensor:
    """Loss of [B, K, H, W] logits against [B, H, W] class indices, as `config.loss` says.

    Args:
        logits: [B, num_labels, H, W] raw scores.
        labels: [B, H, W] long; `config.ignore_index` marks unlabelled pixels (only with `loss="ce"`).
        config: any `SegmentationLossConfig` (`loss`, `ignore_index`, `class_weights`, `num_labels`).

    Example:
        >>> cfg = MedSegConfig(num_labels=2, vit_config={"image_size": 8, "patch_size": 4})
        >>> segmentation_loss(torch.zeros(1, 2, 2, 2), torch.tensor([[[0, 1], [255, 255]]]), cfg).item()
        0.6931471824645996
    """
    labelled = labels != config.ignore_index
    bad = torch.unique(labels[labelled & ((labels < 0) | (labels >= config.num_labels))])
    if bad.numel():
        raise DataError(
            f"label values {bad[:10].tolist()} are outside [0, {config.num_labels}) and are not "
            f"ignore_index={config.ignore_index}.",
            "map mask values to class indices 0..num_labels-1 (e.g. WBC masks 0/128/255 -> 0/1/2) and mark "
            "unlabelled pixels with ignore_index.",
        )
    weight = None
    if config.class_weights is not None:
        weight = torch.tensor(config.class_weights, dtype=logits.dtype, device=logits.device)
    if config.loss == "dice_ce":
        if not bool(labelled.all()):
            raise DataError(f"loss dice_ce needs dense labels but {int((~labelled).sum())} pixels are "
                            f"ignore_index={config.ignore_index}.", "use loss: ce for sparse labels.")
        return DiceCELoss(to_onehot_y=True, softmax=True, weight=weight)(logits, labels[:, None])
    if not bool(labelled.any()):
        # Mean CE over zero pixels is 0/0 = NaN; a batch without labels must contribute nothing instead.
        return logits.sum() * 0.0
    return nn.functional.cross_entropy(logits, labels, weight=weight, ignore_index=config.ignore_index)


class _SegmenterBase(CurrentKeyNamesMixin, PreTrainedModel):
    """Shared by both segmenters: MONAI/torch default init for conv blocks, loss from the config."""

    main_input_name = "pixel_values"
    input_modalities = ("image",)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Keep PyTorch's own init for MONAI convs/norms (what MONAI's UNETR and BasicUNet train with);
        # the ViT sub-model is initialised by its own `_init_weights`.
        if hasattr(module, "reset_parameters") and any(True for _ in module.parameters(recurse=False)):
            module.reset_parameters()

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`segmentation_loss` with this model's config. logits [B, K, H, W], labels [B, H, W]."""
        return segmentation_loss(logits, labels, self.config)

    def _source(self) -> str:
        name = getattr(self.config, "_name_or_path", "") or ""
        return f"the model {name!r}" if name else "this model"


class MedSegForSegmentation(_SegmenterBase):
    r"""ViT encoder (`self.vit`, a `transformers.ViTModel`) + UNETR decoder from MONAI blocks.

    Example:
        >>> config = MedSegConfig(num_labels=3, vit_config={"image_size": 32, "patch_size": 4, "hidden_size": 32,
        ...     "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "num_channels": 16})
        >>> out = MedSegForSegmentation(config)(torch.randn(2, 16, 32, 32), labels=torch.zeros(2, 32, 32).long())
        >>> out.logits.shape
        torch.Size([2, 3, 32, 32])
    """

    config_class = MedSegConfig
    config: MedSegConfig
    base_model_prefix = "vit"

    def __init__(self, config: MedSegConfig):
        super().__init__(config)
        encoder = config.encoder_config
        self.vit = ViTModel(encoder, add_pooling_layer=False)
        self.decoder = UnetrDecoder(config.spatial_dims, encoder.num_channels, encoder.hidden_size,
                                    config.num_stages, config.feature_size, config.num_labels,
                                    config.norm_name, config.res_block)
        self.post_init()

    def encoder_features(self, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Skip features (shallow to deep) and the final encoder output, each [B, D, H/p, W/p]."""
        size = tuple(pixel_values.shape[2:])
        out = self.vit(pixel_values, output_hidden_states=True,
                       interpolate_pos_encoding=size != tuple(self.vit.embeddings.image_size))
        grid = tuple(s // self.config.patch_size for s in size)

        def to_map(tokens: torch.Tensor) -> torch.Tensor:
            # [B, 1+L, D] -> drop CLS -> [B, D, L] -> [B, D, gh, gw]
            return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, *grid)

        # hidden_states[0] is the embedding output, so block i (1-based) is hidden_states[i].
        skips = [to_map(out.hidden_states[i]) for i in self.config.skip_layers]
        return skips, to_map(out.last_hidden_state)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> SemanticSegmenterOutput:
        r"""
        Args:
            pixel_values: [B, C, H, W] images, H and W multiples of the patch size (other sizes than the
                config's interpolate the position embeddings).
            labels: [B, H, W] class indices, `config.ignore_index` for unlabelled pixels.

        Returns:
            `SemanticSegmenterOutput` with `logits` [B, num_labels, H, W] and `loss` when labels are given.
        """
        check_images(pixel_values, self.config.vit_config["num_channels"], self.config.patch_size, self._source())
        if labels is not None:
            labels = check_labels(labels, pixel_values)
        skips, deepest = self.encoder_features(pixel_values)
        logits = self.decoder(pixel_values, skips, deepest)
        loss = self.compute_loss(logits, labels) if labels is not None else None
        return SemanticSegmenterOutput(loss=loss, logits=logits)

    @classmethod
    def from_encoder(cls, vit: nn.Module, num_labels: int, **cfg_kwargs) -> "MedSegForSegmentation":
        """Segmenter whose encoder weights are copied from `vit` (a `ViTModel`, or an MAE's `.vit`).

        Args:
            vit: encoder with `ViTModel` weight names; a `pooler.*` is dropped (unused here), every other
                key must match exactly.
            num_labels: number of classes.
            **cfg_kwargs: other `MedSegConfig` fields (`feature_size`, `skip_layers`, `loss`, ...).

        Example:
            >>> encoder = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
            ...     num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
            >>> MedSegForSegmentation.from_encoder(encoder, num_labels=3).config.skip_layers
            [1, 1]
        """
        config = build_config(MedSegConfig, vit_config=encoder_fields(vit.config), num_labels=num_labels, **cfg_kwargs)
        model = cls(config)
        state = {k: v for k, v in vit.state_dict().items() if not k.startswith("pooler.")}
        missing, unexpected = model.vit.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"the encoder's weights do not match a ViTModel: missing {missing}, unexpected {unexpected}.",
                "pass a transformers ViTModel/ViTMAEModel (e.g. MedMAEForPreTraining.vit) without a mask token.",
            )
        return model


@strict
class MedUNetConfig(SegmentationLossConfig):
    r"""Configuration of [`MedUNetForSegmentation`], the supervised MONAI `BasicUNet` baseline of seed 001.

    Args:
        in_channels (`int`, defaults to 1): image channels.
        spatial_dims (`int`, defaults to 2).
        features (`list[int]`, defaults to MONAI's (32, 32, 64, 128, 256, 32)): six channel counts.
    """

    model_type = "medmae_unet"

    in_channels: int = 1
    spatial_dims: int = 2
    features: list[int] | tuple[int, ...] = (32, 32, 64, 128, 256, 32)

    def validate_architecture(self):
        super().validate_architecture()
        if len(self.features) != 6 or self.in_channels < 1:
            raise ConfigError(f"features={list(self.features)}, in_channels={self.in_channels} do not fit BasicUNet.",
                              "give six positive channel counts, e.g. [32, 32, 64, 128, 256, 32].")


class MedUNetForSegmentation(_SegmenterBase):
    """MONAI `BasicUNet` with the segmenter's forward, outputs and loss, saved like any HF model.

    Example:
        >>> model = build_unet_baseline(3, 4, features=(8, 8, 16, 32, 64, 8))
        >>> model(torch.randn(1, 3, 32, 32)).logits.shape
        torch.Size([1, 4, 32, 32])
    """

    config_class = MedUNetConfig
    config: MedUNetConfig
    base_model_prefix = "unet"

    def __init__(self, config: MedUNetConfig):
        super().__init__(config)
        self.unet = BasicUNet(config.spatial_dims, config.in_channels, config.num_labels, features=config.features)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> SemanticSegmenterOutput:
        """Same contract as `MedSegForSegmentation.forward`; H and W must be multiples of 16."""
        check_images(pixel_values, self.config.in_channels, UNET_MULTIPLE, self._source())
        if labels is not None:
            labels = check_labels(labels, pixel_values)
        logits = self.unet(pixel_values)
        loss = self.compute_loss(logits, labels) if labels is not None else None
        return SemanticSegmenterOutput(loss=loss, logits=logits)


def build_unet_baseline(in_channels: int, num_labels: int, spatial_dims: int = 2,
                        features: tuple[int, ...] = (32, 32, 64, 128, 256, 32), **cfg_kwargs) -> MedUNetForSegmentation:
    """The supervised U-Net baseline (MONAI `BasicUNet`) with the segmenter's interface.

    Args:
        in_channels: image channels.
        num_labels: number of classes.
        spatial_dims: 2 for images.
        features: BasicUNet's six channel counts.
        **cfg_kwargs: `ignore_index`, `loss`, `class_weights`, `id2label`.

    Example:
        >>> build_unet_baseline(16, 10, features=(8, 8, 16, 32, 64, 8)).config.num_labels
        10
    """
    config = build_config(MedUNetConfig, in_channels=in_channels, num_labels=num_labels, spatial_dims=spatial_dims,
                          features=list(features), **cfg_kwargs)
    return MedUNetForSegmentation(config)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, roi_size: int | tuple[int, int], sw_batch_size: int = 4,
            overlap: float = 0.25) -> torch.Tensor:
    """Class map of images of any size with MONAI sliding-window inference over `roi_size` tiles.

    Args:
        model: a segmenter whose `forward(pixel_values)` returns `.logits` [B, K, h, w].
        images: [B, C, H, W]; tiles are `roi_size` (the training size), blended with `overlap`.
        roi_size: tile size, a multiple of the model's patch size.
        sw_batch_size: tiles per forward pass.
        overlap: fraction of overlap between neighbouring tiles.

    Returns:
        [B, H, W] long class indices, on the device of `images`.

    Example:
        >>> model = build_unet_baseline(1, 2, features=(4, 4, 8, 8, 16, 4))
        >>> predict(model, torch.randn(1, 1, 48, 48), roi_size=32).shape
        torch.Size([1, 48, 48])
    """
    was_training = model.training
    model.eval()
    try:
        logits = sliding_window_inference(
            images, roi_size, sw_batch_size, lambda x: model(pixel_values=x).logits, overlap=overlap,
            sw_device=next(model.parameters()).device, device=images.device,
        )
    finally:
        model.train(was_training)
    return logits.argmax(dim=1)


AutoConfig.register(MedSegConfig.model_type, MedSegConfig, exist_ok=True)
AutoConfig.register(MedUNetConfig.model_type, MedUNetConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(MedSegConfig, MedSegForSegmentation, exist_ok=True)
AutoModelForSemanticSegmentation.register(MedUNetConfig, MedUNetForSegmentation, exist_ok=True)

__all__ = [
    "MedSegConfig",
    "MedSegForSegmentation",
    "MedUNetConfig",
    "MedUNetForSegmentation",
    "SegmentationLossConfig",
    "UnetrDecoder",
    "build_config",
    "build_unet_baseline",
    "default_skip_layers",
    "encoder_fields",
    "predict",
    "segmentation_loss",
]
