"""The pre-training data: a source string -> images -> tiles -> normalised, augmented tensors (with per-image mask noise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .embedded import load_embedded
from .io import ARRAY_SUFFIXES, item_to_chw
from .sources import ArraySource, HFSource, ImageSource, ListSource, base_items, folder_source, open_hf_dataset
from .sources import image_column as hf_image_column
from .transforms import Augment, EpochSeeded, Normalize, resize


def load_source(
    source: str,
    on_bad_file: str = "error",
    max_images: int | None = None,
    array_key: str | None = None,
    pattern: str = "*",
    image_column: str | None = None,
) -> tuple[ImageSource, list[str]]:
    """The images of a source string as a lazy `ImageSource` (read per item), and the files skipped while indexing.

    Args:
        source: `embedded:nuclei16`; a folder of images; a `.npy`/`.npz` (N, C, H, W) file (memory-mapped);
            or `hf:<dataset name or save_to_disk folder>[::split]` for a `datasets` dataset (split
            defaults to train; `::` because a Hub id may itself hold a `:`-free `namespace/name`).
    """
    if source.startswith("embedded:"):
        return ListSource(load_embedded(source.split(":", 1)[1])[:max_images]), []
    if source.startswith("hf:"):
        name, _, split = source[3:].partition("::")
        ds = open_hf_dataset(name, split or "train")
        if max_images:
            ds = ds.select(range(min(max_images, len(ds))))
        return HFSource(ds, hf_image_column(ds.column_names, name, image_column), name), []
    path = Path(source)
    if path.suffix.lower() in ARRAY_SUFFIXES:
        array = ArraySource(path, key=array_key)
        return (array.subset(range(min(max_images, len(array)))) if max_images else array), []
    if path.is_dir():
        files = folder_source(path, on_bad_file=on_bad_file, max_images=max_images, pattern=pattern)
        return files, files.skipped
    raise DataError(
        f"data source {source!r} is neither a folder, a .npy/.npz file, hf:<dataset> nor embedded:<name>.",
        "point train_data at an image folder or array file, or use embedded:nuclei16.",
    )


def item_labels(source: ImageSource, labels_by_file: dict[Path, int]) -> np.ndarray:
    """[N] class index of every item of a folder source (or its subsets and tiles), -100 where no row names its file.

    Args:
        source: a folder's `FileSource`, or a `Subset` / `TiledSource` of one (a tile takes its image's label).
        labels_by_file: {resolved image path: class index}, e.g. from `data.classification.read_labels_csv`.
    """
    root, index = base_items(source)
    files = getattr(root, "files", None)
    if files is None:
        raise DataError(
            "labels are matched to images by file name, but these images do not come from an image folder.",
            "pre-train with labels_csv on a folder of images (train_data: <folder>).",
        )
    found = np.asarray([labels_by_file.get(Path(f).resolve(), -100) for f in files], dtype=np.int64)
    return found[index]


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


class PretrainingDataset(EpochSeeded, Dataset):
    """Normalised, augmented images for MAE pre-training; items are {"pixel_values", "sample_ids"} (and see below).

    Args:
        images: an `ImageSource` (read per item) or a list of [C, H, W] float arrays (raw intensities).
        image_mean, image_std: per-channel statistics of the training images.
        image_size: side of the model input.
        augment: training augmentation, or None for validation: the whole image resized, the view the classifier
            is evaluated on and the attention maps are drawn from (a central crop at native scale is a zoom that no
            training view need have shown: an MSMAE trains on whole views only).
        seed: augmentation of item i in epoch e draws from its own generator seeded by (seed, e, i) (`EpochSeeded`,
            which also carries the epoch to persistent workers), so it does not depend on what else drew random
            numbers before: a resumed run, which loads and skips the batches it already trained on, augments the
            remaining ones exactly as before.
        mask_noise_patches: when > 0, items also carry `noise` ([mask_noise_patches] uniform draws from
            the same generator) for uniform random masking. The image's mask then depends on the image
            and epoch alone, not on which process or batch slot it landed in: 2 processes train on
            exactly the masks 1 process would, and a resumed run on exactly the masks it skipped.
        labels: [N] class index per item, -100 where unlabeled, for the MAE's supervised head (MSMAE); items
            then carry `labels`. None (default): the items are exactly a plain MAE's.
        with_ids: items carry `sample_ids` (their index). A validation set of the `attention` generator leaves
            them out: the attention bank is keyed by *training* indices, which a validation index would collide with.
            With an `augment` that does not crop, items also carry `view_ids` (`Augment.with_view` codes: the
            flips and turn), so the model can turn each image's attention map along with its view.
    """

    def __init__(
        self,
        images: list[np.ndarray],
        image_mean,
        image_std,
        image_size: int,
        augment: Augment | None = None,
        seed: int = 0,
        mask_noise_patches: int = 0,
        labels: np.ndarray | None = None,
        with_ids: bool = True,
    ):
        self.images = images if isinstance(images, ImageSource) else ListSource(list(images))
        self.normalize = Normalize(image_mean, image_std)
        EpochSeeded.__init__(self, seed)
        self.image_size, self.augment = image_size, augment
        self.mask_noise_patches = mask_noise_patches
        if labels is not None and len(labels) != len(self.images):
            raise DataError(
                f"{len(labels)} labels for {len(self.images)} images.",
                "give one label per item (-100 where unlabeled).",
            )
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.with_ids = with_ids

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = self.normalize(torch.from_numpy(np.ascontiguousarray(self.images[index])))
        gen = self.item_generator(index)
        if self.augment is None:
            image, view = resize(image, self.image_size), None
        else:
            image, view = self.augment.with_view(image, gen)
        item = {"pixel_values": image, "sample_ids": index} if self.with_ids else {"pixel_values": image}
        if self.with_ids and view is not None and not self.augment.crop:  # a view that permutes whole patches
            item["view_ids"] = view
        if self.mask_noise_patches:
            item["noise"] = torch.rand(self.mask_noise_patches, generator=gen)
        if self.labels is not None:
            item["labels"] = int(self.labels[index])
        return item


def streaming_dataset(
    stream,
    column: str,
    image_mean,
    image_std,
    image_size: int,
    augment: Augment | None = None,
    tile_size: int | None = None,
    name: str = "stream",
):
    """A `datasets.IterableDataset` of pre-training items from a stream of images (tiled on the fly).

    It stays a `datasets.IterableDataset`, so accelerate can give each process its own file shards
    (`shard(num_shards=processes, index=rank)`, when `dispatch_batches` is off and there are enough shards)
    and the Trainer re-shuffles it each epoch (`set_epoch`). Augmentation and masks draw from the
    process's RNG (restored on resume), not from a per-item seed: a stream has no stable item index.
    """
    normalize = Normalize(image_mean, image_std)
    ids = "sample_ids" in (stream.column_names or [])

    def to_items(batch: dict) -> dict:  # batched with batch_size 1: one image in, its tiles out
        out = {"pixel_values": [], **({"sample_ids": []} if ids else {})}
        for k, item in enumerate(batch[column]):
            array = item_to_chw(item, name)
            for tile in tile_image(array, tile_size) if tile_size else [array]:
                image = normalize(torch.from_numpy(np.ascontiguousarray(tile)))
                out["pixel_values"].append(resize(image, image_size) if augment is None else augment(image))
                if ids:
                    out["sample_ids"].append(int(batch["sample_ids"][k]))
        return out

    # numpy format: each image arrives as one array, not nested Python lists (which cost ~36 bytes per pixel in the shuffle buffer)
    return stream.with_format("numpy").map(
        to_items,
        batched=True,
        batch_size=1,
        remove_columns=[c for c in (stream.column_names or [column]) if c != "sample_ids"],
    )
