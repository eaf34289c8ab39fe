"""Segmentation: UNETR-from-MONAI-blocks on a ViT encoder, the U-Net baseline, loss, checks, sliding window."""

from __future__ import annotations

import pytest
import torch
from transformers import ViTConfig, ViTModel

from hf_medmae.configuration import MedMAEConfig
from hf_medmae.errors import CheckpointError, ConfigError, DataError
from hf_medmae.modeling_mae import MedMAEForPreTraining
from hf_medmae.segmentation import (
    MedSegConfig,
    MedSegForSegmentation,
    build_unet_baseline,
    default_skip_layers,
    predict,
    segmentation_loss,
)

TINY_VIT = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)
TINY_UNET = (4, 4, 8, 8, 16, 4)


def tiny_segmenter(patch=4, channels=3, image=32, layers=2, num_labels=3, **kwargs) -> MedSegForSegmentation:
    vit = dict(TINY_VIT, image_size=image, patch_size=patch, num_channels=channels, num_hidden_layers=layers)
    return MedSegForSegmentation(MedSegConfig(vit_config=vit, num_labels=num_labels, feature_size=8, **kwargs))


@pytest.mark.parametrize("channels", [1, 3, 16])
@pytest.mark.parametrize("patch, image, layers", [(2, 32, 2), (4, 32, 2), (8, 32, 3), (16, 64, 4)])
def test_logits_have_input_size(patch, image, layers, channels):
    torch.manual_seed(0)
    model = tiny_segmenter(patch, channels, image, layers)
    assert model.config.num_stages == patch.bit_length() - 1
    assert len(model.decoder.up_blocks) == model.config.num_stages
    labels = torch.randint(0, 3, (2, image, image))
    out = model(torch.randn(2, channels, image, image), labels=labels)
    assert out.logits.shape == (2, 3, image, image)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_skip_layers_feed_the_decoder():
    """Same weights, different skip blocks -> different logits: the chosen hidden states are really used."""
    torch.manual_seed(0)
    a = tiny_segmenter(patch=8, layers=4, skip_layers=[1, 2]).eval()
    b = tiny_segmenter(patch=8, layers=4, skip_layers=[3, 4]).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert not torch.allclose(a(x).logits, b(x).logits)


def test_default_skip_layers_are_spread():
    layers = default_skip_layers(6, 3)  # depth 6, patch 8
    assert len(layers) == 2 and layers == sorted(set(layers))
    assert 1 <= layers[0] and layers[-1] < 6  # the deepest stage takes the final output, not a skip
    assert layers == [round(j * 6 / 3) for j in (1, 2)]  # skip j takes block round(j * depth / stages)
    assert default_skip_layers(12, 4) == [3, 6, 9]  # MONAI UNETR's hs[3, 6, 9] spacing
    assert default_skip_layers(6, 1) == []  # patch 2: only the input and the final output
    assert tiny_segmenter(patch=8, layers=6).config.skip_layers == layers


def test_from_encoder_copies_mae_weights():
    torch.manual_seed(0)
    dims = dict(TINY_VIT, image_size=32, patch_size=4, num_channels=16, num_hidden_layers=2)
    mae = MedMAEForPreTraining(
        MedMAEConfig(
            **dims,
            decoder_hidden_size=32,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2,
            decoder_intermediate_size=64,
        )
    )
    vit = ViTModel(ViTConfig(**dims), add_pooling_layer=False)
    vit.load_state_dict(mae.vit.state_dict(), strict=True)
    model = MedSegForSegmentation.from_encoder(vit, num_labels=4, feature_size=8)
    source, copied = vit.state_dict(), model.vit.state_dict()
    assert source.keys() == copied.keys()
    for key, tensor in source.items():
        assert torch.equal(tensor, copied[key]), key
    assert model.config.num_labels == 4 and model.config.vit_config["num_channels"] == 16
    # The MAE's own encoder (a ViTMAEModel) has the same names and converts too.
    direct = MedSegForSegmentation.from_encoder(mae.vit, num_labels=4, feature_size=8)
    assert torch.equal(direct.vit.layers[1].mlp.fc2.weight, mae.vit.layers[1].mlp.fc2.weight)


def test_from_encoder_rejects_extra_weights():
    vit = ViTModel(ViTConfig(**TINY_VIT, image_size=32, patch_size=4, num_hidden_layers=2), use_mask_token=True)
    with pytest.raises(CheckpointError, match="mask_token"):
        MedSegForSegmentation.from_encoder(vit, num_labels=2)


def test_sparse_labels_are_ignored():
    torch.manual_seed(0)
    model = tiny_segmenter()
    labels = torch.randint(0, 3, (2, 8, 8))
    ignored = torch.rand(2, 8, 8) < 0.6
    labels[ignored] = 255
    base = torch.randn(2, 3, 8, 8)
    noise = torch.randn(2, 3, 8, 8) * 50 * ignored[:, None]  # only unlabelled pixels change

    def loss_and_grad(values):
        logits = values.clone().requires_grad_(True)
        loss = model.compute_loss(logits, labels)
        loss.backward()
        return loss.detach(), logits.grad

    loss_a, grad_a = loss_and_grad(base)
    loss_b, grad_b = loss_and_grad(base + noise)
    assert torch.allclose(loss_a, loss_b)
    keep = ~ignored[:, None].expand_as(grad_a)
    assert torch.allclose(grad_a[keep], grad_b[keep])
    assert grad_a[~keep].abs().max() == 0
    # Mean negative log-likelihood over labelled pixels only, computed independently.
    nll = -torch.log_softmax(base, 1).gather(1, labels.clamp(max=2)[:, None])[:, 0]
    assert torch.allclose(loss_a, nll[~ignored].mean())


def test_all_unlabelled_batch_gives_zero_loss():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = tiny_segmenter().compute_loss(logits, torch.full((1, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 4, 8, 8)])
def test_dice_ce_with_sparse_labels_ignores_unlabelled_pixels(shape):
    model = tiny_segmenter(loss="dice_ce")
    logits, labels = torch.randn(1, 3, *shape[1:]), torch.randint(0, 3, shape)
    dense = model.compute_loss(logits, labels)
    assert torch.isfinite(dense)
    labels.view(-1)[::3] = 255
    sparse = model.compute_loss(logits, labels)
    other = logits.clone()
    other[:, :, labels[0] == 255] = torch.randn_like(other[:, :, labels[0] == 255]) * 10
    assert torch.isfinite(sparse) and not torch.isclose(sparse, dense)
    assert torch.isclose(model.compute_loss(other, labels), sparse)  # what unlabelled pixels predict is free


def test_input_mistakes_raise_data_errors():
    model = tiny_segmenter(patch=4, channels=3)
    x, labels = torch.randn(1, 3, 32, 32), torch.zeros(1, 32, 32, dtype=torch.long)
    with pytest.raises(DataError, match="1 channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(DataError, match=r"\[128\]"):
        model(x, labels=labels + 128)  # raw WBC mask values, not class indices
    with pytest.raises(DataError, match="shape"):
        model(x, labels=torch.zeros(1, 16, 16, dtype=torch.long))
    with pytest.raises(DataError, match="not divisible"):
        model(torch.randn(1, 3, 30, 30))
    with pytest.raises(DataError, match="integers"):
        model(x, labels=labels.float())


def test_other_image_sizes_interpolate_positions():
    out = tiny_segmenter(patch=4)(torch.randn(1, 3, 48, 40))
    assert out.logits.shape == (1, 3, 48, 40)


@pytest.mark.parametrize(
    "kwargs, vit",
    [
        ({}, {"patch_size": 6, "image_size": 36}),  # not a power of two
        ({}, {"patch_size": 1}),  # no upsampling stage
        ({}, {"patch_size": 4, "image_size": 30}),  # image not divisible
        ({"skip_layers": [0]}, {"patch_size": 4}),  # 1-based
        ({"skip_layers": [3]}, {"patch_size": 4}),  # deeper than the encoder
        ({"skip_layers": [1, 2]}, {"patch_size": 4}),  # patch 4 has one intermediate stage
        ({"ignore_index": 1}, {}),  # would ignore a real class
        ({"class_weights": [1.0, 2.0]}, {}),  # one weight per class
        ({"loss": "focal"}, {}),
    ],
)
def test_config_mistakes_raise_config_errors(kwargs, vit):
    vit_config = {**TINY_VIT, "image_size": 32, "num_hidden_layers": 2, "patch_size": 4, **vit}
    with pytest.raises(ConfigError) as info:  # raised by the config itself (check() in __post_init__), not wrapped
        MedSegConfig(vit_config=vit_config, num_labels=3, **kwargs)
    assert "Fix:" in str(info.value)


def test_factories_raise_config_errors():
    vit = ViTModel(ViTConfig(**TINY_VIT, image_size=32, patch_size=4, num_hidden_layers=2), add_pooling_layer=False)
    with pytest.raises(ConfigError, match="skip_layers"):
        MedSegForSegmentation.from_encoder(vit, num_labels=2, skip_layers=[5])
    with pytest.raises(ConfigError, match="six"):
        build_unet_baseline(1, 2, features=(8, 8, 16))


def test_predict_tiles_larger_images():
    torch.manual_seed(0)
    model = tiny_segmenter(patch=4)
    pred = predict(model, torch.randn(2, 3, 48, 48), roi_size=32)
    assert pred.shape == (2, 48, 48) and pred.dtype == torch.long
    assert model.training  # the mode is restored
    # One window covering the whole image is plain argmax of the logits.
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(predict(model, x, roi_size=32), model.eval()(x).logits.argmax(1))


def test_unet_baseline_forward_loss_and_named_size_error():
    """Its save/load round trip is in test_modeling_common."""
    torch.manual_seed(0)
    unet = build_unet_baseline(16, 5, features=TINY_UNET)
    labels = torch.randint(0, 5, (2, 32, 32))
    labels[:, :8] = 255
    out = unet(torch.randn(2, 16, 32, 32), labels=labels)
    assert out.logits.shape == (2, 5, 32, 32) and out.loss.ndim == 0
    out.loss.backward()
    assert unet.unet.final_conv.weight.grad.abs().sum() > 0
    with pytest.raises(DataError, match="divisible by 16"):
        unet(torch.randn(1, 16, 40, 40))


def test_class_weights_change_the_loss():
    logits, labels = torch.randn(1, 3, 8, 8), torch.randint(0, 3, (1, 8, 8))
    plain = tiny_segmenter()
    weighted = tiny_segmenter(class_weights=[1.0, 5.0, 0.1])
    assert not torch.allclose(
        segmentation_loss(logits, labels, plain.config), segmentation_loss(logits, labels, weighted.config)
    )


def test_segmenter_fits_a_pixel_rule():
    """End to end: a few AdamW steps fit 'class 1 where the pixel is positive' (gradients reach the decoder)."""
    torch.manual_seed(0)
    model = tiny_segmenter(channels=1, num_labels=2)
    x = torch.randn(2, 1, 32, 32)
    y = (x[:, 0] > 0).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = model(x, labels=y).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.2 * first
    assert (predict(model, x, roi_size=32) == y).float().mean() > 0.95
