"""Colour, stain, intensity, blur and zoom-out augmentation: seeded, shape- and dtype-keeping, and off by default.

Real white-cell images (WBC Zheng 2018) where colour matters; generated arrays only for the geometry checks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import WBC, require

from hf_medmae.data.classification import ClassificationDataset
from hf_medmae.data.io import read_image
from hf_medmae.data.pretraining import PretrainingDataset
from hf_medmae.data.transforms import Augment, Photometric, PhotometricArguments, channel_stats
from hf_medmae.errors import ConfigError

ALL = dict(colour_jitter=(0.3, 0.3, 0.3, 0.05), stain_jitter=0.05, intensity_jitter=None, blur_sigma=(0.5, 1.5))


@pytest.fixture(scope="module")
def cells() -> list[np.ndarray]:
    require(WBC)
    return [read_image(WBC / f"{i:03d}.bmp") for i in (1, 2, 3, 4)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_every_jitter_is_seeded_and_keeps_shape_dtype_and_range(cells):
    image = torch.from_numpy(cells[0])
    options = [
        dict(colour_jitter=(0.3, 0.3, 0.3, 0.05)),
        dict(stain_jitter=0.1),
        dict(intensity_jitter=(0.2, 0.2)),
        dict(gamma=(0.7, 1.4)),
        dict(blur_sigma=(0.5, 1.5)),
        ALL,
    ]
    for option in options:
        jitter = Photometric(**option)
        views = [jitter(image, gen(s)) for s in range(6)]
        assert all(v.shape == image.shape and v.dtype == torch.float32 for v in views), option
        assert torch.equal(views[1], jitter(image, gen(1))), option  # same seed, same view
        assert len({round(float(v.mean()), 3) for v in views}) > 1 or "blur_sigma" in option, option
        if "colour_jitter" in option or "stain_jitter" in option:
            assert all(float(v.min()) >= 0 and float(v.max()) <= 255 for v in views), option


def test_colour_and_stain_jitter_change_colour_not_geometry(cells):
    image = torch.from_numpy(cells[1])
    grey = lambda x: x.mean(0)  # noqa: E731
    for option in (dict(colour_jitter=(0.0, 0.0, 0.5, 0.1)), dict(stain_jitter=0.1)):
        out = Photometric(**option)(image, gen(3))
        chroma = (out - grey(out)) - (image - grey(image))
        assert float(chroma.abs().mean()) > 1.0, option  # the colour moved
        structure = np.corrcoef(grey(out).ravel(), grey(image).ravel())[0, 1]
        assert structure > 0.95, option  # the cell is where it was
    # a stain jitter of ~0 gives back the image: the HED round trip is exact up to float error
    same = Photometric(stain_jitter=1e-9)(image, gen(0))
    assert float((same - image).abs().max()) < 0.05


def test_no_option_draws_nothing_so_old_views_stay_exact(cells):
    """Without jitter a view is normalise -> geometry from the item's generator, as before the jitter existed (the
    light data path, the default, normalises after the crop: the same view up to float rounding)."""
    images = [c.astype(np.float32) for c in cells]
    mean, std = channel_stats(images)
    assert Photometric.from_args(PhotometricArguments(), 3) is None
    augment = Augment(64, (0.3, 1.0), rot90=True)
    full = PretrainingDataset(images, mean, std, 64, augment, seed=5, mask_noise_patches=8, light=False)
    light = PretrainingDataset(images, mean, std, 64, augment, seed=5, mask_noise_patches=8)
    for i in range(len(images)):
        expected = augment.with_view(full.normalize(torch.from_numpy(images[i])), full.item_generator(i))[0]
        assert torch.equal(full[i]["pixel_values"], expected)
        torch.testing.assert_close(light[i]["pixel_values"], expected, rtol=0, atol=1e-4)


def test_jittered_pretraining_views_depend_only_on_seed_epoch_and_index(cells):
    """What makes 1 process == 2 processes and resume exact: item i's view is a function of (seed, epoch, i)."""
    images = [c.astype(np.float32) for c in cells]
    mean, std = channel_stats(images)
    augment = Augment(64, (0.3, 2.0), rot90=True, photometric=Photometric(**ALL))
    ds = PretrainingDataset(images, mean, std, 64, augment, seed=2, mask_noise_patches=8)
    forward = [ds[i]["pixel_values"] for i in range(len(images))]
    backward = [ds[i]["pixel_values"] for i in reversed(range(len(images)))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["pixel_values"], forward[0])  # a new epoch, new views


def test_classifier_views_are_jittered_before_normalisation(cells):
    images = [c.astype(np.float32) for c in cells]
    mean, std = channel_stats(images)
    augment = Augment(64, (1.0, 1.0), hflip=False, vflip=False, photometric=Photometric(colour_jitter=(0.5, 0, 0, 0)))
    ds = ClassificationDataset(images, np.arange(4), mean, std, 64, augment)
    torch.manual_seed(0)
    bright = torch.stack([ds[0]["pixel_values"] for _ in range(8)])
    # brightness scales the raw intensities: normalised views spread far wider than float error
    assert float(bright.mean((1, 2, 3)).std()) > 0.05 and bright.shape == (8, 3, 64, 64)


def test_zoom_out_shrinks_the_object_in_the_frame():
    """Generated disk (a geometry check): crop_scale above 1 reaches into reflected context around the image."""
    yy, xx = np.mgrid[:64, :64]
    disk = torch.from_numpy(((yy - 32) ** 2 + (xx - 32) ** 2 < 8**2).astype(np.float32))[None]  # 24 px from the edge
    inside = float(disk.mean())
    same = Augment(64, (1.0, 1.0), hflip=False, vflip=False)(disk, gen(0))
    assert abs(float(same.mean()) - inside) < 1e-3
    # twice the area: 14 px of reflected context per side, which holds none of the disk
    zoomed = [Augment(64, (2.0, 2.0), ratio=(1, 1), hflip=False, vflip=False)(disk, gen(s)) for s in range(4)]
    assert all(z.shape == (1, 64, 64) for z in zoomed)
    assert all(abs(float(z.mean()) - inside / 2) < 0.1 * inside / 2 for z in zoomed)  # half the area in the frame
    with pytest.raises(ConfigError, match="crop_scale"):
        Augment(64, (0.5, 5.0))


def test_rgb_only_options_are_refused_for_other_channel_counts():
    with pytest.raises(ConfigError, match="intensity_jitter") as err:
        Photometric.from_args(PhotometricArguments(colour_jitter=[0.2, 0.2, 0.2, 0.05]), 16)
    assert "16 channels" in str(err.value)
    with pytest.raises(ConfigError, match="needs 4 values"):
        Photometric.from_args(PhotometricArguments(colour_jitter=[0.2]), 3)
    jitter = Photometric.from_args(PhotometricArguments(intensity_jitter=[0.1, 0.1], gamma=[0.8, 1.25]), 16)
    image = torch.rand(16, 32, 32) * 4000
    out = jitter(image, gen(0))
    assert out.shape == (16, 32, 32) and not torch.equal(out, image)
