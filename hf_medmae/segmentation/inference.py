"""Segmenting images of any size: MONAI sliding-window inference, and whole folders of files to label PNGs.

A trained run saves `inference_config.json` (training scale, tile size, classes) beside its weights, so
`predict_files` can segment new images the way the model saw its training images.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from PIL import Image
from torch import nn
from transformers import AutoModelForSemanticSegmentation

from ..data.io import list_image_files, progress, read_image
from ..data.transforms import resize_pair
from ..errors import ConfigError, DataError
from ..loading import load_checkpoint

logger = logging.getLogger(__name__)
INFERENCE_FILE = "inference_config.json"


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    roi_size: int | tuple[int, int],
    sw_batch_size: int = 4,
    overlap: float = 0.25,
) -> torch.Tensor:
    """Class map of images of any size with MONAI sliding-window inference over `roi_size` tiles.

    Args:
        model: a segmenter whose `forward(pixel_values)` returns `.logits` [B, K, h, w].
        images: [B, C, H, W]; tiles are `roi_size` (the training size), blended with `overlap`.
        roi_size: tile size, a multiple of the model's patch size.
        sw_batch_size: tiles per forward pass.
        overlap: fraction of overlap between neighbouring tiles.

    Returns:
        [B, H, W] long class indices, on the device of `images`.

    Example:
        >>> model = build_unet_baseline(1, 2, features=(4, 4, 8, 8, 16, 4))
        >>> predict(model, torch.randn(1, 1, 48, 48), roi_size=32).shape
        torch.Size([1, 48, 48])
    """
    was_training = model.training
    model.eval()
    try:
        logits = sliding_window_inference(
            images,
            roi_size,
            sw_batch_size,
            lambda x: model(pixel_values=x).logits,
            overlap=overlap,
            sw_device=next(model.parameters()).device,
            device=images.device,
        )
    finally:
        model.train(was_training)
    return logits.argmax(dim=1)


def training_scale(image_sides: list[int], image_size: int, crop_mode: str) -> float:
    """Pixel scale the model was trained at: image_size / median image side when images were resized, else 1."""
    return 1.0 if crop_mode == "random_crop" else float(image_size / np.median(image_sides))


def save_inference_config(output_dir: str | Path, **values) -> None:
    """`inference_config.json`: model kind, image_size, scale, crop_mode, class map and names, ignore_index."""
    Path(output_dir, INFERENCE_FILE).write_text(json.dumps(values, indent=2))


def load_segmenter(folder: str | Path) -> tuple[nn.Module, dict, tuple[list[float], list[float]]]:
    """A segmenter saved by `run_segmentation.py`, its inference config and its (mean, std), strictly loaded."""
    folder = Path(folder)
    if not (folder / INFERENCE_FILE).is_file():
        raise ConfigError(
            f"{folder} has no {INFERENCE_FILE}, so it was not written by run_segmentation.py.",
            "pass --model_name_or_path OUTPUT_DIR_OF_A_RUN --predict_images FOLDER.",
        )
    model = load_checkpoint(AutoModelForSemanticSegmentation, folder, model_types=("medmae_segmenter", "medmae_unet"))
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    return (
        model.eval(),
        json.loads((folder / INFERENCE_FILE).read_text()),
        (processor["image_mean"], processor["image_std"]),
    )


def predict_files(
    model: nn.Module,
    source: str,
    output_dir: str,
    norm,
    image_size: int,
    scale: float = 1.0,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    pattern: str = "*",
) -> list[str]:
    """Segment every image of `source` (file or folder) by sliding window; write class-id PNGs.

    Images are rescaled by `scale` (the training scale), segmented in `image_size` tiles blended with
    `overlap`, and the label map is resized back (nearest) to the original size.
    """
    files = [Path(source)] if Path(source).is_file() else list_image_files(source, pattern=pattern)
    if not files:
        raise DataError(
            f"no images found in {source} (pattern {pattern!r}).",
            "point predict_images at an image file or a folder of images.",
        )
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in norm)
    device = next(model.parameters()).device
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for path in progress(files, desc="segmenting", unit="image"):
        image = (torch.from_numpy(read_image(path)) - mean) / std
        h, w = image.shape[1:]
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        scaled, _ = resize_pair(image, torch.zeros(h, w, dtype=torch.long), size)
        labels = predict(model, scaled[None].to(device), image_size, sw_batch_size, overlap)[0].cpu()
        _, labels = resize_pair(scaled, labels, (h, w))
        target = Path(output_dir, f"{path.stem}_labels.png")
        Image.fromarray(labels.numpy().astype(np.uint8)).save(target)
        written.append(str(target))
    logger.info("wrote %d label maps (class ids) to %s", len(written), output_dir)
    return written


__all__ = ["INFERENCE_FILE", "load_segmenter", "predict", "predict_files", "save_inference_config", "training_scale"]
