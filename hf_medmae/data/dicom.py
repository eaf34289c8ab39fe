"""DICOM series as NIfTI images: one folder of slice files -> a `nibabel.Nifti1Image` in RAS+ millimetres.

A PACS export is a folder of single-slice files, often several series mixed, named in no useful order. The
reader groups the files by SeriesInstanceUID, sorts one series' slices by their position along the slice
normal, checks that they form one evenly spaced stack, applies the modality LUT (CT in Hounsfield units) and
returns data (X = columns, Y = rows, Z = slices) with the affine nibabel's DICOM orientation formula gives,
turned from DICOM's LPS patient coordinates to NIfTI's RAS. The image then goes down the same path as a
NIfTI file (reorientation, resampling).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from ..errors import DataError

if TYPE_CHECKING:
    from pydicom import Dataset

_DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"  # DICOMDIR: an index of a medium, not an image
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SPATIAL_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")


def _candidate_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())


def _is_dicom(path: Path) -> bool:
    import pydicom.misc

    try:
        return pydicom.misc.is_dicom(path)
    except OSError:  # unreadable (permissions, a broken link): not a file we can use
        return False


def is_dicom_folder(path: str | Path) -> bool:
    """Whether `path` is a folder holding at least one DICOM file (its own files only, not subfolders).

    A DICOM file is recognised by its 128-byte preamble and `DICM` marker (`pydicom.misc.is_dicom`), with
    or without a `.dcm` suffix; hidden files are ignored.

    Args:
        path: any path; files and missing paths give False.

    Example:
        >>> is_dicom_folder("exports/ct_abdomen")  # doctest: +SKIP
        True
    """
    path = Path(path)
    return path.is_dir() and any(_is_dicom(p) for p in _candidate_files(path))


def _read_header(path: Path) -> Dataset:
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as err:  # pydicom raises many kinds (struct.error, EOFError, KeyError...) for damaged files
        raise DataError(
            f"cannot read the DICOM file {path} ({type(err).__name__}: {err}).",
            "replace the file (export the series again) or move it out of the folder.",
        ) from None


def _series_headers(folder: str | Path) -> dict[str, list[tuple[Path, Dataset]]]:
    """SeriesInstanceUID -> (file, header without pixels) for each DICOM file of `folder`, in file-name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder.", "point at the folder that holds the series' .dcm files.")
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in filter(_is_dicom, _candidate_files(folder)):
        header = _read_header(path)
        meta = getattr(header, "file_meta", None) or {}
        if str(meta.get("MediaStorageSOPClassUID", "")) == _DIRECTORY_SOP_CLASS:
            continue
        uid = header.get("SeriesInstanceUID")
        if not uid:
            raise DataError(
                f"the DICOM file {path} has no SeriesInstanceUID, which every image file has: it is truncated "
                "or not an image.",
                "replace the file (export the series again) or move it out of the folder.",
            )
        series.setdefault(str(uid), []).append((path, header))
    return series


def dicom_series(folder: str | Path) -> dict[str, list[Path]]:
    """The DICOM files of `folder` grouped by SeriesInstanceUID (headers only, pixels are not read).

    Hidden files, subfolders and non-DICOM files are ignored, and so is a DICOMDIR index.

    Args:
        folder: a folder of DICOM files, e.g. one PACS export.

    Returns:
        SeriesInstanceUID -> the series' files, sorted by name (not yet by position).

    Raises:
        DataError: `folder` is not a folder; a DICOM file pydicom cannot read or without SeriesInstanceUID.

    Example:
        >>> {uid: len(files) for uid, files in dicom_series("exports/ct_abdomen").items()}  # doctest: +SKIP
        {'1.2.840.113619.2.55.3.604688119.969.1268071029.320': 120}
    """
    return {uid: [path for path, _ in files] for uid, files in _series_headers(folder).items()}


def _describe(uid: str, files: list[tuple[Path, Dataset]]) -> str:
    header = files[0][1]
    description = header.get("SeriesDescription") or "no SeriesDescription"
    return f"{uid} ({description!s}, {header.get('Modality') or 'no Modality'}, {len(files)} slice(s))"


def _choose_series(folder: Path, series_uid: str | None) -> list[tuple[Path, Dataset]]:
    series = _series_headers(folder)
    if not series:
        raise DataError(
            f"no DICOM files in {folder}.",
            "point at the folder that holds the slice files themselves (subfolders are not searched).",
        )
    listing = "; ".join(_describe(uid, files) for uid, files in series.items())
    if series_uid is None:
        if len(series) > 1:
            raise DataError(
                f"{folder} holds {len(series)} DICOM series: {listing}.",
                "set series_uid to the SeriesInstanceUID of the one to read, or move the other series' files "
                "into another folder.",
            )
        return next(iter(series.values()))
    if series_uid not in series:
        raise DataError(
            f"series_uid {series_uid!r} is not in {folder}, which holds {listing}.",
            "set series_uid to one of those SeriesInstanceUIDs.",
        )
    return series[series_uid]


def _spatial(path: Path, header: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(position, orientation [6], pixel spacing [row, column]) of one slice, as floats."""
    for tag in _SPATIAL_TAGS:
        if header.get(tag) is None:
            raise DataError(
                f"the DICOM file {path} has no {tag}, so its voxels cannot be placed in space.",
                "read image series that carry their geometry (CT, MR, PET slices); move localizers, screenshots "
                "and other files without it out of the folder, or choose another series with series_uid.",
            )
    frames = int(header.get("NumberOfFrames") or 1)
    if frames > 1 or int(header.get("SamplesPerPixel") or 1) != 1:
        raise DataError(
            f"the DICOM file {path} holds {frames} frame(s) of {header.get('SamplesPerPixel')} sample(s) per "
            "pixel; this reader reads series of single-frame grey-level slices.",
            "convert the file to NIfTI (e.g. with dcm2niix) and read the .nii.gz, or choose another series.",
        )
    texts = [header.get(tag) for tag in _SPATIAL_TAGS]
    try:
        values = [np.atleast_1d(np.asarray(text, dtype=np.float64)) for text in texts]
    except (TypeError, ValueError):  # a damaged decimal string
        values = []
    if [v.shape for v in values] != [(3,), (6,), (2,)]:
        found = ", ".join(f"{tag} {text!s}" for tag, text in zip(_SPATIAL_TAGS, texts))
        raise DataError(
            f"the DICOM file {path} has {found}; they need 3, 6 and 2 numbers.",
            "replace the file (export the series again) or move it out of the folder.",
        )
    return values[0], values[1], values[2]


def _check_same(files: list[Path], values: list, name: str, close) -> None:
    """All slices share one value of a tag (orientation, spacing, size) that the whole stack assumes."""
    odd = [i for i, v in enumerate(values) if not close(v, values[0])]
    if odd:
        examples = ", ".join(f"{files[i].name}: {np.asarray(values[i]).tolist()}" for i in odd[:3])
        raise DataError(
            f"{len(odd)} of {len(files)} slices of the series have a {name} different from "
            f"{np.asarray(values[0]).tolist()} ({files[0].name}), e.g. {examples}; they do not form one stack.",
            "the folder mixes stacks under one SeriesInstanceUID (a localizer, a reformat, another size): move "
            "the odd files out of the folder.",
        )


def _sorted_stack(files: list[tuple[Path, Dataset]]) -> tuple[list[Path], np.ndarray, np.ndarray, np.ndarray]:
    """The files sorted along the slice normal, their positions, the orientation and the pixel spacing."""
    paths = [path for path, _ in files]
    geometry = [_spatial(path, header) for path, header in files]
    positions, orientations, spacings = (np.stack(v) for v in zip(*geometry))
    _check_same(paths, list(orientations), "ImageOrientationPatient", lambda a, b: np.allclose(a, b, atol=1e-4))
    _check_same(paths, list(spacings), "PixelSpacing", lambda a, b: np.allclose(a, b, rtol=1e-4, atol=1e-6))
    sizes = [(int(h.get("Rows") or 0), int(h.get("Columns") or 0)) for _, h in files]
    _check_same(paths, sizes, "Rows x Columns", lambda a, b: a == b)
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    paths, positions, along = [paths[i] for i in order], positions[order], along[order]
    gaps = np.diff(along)
    same = np.flatnonzero(gaps < 1e-3)
    if same.size:
        pairs = ", ".join(f"{paths[i].name} and {paths[i + 1].name}" for i in same[:3])
        raise DataError(
            f"{same.size} pair(s) of slices lie at the same position ({along[same[0]]:.4g} mm along the slice "
            f"normal), e.g. {pairs}.",
            "remove the duplicate files (copies, or echoes / time points that share one series), keeping one "
            "slice per position.",
        )
    if gaps.size:
        median = float(np.median(gaps))
        uneven = np.flatnonzero(np.abs(gaps - median) > 0.01 * median + 1e-3)
        if uneven.size:
            i = int(uneven[0])
            raise DataError(
                f"uneven slices: slice distance {gaps[i]:.4g} mm between positions {i} and {i + 1} "
                f"({paths[i].name}, {paths[i + 1].name}) where the others are {median:.4g} mm "
                f"({uneven.size} such gap(s) in {len(paths)} slices): slices are missing or two stacks are mixed.",
                "export the complete series again (every slice), or move the files of the other stack out.",
            )
    return paths, positions, orientations[0], spacings[0]


def _pixels(path: Path) -> np.ndarray:
    """One slice [rows, columns] with the modality LUT applied (rescale slope and intercept), float32."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        dataset = pydicom.dcmread(path)
        return apply_modality_lut(dataset.pixel_array, dataset).astype(np.float32)
    except Exception as err:  # damaged data and missing decoders (JPEG 2000, JPEG-LS) raise many kinds
        raise DataError(
            f"cannot decode the pixels of the DICOM file {path} ({type(err).__name__}: {err}).",
            "replace the file (export the series again); for compressed transfer syntaxes install a decoder "
            "(pip install pylibjpeg pylibjpeg-openjpeg) or decompress the files (gdcmconv --raw).",
        ) from None


def _slice_step(header: Dataset, positions: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Patient-space step from one slice to the next: measured between positions, not from SliceThickness."""
    if len(positions) > 1:
        return (positions[-1] - positions[0]) / (len(positions) - 1)  # even gaps are checked: this is each one
    thickness = header.get("SpacingBetweenSlices") or header.get("SliceThickness") or 1.0  # nibabel's fallback
    return normal * abs(float(thickness))


def read_dicom_series(folder: str | Path, series_uid: str | None = None) -> nib.Nifti1Image:
    """Read one DICOM series as a NIfTI image: data (X = columns, Y = rows, Z = slices) float32, RAS+ affine.

    Slices are sorted by their position along the slice normal (the cross product of the row and column
    direction cosines of ImageOrientationPatient, dot ImagePositionPatient), never by file name or
    InstanceNumber. The affine is nibabel's DICOM formula with X along the row direction, turned from
    DICOM's LPS patient coordinates to RAS: columns `row cosine * column spacing`, `column cosine * row
    spacing`, the measured step between consecutive slice positions, and the first slice's position. Without
    gantry tilt that step lies on the normal; a tilted CT's positions step off it, and the affine then keeps the
    true (sheared) step, so the sform is exact and the qform (which cannot shear) is marked unknown. A single
    slice takes SpacingBetweenSlices, else SliceThickness, else 1 mm as its depth. Voxel values have the
    modality LUT applied (RescaleSlope / RescaleIntercept: CT in Hounsfield units). The header keeps the
    modality and series description in `descrip`, millimetre units and scanner-based sform/qform codes.

    Args:
        folder: a folder of DICOM slice files (subfolders are not read).
        series_uid: the SeriesInstanceUID to read when the folder holds several series.

    Raises:
        DataError: no DICOM files; several series and no `series_uid`, or an unknown one; a file pydicom cannot
            read or whose pixels it cannot decode; a slice without ImagePositionPatient,
            ImageOrientationPatient or PixelSpacing; slices with different orientation, pixel spacing or
            size; two slices at one position; uneven gaps between slices (missing slices); multi-frame or
            colour files.

    Example:
        >>> image = read_dicom_series("exports/ct_abdomen")  # doctest: +SKIP
        >>> image.shape, nibabel.aff2axcodes(image.affine)  # doctest: +SKIP
        ((512, 512, 120), ('L', 'P', 'S'))
    """
    folder = Path(folder)
    files = _choose_series(folder, series_uid)
    headers = dict(files)
    paths, positions, orientation, spacing = _sorted_stack(files)
    first = headers[paths[0]]
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    normal = np.cross(row_cosine, column_cosine)
    lps = np.eye(4)
    lps[:3, 0] = row_cosine * spacing[1]  # X steps along a row: the distance between columns
    lps[:3, 1] = column_cosine * spacing[0]
    lps[:3, 2] = _slice_step(first, positions, normal)
    lps[:3, 3] = positions[0]
    affine = _LPS_TO_RAS @ lps

    data = np.empty((int(first.Columns), int(first.Rows), len(paths)), dtype=np.float32)
    for k, path in enumerate(paths):
        pixels = _pixels(path)
        if pixels.shape != (data.shape[1], data.shape[0]):
            raise DataError(
                f"the pixels of the DICOM file {path} have shape {pixels.shape}, not its Rows x Columns "
                f"{(data.shape[1], data.shape[0])}.",
                "replace the file (export the series again) or move it out of the folder.",
            )
        data[:, :, k] = pixels.T

    image = nib.Nifti1Image(data, affine)
    sheared = np.linalg.norm(np.cross(lps[:3, 2], normal)) > 1e-4 * np.linalg.norm(lps[:3, 2])
    image.header.set_sform(affine, code="scanner")
    image.header.set_qform(affine, code="unknown" if sheared else "scanner")
    image.header.set_xyzt_units(xyz="mm")
    description = " ".join(str(first.get(tag) or "") for tag in ("Modality", "SeriesDescription")).strip()
    image.header["descrip"] = description.encode("ascii", "replace")[:80]
    return image


__all__ = ["dicom_series", "is_dicom_folder", "read_dicom_series"]
