"""`MedMAEConfig`: a `ViTMAEConfig` that also carries the mask generator, so a checkpoint rebuilds it."""

from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from transformers import ViTMAEConfig

from .errors import ConfigError
from .masking import MASK_GENERATORS
from .validation import as_pair


def check_masking(config) -> None:
    """Check the masking fields of a 2D or 3D MAE config (`mask_ratio`, `throw_ratio`, `mask_generator`)."""
    if not 0.0 < config.mask_ratio < 1.0:
        raise ConfigError(
            f"mask_ratio={config.mask_ratio} is outside (0, 1).",
            "use a fraction such as 0.75 (MAE), 0.5 (seed 001) or 0.125 (segmentation, SelfMedMAE).",
        )
    if not 0.0 <= config.throw_ratio < config.mask_ratio:
        raise ConfigError(
            f"throw_ratio={config.throw_ratio} must lie in [0, mask_ratio={config.mask_ratio}).",
            "throw_ratio is the part of the masked patches that is not reconstructed; lower it.",
        )
    if config.mask_generator not in MASK_GENERATORS:
        raise ConfigError(
            f"unknown mask_generator {config.mask_generator!r}.",
            f"use one of {sorted(MASK_GENERATORS)}.",
        )
    if config.throw_ratio > 0 and config.mask_generator != "attention":
        raise ConfigError(
            f"throw_ratio={config.throw_ratio} is only used by the 'attention' generator.",
            "set mask_generator: attention, or throw_ratio: 0.",
        )


class PatchGridMixin:
    """The patch grid of a 2D or 3D MAE config, from its `input_size` and `patch_shape` (one side per axis)."""

    input_size: tuple[int, ...]
    patch_shape: tuple[int, ...]

    @property
    def grid_size(self) -> tuple[int, ...]:
        return tuple(s // p for s, p in zip(self.input_size, self.patch_shape))

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid_size)

    def check_architecture(self, size_name: str, patch_name: str, fields: str = "") -> None:
        """Fail at construction and on load, naming the fix: the grid, the attention heads, the masking."""
        size, patch = self.input_size, self.patch_shape
        if any(s % p for s, p in zip(size, patch)):
            fit = [max(p, s // p * p) for s, p in zip(size, patch)]
            shown, sides, patches = ("x".join(map(str, t)) for t in (fit, size, patch))
            raise ConfigError(
                f"{size_name} {sides} is not divisible by {patch_name} {patches}{fields}.",
                f"choose a size that is a multiple of the patch along every axis (e.g. {shown}), "
                "or crop/resize the inputs to it.",
            )
        if self.hidden_size % self.num_attention_heads or self.decoder_hidden_size % self.decoder_num_attention_heads:
            raise ConfigError(
                "hidden_size / decoder_hidden_size must be divisible by their number of attention heads.",
                "e.g. hidden_size 192 with 6 heads, decoder_hidden_size 96 with 2 heads.",
            )
        check_masking(self)


@strict
class MedMAEConfig(PatchGridMixin, ViTMAEConfig):
    r"""Configuration of [`MedMAEForPreTraining`]: every `ViTMAEConfig` field plus the masking strategy.

    Args:
        mask_generator (`str`, defaults to `"random"`):
            Name of a generator in `hf_medmae.masking.MASK_GENERATORS`: `random`, `block`, `grid`,
            `foreground` or `attention`.
        mask_generator_kwargs (`dict`, *optional*):
            Extra settings of that generator (e.g. `{"temperature": 0.5, "mix": 0.2}` for `foreground`).
        mask_ratio (`float`, defaults to 0.75):
            Fraction of patches the encoder does not see (as in `ViTMAEConfig`). Must lie in (0, 1).
        throw_ratio (`float`, defaults to 0.0):
            Part of `mask_ratio` that is dropped and *not* reconstructed (MSMAE); only the
            `attention` generator uses it. MSMAE's "45% masked + 30% thrown" is `mask_ratio=0.75,
            throw_ratio=0.30`.
        supervised_loss_weight (`float`, defaults to 0.0):
            0 trains a plain MAE. Above 0 (MSMAE's supervised attention-driven masking; MSMAE uses 0.1), a
            linear `classifier` on the encoder's final-LayerNorm CLS token of the *masked* forward pass is
            trained with cross-entropy beside the reconstruction, `loss = reconstruction + weight * CE`, so the
            CLS attention that the `attention` generator masks by is shaped by the labels. Needs
            `num_labels` >= 2 (or `id2label`); images labelled -100 are unlabeled and add no CE.
        class_weights (`list[float]`, *optional*):
            Per-class weights of that cross-entropy, one positive weight per label.

    Example:
        >>> from hf_medmae import MedMAEConfig
        >>> config = MedMAEConfig(num_channels=16, image_size=64, patch_size=4, mask_generator="block")
        >>> config.num_patches
        256
    """

    model_type = "medmae"

    mask_generator: str = "random"
    mask_generator_kwargs: dict | None = None
    throw_ratio: float = 0.0
    supervised_loss_weight: float = 0.0
    class_weights: list[float] | None = None

    @property
    def input_size(self) -> tuple[int, int]:
        return as_pair(self.image_size)

    @property
    def patch_shape(self) -> tuple[int, int]:
        return as_pair(self.patch_size)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Here rather than in `@strict`'s validators, so users see our `ConfigError` directly.
        self.check_architecture("image_size", "patch_size")
        check_supervision(self)


def check_supervision(config) -> None:
    """Check the supervised head's fields (`supervised_loss_weight`, `num_labels`, `class_weights`)."""
    weight, weights = config.supervised_loss_weight, config.class_weights
    if weight < 0:
        raise ConfigError(
            f"supervised_loss_weight={weight} is negative.",
            "use 0 for a plain MAE, or a positive weight of the cross-entropy term (MSMAE: 0.1).",
        )
    if weight > 0 and config.num_labels < 2:
        raise ConfigError(
            f"supervised_loss_weight={weight} needs at least 2 classes, but num_labels={config.num_labels}.",
            "set num_labels (or id2label) to the number of classes, or supervised_loss_weight: 0.",
        )
    if weights is not None and weight <= 0:
        raise ConfigError(
            "class_weights is set but only the supervised head uses it (supervised_loss_weight is 0).",
            "set supervised_loss_weight > 0, or remove class_weights.",
        )
    if weights is not None and (len(weights) != config.num_labels or min(weights) <= 0):
        raise ConfigError(
            f"class_weights has {len(weights)} entries for num_labels={config.num_labels} (all must be > 0).",
            "give one positive weight per class (e.g. inverse class frequency), or leave class_weights unset.",
        )


__all__ = ["MedMAEConfig", "check_masking", "check_supervision"]
