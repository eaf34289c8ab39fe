"""Readers, tiling, split, statistics and augmentation on real files written in every supported format."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from hf_medmae.data.crops import CropAugment, CropDataset, pad_to, sliding_crops
from hf_medmae.data.embedded import nuclei16
from hf_medmae.data.image_set import ImageSet
from hf_medmae.data.io import read_array_file, read_image, read_image_folder
from hf_medmae.data.pretraining import PretrainingDataset, load_source, tile_image
from hf_medmae.data.segmentation import covering_tiles
from hf_medmae.data.sources import read_hf_dataset
from hf_medmae.data.splits import split_counts, split_indices, split_named, split_three
from hf_medmae.data.transforms import Augment, channel_stats, normalise_intensity, resize
from hf_medmae.errors import ConfigError, DataError


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    for suffix in ("png", "jpg", "bmp"):
        Image.fromarray(rgb).save(tmp_path / f"rgb.{suffix}")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    (tmp_path / "sub").mkdir()
    tifffile.imwrite(tmp_path / "sub" / "stack.tif", rng.integers(0, 4000, (16, 40, 48), dtype=np.uint16))
    return tmp_path


def test_formats_become_chw_float(folder):
    assert read_image(folder / "rgb.png").shape == (3, 40, 48)
    assert read_image(folder / "rgb.bmp").dtype == np.float32
    assert np.array_equal(read_image(folder / "rgb.png"), read_image(folder / "rgb.bmp"))
    assert read_image(folder / "grey.png").shape == (1, 40, 48)
    stack = read_image(folder / "sub" / "stack.tif")
    assert stack.shape == (16, 40, 48) and stack.max() > 255  # 16-bit values kept, pages became channels
    images, names, skipped = read_image_folder(folder)
    assert len(images) == 5 and "sub/stack.tif" in names and not skipped
    assert [n for n in read_image_folder(folder, pattern="*.bmp")[1]] == ["rgb.bmp"]


def test_corrupt_file_is_named_and_skippable(folder):
    data = (folder / "rgb.png").read_bytes()
    (folder / "broken.png").write_bytes(data[: len(data) // 3])  # truncated mid-stream
    with pytest.raises(DataError, match="broken.png"):
        read_image_folder(folder)
    images, _, skipped = read_image_folder(folder, on_bad_file="skip")
    assert len(images) == 5 and skipped == [str(folder / "broken.png")]
    (folder / "notes.png").write_text("not an image")
    with pytest.raises(DataError, match="notes.png"):
        read_image(folder / "notes.png")


def test_nan_pixels_and_empty_sources(tmp_path):
    arr = np.zeros((2, 3, 8, 8), np.float32)
    arr[1, 0, 2, 2] = np.nan
    np.save(tmp_path / "bad.npy", arr)
    with pytest.raises(DataError, match="NaN"):
        read_array_file(tmp_path / "bad.npy")
    (tmp_path / "empty").mkdir()
    images, _ = load_source(str(tmp_path / "empty"))
    assert len(images) == 0
    with pytest.raises(DataError, match="empty"):
        split_indices(0, 0.1, 0)
    with pytest.raises(DataError, match="neither a folder"):
        load_source(str(tmp_path / "nowhere.xyz"))


def test_npy_npz_and_datasets(tmp_path):
    arr = np.random.default_rng(0).random((5, 16, 8, 8), dtype=np.float32)
    np.save(tmp_path / "a.npy", arr)
    np.savez(tmp_path / "b.npz", images=arr, labels=np.arange(5))
    assert np.array_equal(read_array_file(tmp_path / "a.npy"), arr)
    assert np.array_equal(read_array_file(tmp_path / "b.npz"), arr)
    with pytest.raises(DataError, match="no array 'x'"):
        read_array_file(tmp_path / "b.npz", key="x")
    import datasets

    rgb = [Image.fromarray(np.full((8, 8, 3), i * 10, np.uint8)) for i in range(3)]
    datasets.Dataset.from_dict({"image": rgb}, features=datasets.Features({"image": datasets.Image()})).save_to_disk(
        tmp_path / "ds"
    )
    images = read_hf_dataset(str(tmp_path / "ds"))
    assert len(images) == 3 and images[2].shape == (3, 8, 8) and images[2].max() == 20


def test_tiling_split_and_stats():
    image = np.arange(16 * 256 * 256, dtype=np.float32).reshape(16, 256, 256)
    tiles = tile_image(image, 64)
    assert len(tiles) == 16 and tiles[0].shape == (16, 64, 64)
    assert np.array_equal(tiles[5], image[:, 64:128, 64:128])
    train, val = split_indices(100, 0.1, seed=1)
    assert len(val) == 10 and not set(train) & set(val) and len(set(train) | set(val)) == 100
    assert np.array_equal(val, split_indices(100, 0.1, seed=1)[1])
    assert not np.array_equal(val, split_indices(100, 0.1, seed=2)[1])
    images = [np.random.default_rng(i).normal(i, 2.0, (2, 10, 10)).astype(np.float32) for i in range(4)]
    mean, std = channel_stats(images)
    stacked = np.stack(images)
    assert np.allclose(mean, stacked.mean(axis=(0, 2, 3)), atol=1e-4)
    assert np.allclose(std, stacked.std(axis=(0, 2, 3)), atol=1e-4)


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_persistent_workers_draw_each_epochs_views_and_masks(start):
    """Workers kept alive across epochs (the GPU default) must see `set_epoch`, called as the Trainer does, before the
    epoch's first batch: each epoch's crops and masks are then the ones the dataset draws for that epoch in the
    main process, and not epoch 0's again (which an MAE memorises)."""
    from torch.utils.data import DataLoader

    images = [np.random.default_rng(i).normal(5.0, 3.0, (3, 40, 40)).astype(np.float32) for i in range(6)]
    mean, std = channel_stats(images)
    ds = PretrainingDataset(images, mean, std, 32, Augment(32, (0.2, 1.0), rot90=True), seed=3, mask_noise_patches=16)
    loader = DataLoader(ds, batch_size=3, num_workers=2, persistent_workers=True, multiprocessing_context=start)
    seen = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        batches = list(loader)
        for key in ("pixel_values", "noise"):
            served = torch.cat([b[key] for b in batches])
            assert torch.equal(served, torch.stack([ds[i][key] for i in range(len(ds))])), (epoch, key)
        seen.append(torch.cat([b["noise"] for b in batches]))
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])


def test_augment_and_dataset_normalise():
    images = [np.random.default_rng(i).normal(5.0, 3.0, (16, 64, 64)).astype(np.float32) for i in range(4)]
    mean, std = channel_stats(images)
    ds = PretrainingDataset(images, mean, std, 32, Augment(32, (0.2, 1.0), rot90=True))
    item = ds[1]
    assert item["pixel_values"].shape == (16, 32, 32) and item["sample_ids"] == 1
    # validation: the whole image resized (the classifier's evaluation view), not a central crop at native scale
    val = PretrainingDataset(images, mean, std, 32)
    whole = val[0]["pixel_values"]
    expected = (torch.from_numpy(images[0]) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    pooled = torch.nn.functional.avg_pool2d(expected[None], 2)[0]  # a 2x antialiased shrink is close to 2x2 means
    assert whole.shape == (16, 32, 32) and torch.equal(whole, val[0]["pixel_values"])
    assert (whole - pooled).abs().mean() < 0.5 * (expected[:, 16:48, 16:48] - pooled).abs().mean()
    flip = Augment(64, (1.0, 1.0), hflip=True, vflip=False)
    x = torch.arange(64.0).repeat(1, 64, 1)
    outs = {tuple(flip(x, torch.Generator().manual_seed(s))[0, 0, :2].tolist()) for s in range(10)}
    assert outs == {(0.0, 1.0), (63.0, 62.0)}  # identity or a horizontal flip, nothing else
    square = torch.randn(3, 8, 8)  # flips + rot90 reach exactly the 8 symmetries of the square
    dihedral = [torch.rot90(v, k, dims=(-2, -1)) for v in (square, square.flip(-1)) for k in range(4)]
    seen = set()
    for s in range(60):
        out = Augment(8, (1.0, 1.0), rot90=True)(square, torch.Generator().manual_seed(s))
        assert out.is_contiguous()
        seen.add(next(i for i, d in enumerate(dihedral) if torch.equal(out, d)))  # StopIteration: not a symmetry
    assert seen == set(range(8))


@pytest.mark.parametrize("shape, size", [((3, 45, 50), 64), ((16, 33, 64), 64), ((1, 7, 5), 32), ((3, 100, 80), 64)])
def test_resize_is_torch_bilinear(shape, size):
    """The matmul upsampling path and the antialiased downsampling path both equal F.interpolate."""
    image = torch.randn(shape)
    shrink = shape[1] > size or shape[2] > size
    expected = torch.nn.functional.interpolate(
        image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=shrink
    )[0]
    torch.testing.assert_close(resize(image, size), expected, rtol=1e-5, atol=1e-5)


def test_embedded_nuclei_are_real_16_channel_images():
    images, masks = nuclei16()
    assert images.shape == (12, 16, 256, 256) and masks.shape == (12, 256, 256)
    assert images.max() > 1000  # real 16-bit confocal intensities, not a synthetic pattern
    assert 0.02 < masks.mean() < 0.8  # nuclei cover part of each slice


# --- one N-d cropper, tiler, normaliser and split for images and volumes ----------------------------------------


def test_one_tiler_for_pool_tiles_covering_tiles_and_crops():
    assert [(b[0].start, b[1].start) for b in sliding_crops((10, 9), (4, 4), cover=False)] == [
        (0, 0),
        (0, 4),
        (4, 0),
        (4, 4),
    ]  # pool tiles: the remainder at the far border is dropped
    image = np.arange(2 * 10 * 9, dtype=np.float32).reshape(2, 10, 9)
    assert [t.shape for t in tile_image(image, 4)] == [(2, 4, 4)] * 4 and tile_image(image, 16)[0] is image
    pairs = covering_tiles(ImageSet([image], [(image[0] % 3).astype(np.int64)], ["a"]), 4)
    assert pairs.names == ["a@0,0", "a@0,4", "a@0,5", "a@4,0", "a@4,4", "a@4,5", "a@6,0", "a@6,4", "a@6,5"]
    covered = np.zeros((10, 9), int)
    for name, tile, mask in zip(pairs.names, pairs.images, pairs.labels):
        top, left = (int(v) for v in name.split("@")[1].split(","))
        covered[top : top + 4, left : left + 4] += 1
        assert np.array_equal(tile, image[:, top : top + 4, left : left + 4]) and np.array_equal(mask, tile[0] % 3)
    assert covered.min() == 1


def test_crops_of_images_with_masks_are_seeded_and_aligned():
    image = torch.arange(20 * 24, dtype=torch.float32).reshape(1, 20, 24)
    label = (image[0] % 5 > 2).long()
    augment = CropAugment((8, 12), pos_fraction=0.5)
    seen = set()
    for seed in range(12):
        out_image, out_label = augment(image, label, torch.Generator().manual_seed(seed))
        assert out_image.shape == (1, 8, 12) and torch.equal(out_label, (out_image[0] % 5 > 2).long())
        again = augment(image, label, torch.Generator().manual_seed(seed))
        assert torch.equal(again[0], out_image) and torch.equal(again[1], out_label)
        seen.add(float(out_image[0, 0, 0]))
    assert len(seen) > 4
    padded, padded_label = pad_to(torch.ones(1, 3, 12), torch.ones(3, 12, dtype=torch.long), (8, 12), 9)
    assert padded.shape == (1, 8, 12) and int((padded_label == 9).sum()) == int((padded == 0).sum()) == 5 * 12
    images, labels = [image.numpy()], [label.numpy()]
    train = CropDataset(images, labels, (8, 12), augment, samples_per_item=2, seed=4)
    assert len(train) == 2 and train[1]["labels"].shape == (8, 12) and int(train[1]["sample_ids"]) == 1
    assert torch.equal(train[1]["pixel_values"], train[1]["pixel_values"])
    evaluation = CropDataset(images, labels, (8, 12), with_ids=False)
    assert len(evaluation) == 3 * 2 and set(evaluation[5]) == {"pixel_values", "labels"}
    with pytest.raises(ConfigError, match="two .H, W. or three"):
        CropAugment((8,))
    with pytest.raises(DataError, match=r"x: the image is \[H, W\] \(20, 24\) but its mask is \(20, 23\)"):
        CropDataset(images, [labels[0][:, :23]], (8, 12), names=["x"])[0]


def test_intensity_normalisation_is_per_channel_for_images_and_volumes():
    rng = np.random.default_rng(0)
    image = np.stack([rng.normal(5, 2, (30, 40)), rng.normal(-3, 0.5, (30, 40))]).astype(np.float32)
    out = normalise_intensity(image)
    assert out.shape == image.shape and np.allclose(out.mean((1, 2)), 0, atol=1e-5)
    assert np.allclose(out.std((1, 2)), 1, atol=1e-4)
    volume = image.reshape(2, 3, 10, 40)  # the same voxels as a volume: the same numbers
    assert np.allclose(
        normalise_intensity(volume, "percentile").reshape(image.shape), normalise_intensity(image, "percentile")
    )


def test_one_seeded_split_of_whole_items():
    train, val, test = split_counts(10, 2, 3, seed=5)
    assert (len(train), len(val), len(test)) == (5, 2, 3) and sorted([*train, *val, *test]) == list(range(10))
    assert all(np.array_equal(a, b) for a, b in zip(split_three(10, 0.2, 0.3, seed=5), (train, val, test)))
    assert all(np.array_equal(a, b) for a, b in zip(split_indices(10, 0.2, seed=5), split_counts(10, 2, 0, 5)))
    names = [f"v{i}" for i in range(10)]
    assert split_named(names, 2, 3, seed=5) == tuple(part.tolist() for part in (train, val, test))
    assert split_named(names, 2, 3, 5, validation_names=["v9"], test_names=["v0"]) == (list(range(1, 9)), [9], [0])
    with pytest.raises(ConfigError, match="distinct items"):
        split_named(names, 2, 3, 5, validation_names=["v0"], test_names=["v0"])
    with pytest.raises(ConfigError, match="still train on one"):
        split_counts(3, 2, 1, seed=0)


def test_box_crops_cut_one_object_per_image_from_voc_annotations():
    from conftest import BCCD, require

    from hf_medmae.data.boxes import box_crops, voc_boxes

    annotations = require(BCCD.parent / "Annotations")
    first = sorted(annotations.glob("*.xml"))[0]
    boxes = voc_boxes(first, ("WBC",))
    assert boxes and all(name == "WBC" and b[0] < b[2] and b[1] < b[3] for name, b in boxes)
    crops = box_crops(BCCD, annotations, "WBC", only_single=True)
    assert len(crops) > 300 and first.stem in crops
    x0, y0, x1, y1 = boxes[0][1]
    crop = crops[first.stem]
    assert crop.shape[0] == 3 and crop.shape[1] == crop.shape[2] >= max(x1 - x0, y1 - y0)
    # a wider margin frames the same cells smaller (cross-site scale matching relies on the same set)
    wide = box_crops(BCCD, annotations, "WBC", margin=1.56, only_single=True)
    assert wide.keys() == crops.keys()
    assert wide[first.stem].shape[1] == min(int(max(x1 - x0, y1 - y0) * 1.56), 480) > crop.shape[1]
