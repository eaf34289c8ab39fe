"""The pre-training data: a source string -> images -> tiles -> normalised, augmented tensors (with per-image mask noise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .embedded import load_embedded
from .io import ARRAY_SUFFIXES, read_array_file, read_hf_dataset, read_image_folder
from .transforms import Augment, Normalize, center_crop


def load_source(source: str, on_bad_file: str = "error", max_images: int | None = None, array_key: str | None = None, pattern: str = "*"):
    """Images from a source string, as ([C, H, W] arrays, skipped files).

    Args:
        source: `embedded:nuclei16`; a folder of images; a `.npy`/`.npz` (N, C, H, W) file;
            or `hf:<dataset name or save_to_disk folder>[::split]` for a `datasets` dataset (split
            defaults to train; `::` because a Hub id may itself hold a `:`-free `namespace/name`).
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
