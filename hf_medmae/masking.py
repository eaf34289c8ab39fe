"""Mask generators: which patches of each image the MAE encoder does not see.

Every generator answers the same call and returns a code per patch (`VISIBLE`, `MASKED`, `THROWN`)
with exactly the count transformers keeps, so the mask can be handed to `ViTMAEForPreTraining`
through its public `noise` argument (see `codes_to_noise`). Generators are seeded through an
optional `torch.Generator`; without one they draw from torch's global RNG, which the Trainer seeds
and restores on resume.

    >>> import torch
    >>> from hf_medmae.masking import build_mask_generator
    >>> gen = build_mask_generator("block", mask_ratio=0.5, grid_size=(8, 8))
    >>> codes = gen(batch_size=2, generator=torch.Generator().manual_seed(0))
    >>> (codes == MASKED).sum(dim=1).tolist()
    [32, 32]

Every generator also takes a 3D grid (depth, height, width) of a volume's patches, numbered
depth-major like `reshape(B, gd, gh, gw)`:

    >>> gen = build_mask_generator("grid", mask_ratio=0.5, grid_size=(4, 8, 8))
    >>> gen(batch_size=2, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([2, 256])
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import ConfigError, DataError

VISIBLE, MASKED, THROWN = 0, 1, 2


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches the encoder sees: the same `int(L * (1 - ratio))` rule as transformers' `random_masking`."""
    return int(num_patches * (1 - mask_ratio))


def _rand(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Uniform [0, 1) noise on `device`, drawn from `generator`'s own device so seeding works anywhere."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def codes_to_noise(codes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Turn per-patch codes into the `noise` transformers argsorts: visible patches sort first.

    Visible patches get noise in [0, 0.5), removed ones in [1, 1.5), so `argsort` keeps exactly the
    visible set and shuffles within each group.
    """
    jitter = _rand(codes.shape, generator, codes.device) * 0.5
    return (codes != VISIBLE).float() + jitter


def _top_k_codes(scores: torch.Tensor, k: int) -> torch.Tensor:
    """MASKED where a patch is among the k highest scores of its row, else VISIBLE. [B, L] -> [B, L]."""
    codes = torch.zeros(scores.shape, dtype=torch.uint8, device=scores.device)
    if k > 0:
        codes.scatter_(1, scores.topk(k, dim=1).indices, MASKED)
    return codes


def _gumbel(shape, generator, device) -> torch.Tensor:
    u = _rand(shape, generator, device).clamp_(1e-9, 1 - 1e-9)
    return -torch.log(-torch.log(u))


class MaskGenerator:
    """Base class. Subclasses implement `scores` (higher = masked first) or override `__call__`.

    Args:
        mask_ratio: fraction of patches removed from the encoder's input, in (0, 1).
        grid_size: patches along (depth,) height, width; patch index (d * gh + h) * gw + w.
    """

    name = "base"
    uses_pixels = False  # True when the generator reads `pixel_values`
    uses_scores = False  # True when it reads externally supplied per-patch scores

    def __init__(self, mask_ratio: float, grid_size: tuple[int, ...]):
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio={mask_ratio} is outside (0, 1).", "use e.g. 0.75 or 0.5.")
        self.mask_ratio = mask_ratio
        self.grid_size = tuple(grid_size)
        if len(self.grid_size) not in (2, 3):
            raise ConfigError(
                f"grid_size={self.grid_size} has {len(self.grid_size)} entries; masks need a 2D or 3D patch grid.",
                "give (height, width) for images or (depth, height, width) for volumes, e.g. (14, 14) or (8, 14, 14).",
            )
        self.num_patches = math.prod(self.grid_size)
        self.num_masked = self.num_patches - num_kept(self.num_patches, mask_ratio)

    def scores(self, batch_size, pixel_values, scores, generator, device) -> torch.Tensor:
        raise NotImplementedError

    def _check_scores(self, scores: torch.Tensor) -> None:
        """A map of the wrong length would be ranked silently (e.g. a 2D map handed to a 3D model)."""
        if scores.dim() != 2 or scores.shape[1] != self.num_patches:
            raise DataError(
                f"per-patch scores of shape {tuple(scores.shape)} do not fit the {self.num_patches} patches of a "
                f"{self.grid_size} grid.",
                "pass scores of shape [batch, num_patches], patches in the order of reshape(batch, *grid_size).",
            )

    def __call__(
        self,
        batch_size: int,
        pixel_values: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Codes of shape [batch_size, num_patches] (uint8: 0 visible, 1 masked, 2 thrown)."""
        device = device if device is not None else (pixel_values.device if pixel_values is not None else "cpu")
        return _top_k_codes(self.scores(batch_size, pixel_values, scores, generator, device), self.num_masked)

    def __repr__(self):
        return f"{type(self).__name__}(mask_ratio={self.mask_ratio}, grid_size={self.grid_size})"


class RandomMaskGenerator(MaskGenerator):
    """Uniform random masking, the MAE default."""

    name = "random"

    def scores(self, batch_size, pixel_values, scores, generator, device):
        return _rand((batch_size, self.num_patches), generator, device)


class BlockMaskGenerator(MaskGenerator):
    """BEiT-style masking: random rectangles (3D: boxes) of patches until the budget is spent.

    Patches are ranked by the order in which blocks cover them, so the exact count is met by masking
    whole early blocks and a part of the last one.

    Args:
        min_block: smallest block area (3D: volume) in patches.
        max_block: largest block area or volume (default: a quarter of the grid).
        min_aspect: blocks have aspect ratios in [min_aspect, 1 / min_aspect]: height / width, and in
            3D also depth / sqrt(height * width).
    """

    name = "block"

    def __init__(
        self, mask_ratio, grid_size, min_block: int = 4, max_block: int | None = None, min_aspect: float = 0.3
    ):
        super().__init__(mask_ratio, grid_size)
        self.min_block = max(1, min_block)
        self.max_block = max(self.min_block, max_block or self.num_patches // 4)
        self.log_aspect = (math.log(min_aspect), -math.log(min_aspect))

    def _rank(self, rng: np.random.Generator) -> np.ndarray:
        if len(self.grid_size) == 3:
            return self._rank3d(rng)
        gh, gw = self.grid_size
        order = np.full((gh, gw), np.inf)
        step, covered = 0, 0
        for _ in range(20 * self.num_patches):  # bounded; the fallback below fills any shortfall
            if covered >= self.num_masked:
                break
            area = rng.uniform(self.min_block, self.max_block)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = min(gh, max(1, round(math.sqrt(area * aspect))))
            w = min(gw, max(1, round(math.sqrt(area / aspect))))
            top, left = rng.integers(0, gh - h + 1), rng.integers(0, gw - w + 1)
            block = order[top : top + h, left : left + w]
            new = np.isinf(block)
            block[new] = step
            covered += int(new.sum())
            step += 1
        return order.reshape(-1)

    def _rank3d(self, rng: np.random.Generator) -> np.ndarray:
        """`_rank` on a (depth, height, width) grid: boxes whose in-plane and depth aspects are bounded."""
        order = np.full(self.grid_size, np.inf)
        step, covered = 0, 0
        for _ in range(20 * self.num_patches):
            if covered >= self.num_masked:
                break
            volume = rng.uniform(self.min_block, self.max_block)
            aspect, depth_aspect = np.exp(rng.uniform(*self.log_aspect, size=2))  # h / w, d / sqrt(h * w)
            side = (volume / depth_aspect) ** (1 / 3)  # sqrt(h * w), so that d * h * w = volume
            sides = (side * depth_aspect, side * math.sqrt(aspect), side / math.sqrt(aspect))
            size = [min(g, max(1, round(s))) for g, s in zip(self.grid_size, sides)]  # (d, h, w)
            corner = [rng.integers(0, g - s + 1) for g, s in zip(self.grid_size, size)]
            block = order[tuple(slice(c, c + s) for c, s in zip(corner, size))]
            new = np.isinf(block)
            block[new] = step
            covered += int(new.sum())
            step += 1
        return order.reshape(-1)

    def scores(self, batch_size, pixel_values, scores, generator, device):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())
        rng = np.random.default_rng(seed)
        ranks = np.stack([self._rank(rng) for _ in range(batch_size)])  # [B, L], inf = uncovered
        ranks = np.where(np.isinf(ranks), 1e9, ranks)
        tie_break = _rand((batch_size, self.num_patches), generator, "cpu")
        return (-torch.from_numpy(ranks).float() + tie_break * 0.5).to(device)


# Threshold order of the corners of one 2x2x2 cell, indexed [d, h, w]. The lower half is one colour
# of the 3D checkerboard, so ratio 0.5 masks exactly the other; its d=0 face orders like 2D's [[0, 2], [3, 1]].
_CELL_3D = np.array([[[0, 4], [6, 2]], [[7, 3], [1, 5]]])


def _bayer(n: int) -> np.ndarray:
    """Ordered-dither matrix of size 2^k >= n: thresholds spread as evenly as possible over space."""
    m = np.zeros((1, 1))
    while m.shape[0] < n:
        m = np.block([[4 * m, 4 * m + 2], [4 * m + 3, 4 * m + 1]])
    return m


def _bayer_3d(n: int) -> np.ndarray:
    """`_bayer` in 3D, a cube of side 2^k >= n: the cell order at every scale, the finest one most significant."""
    m = np.zeros((1, 1, 1))
    while m.shape[0] < n:  # M_2s[2x + c] = s^3 * cell[c] + M_s[x]
        m = m.size * np.tile(_CELL_3D, m.shape) + np.kron(m, np.ones((2, 2, 2)))
    return m


class GridMaskGenerator(MaskGenerator):
    """A regular pattern (ordered dither) with a random offset per image along each axis.

    At ratio 0.5 it is a checkerboard, at 0.75 one visible patch per 2x2 cell, at 0.125 one masked
    patch in every 8 spread evenly — useful at the low ratios that win for segmentation (seed 002).
    On a 3D grid, 0.5 is a 3D checkerboard, 0.75 two visible patches per 2x2x2 cell and 0.125 one
    masked patch per 2x2x2 cell, none touching another face to face.
    """

    name = "grid"

    def __init__(self, mask_ratio, grid_size):
        super().__init__(mask_ratio, grid_size)
        dither = _bayer_3d if len(self.grid_size) == 3 else _bayer
        self._dither = torch.from_numpy(dither(max(self.grid_size))).float()

    def scores(self, batch_size, pixel_values, scores, generator, device):
        n, ndim = self._dither.shape[0], len(self.grid_size)
        offsets = torch.randint(0, n, (batch_size, ndim), generator=generator)
        # one index per axis, [B, g] shaped to broadcast: [B, gh, 1], [B, 1, gw] (3D: [B, gd, 1, 1], ...)
        index = tuple(
            ((torch.arange(g) + offsets[:, axis, None]) % n).reshape(-1, *(g if a == axis else 1 for a in range(ndim)))
            for axis, g in enumerate(self.grid_size)
        )
        pattern = self._dither[index].reshape(batch_size, -1)  # [B, (gd,) gh, gw] -> [B, L]
        tie_break = _rand((batch_size, self.num_patches), generator, "cpu") * 0.5
        return (pattern + tie_break).to(device)


def patch_statistic(pixel_values: torch.Tensor, grid_size: tuple[int, ...]) -> torch.Tensor:
    """Per-patch standard deviation over pixels (voxels) and channels. [B, C, (D,) H, W] -> [B, L]."""
    b, c, *size = pixel_values.shape
    ndim = len(grid_size)
    if len(size) != ndim or any(s % g for s, g in zip(size, grid_size)):
        raise DataError(
            f"pixel_values of shape {tuple(pixel_values.shape)} do not split into a {tuple(grid_size)} patch grid.",
            "pass [B, C, H, W] for a 2D grid or [B, C, D, H, W] for a 3D one, each side a multiple of its grid entry.",
        )
    # [B, C, (gd, pd,) gh, ph, gw, pw] -> [B, (gd,) gh, gw, C, (pd,) ph, pw]
    patches = pixel_values.reshape(b, c, *(n for s, g in zip(size, grid_size) for n in (g, s // g)))
    patches = patches.permute(0, *range(2, 2 + 2 * ndim, 2), 1, *range(3, 3 + 2 * ndim, 2))
    return patches.reshape(b, math.prod(grid_size), -1).float().std(dim=-1)


class ForegroundMaskGenerator(MaskGenerator):
    """Spends the mask budget on informative patches instead of empty background.

    A patch's informativeness is its pixel (voxel) standard deviation (or the mean of a given
    foreground map passed as `scores`, shape [B, L]); patches are drawn without replacement with probability
    `(1 - mix) * softmax(z / temperature) + mix / L`, z the per-image standardised informativeness.

    Args:
        temperature: lower = more strictly foreground-first.
        mix: 0 = pure foreground sampling, 1 = uniform random masking.
    """

    name = "foreground"
    uses_pixels = True

    def __init__(self, mask_ratio, grid_size, temperature: float = 0.5, mix: float = 0.1):
        super().__init__(mask_ratio, grid_size)
        if temperature <= 0 or not 0 <= mix <= 1:
            raise ConfigError(
                f"foreground generator needs temperature > 0 and mix in [0, 1], got {temperature}, {mix}.",
                "e.g. mask_generator_kwargs: {temperature: 0.5, mix: 0.1}.",
            )
        self.temperature, self.mix = temperature, mix

    def scores(self, batch_size, pixel_values, scores, generator, device):
        if scores is None:
            if pixel_values is None:
                raise ConfigError(
                    "the foreground generator needs pixel_values or a per-patch foreground map.",
                    "call it with pixel_values=... (MedMAEForPreTraining does this for you).",
                )
            scores = patch_statistic(pixel_values, self.grid_size)
        self._check_scores(scores)
        z = (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + 1e-6)
        probs = (1 - self.mix) * torch.softmax(z / self.temperature, dim=1) + self.mix / self.num_patches
        # Gumbel-top-k: sampling k patches without replacement, in one vectorised call.
        return probs.log() + _gumbel(probs.shape, generator, probs.device)


class AttentionMaskGenerator(MaskGenerator):
    """MSMAE's attention-driven masking: mask the patches the CLS token attends to most.

    Patches are ordered by sampling without replacement from the CLS attention map (passed as
    `scores`, [B, L]); the first `mask_ratio - throw_ratio` of the grid are masked and
    reconstructed, the next `throw_ratio` are thrown away (neither encoded nor reconstructed), the
    rest are encoded. Without a map (warm-up, or before the first refresh) it masks at random, as
    MSMAE does. `MedMAEForPreTraining.cls_attention` computes the map; `AttentionRefreshCallback`
    refreshes it every few epochs.
    """

    name = "attention"
    uses_scores = True

    def __init__(self, mask_ratio, grid_size, throw_ratio: float = 0.0):
        super().__init__(mask_ratio, grid_size)
        self.num_thrown = int(round(throw_ratio * self.num_patches))
        if self.num_thrown >= self.num_masked:
            raise ConfigError(
                f"throw_ratio={throw_ratio} leaves no patch to reconstruct at mask_ratio={mask_ratio}.",
                "use throw_ratio < mask_ratio, e.g. mask_ratio 0.75 with throw_ratio 0.30.",
            )

    def __call__(self, batch_size, pixel_values=None, scores=None, generator=None, device=None):
        device = device if device is not None else (pixel_values.device if pixel_values is not None else "cpu")
        if scores is None:
            keys = _rand((batch_size, self.num_patches), generator, device)
        else:
            self._check_scores(scores)
            keys = scores.float().clamp_min(1e-12).log() + _gumbel(scores.shape, generator, scores.device)
        order = keys.argsort(dim=1, descending=True)  # [B, L], most attended first
        ranked = torch.full(order.shape, VISIBLE, dtype=torch.uint8, device=order.device)
        ranked[:, : self.num_masked - self.num_thrown] = MASKED
        ranked[:, self.num_masked - self.num_thrown : self.num_masked] = THROWN
        return torch.empty_like(ranked).scatter_(1, order, ranked)


MASK_GENERATORS: dict[str, type[MaskGenerator]] = {
    cls.name: cls
    for cls in (
        RandomMaskGenerator,
        BlockMaskGenerator,
        GridMaskGenerator,
        ForegroundMaskGenerator,
        AttentionMaskGenerator,
    )
}


def build_mask_generator(name: str, mask_ratio: float, grid_size: tuple[int, ...], **kwargs) -> MaskGenerator:
    """Build a generator by its registry name; unknown names and settings raise `ConfigError`."""
    if name not in MASK_GENERATORS:
        raise ConfigError(f"unknown mask_generator {name!r}.", f"use one of {sorted(MASK_GENERATORS)}.")
    try:
        return MASK_GENERATORS[name](mask_ratio, grid_size, **kwargs)
    except TypeError as err:
        raise ConfigError(
            f"mask_generator_kwargs {kwargs} do not fit the {name!r} generator ({err}).",
            f"see the docstring of hf_medmae.masking.{MASK_GENERATORS[name].__name__} for its settings.",
        ) from None
