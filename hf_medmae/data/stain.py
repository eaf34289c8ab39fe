"""Stain colour of brightfield RGB images: HED stain jitter for training, Reinhard normalisation for new sites.

Another lab's stain, scanner or light source changes an image's colours, and a classifier trained on one lab's
colours can fail on the next lab's cells. Training can vary the stains (`hed_jitter`, Tellez et al. 2019: each
stain's optical density scaled and shifted in Ruifrok & Johnston's HED space), and new images can be mapped onto the
training images' colour statistics (`stain_reference` + `stain_normalise`: Reinhard et al. 2001, the mean and
standard deviation of each CIELAB channel, scikit-image's `rgb2lab`). Intensities are 8-bit RGB (0-255).

Macenko's stain-vector normalisation (MONAI's `NormalizeHEStains`) was tried first: on the WBC Zheng 2018 images
(yellow background, Wright-Giemsa, not H&E) it changed the reference images themselves by 36-52 grey levels on
average, so it is not offered.
"""

from __future__ import annotations

import warnings

import numpy as np
from skimage.color import lab2rgb, rgb2lab

from ..errors import DataError

STAIN_NORMALISATIONS = ("none", "reinhard")
WHITE = 255.0
# Ruifrok & Johnston's H, E and DAB optical-density vectors (the rows of scikit-image's `rgb_from_hed`). Ours and not
# `skimage.color.rgb2hed`: that clips negative densities (a yellow background has some), so its round trip is lossy.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def _hwc(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[0] != 3:
        raise DataError(
            f"stain colour needs RGB images [3, H, W]; got shape {tuple(image.shape)}.",
            "use stain options for brightfield RGB (stained) images only.",
        )
    return np.clip(image, 0, WHITE).transpose(1, 2, 0) / WHITE


def _chw(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * WHITE).transpose(2, 0, 1).astype(np.float32)


def hed_jitter(image: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """RGB [3, H, W] (0-255) with each stain's optical density times `alpha[s]` plus `beta[s]` (H, E, DAB).

    Example:
        >>> cell = np.random.default_rng(0).uniform(0, 255, (3, 4, 4))
        >>> bool(np.allclose(hed_jitter(cell, np.ones(3), np.zeros(3)), cell, atol=1e-3))
        True
    """
    density = -np.log((np.clip(np.asarray(image, np.float64), 0, WHITE) + 1) / (WHITE + 1))
    stains = np.einsum("cs,chw->shw", HED_FROM_RGB, density) * alpha[:, None, None] + beta[:, None, None]
    density = np.einsum("sc,shw->chw", RGB_FROM_HED, stains)
    return np.clip((WHITE + 1) * np.exp(-density) - 1, 0, WHITE).astype(np.float32)


def stain_reference(images: list[np.ndarray], max_images: int = 64, seed: int = 0) -> dict:
    """The CIELAB channel means and standard deviations of a reference set (e.g. the training images).

    Args:
        images: RGB images [3, H, W] with intensities 0-255.
        max_images: a seeded sample of at most this many images is pooled.

    Returns:
        {"method": "reinhard", "lab_mean": [L, a, b], "lab_std": [L, a, b]}, JSON-ready.
    """
    picks = np.random.default_rng(seed).permutation(len(images))[:max_images]
    lab = np.concatenate([rgb2lab(_hwc(images[i])).reshape(-1, 3) for i in picks])
    return {"method": "reinhard", "lab_mean": lab.mean(0).tolist(), "lab_std": lab.std(0).tolist()}


def stain_reference_of(images: list[np.ndarray], seed: int = 0) -> dict | None:
    """`stain_reference` of 8-bit RGB images; None for other channel counts or intensity ranges (no stain)."""
    if (
        not images
        or any(np.ndim(x) != 3 or x.shape[0] != 3 for x in images[:1])
        or max(float(x.max()) for x in images) > WHITE
    ):
        return None
    return stain_reference(images, seed=seed)


def stain_normalise(image: np.ndarray, reference: dict) -> np.ndarray:
    """An RGB image [3, H, W] (0-255) with its CIELAB channel statistics matched to `reference`'s, float32.

    Example:
        >>> cell = np.random.default_rng(0).uniform(0, 255, (3, 16, 16)).astype(np.float32)
        >>> same = stain_normalise(cell, stain_reference([cell]))
        >>> float(np.abs(same - cell).max()) < 0.5
        True
    """
    lab = rgb2lab(_hwc(image))
    flat = lab.reshape(-1, 3)
    mean, std = flat.mean(0), np.maximum(flat.std(0), 1e-6)
    lab = (lab - mean) / std * np.asarray(reference["lab_std"]) + np.asarray(reference["lab_mean"])
    with warnings.catch_warnings():  # colours outside sRGB are clipped, which is the intent
        warnings.filterwarnings("ignore", message="Conversion from CIE-LAB")
        return _chw(lab2rgb(lab))


__all__ = ["STAIN_NORMALISATIONS", "hed_jitter", "stain_normalise", "stain_reference", "stain_reference_of"]
