"""The pre-training data: a source string -> images -> tiles -> normalised, augmented tensors (with per-image mask
noise); the labels of a supervised (MSMAE) pre-training; a stream; a pool of volumes.

The functions that take `data_args` / `model_args` read the fields of `run_mae.py`'s `DataArguments` (volumes:
`data.volumes.VolumeDataArguments`) and `ModelArguments`; any object with those fields will do.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..classification import class_weights
from ..errors import ConfigError, DataError
from .classification import read_labels_csv
from .crops import sliding_crops
from .embedded import load_embedded
from .image_set import ImageSet
from .io import ARRAY_SUFFIXES, item_to_chw, progress
from .sources import (
    ArraySource,
    HFSource,
    ImageSource,
    ListSource,
    TiledSource,
    base_items,
    folder_source,
    open_hf_dataset,
    source_channels,
)
from .sources import image_column as hf_image_column
from .splits import label_subset, split_indices
from .transforms import Augment, EpochSeeded, Normalize, Photometric, channel_moments, finish_views, resize, view_copy
from .volumes import VolumeDataArguments, normalise_volumes, prepare_volumes, split_for

logger = logging.getLogger(__name__)


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


def tile_image(image: np.ndarray, tile_size: int) -> list[np.ndarray]:
    """Cut [C, H, W] into tile_size x tile_size tiles (e.g. 16x256x256 -> 16 tiles of 16x64x64), as `TiledSource`.

    Tiles that would run past the border are dropped; an image smaller than one tile is returned whole.
    """
    if min(image.shape[1:]) < tile_size:
        return [image]
    return [image[(slice(None), *box)] for box in sliding_crops(image.shape[1:], (tile_size,) * 2, cover=False)]


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
        light: the light data path (with an `augment` without photometric jitter): read the image as stored,
            crop, convert only the crop to float (`Augment.draw`), then normalise and flip / turn it (`finish_views`).
            Equal to the full path up to float rounding and several times cheaper per image; False: the full path
            (normalise the whole image, then crop), kept for comparison (`benchmarks/data_path.py`).
        defer_views: with `light`, leave normalisation, flips and turns to the training device: items carry the
            unnormalised crop and `pending_views` (the codes), and `finish_batch` completes a batch there, batched
            (`training.MedTrainer` calls it on the device). The draws are the same, so views and masks are too.
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
        light: bool = True,
        defer_views: bool = False,
    ):
        self.images = images if isinstance(images, ImageSource) else ListSource(list(images))
        self.light = light and augment is not None and augment.photometric is None  # jitter needs the whole image
        self.defer_views = defer_views and self.light
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
        gen = self.item_generator(index)
        pending = None
        if self.light:
            image, view = self.augment.draw(self.images.raw(index), gen)
            if self.defer_views:
                pending = view
            else:
                image = view_copy(self.normalize(image), view)  # what `finish_views` does to a batch
        else:
            raw = torch.from_numpy(np.ascontiguousarray(self.images[index]))
            if self.augment is None:
                image, view = resize(self.normalize(raw), self.image_size), None
            else:
                image, view = self.augment.view(raw, self.normalize, gen)
        item = {"pixel_values": image, "sample_ids": index} if self.with_ids else {"pixel_values": image}
        if pending is not None:
            item["pending_views"] = pending
        if self.with_ids and view is not None and not self.augment.crop:  # a view that permutes whole patches
            item["view_ids"] = view
        if self.mask_noise_patches:
            item["noise"] = torch.rand(self.mask_noise_patches, generator=gen)
        if self.labels is not None:
            item["labels"] = int(self.labels[index])
        return item

    def finish_batch(self, batch: dict) -> dict:
        """A collated batch of deferred items, completed on its device: normalised pixel values, views applied."""
        codes = batch.pop("pending_views", None)
        if codes is not None:
            batch["pixel_values"] = finish_views(batch["pixel_values"], codes, self.normalize)
        return batch


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
                raw = torch.from_numpy(np.ascontiguousarray(tile))
                image = resize(normalize(raw), image_size) if augment is None else augment.view(raw, normalize)[0]
                out["pixel_values"].append(image)
                if ids:
                    out["sample_ids"].append(int(batch["sample_ids"][k]))
        return out

    # numpy format: each image arrives as one array, not nested Python lists (far larger in the shuffle buffer)
    return stream.with_format("numpy").map(
        to_items,
        batched=True,
        batch_size=1,
        remove_columns=[c for c in (stream.column_names or [column]) if c != "sample_ids"],
    )


def load_images(data_args, seed: int) -> tuple[ImageSource, ImageSource, list[str]]:
    """(train, validation, skipped files) as lazy sources: whole images split before tiling, so no tile of a
    validation image is trained on; tiles are an index into the images, not copies."""
    images, skipped = load_source(
        data_args.train_data,
        data_args.on_bad_file,
        data_args.max_images,
        pattern=data_args.file_pattern,
        image_column=data_args.image_column,
    )
    if not len(images):
        raise DataError(
            f"no images found in {data_args.train_data}.",
            "check train_data; supported: PNG/JPEG/BMP/TIFF folders, .npy/.npz, hf:, embedded:.",
        )
    if data_args.in_memory:
        files = getattr(images, "files", None)
        images = ListSource(
            [images[i] for i in progress(range(len(images)), desc="reading into memory", unit="image")]
        )
        images.files = files  # labels_csv matches its rows to these file names
    if data_args.validation_data:
        val, more = load_source(
            data_args.validation_data,
            data_args.on_bad_file,
            pattern=data_args.file_pattern,
            image_column=data_args.image_column,
        )
        train, skipped = images, skipped + more
    else:
        train_idx, val_idx = split_indices(len(images), data_args.validation_fraction, seed)
        train, val = images.subset(train_idx), images.subset(val_idx)
    if data_args.tile_size:
        train, val = TiledSource(train, data_args.tile_size), TiledSource(val, data_args.tile_size)
    return train, val, skipped


def pretraining_augment(image_size: int, data_args, channels: int, crop: bool = True) -> Augment:
    """The training views: photometric jitter, a random resized crop (`crop_scale`) unless `crop` is False, and the
    flips and turns."""
    scale = {"scale": tuple(data_args.crop_scale)} if crop else {"crop": False}
    return Augment(
        image_size,
        **scale,
        hflip=data_args.hflip,
        vflip=data_args.vflip,
        rot90=data_args.rot90,
        photometric=Photometric.from_args(data_args, channels),
    )


@dataclass
class Supervision:
    """The labels of a supervised (MSMAE) pre-training: per item of the train and validation sources (-100: none)."""

    class_names: list[str]
    train: np.ndarray
    val: np.ndarray
    class_weights: list[float] | None = None

    def config_fields(self) -> dict:
        return dict(id2label=dict(enumerate(self.class_names)), class_weights=self.class_weights)


def read_supervision(data_args, model_args, train: ImageSource, val: ImageSource, seed: int = 0) -> Supervision | None:
    """The labels `labels_csv` gives the training (and validation) images, matched by file, checked for use."""
    if data_args.labels_csv is None:
        if model_args.supervised_loss_weight > 0:
            raise ConfigError(
                f"supervised_loss_weight={model_args.supervised_loss_weight} needs labels for the supervised head.",
                "give labels_csv (labels for all or part of train_data), or set supervised_loss_weight: 0.",
            )
        return None
    if model_args.supervised_loss_weight <= 0 and not model_args.model_name_or_path:
        raise ConfigError(
            "labels_csv is given but supervised_loss_weight is 0, so no label would be used.",
            "set supervised_loss_weight > 0 (MSMAE: 0.1) for the supervised head, or drop labels_csv.",
        )
    paths, labels, names = read_labels_csv(
        data_args.train_data,
        data_args.labels_csv,
        data_args.id_column,
        [data_args.label_column],
        data_args.filename_template,
        data_args.class_names,
        data_args.label_offset,
        data_args.label_map,
    )
    if data_args.label_fraction < 1:  # labels for part of the pool: the other rows are dropped, their images unlabeled
        kept = label_subset(np.asarray(labels), names, data_args.label_fraction, seed)
        paths, labels = [paths[i] for i in kept], [labels[i] for i in kept]
    by_file = {path.resolve(): int(label) for path, label in zip(paths, labels)}
    from_files = getattr(base_items(val)[0], "files", None) is not None  # a separate validation_data may be an array
    supervision = Supervision(
        names, item_labels(train, by_file), item_labels(val, by_file) if from_files else np.full(len(val), -100)
    )
    labelled = supervision.train[supervision.train >= 0]
    if not len(labelled):
        raise DataError(
            f"no training image of {data_args.train_data} has a row in {data_args.labels_csv}.",
            "check id_column and filename_template: they must name files of train_data.",
        )
    supervision.class_weights = class_weights(labelled, len(names), model_args.class_weighting)
    logger.info(
        "supervised head: %d of %d training items labelled, %s",
        len(labelled),
        len(supervision.train),
        {name: int((labelled == i).sum()) for i, name in enumerate(names)},
    )
    return supervision


@dataclass
class Stream:
    """A shuffled `datasets.IterableDataset` of images, its image column, and the statistics of its first images."""

    dataset: object
    column: str
    name: str
    image_mean: list[float]
    image_std: list[float]
    stats_images: int


def open_stream(data_args, model_args, max_steps: int, seed: int) -> Stream:
    """`streaming: true`: the hf: pool as a seeded, shuffled stream, after checking the run can be streamed."""
    if not data_args.train_data.startswith("hf:"):
        raise ConfigError(
            f"streaming needs an hf: source; train_data is {data_args.train_data!r}.",
            "use train_data: hf:<dataset or save_to_disk folder>, or streaming: false "
            "(folders and .npy are read lazily anyway).",
        )
    if max_steps <= 0:
        raise ConfigError(
            "a stream has no length, so num_train_epochs cannot set the schedule.", "set max_steps (optimizer steps)."
        )
    if data_args.validation_data is None and data_args.validation_fraction > 0:
        raise ConfigError(
            "a stream cannot be split into train and validation without reading it first.",
            "give validation_data (e.g. hf:<name>::validation or a small folder), or set validation_fraction: 0.",
        )
    if model_args.mask_generator == "attention":
        raise ConfigError(
            "the attention mask generator keeps a map per image, which a stream has no index for.",
            "use mask_generator: random, block, grid or foreground with streaming.",
        )
    if data_args.labels_csv or model_args.supervised_loss_weight > 0:
        raise ConfigError(
            "the supervised head matches labels_csv rows to image files, which a stream has no index for.",
            "pre-train a folder source with labels_csv (streaming: false), or drop labels_csv.",
        )
    name, _, split = data_args.train_data[3:].partition("::")
    stream = open_hf_dataset(name, split or "train", streaming=True, with_ids=data_args.record_sample_ids)
    column = data_args.image_column or hf_image_column(stream.column_names or list(next(iter(stream)).keys()), name)
    if data_args.max_images:
        stream = stream.take(data_args.max_images)
    stream = stream.shuffle(seed=seed, buffer_size=data_args.shuffle_buffer)
    first = itertools.islice(stream, data_args.stats_sample_size or 1000)
    mean, std, stats_images = channel_moments(item_to_chw(item[column], name) for item in first)  # a seeded sample
    return Stream(stream, column, name, mean, std, stats_images)


def validation_images(data_args) -> tuple[ImageSource | None, list[str]]:
    """The separate `validation_data` (tiled as the training images), and the files skipped reading it."""
    if not data_args.validation_data:
        return None, []
    images, skipped = load_source(
        data_args.validation_data,
        data_args.on_bad_file,
        pattern=data_args.file_pattern,
        image_column=data_args.image_column,
    )
    return (TiledSource(images, data_args.tile_size) if data_args.tile_size else images), skipped


def volume_pool(data_args: VolumeDataArguments, seed: int) -> tuple[ImageSet, ImageSet | None, dict]:
    """The volumes of a 3D pre-training split whole into training and validation (no crop of a held-out volume is
    trained on; None: no validation volume), normalised, and the normalisation settings (CT: statistics of the
    training volumes). Labels, if any, play no part in self pre-training."""
    data = prepare_volumes(data_args, labelled=False)
    data.labels = None
    train_idx, val_idx, _ = split_for(data, data_args, seed, 0)
    (train, val), settings = normalise_volumes(
        data_args, data.subset(train_idx), data.subset(val_idx) if val_idx else None
    )
    return train, val, settings


def image_channels(train: ImageSource, val: ImageSource, data_args) -> int:
    """The one channel count of the training and validation images."""
    channels = source_channels(train, data_args.train_data)
    if len(val) and source_channels(val, data_args.validation_data or data_args.train_data) != channels:
        raise DataError(
            f"the validation images have {source_channels(val, '')} channels, the training images {channels}.",
            "use validation data with the training data's channel count.",
        )
    return channels
