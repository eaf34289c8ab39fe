"""MedMAEForPreTraining: any channels and patch size, masking through `noise`, errors (save/load: common tester)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from transformers import ViTMAEForPreTraining

from hf_medmae import MedMAEConfig, MedMAEForPreTraining
from hf_medmae.errors import ConfigError, DataError
from hf_medmae.masking import MASKED, THROWN


@pytest.mark.parametrize("channels", [1, 3, 16])
@pytest.mark.parametrize("patch,size", [(2, 16), (4, 32), (8, 32), (16, 64)])
def test_shapes_for_channels_and_patches(channels, patch, size):
    model = MedMAEForPreTraining(tiny_config(num_channels=channels, patch_size=patch, image_size=size))
    out = model(torch.randn(2, channels, size, size))
    num_patches = (size // patch) ** 2
    assert out.logits.shape == (2, num_patches, patch * patch * channels)
    assert out.mask.sum(1).tolist() == [num_patches - int(num_patches * 0.25)] * 2
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.vit.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0


def test_matches_stock_vitmae_with_same_weights_and_noise():
    config = tiny_config()
    ours = MedMAEForPreTraining(config).eval()
    stock = ViTMAEForPreTraining(config).eval()
    stock.load_state_dict(ours.state_dict())
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    a, b = ours(x, noise=noise), stock(x, noise=noise)
    # Ours projects only the visible patches (a linear map instead of the conv): equal up to float order.
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_restore, b.ids_restore)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)


def test_random_masking_in_training_is_stock_vitmae_step_for_step():
    """Uniform masking draws what stock transformers draws and trains the same weights the same way."""
    config = tiny_config(mask_generator="random", mask_ratio=0.75)
    ours, stock = MedMAEForPreTraining(config).train(), ViTMAEForPreTraining(config).train()
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 32, 32)
    results = []
    for model in (ours, stock):
        torch.manual_seed(7)
        out = model(x)
        out.loss.backward()
        results.append((out.mask, torch.rand(1), out.loss, *(p.grad for p in model.parameters() if p.requires_grad)))
    (ours_mask, ours_rng, *ours_rest), (stock_mask, stock_rng, *stock_rest) = results
    assert torch.equal(ours_mask, stock_mask) and torch.equal(ours_rng, stock_rng)  # same draws, same stream after
    assert len(ours_rest) == len(stock_rest) > 10
    for a, b in zip(ours_rest, stock_rest):  # loss, then every gradient, the patch projection's included
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    ours.eval()  # validation masks are seeded, so eval loss is comparable across evaluations
    assert torch.equal(ours(x).mask, ours(x).mask)


def test_generator_mask_reaches_the_model():
    model = MedMAEForPreTraining(tiny_config(mask_generator="grid", mask_ratio=0.5)).eval()
    out = model(torch.randn(2, 3, 32, 32))
    grid = out.mask.reshape(2, 8, 8)
    assert (grid[:, 1:] != grid[:, :-1]).all()  # the checkerboard arrived intact


def test_thrown_patches_leave_the_loss():
    model = MedMAEForPreTraining(tiny_config(mask_generator="attention", mask_ratio=0.75, throw_ratio=0.25)).eval()
    x = torch.randn(2, 3, 32, 32)
    codes = torch.zeros(2, 64, dtype=torch.uint8)
    codes[:, :32], codes[:, 32:48] = MASKED, THROWN
    out = model(x, mask_codes=codes)
    assert out.mask.sum(1).tolist() == [48, 48]  # thrown patches are not encoded either
    expected = model.reconstruction_loss(x, out.logits, (codes == MASKED).float())
    assert torch.allclose(out.loss, expected)
    everything = model.reconstruction_loss(x, out.logits, out.mask)
    assert not torch.allclose(out.loss, everything)


def test_attention_generator_uses_cls_attention_maps():
    model = MedMAEForPreTraining(tiny_config(mask_generator="attention", mask_ratio=0.5)).eval()
    x = torch.randn(3, 3, 32, 32)
    maps = model.cls_attention(x)
    assert maps.shape == (3, 64) and (maps >= 0).all() and (maps <= 1).all()
    spiky = torch.full((64,), 1e-6)
    spiky[:8] = 1.0
    model.attention_bank = {0: spiky, 1: spiky, 2: spiky}
    out = model(x, sample_ids=torch.tensor([0, 1, 2]))
    assert out.mask[:, :8].mean() > 0.9


def test_reconstruct_pastes_visible_patches_back():
    model = MedMAEForPreTraining(tiny_config()).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    recon = model.reconstruct(x, out.logits, out.mask)
    visible = (out.mask == 0)[..., None]
    assert torch.equal(
        model.patchify(recon)[visible.expand(-1, -1, 48)], model.patchify(x)[visible.expand(-1, -1, 48)]
    )


def test_named_errors():
    model = MedMAEForPreTraining(tiny_config(num_channels=16))
    with pytest.raises(DataError, match="3 channels but the model expects 16"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(DataError, match="48x48 but the model expects 32x32"):
        model(torch.randn(1, 16, 48, 48))
    with pytest.raises(ConfigError, match="not divisible by patch_size"):
        MedMAEConfig(image_size=30, patch_size=4)
    with pytest.raises(ConfigError, match="mask_ratio=0.0 is outside"):
        MedMAEConfig(mask_ratio=0.0)


def test_fixed_sincos_position_embeddings_are_set_in_encoder_and_decoder():
    """transformers 5.x builds ViT-MAE with both position embeddings at zero; ours carry the 2D sin-cos values."""
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    model = MedMAEForPreTraining(tiny_config())  # image 32, patch 4: an 8 x 8 grid
    for param in (model.vit.embeddings.position_embeddings, model.decoder.decoder_pos_embed):
        expected = build_2d_sinusoidal_position_embedding(8, 8, param.shape[-1], cls_token=True)
        half = param.shape[-1] // 2
        expected = torch.cat([expected[..., half:], expected[..., :half]], dim=-1)[None]  # the original MAE's layout
        torch.testing.assert_close(param.detach(), expected)
        assert not param.requires_grad and param[0, 1:].std(0).min() > 0  # fixed, and different at every position


def test_positions_make_position_dependent_images_learnable():
    """Every image is the same left-to-right ramp plus noise: only a model that knows where a hidden patch is
    can predict its brightness. With the position embeddings zeroed (stock 5.x), the loss stays at the
    position-blind level."""
    gen = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-1.5, 1.5, 32).expand(3, 32, 32)

    def final_loss(zero_positions: bool) -> float:
        torch.manual_seed(0)
        model = MedMAEForPreTraining(tiny_config(norm_pix_loss=False, mask_ratio=0.5))
        if zero_positions:
            model.vit.embeddings.position_embeddings.data.zero_()
            model.decoder.decoder_pos_embed.data.zero_()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        for _ in range(80):
            loss = model(ramp + 0.1 * torch.randn(16, 3, 32, 32, generator=gen)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            return model(ramp + 0.1 * torch.randn(64, 3, 32, 32, generator=gen)).loss.item()

    blind_floor = ramp.var(unbiased=False).item() + 0.01  # predicting the mean brightness everywhere
    assert final_loss(zero_positions=False) < 0.2 * blind_floor
    assert final_loss(zero_positions=True) > 0.6 * blind_floor  # the control: without positions it cannot
