"""Seeded ROI crops of channel-first arrays of any spatial dimension: images [C, H, W] and volumes [C, D, H, W]
alike, with optional labels [*spatial].

`spatial_dims` is `len(roi_size)`, as MONAI's `ensure_tuple_rep` makes it: one padder (`pad_to`), one tiler
(`sliding_crops`: the tiles of a 2D pool, the covering tiles of 2D evaluation, the crops of volumes), one seeded
crop + flip + turn augmenter (`CropAugment`, MONAI dict transforms seeded from the item's generator) and one dataset
of crops (`CropDataset`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import product

import numpy as np
import torch
from monai.transforms import Compose, OneOf, RandCropByPosNegLabeld, RandSpatialCropd, SpatialPad
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

from ..errors import ConfigError
from .image_set import check_geometry
from .transforms import EpochSeeded, labelled_geometry, run_seeded


def pad_to(image: torch.Tensor, label: torch.Tensor | None, roi_size: Sequence[int], ignore_index: int = 255):
    """Pad [C, *spatial] (with 0) and [*spatial] (with ignore_index) symmetrically up to roi_size where smaller.

    Example:
        >>> image, label = pad_to(torch.ones(1, 3, 4), torch.ones(3, 4, dtype=torch.long), (4, 4))
        >>> tuple(image.shape), label[-1].tolist()
        ((1, 4, 4), [255, 255, 255, 255])
    """
    size = [max(s, r) for s, r in zip(image.shape[1:], roi_size)]
    if list(image.shape[1:]) == size:
        return image, label
    # MONAI returns MetaTensors; plain tensors keep collation and the model free of metadata
    image = convert_to_tensor(SpatialPad(size, mode="constant", value=0)(image), track_meta=False)
    if label is not None:
        label = convert_to_tensor(
            SpatialPad(size, mode="constant", value=ignore_index)(label[None]), track_meta=False
        )[0]
    return image, label


def sliding_crops(
    shape: Sequence[int], roi_size: Sequence[int], overlap: float = 0.0, cover: bool = True
) -> list[tuple[slice, ...]]:
    """Deterministic windows over `shape` (any number of axes), in row-major order.

    Args:
        shape: the spatial shape, e.g. (H, W) or (D, H, W).
        roi_size: the window, one size per axis.
        overlap: share of a window that its neighbour overlaps, in [0, 1).
        cover: True: every pixel or voxel is covered, the last window per axis ending flush (evaluation crops);
            False: only windows that fit from the origin, the remainder at the far border dropped (pool tiles).

    Along an axis shorter than the ROI the window is the whole axis (the caller pads it).

    Example:
        >>> [(box[0].start, box[0].stop) for box in sliding_crops((10, 4, 4), (4, 4, 4))]
        [(0, 4), (4, 8), (6, 10)]
        >>> len(sliding_crops((8, 12), (4, 4))), len(sliding_crops((10, 10), (4, 4), cover=False))
        (6, 4)
    """
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"overlap={overlap} is outside [0, 1).", "use e.g. 0.0 (no overlap) or 0.5.")
    per_axis = []
    for size, roi in zip(shape, roi_size):
        stride = max(1, int(roi * (1.0 - overlap)))
        starts = list(range(0, max(size - roi, 0) + 1, stride))
        if cover and starts[-1] < size - roi:
            starts.append(size - roi)
        per_axis.append([slice(s, min(s + roi, size)) for s in starts])
    return list(product(*per_axis))


@dataclass
class CropAugment:
    """Seeded ROI crop, flips and in-plane 90-degree turns for an image or volume and its label alike, as MONAI dict
    transforms (`RandCropByPosNegLabeld` / `RandSpatialCropd`, `RandFlipd`, `RandRotate90d`) seeded from the item's
    generator. The spatial dimension is `len(roi_size)`.

    Args:
        roi_size: crop (H, W) or (D, H, W); smaller inputs are padded (image 0, label ignore_index).
        flips: flip each spatial axis with probability 0.5.
        rot90: turn by k * 90 degrees over the last two axes; k is 0 or 2 when the ROI is not square there.
        pos_fraction: with labels, the probability that a crop is centred on a foreground voxel (label
            not 0 and not ignore_index); otherwise the crop is uniform.
        ignore_index: label of padded voxels.

    Example:
        >>> aug = CropAugment((8, 16, 16))
        >>> gen = torch.Generator().manual_seed(0)
        >>> image, label = aug(torch.rand(1, 10, 20, 20), torch.zeros(10, 20, 20, dtype=torch.long), gen)
        >>> tuple(image.shape), tuple(label.shape)
        ((1, 8, 16, 16), (8, 16, 16))
    """

    roi_size: tuple[int, ...]
    flips: bool = True
    rot90: bool = True
    pos_fraction: float = 0.0
    ignore_index: int = 255

    def __post_init__(self):
        if len(self.roi_size) not in (2, 3) or min(self.roi_size) < 1:
            raise ConfigError(
                f"roi_size={self.roi_size!r} is not two (H, W) or three (D, H, W) positive sizes.",
                "use e.g. roi_size: [32, 64, 64] for volumes, [64, 64] for images.",
            )
        if not 0.0 <= self.pos_fraction <= 1.0:
            raise ConfigError(
                f"pos_fraction={self.pos_fraction} is outside [0, 1].",
                "use e.g. 0.5: half the crops centred on foreground.",
            )
        self.roi_size = tuple(int(r) for r in self.roi_size)
        self._labelled, self._unlabelled = self._pipeline(["image", "label"]), self._pipeline(["image"])

    def _pipeline(self, keys: list[str]) -> Compose:
        roi, spatial_dims = self.roi_size, len(self.roi_size)
        crop = RandSpatialCropd(keys, roi, random_size=False)
        if len(keys) > 1 and self.pos_fraction > 0:
            # "fg": the labelled foreground (not 0, not ignore_index); without any, MONAI centres on other voxels
            on_foreground = RandCropByPosNegLabeld(keys, "fg", roi, pos=1.0, neg=0.0)
            crop = OneOf([on_foreground, crop], weights=[self.pos_fraction, 1.0 - self.pos_fraction])
        axes = tuple(range(spatial_dims)) if self.flips else ()
        geometry = labelled_geometry(keys, spatial_dims, axes, self.rot90, square=roi[-2] == roi[-1])
        return Compose([crop, *geometry])

    def __call__(self, image: torch.Tensor, label: torch.Tensor | None = None, gen: torch.Generator | None = None):
        image, label = pad_to(image, label, self.roi_size, self.ignore_index)
        if label is None:
            return run_seeded(self._unlabelled, {"image": image}, gen, keys=("image",))["image"], None
        data = {"image": image, "label": label[None]}
        if self.pos_fraction > 0:
            data["fg"] = ((label != 0) & (label != self.ignore_index))[None]
        out = run_seeded(self._labelled, data, gen, keys=("image", "label"))
        return out["image"], out["label"][0]


class CropDataset(EpochSeeded, Dataset):
    """ROI crops of [C, *spatial] arrays; items are {"pixel_values": [C, *roi] float32, "labels": [*roi] int64,
    "sample_ids"}.

    Args:
        images: normalised arrays [C, *spatial] (a list, or a lazy sequence read per item).
        labels: one [*spatial] label per image, or None.
        roi_size: crop size, one per spatial axis.
        augment: training: item i is a random crop of image i // samples_per_item, drawn from its own
            generator seeded by (seed, epoch, i) (`EpochSeeded`); None (evaluation): the fixed `sliding_crops` of
            every image.
        samples_per_item: training crops per image and epoch.
        seed: base seed of the crops.
        ignore_index: label of padded pixels (it replaces the augment's own).
        with_ids: add "sample_ids" (the pre-training model's attention generator reads them; segmenters take none).
        names: one name per image, for messages; default its index.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> ds = CropDataset([rng.random((1, 40, 40), dtype=np.float32)], None, (32, 32), CropAugment((32, 32)), 2)
        >>> len(ds), tuple(ds[0]["pixel_values"].shape)
        (2, (1, 32, 32))
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray] | None,
        roi_size: Sequence[int],
        augment: CropAugment | None = None,
        samples_per_item: int = 1,
        seed: int = 0,
        ignore_index: int = 255,
        with_ids: bool = True,
        names: Sequence[str] | None = None,
    ):
        self.roi_size = tuple(int(r) for r in roi_size)
        if augment is not None and tuple(augment.roi_size) != self.roi_size:
            raise ConfigError(
                f"the augmentation crops {augment.roi_size} but the dataset's roi_size is {self.roi_size}.",
                "build CropAugment with the dataset's roi_size.",
            )
        if samples_per_item < 1:
            raise ConfigError(f"samples_per_item={samples_per_item} must be at least 1.", "use e.g. 1 to 4.")
        self.images, self.labels = images, labels  # lists, or lazy sequences read per item
        self.names = list(names) if names is not None else [str(i) for i in range(len(images))]
        self.augment = None if augment is None else replace(augment, ignore_index=ignore_index)
        EpochSeeded.__init__(self, seed)
        self.samples_per_item, self.ignore_index = samples_per_item, ignore_index
        self.with_ids = with_ids
        self.windows = (
            []
            if augment is not None
            else [
                (i, box)
                for i in range(len(self.images))
                for box in sliding_crops(tuple(self.images[i].shape[1:]), self.roi_size)
            ]
        )

    def _pair(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image i as float32 [C, *spatial] and its int64 [*spatial] label (None without labels)."""
        image = torch.from_numpy(np.ascontiguousarray(self.images[i], dtype=np.float32))
        if self.labels is None:
            return image, None
        label = torch.from_numpy(np.ascontiguousarray(self.labels[i], dtype=np.int64))
        check_geometry(image.shape, label.shape, self.names[i])  # lazy sets are checked here, when read
        return image, label

    def __len__(self) -> int:
        return len(self.images) * self.samples_per_item if self.augment is not None else len(self.windows)

    def __getitem__(self, index: int) -> dict:
        if self.augment is not None:
            gen = self.item_generator(index)
            image, label = self.augment(*self._pair(index // self.samples_per_item), gen)
        else:
            i, box = self.windows[index]
            image, label = self._pair(i)
            label = None if label is None else label[box]
            image, label = pad_to(image[(slice(None), *box)], label, self.roi_size, self.ignore_index)
            image, label = image.contiguous(), None if label is None else label.contiguous()
        item = {"pixel_values": image}
        if self.with_ids:
            item["sample_ids"] = torch.tensor(index, dtype=torch.int64)
        if label is not None:
            item["labels"] = label
        return item


__all__ = ["CropAugment", "CropDataset", "pad_to", "sliding_crops"]
