"""Voxel geometry: canonical orientation, resampling to a target spacing and back, label grids, channel files.

Arrays here are generated only for geometry unit tests; the round trip runs on the real MNI152 tissue maps.
"""

from __future__ import annotations

from importlib import resources

import nibabel as nib
import numpy as np
import pytest

from hf_medmae.data.geometry import Geometry, Grid, plan_spacing, to_grid, to_original
from hf_medmae.data.volumes import load_volume, load_volumes, read_geometry
from hf_medmae.errors import ConfigError, DataError


def write(path, array_dhw, affine):
    """A NIfTI file of a [D, H, W] array (stored as (X, Y, Z) = (W, H, D))."""
    nib.save(nib.Nifti1Image(np.ascontiguousarray(np.asarray(array_dhw).T), affine), str(path))


def blob(shape=(12, 20, 16), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(np.float32)


def test_reorienting_to_ras_permutes_and_flips_without_interpolation(tmp_path):
    data = blob()
    ras = np.diag([1.5, 1.0, 3.0, 1.0])
    ras[:3, 3] = [-10, 20, 5]
    write(tmp_path / "ras.nii.gz", data, ras)
    # the same scan stored LPI and with i/j swapped: x runs left, the first stored axis is the y axis
    flipped = data[::-1, ::-1, ::-1].transpose(0, 2, 1)  # [D, H, W] of the stored (j, i) swap
    shape_xyz = np.array(data.shape[::-1])
    stored = ras @ np.array(
        [[0, -1, 0, shape_xyz[0] - 1], [-1, 0, 0, shape_xyz[1] - 1], [0, 0, -1, shape_xyz[2] - 1], [0, 0, 0, 1]]
    )
    write(tmp_path / "lpi.nii.gz", flipped, stored)
    assert read_geometry(tmp_path / "lpi.nii.gz").orientation == "PLI"
    canonical, geometry = load_volume(tmp_path / "lpi.nii.gz", Grid("RAS"))
    np.testing.assert_array_equal(canonical[0], data)
    np.testing.assert_allclose(geometry.affine, ras, atol=1e-6)
    assert geometry.orientation == "RAS" and geometry.spacing == (3.0, 1.0, 1.5)


def test_target_spacing_resamples_images_linearly_and_labels_to_class_ids(tmp_path):
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    labels = np.zeros((10, 16, 16), np.int64)
    labels[3:7, 4:12, 4:12] = 2
    write(tmp_path / "a.nii.gz", blob((10, 16, 16)), affine)
    write(tmp_path / "a_label.nii.gz", labels.astype(np.float32), affine)
    vs = load_volumes(str(tmp_path), target_spacing=[2.0, 2.0, 2.0])
    assert vs.grid.spacing == (2.0, 2.0, 2.0)
    assert vs.images[0].shape == (1, 19, 16, 16) and vs.labels[0].shape == (19, 16, 16)
    assert set(np.unique(vs.labels[0])) == {0, 2}  # nearest: no blended class values
    assert vs.geometry[0].spacing == (4.0, 2.0, 2.0)  # the stored geometry is kept beside the resampled voxels
    cubic = load_volumes(str(tmp_path), target_spacing=[2.0, 2.0, 2.0], interpolation="cubic")
    assert cubic.images[0].shape == vs.images[0].shape and not np.allclose(cubic.images[0], vs.images[0])
    np.testing.assert_array_equal(cubic.labels[0], vs.labels[0])  # labels: nearest whatever the image's order


def test_label_maps_survive_a_round_trip_to_the_target_spacing_and_back():
    """Real data: the MNI152 grey / white matter maps nilearn ships (1 mm), to 2 mm slices (as a CT series at
    0.98 x 0.98 x 2 mm) and back; the grey matter ribbon is 2-3 mm thick, so coarser grids lose more of it."""
    folder = resources.files("nilearn") / "datasets" / "data"
    maps = [nib.load(str(folder / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz")) for k in ("gm", "wm")]
    gm, wm = (m.get_fdata(dtype=np.float32).T / 255.0 for m in maps)
    labels = np.argmax(np.stack([1.0 - gm - wm, gm, wm]), axis=0).astype(np.int64)  # as embedded.mni152 does
    original = Geometry(maps[0].affine, labels.shape)
    model_labels, model = to_grid(labels, original, Grid("RAS", (2.0, 1.0, 1.0)))
    assert model.spacing == (2.0, 1.0, 1.0) and model_labels.shape[0] < labels.shape[0] / 1.9
    back = to_original(model_labels, model, original)
    assert back.shape == labels.shape
    for c in (1, 2):
        dice = 2 * np.sum((back == c) & (labels == c)) / (np.sum(back == c) + np.sum(labels == c))
        assert dice >= 0.95, (c, dice)


def test_median_spacing_is_planned_per_axis_after_reorientation():
    lps = np.diag([-0.7, -0.7, 5.0, 1.0])  # L and P flipped: spacing is unchanged by the flip
    geometries = [Geometry(np.diag([0.9, 0.9, 1.0, 1.0]), (8, 8, 8)), Geometry(lps, (8, 8, 8))]
    geometries.append(Geometry(np.diag([0.8, 0.8, 3.0, 1.0]), (8, 8, 8)))
    assert plan_spacing(geometries, "median") == (3.0, 0.8, 0.8)
    assert plan_spacing(geometries, None) is None
    assert plan_spacing([Geometry.unknown((4, 4, 4))] * 2, "median") is None  # TIFF / .npy: voxels kept
    with pytest.raises(DataError, match="store no voxel spacing"):
        plan_spacing([geometries[0], Geometry.unknown((4, 4, 4))], "median")
    with pytest.raises(ConfigError, match="three positive"):
        plan_spacing(geometries, [1.0, 0.0, 1.0])


def test_a_label_with_the_shape_but_not_the_affine_of_its_volume_is_a_named_error(tmp_path):
    write(tmp_path / "a.nii.gz", blob(), np.diag([1.0, 1.0, 2.0, 1.0]))
    shifted = np.diag([1.0, 1.0, 2.0, 1.0])
    shifted[:3, 3] = [0, 0, 30]
    write(tmp_path / "a_label.nii.gz", np.zeros((12, 20, 16), np.float32), shifted)
    with pytest.raises(DataError, match=r"a.nii.gz: its label has the volume's shape but another affine.*origin"):
        load_volumes(str(tmp_path))


def test_nnunet_channel_files_are_one_case_each(tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    for case in ("BRATS_001", "BRATS_002"):
        for channel in range(3):
            write(tmp_path / f"{case}_{channel:04d}.nii.gz", blob(seed=channel) + channel, affine)
        write(tmp_path / f"{case}_label.nii.gz", np.zeros((12, 20, 16), np.float32), affine)
    vs = load_volumes(str(tmp_path))
    assert vs.names == ["BRATS_001.nii.gz", "BRATS_002.nii.gz"] and vs.channels == 3
    np.testing.assert_allclose(vs.images[0][2], blob(seed=2) + 2, rtol=1e-6)
    assert vs.labels is not None and len(vs.labels) == 2


def test_channel_files_must_agree(tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    for case in ("A", "B"):
        write(tmp_path / f"{case}_0000.nii.gz", blob(), affine)
    write(tmp_path / "A_0001.nii.gz", blob(), affine)
    with pytest.raises(DataError, match="different channel files"):
        load_volumes(str(tmp_path))
    write(tmp_path / "B_0001.nii.gz", blob(), np.diag([1.0, 1.0, 3.0, 1.0]))  # another grid than B_0000
    with pytest.raises(DataError, match="B_0001.nii.gz: its channel has the volume's shape but another affine"):
        load_volumes(str(tmp_path))


def test_numbered_scans_stay_single_volumes(tmp_path):
    for i in range(3):
        write(tmp_path / f"scan_{i:04d}.nii.gz", blob(seed=i), np.eye(4))
    assert load_volumes(str(tmp_path)).names == [f"scan_{i:04d}.nii.gz" for i in range(3)]


def write_nrrd(path, array_cdhw, affine_ras, space="left-posterior-superior"):
    """An NRRD file as 3D Slicer writes it: (X, Y, Z) in `space`; several channels on a leading vector axis."""
    import nrrd

    flip = {"left-posterior-superior": np.diag([-1.0, -1.0, 1.0, 1.0]), "right-anterior-superior": np.eye(4)}[space]
    affine = flip @ affine_ras
    data = np.asarray(array_cdhw).transpose(0, 3, 2, 1)  # [C, X, Y, Z]
    directions = affine[:3, :3].T
    header = {"space": space, "space origin": affine[:3, 3]}
    if data.shape[0] == 1:
        data, header["space directions"] = data[0], directions
    else:
        header["space directions"] = np.vstack([np.full(3, np.nan), directions])
        header["kinds"] = ["vector", "domain", "domain", "domain"]
    nrrd.write(str(path), np.ascontiguousarray(data), header)


def test_nrrd_volumes_read_as_their_nifti_twins(tmp_path):
    data = blob()
    affine = np.array([[0, -1.5, 0, 30.0], [1.0, 0, 0, -20.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])
    write(tmp_path / "a.nii.gz", data, affine)
    write_nrrd(tmp_path / "b.nrrd", data[None], affine)
    (nifti, g_nifti), (nrrd_volume, g_nrrd) = (load_volume(tmp_path / n, Grid("RAS")) for n in ("a.nii.gz", "b.nrrd"))
    np.testing.assert_array_equal(nrrd_volume, nifti)
    np.testing.assert_allclose(g_nrrd.affine, g_nifti.affine, atol=1e-9)
    np.testing.assert_allclose(read_geometry(tmp_path / "b.nrrd").affine, affine, atol=1e-9)
    two = np.stack([data, 2 * data])  # a vector NRRD: its non-spatial axis holds the channels
    write_nrrd(tmp_path / "c.nrrd", two, affine, space="right-anterior-superior")
    volume, geometry = load_volume(tmp_path / "c.nrrd")
    np.testing.assert_array_equal(volume, two)
    np.testing.assert_allclose(geometry.affine, affine)


def test_a_broken_nrrd_is_named(tmp_path):
    write_nrrd(tmp_path / "a.nrrd", blob()[None], np.eye(4))
    (tmp_path / "a.nrrd").write_bytes((tmp_path / "a.nrrd").read_bytes()[:200])
    with pytest.raises(DataError, match=r"cannot read volume .*a\.nrrd"):
        load_volume(tmp_path / "a.nrrd")
