"""Checks shared by every model: image tensors that fit, and sizes given as int or (h, w).

Config validation has one style across the package: each config's `check()` runs at the end of its
`__post_init__` (so also on `from_pretrained`) and raises `ConfigError` itself, naming the fix.
"""

from __future__ import annotations

import torch

from .errors import DataError


def as_pair(value) -> tuple[int, int]:
    """`8` -> (8, 8); `[8, 4]` -> (8, 4): image and patch sizes may be given either way."""
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value), int(value))


def check_pixels(pixel_values: torch.Tensor, num_channels: int, source: str, *, size=None, multiple: int | None = None,
                 channel_fix: str | None = None, size_fix: str | None = None) -> None:
    """Raise `DataError` unless `pixel_values` is [B, num_channels, H, W] of the expected size.

    Args:
        pixel_values: the model input.
        num_channels: channels the model was built for.
        source: what expects them, for the message ("the model", "the checkpoint's encoder").
        size: exact (H, W) required, or None.
        multiple: H and W must be multiples of it (patch size or network stride), or None.
        channel_fix, size_fix: the fix to print; a generic one by default.

    Example:
        >>> check_pixels(torch.zeros(1, 3, 32, 32), 3, "the model", multiple=8)
    """
    if pixel_values.dim() != 4:
        raise DataError(f"pixel_values must be [batch, channels, height, width], got shape {tuple(pixel_values.shape)}.",
                        "stack images into a 4-D tensor (add a channel axis for grey images).")  # fmt: skip
    channels, (h, w) = pixel_values.shape[1], tuple(pixel_values.shape[2:])
    if channels != num_channels:
        raise DataError(f"the images have {channels} channels but {source} expects {num_channels}.",
                        channel_fix or f"convert the images to {num_channels} channels, or use a model pre-trained "
                                       f"with num_channels: {channels} for this data.")  # fmt: skip
    if size is not None and (h, w) != as_pair(size):
        eh, ew = as_pair(size)
        raise DataError(f"the images are {h}x{w} but {source} expects {eh}x{ew}.",
                        size_fix or f"resize or crop the images to {eh}x{ew}.")
    if multiple and (h % multiple or w % multiple):
        raise DataError(f"image size {h}x{w} is not divisible by {multiple} (the patch size / network stride).",
                        f"crop or pad the images to a multiple of {multiple}, e.g. {max(multiple, h // multiple * multiple)}.")


__all__ = ["as_pair", "check_pixels"]
