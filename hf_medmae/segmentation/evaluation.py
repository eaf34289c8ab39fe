"""Scoring label maps against their truth, for images and volumes alike: `test_metrics.json`, the confusion matrix
and the overlays a run (or a scored prediction set) writes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..metrics import Spacing, pooled_segmentation_metrics, segmentation_metrics
from ..plots import plot_confusion_matrix, plot_segmentation_overlays


def score_label_maps(
    preds: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    class_names: list[str],
    ignore_index: int = 255,
    spacing: Spacing | None = None,
    surface_tolerance_mm: float = 1.0,
) -> dict:
    """Segmentation metrics of predicted class ids against the truth.

    Images of one size are scored as one [N, H, W] batch (HD95 per image); volumes, or images of several sizes,
    with `pooled_segmentation_metrics` (every labelled pixel pooled, HD95 per item).

    Args:
        preds: one [H, W] or [D, H, W] class-id array per item.
        truths: the true class ids, same shapes, `ignore_index` for unlabeled pixels.
        class_names: K class names.
        ignore_index: label value of unlabeled pixels.
        spacing: voxel sizes in mm in the arrays' axis order (e.g. (D, H, W)), one sequence for all items or one
            per item: adds HD95 in mm and the surface Dice (`segmentation_metrics`); None: metrics in voxels only.
        surface_tolerance_mm: the surface Dice's tolerance in mm.

    Example:
        >>> t = np.zeros((2, 4, 4), int)
        >>> score_label_maps(t, t, ["bg", "cell"])["pixel_accuracy"]
        1.0
    """
    mm = dict(spacing=spacing, surface_tolerance_mm=surface_tolerance_mm)
    if np.ndim(truths[0]) == 2 and len({np.shape(t) for t in truths}) == 1:
        return segmentation_metrics(np.stack(preds), np.stack(truths), class_names, ignore_index, **mm)
    return pooled_segmentation_metrics(list(preds), list(truths), class_names, ignore_index, **mm)


def write_test_report(
    output_dir: str | Path,
    preds: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    images: Sequence[np.ndarray] | None,
    class_names: list[str],
    ignore_index: int = 255,
    title: str = "Test pixels",
    num_overlays: int = 4,
    display_channels: list[int] | None = None,
    names: Sequence[str] | None = None,
    extra: dict | None = None,
    metrics: dict | None = None,
    spacing: Spacing | None = None,
    surface_tolerance_mm: float = 1.0,
) -> dict:
    """`test_metrics.json` (with `extra` added), `confusion_matrix.png` and `overlays.png` of label maps.

    Args:
        output_dir: folder of the three files.
        preds, truths: one class-id array per image [H, W] or volume [D, H, W].
        images: the images [C, H, W] (or volumes [C, D, H, W]) drawn under the overlays; None: no overlays.
        class_names: K class names.
        ignore_index: label value of unlabeled pixels.
        title: the confusion matrix's title.
        num_overlays: images drawn (volumes: all of them); images of several sizes are not drawn.
        display_channels: channels shown for images (1 or 3).
        names: one title per volume.
        extra: more values for `test_metrics.json`.
        metrics: `score_label_maps` of these label maps when already computed.
        spacing, surface_tolerance_mm: voxel sizes in mm and the surface Dice's tolerance (`score_label_maps`),
            used when `metrics` is None.

    Returns:
        The metrics (without `extra`).
    """
    metrics = metrics or score_label_maps(preds, truths, class_names, ignore_index, spacing, surface_tolerance_mm)
    Path(output_dir, "test_metrics.json").write_text(json.dumps({**metrics, **(extra or {})}, indent=2, default=str))
    plot_confusion_matrix(
        np.asarray(metrics["confusion_matrix"]), class_names, f"{output_dir}/confusion_matrix.png", title=title
    )
    if images is not None:
        save_overlays(
            f"{output_dir}/overlays.png",
            images,
            truths,
            preds,
            class_names,
            ignore_index,
            num_overlays,
            display_channels,
            names,
        )
    return metrics


def save_overlays(
    path: str | Path,
    images: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    class_names: list[str],
    ignore_index: int = 255,
    num_overlays: int = 4,
    display_channels: list[int] | None = None,
    names: Sequence[str] | None = None,
) -> str | None:
    """The first `num_overlays` images with truth and prediction (every volume); None for images of several sizes,
    or when `num_overlays` is 0 (no picture asked for)."""
    if num_overlays < 1 or not len(truths):
        return None
    if np.ndim(truths[0]) == 3:
        return plot_segmentation_overlays(images, truths, preds, path, class_names, ignore_index, names=names)
    if len({np.shape(t) for t in truths}) != 1:
        return None
    n = min(num_overlays, len(truths))
    return plot_segmentation_overlays(
        np.stack([np.asarray(images[i], dtype=np.float32) for i in range(n)]),
        np.stack(truths[:n]),
        np.stack(preds[:n]),
        path,
        class_names,
        ignore_index,
        channels=display_channels,
    )


__all__ = ["save_overlays", "score_label_maps", "write_test_report"]
