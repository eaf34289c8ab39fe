"""The segmentation data pipeline: image + mask pairs -> class ids -> seeded split -> sparse labels -> tensors.

Sources: a folder of images with masks matched by a filename pattern (in the same or another folder),
an `.npz` with `images` / `masks` arrays, or `embedded:nuclei16`. Raw mask values are turned into class
ids through an explicit class map, because no convention is safe: WBC masks use 255 for the nucleus,
while many tools use 255 for "unlabeled".
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .crops import sliding_crops
from .embedded import EMBEDDED, nuclei16
from .image_set import ImageSet
from .io import list_image_files, read_image
from .splits import split_three, subsample
from .transforms import Normalize, PairAugment, check_channels, resize_pair

CROP_MODES = ("resize", "random_crop")


def read_label(path: str | Path, read: Callable[[Path], np.ndarray] = read_image) -> np.ndarray:
    """One label file as int64 class values: [H, W] from a mask image, [D, H, W] from a label volume.

    Args:
        path: the label file.
        read: the reader giving float32 [C, ...]: `read_image` for masks (grey, palette, or RGB with equal
            channels), `data.volumes.read_volume` for label volumes.

    Raises:
        DataError: channels that differ (a colour image), or non-integer values.

    Example:
        >>> read_label("masks/001.png").shape  # doctest: +SKIP
        (120, 120)
    """
    array = read(Path(path))
    if array.shape[0] > 1 and not all(np.array_equal(array[0], array[c]) for c in range(1, min(array.shape[0], 3))):
        raise DataError(
            f"label {path} has {array.shape[0]} channels that differ (a colour image).",
            "save labels as one integer class id per pixel or voxel (grey or palette images, one-channel volumes).",
        )
    if not np.array_equal(array[0], np.round(array[0])):
        raise DataError(
            f"label {path} holds non-integer values.",
            "save labels as integer class ids (PNG, TIFF, NIfTI), not probabilities.",
        )
    return array[0].astype(np.int64)


def _folder_pairs(folder: Path, mask_dir: Path, image_glob: str, mask_pattern: str, max_images: int | None):
    """(image file, mask file) pairs; files that are some image's mask are never images themselves."""
    candidates = [p for p in list_image_files(folder, recursive=False) if fnmatch.fnmatch(p.name, image_glob)]
    mask_of = {p: mask_dir / mask_pattern.format(stem=p.stem, name=p.name) for p in candidates}
    masks = {m.resolve() for m in mask_of.values()}
    pairs = [(p, mask_of[p]) for p in candidates if p.resolve() not in masks]
    missing = [str(m) for _, m in pairs if not m.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} image(s) have no mask, e.g. {missing[:3]} (mask_pattern {mask_pattern!r}).",
            "check mask_dir and mask_pattern ({stem} = image name without suffix), "
            "or narrow image_glob to the images that have masks.",
        )
    return pairs[:max_images]


def load_pairs(
    source: str,
    mask_dir: str | None = None,
    image_glob: str = "*",
    mask_pattern: str = "{stem}.png",
    max_images: int | None = None,
) -> ImageSet:
    """Images and raw masks from a folder, an `.npz` file (`images`, `masks`) or `embedded:nuclei16`.

    Args:
        source: image folder (not recursive), `.npz` with `images` (N, C, H, W) or (N, H, W) and `masks`
            (N, H, W), or `embedded:nuclei16` (16-channel nuclei with 0/1 masks).
        mask_dir: folder of the masks; default the image folder.
        image_glob: which files of the folder are images, e.g. `*.bmp`.
        mask_pattern: mask file name of an image; `{stem}` / `{name}` are the image's stem / file name.
        max_images: read at most this many pairs (sorted order).

    Raises:
        DataError: missing masks, unreadable files, or a mask whose size differs from its image.

    Example:
        >>> pairs = load_pairs("../shared/data/wbc_zheng2018/Dataset 1", image_glob="*.bmp")  # doctest: +SKIP
        >>> pairs.images[0].shape, pairs.labels[0].shape
        ((3, 120, 120), (120, 120))
    """
    if source.startswith("embedded:"):
        name = source.split(":", 1)[1]
        if name not in EMBEDDED:
            raise DataError(
                f"unknown embedded data set {name!r}.", f"use one of {sorted(EMBEDDED)} as embedded:<name>."
            )
        images, masks = nuclei16()
        pairs = ImageSet(
            list(images), [m.astype(np.int64) for m in masks], [f"{name}_{i:02d}" for i in range(len(images))]
        )
    elif Path(source).suffix.lower() == ".npz":
        pairs = _npz_pairs(Path(source))
    elif Path(source).is_dir():
        found = _folder_pairs(Path(source), Path(mask_dir or source), image_glob, mask_pattern, max_images)
        pairs = ImageSet(
            [read_image(p) for p, _ in found], [read_label(m) for _, m in found], [p.name for p, _ in found]
        )
    else:
        raise DataError(
            f"segmentation source {source!r} is neither a folder, an .npz file nor embedded:<name>.",
            "point train_data at an image folder (with masks), an .npz with images/masks, or embedded:nuclei16.",
        )
    pairs = pairs.subset(range(min(len(pairs), max_images or len(pairs))))
    if not len(pairs):
        raise DataError(
            f"no image/mask pairs found in {source} (image_glob {image_glob!r}).", "check train_data and image_glob."
        )
    pairs.check_geometry()
    return pairs


def _npz_pairs(path: Path) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as data:  # never unpickle user files
            if not {"images", "masks"} <= set(data.keys()):
                raise DataError(
                    f"{path} has arrays {list(data.keys())}; expected 'images' and 'masks'.",
                    "save with numpy.savez(path, images=(N, C, H, W), masks=(N, H, W)).",
                )
            images, masks = data["images"].astype(np.float32), data["masks"]
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path} ({err}).", "save arrays with numpy.savez (no pickled objects).") from None
    images = images[:, None] if images.ndim == 3 else images
    if images.ndim != 4 or masks.ndim != 3 or len(images) != len(masks):
        raise DataError(
            f"{path}: images {images.shape} and masks {masks.shape} do not pair up.",
            "store images as (N, C, H, W) or (N, H, W) and masks as (N, H, W) with the same N.",
        )
    names = [f"{path.name}[{i}]" for i in range(len(images))]
    return ImageSet(list(images), [m.astype(np.int64) for m in masks], names)


OTHERS = "others"
"""The one reserved `class_map` key: the class id (or `ignore`) of every raw value the map does not list."""
IGNORE = "ignore"
"""A `class_map` value that means "unlabeled": it parses to `ignore_index`."""


def _class_id(value, ignore_index: int) -> int:
    if isinstance(value, str) and value.strip().lower() == IGNORE:
        return ignore_index
    return int(value)


def parse_class_map(class_map: dict | None, ignore_index: int = 255) -> dict[int | str, int]:
    """Validate a {raw mask value: class id} map (keys may be strings, as JSON writes them).

    Class ids must be 0..K-1 without gaps; a raw value may also map to `ignore_index` (or `ignore`: unlabeled).
    The reserved key `others` sends every raw value the map does not list to one class id (or `ignore`), so a
    map of a whole-body label set can keep a few organs: {0: 0, 1: 1, 6: 2, others: 0}. `others` is not a raw
    value; its class id counts among the ids.

    Returns:
        {raw value (int): class id}, plus `OTHERS: class id` when given (`ignore` parsed to `ignore_index`).
        The map survives a JSON round trip: `parse_class_map({str(k): v for k, v in parsed.items()}) == parsed`.

    Example:
        >>> parse_class_map({"0": 0, "128": 1, "255": 2})
        {0: 0, 128: 1, 255: 2}
        >>> parse_class_map({0: 0, 1: 1, 6: 2, "others": "ignore"})
        {0: 0, 1: 1, 6: 2, 'others': 255}
    """
    if not class_map:
        raise ConfigError(
            "class_map is not set.", "map every raw mask value to a class id, e.g. class_map: {0: 0, 128: 1, 255: 2}."
        )
    parsed: dict[int | str, int] = {}
    try:
        for key, value in class_map.items():
            is_others = isinstance(key, str) and key.strip().lower() == OTHERS
            parsed[OTHERS if is_others else int(key)] = _class_id(value, ignore_index)
    except (TypeError, ValueError):
        raise ConfigError(
            f"class_map {class_map} must map integers to integers.",
            f"write it as {{raw value: class id}} (a class id or {IGNORE}); the one other key is {OTHERS}.",
        ) from None
    ids = sorted(set(parsed.values()) - {ignore_index})
    if ids != list(range(len(ids))) or not ids:
        raise ConfigError(
            f"class_map {parsed} gives class ids {ids}; they must be 0..K-1 without gaps.",
            f"number the classes from 0 ({OTHERS} counts too); map unlabeled values to ignore_index {ignore_index}.",
        )
    return parsed


def map_labels(raw: np.ndarray, class_map: dict[int | str, int], name: str = "a label") -> np.ndarray:
    """Raw label values -> class ids (int64, same shape: a mask or a label volume), with a map from
    `parse_class_map`; a value missing from `class_map` goes to its `others` class, or without `others` is a
    `DataError` naming `name`.

    Example:
        >>> map_labels(np.array([[0, 128], [255, 0]]), {0: 0, 128: 1, 255: 2}, "001.png").tolist()
        [[0, 1], [2, 0]]
        >>> map_labels(np.array([[0, 128], [255, 7]]), {0: 0, 128: 1, "others": 0}).tolist()
        [[0, 1], [0, 0]]
    """
    values, inverse = np.unique(raw, return_inverse=True)
    others = class_map.get(OTHERS)
    unknown = [int(v) for v in values if int(v) not in class_map]
    if unknown and others is None:
        raise DataError(
            f"{name}: {'mask' if raw.ndim == 2 else 'label'} values {unknown[:10]} are not in class_map "
            f"(keys {sorted(k for k in class_map if k != OTHERS)}).",
            "add every raw value to class_map (map unlabeled values to ignore_index), "
            f"send all values not listed to one class with the key {OTHERS} (e.g. {OTHERS}: 0, or {OTHERS}: "
            f"{IGNORE} for unlabeled), or fix the labels.",
        )
    lookup = np.array([class_map.get(int(v), others) for v in values], dtype=np.int64)
    return lookup[inverse].reshape(raw.shape)


def class_mapping(
    class_map: dict | None,
    class_names: list[str] | None,
    ignore_index: int = 255,
    labels: Iterable[np.ndarray] | None = None,
) -> tuple[dict[int | str, int], list[str]]:
    """The checked {raw value: class id} map and one name per class, for masks and label volumes alike.

    Args:
        class_map: raw value -> class id, `others` for every value not listed (see `parse_class_map`); None: the
            labels already are class ids 0..K-1, which needs `labels` to check (without them a class map must be
            given).
        class_names: one name per class id; default `class_<id>`.
        ignore_index: label of unlabeled pixels; it is never a class.
        labels: raw labels, read only when `class_map` is None.

    Raises:
        ConfigError: a bad class map, or class names that do not match its classes.
        DataError: without a class map, label values that are not class ids.

    Example:
        >>> class_mapping({0: 0, 128: 1, 255: 2}, None)
        ({0: 0, 128: 1, 255: 2}, ['class_0', 'class_1', 'class_2'])
    """
    if class_map is None and labels is not None:
        values = sorted({int(v) for m in labels for v in np.unique(m)} - {ignore_index})
        k = len(class_names) if class_names else (max(values) + 1 if values else 0)
        if not values or values[0] < 0 or values[-1] >= k:
            raise DataError(
                f"label values {values[:10]} are not class ids 0..{k - 1}.",
                "set class_map: {raw value: class id} (and class_names), or save labels as 0..K-1.",
            )
        parsed = {i: i for i in range(k)}
    else:
        parsed = parse_class_map(class_map, ignore_index)
    k = len(set(parsed.values()) - {ignore_index})
    names = list(class_names or [f"class_{i}" for i in range(k)])
    if len(names) != k:
        raise ConfigError(
            f"class_names has {len(names)} entries but class_map defines {k} classes.", "give one name per class id."
        )
    return parsed, names


def load_labelled(
    source: str,
    class_map: dict | None,
    class_names: list[str] | None = None,
    ignore_index: int = 255,
    mask_dir: str | None = None,
    image_glob: str = "*",
    mask_pattern: str = "{stem}.png",
    max_images: int | None = None,
) -> tuple[ImageSet, dict[int | str, int], list[str], int]:
    """`load_pairs` with the masks mapped to class ids (an explicit `class_map`: no convention is safe).

    Returns:
        The pairs (masks as class ids), the class map, the class names and the images' channel count.

    Example:
        >>> pairs, _, names, channels = load_labelled("embedded:nuclei16", {0: 0, 1: 1}, ["bg", "nucleus"])
        >>> len(pairs.images), names, channels
        (12, ['bg', 'nucleus'], 16)
    """
    class_map, names = class_mapping(class_map, class_names, ignore_index)
    pairs = load_pairs(source, mask_dir, image_glob, mask_pattern, max_images)
    pairs.labels = [map_labels(m, class_map, name) for m, name in zip(pairs.labels, pairs.names)]
    return pairs, class_map, names, check_channels(pairs.images, source)


def split_pairs(
    pairs: ImageSet,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    split_seed: int | None = None,
    train_fraction: float = 1.0,
    label_fraction: float = 1.0,
    ignore_index: int = 255,
    train_images: int | None = None,
) -> tuple[ImageSet, ImageSet, ImageSet]:
    """Seeded train / validation / test split of whole images; `train_fraction` (or `train_images`, a count) and
    sparse labels (`label_fraction` of each mask's labelled pixels) thin the training images only.

    Args:
        seed: the run's seed (the subsample and the sparse labels); `split_seed` (default `seed`) draws the split.
    """
    train_idx, val_idx, test_idx = split_three(
        len(pairs), validation_fraction, test_fraction, seed if split_seed is None else split_seed
    )
    train = pairs.subset(subsample(train_idx, train_fraction, seed, train_images))
    # Validation and test stay dense, so scores compare across label budgets.
    train.labels = sparsify(train.labels, label_fraction, ignore_index, seed)
    return train, pairs.subset(val_idx), pairs.subset(test_idx)


def sparsify(masks: list[np.ndarray], fraction: float, ignore_index: int, seed: int) -> list[np.ndarray]:
    """Keep a seeded random `fraction` of each mask's labelled pixels; the rest become `ignore_index`.

    Emulates sparse annotation (seed 001 trained on 2.3% of the pixels). At least one pixel stays
    labelled in any mask that has labelled pixels.

    Example:
        >>> kept = sparsify([np.zeros((10, 10), int)], 0.1, 255, seed=0)[0]
        >>> int((kept != 255).sum())
        10
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(
            f"label_fraction_pixels={fraction} is outside (0, 1].",
            "use e.g. 0.02 for 2% of the pixels, 1.0 for dense.",
        )
    if fraction == 1.0:
        return masks
    rng, out = np.random.default_rng(seed), []
    for mask in masks:
        labelled = np.flatnonzero(mask != ignore_index)
        keep = rng.choice(labelled, size=min(len(labelled), max(1, round(fraction * len(labelled)))), replace=False)
        sparse = np.full(mask.size, ignore_index, dtype=np.int64)
        sparse[keep] = mask.reshape(-1)[keep]
        out.append(sparse.reshape(mask.shape))
    return out


def covering_tiles(pairs: ImageSet, size: int) -> ImageSet:
    """Cut each pair into size x size tiles that cover every pixel (`crops.sliding_crops`: the last row/column
    overlaps).

    Used for evaluation with `crop_mode: random_crop`, so a model trained on crops is scored on
    (nearly) every pixel at its training scale. Images smaller than `size` stay whole.
    """
    images, masks, names = [], [], []
    for image, mask, name in zip(pairs.images, pairs.labels, pairs.names):
        for box in sliding_crops(mask.shape, (size, size)):
            images.append(image[(slice(None), *box)])
            masks.append(mask[box])
            names.append(f"{name}@{box[0].start},{box[1].start}")
    return ImageSet(images, masks, names)


class SegmentationDataset(Dataset):
    """Normalised image + class-id mask pairs; items are {"pixel_values": [C, S, S], "labels": [S, S] long}.

    Args:
        pairs: images (raw intensities) and masks of class ids (`ignore_index` for unlabeled pixels).
        image_mean, image_std: per-channel normalisation.
        image_size: side S of the model input.
        augment: training geometry, or None: deterministic resize to S (evaluation).

    Example:
        >>> ds = SegmentationDataset(pairs, [0.0] * 3, [1.0] * 3, 64, PairAugment(64))  # doctest: +SKIP
        >>> ds[0]["pixel_values"].shape, ds[0]["labels"].dtype
        (torch.Size([3, 64, 64]), torch.int64)
    """

    def __init__(self, pairs: ImageSet, image_mean, image_std, image_size: int, augment: PairAugment | None = None):
        self.images = [torch.from_numpy(np.ascontiguousarray(im, dtype=np.float32)) for im in pairs.images]
        self.masks = [torch.from_numpy(np.ascontiguousarray(m, dtype=np.int64)) for m in pairs.labels]
        self.names = list(pairs.names)
        self.normalize = Normalize(image_mean, image_std)
        self.image_size, self.augment = image_size, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image, mask = self.normalize(self.images[index]), self.masks[index]
        if self.augment is not None:
            image, mask = self.augment(image, mask)
        else:
            image, mask = resize_pair(image, mask, (self.image_size, self.image_size))
        return {"pixel_values": image, "labels": mask}


def labelled_fraction(masks: list[np.ndarray], ignore_index: int) -> float:
    """Share of pixels that are not `ignore_index`, over all masks."""
    return float(sum((m != ignore_index).sum() for m in masks) / sum(m.size for m in masks))


__all__ = [
    "CROP_MODES",
    "IGNORE",
    "OTHERS",
    "SegmentationDataset",
    "covering_tiles",
    "labelled_fraction",
    "class_mapping",
    "load_labelled",
    "load_pairs",
    "map_labels",
    "parse_class_map",
    "read_label",
    "sparsify",
    "split_pairs",
]
