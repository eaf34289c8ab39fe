"""Reconstruction checks of both MAEs (`evaluation.reconstruction`): one mean-predictor baseline, one figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from hf_medmae import MedMAE3DConfig, MedMAE3DForPreTraining, MedMAEForPreTraining
from hf_medmae.data.pretraining import load_images
from hf_medmae.data.volumes import VolumeDataArguments
from hf_medmae.errors import DataError
from hf_medmae.evaluation.reconstruction import mean_predictor_loss, save_reconstructions
from hf_medmae.modeling_mae import mae_loss, mae_targets, targets_to_pixels
from hf_medmae.plots import save_reconstruction_grid
from hf_medmae.tasks.pretrain import DataArguments, Pretrain


def pair(norm_pix_loss: bool, depth: int = 1) -> tuple[MedMAEForPreTraining, MedMAE3DForPreTraining]:
    """A 2D MAE on 16 x 16 images and a 3D MAE on `depth`-slice volumes of them, with 4 x 4 (x 1) patches."""
    arch = dict(hidden_size=48, num_attention_heads=2, decoder_hidden_size=48, decoder_num_attention_heads=2)
    flat = MedMAEForPreTraining(tiny_config(num_channels=1, image_size=16, norm_pix_loss=norm_pix_loss, **arch))
    deep = MedMAE3DForPreTraining(
        MedMAE3DConfig(
            num_channels=1,
            num_frames=depth,
            image_size=16,
            patch_size=4,
            tubelet_size=1,
            num_hidden_layers=1,
            intermediate_size=96,
            decoder_num_hidden_layers=1,
            decoder_intermediate_size=96,
            norm_pix_loss=norm_pix_loss,
            **arch,
        )
    )
    return flat.eval(), deep.eval()


def items(images: torch.Tensor) -> list[dict]:
    return [{"pixel_values": x} for x in images]


@pytest.mark.parametrize(
    "norm_pix_loss, expected",
    [(False, 1.0), (True, 15 / 16)],  # the data's variance; per-patch normalised: (P - 1) / P of unit variance
)
def test_mean_predictor_is_one_definition_for_2d_and_3d(norm_pix_loss, expected):
    """The same pixels as images and as one-slice-deep volumes give the same baseline: the loss of predicting the
    targets' mean. (It was the loss of predicting 0 in 2D, about 10 here, and the variance in 3D.)"""
    images = 3.0 + torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    flat, deep = pair(norm_pix_loss)
    loss_2d = mean_predictor_loss(flat, items(images), batch_size=8)
    loss_3d = mean_predictor_loss(deep, items(images[:, :, None]), batch_size=8)
    assert loss_2d == pytest.approx(expected, abs=0.06) and loss_3d == pytest.approx(expected, abs=0.06)
    assert loss_2d == pytest.approx(loss_3d, abs=0.06)


def test_mean_predictor_of_constant_images_is_zero():
    flat, deep = pair(norm_pix_loss=False)
    images = torch.full((4, 1, 16, 16), 3.0)
    assert mean_predictor_loss(flat, items(images)) == pytest.approx(0.0, abs=1e-10)
    assert mean_predictor_loss(deep, items(images[:, :, None])) == pytest.approx(0.0, abs=1e-10)


def test_mean_predictor_is_the_model_loss_of_a_constant_prediction():
    flat, _ = pair(norm_pix_loss=False)
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    codes = flat.generate_codes(images, generator=torch.Generator().manual_seed(1234 + 4))  # the eval masks' seed
    weight = (codes == 1).float()
    target = flat.targets(images)
    constant = float((target * weight[..., None]).sum() / (weight.sum() * target.shape[-1]))
    expected = flat.reconstruction_loss(images, torch.full_like(target, constant), weight)
    assert mean_predictor_loss(flat, items(images), batch_size=4) == pytest.approx(float(expected), rel=1e-5)


def test_the_one_loss_target_round_trips():
    patches = torch.randn(2, 5, 12) * 4 + 1
    for norm in (False, True):
        assert torch.allclose(targets_to_pixels(mae_targets(patches, norm), patches, norm), patches, atol=1e-5)
    assert mae_loss(patches, patches + 2, torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])) == 4.0


@pytest.mark.parametrize("throw", [False, True])
def test_one_reconstruction_figure_for_images_and_volumes(tmp_path, throw):
    flat, deep = pair(norm_pix_loss=True, depth=4)
    images, volumes = torch.randn(3, 1, 16, 16), torch.randn(20, 1, 4, 16, 16)
    if throw:
        flat.set_masking(mask_generator="attention", throw_ratio=0.25)
    for model, data, folder in ((flat, images, "2d"), (deep, volumes, "3d")):
        with Image.open(save_reconstructions(model, items(data), str(tmp_path / folder))) as png:
            width, height = png.size
        assert width > 400 and height > 400  # 3 columns; 3 rows: the images, or the volume's orthogonal views


def test_volume_figure_checks_its_mask():
    volumes = np.zeros((1, 1, 4, 16, 16))
    with pytest.raises(DataError, match="patches"):
        save_reconstruction_grid(volumes, np.zeros((1, 31)), volumes, (2, 4, 4), "unused.png")


@pytest.mark.parametrize(
    "data, config",
    [
        (VolumeDataArguments(), "nuclei3d_segmentation.yaml"),
        (VolumeDataArguments(train_data="embedded:mni152"), "mni152_segmentation.yaml"),
        (DataArguments(train_data="pool", labels_csv="labels.csv"), "wbc_classification.yaml"),
        (DataArguments(), "nuclei_segmentation.yaml"),
    ],
)
def test_closing_hint_suggests_the_next_step_for_the_data(data, config):
    task = Pretrain()
    hint = "\n".join(task.next_step(data, "out"))
    assert config in hint and "--model_name_or_path out" in hint
    if isinstance(data, VolumeDataArguments) or data.labels_csv:
        assert "nuclei_segmentation" not in hint
    task.data_args = data  # as setup records it
    assert config in task.summary({}, "out")


def test_load_images_is_library_code():
    train, val, skipped = load_images(DataArguments(validation_fraction=0.25), seed=0)
    assert len(train) + len(val) == 12 and len(val) == 3 and skipped == []  # nuclei16: 12 images
