"""Segmenting images and volumes of any size: MONAI sliding-window inference, whole folders of files to label PNGs
(images) or NIfTI label maps in each scan's own geometry (volumes), and the `--predict_only` path (several sets,
scored where they have masks).

A trained run saves `inference_config.json` (training scale, tile size, classes; for volumes the voxel grid and the
intensity normalisation) beside its weights, so `predict_files` and `predict_volume_files` prepare new data the way
the model saw its training data.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from PIL import Image
from torch import nn
from transformers import AutoModelForSemanticSegmentation

from ..data.geometry import Geometry, Grid, save_nifti, to_original
from ..data.io import list_image_files, progress, read_image
from ..data.segmentation import load_pairs, map_labels, parse_class_map, read_label
from ..data.transforms import resize_pair
from ..errors import ConfigError, DataError
from ..inference.sets import sets_with_truths, write_external_metrics
from ..loading import load_checkpoint
from .evaluation import score_label_maps, write_test_report

logger = logging.getLogger(__name__)
INFERENCE_FILE = "inference_config.json"


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    roi_size: int | Sequence[int],
    sw_batch_size: int = 4,
    overlap: float = 0.25,
) -> torch.Tensor:
    """Class map of images of any size with MONAI sliding-window inference over `roi_size` tiles.

    Args:
        model: a segmenter whose `forward(pixel_values)` returns `.logits` [B, K, h, w].
        images: [B, C, H, W]; tiles are `roi_size` (the training size), blended with `overlap`.
        roi_size: tile size (H, W), or (D, H, W) for volumes [B, C, D, H, W]; the model's input size.
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


def predict_volumes(
    model: nn.Module,
    volumes: Sequence[np.ndarray],
    roi_size: Sequence[int],
    sw_batch_size: int = 2,
    overlap: float = 0.25,
) -> list[np.ndarray]:
    """Class ids [D, H, W] of each whole (normalised) volume [C, D, H, W], by sliding `roi_size` windows."""
    device = next(model.parameters()).device
    return [
        predict(
            model, torch.from_numpy(np.ascontiguousarray(v))[None].to(device), tuple(roi_size), sw_batch_size, overlap
        )[0]
        .cpu()
        .numpy()
        for v in volumes
    ]


def volume_grid(info: dict) -> Grid:
    """The voxel grid a volume segmenter was trained on, from its inference config (older runs: stored voxels)."""
    grid = info.get("voxel_grid") or {"orientation": None, "spacing": None}
    mode = {"linear": "bilinear", "cubic": 3}[info.get("interpolation", "linear")]
    return Grid(grid["orientation"], None if grid["spacing"] is None else tuple(grid["spacing"]), mode)


def predict_volume_files(
    model: nn.Module,
    info: dict,
    source: str,
    output_dir: str,
    sw_batch_size: int = 2,
    overlap: float = 0.25,
    series_uid: str | None = None,
) -> list[tuple[str, Path, np.ndarray, Geometry]]:
    """Segment every volume of `source` (a folder, a file or a DICOM series) on the model's grid and write one
    NIfTI label map per volume in the volume's own geometry (shape and affine of the input, orientation and
    resampling undone), `<name>_labels.nii.gz`, which overlays the scan in any viewer.

    Returns:
        (name, written file, class ids [D, H, W] on the input's voxels, the input's geometry) per volume.
    """
    from ..data.volumes import case_files, case_stem, load_volume, normaliser, read_geometry

    grid = volume_grid(info)
    normalise = normaliser(info)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for name, case in progress(case_files(source), desc="segmenting", unit="volume"):
        volume, model_geometry = load_volume(case, grid, series_uid)
        stored = read_geometry(case, series_uid) or model_geometry  # TIFF / .npy: never reoriented or resampled
        volume = normalise(volume)
        labels = predict_volumes(model, [volume], info["roi_size"], sw_batch_size, overlap)[0]
        labels = to_original(labels.astype(np.int64), model_geometry, stored)
        target = Path(output_dir, f"{case_stem(name)}_labels.nii.gz")
        save_nifti(labels, stored, target, dtype=np.uint8 if labels.max(initial=0) < 256 else np.uint16)
        written.append((name, target, labels, stored))
    logger.info("wrote %d label volumes (class ids, NIfTI in each input's geometry) to %s", len(written), output_dir)
    return written


def prediction_sets(sources: list[str] | None, output_dir: str) -> list[tuple[str, str]]:
    """(set, folder its label maps go to): `output_dir` itself for one set, `output_dir/<set name>` for several.

    Example:
        >>> prediction_sets(["a/site1", "b/site2"], "out")
        [('a/site1', 'out/site1'), ('b/site2', 'out/site2')]
    """
    sources = sources or []
    return [(src, output_dir if len(sources) == 1 else str(Path(output_dir, Path(src).stem))) for src in sources]


def segment_sets(
    model_folder: str,
    sources: list[str] | None,
    output_dir: str,
    mask_dirs: list[str] | None = None,
    image_glob: str = "*",
    mask_pattern: str = "{stem}.png",
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    num_overlays: int = 4,
    display_channels: list[int] | None = None,
) -> dict:
    """Segment each image set with a model saved by `run_segmentation.py` (no training); score the sets that have
    masks and list them in `external_metrics.csv`.

    Args:
        model_folder: a run's output folder (weights, `preprocessor_config.json`, `inference_config.json`).
        sources: image files or folders, one set each; several sets write one sub-folder each.
        output_dir: where the label maps (and scores) go.
        mask_dirs: one mask folder per set ('' for none): that set is scored with the model's class map.
        image_glob, mask_pattern: which files are images, and each image's mask file name.
        sw_batch_size, overlap: sliding-window settings.
        num_overlays, display_channels: the overlays of scored sets.

    Returns:
        {"num_predictions", "class_names", "sets": one row of scores per scored set}.
    """
    masks = sets_with_truths(
        sources, mask_dirs, model_folder, "predict_images", "predict_mask_dirs", "run_segmentation.py"
    )
    model, info, norm = load_segmenter(model_folder)
    written, rows = 0, []
    for (source, target), mask_dir in zip(prediction_sets(sources, output_dir), masks):
        written += len(
            predict_files(
                model, source, target, norm, info["image_size"], info["scale"], sw_batch_size, overlap, image_glob
            )
        )
        if mask_dir:  # a labelled set from elsewhere: score the label maps against its masks
            scores = score_predictions(
                source, mask_dir, target, info, image_glob, mask_pattern, num_overlays, display_channels
            )
            rows.append({"set": Path(source).stem, **scores})
    write_external_metrics(rows, output_dir)
    return {"num_predictions": written, "class_names": info["class_names"], "sets": rows}


def segment_volume_sets(
    model_folder: str,
    sources: list[str] | None,
    output_dir: str,
    label_dirs: list[str] | None = None,
    label_pattern: str = "{stem}_label{suffix}",
    sw_batch_size: int = 2,
    overlap: float = 0.25,
    series_uid: str | None = None,
) -> dict:
    """Segment each volume set with a model saved by `run_segmentation.py` (`spatial_dims: 3`): one NIfTI label map
    per volume in its own geometry; sets with labels are scored there, with surface distances in millimetres.

    Args:
        model_folder: a 3D run's output folder.
        sources: folders of volumes (NIfTI, DICOM series, TIFF, .npy) or single volumes, one set each.
        output_dir: where the label maps go (several sets: one sub-folder each).
        label_dirs: one label folder per set ('' for none), labels named by `label_pattern`.
        sw_batch_size, overlap: sliding-window settings.
        series_uid: the DICOM series to read where a folder holds several.

    Returns:
        {"num_predictions", "class_names", "sets": one row of scores per scored set}.
    """
    labels = sets_with_truths(
        sources, label_dirs, model_folder, "predict_volumes", "predict_label_dirs", "run_segmentation.py"
    )
    model, info, _ = load_segmenter(model_folder)
    if info.get("spatial_dims") != 3:
        raise ConfigError(
            f"{model_folder} segments 2-D images, not volumes.", "use predict_images (2D) or a 3D run's folder."
        )
    written, rows = 0, []
    for (source, target), label_dir in zip(prediction_sets(sources, output_dir), labels):
        done = predict_volume_files(model, info, source, target, sw_batch_size, overlap, series_uid)
        written += len(done)
        if label_dir:
            rows.append({"set": Path(source).stem, **score_volume_predictions(done, label_dir, label_pattern, info)})
            write_test_report(target, [], [], None, info["class_names"], metrics=rows[-1].pop("metrics"))
    write_external_metrics(rows, output_dir)
    return {"num_predictions": written, "class_names": info["class_names"], "sets": rows}


def score_volume_predictions(done: list, label_dir: str, label_pattern: str, info: dict) -> dict:
    """Scores of `predict_volume_files`' label maps against the set's own label volumes, in the scans' geometry
    (HD95 and surface Dice in mm), mapped with the model's class map."""
    from ..data.geometry import check_same_grid
    from ..data.volumes import case_stem, read_geometry, read_volume, volume_suffix

    class_map, names = parse_class_map(info["class_map"], info["ignore_index"]), info["class_names"]
    preds, truths, spacings = [], [], []
    for name, _, labels, geometry in done:
        suffix = volume_suffix(name) if case_stem(name) != name else ".nii.gz"
        path = Path(label_dir, label_pattern.format(stem=case_stem(name), suffix=suffix, name=name))
        if not path.is_file():
            raise DataError(f"{name} has no label {path}.", "fix predict_label_dirs / label_pattern.")
        check_same_grid(geometry, read_geometry(path) or geometry, name)
        raw = read_label(path, read=read_volume)
        preds.append(labels)
        truths.append(map_labels(raw, class_map, path.name))
        spacings.append(geometry.spacing)
    metrics = score_label_maps(preds, truths, names, info["ignore_index"], spacing=spacings)
    return {
        "volumes": len(truths),
        "mean_dice": metrics["mean_dice"],
        **{f"dice_{name}": metrics["dice_per_class"][name] for name in names},
        "metrics": metrics,
    }


def score_predictions(
    source: str,
    mask_dir: str,
    output_dir: str,
    info: dict,
    image_glob: str = "*",
    mask_pattern: str = "{stem}.png",
    num_overlays: int = 4,
    display_channels: list[int] | None = None,
) -> dict:
    """test_metrics.json, confusion matrix and overlays of `predict_files`' label maps against the set's own masks,
    mapped with the class map the model was trained with (`info`; so the raw mask values must mean the same).

    Returns:
        One table row: images, mean Dice, pixel accuracy and the Dice of each class.
    """
    pairs = load_pairs(source, mask_dir, image_glob, mask_pattern)
    class_map, names = parse_class_map(info["class_map"], info["ignore_index"]), info["class_names"]
    truth = [map_labels(m, class_map, name) for m, name in zip(pairs.labels, pairs.names)]
    preds = [
        np.asarray(Image.open(Path(output_dir, f"{Path(name).stem}_labels.png")), dtype=np.int64)
        for name in pairs.names
    ]
    metrics = write_test_report(
        output_dir,
        preds,
        truth,
        pairs.images,
        names,
        info["ignore_index"],
        title="Predicted pixels",
        num_overlays=num_overlays,
        display_channels=display_channels,
        extra=dict(data=source, masks=mask_dir, num_images=len(truth)),
    )
    return {
        "images": len(truth),
        "mean_dice": metrics["mean_dice"],
        "pixel_accuracy": metrics["pixel_accuracy"],
        **{f"dice_{name}": metrics["dice_per_class"][name] for name in names},
    }


__all__ = [
    "INFERENCE_FILE",
    "load_segmenter",
    "predict",
    "predict_files",
    "predict_volume_files",
    "predict_volumes",
    "prediction_sets",
    "score_volume_predictions",
    "segment_volume_sets",
    "volume_grid",
    "save_inference_config",
    "score_predictions",
    "segment_sets",
    "training_scale",
]
