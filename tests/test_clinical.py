"""Clinical volumes as they arrive: a folder mixing a DICOM series and NIfTI files at other spacings and orientations
pre-trains and segments in one command each, and predictions come back in each scan's own geometry.

The volumes are the real MNI152 template blocks that nilearn ships (`embedded:mni152`, 2 mm), written with their
true geometry as a DICOM series, as NRRD at 2 mm (LPS space, as 3D Slicer writes it), as NIfTI at 4 mm slices
(resampled) and stored LPS.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from test_3d import MAE_ARGS, SEG_ARGS
from test_dicom import write_series
from test_geometry import write_nrrd

from hf_medmae.data.embedded import mni152
from hf_medmae.data.geometry import Geometry, Grid, to_grid
from hf_medmae.data.volumes import load_volume, normaliser
from hf_medmae.errors import DataError
from hf_medmae.segmentation.inference import load_segmenter, predict_volumes, volume_grid
from hf_medmae.tasks import pretrain, segment

pytestmark = pytest.mark.slow
TWO_MM = np.diag([2.0, 2.0, 2.0, 1.0])


def nifti(path, array_dhw, affine):
    nib.save(nib.Nifti1Image(np.ascontiguousarray(np.asarray(array_dhw).T), affine), str(path))


def lps(array_dhw, affine):
    """The same scan stored with x and y running the other way (L, P): flipped data, matching affine."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [array_dhw.shape[-1] - 1, array_dhw.shape[-2] - 1]
    return np.ascontiguousarray(array_dhw[..., ::-1, ::-1]), affine @ flip


@pytest.fixture(scope="module")
def clinical(tmp_path_factory):
    """A folder of 4 labelled cases: a DICOM series, NRRD at 2 mm, NIfTI at 4 mm slices, NIfTI stored LPS."""
    folder = tmp_path_factory.mktemp("clinical")
    volumes, labels, _ = mni152()
    write_series(folder / "ct_series", np.round(volumes[0][0]).astype(np.int16).T, TWO_MM, slope=1.0)
    nifti(folder / "ct_series_label.nii.gz", labels[0].astype(np.float32), TWO_MM)
    write_nrrd(folder / "b_slicer.nrrd", volumes[1], TWO_MM)  # as 3D Slicer writes it: LPS space
    write_nrrd(folder / "b_slicer_label.nrrd", labels[1][None].astype(np.uint8), TWO_MM)
    thick, geometry = to_grid(volumes[2], Geometry(TWO_MM, volumes[2].shape[1:]), Grid("RAS", (4.0, 2.0, 2.0)))
    thick_labels, _ = to_grid(labels[2], Geometry(TWO_MM, labels[2].shape), Grid("RAS", (4.0, 2.0, 2.0)))
    nifti(folder / "c_thick.nii.gz", thick[0], geometry.affine)
    nifti(folder / "c_thick_label.nii.gz", thick_labels.astype(np.float32), geometry.affine)
    d, affine = lps(volumes[3][0], TWO_MM)
    nifti(folder / "d_lps.nii.gz", d, affine)
    nifti(folder / "d_lps_label.nii.gz", lps(labels[3].astype(np.float32), TWO_MM)[0], affine)
    return folder


def test_a_mixed_clinical_folder_pretrains_in_one_command(clinical, tmp_path, one_thread):
    out = tmp_path / "mae"
    ct = ["--intensity", "ct", "--foreground_threshold", "100"]  # no labels: the foreground is above a threshold
    metrics = pretrain.main(
        [*MAE_ARGS, *ct, "--train_data", str(clinical), "--output_dir", str(out), "--max_steps", "2"]
    )
    assert metrics["voxel_grid"] == {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0]}  # the median spacing
    stored = metrics["volumes"]
    assert sorted(stored) == ["b_slicer.nrrd", "c_thick.nii.gz", "ct_series", "d_lps.nii.gz"]
    assert stored["b_slicer.nrrd"]["spacing"] == [2.0, 2.0, 2.0]
    assert stored["c_thick.nii.gz"]["spacing"] == [4.0, 2.0, 2.0] and stored["d_lps.nii.gz"]["orientation"] == "LPS"
    assert stored["ct_series"]["spacing"] == [2.0, 2.0, 2.0] and stored["ct_series"]["orientation"] == "RAS"
    config = json.loads((out / "config.json").read_text())
    assert config["voxel_grid"]["spacing"] == [2.0, 2.0, 2.0]
    assert config["normalisation"]["intensity_statistics"]["foreground"] == "threshold"


@pytest.fixture(scope="module")
def segmenter(clinical, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg") / "run"
    args = [
        *SEG_ARGS,
        "--model",
        "unet",
        "--init",
        "scratch",
        "--unet_features",
        "[4, 4, 8, 8, 16, 4]",
        "--train_data",
        str(clinical),
        "--output_dir",
        str(out),
        "--intensity",
        "ct",
    ]
    metrics = segment.main([*args, "--class_map", "{0: 0, 1: 1, others: 0}", "--class_names", "[bg, grey]"])
    return out, metrics


def test_a_mixed_clinical_folder_segments_in_one_command(segmenter):
    out, metrics = segmenter
    assert metrics["voxel_grid"]["spacing"] == [2.0, 2.0, 2.0] and len(metrics["volumes"]) == 4
    info = json.loads((out / "inference_config.json").read_text())
    assert info["voxel_grid"] == metrics["voxel_grid"] and info["class_map"]["others"] == 0
    # CT normalisation: statistics of the labelled voxels of the training volumes, carried to prediction
    stats = info["intensity_statistics"]
    assert info["intensity"] == "ct" and stats == metrics["normalisation"]["intensity_statistics"]
    assert stats["foreground"] == "labels" and stats["clip"][0][0] < stats["mean"][0] < stats["clip"][0][1]
    assert json.loads((out / "config.json").read_text())["normalisation"] == metrics["normalisation"]
    test = json.loads((out / "test_metrics.json").read_text())  # surface distances in mm: the volumes store spacing
    assert test["surface_tolerance_mm"] == 1.0 and 0.0 <= test["mean_surface_dice"] <= 1.0
    assert set(test["surface_dice_per_class"]) <= {"bg", "grey"}


def _rotated(volume_dhw: np.ndarray, degrees: float, spacing_dhw) -> tuple[np.ndarray, np.ndarray]:
    """A scan with anisotropic voxels and an oblique affine (rotated about the S axis)."""
    t = np.deg2rad(degrees)
    rotation = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing_dhw[::-1])
    affine[:3, 3] = [-40, 30, -10]
    return volume_dhw, affine


@pytest.mark.parametrize("case", ["lps_at_target_spacing", "oblique_anisotropic"])
def test_predictions_come_back_in_the_scans_geometry(segmenter, tmp_path, case, one_thread):
    out, _ = segmenter
    volume = mni152()[0][1][0]
    if case == "lps_at_target_spacing":
        stored, affine = lps(volume, TWO_MM)
    else:
        stored, affine = _rotated(volume[::2], 15.0, (4.0, 2.0, 2.0))
    nifti(tmp_path / "scan.nii.gz", stored, affine)
    segment.main(
        [
            "--spatial_dims",
            "3",
            "--predict_only",
            "true",
            "--model_name_or_path",
            str(out),
            "--predict_volumes",
            str(tmp_path / "scan.nii.gz"),
            "--output_dir",
            str(tmp_path / "pred"),
        ]
    )
    written = nib.load(str(tmp_path / "pred" / "scan_labels.nii.gz"))
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    assert written.shape == stored.T.shape
    # the prediction the model makes on its own grid, and the written label map brought onto that grid
    model, info, _ = load_segmenter(out)
    grid = volume_grid(info)
    on_grid, model_geometry = load_volume(tmp_path / "scan.nii.gz", grid)
    normalised = normaliser(info)(on_grid)
    direct = predict_volumes(model, [normalised], info["roi_size"])[0]
    back, _ = to_grid(np.asarray(written.dataobj).T.astype(np.int64), Geometry(written.affine, stored.shape), grid)
    assert back.shape == direct.shape
    agreement = float(np.mean(back == direct))
    if case == "lps_at_target_spacing":
        assert agreement == 1.0  # reorienting is a permutation: nothing is interpolated either way
    else:
        assert agreement >= 0.95, agreement


def test_a_tiff_volume_cannot_be_resampled_to_millimetres(segmenter, tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "x.tif", np.ones((20, 32, 32), np.uint16))
    with pytest.raises(DataError, match="no voxel spacing|without a stored voxel spacing"):
        segment.main(
            [
                "--spatial_dims",
                "3",
                "--predict_only",
                "true",
                "--model_name_or_path",
                str(segmenter[0]),
                "--predict_volumes",
                str(tmp_path / "x.tif"),
                "--output_dir",
                str(tmp_path / "pred"),
            ]
        )
