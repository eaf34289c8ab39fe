"""The 3D data layer: readers, label matching, intensity modes, seeded crops, datasets and the embedded volumes."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from hf_medmae.data.crops import CropAugment, CropDataset, sliding_crops
from hf_medmae.data.image_set import ImageSet, LazyFiles
from hf_medmae.data.segmentation import class_mapping, map_labels, parse_class_map, read_label
from hf_medmae.data.transforms import foreground_statistics, normalise_intensity
from hf_medmae.data.volumes import (
    VolumeDataArguments,
    load_volumes,
    normalise_volumes,
    read_volume,
    volume_classes,
)
from hf_medmae.errors import ConfigError, DataError
from hf_medmae.plots import orthogonal_slices
from hf_medmae.segmentation.inference import score_predictions


def ramp(d=6, h=7, w=8) -> np.ndarray:
    """[D, H, W] whose value encodes the position: 100*z + 10*y + x (every axis distinguishable)."""
    z, y, x = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    return (100 * z + 10 * y + x).astype(np.float32)


def save_nifti(path, dhw: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(np.ascontiguousarray(dhw.T), np.eye(4)), str(path))  # [D, H, W] -> (X, Y, Z)


@pytest.fixture(scope="module")
def nuclei():
    return load_volumes("embedded:nuclei3d")


@pytest.fixture(scope="module")
def mni():
    return load_volumes("embedded:mni152")


# --- readers -----------------------------------------------------------------------------------------------------


def test_nifti_depth_is_the_z_axis(tmp_path):
    volume = ramp()
    save_nifti(tmp_path / "a.nii.gz", volume)
    data = nib.load(str(tmp_path / "a.nii.gz")).get_fdata()
    assert data.shape == (8, 7, 6) and data[1, 2, 3] == 100 * 3 + 10 * 2 + 1  # stored (X, Y, Z)
    read = read_volume(tmp_path / "a.nii.gz")
    assert read.shape == (1, 6, 7, 8) and read.dtype == np.float32
    np.testing.assert_array_equal(read[0], volume)  # [C, D=Z, H=Y, W=X]


def test_nifti_4d_channels(tmp_path):
    two = np.stack([ramp(), -ramp()])  # [C, D, H, W]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(two.transpose(3, 2, 1, 0)), np.eye(4)), str(tmp_path / "b.nii"))
    np.testing.assert_array_equal(read_volume(tmp_path / "b.nii"), two)


def test_tiff_pages_are_depth(tmp_path):
    tifffile.imwrite(tmp_path / "z.tif", ramp().astype(np.uint16))
    read = read_volume(tmp_path / "z.tif")
    assert read.shape == (1, 6, 7, 8)
    np.testing.assert_array_equal(read[0], ramp())


def test_tiff_4d_and_imagej_hyperstack(tmp_path):
    dchw = np.stack([ramp(), ramp() + 1000], axis=1).astype(np.uint16)  # [D=6, C=2, H, W]
    tifffile.imwrite(tmp_path / "p.tif", dchw)  # plain [P, C, H, W]
    tifffile.imwrite(tmp_path / "ij.tif", dchw, imagej=True, metadata={"axes": "ZCYX"})
    for name in ("p.tif", "ij.tif"):
        read = read_volume(tmp_path / name)
        assert read.shape == (2, 6, 7, 8), name
        np.testing.assert_array_equal(read[1], ramp() + 1000)


def test_npy_volume_and_5d_stack_with_labels(tmp_path):
    np.save(tmp_path / "one.npy", ramp())
    assert read_volume(tmp_path / "one.npy").shape == (1, 6, 7, 8)
    stack = np.random.default_rng(0).random((3, 2, 4, 5, 6)).astype(np.float32)
    np.save(tmp_path / "set.npy", stack)
    np.save(tmp_path / "set_labels.npy", (stack[:, 0] > 0.5).astype(np.uint8))
    vs = load_volumes(str(tmp_path / "set.npy"))
    assert len(vs) == 3 and vs.channels == 2 and vs.names[1] == "set.npy[1]"
    assert vs.images[0].shape == (2, 4, 5, 6) and vs.labels[2].dtype == np.int64
    np.testing.assert_array_equal(vs.labels[1], stack[1, 0] > 0.5)


def test_folder_with_labels_matches_pattern(tmp_path):
    for name in ("a", "b"):
        save_nifti(tmp_path / f"{name}.nii.gz", ramp())
        save_nifti(tmp_path / f"{name}_label.nii.gz", (ramp() > 300).astype(np.float32))
    vs = load_volumes(str(tmp_path))
    assert vs.names == ["a.nii.gz", "b.nii.gz"]  # label files are never images
    np.testing.assert_array_equal(vs.labels[0], ramp() > 300)
    assert load_volumes(str(tmp_path), max_volumes=1).names == ["a.nii.gz"]


def test_folder_without_labels(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", ramp().astype(np.uint16))
    vs = load_volumes(str(tmp_path))
    assert vs.labels is None and vs.subset([0]).names == ["a.tif"]


def test_missing_label_lists_files(tmp_path):
    for name in ("a", "b", "c"):
        save_nifti(tmp_path / f"{name}.nii.gz", ramp())
    save_nifti(tmp_path / "a_label.nii.gz", ramp() * 0)
    with pytest.raises(DataError, match=r"2 volume\(s\) have no label.*b_label.nii.gz.*c_label.nii.gz") as err:
        load_volumes(str(tmp_path))
    assert "label_pattern" in err.value.fix
    with pytest.raises(DataError, match="has no label"):
        load_volumes(str(tmp_path / "a.nii.gz"), label_dir=str(tmp_path / "labels"))


def test_label_shape_must_match(tmp_path):
    save_nifti(tmp_path / "a.nii.gz", ramp())
    save_nifti(tmp_path / "a_label.nii.gz", np.zeros((6, 7, 9), np.float32))
    with pytest.raises(DataError, match=r"\(6, 7, 8\).*\(6, 7, 9\)") as err:
        load_volumes(str(tmp_path))
    assert "voxel grid" in err.value.fix


def test_corrupt_unknown_and_2d_files(tmp_path):
    save_nifti(tmp_path / "good.nii.gz", ramp())
    (tmp_path / "bad.nii.gz").write_bytes((tmp_path / "good.nii.gz").read_bytes()[:200])  # truncated
    (tmp_path / "junk.nii.gz").write_bytes(gzip.compress(b"not a nifti header" * 30))
    (tmp_path / "bad.tif").write_bytes(b"II*\x00" + bytes(60))
    np.save(tmp_path / "bad.npy", ramp())
    (tmp_path / "bad.npy").write_bytes((tmp_path / "bad.npy").read_bytes()[:100])
    for name in ("bad.nii.gz", "junk.nii.gz", "bad.npy"):
        with pytest.raises(DataError, match=f"cannot read volume .*{name}") as err:
            read_volume(tmp_path / name)
        assert "replace the file" in err.value.fix
    with pytest.raises(DataError, match="not a volume file") as err:
        read_volume(tmp_path / "a.png")
    assert ".nii.gz" in err.value.fix
    with pytest.raises(DataError, match="without images"):
        read_volume(tmp_path / "bad.tif")
    tifffile.imwrite(tmp_path / "flat.tif", ramp()[0].astype(np.uint16))
    save_nifti(tmp_path / "flat.nii", ramp()[:1])
    for name in ("flat.tif", "flat.nii"):
        with pytest.raises(DataError, match="2-D image") as err:
            read_volume(tmp_path / name)
        assert "2D" in err.value.fix or "z-stack" in err.value.fix


def test_unknown_source_and_mixed_channels():
    with pytest.raises(DataError, match="unknown embedded volume set"):
        load_volumes("embedded:nope")
    with pytest.raises(DataError, match="neither a folder"):
        load_volumes("/no/such/place")
    mixed = ImageSet([np.zeros((1, 2, 2, 2)), np.zeros((2, 2, 2, 2))], None, ["a", "b"])
    with pytest.raises(DataError, match="channel counts"):
        _ = mixed.channels


# --- intensity ---------------------------------------------------------------------------------------------------


def test_zscore_over_foreground():
    rng = np.random.default_rng(0)
    volume = np.zeros((2, 8, 8, 8), np.float32)
    volume[:, 2:6, 2:6, 2:6] = rng.normal(50, 5, (2, 4, 4, 4))
    out = normalise_intensity(volume, "zscore", foreground_threshold=0)
    for c in range(2):
        fg = out[c][volume[c] > 0]
        assert abs(fg.mean()) < 1e-5 and abs(fg.std() - 1) < 1e-4
    whole = normalise_intensity(volume)
    assert abs(whole.mean()) < 1e-5 and abs(whole.std() - 1) < 1e-4
    assert np.isfinite(normalise_intensity(np.ones((1, 2, 2, 2)))).all()  # constant volume: std floor


def test_ct_window_and_percentile():
    hu = np.linspace(-2000, 2000, 2 * 4 * 5 * 5, dtype=np.float32).reshape(2, 4, 5, 5)
    ct = normalise_intensity(hu, "ct_window", window=(-1000, 400))
    assert ct.min() == 0.0 and ct.max() == 1.0
    assert (ct[hu <= -1000] == 0).all() and (ct[hu >= 400] == 1).all()
    inside = (hu > -1000) & (hu < 400)
    np.testing.assert_allclose(ct[inside], (hu[inside] + 1000) / 1400, rtol=1e-5)
    with pytest.raises(ConfigError, match="needs window"):
        normalise_intensity(hu, "ct_window")
    volume = np.random.default_rng(1).normal(0, 1, (2, 10, 10, 10)).astype(np.float32)
    volume[1] *= 100
    out = normalise_intensity(volume, "percentile", percentiles=(1, 99))
    for c in range(2):
        assert out[c].min() == 0.0 and out[c].max() == 1.0
        assert np.mean(out[c] == 1.0) == pytest.approx(0.01, abs=0.002)  # the top 1% are clipped
    assert normalise_intensity(volume, "none") is volume
    with pytest.raises(ConfigError, match="zscore"):
        normalise_intensity(volume, "minmax")


def ct_case(seed: int, organ_hu: float) -> tuple[np.ndarray, np.ndarray]:
    """A generated CT-like volume in HU (air -1000, body 0 +- 30, an organ at `organ_hu`) and its label."""
    rng = np.random.default_rng(seed)
    hu = np.full((1, 8, 12, 12), -1000.0, np.float32)
    hu[:, :, 2:10, 2:10] = rng.normal(0, 30, (8, 8, 8))
    label = np.zeros((8, 12, 12), np.int64)
    label[2:6, 4:8, 4:8] = 1
    hu[0][label == 1] = rng.normal(organ_hu, 10, int(label.sum()))
    return hu, label


def test_ct_statistics_come_from_the_labelled_foreground_of_the_training_volumes():
    cases = [ct_case(s, 60.0) for s in range(3)]
    images, labels = [c[0] for c in cases], [c[1] for c in cases]
    labels[0][0, 0, 0] = 255  # unlabelled voxels are not foreground
    stats = foreground_statistics(images, labels, ignore_index=255)
    organ = np.concatenate([im[0][lb == 1] for im, lb in zip(images, labels)])
    assert stats["foreground"] == "labels"
    assert stats["mean"][0] == pytest.approx(organ.mean(), abs=1e-3) and stats["std"][0] == pytest.approx(organ.std())
    low, high = stats["clip"][0]
    assert low == pytest.approx(np.percentile(organ, 0.5)) and high == pytest.approx(np.percentile(organ, 99.5))
    body = foreground_statistics(images, foreground_threshold=-500)  # no labels (pre-training): voxels above -500 HU
    assert body["foreground"] == "threshold" and -20 < body["mean"][0] < 60
    out = normalise_intensity(images[0], "ct", statistics=stats)
    assert out.min() == pytest.approx((low - stats["mean"][0]) / stats["std"][0])  # air is clipped, not -1000 HU
    assert abs(out[0][labels[0] == 1].mean()) < 0.5
    with pytest.raises(ConfigError, match="foreground statistics"):
        normalise_intensity(images[0], "ct")
    with pytest.raises(ConfigError, match="2-channel"):
        normalise_intensity(np.concatenate([images[0]] * 2), "ct", statistics=stats)
    with pytest.raises(DataError, match="no foreground voxels"):
        foreground_statistics(images, [np.zeros_like(lb) for lb in labels])


def test_ct_normalisation_never_sees_the_held_out_volumes():
    (a, la), (b, lb), (c, lc) = ct_case(0, 60.0), ct_case(1, 60.0), ct_case(2, 900.0)  # c: a bone-bright outlier
    args = VolumeDataArguments(intensity="ct")
    train, held_out = ImageSet([a, b], [la, lb], ["a", "b"]), ImageSet([c], [lc], ["c"])
    (train_n, held_n), settings = normalise_volumes(args, train, held_out, ignore_index=255)
    assert settings["intensity_statistics"] == foreground_statistics([a, b], [la, lb], ignore_index=255)
    np.testing.assert_allclose(
        held_n.images[0], normalise_intensity(c, "ct", statistics=settings["intensity_statistics"])
    )
    stats = settings["intensity_statistics"]
    ceiling = (stats["clip"][0][1] - stats["mean"][0]) / stats["std"][0]
    np.testing.assert_allclose(held_n.images[0][0][lc == 1], ceiling, rtol=1e-5)  # clipped at the training scale
    assert settings["intensity"] == "ct" and train_n.names == ["a", "b"]


# --- augmentation and crops --------------------------------------------------------------------------------------


def test_augment_keeps_image_and_label_aligned_and_is_seeded():
    image = torch.from_numpy(ramp(10, 12, 12))[None]
    label = (image[0] % 7 > 3).long()  # a label that is a function of the voxel value
    aug = CropAugment((6, 8, 8))
    seen = set()
    for seed in range(20):
        out_image, out_label = aug(image, label, torch.Generator().manual_seed(seed))
        assert out_image.shape == (1, 6, 8, 8) and out_label.shape == (6, 8, 8)
        assert out_image.is_contiguous() and out_label.is_contiguous() and out_label.dtype == torch.int64
        assert torch.equal(out_label, (out_image[0] % 7 > 3).long())
        again = aug(image, label, torch.Generator().manual_seed(seed))
        assert torch.equal(again[0], out_image) and torch.equal(again[1], out_label)
        seen.add(float(out_image[0, 0, 0, 0]))
    assert len(seen) > 5  # different seeds, different crops


def test_non_square_roi_keeps_its_shape():
    aug = CropAugment((4, 6, 8))
    for seed in range(8):
        image, _ = aug(torch.rand(1, 8, 10, 10), None, torch.Generator().manual_seed(seed))
        assert image.shape == (1, 4, 6, 8)


def test_small_volumes_are_padded_with_ignore_labels():
    image, label = torch.ones(1, 3, 10, 4), torch.ones(3, 10, 4, dtype=torch.long)
    out_image, out_label = CropAugment((6, 8, 8), flips=False, rot90=False)(
        image, label, torch.Generator().manual_seed(0)
    )
    assert out_image.shape == (1, 6, 8, 8) and out_label.shape == (6, 8, 8)
    assert type(out_image) is torch.Tensor and type(out_label) is torch.Tensor  # no MONAI MetaTensor leaks out
    assert int((out_label == 255).sum()) == int((out_image == 0).sum()) > 0
    assert set(out_label.unique().tolist()) == {1, 255}


def test_pos_fraction_one_always_hits_foreground():
    label = torch.zeros(20, 40, 40, dtype=torch.long)
    label[15:17, 30:33, 2:4] = 2  # one small object in a corner
    label[0:2, 0:2, 0:2] = 255  # ignored voxels are not foreground
    image = label[None].float()
    aug = CropAugment((4, 8, 8), pos_fraction=1.0)
    for seed in range(30):
        _, out = aug(image, label, torch.Generator().manual_seed(seed))
        assert (out == 2).any()
    uniform = CropAugment((4, 8, 8))
    hits = sum(bool((uniform(image, label, torch.Generator().manual_seed(s))[1] == 2).any()) for s in range(30))
    assert hits < 15


def test_sliding_crops_cover_every_voxel():
    for shape, roi, overlap in [
        ((10, 7, 9), (4, 4, 4), 0.0),
        ((5, 16, 16), (8, 8, 8), 0.5),
        ((3, 3, 3), (4, 4, 4), 0.0),
    ]:
        covered = np.zeros(shape, int)
        for box in sliding_crops(shape, roi, overlap):
            covered[box] += 1
            assert all(s.stop - s.start == min(r, n) for s, r, n in zip(box, roi, shape))
        assert covered.min() >= 1
    assert len(sliding_crops((8, 8, 8), (4, 4, 4))) == 8
    with pytest.raises(ConfigError):
        sliding_crops((8, 8, 8), (4, 4, 4), overlap=1.0)


def test_volume_dataset_train_and_eval():
    rng = np.random.default_rng(0)
    volumes = [rng.random((2, 9, 10, 12), dtype=np.float32), rng.random((2, 5, 16, 16), dtype=np.float32)]
    vs = ImageSet(volumes, [(v[0] > 0.5).astype(np.int64) for v in volumes], ["a", "b"])
    train = CropDataset(vs.images, vs.labels, (4, 8, 8), CropAugment((4, 8, 8)), samples_per_item=3, seed=1)
    assert len(train) == 6
    item = train[4]
    assert item["pixel_values"].shape == (2, 4, 8, 8) and item["pixel_values"].dtype == torch.float32
    assert item["labels"].shape == (4, 8, 8) and item["labels"].dtype == torch.int64
    assert item["sample_ids"].dtype == torch.int64 and int(item["sample_ids"]) == 4
    assert torch.equal(train[4]["pixel_values"], item["pixel_values"])  # same epoch, same crop
    train.set_epoch(1)
    assert not torch.equal(train[4]["pixel_values"], item["pixel_values"])
    evaluation = CropDataset(vs.images, vs.labels, (4, 8, 8))
    assert len(evaluation) == 3 * 2 * 2 + 2 * 2 * 2
    for i in range(len(evaluation)):
        assert evaluation[i]["pixel_values"].shape == (2, 4, 8, 8) and evaluation[i]["labels"].shape == (4, 8, 8)
    unlabelled = CropDataset(volumes, None, (4, 8, 8), CropAugment((4, 8, 8)))
    assert set(unlabelled[0]) == {"pixel_values", "sample_ids"}
    with pytest.raises(ConfigError, match="roi_size"):
        CropDataset(vs.images, vs.labels, (4, 8, 8), CropAugment((4, 4, 4)))


def test_orthogonal_slices():
    axial, coronal, sagittal = orthogonal_slices(ramp())
    assert axial.shape == (7, 8) and coronal.shape == (6, 8) and sagittal.shape == (6, 7)
    assert axial[2, 3] == 100 * 3 + 10 * 2 + 3 and coronal[1, 2] == 100 + 10 * 3 + 2 and sagittal[1, 2] == 124
    assert axial[0, 0] == 300 and coronal[0, 0] == 30 and sagittal[0, 0] == 4


# --- embedded real data ------------------------------------------------------------------------------------------


def test_embedded_nuclei3d(nuclei):
    assert nuclei.names == [f"nuclei3d_q{i}" for i in range(4)] and nuclei.channels == 1
    for volume, label in zip(nuclei.images, nuclei.labels):
        assert volume.shape == (1, 60, 128, 128) and volume.dtype == np.float32
        assert set(np.unique(label).tolist()) == {0, 1}
        assert 0.001 < label.mean() < 0.9
        assert volume[0][label == 1].mean() > volume[0][label == 0].mean()  # nuclei are the bright voxels


def test_embedded_mni152_tissue_maps_align_with_t1(mni):
    assert len(mni) == 4 and len(set(mni.names)) == 4 and all(n.startswith("mni152_") for n in mni.names)
    labels = np.concatenate([m.ravel() for m in mni.labels])
    assert set(np.unique(labels).tolist()) == {0, 1, 2}
    t1 = np.concatenate([v[0].ravel() for v in mni.images])
    grey, white, background = (t1[labels == k].mean() for k in (1, 2, 0))
    assert white > grey > background  # T1: white matter brighter than grey matter, both above background
    for volume, label in zip(mni.images, mni.labels):
        assert volume.shape[1:] == label.shape and set(np.unique(label).tolist()) == {0, 1, 2}


def test_embedded_volumes_through_the_dataset(nuclei):
    normalised = ImageSet([normalise_intensity(v) for v in nuclei.images], nuclei.labels, nuclei.names)
    first = normalised.subset([0])
    ds = CropDataset(first.images, first.labels, (16, 32, 32), CropAugment((16, 32, 32), pos_fraction=1.0), 2)
    item = ds[1]
    assert item["pixel_values"].shape == (1, 16, 32, 32) and item["labels"].sum() > 0


def _folder_pool(tmp_path, n=3, shape=(12, 16, 16)):
    rng = np.random.default_rng(0)
    for i in range(n):
        volume = rng.normal(100 + 10 * i, 5, shape).astype(np.float32)
        save_nifti(tmp_path / f"v{i}.nii.gz", volume)
        save_nifti(tmp_path / f"v{i}_label.nii.gz", (volume > 100 + 10 * i).astype(np.float32))
    return tmp_path


def test_lazy_pool_reads_files_only_when_used_and_keeps_a_few(tmp_path):
    pool = load_volumes(str(_folder_pool(tmp_path)), lazy=True)
    assert pool.lazy and isinstance(pool.images, LazyFiles) and pool.images._cache == {}  # nothing read yet
    assert pool.channels == 1
    for i in (1, 2, 0):
        pool.images[i]
    assert list(pool.images._cache) == [2, 0]  # keep=2: the least recently used was dropped
    normalised = pool.images.map(lambda v: v - v.mean())
    assert (
        abs(float(normalised[1].mean())) < 1e-3 and abs(float(pool.images[1].mean()) - 110) < 1
    )  # map adds, never mutates


def test_lazy_and_in_memory_pools_give_identical_items(tmp_path):
    folder = str(_folder_pool(tmp_path))
    kinds = [load_volumes(folder, lazy=lazy) for lazy in (False, True)]
    for augment in (CropAugment((8, 16, 16)), None):
        eager, lazy = (CropDataset(k.images, k.labels, (8, 16, 16), augment, 2, seed=3) for k in kinds)
        assert len(eager) == len(lazy)
        for i in range(len(eager)):
            a, b = eager[i], lazy[i]
            assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])


def test_lazy_pool_checks_label_grid_from_the_headers_before_reading(tmp_path):
    folder = _folder_pool(tmp_path, n=2)
    save_nifti(folder / "v1_label.nii.gz", np.zeros((12, 16, 15), np.float32))
    with pytest.raises(  # NIfTI headers tell the grid: no voxel read is needed to refuse the pair
        DataError, match=r"v1.nii.gz: the volume is \[D, H, W\] \(12, 16, 16\) but its label is \(12, 16, 15\)"
    ):
        load_volumes(str(folder), lazy=True)


def test_lazy_tiff_pool_checks_label_shape_when_read(tmp_path):
    import tifffile

    for i, shape in enumerate([(12, 16, 16), (12, 16, 15)]):
        tifffile.imwrite(tmp_path / f"v{i}.tif", np.ones((12, 16, 16), np.uint16))
        tifffile.imwrite(tmp_path / f"v{i}_label.tif", np.zeros(shape, np.uint8))
    pool = load_volumes(str(tmp_path), lazy=True)  # TIFF stores no geometry: checked when read
    dataset = CropDataset(pool.images, pool.labels, (8, 16, 16), CropAugment((8, 16, 16)), names=pool.names)
    dataset[0]
    with pytest.raises(DataError, match=r"v1.tif: the volume is \[D, H, W\] \(12, 16, 16\) but its label is"):
        dataset[1]


def test_lazy_npy_stack_is_memory_mapped(tmp_path):
    stack = np.random.default_rng(1).normal(size=(3, 1, 8, 8, 8)).astype(np.float32)
    np.save(tmp_path / "pool.npy", stack)
    pool = load_volumes(str(tmp_path / "pool.npy"), lazy=True)
    assert isinstance(pool.images[0], np.memmap) and np.array_equal(np.asarray(pool.images[2]), stack[2])


# --- labels: one reader and one mapper for masks and label volumes ----------------------------------------------


def test_class_map_that_names_the_ignore_value_maps_it_like_any_other_value():
    """A class_map entry for the ignore_index value wins over the pass-through of unlabeled voxels."""
    raw = np.zeros((4, 4, 4), np.int64)
    raw[0] = 255
    raw[1] = 7
    data = ImageSet([np.zeros((1, 4, 4, 4), np.float32)], [raw.copy()], ["v"])
    class_map, names = volume_classes(data, VolumeDataArguments(class_map={0: 0, 7: 1, 255: 2}))
    assert names == ["class_0", "class_1", "class_2"] and class_map[255] == 2
    assert set(np.unique(data.labels[0][0]).tolist()) == {2}  # was left at 255 (ignored) before
    unnamed = ImageSet([np.zeros((1, 4, 4, 4), np.float32)], [raw.copy()], ["v"])
    volume_classes(unnamed, VolumeDataArguments(class_map={0: 0, 7: 1}))
    assert set(np.unique(unnamed.labels[0]).tolist()) == {0, 1, 255}  # not named: stays unlabeled
    with pytest.raises(DataError, match=r"v: label values \[7\]"):
        volume_classes(ImageSet(data.images, [raw.copy()], ["v"]), VolumeDataArguments(class_map={0: 0, 255: 1}))


def organ_volume() -> np.ndarray:
    """A whole-body-like label volume: background 0, organs 1, 6 and many more values (2..5, 7, 42, 117)."""
    raw = np.zeros((4, 5, 6), np.int64)
    raw[0, :, :3], raw[1, :2], raw[1, 2:] = 1, 6, 42
    raw[2] = np.arange(6) + 2  # 2..7
    raw[3, 0, 0] = 117
    return raw


@pytest.mark.parametrize("others, expect", [(0, 0), ("ignore", 255), ("IGNORE", 255)])
def test_others_sends_every_value_not_listed_to_one_class_or_to_ignore(others, expect):
    raw = organ_volume()
    class_map = parse_class_map({0: 0, 1: 1, 6: 2, "others": others})
    assert class_map == {0: 0, 1: 1, 6: 2, "others": expect}
    ids = map_labels(raw, class_map, "body")
    listed = {0: 0, 1: 1, 6: 2}
    want = np.vectorize(lambda v: listed.get(int(v), expect))(raw)
    assert ids.dtype == np.int64 and np.array_equal(ids, want)
    assert set(np.unique(ids[raw == 42]).tolist()) == {expect} and ids[3, 0, 0] == expect
    _, names = class_mapping({0: 0, 1: 1, 6: 2, "others": others}, ["background", "liver", "kidney"])
    assert names == ["background", "liver", "kidney"]


def test_others_target_counts_among_the_class_ids():
    assert parse_class_map({1: 0, 6: 1, "others": 2}) == {1: 0, 6: 1, "others": 2}  # others is class 2
    with pytest.raises(ConfigError, match=r"class ids \[0, 1, 3\].*without gaps"):
        parse_class_map({0: 0, 1: 1, "others": 3})
    with pytest.raises(ConfigError, match="without gaps"):
        parse_class_map({0: 1, 1: 2, "others": "ignore"})  # no class 0
    with pytest.raises(ConfigError, match="others"):
        parse_class_map({0: 0, "liver": 1})  # the one other key is others
    with pytest.raises(ConfigError, match="class_names has 2 entries but class_map defines 3 classes"):
        class_mapping({0: 0, 1: 1, "others": 2}, ["a", "b"])


def test_a_value_missing_from_a_map_without_others_is_named_and_the_fix_names_others():
    with pytest.raises(DataError, match=r"body: label values \[2, 3, 4, 5, 7, 42, 117\] are not in class_map") as err:
        map_labels(organ_volume(), parse_class_map({0: 0, 1: 1, 6: 2}), "body")
    assert "others" in err.value.fix and "keys [0, 1, 6]" in err.value.problem


@pytest.mark.parametrize("given", [{0: 0, 1: 1, 6: 2, "others": 0}, {"0": 0, "6": 1, "others": "ignore"}])
def test_class_map_with_others_survives_the_json_round_trip_of_the_inference_config(given):
    parsed = parse_class_map(given)
    written = json.loads(json.dumps({str(k): v for k, v in parsed.items()}))  # as Segment.report writes it
    again = parse_class_map(written)
    assert again == parsed
    assert np.array_equal(map_labels(organ_volume(), again), map_labels(organ_volume(), parsed))


def test_volume_classes_applies_others_but_keeps_unlabeled_voxels_unlabeled():
    raw = organ_volume()
    raw[3, 4, 5] = 255
    data = ImageSet([np.zeros((1, *raw.shape), np.float32)], [raw.copy()], ["body"])
    class_map, names = volume_classes(data, VolumeDataArguments(class_map={0: 0, 1: 1, 6: 2, "others": 0}))
    assert class_map["others"] == 0 and names == ["class_0", "class_1", "class_2"]
    ids = data.labels[0]
    assert ids[3, 4, 5] == 255  # already unlabeled: others takes the other raw values only
    expect = map_labels(raw, parse_class_map({0: 0, 1: 1, 6: 2, 255: 255, "others": 0}))
    assert np.array_equal(ids, expect) and set(np.unique(ids).tolist()) == {0, 1, 2, 255}


def test_a_saved_model_scores_new_masks_with_the_others_of_its_class_map(tmp_path):
    """score_predictions maps another site's masks with the inference config's class map (keys as JSON wrote them)."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    out = tmp_path / "predictions"
    out.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        mask = np.zeros((12, 12), np.uint8)
        mask[2:6, 2:6], mask[7:10, 7:10], mask[0, :] = 1, 6, 9 + i  # 9, 10: values the map does not list
        Image.fromarray((rng.random((12, 12)) * 255).astype(np.uint8)).save(images / f"im{i}.png")
        Image.fromarray(mask).save(masks / f"im{i}.png")
        pred = map_labels(mask.astype(np.int64), {0: 0, 1: 1, 6: 2, "others": 0})
        pred[2, 2] = 0  # one liver pixel missed
        Image.fromarray(pred.astype(np.uint8)).save(out / f"im{i}_labels.png")
    class_map = parse_class_map({0: 0, 1: 1, 6: 2, "others": 0})
    written = {"class_map": {str(k): v for k, v in class_map.items()}, "class_names": ["bg", "a", "b"]}
    info = json.loads(json.dumps({**written, "ignore_index": 255}))
    row = score_predictions(str(images), str(masks), str(out), info, image_glob="*.png", num_overlays=1)
    assert row["images"] == 2 and row["dice_b"] == 1.0 and row["dice_a"] == pytest.approx(2 * 15 / (15 + 16))
    without = {**info, "class_map": {"0": 0, "1": 1, "6": 2}}
    with pytest.raises(DataError, match=r"mask values \[9\] are not in class_map"):
        score_predictions(str(images), str(masks), str(out), without, image_glob="*.png", num_overlays=1)


def test_one_label_reader_for_masks_and_label_volumes(tmp_path):
    grey = np.zeros((6, 5), np.uint8)
    grey[2:4] = 128
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb.png")
    assert (
        np.array_equal(read_label(tmp_path / "rgb.png"), grey) and read_label(tmp_path / "rgb.png").dtype == np.int64
    )
    colour = np.stack([grey, grey, 255 - grey], -1)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(DataError, match="channels that differ"):
        read_label(tmp_path / "colour.png")
    volume = np.zeros((3, 4, 4), np.float32)
    volume[1] = 2
    save_nifti(tmp_path / "label.nii.gz", volume)
    label = read_label(tmp_path / "label.nii.gz", read=read_volume)
    assert label.shape == (3, 4, 4) and label.dtype == np.int64 and set(np.unique(label).tolist()) == {0, 2}
    save_nifti(tmp_path / "soft.nii.gz", volume / 3)
    with pytest.raises(DataError, match="non-integer"):
        read_label(tmp_path / "soft.nii.gz", read=read_volume)
