"""The light data path: decode and crop in the loader, normalise / flip / turn per batch on the training device.

Real images: white cells (BMP, uint8 RGB, WBC Zheng 2018) from a folder and the embedded nuclei z-stack (uint16,
16 channels) from a memory-mapped `.npy`. The views and masks must be those of the full path (normalise the whole
image, then crop) up to float rounding, and exactly those of the items whose views were finished in the loader.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import WBC, require
from torch.utils.data import default_collate

from hf_medmae.data.embedded import nuclei16
from hf_medmae.data.pretraining import PretrainingDataset
from hf_medmae.data.sources import ArraySource, FileSource, TiledSource
from hf_medmae.data.transforms import Augment, Photometric, PhotometricArguments, channel_stats

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def cells() -> FileSource:
    require(WBC)
    return FileSource(sorted(WBC.glob("*.bmp"))[:12])


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> TiledSource:
    images, _ = nuclei16()
    path = tmp_path_factory.mktemp("pool") / "nuclei16.npy"
    np.save(path, np.stack(images).astype(np.uint16))
    return TiledSource(ArraySource(path), 64)


def datasets(source, size: int, augment: Augment, noise: int):
    mean, std = channel_stats([source[i] for i in range(4)])
    make = lambda **kw: PretrainingDataset(source, mean, std, size, augment, seed=5, mask_noise_patches=noise, **kw)  # noqa: E731
    return make(light=False), make(), make(defer_views=True)


CASES = {
    "rgb_crop": (224, dict(scale=(0.2, 1.0), rot90=True)),
    "rgb_zoom_out": (96, dict(scale=(0.5, 2.0))),
    "rgb_whole": (64, dict(crop=False, rot90=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_light_views_equal_the_full_path_on_uint8_images(cells, case):
    size, options = CASES[case]
    full, light, _ = datasets(cells, size, Augment(size, **options), noise=(size // 16) ** 2)
    assert cells.raw(0).dtype == np.uint8  # decoded as stored: no whole-image float copy
    for i in range(len(cells)):
        a, b = full[i], light[i]
        assert b["pixel_values"].dtype == torch.float32 and b["pixel_values"].shape == a["pixel_values"].shape
        torch.testing.assert_close(b["pixel_values"], a["pixel_values"], rtol=0, atol=1e-4)
        assert torch.equal(a["noise"], b["noise"])  # the masks: the same per-image draws


def test_light_views_equal_the_full_path_on_uint16_tiles(tiles):
    full, light, _ = datasets(tiles, 64, Augment(64, scale=(0.2, 1.0), rot90=True), noise=64)
    assert tiles.raw(0).dtype == np.uint16
    for i in range(0, len(tiles), max(1, len(tiles) // 16)):
        torch.testing.assert_close(light[i]["pixel_values"], full[i]["pixel_values"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_views_finished_per_batch_on_the_device_equal_views_finished_per_item(cells, device):
    _, light, deferred = datasets(cells, 64, Augment(64, rot90=True), noise=16)
    items = [deferred[i] for i in range(len(cells))]
    assert {"pending_views", "noise"} <= items[0].keys() and items[0]["pixel_values"].dtype == torch.float32
    assert len({int(item["pending_views"]) for item in items}) > 2  # several flips and turns in one batch
    batch = {k: v.to(device) for k, v in default_collate(items).items()}
    finished = deferred.finish_batch(batch)
    assert "pending_views" not in finished
    expected = torch.stack([light[i]["pixel_values"] for i in range(len(cells))])
    atol = 0 if device == "cpu" else 1e-5  # the same elementwise operations; another device may round otherwise
    torch.testing.assert_close(finished["pixel_values"].cpu(), expected, rtol=0, atol=atol)
    assert torch.equal(finished["noise"].cpu(), torch.stack([light[i]["noise"] for i in range(len(cells))]))


def test_photometric_jitter_keeps_the_full_path(cells):
    jitter = Photometric.from_args(PhotometricArguments(colour_jitter=[0.2, 0.2, 0.2, 0.02]), 3)
    _, light, deferred = datasets(cells, 64, Augment(64, photometric=jitter), noise=0)
    assert not light.light and not deferred.defer_views  # jitter needs the whole raw image
    assert "pending_views" not in deferred[0]
