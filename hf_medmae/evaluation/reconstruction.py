"""Reconstruction checks of a pre-trained MAE, 2D or 3D: its validation loss beside the mean predictor's, and the
reconstruction figure.

A dataset here is anything indexable whose items are {"pixel_values": [C, H, W] or [C, D, H, W]} (the validation
sets of `data.pretraining`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..masking import MASKED, RandomMaskGenerator
from ..modeling_mae import MedMAEForPreTraining, mae_loss
from ..modeling_mae3d import MedMAE3DForPreTraining
from ..plots import save_reconstruction_grid

MAE = MedMAEForPreTraining | MedMAE3DForPreTraining


def _batches(dataset, batch_size: int, device) -> Iterator[torch.Tensor]:
    for start in range(0, len(dataset), batch_size):
        stop = min(start + batch_size, len(dataset))
        yield torch.stack([torch.as_tensor(dataset[i]["pixel_values"]) for i in range(start, stop)]).to(device)


def _masked_targets(model: MAE, dataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch, the model's targets [B, L, P] and the weight [B, L] of the patches its loss counts (the masked
    ones), under masks of the model's generator seeded by the batch, as its eval loss's are."""
    for pixels in _batches(dataset, batch_size, model.device):
        generator = torch.Generator().manual_seed(1234 + len(pixels))
        codes = model.generate_codes(pixels, generator=generator)
        yield model.targets(pixels).float(), (codes == MASKED).float()


@torch.no_grad()
def mean_predictor_loss(model: MAE, dataset, batch_size: int = 64) -> float:
    """The floor an MAE must beat: the MAE loss, on the masked patches, of a predictor that outputs one constant,
    the mean of the target, for every hidden value. The same for 2D and 3D MAEs.

    The constant is 0 for `norm_pix_loss` targets (every patch is normalised to mean 0), else the mean of the
    targets of every masked patch of `dataset`. The loss is the model's own (`modeling_mae.mae_loss`), per batch
    under masks of the model's ratio and generator (seeded by the batch), averaged over the batches weighted by
    their size, as the Trainer's `eval_loss` is: the two are comparable.

    Args:
        model: a 2D or 3D MAE.
        dataset: items with "pixel_values".
        batch_size: the evaluation batch size (the eval masks depend on it).

    Example:
        >>> mean_predictor_loss(model, [{"pixel_values": torch.randn(3, 32, 32)}] * 4)  # doctest: +SKIP
        0.94
    """
    constant = 0.0
    if not model.config.norm_pix_loss:
        total = count = 0.0
        for target, weight in _masked_targets(model, dataset, batch_size):
            total += float((target * weight[..., None]).sum(dtype=torch.float64))
            count += float(weight.sum()) * target.shape[-1]
        constant = total / max(count, 1.0)
    losses, sizes = [], []
    for target, weight in _masked_targets(model, dataset, batch_size):
        losses.append(float(mae_loss(torch.full_like(target, constant), target, weight)))
        sizes.append(len(target))
    return float(np.average(losses, weights=sizes)) if sizes else 0.0


@torch.no_grad()
def reconstruction_only_loss(model: MAE, dataset, batch_size: int = 64) -> float:
    """The validation loss without the supervised head's term (no labels given): comparable with
    `mean_predictor_loss`."""
    model.eval()
    total, count = 0.0, 0
    for pixels in _batches(dataset, batch_size, model.device):
        total += model(pixels).loss.item() * len(pixels)
        count += len(pixels)
    return total / max(count, 1)


def reconstruction_metrics(model: MAE, dataset, batch_size: int = 64) -> dict:
    """`eval_loss_mean_predictor`, and `eval_reconstruction_loss` for an MAE with a supervised head (whose
    `eval_loss` adds the labelled images' weighted cross-entropy)."""
    metrics = {"eval_loss_mean_predictor": mean_predictor_loss(model, dataset, batch_size)}
    if getattr(model, "classifier", None) is not None:
        metrics["eval_reconstruction_loss"] = reconstruction_only_loss(model, dataset, batch_size)
    return metrics


@torch.no_grad()
def save_reconstructions(
    model: MAE,
    dataset,
    output_dir: str,
    channels: int | list[int] | None = None,
    n: int | None = None,
    mean_view: bool = False,
) -> str:
    """`reconstruction.png`: originals, what the encoder saw, and the reconstructions, of images or volumes.

    Images: the first `n` (default 4). Volumes: the `n` (default 1) with the most structure (intensity spread) of
    the first 16, so the figure shows objects, not empty background, as orthogonal slices. Masks are drawn at the
    model's ratio, the same in every figure of a run; a model that throws patches in training has every hidden
    patch reconstructed here (thrown patches are never trained to be reconstructed: hidden, not thrown).

    Args:
        model: a 2D or 3D MAE.
        dataset: items with "pixel_values".
        output_dir: where the PNG goes.
        channels: 1 channel (grey) or 3 (RGB) shown (`plots.resolve_channels`).
        n: how many images or volumes.
        mean_view: show the average of all channels (original and reconstruction alike) as one grey image.
    """
    model.eval()
    volumes = isinstance(model, MedMAE3DForPreTraining)
    if volumes:
        crops = [torch.as_tensor(dataset[i]["pixel_values"]) for i in range(min(16, len(dataset)))]
        shown = sorted(crops, key=lambda x: -float(x.std()))[: n or 1]
    else:
        shown = [torch.as_tensor(dataset[i]["pixel_values"]) for i in range(min(n or 4, len(dataset)))]
    pixels = torch.stack(shown).to(model.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same masks in every figure of a run's images
        codes = None
        if model.config.throw_ratio > 0:
            uniform = RandomMaskGenerator(model.config.mask_ratio, model.mask_generator.grid_size)
            codes = uniform(len(pixels), device=model.device)
        out = model(pixels, mask_codes=codes)
    recon = model.reconstruct(pixels, out.logits, out.mask)
    if mean_view:
        pixels, recon, channels = pixels.mean(1, keepdim=True), recon.mean(1, keepdim=True), [0]
    return save_reconstruction_grid(
        pixels.float().cpu().numpy(),
        out.mask.cpu().numpy(),
        recon.float().cpu().numpy(),
        model.config.patch_shape if volumes else model.config.patch_size,
        f"{output_dir}/reconstruction.png",
        channels=channels,
    )


__all__ = ["mean_predictor_loss", "reconstruction_metrics", "reconstruction_only_loss", "save_reconstructions"]
