"""Image transforms for any channel count: normalisation statistics, per-item intensity normalisation (images and
volumes alike), resizing, and seeded augmentation.

`Augment` (single images: random resized crop, flips, 90-degree rotations) and `PairAugment` (image +
mask, each draw applied to both) take a `torch.Generator`, so an item's augmentation depends only on
its (seed, epoch, index) and not on what drew random numbers before; `EpochSeeded` gives datasets that generator.
Labelled geometry (images and volumes alike) runs as MONAI dict transforms seeded from that generator
(`labelled_geometry`, `run_seeded`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter
from monai.transforms import (
    Compose,
    RandFlipd,
    RandRotate90d,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
)
from monai.utils import convert_to_tensor
from transformers import ViTImageProcessorPil

from ..errors import ConfigError, DataError
from .io import progress
from .stain import hed_jitter


class EpochSeeded:
    """For datasets whose item i in epoch e draws its augmentation (and masks) from a generator seeded by (seed, e, i).

    The epoch lives in shared memory. DataLoader workers hold their own copy of the dataset, and with
    `persistent_workers` (the GPU default) that copy is made once: a plain attribute set by `set_epoch` in the main
    process would never reach it, and every epoch would replay epoch 0's crops and masks (an MAE then memorises its
    training views: near-zero training loss, poor reconstruction of new images). A shared tensor is seen by forked and
    spawned workers alike; the Trainer calls `set_epoch` (through `training.EpochCallback`) before it asks the workers
    for the epoch's first batch.
    """

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def item_generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)


def channel_stats(images) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over all pixels of `images` (computed in float64 to avoid drift)."""
    return channel_moments(images)[:2]


def channel_moments(images) -> tuple[list[float], list[float], int]:
    """Per-channel mean/std over every pixel of an iterable of [C, H, W] arrays, in one pass (float64 sums),
    and how many images it read: statistics of a lazy pool or a stream without holding it."""
    total = total_sq = None
    count = n = 0
    for image in images:
        flat = np.asarray(image).reshape(image.shape[0], -1).astype(np.float64)
        if total is None:
            total, total_sq = np.zeros(len(flat)), np.zeros(len(flat))
        total += flat.sum(1)
        total_sq += (flat**2).sum(1)
        count, n = count + flat.shape[1], n + 1
    if total is None:
        raise DataError(
            "no images to compute normalisation statistics from.", "check that the training data is not empty."
        )
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean.tolist(), np.where(std > 0, std, 1.0).tolist(), n


NORMALISE_MODES = ("zscore", "percentile", "ct_window", "ct", "none")


def foreground_statistics(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray] | None = None,
    foreground_threshold: float | None = None,
    ignore_index: int | None = None,
    samples: int = 10_000,
    seed: int = 0,
) -> dict:
    """nnU-Net's CT statistics of a training set: per channel, the mean, std and 0.5 / 99.5 percentiles of
    foreground voxels pooled over the volumes, `samples` drawn (seeded) per volume as nnU-Net does.

    Foreground: labelled voxels of a class above 0 where `labels` are given; else voxels above
    `foreground_threshold` (e.g. -500 HU: the body, not the air around it); else every voxel.

    Returns:
        {"mean": [C], "std": [C], "clip": [[low, high]] * C, "foreground": "labels" | "threshold" | "all"}.
    """
    rng = np.random.default_rng(seed)
    source = "labels" if labels is not None else ("threshold" if foreground_threshold is not None else "all")
    pooled: list[np.ndarray] = []
    for i, image in enumerate(progress(images, desc="intensity statistics", unit="volume")):
        image = np.asarray(image, dtype=np.float32)
        if labels is not None:
            label = np.asarray(labels[i])
            mask = (label > 0) & (label != ignore_index) if ignore_index is not None else label > 0
            mask = np.broadcast_to(mask, image.shape[1:])
        elif foreground_threshold is not None:
            mask = (image > foreground_threshold).any(axis=0)
        else:
            mask = np.ones(image.shape[1:], bool)
        index = np.flatnonzero(mask)
        if index.size:
            pooled.append(image.reshape(image.shape[0], -1)[:, rng.choice(index, min(samples, index.size), False)])
    if not pooled:
        raise DataError(
            f"the training volumes have no foreground voxels ({source}) to take CT statistics from.",
            "check the labels (classes above 0) or lower foreground_threshold.",
        )
    voxels = np.concatenate(pooled, axis=1).astype(np.float64)
    return {
        "mean": voxels.mean(axis=1).tolist(),
        "std": voxels.std(axis=1).tolist(),
        "clip": np.percentile(voxels, [0.5, 99.5], axis=1).T.tolist(),
        "foreground": source,
    }


def normalise_intensity(
    image: np.ndarray,
    mode: str = "zscore",
    window: tuple[float, float] | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    foreground_threshold: float | None = None,
    statistics: dict | None = None,
) -> np.ndarray:
    """Per-item, per-channel intensity normalisation (nnU-Net style) of an image [C, H, W] or a volume [C, D, H, W]
    (any spatial dimension), applied once when loading; the window and percentile modes are MONAI's
    `ScaleIntensityRange` and `ScaleIntensityRangePercentiles`.

    Args:
        image: [C, *spatial].
        mode: "zscore" (mean 0, std 1 over the foreground), "percentile" (clip each channel to its
            `percentiles`, scale to [0, 1]), "ct_window" (clip to `window` = (lo, hi) HU, scale to [0, 1]),
            "ct" (nnU-Net's CT normalisation: clip to the training foreground's 0.5 / 99.5 percentiles and z-score
            with its mean and std, from `statistics`, so Hounsfield units mean the same in every volume), or "none".
        window: the HU window of "ct_window", e.g. (-1000, 400) for lung.
        percentiles: the clipping percentiles of "percentile".
        foreground_threshold: "zscore" statistics come from voxels above it (e.g. 0 for skull-stripped
            MRI); None: all voxels. A channel with no voxel above it falls back to all voxels.
        statistics: "ct": the training set's `foreground_statistics`.

    Example:
        >>> normalise_intensity(np.array([[[[-2000.0, 0.0, 400.0]]]]), "ct_window", window=(-1000, 400)).tolist()
        [[[[0.0, 0.7142857313156128, 1.0]]]]
    """
    image = np.asarray(image, dtype=np.float32)
    if mode not in NORMALISE_MODES:
        raise ConfigError(f"unknown intensity normalisation {mode!r}.", f"use one of {list(NORMALISE_MODES)}.")
    if mode == "none":
        return image
    if mode == "ct_window":
        if window is None or len(window) != 2 or not float(window[0]) < float(window[1]):
            raise ConfigError(
                f"ct_window normalisation needs window=(lo, hi) with lo < hi, got {window!r}.",
                "set window in HU, e.g. [-1000, 400] (lung) or [-160, 240] (abdomen).",
            )
        lo, hi = float(window[0]), float(window[1])
        window_scale = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32)
        return np.asarray(window_scale(image), dtype=np.float32)
    if mode == "ct":
        if statistics is None or len(statistics["mean"]) != image.shape[0]:
            raise ConfigError(
                f"ct normalisation of a {image.shape[0]}-channel volume needs the training set's foreground "
                f"statistics for each channel, got {statistics!r}.",
                "compute them with foreground_statistics on the training volumes (run_* does), or use a model "
                "trained on this channel count.",
            )
        out = np.empty_like(image)
        for c, ((low, high), mean, std) in enumerate(zip(statistics["clip"], statistics["mean"], statistics["std"])):
            out[c] = (np.clip(image[c], low, high) - mean) / max(std, 1e-6)
        return out
    if mode == "percentile":
        if not 0.0 <= percentiles[0] < percentiles[1] <= 100.0:
            raise ConfigError(
                f"percentiles={percentiles!r} must satisfy 0 <= low < high <= 100.", "use e.g. (0.5, 99.5)."
            )
        scale = ScaleIntensityRangePercentiles(
            *percentiles, b_min=0.0, b_max=1.0, clip=True, channel_wise=True, dtype=np.float32
        )
        return np.asarray(scale(image), dtype=np.float32)
    # Our own z-score: MONAI's NormalizeIntensity(nonzero=True) would also leave the voxels below the threshold as
    # they are; here every voxel is normalised with the statistics of the foreground.
    out = np.empty_like(image)
    for c, channel in enumerate(image):
        voxels = channel[channel > foreground_threshold] if foreground_threshold is not None else channel
        voxels = voxels if voxels.size else channel
        out[c] = (channel - voxels.mean(dtype=np.float64)) / max(float(voxels.std(dtype=np.float64)), 1e-6)
    return out


LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 grey, as torchvision's rgb_to_grayscale


def _uniform(low: float, high: float, gen: torch.Generator | None, n: int = 1) -> torch.Tensor:
    return torch.empty(n).uniform_(low, high, generator=gen)


@dataclass
class PhotometricArguments:
    """Colour, stain, intensity and blur jitter of the training views (pre-training and classification alike)."""

    colour_jitter: list[float] | None = field(
        default=None,
        metadata={"help": "RGB: [brightness, contrast, saturation, hue] strengths, e.g. [0.2, 0.2, 0.2, 0.05]"},
    )
    stain_jitter: float = field(
        default=0.0, metadata={"help": "RGB brightfield: HED stain jitter (Tellez et al. 2019), e.g. 0.05"}
    )
    intensity_jitter: list[float] | None = field(
        default=None,
        metadata={"help": "any channels: [scale, shift] per channel (shift in channel stds), e.g. [0.1, 0.1]"},
    )
    gamma: list[float] | None = field(default=None, metadata={"help": "per-channel gamma range, e.g. [0.8, 1.25]"})
    blur_sigma: list[float] | None = field(
        default=None, metadata={"help": "Gaussian blur sigma range in pixels, on half the views, e.g. [0.1, 1.5]"}
    )


@dataclass
class Photometric:
    """Colour, stain, intensity and blur jitter of raw intensities [C, H, W], drawn from a generator.

    Applied before normalisation, to the image as read. Hue, saturation and stain need RGB; brightness, contrast,
    per-channel scale/shift, gamma and blur serve any channel count. Options left at None / 0 draw nothing, so a
    view without them is bit-identical to one from before they existed.

    Args:
        colour_jitter: (brightness, contrast, saturation, hue): factors drawn from [1 - s, 1 + s] (hue: a rotation
            of +-hue turns in YIQ space), as torchvision's `ColorJitter`.
        stain_jitter: sigma of the HED jitter (`stain.hed_jitter`): each stain's density scaled by U(1 - sigma,
            1 + sigma) and shifted by U(-sigma, sigma) (Tellez et al. 2019, "HED-light" is 0.05).
        intensity_jitter: (scale, shift): each channel times U(1 - scale, 1 + scale) plus U(-shift, shift) of its std.
        gamma: (low, high): each channel, rescaled to [0, 1] by its range, raised to U(low, high).
        blur_sigma: (low, high): a Gaussian blur (MONAI's `GaussianFilter`) of sigma U(low, high) on half the views.
        white: the intensity of an empty (white) pixel of brightfield RGB, for optical densities and clipping.

    Example:
        >>> jitter = Photometric(colour_jitter=(0.2, 0.2, 0.2, 0.05), stain_jitter=0.05)
        >>> image = torch.full((3, 8, 8), 128.0)
        >>> out = jitter(image, torch.Generator().manual_seed(0))
        >>> out.shape, bool((out >= 0).all() and (out <= 255).all())
        (torch.Size([3, 8, 8]), True)
    """

    colour_jitter: tuple[float, float, float, float] | None = None
    stain_jitter: float = 0.0
    intensity_jitter: tuple[float, float] | None = None
    gamma: tuple[float, float] | None = None
    blur_sigma: tuple[float, float] | None = None
    white: float = 255.0

    @classmethod
    def from_args(cls, args: PhotometricArguments, channels: int) -> Photometric | None:
        """The jitter a run's keys ask for (None when none), checked against its channel count."""
        fields = {
            "colour_jitter": args.colour_jitter,
            "stain_jitter": args.stain_jitter,
            "intensity_jitter": args.intensity_jitter,
            "gamma": args.gamma,
            "blur_sigma": args.blur_sigma,
        }
        sizes = {"colour_jitter": 4, "intensity_jitter": 2, "gamma": 2, "blur_sigma": 2}
        for key, n in sizes.items():
            if fields[key] is not None and len(fields[key]) != n:
                raise ConfigError(f"{key}={fields[key]} needs {n} values.", f"see `--help` for {key}'s form.")
        if channels != 3 and (args.colour_jitter or args.stain_jitter):
            raise ConfigError(
                f"colour_jitter and stain_jitter are for RGB images; these have {channels} channels.",
                "use intensity_jitter ([scale, shift] per channel) and gamma instead.",
            )
        if not any(fields.values()):
            return None
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    def __call__(self, image: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        image = image.float()
        if self.stain_jitter:
            image = self._stain(image, gen)
        if self.colour_jitter:
            image = self._colour(image, gen)
        if self.intensity_jitter:
            scale, shift = self.intensity_jitter
            c = image.shape[0]
            std = image.reshape(c, -1).std(1).clamp_min(1e-6)
            factor, offset = _uniform(1 - scale, 1 + scale, gen, c), _uniform(-shift, shift, gen, c) * std
            image = image * factor[:, None, None] + offset[:, None, None]
        if self.gamma:
            flat = image.reshape(image.shape[0], -1)
            low, high = flat.amin(1)[:, None, None], flat.amax(1)[:, None, None]
            span = (high - low).clamp_min(1e-6)
            power = _uniform(*self.gamma, gen, image.shape[0])[:, None, None]
            image = low + span * ((image - low) / span).clamp(0, 1) ** power
        if self.blur_sigma and float(torch.rand(1, generator=gen)) < 0.5:
            sigma = float(_uniform(*self.blur_sigma, gen))
            image = GaussianFilter(2, sigma)(image[:, None])[:, 0]
        return image

    def _colour(self, image: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        brightness, contrast, saturation, hue = self.colour_jitter
        b, c, s = (float(_uniform(max(0.0, 1 - x), 1 + x, gen)) for x in (brightness, contrast, saturation))
        turn = float(_uniform(-hue, hue, gen)) * 2 * math.pi
        image = image * b
        grey = torch.einsum("c,chw->hw", LUMA, image)
        image = (image - grey.mean()) * c + grey.mean()
        grey = torch.einsum("c,chw->hw", LUMA, image)
        image = (image - grey) * s + grey
        if turn:  # a rotation of the chroma plane (I, Q) of YIQ keeps luma
            to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
            rotate = torch.tensor(
                [[1, 0, 0], [0, math.cos(turn), -math.sin(turn)], [0, math.sin(turn), math.cos(turn)]]
            )
            image = torch.einsum("dc,chw->dhw", torch.linalg.inv(to_yiq) @ rotate @ to_yiq, image)
        return image.clamp(0, self.white)

    def _stain(self, image: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        sigma, white = self.stain_jitter, self.white
        alpha, beta = _uniform(1 - sigma, 1 + sigma, gen, 3).numpy(), _uniform(-sigma, sigma, gen, 3).numpy()
        jittered = hed_jitter(image.clamp(0, white).numpy() * (255.0 / white), alpha, beta)
        return torch.from_numpy(jittered) * (white / 255.0)


@dataclass
class Augment:
    """Flips, 90-degree rotations and a random resized crop for [C, H, W] tensors of any channel count.

    Args:
        image_size: output side length.
        scale: area range of the random resized crop relative to the input (MAE uses (0.2, 1)); above 1 zooms
            out: the crop reaches past the image into reflected context, so the object is smaller in the frame.
        ratio: aspect-ratio range of the crop.
        hflip, vflip, rot90: cells and tissue have no preferred orientation, so all default to on.
        crop: False resizes the whole image instead (as evaluation does), so the output's patches are a
            fixed grid of the input, permuted only by the flips and rotations (`with_view`, `apply_view`).
        photometric: colour, stain, intensity and blur jitter (`Photometric`), applied by the datasets to the
            raw image before normalisation (`Photometric.__call__`); None: none.
    """

    image_size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    vflip: bool = True
    rot90: bool = False
    crop: bool = True
    photometric: Photometric | None = None

    def __post_init__(self):
        if not 0.0 < self.scale[0] <= self.scale[1] <= 4.0:
            raise ConfigError(
                f"crop_scale={list(self.scale)} is not a range within (0, 4].",
                "use e.g. [0.5, 1.0], or [0.5, 2.0] to also zoom out (objects smaller in the frame).",
            )

    def crop_box(
        self, h: int, w: int, gen: torch.Generator | None, bounds: tuple[int, int] | None = None
    ) -> tuple[int, int, int, int]:
        """A box of `scale` times the h x w area inside `bounds` (default h x w; larger when zooming out)."""
        bh, bw = bounds or (h, w)
        for _ in range(10):
            area = h * w * float(torch.empty(1).uniform_(*self.scale, generator=gen))
            log_r = torch.empty(1).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]), generator=gen)
            aspect = math.exp(float(log_r))
            ch, cw = round(math.sqrt(area / aspect)), round(math.sqrt(area * aspect))
            if 0 < ch <= bh and 0 < cw <= bw:
                top = int(torch.randint(0, bh - ch + 1, (1,), generator=gen))
                left = int(torch.randint(0, bw - cw + 1, (1,), generator=gen))
                return top, left, ch, cw
        side = min(h, w)  # fallback: central square, as torchvision does
        return (bh - side) // 2, (bw - side) // 2, side, side

    def __call__(self, image: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        return self.with_view(image, gen)[0]

    def view(self, raw: torch.Tensor, normalize, gen: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """The training view of a raw image: photometric jitter (on intensities as read), `normalize`, geometry."""
        if self.photometric is not None:
            raw = self.photometric(raw, gen)
        return self.with_view(normalize(raw), gen)

    def with_view(self, image: torch.Tensor, gen: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """The augmented image and its view code (flips and rotation, see `apply_view`)."""
        image, code = self.draw(image, gen)
        return view_copy(image, code), code

    def draw(self, image: torch.Tensor | np.ndarray, gen: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """The resized crop as float32 and the view code drawn for it, the flips and turn not yet applied
        (`apply_view`, `finish_views`). Any dtype in: only the crop is converted, so a uint8 / uint16 image is never
        copied whole as float (the light data path); the draws are those of `with_view`."""
        _, h, w = image.shape
        if not self.crop:
            image = resize(_as_float(image), self.image_size)
        elif self.scale[0] < 1.0 or self.scale[1] > 1.0 or (h, w) != (self.image_size, self.image_size):
            if self.scale[1] > 1.0:  # zoom out: reflected context around the image for the larger boxes
                grow = (math.sqrt(self.scale[1]) - 1) / 2
                mh, mw = (min(math.ceil(grow * n), n - 1) for n in (h, w))
                image = F.pad(_as_float(image)[None], (mw, mw, mh, mh), mode="reflect")[0]
            top, left, ch, cw = self.crop_box(h, w, gen, tuple(image.shape[1:]))
            image = resize(_as_float(image[:, top : top + ch, left : left + cw]), self.image_size)
        code = 0
        if self.hflip and torch.rand(1, generator=gen) < 0.5:
            code |= HFLIP
        if self.vflip and torch.rand(1, generator=gen) < 0.5:
            code |= VFLIP
        if self.rot90:
            code |= int(torch.randint(0, 4, (1,), generator=gen)) << 2
        return _as_float(image), code


def _as_float(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """float32 tensor of an array or tensor of any dtype (no copy when it already is one)."""
    if isinstance(image, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    return image.float()


def view_copy(image: torch.Tensor, code: int) -> torch.Tensor:
    """`apply_view` of one CPU image as numpy views and a single copy (each torch flip / rot90 would copy)."""
    view = image.numpy()
    if code & HFLIP:
        view = view[..., ::-1]
    if code & VFLIP:
        view = view[..., ::-1, :]
    if code >> 2:
        view = np.rot90(view, code >> 2, axes=(-2, -1))
    return torch.from_numpy(np.ascontiguousarray(view))


def finish_views(images: torch.Tensor, codes: torch.Tensor, normalize: Normalize) -> torch.Tensor:
    """The second half of the light data path, batched on whatever device `images` [B, C, H, W] are on: normalise,
    then each image's flips and turn (`Augment.draw` codes [B]). Per-channel normalisation commutes with the
    (convex) resampling of the crop, so this equals `Augment.view` up to float rounding.

    Example:
        >>> x = torch.arange(4.0).reshape(1, 1, 2, 2)
        >>> finish_views(x, torch.tensor([HFLIP]), Normalize([0.0], [1.0]))[0, 0].tolist()
        [[1.0, 0.0], [3.0, 2.0]]
    """
    images = normalize(images)
    out = torch.empty_like(images)
    for code in codes.unique().tolist():  # at most 16 codes: one batched flip/turn per group
        group = (codes == code).nonzero().squeeze(1)
        out[group] = apply_view(images[group], int(code))
    return out


HFLIP, VFLIP = 1, 2  # view code bits; bits 2-3 count 90-degree turns


def apply_view(x: torch.Tensor, code: int) -> torch.Tensor:
    """Apply `Augment.with_view`'s flips and rotation (view `code`) to the last two axes of `x`, in its order.

    On a map over the patch grid of a square image (side a multiple of the patch size) this is exactly the
    permutation the view applied to the image's patches.

    Example:
        >>> grid = torch.arange(4).reshape(2, 2)
        >>> apply_view(grid, HFLIP).tolist()
        [[1, 0], [3, 2]]
    """
    if code & HFLIP:
        x = x.flip(-1)
    if code & VFLIP:
        x = x.flip(-2)
    return torch.rot90(x, code >> 2, dims=(-2, -1)) if code >> 2 else x


@functools.lru_cache(maxsize=512)
def _upsampling_matrix(n: int, size: int) -> torch.Tensor:
    """[size, n] weights of torch's bilinear (align_corners=False) resampling of n samples to size."""
    eye = torch.eye(n)[:, None, :, None]  # n unit impulses along one axis
    return F.interpolate(eye, size=(size, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].T.contiguous()


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of [C, H, W] to size x size (a no-op when already that size); antialiased when shrinking.

    Upsampling (every crop of a random resized crop back to the tile size) is separable and needs no
    antialiasing, so it runs as two small matmuls with cached weights: the same result as
    `F.interpolate`, about 2x faster per image, which matters when augmentation runs beside the step.
    """
    height, width = image.shape[-2:]
    if (height, width) == (size, size):
        return image
    if height <= size and width <= size and image.is_floating_point():
        rows, cols = (_upsampling_matrix(n, size).to(image.dtype) for n in (height, width))
        return rows @ image @ cols.T
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Central size x size crop of [C, H, W]; smaller images are resized up instead."""
    _, h, w = image.shape
    if h < size or w < size:
        return resize(image, size)
    top, left = (h - size) // 2, (w - size) // 2
    return image[:, top : top + size, left : left + size]


def image_processor(channels: int, image_mean=None, image_std=None) -> ViTImageProcessorPil:
    """The image processor saved with a model: normalisation by the training images' statistics; without them
    (volumes, normalised one by one when read: `normalise_intensity`), an identity that records the unit scale.

    Example:
        >>> image_processor(2).image_std, image_processor(1, [0.5], [0.2]).do_normalize
        ((1.0, 1.0), True)
    """
    if image_mean is None:
        return ViTImageProcessorPil(
            do_resize=False,
            do_rescale=False,
            do_normalize=False,
            image_mean=[0.0] * channels,
            image_std=[1.0] * channels,
        )
    return ViTImageProcessorPil(do_resize=False, do_rescale=False, image_mean=image_mean, image_std=image_std)


class Normalize:
    """Per-channel `(x - mean) / std` for [C, H, W] tensors, with the statistics saved beside a checkpoint."""

    def __init__(self, image_mean, image_std):
        self.mean = torch.tensor(image_mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(image_std, dtype=torch.float32)[:, None, None]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.device != self.mean.device:  # the light data path normalises on the training device
            self.mean, self.std = self.mean.to(image.device), self.std.to(image.device)
        return (image - self.mean) / self.std


def check_channels(images: list[np.ndarray], source: str) -> int:
    """All images must share one channel count; returns it."""
    counts = sorted({im.shape[0] for im in images})
    if len(counts) > 1:
        raise DataError(
            f"{source} mixes images with {counts} channels.",
            "convert all images to one channel count (e.g. all RGB) before training.",
        )
    return counts[0]


def resize_pair(image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize [C, H, W] image (bilinear, antialiased) and [H, W] mask (nearest, so ids stay ids) to `size`."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image, mask
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    return image, mask


def labelled_geometry(keys: Sequence[str], spatial_dims: int, flip_axes: Sequence[int], rot90: bool, square: bool):
    """MONAI dict transforms flipping each of `flip_axes` (spatial axes) with probability 0.5, then turning the
    last two spatial axes by k * 90 degrees, k uniform in 0..3 (0 or 180 degrees when they differ in size).

    Args:
        keys: the channel-first tensors moved alike (image and label).
        spatial_dims: 2 for images [C, H, W], 3 for volumes [C, D, H, W].
        flip_axes: spatial axes to flip, in order (e.g. (1, 0) for a horizontal then a vertical flip of an image).
        rot90: add the in-plane turns.
        square: whether the last two spatial sizes are equal (a 90-degree turn would swap them otherwise).

    Example:
        >>> steps = labelled_geometry(["image", "label"], 2, (1, 0), rot90=True, square=True)
        >>> [type(s).__name__ for s in steps]
        ['RandFlipd', 'RandFlipd', 'RandRotate90d']
    """
    steps = [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in flip_axes]
    if rot90:
        plane = (spatial_dims - 2, spatial_dims - 1)
        # prob 0.75 of k in 1..3: k uniform in 0..3; two flips of the plane are the 180-degree turn
        steps.append(
            RandRotate90d(keys, prob=0.75, max_k=3, spatial_axes=plane)
            if square
            else RandFlipd(keys, prob=0.5, spatial_axis=plane)
        )
    return steps


def run_seeded(
    transform: Compose, data: dict, gen: torch.Generator | None, keys: Sequence[str] = ("image", "label")
) -> dict:
    """Apply MONAI `transform` seeded from `gen` (one draw), so the result depends on the item's generator only.

    Returns:
        `keys` of the result as plain contiguous tensors (no MONAI MetaTensor reaches collation or the model).
    """
    transform.set_random_state(seed=int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    out = transform(data)
    out = out[0] if isinstance(out, list) else out  # croppers that sample several windows return a list
    return {k: convert_to_tensor(out[k], track_meta=False).contiguous() for k in keys}


@dataclass
class PairAugment:
    """Geometry for image + mask pairs; every random draw is applied to both alike.

    Args:
        image_size: output side.
        crop_mode: "resize" (whole image to image_size) or "random_crop" (image_size window; smaller
            images are resized up first).
        hflip, vflip, rot90: random flips and 90-degree rotations (cells have no preferred orientation).
    """

    image_size: int
    crop_mode: str = "resize"
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True

    def __post_init__(self):
        flips = [axis for axis, on in ((1, self.hflip), (0, self.vflip)) if on]
        self._geometry = Compose(labelled_geometry(["image", "label"], 2, flips, self.rot90, square=True))

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, gen: torch.Generator | None = None):
        _, h, w = image.shape
        if self.crop_mode == "random_crop" and min(h, w) >= self.image_size:
            top = int(torch.randint(0, h - self.image_size + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - self.image_size + 1, (1,), generator=gen))
            image = image[:, top : top + self.image_size, left : left + self.image_size]
            mask = mask[top : top + self.image_size, left : left + self.image_size]
        image, mask = resize_pair(image, mask, (self.image_size, self.image_size))
        out = run_seeded(self._geometry, {"image": image, "label": mask[None]}, gen)
        return out["image"], out["label"][0]


__all__ = [
    "Augment",
    "Photometric",
    "PhotometricArguments",
    "HFLIP",
    "NORMALISE_MODES",
    "Normalize",
    "PairAugment",
    "VFLIP",
    "apply_view",
    "center_crop",
    "channel_moments",
    "channel_stats",
    "image_processor",
    "check_channels",
    "labelled_geometry",
    "finish_views",
    "foreground_statistics",
    "normalise_intensity",
    "run_seeded",
    "resize",
    "resize_pair",
]
