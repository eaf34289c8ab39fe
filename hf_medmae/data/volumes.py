"""The 3D data layer: volumes [C, D, H, W] with labels [D, H, W], read and prepared for the crops of `data.crops`.

Sources: NIfTI (`.nii`, `.nii.gz`), multi-page or ImageJ TIFF, `.npy`, folders of those (labels matched
by a file-name pattern), a `.npy` stack [N, C, D, H, W], or `embedded:nuclei3d` / `embedded:mni152`.
Depth D is always the slice axis: NIfTI's Z, a TIFF's pages (or its ImageJ Z axis). Files are read in
their stored voxel order, never reoriented, so an image and its label written on one voxel grid line up.
A volume set is an `image_set.ImageSet`; intensity normalisation (`transforms.normalise_intensity`), crops
(`crops`) and splits (`splits`) are the ones images use, with the dimension as a parameter.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from nibabel.filebasedimages import ImageFileError

from ..errors import ConfigError, DataError
from .crops import CropAugment, CropDataset
from .embedded import EMBEDDED_VOLUMES
from .image_set import ImageSet, LazyFiles
from .io import check_finite
from .segmentation import class_mapping, map_labels, read_label
from .splits import split_named
from .transforms import NORMALISE_MODES, normalise_intensity

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".tif", ".tiff", ".npy")


def volume_suffix(path: str | Path) -> str:
    """The full extension of a volume file: `.nii.gz` counts as one suffix.

    Example:
        >>> volume_suffix("case_01.nii.gz"), volume_suffix("b.TIF")
        ('.nii.gz', '.tif')
    """
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    array = nib.load(path).get_fdata(dtype=np.float32)  # (X, Y, Z[, C]); (X, Y, Z, 1, C) for vector intents
    if array.ndim == 5 and array.shape[3] == 1:
        array = array[:, :, :, 0]
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise DataError(
            f"{path}: NIfTI data of shape {array.shape} is not a volume (X, Y, Z) or (X, Y, Z, C).",
            "save one volume per file; a 2-D image needs a 2-D pipeline.",
        )
    return array.transpose(3, 2, 1, 0)  # -> [C, D=Z, H=Y, W=X]


def _tiff(path: Path) -> np.ndarray:
    """[C, D, H, W] from the first series: a named Z axis is depth, C/S channels; else pages are depth."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise DataError(f"{path} is a TIFF file without images.", "replace the file or move it out of the folder.")
        series = tif.series[0]
        array, axes = series.asarray(), series.axes
    keep = [i for i, a in enumerate(axes) if array.shape[i] > 1 or a in "YX"]
    array, axes = array.reshape([array.shape[i] for i in keep]), "".join(axes[i] for i in keep)
    named_channel = [i for i, a in enumerate(axes) if a in "CS"]
    pages = [i for i, a in enumerate(axes) if a in "QI"]  # tifffile's names for plain page axes
    depth = axes.index("Z") if "Z" in axes else (pages.pop(0) if pages else None)
    channel = named_channel.pop(0) if named_channel else (pages.pop(0) if pages else None)  # [P, C, H, W]
    if depth is None:
        raise DataError(
            f"{path} is a 2-D image (axes {axes}, shape {array.shape}), not a volume.",
            "give 3D runs multi-page TIFF z-stacks [D, H, W] or [D, C, H, W].",
        )
    if named_channel or pages or len(axes) > 4:
        raise DataError(
            f"{path} has axes {axes} (shape {array.shape}); a volume has one depth and one channel axis.",
            "save one time point per file as a z-stack [D, H, W] or an ImageJ hyperstack ZCYX.",
        )
    if channel is None:
        array, axes, channel, depth = array[None], "C" + axes, 0, depth + 1
    return array.transpose(channel, depth, axes.index("Y"), axes.index("X"))


def _npy(path: Path) -> np.ndarray:
    array = np.load(path, allow_pickle=False)  # never unpickle user files
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise DataError(
            f"{path} holds shape {array.shape}; a volume file is [C, D, H, W] or [D, H, W].",
            "save one volume per .npy, or a stack [N, C, D, H, W] as the whole source of load_volumes.",
        )
    return array


READERS = {".nii.gz": _nifti, ".nii": _nifti, ".tif": _tiff, ".tiff": _tiff, ".npy": _npy}


def read_volume(path: str | Path) -> np.ndarray:
    """Read one volume file as float32 [C, D, H, W] (raw intensities, stored voxel order).

    Args:
        path: `.nii`/`.nii.gz` (X, Y, Z[, C] -> C, Z, Y, X), `.tif`/`.tiff` (pages or the ImageJ Z axis
            are depth, the C axis channels) or `.npy` ([C, D, H, W] or [D, H, W]).

    Raises:
        DataError: unknown extension, unreadable or corrupt file, a 2-D image, NaN/inf voxels.

    Example:
        >>> read_volume("ct/case_01.nii.gz").shape  # doctest: +SKIP
        (1, 120, 512, 512)
    """
    path = Path(path)
    reader = READERS.get(volume_suffix(path))
    if reader is None:
        raise DataError(
            f"{path} is not a volume file (extension {volume_suffix(path)!r}).",
            f"convert it to one of {', '.join(VOLUME_SUFFIXES)}.",
        )
    try:
        array = reader(path)
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zlib.error, ImageFileError) as err:  # truncated gzip: EOFError / zlib.error
        raise DataError(
            f"cannot read volume {path} ({type(err).__name__}: {err}).",
            "replace the file (re-export or re-download it) or move it out of the folder.",
        ) from None
    if array.shape[1] < 2:
        raise DataError(
            f"{path} has a single slice (shape {array.shape}): a 2-D image, not a volume.",
            "use the 2D pipeline for 2-D images, or stack slices into one volume file.",
        )
    array = np.ascontiguousarray(array, dtype=np.float32)
    check_finite(array, str(path))
    return array


def _label_path(image: Path, label_dir: Path, pattern: str) -> Path:
    suffix = volume_suffix(image)
    return label_dir / pattern.format(stem=image.name[: -len(suffix)], suffix=suffix, name=image.name)


def _folder_volumes(folder: Path, label_dir: Path | None, pattern: str, max_volumes: int | None):
    """(image, label or None) pairs; labels are expected when label_dir is given or any label exists."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and volume_suffix(p) in VOLUME_SUFFIXES)
    label_of = {p: _label_path(p, label_dir or folder, pattern) for p in files}
    labels = {q.resolve() for q in label_of.values()}
    images = [p for p in files if p.resolve() not in labels][:max_volumes]  # a label file is never an image
    if label_dir is None and not any(label_of[p].is_file() for p in images):
        return [(p, None) for p in images]
    missing = [label_of[p].name for p in images if not label_of[p].is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} volume(s) have no label in {label_dir or folder}, e.g. {missing[:5]} "
            f"(label_pattern {pattern!r}).",
            "add the labels, fix label_dir / label_pattern ({stem}{suffix} = the volume's file name), "
            "or move unlabelled volumes out of the folder.",
        )
    return [(p, label_of[p]) for p in images]


def _files_set(found: list[tuple[Path, Path | None]], lazy: bool) -> ImageSet:
    """(volume file, label file or None) pairs -> an ImageSet, read now or when used."""
    names = [p.name for p, _ in found]
    read, read_labels = read_volume, partial(read_label, read=read_volume)
    has_labels = bool(found) and found[0][1] is not None
    if lazy:
        return ImageSet(
            LazyFiles([p for p, _ in found], read),
            LazyFiles([q for _, q in found], read_labels) if has_labels else None,
            names,
        )
    return ImageSet([read(p) for p, _ in found], [read_labels(q) for _, q in found] if has_labels else None, names)


def _npy_ndim(path: Path) -> int | None:
    """Dimensions of an `.npy` from its header alone; None when unreadable (read_volume then says why)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False).ndim
    except (OSError, ValueError, EOFError):
        return None


def _npy_stack(path: Path, lazy: bool = False) -> ImageSet:
    """A [N, C, D, H, W] `.npy` stack and its optional `<name>_labels.npy` [N, D, H, W]; lazy: memory-mapped."""
    mode = "r" if lazy else None
    try:
        images = np.load(path, allow_pickle=False, mmap_mode=mode)
        images = images if lazy else images.astype(np.float32)  # mapped items become float32 when used
        label_file = path.with_name(f"{path.stem}_labels.npy")
        labels = np.load(label_file, allow_pickle=False, mmap_mode=mode) if label_file.is_file() else None
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"cannot read {path} ({err}).", "save arrays with numpy.save (no pickled objects).") from None
    if labels is not None and (
        labels.ndim != 4 or len(labels) != len(images) or (not lazy and not np.array_equal(labels, np.round(labels)))
    ):
        raise DataError(
            f"{label_file}: labels {labels.shape} do not pair with volumes {images.shape}.",
            "save integer labels as [N, D, H, W] with the N of the volumes [N, C, D, H, W].",
        )
    names = [f"{path.name}[{i}]" for i in range(len(images))]
    if lazy:
        return ImageSet(list(images), None if labels is None else list(labels), names)
    check_finite(images, str(path))
    return ImageSet(list(images), None if labels is None else list(labels.astype(np.int64)), names)


def load_volumes(
    source: str,
    label_dir: str | None = None,
    label_pattern: str = "{stem}_label{suffix}",
    max_volumes: int | None = None,
    lazy: bool = False,
) -> ImageSet:
    """Volumes and optional labels from a folder, one file, a `.npy` stack, or `embedded:nuclei3d|mni152`.

    Args:
        source: a folder of volume files (not recursive), one volume file, a `.npy` stack [N, C, D, H, W]
            (labels [N, D, H, W] from a sibling `<name>_labels.npy` when present), or `embedded:<name>`.
        label_dir: folder of the labels; default the volumes' folder. Given, every volume needs a label;
            not given, labels are read when any volume of the folder has one (and then all need one).
        label_pattern: label file name of a volume; `{stem}` is its name without `.nii.gz`/`.tif`/...,
            `{suffix}` that extension, `{name}` the full name. Files that are labels are never volumes.
        max_volumes: read at most this many volumes (sorted order).
        lazy: read each file when it is used (`LazyFiles`; a `.npy` stack is memory-mapped), so a pool
            larger than memory trains; a label's shape is then checked when it is read.

    Raises:
        DataError: missing labels, unreadable files, a label shape that differs from its volume's [D, H, W].

    Example:
        >>> vs = load_volumes("embedded:nuclei3d")
        >>> len(vs), vs.images[0].shape, vs.labels[0].shape
        (4, (1, 60, 128, 128), (60, 128, 128))
    """
    path = Path(source)
    if source.startswith("embedded:"):
        name = source.split(":", 1)[1]
        if name not in EMBEDDED_VOLUMES:
            raise DataError(
                f"unknown embedded volume set {name!r}.", f"use one of {sorted(EMBEDDED_VOLUMES)} as embedded:<name>."
            )
        volumes = ImageSet(*EMBEDDED_VOLUMES[name]())
    elif path.is_dir():
        found = _folder_volumes(path, Path(label_dir) if label_dir else None, label_pattern, max_volumes)
        volumes = _files_set(found, lazy)
    elif path.is_file() and volume_suffix(path) == ".npy" and _npy_ndim(path) == 5:
        volumes = _npy_stack(path, lazy)
    elif path.is_file():
        label = _label_path(path, Path(label_dir) if label_dir else path.parent, label_pattern)
        if label_dir and not label.is_file():
            raise DataError(
                f"{path.name} has no label {label}.", "fix label_dir / label_pattern, or leave label_dir unset."
            )
        volumes = _files_set([(path, label if label.is_file() else None)], lazy)
    else:
        raise DataError(
            f"volume source {source!r} is neither a folder, a volume file nor embedded:<name>.",
            f"point train_data at a folder of {'/'.join(VOLUME_SUFFIXES)} files, one such file, or embedded:nuclei3d.",
        )
    volumes = volumes.subset(range(min(len(volumes), max_volumes or len(volumes))))
    if not len(volumes):
        raise DataError(
            f"no volumes found in {source}.", f"check the path; volume files end in {', '.join(VOLUME_SUFFIXES)}."
        )
    volumes.check_geometry()
    return volumes


@dataclass
class VolumeDataArguments:
    spatial_dims: int = field(default=3, metadata={"help": "3: volumes; 2D configs leave it out"})
    train_data: str = field(
        default="embedded:nuclei3d",
        metadata={
            "help": "folder of .nii(.gz)/.tif/.npy volumes, one file, a .npy "
            "stack [N, C, D, H, W], embedded:nuclei3d or embedded:mni152"
        },
    )
    label_dir: str | None = field(default=None, metadata={"help": "folder of the labels; default: beside the volumes"})
    label_pattern: str = field(
        default="{stem}_label{suffix}", metadata={"help": "label file of a volume; {stem}, {suffix}, {name}"}
    )
    volumes: list[str] | None = field(
        default=None, metadata={"help": "use only these volumes (names), e.g. a study's training volumes"}
    )
    max_volumes: int | None = None
    in_memory: bool = field(
        default=False, metadata={"help": "read every volume first (small pools); default: read each volume when used"}
    )
    intensity: str = field(
        default="percentile", metadata={"help": f"per-volume normalisation: {' | '.join(NORMALISE_MODES)}"}
    )
    window: list[float] | None = field(
        default=None, metadata={"help": "ct_window: [low, high] in HU, e.g. [-175, 250] for abdomen CT"}
    )
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    foreground_threshold: float | None = field(
        default=None, metadata={"help": "zscore: statistics over voxels above it (e.g. 0 for MRI)"}
    )
    roi_size: list[int] = field(
        default_factory=lambda: [32, 64, 64], metadata={"help": "training crop (D, H, W): the model's input size"}
    )
    samples_per_volume: int = field(default=16, metadata={"help": "random crops per training volume and epoch"})
    flips: bool = True
    rot90: bool = True
    pos_fraction: float = field(
        default=0.0, metadata={"help": "share of crops centred on a labelled foreground voxel"}
    )
    validation_volumes: int = field(default=1, metadata={"help": "whole volumes held out for validation (seeded)"})
    test_volumes: int = field(default=1, metadata={"help": "segmentation: whole volumes held out for the test"})
    split_seed: int | None = field(default=None, metadata={"help": "seed of the volume split; default: seed"})
    validation_names: list[str] | None = field(
        default=None, metadata={"help": "these volumes validate (instead of a seeded draw)"}
    )
    test_names: list[str] | None = field(
        default=None,
        metadata={
            "help": "these volumes are the test (instead of a seeded draw), e.g. "
            "to keep a mirror image of a test volume out of training"
        },
    )
    # segmentation only
    class_map: dict | None = field(
        default=None,
        metadata={
            "help": "raw label value -> class id (or ignore); others: the class id (or ignore) of every value "
            "not listed, e.g. {0: 0, 1: 1, 6: 2, others: 0}; default: labels are class ids"
        },
    )
    class_names: list[str] | None = field(default=None, metadata={"help": "one name per class id"})
    ignore_index: int = 255
    label_fraction_voxels: float = field(
        default=1.0, metadata={"help": "seeded share of labelled voxels kept per training volume (sparse labels)"}
    )


def prepare_volumes(data_args: VolumeDataArguments, labelled: bool) -> ImageSet:
    """Read the volumes (and labels), keep `volumes` if named, normalise each volume's intensities."""
    if len(data_args.roi_size) != 3 or min(data_args.roi_size) < 1:
        raise ConfigError(
            f"roi_size={data_args.roi_size} is not a (D, H, W) crop.", "give three positive sides, e.g. [32, 64, 64]."
        )
    data = load_volumes(
        data_args.train_data,
        data_args.label_dir,
        data_args.label_pattern,
        data_args.max_volumes,
        lazy=not data_args.in_memory,
    )
    if data_args.volumes:
        missing = sorted(set(data_args.volumes) - set(data.names))
        if missing:
            raise ConfigError(
                f"volumes {missing} are not in {data_args.train_data}.", f"use names among {data.names[:8]}."
            )
        data = data.subset([data.names.index(n) for n in data_args.volumes])
    if labelled and data.labels is None:
        raise DataError(
            f"{data_args.train_data} has no labels.",
            f"put a label file beside each volume ({data_args.label_pattern}) or set label_dir.",
        )
    window = tuple(data_args.window) if data_args.window else None
    normalise = partial(
        normalise_intensity,
        mode=data_args.intensity,
        window=window,
        percentiles=tuple(data_args.percentiles),
        foreground_threshold=data_args.foreground_threshold,
    )
    return data.map(images=normalise)


def volume_classes(data: ImageSet, data_args: VolumeDataArguments) -> tuple[dict[int | str, int], list[str]]:
    """Map `data`'s raw labels to class ids in place (`class_map`; default: they already are ids 0..K-1).

    Voxels already at `ignore_index` stay unlabeled unless `class_map` names that value (its `others` key does
    not: it takes the other raw values only).

    Returns:
        The class map and the class names.
    """
    class_map, names = class_mapping(
        data_args.class_map,
        data_args.class_names,
        data_args.ignore_index,
        None if data_args.class_map else data.labels,
    )
    if data_args.class_map is not None:
        to_ids = partial(map_labels, class_map={data_args.ignore_index: data_args.ignore_index, **class_map})
        if data.lazy:
            data.labels = data.labels.map(to_ids)
        else:
            data.labels = [to_ids(m, name=n) for m, n in zip(data.labels, data.names)]
    return class_map, names


def split_for(
    data: ImageSet, data_args: VolumeDataArguments, seed: int, n_test: int
) -> tuple[list[int], list[int], list[int]]:
    """Named validation / test volumes when the config names them, else a seeded split of whole volumes."""
    split_seed = seed if data_args.split_seed is None else data_args.split_seed
    return split_named(
        data.names, data_args.validation_volumes, n_test, split_seed, data_args.validation_names, data_args.test_names
    )


def volume_crops(
    train: ImageSet,
    val: ImageSet | None,
    data_args: VolumeDataArguments,
    seed: int,
    fixed: bool = False,
    ignore_index: int = 255,
    with_ids: bool = True,
) -> tuple[CropDataset, CropDataset | None]:
    """The crops a 3D model trains and validates on (with the volumes' labels, if any).

    Args:
        train, val: the training and validation volumes (val None: no validation crops).
        data_args: `roi_size`, `samples_per_volume` and the augmentation fields.
        seed: base seed of the random training crops.
        fixed: train on the covering crops instead (the MAE's attention generator: its maps must line up with
            the voxels they mask).
        ignore_index: label of padded voxels.
        with_ids: training items carry "sample_ids"; validation items never do (the attention bank is keyed by
            training ids).
    """
    roi = tuple(data_args.roi_size)
    augment = CropAugment(roi, data_args.flips, data_args.rot90, data_args.pos_fraction)
    augment, samples = (None, 1) if fixed else (augment, data_args.samples_per_volume)
    train_crops = CropDataset(
        train.images, train.labels, roi, augment, samples, seed, ignore_index, with_ids, names=train.names
    )
    if val is None:
        return train_crops, None
    return train_crops, CropDataset(val.images, val.labels, roi, None, 1, seed, ignore_index, False, val.names)


__all__ = [
    "VolumeDataArguments",
    "prepare_volumes",
    "split_for",
    "volume_crops",
    "volume_classes",
    "VOLUME_SUFFIXES",
    "load_volumes",
    "read_volume",
    "volume_suffix",
]
