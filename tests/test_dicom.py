"""DICOM series reader: series written by pydicom from real data (MNI152) and pydicom's own real files."""

from __future__ import annotations

import shutil
import warnings
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from hf_medmae.data.dicom import dicom_series, is_dicom_folder, read_dicom_series
from hf_medmae.errors import DataError

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS: its own inverse


def _ds(values) -> list[str]:
    return [format_number_as_ds(float(v)) for v in values]  # a DS string holds at most 16 characters


def write_series(
    folder: Path,
    stored: np.ndarray,
    affine: np.ndarray,
    slope: float = 1.0,
    intercept: float = 0.0,
    seed: int = 0,
    series_uid: str | None = None,
    suffix: str = ".dcm",
    description: str = "test series",
    thickness: float | None = None,
) -> tuple[str, list[Path]]:
    """Write stored values [X, Y, Z] int16 on a RAS affine as CT slices; names and InstanceNumbers shuffled.

    SliceThickness is `thickness`, default the distance between slices. Returns the SeriesInstanceUID and the
    files in slice order (slice k at index k).
    """
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS @ affine
    col_spacing, row_spacing = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    orientation = np.concatenate([lps[:3, 0] / col_spacing, lps[:3, 1] / row_spacing])
    rng = np.random.default_rng(seed)
    n = stored.shape[2]
    names, numbers = rng.permutation(n), rng.permutation(n) + 1
    series_uid = series_uid or generate_uid()
    study_uid, paths = generate_uid(), []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality, ds.SeriesDescription, ds.PatientID = "CT", description, "phantom"
        ds.InstanceNumber = int(numbers[k])
        ds.ImagePositionPatient = _ds(lps[:3, 3] + k * lps[:3, 2])
        ds.ImageOrientationPatient = _ds(orientation)
        ds.PixelSpacing = _ds([row_spacing, col_spacing])
        ds.SliceThickness = format_number_as_ds(float(thickness or np.linalg.norm(lps[:3, 2])))
        ds.RescaleSlope, ds.RescaleIntercept = format_number_as_ds(slope), format_number_as_ds(intercept)
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T, dtype="<i2").tobytes()  # rows = Y, columns = X
        path = folder / f"IM{names[k]:04d}{suffix}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return series_uid, paths


@pytest.fixture(scope="module")
def mni_crop() -> nib.Nifti1Image:
    """A 40 x 48 x 12 box of nilearn's MNI152 T1 template at 2 mm, int16, with its true affine."""
    path = resources.files("nilearn") / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    image = nib.load(str(path)).slicer[40:120:2, 60:156:2, 70:94:2]  # the slicer keeps the affine true
    data = np.round(np.asarray(image.dataobj, dtype=np.float64)).astype(np.int16)
    assert data.std() > 10  # brain, not background
    return nib.Nifti1Image(data, image.affine)


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    rotation = np.eye(4)
    rotation[[i, i, j, j], [i, j, i, j]] = c, -s, s, c
    return rotation


ROTATED = _rotation(0, 20) @ np.diag([0.9, 0.9, 2.5, 1.0])  # 20 degrees about X, anisotropic voxels
ROTATED[:3, 3] = -20.0, 35.0, 8.0
# a gantry-tilted CT (slices step along Y as well as Z: a sheared affine) with 0.7 x 0.6 mm pixels
TILTED = np.array([[0.7, 0, 0, -90.0], [0, 0.6, 0.8, -100], [0, 0, 3.0, -40], [0, 0, 0, 1]])
LAS = np.diag([-2.0, 2.0, 2.0, 1.0])  # radiological voxel order: slices step against the DICOM slice normal


@pytest.mark.parametrize(
    "case, slope, intercept",
    [("template", 1.0, 0.0), ("rotated", 2.0, -1024.0), ("tilted", 1.0, -1000.0)],
)
def test_round_trip_of_the_mni_template(tmp_path, mni_crop, case, slope, intercept):
    affine = {"template": mni_crop.affine, "rotated": ROTATED, "tilted": TILTED}[case]
    stored = np.asarray(mni_crop.dataobj)
    thickness = 3.0 if case == "rotated" else None  # thicker than the 2.5 mm spacing: the affine takes the spacing
    write_series(tmp_path, stored, affine, slope, intercept, thickness=thickness)
    image = read_dicom_series(tmp_path)
    assert isinstance(image, nib.Nifti1Image)
    assert image.get_data_dtype() == np.float32 and image.shape == stored.shape
    np.testing.assert_array_equal(image.get_fdata(dtype=np.float32), stored.astype(np.float64) * slope + intercept)
    np.testing.assert_allclose(image.affine, affine, atol=1e-4)
    assert nib.aff2axcodes(image.affine) == nib.aff2axcodes(affine)
    # written to disk and read back the NIfTI keeps the geometry (sform) and the units
    nib.save(image, tmp_path / "series.nii.gz")
    again = nib.load(tmp_path / "series.nii.gz")
    np.testing.assert_allclose(again.affine, affine, atol=1e-4)
    assert again.header.get_xyzt_units()[0] == "mm"
    assert bytes(again.header["descrip"]).startswith(b"CT test series")
    sheared = case == "tilted"  # a qform cannot shear: it must not claim the tilted geometry
    assert int(again.header["qform_code"]) == (0 if sheared else 1) and int(again.header["sform_code"]) == 1


def test_slices_are_sorted_by_position_not_name_or_instance_number(tmp_path, mni_crop):
    stored = np.asarray(mni_crop.dataobj)
    _, paths = write_series(tmp_path, stored, mni_crop.affine, seed=3, suffix="")
    by_name = sorted(range(len(paths)), key=lambda k: paths[k].name)
    by_number = sorted(range(len(paths)), key=lambda k: pydicom.dcmread(paths[k]).InstanceNumber)
    assert by_name != list(range(len(paths))) and by_number != list(range(len(paths)))  # the test can fail
    assert is_dicom_folder(tmp_path)  # files without the .dcm suffix
    image = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(image.get_fdata(), stored)


def test_slices_stepping_against_the_normal_come_back_reversed_on_the_same_grid(tmp_path, mni_crop):
    stored = np.asarray(mni_crop.dataobj)
    write_series(tmp_path, stored, LAS)
    image = read_dicom_series(tmp_path)
    flip_z = np.diag([1.0, 1.0, -1.0, 1.0])
    flip_z[2, 3] = stored.shape[2] - 1
    np.testing.assert_array_equal(image.get_fdata(), stored[:, :, ::-1])
    np.testing.assert_allclose(image.affine, LAS @ flip_z, atol=1e-4)  # every voxel keeps its place in space


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_pydicom_real_files(tmp_path, name):
    source = Path(get_testdata_file(name))
    shutil.copy(source, tmp_path / "slice")
    other = "MR_small.dcm" if name == "CT_small.dcm" else "CT_small.dcm"
    shutil.copy(get_testdata_file(other), tmp_path / ".other")  # another series, hidden: ignored
    (tmp_path / "notes.txt").write_text("not DICOM")
    ds = pydicom.dcmread(source)
    image = read_dicom_series(tmp_path)
    expected = apply_modality_lut(ds.pixel_array, ds).T
    assert image.shape == (ds.Columns, ds.Rows, 1)
    np.testing.assert_array_equal(image.get_fdata()[:, :, 0], expected)
    sizes = nib.affines.voxel_sizes(image.affine)
    np.testing.assert_allclose(sizes[:2], [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])])
    np.testing.assert_allclose(sizes[2], float(ds.get("SpacingBetweenSlices") or ds.SliceThickness))
    # nibabel's own DICOM wrapper indexes (row, column) in LPS: the same geometry with the first two axes swapped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel.nicom warns that its readers are experimental
        from nibabel.nicom.dicomwrappers import wrapper_from_data

        nibabel_lps = wrapper_from_data(ds).affine
    ours_lps = LPS @ image.affine
    np.testing.assert_allclose(ours_lps[:3, [1, 0, 3]], nibabel_lps[:3, [0, 1, 3]], atol=1e-5)


def test_ct_small_is_in_hounsfield_units(tmp_path):
    source = Path(get_testdata_file("CT_small.dcm"))
    shutil.copy(source, tmp_path / "ct.dcm")
    ds = pydicom.dcmread(source)
    assert float(ds.RescaleIntercept) == -1024  # so the test below sees the rescale
    values = read_dicom_series(tmp_path).get_fdata()[:, :, 0]
    np.testing.assert_array_equal(values, ds.pixel_array.T.astype(np.float64) - 1024)


def test_two_series_need_series_uid(tmp_path, mni_crop):
    stored = np.asarray(mni_crop.dataobj)
    uid_a, _ = write_series(tmp_path, stored, mni_crop.affine, description="brain")
    uid_b, _ = write_series(tmp_path / "b", stored[:, :, :5], ROTATED, slope=2.0, description="rotated")
    for path in (tmp_path / "b").iterdir():
        path.rename(tmp_path / f"b_{path.name}")
    assert {uid: len(files) for uid, files in dicom_series(tmp_path).items()} == {uid_a: 12, uid_b: 5}
    with pytest.raises(DataError) as err:
        read_dicom_series(tmp_path)
    message = str(err.value)
    assert uid_a in message and uid_b in message and "series_uid" in message
    assert "brain" in message and "12 slice" in message and "5 slice" in message
    image = read_dicom_series(tmp_path, series_uid=uid_b)
    np.testing.assert_array_equal(image.get_fdata(), stored[:, :, :5] * 2.0)
    np.testing.assert_allclose(image.affine, ROTATED, atol=1e-4)
    with pytest.raises(DataError, match=uid_a):
        read_dicom_series(tmp_path, series_uid="1.2.3.4")


def test_a_missing_slice_is_named(tmp_path, mni_crop):
    _, paths = write_series(tmp_path, np.asarray(mni_crop.dataobj), mni_crop.affine)
    paths[6].unlink()
    with pytest.raises(DataError, match=r"slice distance 4 mm between positions 5 and 6") as err:
        read_dicom_series(tmp_path)
    message = str(err.value)
    assert "where the others are 2 mm" in message and paths[5].name in message and paths[7].name in message


def test_a_duplicate_slice_is_named(tmp_path, mni_crop):
    _, paths = write_series(tmp_path, np.asarray(mni_crop.dataobj), mni_crop.affine)
    shutil.copy(paths[3], tmp_path / "copy.dcm")
    with pytest.raises(DataError, match="same position") as err:
        read_dicom_series(tmp_path)
    assert "copy.dcm" in str(err.value) and paths[3].name in str(err.value)


@pytest.mark.parametrize("keep", ["half", 300])
def test_a_truncated_file_is_named(tmp_path, mni_crop, keep):
    _, paths = write_series(tmp_path, np.asarray(mni_crop.dataobj), mni_crop.affine)
    raw = paths[4].read_bytes()
    paths[4].write_bytes(raw[: len(raw) // 2 if keep == "half" else keep])
    # half a file keeps the header and cuts the pixels; 300 bytes keep the file meta and cut the header
    expected = "cannot decode the pixels" if keep == "half" else "has no SeriesInstanceUID"
    with pytest.raises(DataError, match=expected) as err:
        read_dicom_series(tmp_path)
    assert str(paths[4]) in str(err.value)


def test_mixed_orientation_and_missing_geometry_are_named(tmp_path, mni_crop):
    stored = np.asarray(mni_crop.dataobj)
    _, paths = write_series(tmp_path, stored, mni_crop.affine, series_uid=(uid := generate_uid()))
    _, (odd,) = write_series(tmp_path / "r", stored[:, :, :1], ROTATED, series_uid=uid)
    odd.rename(tmp_path / "odd.dcm")
    with pytest.raises(DataError, match="ImageOrientationPatient") as err:
        read_dicom_series(tmp_path)
    assert "odd.dcm" in str(err.value)
    (tmp_path / "odd.dcm").unlink()
    ds = pydicom.dcmread(paths[2])
    del ds.PixelSpacing
    ds.save_as(paths[2])
    with pytest.raises(DataError, match=f"{paths[2].name} has no PixelSpacing"):
        read_dicom_series(tmp_path)


def test_folders_without_dicom(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "sub" / "ct.dcm")  # subfolders are not read
    assert not is_dicom_folder(tmp_path) and not is_dicom_folder(tmp_path / "a.txt")
    assert is_dicom_folder(tmp_path / "sub")
    with pytest.raises(DataError, match="no DICOM files"):
        read_dicom_series(tmp_path)
