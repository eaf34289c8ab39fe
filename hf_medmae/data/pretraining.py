"""The pre-training data pipeline: source -> tiles -> seeded split -> per-channel stats -> augmented tensors."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import DataError
from .embedded import load_embedded
from .io import ARRAY_SUFFIXES, read_array_file, read_hf_dataset, read_image_folder


def load_source(source: str, on_bad_file: str = "error", max_images: int | None = None, array_key: str | None = None, pattern: str = "*"):
    """Images from a source string, as ([C, H, W] arrays, skipped files).

    Args:
        source: `embedded:nuclei16`; a folder of images; a `.npy`/`.npz` (N, C, H, W) file;
            or `hf:<dataset name or save_to_disk folder>[:split]` for a `datasets` dataset.
    """
    if source.startswith("embedded:"):
        return load_embedded(source.split(":", 1)[1])[:max_images], []
    if source.startswith("hf:"):
        name, _, split = source[3:].partition("::")
        return read_hf_dataset(name, split=split or "train", max_images=max_images), []
    path = Path(source)
    if path.suffix.lower() in ARRAY_SUFFIXES:
        return list(read_array_file(path, key=array_key)[:max_images]), []
    if path.is_dir():
        images, _, skipped = read_image_folder(path, on_bad_file=on_bad_file, max_images=max_images, pattern=pattern)
        return images, skipped
    raise DataError(
        f"data source {source!r} is neither a folder, a .npy/.npz file, hf:<dataset> nor embedded:<name>.",
        "point train_data at an image folder or array file, or use embedded:nuclei16.",
    )


def tile_image(image: np.ndarray, tile_size: int, stride: int | None = None) -> list[np.ndarray]:
    """Cut [C, H, W] into tile_size x tile_size tiles (e.g. 16x256x256 -> 16 tiles of 16x64x64).

    Tiles that would run past the border are dropped; an image smaller than one tile is returned whole.
    """
    stride = stride or tile_size
    _, h, w = image.shape
    if h < tile_size or w < tile_size:
        return [image]
    return [
        image[:, top : top + tile_size, left : left + tile_size]
        for top in range(0, h - tile_size + 1, stride)
        for left in range(0, w - tile_size + 1, stride)
    ]


def split_indices(n: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded shuffle split: (train indices, validation indices); at least one of each when n >= 2."""
    if n == 0:
        raise DataError("the dataset is empty: no images were found.", "check train_data points at a folder or file with images.")
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * validation_fraction))
    n_val = min(max(n_val, 1 if validation_fraction > 0 and n >= 2 else 0), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def channel_stats(images: list[np.ndarray]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over all pixels of `images` (computed in float64 to avoid drift)."""
    channels = images[0].shape[0]
    total, total_sq, count = np.zeros(channels), np.zeros(channels), 0
    for image in images:
        flat = image.reshape(channels, -1).astype(np.float64)
        total += flat.sum(1)
        total_sq += (flat**2).sum(1)
        count += flat.shape[1]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean.tolist(), np.where(std > 0, std, 1.0).tolist()


@dataclass
class Augment:
    """Flips, 90-degree rotations and a random resized crop for [C, H, W] tensors of any channel count.

    Args:
        image_size: output side length.
        scale: area range of the random resized crop relative to the input (MAE uses (0.2, 1)).
        ratio: aspect-ratio range of the crop.
        hflip, vflip, rot90: cells and tissue have no preferred orientation, so all default to on.
    """

    image_size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    vflip: bool = True
    rot90: bool = False

    def crop_box(self, h: int, w: int, gen: torch.Generator | None) -> tuple[int, int, int, int]:
        for _ in range(10):
            area = h * w * float(torch.empty(1).uniform_(*self.scale, generator=gen))
            log_r = torch.empty(1).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]), generator=gen)
            aspect = math.exp(float(log_r))
            ch, cw = round(math.sqrt(area / aspect)), round(math.sqrt(area * aspect))
            if 0 < ch <= h and 0 < cw <= w:
                top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
                left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
                return top, left, ch, cw
        side = min(h, w)  # fallback: central square, as torchvision does
        return (h - side) // 2, (w - side) // 2, side, side

    def __call__(self, image: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        _, h, w = image.shape
        if self.scale[0] < 1.0 or (h, w) != (self.image_size, self.image_size):
            top, left, ch, cw = self.crop_box(h, w, gen)
            image = resize(image[:, top : top + ch, left : left + cw], self.image_size)
        # Flips and rotations as numpy views, then one copy: each torch flip/rot90 would copy the image.
        view = image.numpy()
        if self.hflip and torch.rand(1, generator=gen) < 0.5:
            view = view[..., ::-1]
        if self.vflip and torch.rand(1, generator=gen) < 0.5:
            view = view[..., ::-1, :]
        if self.rot90:
            view = np.rot90(view, int(torch.randint(0, 4, (1,), generator=gen)), axes=(-2, -1))
        return torch.from_numpy(np.ascontiguousarray(view))


@functools.lru_cache(maxsize=512)
def _upsampling_matrix(n: int, size: int) -> torch.Tensor:
    """[size, n] weights of torch's bilinear (align_corners=False) resampling of n samples to size."""
    eye = torch.eye(n)[:, None, :, None]  # n unit impulses along one axis
    return F.interpolate(eye, size=(size, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].T.contiguous()


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of [C, H, W] to size x size (a no-op when already that size); antialiased when shrinking.

    Upsampling (every crop of a random resized crop back to the tile size) is separable and needs no
    antialiasing, so it runs as two small matmuls with cached weights: the same result as
    `F.interpolate`, about 2x faster per image, which matters when augmentation runs beside the step.
    """
    height, width = image.shape[-2:]
    if (height, width) == (size, size):
        return image
    if height <= size and width <= size and image.is_floating_point():
        rows, cols = (_upsampling_matrix(n, size).to(image.dtype) for n in (height, width))
        return rows @ image @ cols.T
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Central size x size crop of [C, H, W]; smaller images are resized up instead."""
    _, h, w = image.shape
    if h < size or w < size:
        return resize(image, size)
    top, left = (h - size) // 2, (w - size) // 2
    return image[:, top : top + size, left : left + size]


class Normalize:
    """Per-channel `(x - mean) / std` for [C, H, W] tensors, with the statistics saved beside a checkpoint."""

    def __init__(self, image_mean, image_std):
        self.mean = torch.tensor(image_mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(image_std, dtype=torch.float32)[:, None, None]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean) / self.std


class PretrainingDataset(Dataset):
    """Normalised, augmented images for MAE pre-training; items are {"pixel_values", "sample_ids"}.

    Args:
        images: [C, H, W] float arrays (raw intensities).
        image_mean, image_std: per-channel statistics of the training images.
        image_size: side of the model input.
        augment: training augmentation, or None for a deterministic central crop (validation).
        seed: augmentation of item i in epoch e draws from its own generator seeded by (seed, e, i), so
            it does not depend on what else drew random numbers before: a resumed run, which loads and
            skips the batches it already trained on, augments the remaining ones exactly as before.
        mask_noise_patches: when > 0, items also carry `noise` ([mask_noise_patches] uniform draws from
            the same generator) for uniform random masking. The image's mask then depends on the image
            and epoch alone, not on which process or batch slot it landed in: 2 processes train on
            exactly the masks 1 process would, and a resumed run on exactly the masks it skipped.
    """

    def __init__(self, images: list[np.ndarray], image_mean, image_std, image_size: int, augment: Augment | None = None,
                 seed: int = 0, mask_noise_patches: int = 0):  # fmt: skip
        self.images = [torch.from_numpy(np.ascontiguousarray(im)) for im in images]
        self.normalize = Normalize(image_mean, image_std)
        self.image_size, self.augment, self.seed, self.epoch = image_size, augment, seed, 0
        self.mask_noise_patches = mask_noise_patches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = self.normalize(self.images[index])
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
        image = center_crop(image, self.image_size) if self.augment is None else self.augment(image, gen)
        item = {"pixel_values": image, "sample_ids": index}
        if self.mask_noise_patches:
            item["noise"] = torch.rand(self.mask_noise_patches, generator=gen)
        return item


def check_channels(images: list[np.ndarray], source: str) -> int:
    """All images must share one channel count; returns it."""
    counts = sorted({im.shape[0] for im in images})
    if len(counts) > 1:
        raise DataError(
            f"{source} mixes images with {counts} channels.",
            "convert all images to one channel count (e.g. all RGB) before training.",
        )
    return counts[0]
