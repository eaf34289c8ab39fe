"""The 3D data layer: volumes [C, D, H, W] with labels [D, H, W], read and prepared for the crops of `data.crops`.

Sources: NIfTI (`.nii`, `.nii.gz`), NRRD (`.nrrd`), DICOM series (a folder of slices, `data.dicom`), multi-page
or ImageJ TIFF, `.npy`, folders of those (labels matched by a file-name pattern; nnU-Net's `CASE_0000`,
`CASE_0001`, ... files are one case's channels), a `.npy` stack [N, C, D, H, W], or `embedded:nuclei3d` /
`embedded:mni152`.
Depth D is always the slice axis: NIfTI's Z, a TIFF's pages (or its ImageJ Z axis). Each volume keeps its
`geometry.Geometry` (affine and shape as stored); a `geometry.Grid` brings volumes and labels onto the model's
grid (RAS orientation, one target spacing) as they are read. A volume set is an `image_set.ImageSet`; intensity
normalisation (`transforms.normalise_intensity`), crops (`crops`) and splits (`splits`) are the ones images use,
with the dimension as a parameter.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
from nibabel.filebasedimages import ImageFileError

from ..errors import ConfigError, DataError
from .crops import CropAugment, CropDataset
from .dicom import is_dicom_folder, read_dicom_series
from .embedded import EMBEDDED_VOLUMES
from .geometry import ORIENTATIONS, Geometry, Grid, check_same_grid, plan_spacing, to_grid
from .image_set import ImageSet, LazyFiles
from .io import check_finite
from .segmentation import class_mapping, map_labels, read_label
from .splits import split_named
from .transforms import NORMALISE_MODES, foreground_statistics, normalise_intensity

logger = logging.getLogger(__name__)
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".tif", ".tiff", ".npy")
CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # nnU-Net: CASE_0000.nii.gz, CASE_0001.nii.gz


def volume_suffix(path: str | Path) -> str:
    """The full extension of a volume file: `.nii.gz` counts as one suffix.

    Example:
        >>> volume_suffix("case_01.nii.gz"), volume_suffix("b.TIF")
        ('.nii.gz', '.tif')
    """
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def case_stem(name: str | Path) -> str:
    """A volume's name without its extension (`case_01.nii.gz` -> `case_01`; a DICOM folder's name as it is)."""
    name = Path(name).name
    suffix = volume_suffix(name) if volume_suffix(name) in VOLUME_SUFFIXES else ""
    return name[: -len(suffix)] if suffix else name


def _nib_volume(image, path: Path) -> tuple[np.ndarray, Geometry]:
    """[C, D, H, W] and the geometry of a nibabel image (a NIfTI file or a DICOM series)."""
    array = image.get_fdata(dtype=np.float32)  # (X, Y, Z[, C]); (X, Y, Z, 1, C) for vector intents
    if array.ndim == 5 and array.shape[3] == 1:
        array = array[:, :, :, 0]
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise DataError(
            f"{path}: NIfTI data of shape {array.shape} is not a volume (X, Y, Z) or (X, Y, Z, C).",
            "save one volume per file; a 2-D image needs a 2-D pipeline.",
        )
    array = array.transpose(3, 2, 1, 0)  # -> [C, D=Z, H=Y, W=X]
    return array, Geometry(np.asarray(image.affine, dtype=np.float64), tuple(array.shape[1:]))


def _nifti(path: Path) -> tuple[np.ndarray, Geometry]:
    import nibabel as nib

    return _nib_volume(nib.load(path), path)


def _dicom(path: Path, series_uid: str | None = None) -> tuple[np.ndarray, Geometry]:
    return _nib_volume(read_dicom_series(path, series_uid), path)


# The sign flips from an NRRD `space` to RAS+ (x, y, z); other spaces are not anatomical (scanner-xyz, ...).
NRRD_SPACES = {
    "right-anterior-superior": (1, 1, 1),
    "ras": (1, 1, 1),
    "left-anterior-superior": (-1, 1, 1),
    "las": (-1, 1, 1),
    "left-posterior-superior": (-1, -1, 1),
    "lps": (-1, -1, 1),
}


def _nrrd(path: Path) -> tuple[np.ndarray, Geometry]:
    """[C, D, H, W] and the geometry of an NRRD file (3D Slicer, ITK); a non-spatial axis (a vector `kind`, no
    space direction) holds the channels. pynrrd directly: MONAI's NrrdReader fails on such vector files."""
    import nrrd

    try:
        array, header = nrrd.read(str(path))  # index order F: (X, Y, Z) as NIfTI
    except nrrd.NRRDError as err:
        raise ValueError(str(err)) from None
    directions = header.get("space directions")
    if directions is not None:
        directions = np.asarray(directions, dtype=np.float64)
        spatial = [i for i, row in enumerate(directions) if np.isfinite(row).all()]
    else:
        spatial = [
            i for i, kind in enumerate(header.get("kinds", ["domain"] * array.ndim)) if kind in ("domain", "space")
        ]
    others = [i for i in range(array.ndim) if i not in spatial]
    if len(spatial) != 3 or len(others) > 1:
        raise DataError(
            f"{path}: NRRD data of shape {array.shape} has {len(spatial)} spatial axes; a volume has 3 (and at most "
            "one channel axis).",
            "save one 3-D volume (optionally with one vector axis of channels) per file.",
        )
    array = np.moveaxis(array, others, [0]) if others else array[None]  # [C, X, Y, Z]
    array = np.ascontiguousarray(array.transpose(0, 3, 2, 1))  # -> [C, D=Z, H=Y, W=X]
    space = str(header.get("space", "")).lower()
    if directions is None or space not in NRRD_SPACES:
        return array, Geometry.unknown(array.shape[1:])
    affine = np.eye(4)
    affine[:3, :3] = directions[spatial].T  # column i: the step of index i
    affine[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    affine = np.diag([*NRRD_SPACES[space], 1.0]) @ affine
    return array, Geometry(affine, tuple(array.shape[1:]))


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
    array = array.transpose(channel, depth, axes.index("Y"), axes.index("X"))
    return array, Geometry.unknown(array.shape[1:])


def _npy(path: Path) -> np.ndarray:
    array = np.load(path, allow_pickle=False)  # never unpickle user files
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise DataError(
            f"{path} holds shape {array.shape}; a volume file is [C, D, H, W] or [D, H, W].",
            "save one volume per .npy, or a stack [N, C, D, H, W] as the whole source of load_volumes.",
        )
    return array, Geometry.unknown(array.shape[1:])


READERS = {".nii.gz": _nifti, ".nii": _nifti, ".nrrd": _nrrd, ".tif": _tiff, ".tiff": _tiff, ".npy": _npy}


def load_volume(
    path: str | Path | Sequence[Path], grid: Grid | None = None, series_uid: str | None = None
) -> tuple[np.ndarray, Geometry]:
    """One volume as float32 [C, D, H, W] and its geometry, on `grid` (None: as stored).

    Args:
        path: a volume file (`.nii`/`.nii.gz`/`.nrrd`: (X, Y, Z[, C]) -> [C, Z, Y, X]; `.tif`/`.tiff`: pages or the
            ImageJ Z axis are depth, the C axis channels; `.npy`: [C, D, H, W] or [D, H, W]), a DICOM series
            folder, or a sequence of those: one case's channels (modalities), which must share one voxel grid.
        grid: orientation and spacing of the model's grid; None keeps the stored voxels.
        series_uid: the DICOM series to read from a folder holding several.

    Raises:
        DataError: unknown extension, unreadable or corrupt file, a 2-D image, NaN/inf voxels, channels on
            different grids, a DICOM folder of several series and no `series_uid`.

    Example:
        >>> volume, geometry = load_volume("ct/case_01.nii.gz", Grid("RAS", (3.0, 1.0, 1.0)))  # doctest: +SKIP
        >>> volume.shape, geometry.spacing  # doctest: +SKIP
        ((1, 40, 350, 350), (3.0, 1.0, 1.0))
    """
    if isinstance(path, (str, Path)):
        array, geometry = _read_stored(Path(path), series_uid)
    else:  # one case's channels: all on the first one's grid, resampled together
        parts = [_read_stored(Path(p), series_uid) for p in path]
        for p, (_, other) in zip(path[1:], parts[1:]):
            check_same_grid(parts[0][1], other, Path(p).name, "channel")
        array, geometry = np.concatenate([a for a, _ in parts]), parts[0][1]
    if grid is not None:
        array, geometry = to_grid(array, geometry, grid)
    return array, geometry


def read_volume(path: str | Path | Sequence[Path], grid: Grid | None = None, series_uid: str | None = None):
    """`load_volume` without the geometry: float32 [C, D, H, W].

    Example:
        >>> read_volume("ct/case_01.nii.gz").shape  # doctest: +SKIP
        (1, 120, 512, 512)
    """
    return load_volume(path, grid, series_uid)[0]


def read_geometry(path: str | Path | Sequence[Path], series_uid: str | None = None) -> Geometry | None:
    """A volume's stored geometry: NIfTI from its header alone, a DICOM series or NRRD file from a full read; None
    for TIFF and `.npy`, which store none (a case of channels: its first file)."""
    path = Path(path if isinstance(path, (str, Path)) else path[0])
    if path.is_dir() or volume_suffix(path) == ".nrrd":
        geometry = _read_stored(path, series_uid)[1]
        return geometry if geometry.known else None
    if volume_suffix(path) not in (".nii", ".nii.gz"):
        return None
    import nibabel as nib

    try:
        header = nib.load(path)
    except (OSError, ValueError, EOFError, zlib.error, ImageFileError):
        return _read_stored(path)[1]  # raises the named error
    return Geometry(np.asarray(header.affine, dtype=np.float64), tuple(int(s) for s in header.shape[:3][::-1]))


def _read_stored(path: Path, series_uid: str | None = None) -> tuple[np.ndarray, Geometry]:
    """float32 [C, D, H, W] in stored voxel order and its geometry; every reading problem a named DataError."""
    reader = _dicom if path.is_dir() else READERS.get(volume_suffix(path))
    if reader is None:
        raise DataError(
            f"{path} is not a volume file (extension {volume_suffix(path)!r}).",
            f"convert it to one of {', '.join(VOLUME_SUFFIXES)}, or give a folder holding one DICOM series.",
        )
    try:
        array, geometry = reader(path, series_uid) if path.is_dir() else reader(path)
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
    return array, geometry


def _case_name(case: Path | tuple[Path, ...]) -> str:
    """A volume's name: its file or DICOM folder name; a case of channel files: the case name."""
    return (
        case.name
        if isinstance(case, Path)
        else CHANNEL_FILE.match(case_stem(case[0]))["case"] + volume_suffix(case[0])
    )


def _label_path(image: Path | tuple[Path, ...], label_dir: Path, pattern: str) -> Path:
    """The label file of a volume; a DICOM series' label is a NIfTI file ({suffix} = .nii.gz)."""
    name, first = _case_name(image), image if isinstance(image, Path) else image[0]
    if first.is_dir():
        stem, suffix = name, ".nii.gz"
    else:
        suffix = volume_suffix(first)
        stem = name[: -len(suffix)]
    return label_dir / pattern.format(stem=stem, suffix=suffix, name=name)


def _cases(entries: list[Path]) -> list[Path | tuple[Path, ...]]:
    """Volume files and DICOM folders, with nnU-Net's `CASE_0000`, `CASE_0001`, ... files grouped into one case of
    channels: when at least two cases each have channels numbered from 0000 (numbered scans stay single volumes)."""
    groups: dict[str, list[Path]] = {}
    for p in entries:
        match = CHANNEL_FILE.match(case_stem(p)) if not p.is_dir() else None
        if match:
            groups.setdefault(match["case"], []).append(p)
    numbers = {case: [CHANNEL_FILE.match(case_stem(p))["channel"] for p in sorted(g)] for case, g in groups.items()}
    if len(groups) < 2 or max(map(len, numbers.values())) < 2 or any(n[0] != "0000" for n in numbers.values()):
        return entries
    if len({tuple(n) for n in numbers.values()}) != 1:
        counts = {case: len(n) for case, n in numbers.items()}
        raise DataError(
            f"the cases have different channel files (nnU-Net naming CASE_0000, CASE_0001, ...): {counts}.",
            "give every case the same modalities, numbered alike, or move incomplete cases out of the folder.",
        )
    grouped = {p for g in groups.values() for p in g}
    logger.info(
        "%d cases of %d channels each (files CASE_0000, CASE_0001, ...)",
        len(groups),
        len(next(iter(numbers.values()))),
    )
    return [tuple(sorted(g)) for _, g in sorted(groups.items())] + [p for p in entries if p not in grouped]


def case_files(source: str | Path) -> list[tuple[str, Path | tuple[Path, ...]]]:
    """(name, volume) for each volume of a folder (volume files and DICOM series folders, not recursive; nnU-Net's
    `CASE_0000`, `CASE_0001`, ... files one case of channels), a DICOM series folder, or a volume file.

    Example:
        >>> case_files("mri/")  # doctest: +SKIP
        [('BRATS_001.nii.gz', (PosixPath('mri/BRATS_001_0000.nii.gz'), PosixPath('mri/BRATS_001_0001.nii.gz')))]
    """
    path = Path(source)
    if path.is_file() or is_dicom_folder(path):
        return [(path.name, path)]
    if not path.is_dir():
        raise DataError(
            f"{source} is neither a folder of volumes, a volume file nor a DICOM series.", "check the path."
        )
    entries = sorted(
        p
        for p in path.iterdir()
        if (p.is_file() and volume_suffix(p) in VOLUME_SUFFIXES) or (p.is_dir() and is_dicom_folder(p))
    )
    return [(_case_name(case), case) for case in _cases(entries)]


def _folder_volumes(folder: Path, label_dir: Path | None, pattern: str, max_volumes: int | None):
    """(image, label or None) pairs; labels are expected when label_dir is given or any label exists."""
    cases = [case for _, case in case_files(folder)]
    label_of = {case: _label_path(case, label_dir or folder, pattern) for case in cases}
    labels = {q.resolve() for q in label_of.values()}
    images = [c for c in cases if not (isinstance(c, Path) and c.resolve() in labels)][:max_volumes]
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


def _files_set(
    found: list[tuple[Path | tuple[Path, ...], Path | None]],
    lazy: bool,
    orientation: str | None = "RAS",
    target_spacing: str | Sequence[float] | None = None,
    series_uid: str | None = None,
    interpolation: str = "linear",
) -> ImageSet:
    """(volume, label or None) pairs -> an ImageSet on one grid (spacing planned from the volumes' headers), read
    now or when used; every label whose geometry is stored is checked against its volume's first."""
    geometry = [read_geometry(p, series_uid) for p, _ in found]
    for (p, q), g in zip(found, geometry):
        label = read_geometry(q) if q is not None and g is not None else None
        if label is not None:
            check_same_grid(g, label, _case_name(p))
    if orientation not in ORIENTATIONS:
        raise ConfigError(f"orientation {orientation!r} is not supported.", "use RAS, or null for the stored order.")
    spacing = plan_spacing([g or Geometry.unknown((1, 1, 1)) for g in geometry], target_spacing)
    grid = Grid(orientation, spacing, {"linear": "bilinear", "cubic": 3}[interpolation])
    names = [_case_name(p) for p, _ in found]
    read = partial(read_volume, grid=grid, series_uid=series_uid)
    read_labels = partial(read_label, read=partial(read_volume, grid=grid.for_labels()))
    has_labels = bool(found) and found[0][1] is not None
    if lazy:
        images = LazyFiles([p for p, _ in found], read)
        labels = LazyFiles([q for _, q in found], read_labels) if has_labels else None
    else:
        images = [read(p) for p, _ in found]
        labels = [read_labels(q) for _, q in found] if has_labels else None
    return ImageSet(images, labels, names, geometry=geometry, grid=grid)


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
    orientation: str | None = "RAS",
    target_spacing: str | Sequence[float] | None = "median",
    series_uid: str | None = None,
    interpolation: str = "linear",
) -> ImageSet:
    """Volumes and optional labels from a folder, one file, a DICOM series, a `.npy` stack, or
    `embedded:nuclei3d|mni152`, on one voxel grid.

    Args:
        source: a folder of volume files and DICOM series folders (not recursive; nnU-Net's `CASE_0000`,
            `CASE_0001`, ... files are one case's channels), one volume file, one DICOM series folder, a `.npy`
            stack [N, C, D, H, W] (labels [N, D, H, W] from a sibling `<name>_labels.npy` when present), or
            `embedded:<name>`.
        label_dir: folder of the labels; default the volumes' folder. Given, every volume needs a label;
            not given, labels are read when any volume of the folder has one (and then all need one).
        label_pattern: label file name of a volume; `{stem}` is its name without `.nii.gz`/`.tif`/...,
            `{suffix}` that extension (`.nii.gz` for a DICOM series), `{name}` the full name. Files that are
            labels are never volumes.
        max_volumes: read at most this many volumes (sorted order).
        lazy: read each file when it is used (`LazyFiles`; a `.npy` stack is memory-mapped), so a pool
            larger than memory trains; a label's shape is then checked when it is read.
        orientation: "RAS": volumes and labels reoriented on reading (`geometry.Grid`); None: stored order.
        target_spacing: "median" of the volumes' spacings, [D, H, W] in mm, or None (no resampling).
            Volumes without a stored spacing (TIFF, `.npy`, embedded) are never resampled.
        series_uid: the DICOM series to read where a folder holds several.
        interpolation: resampling of images, "linear" or "cubic" (labels: nearest).

    Raises:
        DataError: missing labels, unreadable files, a label on another grid (shape or affine) than its volume.

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
        if is_dicom_folder(path):  # the folder is one series
            found = [(path, _label_path(path, Path(label_dir) if label_dir else path.parent, label_pattern))]
            found = [(p, q if q.is_file() else None) for p, q in found]
        else:
            found = _folder_volumes(path, Path(label_dir) if label_dir else None, label_pattern, max_volumes)
        volumes = _files_set(found, lazy, orientation, target_spacing, series_uid, interpolation)
    elif path.is_file() and volume_suffix(path) == ".npy" and _npy_ndim(path) == 5:
        volumes = _npy_stack(path, lazy)
    elif path.is_file():
        label = _label_path(path, Path(label_dir) if label_dir else path.parent, label_pattern)
        if label_dir and not label.is_file():
            raise DataError(
                f"{path.name} has no label {label}.", "fix label_dir / label_pattern, or leave label_dir unset."
            )
        volumes = _files_set(
            [(path, label if label.is_file() else None)], lazy, orientation, target_spacing, None, interpolation
        )
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
            "help": "folder of .nii(.gz)/.nrrd/.tif/.npy volumes or DICOM series, one file, a .npy "
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
    orientation: str | None = field(
        default="RAS",
        metadata={"help": "RAS: reorient volumes and labels on reading (no interpolation); null: as stored"},
    )
    target_spacing: list[str] | None = field(
        default_factory=lambda: ["median"],
        metadata={
            "help": "voxel sides the model sees: median (of the volumes, as nnU-Net plans it), [D, H, W] in mm, or "
            "null (each volume's own voxels); images linear, labels nearest"
        },
    )
    interpolation: Literal["linear", "cubic"] = field(
        default="linear", metadata={"help": "resampling of images (labels: always nearest)"}
    )
    series_uid: str | None = field(
        default=None, metadata={"help": "DICOM: the series to read where a folder holds several (SeriesInstanceUID)"}
    )
    intensity: str = field(
        default="percentile",
        metadata={
            "help": f"{' | '.join(NORMALISE_MODES)}; ct: clip + z-score with the training foreground's statistics "
            "(nnU-Net), zscore: per volume (MRI)"
        },
    )
    window: list[float] | None = field(
        default=None, metadata={"help": "ct_window: [low, high] in HU, e.g. [-175, 250] for abdomen CT"}
    )
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    foreground_threshold: float | None = field(
        default=None,
        metadata={
            "help": "zscore: statistics over voxels above it (e.g. 0 for MRI); ct without labels (pre-training): "
            "the foreground is the voxels above it (e.g. -500 HU)"
        },
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
    train_volumes: int | None = field(
        default=None,
        metadata={
            "help": "seeded number of labelled training volumes used (few-label curves); one seed's smaller sets "
            "lie inside its larger ones"
        },
    )
    predict_volumes: list[str] | None = field(
        default=None,
        metadata={
            "help": "segmentation: folders or files of volumes to segment (with predict_only: by a trained run); "
            "one NIfTI label map per volume in its own geometry; several sets: one sub-folder each"
        },
    )
    predict_label_dirs: list[str] | None = field(
        default=None,
        metadata={"help": "one label folder per predict_volumes set ('' for none): scores that set (mm metrics)"},
    )
    predict_output_dir: str | None = field(
        default=None, metadata={"help": "default: output_dir/predictions (predict_only: output_dir)"}
    )


def spacing_choice(value) -> str | list[float] | None:
    """`target_spacing` as a config gives it (median, [D, H, W], null) -> "median", sides or None."""
    if value is None or value == "median" or value == ["median"]:
        return value if value is None else "median"
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(
            f"target_spacing {value!r} is not understood.", "use median, [D, H, W] in mm (e.g. [3, 1, 1]), or null."
        ) from None


def prepare_volumes(data_args: VolumeDataArguments, labelled: bool) -> ImageSet:
    """Read the volumes (and labels) and keep `volumes` if named; `normalise_volumes` normalises them after the split
    (CT statistics come from the training volumes alone)."""
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
        orientation=data_args.orientation,
        target_spacing=spacing_choice(data_args.target_spacing),
        series_uid=data_args.series_uid,
        interpolation=data_args.interpolation,
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
    return data


def normalisation(data_args: VolumeDataArguments, statistics: dict | None = None) -> dict:
    """A run's intensity normalisation as `inference_config.json` and `config.json` record it."""
    return {
        "intensity": data_args.intensity,
        "window": data_args.window,
        "percentiles": list(data_args.percentiles),
        "foreground_threshold": data_args.foreground_threshold,
        "intensity_statistics": statistics,
    }


def normaliser(settings: dict) -> Callable[[np.ndarray], np.ndarray]:
    """`normalise_intensity` with a run's recorded settings (runs that predate a key: its default)."""
    return partial(
        normalise_intensity,
        mode=settings.get("intensity", "percentile"),
        window=tuple(settings["window"]) if settings.get("window") else None,
        percentiles=tuple(settings.get("percentiles") or (0.5, 99.5)),
        foreground_threshold=settings.get("foreground_threshold"),
        statistics=settings.get("intensity_statistics"),
    )


def normalise_volumes(
    data_args: VolumeDataArguments, train: ImageSet, *others: ImageSet | None, ignore_index: int | None = None
) -> tuple[list[ImageSet | None], dict]:
    """The sets with every volume's intensities normalised (when read, for a lazy set), and the settings.

    `intensity: ct` takes its statistics from the foreground of `train` only (labelled voxels where it has labels),
    so validation and test volumes never shape the normalisation (nnU-Net's CT scheme).
    """
    statistics = None
    if data_args.intensity == "ct":
        statistics = foreground_statistics(train.images, train.labels, data_args.foreground_threshold, ignore_index)
    settings = normalisation(data_args, statistics)
    transform = normaliser(settings)
    return [s if s is None else s.map(images=transform) for s in (train, *others)], settings


def geometry_report(data: ImageSet) -> dict:
    """For `all_results.json`: the grid the model saw and each volume's stored shape, spacing and orientation."""
    grid = data.grid.as_dict() if data.grid is not None else {"orientation": None, "spacing": None}
    cases = {
        name: {k: v for k, v in g.as_dict().items() if k != "affine"} if g is not None else None
        for name, g in zip(data.names, data.geometry or [None] * len(data))
    }
    return {"voxel_grid": grid, "volumes": cases}


def voxel_spacings(data: ImageSet) -> list[tuple[float, float, float]] | None:
    """Each volume's voxel sides (D, H, W) in mm as the model sees it; None where a volume stores no geometry."""
    if data.grid is not None and data.grid.spacing is not None:
        return [data.grid.spacing] * len(data)
    if not data.geometry or any(g is None or not g.known for g in data.geometry):
        return None
    reoriented = data.grid is not None and data.grid.orientation is not None
    return [(g.canonical() if reoriented else g).spacing for g in data.geometry]


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
    "case_files",
    "case_stem",
    "geometry_report",
    "load_volume",
    "normalisation",
    "normalise_volumes",
    "normaliser",
    "prepare_volumes",
    "read_geometry",
    "spacing_choice",
    "voxel_spacings",
    "split_for",
    "volume_crops",
    "volume_classes",
    "VOLUME_SUFFIXES",
    "load_volumes",
    "read_volume",
    "volume_suffix",
]
