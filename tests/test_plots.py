"""Each plot writes a PNG that PIL can open, with the promised grid of panels or the expected shape (no snapshots)."""

import numpy as np
import pytest
from conftest import assert_panel_grid
from PIL import Image

from hf_medmae.errors import DataError
from hf_medmae.plots import (
    orthogonal_slices,
    plot_attention_masks,
    plot_confidence,
    plot_confusion_matrix,
    plot_label_efficiency,
    plot_reliability,
    plot_segmentation_overlays,
    resolve_channels,
    save_reconstruction_grid,
    to_display,
)

NAMES = ["neutrophil", "lymphocyte", "monocyte"]
RNG = np.random.default_rng(0)


def _open(path):
    img = Image.open(path)
    img.load()
    return img.size  # (width, height)


def _probs_labels(n=40):
    return RNG.dirichlet(np.ones(3), size=n), RNG.integers(0, 3, n)


def test_confusion_matrix(tmp_path):
    w, h = _open(plot_confusion_matrix(np.array([[5, 1, 0], [2, 7, 1], [0, 0, 4]]), NAMES, tmp_path / "cm.png"))
    assert 0.7 < w / h < 1.6


def test_confusion_matrix_shape_error(tmp_path):
    with pytest.raises(DataError, match="expected"):
        plot_confusion_matrix(np.eye(2), NAMES, tmp_path / "cm.png")


def test_confidence_and_reliability(tmp_path):
    probs, labels = _probs_labels()
    labels[:3] = probs[:3].argmax(1)  # make sure some predictions are correct
    w, h = _open(plot_confidence(probs, labels, NAMES, tmp_path / "conf.png"))
    assert w > h
    w, h = _open(plot_reliability(probs, labels, tmp_path / "rel.png"))
    assert 0.8 < w / h < 1.25


def test_label_efficiency_from_means_and_from_seeds(tmp_path):
    rows = [
        {"fraction": f, "init": i, "macro_f1_mean": 0.5 + f / 3, "macro_f1_std": 0.02}
        for f in (0.1, 0.5, 1.0)
        for i in ("scratch", "mae")
    ]
    w, h = _open(plot_label_efficiency(rows, tmp_path / "eff.png"))
    assert w > h
    seeds = [{"fraction": f, "init": "mae", "accuracy": 0.6 + f / 3 + s / 100} for f in (0.1, 1.0) for s in range(3)]
    by_fraction = {f: [r["accuracy"] for r in seeds if r["fraction"] == f] for f in (0.1, 1.0)}
    means = [
        {"fraction": f, "init": "mae", "accuracy_mean": np.mean(v), "accuracy_std": np.std(v)}
        for f, v in by_fraction.items()
    ]
    from_seeds = plot_label_efficiency(seeds, tmp_path / "eff2.png", metric="accuracy")
    from_means = plot_label_efficiency(means, tmp_path / "eff3.png", metric="accuracy")
    # one row per seed is drawn as the mean +- std of its seeds, pixel for pixel
    assert np.array_equal(np.asarray(Image.open(from_seeds)), np.asarray(Image.open(from_means)))
    assert not np.array_equal(np.asarray(Image.open(from_seeds)), np.asarray(Image.open(tmp_path / "eff.png")))
    with pytest.raises(DataError, match="macro_f1"):
        plot_label_efficiency([{"fraction": 0.1, "init": "mae"}], tmp_path / "bad.png")


def test_segmentation_overlays(tmp_path):
    images = RNG.normal(size=(2, 3, 16, 16))
    truth = RNG.integers(0, 3, (2, 16, 16))
    truth[0, :4] = 255
    path = plot_segmentation_overlays(
        images, truth, RNG.integers(0, 3, (2, 16, 16)), tmp_path / "seg.png", ["bg", "cytoplasm", "nucleus"]
    )
    w, h = _open(path)
    assert 1.0 < w / h < 2.2  # 3 columns x 2 rows plus a legend
    assert_panel_grid(path, rows=2, cols=3)  # image, truth, prediction per image


def test_volume_overlays_are_the_image_overlays_of_three_views(tmp_path):
    volumes = [RNG.normal(size=(1, 8, 8, 8)), RNG.normal(size=(2, 8, 8, 8))]
    truth = [np.where(v[0] > 0, 1, 0) for v in volumes]
    truth[0][:, :2] = 255
    path = plot_segmentation_overlays(volumes, truth, truth, tmp_path / "vol.png", ["bg", "fg"], names=["a", "b"])
    assert_panel_grid(path, rows=6, cols=3)  # axial, coronal, sagittal rows per volume
    flat = [RNG.normal(size=(1, 4, 8, 10))]  # views of different shapes
    _open(plot_segmentation_overlays(flat, [flat[0][0] > 0], [flat[0][0] > 1], tmp_path / "flat.png", ["bg", "fg"]))
    with pytest.raises(DataError, match="do not match"):
        plot_segmentation_overlays(volumes, truth[:1], truth[:1], tmp_path / "bad.png", ["bg", "fg"])
    axial, coronal, sagittal = orthogonal_slices(np.arange(4 * 5 * 6).reshape(4, 5, 6), (1, 2, 3))
    assert axial[0, 0] == 30 and coronal[0, 0] == 12 and sagittal[0, 0] == 3


@pytest.mark.parametrize("c, channels", [(1, None), (3, None), (16, None), (16, 5), (16, [3, 7, 11])])
def test_reconstruction_grid(tmp_path, c, channels):
    x = RNG.normal(size=(5, c, 16, 16))
    mask = (RNG.random((5, 16)) < 0.75).astype(int)  # 4x4 patches of 4 px
    path = save_reconstruction_grid(x, mask, x + 0.1, 4, tmp_path / "rec.png", channels=channels, max_images=2)
    w, h = _open(path)
    assert 1.1 < w / h < 2.0
    assert_panel_grid(path, rows=2, cols=3)  # max_images rows; original, masked, reconstruction


def test_reconstruction_grid_compares_models_one_column_each(tmp_path):
    x = RNG.normal(size=(2, 3, 16, 16))
    mask = (RNG.random((2, 16)) < 0.75).astype(int)
    path = save_reconstruction_grid(x, mask, {"MAE": x + 0.1, "MSMAE": x - 0.1, "other": x}, 4, tmp_path / "cmp.png")
    w, h = _open(path)
    assert 2.0 < w / h < 3.0
    assert_panel_grid(path, rows=2, cols=5)  # original, masked, one column per model
    with pytest.raises(DataError, match="'MSMAE'"):
        save_reconstruction_grid(x, mask, {"MAE": x, "MSMAE": x[:1]}, 4, tmp_path / "bad.png")


@pytest.mark.parametrize("channels", [16, [0, 1], [0, 1, 99], -1, 2.5])
def test_channels_validation(channels):
    with pytest.raises(DataError, match="channels"):
        resolve_channels(channels, 16)


def test_reconstruction_grid_bad_channels(tmp_path):
    x = RNG.normal(size=(1, 3, 16, 16))
    with pytest.raises(DataError, match="channels"):
        save_reconstruction_grid(x, np.zeros((1, 16)), x, 4, tmp_path / "r.png", channels=3)


def test_to_display_ranges_and_shared_stretch():
    img = RNG.normal(size=(4, 8, 8))
    grey, rgb = to_display(img, 2), to_display(img, [0, 1, 2])
    assert grey.shape == (8, 8) and rgb.shape == (8, 8, 3)
    lo, hi = np.percentile(img[2], [1, 99])  # each channel stretched from its 1st to its 99th percentile
    np.testing.assert_allclose(grey, np.clip((img[2] - lo) / (hi - lo), 0, 1))
    for c in range(3):
        lo, hi = np.percentile(img[c], [1, 99])
        np.testing.assert_allclose(rgb[..., c], np.clip((img[c] - lo) / (hi - lo), 0, 1))
    # a brighter copy shown with the original's stretch saturates more pixels
    assert (to_display(img + 1, 2, lo_hi=np.percentile(img[2], [1, 99])[None]) == 1).sum() > (grey == 1).sum()


def test_reconstruction_mask_size_error(tmp_path):
    x = RNG.normal(size=(1, 1, 16, 16))
    with pytest.raises(DataError, match="patches"):
        save_reconstruction_grid(x, np.zeros((1, 15)), x, 4, tmp_path / "r.png")


def test_attention_masks_one_row_per_image_two_columns_per_model(tmp_path):
    images = RNG.normal(size=(3, 3, 32, 32))
    maps = {name: RNG.random((3, 4, 4)) for name in ("MAE", "MSMAE")}
    codes = {name: RNG.integers(0, 3, (3, 4, 4)) for name in maps}  # visible / masked / thrown
    path = plot_attention_masks(images, ["a", "b", "c"], maps, codes, tmp_path / "attn.png")
    w, h = _open(path)
    assert 1.3 < w / h < 2.0
    assert_panel_grid(path, rows=3, cols=5)  # the image, then map and mask per model
