"""Statistics of every mask generator: exact counts, spatial structure, seeding, preferences."""

from __future__ import annotations

import pytest
import torch

from hf_medmae.errors import ConfigError
from hf_medmae.masking import MASK_GENERATORS, MASKED, THROWN, VISIBLE, build_mask_generator, codes_to_noise, num_kept


def make(name, ratio=0.75, grid=(8, 8), **kw):
    return build_mask_generator(name, mask_ratio=ratio, grid_size=grid, **kw)


def call(gen, batch=16, seed=0, pixels=None, scores=None):
    return gen(batch, pixel_values=pixels, scores=scores, generator=torch.Generator().manual_seed(seed))


def adjacent_masked_pairs(codes, grid):
    m = (codes != VISIBLE).reshape(-1, *grid).float()
    return ((m[:, 1:] * m[:, :-1]).sum() + (m[:, :, 1:] * m[:, :, :-1]).sum()).item() / len(m)


@pytest.mark.parametrize("name", sorted(MASK_GENERATORS))
@pytest.mark.parametrize("ratio,grid", [(0.125, (8, 8)), (0.5, (16, 16)), (0.75, (14, 14)), (0.9, (8, 8)), (0.75, (4, 6))])
def test_exact_count_matches_transformers(name, ratio, grid):
    gen = make(name, ratio, grid)
    pixels = torch.randn(8, 3, grid[0] * 4, grid[1] * 4)
    codes = call(gen, 8, pixels=pixels)
    removed = (codes != VISIBLE).sum(1)
    expected = grid[0] * grid[1] - num_kept(grid[0] * grid[1], ratio)
    assert removed.tolist() == [expected] * 8
    assert expected == round(ratio * grid[0] * grid[1])  # HF's rule equals round(ratio * L) at these ratios


@pytest.mark.parametrize("name", sorted(MASK_GENERATORS))
def test_seeded_determinism_and_variety(name):
    gen = make(name)
    pixels = torch.randn(4, 3, 32, 32)
    assert torch.equal(call(gen, 4, seed=3, pixels=pixels), call(gen, 4, seed=3, pixels=pixels))
    assert not torch.equal(call(gen, 4, seed=3, pixels=pixels), call(gen, 4, seed=4, pixels=pixels))
    codes = call(gen, 4, pixels=pixels)
    assert len({tuple(row.tolist()) for row in codes}) > 1  # samples in a batch get different masks


def test_codes_pass_through_transformers_noise_exactly():
    from transformers import ViTMAEConfig
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEEmbeddings

    emb = ViTMAEEmbeddings(ViTMAEConfig(image_size=32, patch_size=4, hidden_size=16, mask_ratio=0.75))
    codes = call(make("block"), 8)
    _, mask, _ = emb.random_masking(torch.randn(8, 64, 16), noise=codes_to_noise(codes))
    assert torch.equal(mask.bool(), codes != VISIBLE)


def test_block_masks_are_contiguous():
    grid = (14, 14)
    block = adjacent_masked_pairs(call(make("block", 0.5, grid), 64), grid)
    rand = adjacent_masked_pairs(call(make("random", 0.5, grid), 64), grid)
    assert block > 1.3 * rand  # blocks share far more edges than scattered patches


def test_grid_is_regular():
    grid = (8, 8)
    checker = call(make("grid", 0.5, grid), 8).reshape(-1, *grid)
    # ratio 0.5 is a checkerboard: no two horizontally or vertically adjacent patches share a state
    assert (checker[:, 1:] != checker[:, :-1]).all() and (checker[:, :, 1:] != checker[:, :, :-1]).all()
    low = call(make("grid", 0.125, grid), 8).reshape(-1, *grid)
    assert adjacent_masked_pairs(low.flatten(1), grid) == 0  # 1-in-8 masked patches never touch
    # every 4x4 quarter of the grid gets its share (2 of 16) of the masked patches
    quarters = low.reshape(-1, 2, 4, 2, 4).sum(dim=(2, 4))
    assert (quarters == 2).all()


def test_foreground_prefers_textured_patches():
    torch.manual_seed(0)
    pixels = torch.zeros(32, 3, 32, 32)
    pixels[:, :, :16, :16] = torch.randn(32, 3, 16, 16)  # texture in the top-left quarter (16 of 64 patches)
    fg = make("foreground", 0.25, temperature=0.5, mix=0.0)
    codes = call(fg, 32, pixels=pixels).reshape(32, 8, 8)
    assert (codes[:, :4, :4] == MASKED).float().mean() > 0.9  # budget (16) spent on the textured quarter
    uniform = call(make("foreground", 0.25, mix=1.0), 32, pixels=pixels).reshape(32, 8, 8)
    assert (uniform[:, :4, :4] == MASKED).float().mean() < 0.5  # mix=1 is plain random masking
    with pytest.raises(ConfigError, match="temperature"):
        make("foreground", temperature=0.0)


def test_attention_masks_and_throws_most_attended():
    gen = make("attention", 0.75, (8, 8), throw_ratio=0.25)
    scores = torch.full((64, 64), 1e-4)
    scores[:, :16] = 1.0  # the first 16 patches hold nearly all attention
    codes = call(gen, 64, scores=scores)
    assert ((codes == MASKED).sum(1) == 48 - 16).all() and ((codes == THROWN).sum(1) == 16).all()
    assert (codes[:, :16] != VISIBLE).float().mean() > 0.95
    assert (codes[:, 16:] == VISIBLE).float().mean() > 0.3
    # without maps (warm-up) it masks at random with the same counts
    warm = call(gen, 8)
    assert ((warm != VISIBLE).sum(1) == 48).all()


def test_bad_names_and_settings():
    with pytest.raises(ConfigError, match="unknown mask_generator 'nope'"):
        make("nope")
    with pytest.raises(ConfigError, match="do not fit"):
        make("grid", block_size=3)
    with pytest.raises(ConfigError, match="outside"):
        make("random", 1.0)
    with pytest.raises(ConfigError, match="throw_ratio"):
        make("attention", 0.5, throw_ratio=0.5)
