"""The 3D path: MAE on volumes (patchify, 3D sin-cos, loss, masks), encoder hand-over, Hub, end-to-end runs."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from huggingface_hub import ModelCard, ModelCardData
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForPreTraining, AutoModelForSemanticSegmentation, ViTImageProcessorPil

from hf_medmae import MedMAE3DConfig, MedMAE3DForPreTraining, MedMAE3DModel, load_encoder
from hf_medmae.errors import ConfigError, DataError
from hf_medmae.hub import pull_checkpoint, push_checkpoint, render_model_card
from hf_medmae.masking import MASKED, THROWN, VISIBLE, num_kept
from hf_medmae.modeling_mae3d import patchify_3d, sincos_3d, unpatchify_3d
from hf_medmae.optim import param_groups_layer_decay
from hf_medmae.segmentation import MedSegForSegmentation, build_unet_baseline, default_skip_layers
from hf_medmae.tasks import pretrain, segment

TINY_3D = dict(
    num_channels=1,
    num_frames=8,
    image_size=16,
    patch_size=4,
    tubelet_size=4,
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=96,
    decoder_hidden_size=48,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=96,
)
TINY_UNET = (4, 4, 8, 8, 16, 4)


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every test on one thread: on two cores shared with other jobs, two spinning threads stall each other."""
    yield


def tiny_3d(**overrides) -> MedMAE3DConfig:
    """Volume 8 x 16 x 16, patches 4 x 4 x 4 (a 2 x 4 x 4 grid, 32 patches), width 48 (divisible by 6)."""
    return MedMAE3DConfig(**{**TINY_3D, **overrides})


def volume(config: MedMAE3DConfig, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, config.num_channels, *config.volume_size)


def make_codes(batch: int, num_patches: int, visible: int, thrown: int, seed: int = 0) -> torch.Tensor:
    """[B, L] codes with `visible` 0s, `thrown` 2s and the rest 1s per row, in a random order per row."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.full((batch, num_patches), MASKED, dtype=torch.long)
    for row in codes:
        order = torch.randperm(num_patches, generator=gen)
        row[order[:visible]] = VISIBLE
        row[order[visible : visible + thrown]] = THROWN
    return codes


def patchify_unfold(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """A second route to [B, L, t*p*p*C] (torch's unfold), to check the loss against."""
    t, ph, pw = patch
    b, c = x.shape[:2]
    u = x.unfold(2, t, t).unfold(3, ph, ph).unfold(4, pw, pw)  # [B, C, gd, gh, gw, t, ph, pw]
    return u.permute(0, 2, 3, 4, 5, 6, 7, 1).reshape(b, -1, t * ph * pw * c)


def patch_voxels(index: int, config: MedMAE3DConfig) -> torch.Tensor:
    """[C, D, H, W] bool: the voxels of patch `index` (through `unpatchify_3d`, checked voxel by voxel below)."""
    t, ph, pw = config.patch_shape
    one_hot = torch.zeros(1, config.num_patches, t * ph * pw * config.num_channels)
    one_hot[0, index] = 1
    return unpatchify_3d(one_hot, config.patch_shape, config.volume_size)[0].bool()


# --- 1. patchify_3d / unpatchify_3d ----------------------------------------------------------------------------------

PATCH_CASES = [  # (channels, (D, H, W), (t, p, p))
    (1, (8, 16, 16), (4, 4, 4)),
    (2, (8, 16, 24), (2, 4, 4)),
    (3, (6, 8, 8), (3, 2, 2)),
    (1, (16, 32, 32), (8, 8, 8)),
    (4, (4, 8, 12), (1, 4, 4)),
]


@pytest.mark.parametrize("channels, size, patch", PATCH_CASES)
def test_patchify_puts_every_voxel_where_videomae_numbers_it(channels, size, patch):
    """Token (d * gh + h) * gw + w (depth-major), element (((z % t) * p + y % p) * p + x % p) * C + c.

    Checked for every voxel.
    """
    (d, h, w), (t, ph, pw) = size, patch
    x = torch.arange(2 * channels * d * h * w, dtype=torch.float64).reshape(2, channels, d, h, w)  # every value unique
    patches = patchify_3d(x, patch)
    gh, gw = h // ph, w // pw
    assert patches.shape == (2, (d // t) * gh * gw, t * ph * pw * channels)
    c, z, y, xx = torch.meshgrid(
        torch.arange(channels), torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij"
    )
    token = ((z // t) * gh + y // ph) * gw + xx // pw
    element = (((z % t) * ph + y % ph) * pw + xx % pw) * channels + c
    for b in range(2):
        assert torch.equal(patches[b, token, element], x[b])


@pytest.mark.parametrize("channels, size, patch", PATCH_CASES)
def test_unpatchify_inverts_patchify_both_ways(channels, size, patch):
    x = torch.randn(3, channels, *size)
    assert torch.equal(unpatchify_3d(patchify_3d(x, patch), patch, size), x)
    tokens = torch.randn(3, math.prod(s // p for s, p in zip(size, patch)), math.prod(patch) * channels)
    assert torch.equal(patchify_3d(unpatchify_3d(tokens, patch, size), patch), tokens)


@pytest.mark.parametrize("channels, size, patch", PATCH_CASES)
def test_patchify_order_matches_videomae_conv3d_embedding(channels, size, patch):
    """VideoMAE's Conv3d tokens == patchify_3d followed by the conv weight as a linear map in (t, p, p, C) order."""
    (d, h, w), (t, p, _) = size, patch
    config = tiny_3d(num_channels=channels, num_frames=d, image_size=[h, w], patch_size=p, tubelet_size=t)
    embed = MedMAE3DModel(config).embeddings.patch_embeddings  # transformers' VideoMAEPatchEmbeddings (Conv3d)
    x = torch.randn(2, channels, d, h, w)
    with torch.no_grad():
        conv_tokens = embed(x.transpose(1, 2))  # VideoMAE takes [B, T, C, H, W]
        weight = embed.projection.weight  # [D, C, t, p, p]
        linear = (
            patchify_3d(x, patch) @ weight.permute(0, 2, 3, 4, 1).reshape(weight.shape[0], -1).T
            + embed.projection.bias
        )
    assert conv_tokens.shape == linear.shape == (2, config.num_patches, config.hidden_size)
    torch.testing.assert_close(linear, conv_tokens, rtol=1e-4, atol=1e-5)
    # The check has teeth: the within-patch order (C, t, p, p) of the weight's own layout does not match.
    wrong = patchify_3d(x, patch) @ weight.reshape(weight.shape[0], -1).T + embed.projection.bias
    assert channels == 1 or not torch.allclose(wrong, conv_tokens, atol=1e-3)  # (C=1: both orders agree)


# --- 2. fixed 3D sin-cos positions -----------------------------------------------------------------------------------


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[N] -> [N, dim]: sin then cos of positions * 1 / 10000^(k / (dim / 2)), the MAE / MONAI frequencies."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


@pytest.mark.parametrize("grid", [(2, 4, 4), (4, 2, 8), (3, 5, 2)])
@pytest.mark.parametrize("dim", [48, 36])
def test_sincos_3d_is_separable_by_construction(grid, dim):
    """MONAI's layout on our (depth, height, width) grid: channels [0, dim/3) encode the height index,
    [dim/3, 2dim/3) the depth index, [2dim/3, dim) the width index; each third depends on its axis only."""
    gd, gh, gw = grid
    table = sincos_3d(grid, dim)
    assert table.shape == (1, gd * gh * gw, dim)
    table = table[0].reshape(gd, gh, gw, dim).double()
    third = dim // 3
    z, y, x = torch.meshgrid(torch.arange(gd), torch.arange(gh), torch.arange(gw), indexing="ij")
    expected = torch.cat(
        [sincos_1d(y.flatten(), third), sincos_1d(z.flatten(), third), sincos_1d(x.flatten(), third)], dim=1
    )
    torch.testing.assert_close(table.reshape(-1, dim), expected, rtol=0, atol=1e-6)
    # Tokens of one depth slice share the depth part; of one row (h) the height part; of one column (w) the width part.
    depth_part, height_part, width_part = table[..., third : 2 * third], table[..., :third], table[..., 2 * third :]
    assert torch.equal(depth_part, depth_part[:, :1, :1].expand_as(depth_part))
    assert torch.equal(height_part, height_part[:1, :, :1].expand_as(height_part))
    assert torch.equal(width_part, width_part[:1, :1, :].expand_as(width_part))
    # Every position gets its own vector.
    flat = table.reshape(-1, dim)
    assert torch.cdist(flat, flat).add(torch.eye(flat.shape[0], dtype=flat.dtype)).min() > 1e-3


def test_position_tables_are_fixed_not_parameters_and_not_saved():
    config = tiny_3d(decoder_hidden_size=36, decoder_num_attention_heads=2)  # the decoder's own width
    model = MedMAE3DForPreTraining(config)
    encoder_table, decoder_table = model.videomae.embeddings.position_embeddings, model.position_embeddings
    assert torch.equal(encoder_table, sincos_3d(config.grid_size, 48)) and torch.equal(
        decoder_table, sincos_3d(config.grid_size, 36)
    )
    tables = {id(encoder_table), id(decoder_table)}
    assert not any(id(p) in tables for p in model.parameters()) and not any(id(b) in tables for b in model.buffers())
    assert not encoder_table.requires_grad and not decoder_table.requires_grad
    assert not [k for k in model.state_dict() if "position" in k]
    before = (encoder_table.clone(), decoder_table.clone())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(volume(config)).loss.backward()
    optimizer.step()
    assert torch.equal(model.videomae.embeddings.position_embeddings, before[0]) and torch.equal(
        model.position_embeddings, before[1]
    )


# --- 3. the loss, thrown patches, every generator --------------------------------------------------------------------


@pytest.mark.parametrize("norm_pix_loss", [True, False])
@pytest.mark.parametrize("channels, thrown", [(1, 0), (1, 8), (3, 5)])
def test_loss_is_mse_over_masked_patches_only(norm_pix_loss, channels, thrown):
    config = tiny_3d(num_channels=channels, norm_pix_loss=norm_pix_loss)
    model = MedMAE3DForPreTraining(config)
    x = volume(config) * 3 + 2  # a mean and scale of their own: norm_pix makes a difference
    codes = make_codes(2, config.num_patches, visible=8, thrown=thrown)
    out = model(x, mask_codes=codes)
    n_masked = config.num_patches - 8 - thrown
    assert out.logits.shape == (2, n_masked, 64 * channels) and torch.equal(out.mask, codes)
    target = patchify_unfold(x, config.patch_shape).double()
    if norm_pix_loss:  # each target patch normalised by its own mean and (unbiased) variance, as in the MAE
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    masked_target = torch.stack([target[b][codes[b] == MASKED] for b in range(2)])  # patch order, per sample
    expected = ((out.logits.double() - masked_target) ** 2).mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-7)
    every = torch.stack([target[b][codes[b] != VISIBLE] for b in range(2)])  # thrown ones included: not the loss
    if thrown:
        assert not torch.allclose(out.loss.double(), ((out.logits.double() - every[:, :n_masked]) ** 2).mean())
    if norm_pix_loss:
        assert masked_target.mean(-1).abs().max() < 1e-6  # the targets really are per-patch normalised
    else:
        assert masked_target.mean() > 1  # raw voxels (mean ~2)


def test_reconstruct_pastes_visible_patches_and_undoes_norm_pix():
    config = tiny_3d(num_channels=2, norm_pix_loss=True)
    model = MedMAE3DForPreTraining(config)
    x = volume(config) * 2 + 5
    codes = make_codes(2, config.num_patches, visible=8, thrown=6)
    target = model.targets(x)
    perfect = torch.stack([target[b][codes[b] == MASKED] for b in range(2)])  # a perfect normalised prediction
    recon = model.reconstruct(x, perfect, codes)
    thrown_voxels = torch.stack(
        [
            unpatchify_3d(
                (codes[b] == THROWN)[None, :, None].float().expand(1, -1, 128), config.patch_shape, config.volume_size
            )[0]
            for b in range(2)
        ]
    ).bool()
    torch.testing.assert_close(recon[~thrown_voxels], x[~thrown_voxels], rtol=1e-4, atol=1e-4)
    assert thrown_voxels.any() and (recon[thrown_voxels] == 0).all()


def test_thrown_patches_reach_neither_the_encoder_nor_the_loss():
    config = tiny_3d(num_channels=2, norm_pix_loss=False)
    model = MedMAE3DForPreTraining(config).eval()
    codes = make_codes(1, config.num_patches, visible=10, thrown=7)
    seen = {}
    handles = [
        model.videomae.embeddings.register_forward_hook(lambda m, a, out: seen.__setitem__("embeddings", out.shape)),
        model.videomae.register_forward_hook(
            lambda m, a, out: seen.__setitem__("encoder", out.last_hidden_state.shape)
        ),
    ]
    x = volume(config, batch=1)
    with torch.no_grad():
        base = model(x, mask_codes=codes)
    for handle in handles:
        handle.remove()
    assert seen["embeddings"] == seen["encoder"] == (1, 10, config.hidden_size)  # only the 0 codes are encoded
    assert base.logits.shape[1] == config.num_patches - 10 - 7  # only the 1 codes are predicted

    def changed(code: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int((codes[0] == code).nonzero()[0])
        y = x.clone()
        y[0][patch_voxels(index, config)] += 10.0
        with torch.no_grad():
            out = model(y, mask_codes=codes)
        return out.loss, out.logits

    loss, logits = changed(THROWN)
    assert torch.equal(loss, base.loss) and torch.equal(logits, base.logits)  # a thrown patch changes nothing
    loss, logits = changed(MASKED)
    assert torch.equal(logits, base.logits) and loss > base.loss + 0.1  # hidden from the encoder, but its target
    loss, logits = changed(VISIBLE)
    assert not torch.allclose(logits, base.logits)  # the encoder sees visible patches


GENERATOR_CASES = [  # (name, mask_ratio, throw_ratio, kwargs)
    ("random", 0.75, 0.0, None),
    ("block", 0.5, 0.0, {"min_block": 2}),
    ("grid", 0.75, 0.0, None),
    ("grid", 0.5, 0.0, None),
    ("foreground", 0.75, 0.0, {"temperature": 0.5, "mix": 0.2}),
    ("attention", 0.75, 0.0, None),
    ("attention", 0.75, 0.25, None),
]


@pytest.mark.parametrize("name, ratio, throw, kwargs", GENERATOR_CASES)
def test_every_generator_trains_a_3d_model_one_step(name, ratio, throw, kwargs):
    config = tiny_3d(
        num_channels=2, mask_generator=name, mask_ratio=ratio, throw_ratio=throw, mask_generator_kwargs=kwargs
    )
    model = MedMAE3DForPreTraining(config).train()
    x, ids = volume(config, batch=3), torch.arange(3)
    n_masked_total = config.num_patches - num_kept(config.num_patches, ratio)
    n_thrown = int(round(throw * config.num_patches))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # no weight decay: only what got a gradient moves
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(x, sample_ids=ids)
    assert torch.isfinite(out.loss)
    assert out.logits.shape == (3, n_masked_total - n_thrown, 64 * 2)
    assert ((out.mask == MASKED).sum(1) == n_masked_total - n_thrown).all() and (
        (out.mask == THROWN).sum(1) == n_thrown
    ).all()
    out.loss.backward()
    optimizer.step()
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("videomae.encoder.layer.0.") for k in moved) and any(
        k.startswith("decoder.") for k in moved
    )
    assert "mask_token" in moved and any(k.startswith("videomae.embeddings.patch_embeddings") for k in moved)


@pytest.mark.parametrize("throw", [0.0, 0.25])
def test_attention_maps_drive_the_3d_masks(throw):
    """Per-sample maps in `attention_bank` (what AttentionRefreshCallback stores) reach the generator by sample_ids."""
    config = tiny_3d(mask_generator="attention", mask_ratio=0.75, throw_ratio=throw)
    model = MedMAE3DForPreTraining(config).train()
    x = volume(config)
    maps = model.attention_map(x)
    assert maps.shape == (2, config.num_patches) and torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    n_removed = config.num_patches - num_kept(config.num_patches, 0.75)
    hot = [torch.randperm(config.num_patches)[:n_removed] for _ in range(2)]
    peaked = torch.full((2, config.num_patches), 1e-12)
    for b in range(2):
        peaked[b, hot[b]] = 1.0
    model.attention_bank = {7: peaked[0], 3: peaked[1]}
    out = model(x, sample_ids=torch.tensor([7, 3]))
    for b in range(2):  # the attended patches are exactly the ones taken from the encoder
        assert set((out.mask[b] != VISIBLE).nonzero().flatten().tolist()) == set(hot[b].tolist())
    assert torch.isfinite(out.loss) and ((out.mask == THROWN).sum(1) == int(round(throw * config.num_patches))).all()


@pytest.mark.parametrize("name, ratio, throw, kwargs", GENERATOR_CASES)
def test_eval_masks_are_deterministic(name, ratio, throw, kwargs):
    config = tiny_3d(mask_generator=name, mask_ratio=ratio, throw_ratio=throw, mask_generator_kwargs=kwargs)
    model = MedMAE3DForPreTraining(config).eval()
    x = volume(config, batch=4)
    first = model(x)
    torch.rand(5)  # the global RNG moves on: eval masks must not depend on it
    second = model(x)
    assert torch.equal(first.mask, second.mask) and torch.equal(first.loss, second.loss)
    if name == "random":  # teeth: training masks are drawn afresh
        model.train()
        assert not torch.equal(model(x).mask, model(x).mask)


# --- 4. bad inputs and configs name the fix --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, problem, fix",
    [
        ((2, 3, 8, 16, 16), "volumes have 3 channels but the 3D model expects 1", "num_channels: 3"),
        ((2, 1, 8, 16, 12), "input is 8x16x12 but the 3D model expects 8x16x16", "crop the volumes to 8x16x16"),
        ((2, 1, 12, 16, 16), "input is 12x16x16 but the 3D model expects 8x16x16", "crop the volumes to 8x16x16"),
        ((2, 8, 16, 16), r"\[batch, channels, depth, height, width\]", "5-D tensor"),
    ],
)
def test_bad_volumes_raise_data_error_naming_the_fix(shape, problem, fix):
    model = MedMAE3DForPreTraining(tiny_3d())
    with pytest.raises(DataError, match=problem) as err:
        model(torch.randn(*shape))
    assert fix in err.value.fix


@pytest.mark.parametrize(
    "overrides, problem, fix",
    [
        ({"num_frames": 10}, r"volume 10x16x16 .* not divisible by the patch 4x4x4", "multiple of the patch"),
        ({"image_size": 18}, r"volume 8x18x18 .* not divisible by the patch 4x4x4", "multiple of the patch"),
        ({"num_frames": 8, "tubelet_size": 3}, r"not divisible by the patch 3x4x4", "multiple of the patch"),
        ({"hidden_size": 32}, "hidden_size=32 is not divisible by 6", "divisible by 6"),
        ({"decoder_hidden_size": 64}, "decoder_hidden_size=64 is not divisible by 6", "divisible by 6"),
        (
            {"mask_generator": "checkerboard"},
            "unknown mask_generator 'checkerboard'",
            "'attention', 'block', 'foreground', 'grid', 'random'",
        ),
        ({"mask_ratio": 1.0}, "outside", "0.75"),
        ({"throw_ratio": 0.3}, "only used by the 'attention' generator", "mask_generator: attention"),
        ({"patch_size": [4, 4]}, "one in-plane patch side", "tubelet_size"),
    ],
)
def test_bad_3d_configs_raise_config_error_naming_the_fix(overrides, problem, fix):
    with pytest.raises(ConfigError, match=problem) as err:
        tiny_3d(**overrides)
    assert fix in err.value.fix


def test_segmenter_names_a_wrong_crop_size():
    seg = MedSegForSegmentation.from_encoder(MedMAE3DModel(tiny_3d()), num_labels=2, feature_size=4)
    with pytest.raises(DataError, match="volumes are 12x16x16 but the 3D encoder was built for 8x16x16") as err:
        seg(torch.randn(1, 1, 12, 16, 16))
    assert "sliding-window" in err.value.fix


def test_bare_3d_encoder_names_a_wrong_crop_size():
    encoder = MedMAE3DModel(tiny_3d())
    with pytest.raises(DataError, match="8x16x16"):
        encoder(torch.randn(1, 1, 12, 16, 16))


@pytest.mark.parametrize("case", ["unequal_visible", "wrong_length"])
def test_malformed_mask_codes_are_refused(case):
    config = tiny_3d()
    model = MedMAE3DForPreTraining(config)
    if case == "unequal_visible":
        codes = torch.ones(2, config.num_patches, dtype=torch.long)
        codes[0, :8], codes[1, :10] = VISIBLE, VISIBLE  # 8 + 10 visible: reshaped to 9 + 9
    else:
        codes = make_codes(2, config.num_patches - 1, visible=8, thrown=0)
    with pytest.raises(DataError):
        model(volume(config), mask_codes=codes)


# --- 5. encoder hand-over: UNETR, load_encoder, Auto classes, U-Net, layer decay -------------------------------------


@pytest.mark.parametrize("patch, size", [(2, (8, 16, 16)), (4, (8, 16, 16)), (8, (16, 32, 32))])
def test_from_encoder_copies_every_tensor_and_segments_at_full_resolution(patch, size):
    d, h, w = size
    config = tiny_3d(num_frames=d, image_size=h, patch_size=patch, tubelet_size=patch)
    mae = MedMAE3DForPreTraining(config).eval()
    seg = MedSegForSegmentation.from_encoder(mae.videomae, num_labels=3, feature_size=4).eval()
    assert seg.config.spatial_dims == 3 and type(seg.vit) is MedMAE3DModel
    assert seg.config.skip_layers == default_skip_layers(2, int(math.log2(patch)))
    ours, theirs = seg.vit.state_dict(), mae.videomae.state_dict()
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    x = torch.randn(2, 1, d, h, w)
    with torch.no_grad():  # positions are not in the state dict: the encoder outputs show they match too
        assert torch.equal(seg.vit(x).last_hidden_state, mae.videomae(x).last_hidden_state)
    seg.train()
    labels = torch.randint(0, 3, (2, d, h, w))
    out = seg(x, labels=labels)
    assert out.logits.shape == (2, 3, d, h, w) and torch.isfinite(out.loss)
    out.loss.backward()
    assert seg.vit.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0


def test_anisotropic_patches_are_refused_for_unetr():
    mae = MedMAE3DForPreTraining(tiny_3d(tubelet_size=2))  # 2 x 4 x 4 patches: fine for the MAE
    with pytest.raises(ConfigError, match="cubic patches") as err:
        MedSegForSegmentation.from_encoder(mae.videomae, num_labels=2)
    assert "tubelet_size: 4" in err.value.fix


@pytest.fixture
def saved_3d(tmp_path):
    """A saved 3D MAE (with a preprocessor_config) and a saved 3D segmenter built on its encoder."""
    mae = MedMAE3DForPreTraining(tiny_3d(num_channels=2)).eval()
    mae.save_pretrained(tmp_path / "mae")
    ViTImageProcessorPil(
        do_resize=False, do_rescale=False, image_mean=[0.1, 0.2], image_std=[0.5, 0.6]
    ).save_pretrained(tmp_path / "mae")
    seg = MedSegForSegmentation.from_encoder(mae.videomae, num_labels=3, feature_size=4)
    with torch.no_grad():  # the segmenter's encoder moves away from the MAE's, as after fine-tuning
        for param in seg.vit.parameters():
            param.add_(0.01 * torch.randn_like(param))
    seg.eval().save_pretrained(tmp_path / "seg")
    return mae, seg, tmp_path


def test_load_encoder_returns_the_3d_encoder_of_an_mae_and_of_a_segmenter(saved_3d):
    mae, seg, folder = saved_3d
    x = torch.randn(2, 2, 8, 16, 16)
    for path, original, mean in ((folder / "mae", mae.videomae, [0.1, 0.2]), (folder / "seg", seg.vit, None)):
        encoder = load_encoder(path)
        assert type(encoder) is MedMAE3DModel and encoder.config.volume_size == (8, 16, 16)
        assert encoder.image_mean == mean
        with torch.no_grad():
            assert torch.equal(encoder.eval()(x).last_hidden_state, original(x).last_hidden_state)
    assert not torch.equal(
        load_encoder(folder / "seg").state_dict()["encoder.layer.0.output.dense.weight"],
        mae.videomae.state_dict()["encoder.layer.0.output.dense.weight"],
    )  # each its own weights
    with pytest.raises(ConfigError, match="cannot be changed for a 3D encoder"):
        load_encoder(folder / "mae", image_size=32)


def test_3d_unet_baseline():
    model = build_unet_baseline(2, 3, spatial_dims=3, features=TINY_UNET)
    out = model(torch.randn(1, 2, 16, 32, 32), labels=torch.randint(0, 3, (1, 16, 32, 32)))
    assert out.logits.shape == (1, 3, 16, 32, 32) and torch.isfinite(out.loss)
    with pytest.raises(DataError, match="not divisible by 16"):
        model(torch.randn(1, 2, 8, 32, 32))


def test_layer_decay_groups_on_a_3d_segmenter():
    mae = MedMAE3DForPreTraining(tiny_3d(num_hidden_layers=3))
    seg = MedSegForSegmentation.from_encoder(mae.videomae, num_labels=2, feature_size=4)
    groups = param_groups_layer_decay(seg, base_lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    lr_of = {name: group["lr"] for group in groups for name in group["param_names"]}
    names = [n for n, p in seg.named_parameters() if p.requires_grad]
    assert sorted(lr_of) == sorted(names)  # every trainable parameter in exactly one group
    block_lr = []
    for block in range(3):
        lrs = {lr for n, lr in lr_of.items() if n.startswith(f"vit.encoder.layer.{block}.")}
        assert len(lrs) == 1, (block, lrs)  # VideoMAE's `encoder.layer.N` names are recognised as block N
        block_lr.append(lrs.pop())
    (embed_lr,) = {lr for n, lr in lr_of.items() if n.startswith("vit.embeddings.")}
    assert block_lr == pytest.approx([1e-3 * 0.5**3, 1e-3 * 0.5**2, 1e-3 * 0.5])  # deeper blocks learn faster
    assert embed_lr == pytest.approx(1e-3 * 0.5**4)
    assert all(lr == 1e-3 for n, lr in lr_of.items() if n.startswith("decoder.") or n.startswith("vit.layernorm."))
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["param_names"]}
    assert all(n in no_decay for n, p in seg.named_parameters() if p.ndim <= 1)


# --- 6. Hub round trip -----------------------------------------------------------------------------------------------


def saved_3d_mae_for_hub(folder):
    torch.manual_seed(0)
    model = MedMAE3DForPreTraining(tiny_3d(num_channels=2, mask_generator="block", mask_ratio=0.5)).eval()
    with torch.no_grad():
        metrics = {"eval_loss": model(torch.randn(2, 2, 8, 16, 16)).loss.item()}
    model.save_pretrained(folder)
    ViTImageProcessorPil(
        do_resize=False, do_rescale=False, image_mean=[0.0, 0.0], image_std=[1.0, 1.0]
    ).save_pretrained(folder)
    (folder / "metrics.json").write_text(json.dumps({**metrics, "eval_runtime": 0.01, "epoch": 1.0}))
    (folder / "run_info.json").write_text(
        json.dumps({"dataset": "embedded:nuclei3d", "steps": 4, "command": "pytest tests/test_3d.py"})
    )
    return model, metrics


def test_3d_mae_hub_round_trip_with_its_card(hub_server, tmp_path):
    folder = tmp_path / "ckpt"
    model, metrics = saved_3d_mae_for_hub(folder)
    repo_id = "medmae-test/tiny-mae3d"
    sha = push_checkpoint(folder, repo_id)
    local = pull_checkpoint(repo_id, cache_dir=tmp_path / "cache")
    assert Path(local).name == sha  # the snapshot pulled is the commit pushed
    files = {p.name for p in Path(local).iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "metrics.json",
        "run_info.json",
        "README.md",
    } <= files
    x, codes = torch.randn(2, 2, 8, 16, 16), make_codes(2, 32, visible=16, thrown=0)
    for loaded in (MedMAE3DForPreTraining.from_pretrained(repo_id), AutoModelForPreTraining.from_pretrained(local)):
        assert type(loaded) is MedMAE3DForPreTraining and loaded.config.mask_generator == "block"
        assert torch.equal(loaded.eval()(x, mask_codes=codes).logits, model(x, mask_codes=codes).logits)
    encoder = load_encoder(repo_id)  # the Hub repo id straight into transfer
    assert type(encoder) is MedMAE3DModel
    with torch.no_grad():
        assert torch.equal(encoder.eval()(x).last_hidden_state, model.videomae(x).last_hidden_state)
    assert hub_server.unhandled == []

    card = ModelCard.load(f"{local}/README.md")
    meta = card.data.to_dict()
    assert (
        "3d" in meta["tags"] and "videomae" in meta["tags"] and meta["tags"][-1] == "self-supervised"
    )  # the MAE kind
    assert "masked-autoencoder" in meta["tags"] and meta.get("pipeline_tag") is None
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == metrics
    assert {r.task_type for r in card.data.eval_results} == {"masked-image-modeling"}
    assert ModelCardData(**meta).to_dict() == meta
    card.validate()
    assert "masked autoencoder (MAE)" in card.text and "MedMAE3DForPreTraining.from_pretrained" in card.text
    assert "embedded:nuclei3d" in card.text and "| mask generator | block |" in card.text


def test_3d_mae_card_names_attributes_the_model_has(tmp_path):
    import re

    model, _ = saved_3d_mae_for_hub(tmp_path)
    text = render_model_card(tmp_path, repo_id="me/mae3d").text
    attributes = re.findall(r"`model\.(\w+)`", text)
    assert attributes and all(hasattr(model, a) for a in attributes), attributes


# --- 7. end to end on the embedded z-stack ---------------------------------------------------------------------------

MAE_ARGS = [
    "--config",
    str(ROOT / "configs" / "nuclei3d_mae.yaml"),
    "--hidden_size",
    "48",
    "--num_hidden_layers",
    "2",
    "--num_attention_heads",
    "2",
    "--intermediate_size",
    "96",
    "--decoder_hidden_size",
    "48",
    "--decoder_num_hidden_layers",
    "1",
    "--decoder_num_attention_heads",
    "2",
    "--decoder_intermediate_size",
    "96",
    "--roi_size",
    "16",
    "32",
    "32",
    "--patch_size",
    "8",
    "--tubelet_size",
    "8",
    "--samples_per_volume",
    "2",
    "--max_steps",
    "4",
    "--eval_steps",
    "2",
    "--save_steps",
    "2",
    "--per_device_train_batch_size",
    "2",
    # both checkpoints kept (the resume test restarts from checkpoint-2); fixed precision: runs are compared
    "--save_total_limit",
    "2",
    "--logging_steps",
    "1",
    "--precision",
    "fp32",
]
SEG_ARGS = [
    "--config",
    str(ROOT / "configs" / "nuclei3d_segmentation.yaml"),
    "--model",
    "unetr",
    "--init",
    "mae",
    "--roi_size",
    "16",
    "32",
    "32",
    "--feature_size",
    "8",
    "--samples_per_volume",
    "2",
    "--max_steps",
    "2",
    "--eval_steps",
    "2",
    "--save_steps",
    "2",
    "--per_device_train_batch_size",
    "2",
    "--per_device_eval_batch_size",
    "8",
    "--precision",
    "fp32",
]
QUADRANT_VOXELS = 60 * 128 * 128  # one test quadrant of the embedded stack, segmented whole


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    """A tiny 3D MAE, 4 steps on the embedded nuclei z-stack: (output folder, returned metrics)."""
    out = tmp_path_factory.mktemp("mae3d") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two shared cores stall each other
    try:
        metrics = pretrain.main([*MAE_ARGS, "--output_dir", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out, metrics


def test_pretrain_3d_end_to_end(mae_run):
    out, metrics = mae_run
    for name in (
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "reconstruction.png",
        "all_results.json",
        "run_info.json",
        "checkpoint-2",
        "checkpoint-4",
    ):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "medmae3d" and config["num_frames"] == 16 and config["image_size"] == [32, 32]
    assert (config["patch_size"], config["tubelet_size"], config["hidden_size"], config["num_channels"]) == (
        8,
        8,
        48,
        1,
    )
    # 4 quadrants: 1 validation volume, 3 training volumes x samples_per_volume 2 crops
    assert metrics["global_step"] == 4 and metrics["num_train_crops"] == 6 and len(metrics["train_volumes"]) == 3
    assert metrics["roi_size"] == [16, 32, 32] and metrics["intensity"] == "percentile"
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0
    assert metrics["eval_loss_mean_predictor"] > 0
    assert json.loads((out / "all_results.json").read_text())["eval_loss"] == pytest.approx(metrics["eval_loss"])
    with Image.open(out / "reconstruction.png") as image:
        assert min(image.size) > 50
    final = MedMAE3DForPreTraining.from_pretrained(out).eval()
    last = MedMAE3DForPreTraining.from_pretrained(out / "checkpoint-4").eval()
    x, codes = torch.randn(2, 1, 16, 32, 32), make_codes(2, 32, visible=8, thrown=0)  # a 2 x 4 x 4 grid
    assert torch.equal(final(x, mask_codes=codes).logits, last(x, mask_codes=codes).logits)
    assert not torch.equal(
        final(x, mask_codes=codes).logits, MedMAE3DForPreTraining(final.config).eval()(x, mask_codes=codes).logits
    )


def test_pretrain_3d_resumes_from_the_last_complete_checkpoint(mae_run, tmp_path, one_thread):
    """A run killed after checkpoint-2 (checkpoint-4 half-written) continues from checkpoint-2 and ends where the
    uninterrupted run ended."""
    full, _ = mae_run
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    state_file = resumed / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"].append({"step": 2, "resume_marker": "written into checkpoint-2 only"})
    state_file.write_text(json.dumps(state))
    (resumed / "checkpoint-4").mkdir()
    (resumed / "checkpoint-4" / "config.json").write_text("{}")  # half-written: must not be picked
    metrics = pretrain.main([*MAE_ARGS, "--output_dir", str(resumed), "--resume_from_checkpoint", "true"])
    assert metrics["global_step"] == 4
    assert metrics["precision_from"].endswith("checkpoint-2/measured_choices.json")
    history = json.loads((resumed / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert any(h.get("resume_marker") for h in history)  # the state it continued from is checkpoint-2's
    steps = [h["step"] for h in history if "loss" in h]
    assert steps == [1, 2, 3, 4]
    full_history = json.loads((full / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    losses = lambda hist: [h["loss"] for h in hist if "loss" in h]  # noqa: E731
    assert losses(history) == pytest.approx(losses(full_history), rel=1e-5)
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def check_segmentation_outputs(out, metrics, model: str) -> dict:
    for name in (
        "model.safetensors",
        "config.json",
        "test_metrics.json",
        "overlays.png",
        "confusion_matrix.png",
        "inference_config.json",
        "all_results.json",
    ):
        assert (out / name).is_file(), name
    test = json.loads((out / "test_metrics.json").read_text())
    assert 0.0 <= test["mean_dice"] <= 1.0 and metrics["test_mean_dice"] == pytest.approx(test["mean_dice"])
    assert set(test["dice_per_class"]) == set(test["hd95_per_class"]) == {"background", "nucleus"}
    assert all(0.0 <= v <= 1.0 for v in test["dice_per_class"].values())
    assert test["mean_dice"] == pytest.approx(np.mean(list(test["dice_per_class"].values())))
    assert all(v is None or v >= 0 for v in test["hd95_per_class"].values())
    cm = np.asarray(test["confusion_matrix"])
    assert cm.shape == (2, 2) and cm.sum() == QUADRANT_VOXELS and test["n_pixels"] == QUADRANT_VOXELS
    assert len(test["test_volumes"]) == 1 and test["test_volumes"][0] not in metrics["train_volumes"]
    inference = json.loads((out / "inference_config.json").read_text())
    assert inference["spatial_dims"] == 3 and inference["roi_size"] == [16, 32, 32] and inference["model"] == model
    assert inference["class_names"] == ["background", "nucleus"]
    for name in ("overlays.png", "confusion_matrix.png"):
        with Image.open(out / name) as image:
            assert min(image.size) > 50
    assert json.loads((out / "config.json").read_text())["spatial_dims"] == 3
    assert metrics["global_step"] == 2
    return test


def test_segment_3d_unetr_on_the_pretrained_encoder(mae_run, tmp_path, one_thread):
    mae_dir, _ = mae_run
    out = tmp_path / "seg"
    metrics = segment.main([*SEG_ARGS, "--model_name_or_path", str(mae_dir), "--output_dir", str(out)])
    check_segmentation_outputs(out, metrics, "unetr")
    assert metrics["labelled_voxel_fraction"] == 1.0
    # init mae: the run's encoder started from the MAE's (two small Adam steps away), not from a random one
    mae = load_file(mae_dir / "model.safetensors")
    seg = load_file(out / "model.safetensors")
    key = "encoder.layer.0.attention.attention.query.weight"
    assert (seg[f"vit.{key}"] - mae[f"videomae.{key}"]).abs().max() < 5e-3
    scratch = MedSegForSegmentation(AutoConfig.from_pretrained(out)).state_dict()[f"vit.{key}"]
    assert (scratch - mae[f"videomae.{key}"]).abs().max() > 2e-2
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(out)
    assert type(reloaded.vit) is MedMAE3DModel and reloaded.config.id2label[1] == "nucleus"
    assert type(load_encoder(out)) is MedMAE3DModel  # the run's segmenter is itself a 3D encoder source


def test_segment_3d_unet_baseline_from_scratch(mae_run, tmp_path, one_thread):
    out = tmp_path / "unet"
    metrics = segment.main(
        [
            *SEG_ARGS,
            "--model",
            "unet",
            "--init",
            "scratch",
            "--unet_features",
            "4",
            "4",
            "8",
            "8",
            "16",
            "4",
            "--output_dir",
            str(out),
        ]
    )
    check_segmentation_outputs(out, metrics, "unet")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "medmae_unet" and config["features"] == [4, 4, 8, 8, 16, 4]


def test_segment_3d_sparse_labels_with_dice_ce(mae_run, tmp_path, one_thread):
    mae_dir, _ = mae_run
    out = tmp_path / "sparse"
    metrics = segment.main(
        [*SEG_ARGS, "--model_name_or_path", str(mae_dir), "--label_fraction_voxels", "0.05", "--output_dir", str(out)]
    )
    test = check_segmentation_outputs(out, metrics, "unetr")
    assert json.loads((out / "config.json").read_text())["loss"] == "dice_ce"
    assert metrics["labelled_voxel_fraction"] == pytest.approx(0.05, abs=0.002)
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
    assert test["n_ignored"] == 0  # only training labels are thinned; the test volume is scored densely


def test_segment_3d_train_volumes_labels_a_nested_seeded_subset(tmp_path, one_thread):
    """A 3D few-label curve: train_volumes 1 labels one of the seed's training volumes, the same one whatever the
    run, and a count above the split is named."""
    unet = ["--model", "unet", "--init", "scratch", "--unet_features", "4", "4", "8", "8", "16", "4"]
    names = []
    for run in ("a", "b"):
        metrics = segment.main([*SEG_ARGS, *unet, "--train_volumes", "1", "--output_dir", str(tmp_path / run)])
        names.append(metrics["train_volumes"])
    full = segment.main([*SEG_ARGS, *unet, "--max_steps", "1", "--output_dir", str(tmp_path / "all")])
    assert len(names[0]) == 1 and names[0] == names[1] and set(names[0]) < set(full["train_volumes"])
    with pytest.raises(ConfigError, match="train_volumes=3, but the training split holds 2 volumes") as err:
        segment.main([*SEG_ARGS, *unet, "--train_volumes", "3", "--output_dir", str(tmp_path / "bad")])
    assert "use 1 to 2" in err.value.fix


# --- 8. a 2D-only key in a 3D run ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "main, argv, key",
    [
        (pretrain.main, ["--spatial_dims", "3", "--tile_size", "64"], "tile_size"),
        (pretrain.main, ["--config", str(ROOT / "configs" / "nuclei3d_mae.yaml"), "--image_size", "64"], "image_size"),
        (segment.main, ["--spatial_dims", "3", "--crop_mode", "random_crop"], "crop_mode"),
        (
            segment.main,
            ["--config", str(ROOT / "configs" / "nuclei3d_segmentation.yaml"), "--label_fraction_pixels", "0.1"],
            "label_fraction_pixels",
        ),
    ],
)
def test_2d_only_key_in_a_3d_run_is_a_named_config_error(tmp_path, main, argv, key):
    with pytest.raises(ConfigError, match=f"unknown config key.*'{key}'") as err:
        main([*argv, "--output_dir", str(tmp_path / "o")])
    assert "--help" in err.value.fix
    assert not (tmp_path / "o").exists()  # refused before anything ran


def test_2d_only_key_in_a_3d_config_file_prints_the_fix_without_traceback(tmp_path, monkeypatch, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("spatial_dims: 3\ntrain_data: embedded:nuclei3d\ntile_size: 64\n")
    monkeypatch.setattr(sys, "argv", ["run_mae.py", "--config", str(config), "--output_dir", str(tmp_path / "o")])
    monkeypatch.delenv("HF_MEDMAE_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        pretrain.cli()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown config key(s): 'tile_size'" in err and "fix:" in err and "Traceback" not in err


def test_2d_model_keys_in_a_3d_segmentation_are_named_config_errors(tmp_path):
    config = str(ROOT / "configs" / "nuclei3d_segmentation.yaml")
    with pytest.raises(ConfigError, match="image_size is a key of 2D runs") as err:
        segment.main(["--config", config, "--image_size", "64", "--output_dir", str(tmp_path / "o")])
    assert "roi_size" in err.value.fix


def test_3d_predict_only_names_the_volume_keys_it_needs(tmp_path):
    config = str(ROOT / "configs" / "nuclei3d_segmentation.yaml")
    with pytest.raises(ConfigError, match="predict_only needs predict_volumes") as err:
        segment.main(["--config", config, "--predict_only", "--output_dir", str(tmp_path / "o")])
    assert "--predict_volumes FOLDER" in err.value.fix
