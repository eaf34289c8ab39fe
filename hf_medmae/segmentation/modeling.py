"""The two segmenters: a ViT encoder + UNETR decoder (`MedSegForSegmentation`) and MONAI's U-Net baseline.

The encoder is a plain `transformers.ViTModel` under the attribute `vit`, so weights live under `vit.*`
and `load_encoder` reads them back.
"""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNet
from torch import nn
from transformers import AutoModelForSemanticSegmentation, PreTrainedModel, ViTModel
from transformers.modeling_outputs import SemanticSegmenterOutput

from ..encoder import encoder_fields
from ..errors import CheckpointError
from ..loading import CurrentKeyNamesMixin
from ..modeling_mae3d import MedMAE3DModel
from ..validation import check_pixels
from .configuration import UNET_MULTIPLE, MedSegConfig, MedUNetConfig
from .decoder import LightDecoder, UnetrDecoder
from .losses import check_labels, segmentation_loss


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

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> SemanticSegmenterOutput:
        r"""
        Args:
            pixel_values: [B, C, H, W] images or [B, C, D, H, W] volumes (`spatial_dims: 3`), sides multiples
                of `input_multiple` (the patch size, or the U-Net's stride; a 2D ViT interpolates its position
                embeddings for sizes other than the config's, the 3D encoder takes its configured size).
            labels: [B, (D,) H, W] class indices, `config.ignore_index` for unlabelled pixels.

        Returns:
            `SemanticSegmenterOutput` with `logits` [B, num_labels, (D,) H, W] and `loss` when labels are given.
        """
        check_pixels(
            pixel_values,
            self.input_channels,
            self._source(),
            multiple=self.input_multiple,
            spatial_dims=self.config.spatial_dims,
        )
        if labels is not None:
            labels = check_labels(labels, pixel_values)
        logits = self.segment(pixel_values)
        loss = self.compute_loss(logits, labels) if labels is not None else None
        return SemanticSegmenterOutput(loss=loss, logits=logits)


class MedSegForSegmentation(_SegmenterBase):
    r"""ViT encoder (`self.vit`, a `transformers.ViTModel`) + UNETR (or light) decoder from MONAI blocks.

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
        self.vit = MedMAE3DModel(encoder) if config.spatial_dims == 3 else ViTModel(encoder, add_pooling_layer=False)
        head = (config.num_stages, config.feature_size, config.num_labels, config.norm_name, config.res_block)
        if config.decoder == "light":
            self.decoder = LightDecoder(config.spatial_dims, encoder.hidden_size, *head)
        else:
            self.decoder = UnetrDecoder(config.spatial_dims, encoder.num_channels, encoder.hidden_size, *head)
        self.post_init()

    def encoder_features(self, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Skip features (shallow to deep) and the final encoder output, each [B, D, *grid] (grid = size / patch)."""
        size = tuple(pixel_values.shape[2:])
        grid = tuple(s // self.config.patch_size for s in size)
        if self.config.spatial_dims == 3:
            self.vit.check_size(size)
            out = self.vit(pixel_values, output_hidden_states=True)
            first = 0  # VideoMAE has no CLS token
        else:
            out = self.vit(
                pixel_values,
                output_hidden_states=True,
                interpolate_pos_encoding=size != tuple(self.vit.embeddings.image_size),
            )
            first = 1

        def to_map(tokens: torch.Tensor) -> torch.Tensor:
            # [B, (1+)L, D] -> patch tokens [B, D, L] -> [B, D, *grid]
            return tokens[:, first:].transpose(1, 2).reshape(tokens.shape[0], -1, *grid)

        # hidden_states[0] is the embedding output, so block i (1-based) is hidden_states[i].
        skips = [to_map(out.hidden_states[i]) for i in self.config.skip_layers]
        return skips, to_map(out.last_hidden_state)

    @property
    def input_channels(self) -> int:
        return self.config.vit_config["num_channels"]

    @property
    def input_multiple(self) -> int:
        return self.config.patch_size

    def segment(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, (D,) H, W] -> [B, num_labels, (D,) H, W] logits: encoder features, then the UNETR decoder."""
        skips, deepest = self.encoder_features(pixel_values)
        return self.decoder(pixel_values, skips, deepest)

    @classmethod
    def from_encoder(cls, vit: nn.Module, num_labels: int, **cfg_kwargs) -> MedSegForSegmentation:
        """Segmenter whose encoder weights are copied from `vit` (a `ViTModel`, or an MAE's `.vit`).

        Args:
            vit: encoder with `ViTModel` weight names (a `pooler.*` is dropped, unused here), or a 3D
                `MedMAE3DModel` (e.g. `MedMAE3DForPreTraining.videomae`); every other key must match exactly.
            num_labels: number of classes.
            **cfg_kwargs: other `MedSegConfig` fields (`feature_size`, `skip_layers`, `loss`, ...).

        Example:
            >>> encoder = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
            ...     num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
            >>> MedSegForSegmentation.from_encoder(encoder, num_labels=3).config.skip_layers
            [1, 1]
        """
        dims = 3 if isinstance(vit, MedMAE3DModel) else 2
        config = MedSegConfig(
            vit_config=encoder_fields(vit.config, dims), num_labels=num_labels, spatial_dims=dims, **cfg_kwargs
        )
        model = cls(config)
        state = {k: v for k, v in vit.state_dict().items() if not k.startswith("pooler.")}
        missing, unexpected = model.vit.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"the encoder's weights do not match a ViTModel: missing {missing}, unexpected {unexpected}.",
                "pass a transformers ViTModel/ViTMAEModel (e.g. MedMAEForPreTraining.vit) without a mask token, "
                "or a MedMAE3DModel (MedMAE3DForPreTraining.videomae).",
            )
        return model


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

    input_multiple = UNET_MULTIPLE  # BasicUNet halves the resolution four times

    @property
    def input_channels(self) -> int:
        return self.config.in_channels

    def segment(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, (D,) H, W] -> [B, num_labels, (D,) H, W] logits of MONAI's BasicUNet."""
        return self.unet(pixel_values)


def build_unet_baseline(
    in_channels: int,
    num_labels: int,
    spatial_dims: int = 2,
    features: tuple[int, ...] = (32, 32, 64, 128, 256, 32),
    **cfg_kwargs,
) -> MedUNetForSegmentation:
    """The supervised U-Net baseline (MONAI `BasicUNet`) with the segmenter's interface.

    Args:
        in_channels: image channels.
        num_labels: number of classes.
        spatial_dims: 2 for images, 3 for volumes (the 3D U-Net baseline).
        features: BasicUNet's six channel counts.
        **cfg_kwargs: `ignore_index`, `loss`, `class_weights`, `id2label`.

    Example:
        >>> build_unet_baseline(16, 10, features=(8, 8, 16, 32, 64, 8)).config.num_labels
        10
    """
    config = MedUNetConfig(
        in_channels=in_channels,
        num_labels=num_labels,
        spatial_dims=spatial_dims,
        features=list(features),
        **cfg_kwargs,
    )
    return MedUNetForSegmentation(config)


AutoModelForSemanticSegmentation.register(MedSegConfig, MedSegForSegmentation, exist_ok=True)
AutoModelForSemanticSegmentation.register(MedUNetConfig, MedUNetForSegmentation, exist_ok=True)

__all__ = ["MedSegForSegmentation", "MedUNetForSegmentation", "build_unet_baseline"]
