"""One container for labelled or unlabelled images [C, H, W] and volumes [C, D, H, W], in memory or read when used.

An `ImageSet` holds the images, their optional label maps (class values per pixel or voxel, [H, W] or
[D, H, W]) and their names. 2D segmentation pairs (`data.segmentation.load_pairs`) and volume sets
(`data.volumes.load_volumes`) are both ImageSets, so splitting, class mapping, geometry checks and crops are
written once. Lazy sets hold `LazyFiles`: each file is read (and transformed) when an item needs it, so a pool
larger than memory trains.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import DataError
from .geometry import Geometry, Grid


class LazyFiles(Sequence):
    """Arrays read from files when used (and transformed then), the most recent few kept.

    Args:
        paths: one file per item.
        read: reads one path, e.g. `volumes.read_volume`, or `segmentation.read_label` (options bound).
        transforms: applied in order after reading (e.g. intensity normalisation, class mapping).
        keep: items kept decoded; a training item draws a crop from one file, so a few suffice.

    Example:
        >>> lazy = LazyFiles(["a.nii.gz", "b.nii.gz"], read_volume)  # doctest: +SKIP
        >>> lazy[1].shape  # read now, not before  # doctest: +SKIP
        (1, 60, 128, 128)
    """

    def __init__(self, paths, read: Callable, transforms: tuple = (), keep: int = 2):
        paths = [p if isinstance(p, tuple) else Path(p) for p in paths]  # a tuple: one case's channel files
        self.paths, self.read, self.transforms, self.keep = paths, read, tuple(transforms), keep
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return LazyFiles(self.paths[index], self.read, self.transforms, self.keep)
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        array = self.read(self.paths[index])
        for transform in self.transforms:
            array = transform(array)
        self._cache[index] = array
        while len(self._cache) > self.keep:
            self._cache.popitem(last=False)
        return array

    def map(self, transform: Callable) -> LazyFiles:
        """The same files with one more transform applied on reading."""
        return LazyFiles(self.paths, self.read, (*self.transforms, transform), self.keep)

    def subset(self, indices) -> LazyFiles:
        return LazyFiles([self.paths[i] for i in indices], self.read, self.transforms, self.keep)

    def __getstate__(self):  # dataloader workers get the paths, not the cache
        return {**self.__dict__, "_cache": OrderedDict()}


def _pick(items, indices: list[int]):
    return items.subset(indices) if isinstance(items, LazyFiles) else [items[i] for i in indices]


def _map(items, transform: Callable):
    return items.map(transform) if isinstance(items, LazyFiles) else [transform(x) for x in items]


def check_geometry(image_shape: Sequence[int], label_shape: Sequence[int], name: str) -> None:
    """Raise a DataError naming `name` when a label's grid is not its image's spatial grid."""
    spatial, label = tuple(image_shape[1:]), tuple(label_shape)
    if spatial != label:
        if len(spatial) == 3:
            kind, axes, word, fix = "volume", "[D, H, W]", "label", "resample both to one voxel grid before training"
        else:
            kind, axes, word, fix = "image", "[H, W]", "mask", "masks are resized only together with their images"
        raise DataError(
            f"{name}: the {kind} is {axes} {spatial} but its {word} is {label}.",
            f"give every {word} the grid of its {kind}: {fix}.",
        )


@dataclass
class ImageSet:
    """Images [C, *spatial] float32 with optional label maps [*spatial] int64 (raw values or class ids).

    `images` and `labels` are lists, or `LazyFiles` read when used. Volumes read from files also carry each
    volume's stored `geometry` (None where the file stores none) and the `grid` they were brought onto.

    Example:
        >>> s = ImageSet([np.zeros((3, 8, 8), np.float32)] * 2, [np.zeros((8, 8), np.int64)] * 2, ["a", "b"])
        >>> len(s.subset([1])), s.channels, s.lazy
        (1, 3, False)
    """

    images: list[np.ndarray] | LazyFiles
    labels: list[np.ndarray] | LazyFiles | None
    names: list[str]
    geometry: list[Geometry | None] | None = None
    grid: Grid | None = None

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices) -> ImageSet:
        indices = list(indices)
        labels = None if self.labels is None else _pick(self.labels, indices)
        geometry = None if self.geometry is None else [self.geometry[i] for i in indices]
        return replace(
            self,
            images=_pick(self.images, indices),
            labels=labels,
            names=[self.names[i] for i in indices],
            geometry=geometry,
        )

    def map(self, images: Callable | None = None, labels: Callable | None = None) -> ImageSet:
        """The set with a transform applied to every image and/or label (when read, for a lazy set)."""
        return replace(
            self,
            images=self.images if images is None else _map(self.images, images),
            labels=self.labels if labels is None or self.labels is None else _map(self.labels, labels),
        )

    @property
    def lazy(self) -> bool:
        return isinstance(self.images, LazyFiles)

    @property
    def channels(self) -> int:
        """The channel count; a lazy set reads its first image (the others are checked as they are read)."""
        counts = sorted({x.shape[0] for x in (self.images[:1] if self.lazy else self.images)})
        if len(counts) != 1:
            raise DataError(
                f"the images have {counts or 'no'} channel counts; one model input needs one.",
                "give every image the same channels (modalities, stains) in the same order.",
            )
        return counts[0]

    def check_geometry(self) -> None:
        """Every label on its image's grid (a lazy set is checked as each item is read, by the crops)."""
        if self.labels is None or self.lazy:
            return
        for image, label, name in zip(self.images, self.labels, self.names):
            check_geometry(image.shape, label.shape, name)


__all__ = ["ImageSet", "LazyFiles", "check_geometry"]
