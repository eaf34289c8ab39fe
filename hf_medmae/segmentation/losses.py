"""Segmentation loss: cross-entropy that skips unlabelled pixels (sparse labels), or MONAI's DiceCE (masked Dice
when sparse)."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, MaskedDiceLoss
from torch import nn

from ..errors import DataError
from .configuration import SegmentationLossConfig


def check_labels(labels: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, (D,) H, W] or [B, 1, (D,) H, W] integer masks matching the inputs -> [B, (D,) H, W] long, or `DataError`."""
    if labels.dim() == pixel_values.dim() and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.is_floating_point():
        raise DataError(
            f"labels have dtype {labels.dtype}; class indices must be integers.",
            "convert the masks with .long() after mapping them to class indices.",
        )
    expected = (pixel_values.shape[0], *pixel_values.shape[2:])
    if tuple(labels.shape) != expected:
        raise DataError(
            f"labels have shape {tuple(labels.shape)} but the inputs need {expected} ([B, (D,) H, W]).",
            "resize/crop masks with the same transform as their images (nearest interpolation).",
        )
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
    if not bool(labelled.any()):
        # Mean CE over zero pixels is 0/0 = NaN; a batch without labels must contribute nothing instead.
        return logits.sum() * 0.0
    if config.loss == "dice_ce":
        if bool(labelled.all()):
            return DiceCELoss(to_onehot_y=True, softmax=True, weight=weight)(logits, labels[:, None])
        # Sparse labels: Dice over the labelled voxels only (MONAI's MaskedDiceLoss), CE skipping the rest.
        dense = torch.where(labelled, labels, torch.zeros_like(labels))[:, None]
        dice = MaskedDiceLoss(to_onehot_y=True, softmax=True)(logits, dense, mask=labelled[:, None])
        return dice + nn.functional.cross_entropy(logits, labels, weight=weight, ignore_index=config.ignore_index)
    return nn.functional.cross_entropy(logits, labels, weight=weight, ignore_index=config.ignore_index)


__all__ = ["check_labels", "segmentation_loss"]
