"""Statistics of every mask generator: exact counts, spatial structure, seeding, preferences."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from hf_medmae.errors import ConfigError, DataError
from hf_medmae.masking import (
    MASK_GENERATORS,
    MASKED,
    THROWN,
    VISIBLE,
    build_mask_generator,
    codes_to_noise,
    num_kept,
    patch_statistic,
)


def make(name, ratio=0.75, grid=(8, 8), **kw):
    return build_mask_generator(name, mask_ratio=ratio, grid_size=grid, **kw)


def call(gen, batch=16, seed=0, pixels=None, scores=None):
    return gen(batch, pixel_values=pixels, scores=scores, generator=torch.Generator().manual_seed(seed))


def adjacent_masked_pairs(codes, grid):
    m = (codes != VISIBLE).reshape(-1, *grid).float()
    return ((m[:, 1:] * m[:, :-1]).sum() + (m[:, :, 1:] * m[:, :, :-1]).sum()).item() / len(m)


@pytest.mark.parametrize("name", sorted(MASK_GENERATORS))
@pytest.mark.parametrize(
    "ratio,grid", [(0.125, (8, 8)), (0.5, (16, 16)), (0.75, (14, 14)), (0.9, (8, 8)), (0.75, (4, 6))]
)
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


# --- 3D patch grids (depth, height, width), patch index (d * gh + h) * gw + w ---------------------------------

GRIDS_3D = [(4, 4, 4), (2, 8, 8), (4, 6, 6)]
RATIOS_3D = [0.125, 0.5, 0.75, 0.9]


def neighbours(mask):
    """Each face-adjacent pair of patches once, one axis at a time. mask: [B, *grid] -> (first, second) pairs."""
    return [(mask.narrow(a, 1, n - 1), mask.narrow(a, 0, n - 1)) for a, n in enumerate(mask.shape[1:], 1)]


def face_pairs(mask):
    """Face-adjacent pairs of True patches per sample, any grid dims (`adjacent_masked_pairs` in 3D)."""
    return sum((x & y).sum() for x, y in neighbours(mask)).item() / len(mask)


def boundary(mask):
    """Face-adjacent pairs of patches in different states, per sample: low when the mask is in clumps."""
    return sum((x != y).sum() for x, y in neighbours(mask)).item() / len(mask)


def cell_counts(mask, k=2):
    """Masked patches in each aligned k x k x k sub-cube. [B, gd, gh, gw] -> [B, gd/k, gh/k, gw/k]."""
    b, gd, gh, gw = mask.shape
    return mask.reshape(b, gd // k, k, gh // k, k, gw // k, k).sum(dim=(2, 4, 6))


def call_3d(name, ratio, grid, batch=8, seed=0, **kw):
    """A 3D generator called on a random volume of 2x2x2-voxel patches (scores too for attention)."""
    pixels = torch.randn(batch, 1, *(2 * g for g in grid))
    scores = torch.rand(batch, math.prod(grid)) if name == "attention" else None
    return call(make(name, ratio, grid, **kw), batch, seed=seed, pixels=pixels, scores=scores)


@pytest.mark.parametrize("name", sorted(MASK_GENERATORS))
@pytest.mark.parametrize("ratio", RATIOS_3D)
@pytest.mark.parametrize("grid", GRIDS_3D)
def test_3d_exact_count_matches_transformers(name, ratio, grid):
    codes = call_3d(name, ratio, grid)
    num_patches = math.prod(grid)
    assert codes.shape == (8, num_patches) and codes.dtype == torch.uint8
    assert (codes != VISIBLE).sum(1).tolist() == [num_patches - num_kept(num_patches, ratio)] * 8


@pytest.mark.parametrize("name", sorted(MASK_GENERATORS))
@pytest.mark.parametrize("grid", GRIDS_3D)
def test_3d_seeded_determinism_and_variety(name, grid):
    torch.manual_seed(0)  # the same volume (and attention map) for every call below
    first = call_3d(name, 0.5, grid, batch=4, seed=3)
    torch.manual_seed(0)
    assert torch.equal(first, call_3d(name, 0.5, grid, batch=4, seed=3))
    torch.manual_seed(0)
    assert not torch.equal(first, call_3d(name, 0.5, grid, batch=4, seed=4))
    assert len({tuple(row.tolist()) for row in first}) > 1  # samples in a batch get different masks


@pytest.mark.parametrize("ratio", RATIOS_3D)
def test_3d_random_masks_every_patch_equally_often(ratio):
    grid, draws = (4, 6, 6), 4000
    gen = make("random", ratio, grid)
    freq = (call(gen, draws) == MASKED).float().mean(0)  # [L], per-patch masking frequency
    p = gen.num_masked / gen.num_patches
    assert (freq - p).abs().max() < 5 * math.sqrt(p * (1 - p) / draws)  # 5 sigma, over 144 patches


@pytest.mark.parametrize("ratio", RATIOS_3D)
@pytest.mark.parametrize("grid", GRIDS_3D)
def test_3d_block_masks_are_contiguous(ratio, grid):
    block = call_3d("block", ratio, grid, batch=64).reshape(-1, *grid) != VISIBLE
    rand = call_3d("random", ratio, grid, batch=64).reshape(-1, *grid) != VISIBLE
    assert face_pairs(block) > face_pairs(rand)  # boxes share more faces than scattered patches ...
    assert boundary(block) < 0.85 * boundary(rand)  # ... and leave a shorter masked/visible surface


def test_3d_blocks_are_boxes():
    gen = make("block", 0.5, (4, 6, 6))
    for seed in range(20):
        first = torch.from_numpy(gen._rank(np.random.default_rng(seed)) == 0).reshape(4, 6, 6)
        where = torch.nonzero(first)  # [n, 3] patch coordinates of the first block
        assert len(where) == (where.amax(0) - where.amin(0) + 1).prod()  # it fills its bounding box


def grid_is_regular(codes, grid, ratio):
    """The dither's guarantees on a grid of even sides: every aligned 2x2x2 cell gets its share of the mask when
    8 * ratio is whole, the rarer state (masked at ratio <= 0.5, else visible) never touches itself face to face,
    and at 0.5 it is a 3D checkerboard."""
    masked = codes.reshape(-1, *grid) != VISIBLE
    regular = face_pairs(masked if ratio <= 0.5 else ~masked) == 0
    if (8 * ratio).is_integer():
        regular &= bool((cell_counts(masked) == 8 * ratio).all())
    if ratio == 0.5:
        regular &= all(bool((x != y).all()) for x, y in neighbours(masked))
    return regular


@pytest.mark.parametrize("ratio", [0.125, 0.25, 0.5, 0.75, 0.875, 0.9])
@pytest.mark.parametrize("grid", GRIDS_3D)
def test_3d_grid_is_regular(ratio, grid):
    assert grid_is_regular(call_3d("grid", ratio, grid, batch=16), grid, ratio)
    assert not grid_is_regular(call_3d("random", ratio, grid, batch=16), grid, ratio)  # the check has teeth


@pytest.mark.parametrize("ratio", [1 / 64, 1 / 16, 1 / 8])
def test_3d_grid_spreads_over_larger_cubes(ratio):
    grid = (8, 8, 8)  # every aligned 4x4x4 sub-cube gets its share (64 * ratio) of the masked patches
    assert (cell_counts(call_3d("grid", ratio, grid).reshape(-1, *grid) != VISIBLE, k=4) == 64 * ratio).all()
    assert not (cell_counts(call_3d("random", ratio, grid).reshape(-1, *grid) != VISIBLE, k=4) == 64 * ratio).all()


def test_3d_grid_offsets_vary_along_each_axis():
    grid = (4, 6, 6)  # at 0.125 each image masks one corner class of the 2x2x2 cells; its offsets pick which
    masked = call_3d("grid", 0.125, grid, batch=64).reshape(-1, *grid) != VISIBLE
    phases = {tuple(int(x) % 2 for x in torch.nonzero(image)[0]) for image in masked}
    assert len(phases) == 8  # all 8 corners occur: the offsets move independently in depth, height and width


def test_3d_patch_statistic_follows_patch_order():
    pixels = torch.randn(2, 3, 8, 12, 16)
    stats = patch_statistic(pixels, (2, 3, 4))  # patches of 4x4x4 voxels
    for d, h, w in itertools.product(range(2), range(3), range(4)):
        patch = pixels[:, :, 4 * d : 4 * d + 4, 4 * h : 4 * h + 4, 4 * w : 4 * w + 4].reshape(2, -1)
        assert torch.allclose(stats[:, (d * 3 + h) * 4 + w], patch.std(dim=1))
    with pytest.raises(DataError, match="patch grid"):
        patch_statistic(pixels, (3, 4))  # a volume needs a 3D grid


def test_3d_foreground_prefers_textured_patches():
    torch.manual_seed(0)
    pixels = torch.zeros(32, 1, 16, 16, 16)  # a (4, 4, 4) grid of 4x4x4-voxel patches
    pixels[:, :, :8, :8, :8] = torch.randn(32, 1, 8, 8, 8)  # texture in one corner octant (8 of 64 patches)
    textured = torch.zeros(4, 4, 4, dtype=torch.bool)
    textured[:2, :2, :2] = True
    codes = call(make("foreground", 0.125, (4, 4, 4), mix=0.0), 32, pixels=pixels).reshape(32, 4, 4, 4)
    assert (codes[:, textured] == MASKED).float().mean() > 0.9  # budget (8) spent on the textured octant
    assert (codes[:, ~textured] == MASKED).float().mean() < 0.02
    uniform = call(make("foreground", 0.125, (4, 4, 4), mix=1.0), 32, pixels=pixels).reshape(32, 4, 4, 4)
    assert (uniform[:, textured] == MASKED).float().mean() < 0.5  # mix=1 is plain random masking
    with pytest.raises(DataError, match="patch grid"):
        call(make("foreground", 0.125, (4, 4)), 32, pixels=pixels)  # a volume with a 2D grid


@pytest.mark.parametrize("grid", [(4, 4, 4), (2, 8, 8)])
def test_3d_attention_masks_and_throws_most_attended(grid):
    num_patches = math.prod(grid)
    gen = make("attention", 0.75, grid, throw_ratio=0.25)
    scores = torch.full((64, num_patches), 1e-4)
    hot = torch.randperm(num_patches, generator=torch.Generator().manual_seed(0))[: num_patches // 4]
    scores[:, hot] = 1.0  # a quarter of the patches, scattered through the volume, hold nearly all attention
    codes = call(gen, 64, scores=scores)
    thrown = round(0.25 * num_patches)
    assert ((codes == MASKED).sum(1) == gen.num_masked - thrown).all() and ((codes == THROWN).sum(1) == thrown).all()
    assert (codes[:, hot] != VISIBLE).float().mean() > 0.95
    cold = torch.ones(num_patches, dtype=torch.bool)
    cold[hot] = False
    assert (codes[:, cold] == VISIBLE).float().mean() > 0.3
    with pytest.raises(DataError, match="do not fit"):
        call(gen, 64, scores=scores[:, : num_patches // 2])  # a map of another grid's length


@pytest.mark.parametrize("name", sorted(MASK_GENERATORS))
@pytest.mark.parametrize("grid", [(64,), (2, 4, 4, 4)])
def test_grid_needs_two_or_three_axes(name, grid):
    with pytest.raises(ConfigError, match=r"grid_size=.*\n  Fix: give \(height, width\)"):
        make(name, 0.5, grid)
