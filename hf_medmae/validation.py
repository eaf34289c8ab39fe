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


def check_pixels(
    pixel_values: torch.Tensor,
    num_channels: int,
    source: str,
    *,
    size=None,
    multiple: int | None = None,
    channel_fix: str | None = None,
    size_fix: str | None = None,
    spatial_dims: int = 2,
) -> None:
    """Raise `DataError` unless `pixel_values` is [B, num_channels, H, W] (or [B, C, D, H, W]) of the expected size.

    Args:
        pixel_values: the model input.
        num_channels: channels the model was built for.
        source: what expects them, for the message ("the model", "the checkpoint's encoder").
        size: exact (H, W) — or (D, H, W) for volumes — required, or None.
        multiple: every spatial side must be a multiple of it (patch size or network stride), or None.
        channel_fix, size_fix: the fix to print; a generic one by default.
        spatial_dims: 2 for images, 3 for volumes.

    Example:
        >>> check_pixels(torch.zeros(1, 3, 32, 32), 3, "the model", multiple=8)
    """
    axes = "height, width" if spatial_dims == 2 else "depth, height, width"
    if pixel_values.dim() != spatial_dims + 2:
        raise DataError(
            f"pixel_values must be [batch, channels, {axes}], got shape {tuple(pixel_values.shape)}.",
            f"stack {'images' if spatial_dims == 2 else 'volumes'} into a {spatial_dims + 2}-D tensor "
            "(add a channel axis for single-channel data).",
        )
    channels, sides = pixel_values.shape[1], tuple(pixel_values.shape[2:])
    shown = "x".join(map(str, sides))
    if channels != num_channels:
        raise DataError(
            f"the {'images' if spatial_dims == 2 else 'volumes'} have {channels} channels "
            f"but {source} expects {num_channels}.",
            channel_fix
            or f"convert the data to {num_channels} channels, or use a model pre-trained "
            f"with num_channels: {channels} for this data.",
        )
    expected = None if size is None else (as_pair(size) if spatial_dims == 2 else tuple(int(v) for v in size))
    if expected is not None and sides != expected:
        want = "x".join(map(str, expected))
        raise DataError(
            f"the input is {shown} but {source} expects {want}.", size_fix or f"resize or crop the input to {want}."
        )
    if multiple and any(s % multiple for s in sides):
        raise DataError(
            f"input size {shown} is not divisible by {multiple} (the patch size / network stride).",
            f"crop or pad the input to a multiple of {multiple} on every side, "
            f"e.g. {max(multiple, sides[-1] // multiple * multiple)}.",
        )


__all__ = ["as_pair", "check_pixels"]
