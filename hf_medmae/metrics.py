"""Classification and segmentation metrics, built on scikit-learn and MONAI.

Every result is JSON-serialisable (plain floats, ints, lists, dicts, ``None``), so it can be written
next to a checkpoint as-is. The ``*_compute_metrics_fn`` factories return callables for
``transformers.Trainer(compute_metrics=...)`` that return flat float scalars only.

    >>> import numpy as np
    >>> m = classification_metrics(np.eye(3)[[0, 1, 2, 1]], np.array([0, 1, 2, 1]), ["a", "b", "c"])
    >>> m["accuracy"]
    1.0
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice
from scipy.special import expit, softmax
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)
from sklearn.preprocessing import label_binarize

from .errors import ConfigError, DataError

__all__ = [
    "calibration_bins",
    "confidence_by_class",
    "expected_calibration_error",
    "classification_metrics",
    "compute_metrics_fn",
    "segmentation_metrics",
    "pooled_segmentation_metrics",
    "segmentation_compute_metrics_fn",
    "segmentation_preprocess_logits",
]


def _plain(obj: Any) -> Any:
    """Turn numpy scalars/arrays (also nested in dicts/lists) into builtin Python types for JSON."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def _check_int_labels(values: np.ndarray, num_classes: int, what: str, allowed_extra: tuple = ()) -> None:
    """Raise a DataError naming the label values outside [0, num_classes) (plus ``allowed_extra``)."""
    if values.size and not np.all(np.equal(np.mod(values, 1), 0)):
        raise DataError(
            f"{what} must be integer class indices, got non-integer values.",
            "Pass class indices (argmax of the logits), not probabilities or one-hot rows.",
        )
    uniq = np.unique(values)
    bad = [int(v) for v in uniq if not (0 <= v < num_classes) and v not in allowed_extra]
    if bad:
        extra = f" or {list(allowed_extra)}" if allowed_extra else ""
        raise DataError(
            f"{what} contain values {bad[:10]} outside [0, {num_classes}){extra}.",
            f"Map labels to 0..{num_classes - 1} (one per entry of class_names, {num_classes} given), "
            "or add the missing class names.",
        )


def _check_probs(probs: np.ndarray, labels: np.ndarray, class_names: list[str], multi_label: bool) -> None:
    """Validate shapes and values of classification inputs."""
    k = len(class_names)
    if probs.ndim != 2 or probs.shape[1] != k:
        raise DataError(
            f"probs must have shape [N, {k}] (one column per class name), got {probs.shape}.",
            "Pass softmax/sigmoid outputs with one column per entry of class_names.",
        )
    if len(probs) != len(labels):
        raise DataError(
            f"probs has {len(probs)} rows but labels has {len(labels)}.",
            "Pass one label per prediction, in the same order.",
        )
    if len(probs) == 0:
        raise DataError("No samples to evaluate (empty probs).", "Evaluate on a non-empty split.")
    if not np.all(np.isfinite(probs)):
        raise DataError("probs contain NaN or inf.", "Check the model outputs (diverged training?).")
    if multi_label:
        if labels.shape != probs.shape or not np.isin(labels, (0, 1)).all():
            raise DataError(
                f"Multi-label labels must be 0/1 of shape {probs.shape}, got {labels.shape}.",
                "Pass a [N, K] multi-hot matrix, or use multi_label=False for class indices.",
            )
    else:
        if labels.ndim != 1:
            raise DataError(
                f"labels must be 1-D class indices, got shape {labels.shape}.",
                "Pass labels as [N] integers, or set multi_label=True for [N, K] 0/1 labels.",
            )
        _check_int_labels(labels, k, "labels")


def calibration_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Bin samples by their max probability (equal-width bins on [0, 1]) for ECE and reliability plots.

    Args:
        probs: [N, K] class probabilities.
        labels: [N] true class indices.
        n_bins: number of equal-width bins.

    Returns:
        dict with ``edges`` [n_bins+1], and per bin ``confidence`` (mean max prob), ``accuracy`` and
        ``count`` [n_bins]; empty bins have confidence/accuracy NaN and count 0.

    Example:
        >>> calibration_bins(np.array([[0.9, 0.1]]), np.array([0]), n_bins=2)["count"].tolist()
        [0, 1]
    """
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bins are (lo, hi]; a confidence of exactly 0 (impossible for a max prob) would fall in bin 0.
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return {"edges": edges, "confidence": mean_conf, "accuracy": acc, "count": count}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error: count-weighted mean |accuracy - confidence| over max-prob bins.

    Written here because neither scikit-learn nor MONAI ships a multi-class ECE.

    Args:
        probs: [N, K] class probabilities.
        labels: [N] true class indices.
        n_bins: number of equal-width bins on [0, 1].

    Example:
        >>> expected_calibration_error(np.array([[0.75, 0.25]] * 4), np.array([0, 0, 0, 1]))
        0.0
    """
    b = calibration_bins(probs, labels, n_bins)
    full = b["count"] > 0
    gap = np.abs(b["accuracy"][full] - b["confidence"][full])
    return float(np.sum(gap * b["count"][full]) / b["count"].sum())


def _summary(values: np.ndarray) -> dict[str, Any]:
    """count/mean/median/q25/q75 of a 1-D array; statistics are None when it is empty."""
    if values.size == 0:
        return {"count": 0, "mean": None, "median": None, "q25": None, "q75": None}
    q25, med, q75 = np.percentile(values, [25, 50, 75])
    return {
        "count": int(values.size),
        "mean": float(values.mean()),
        "median": float(med),
        "q25": float(q25),
        "q75": float(q75),
    }


def confidence_by_class(probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """Confidence (probability of the predicted class) per true class, split correct / wrong.

    Args:
        probs: [N, K] class probabilities.
        labels: [N] true class indices.
        class_names: K names, used as keys.

    Example:
        >>> confidence_by_class(np.array([[0.8, 0.2]]), np.array([0]), ["a", "b"])["a"]["correct"]["count"]
        1
    """
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    out = {}
    for k, name in enumerate(class_names):
        of_k = labels == k
        out[name] = {"correct": _summary(conf[of_k & (pred == k)]), "wrong": _summary(conf[of_k & (pred != k)])}
    return out


def _ovr_auc(probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Macro one-vs-rest ROC-AUC over the classes present in ``labels`` (None if fewer than 2)."""
    present = sorted(int(c) for c in np.unique(labels))
    left_out = [name for k, name in enumerate(class_names) if k not in present]
    if len(present) < 2:
        return {
            "roc_auc": None,
            "roc_auc_per_class": {},
            "roc_auc_classes_left_out": left_out,
            "roc_auc_note": "fewer than 2 classes present in labels; ROC-AUC undefined",
        }
    # Binarised one-vs-rest form lets sklearn score a subset of classes (multi_class="ovr" needs all).
    onehot = label_binarize(labels, classes=list(range(len(class_names))))
    if onehot.shape[1] == 1:  # label_binarize returns one column for K == 2
        onehot = np.hstack([1 - onehot, onehot])
    per = roc_auc_score(onehot[:, present], probs[:, present], average=None)
    return {
        "roc_auc": float(np.mean(per)),
        "roc_auc_per_class": {class_names[k]: float(a) for k, a in zip(present, per)},
        "roc_auc_classes_left_out": left_out,
    }


def _single_label_metrics(probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    k = len(class_names)
    pred = probs.argmax(axis=1)
    out: dict[str, Any] = {"n_samples": int(len(labels)), "accuracy": accuracy_score(labels, pred)}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, pred, labels=range(k), average=avg, zero_division=0)
        out.update({f"{avg}_precision": p, f"{avg}_recall": r, f"{avg}_f1": f})
    with warnings.catch_warnings():  # balanced_accuracy warns when a class is absent from labels
        warnings.simplefilter("ignore", UserWarning)
        out["balanced_accuracy"] = balanced_accuracy_score(labels, pred)
    out["per_class"] = classification_report(
        labels, pred, labels=range(k), target_names=class_names, output_dict=True, zero_division=0
    )
    out.update(_ovr_auc(probs, labels, class_names))
    out["confusion_matrix"] = confusion_matrix(labels, pred, labels=range(k))
    out["confidence"] = confidence_by_class(probs, labels, class_names)
    out["ece"] = expected_calibration_error(probs, labels, n_bins=15)
    return out


def _multi_label_metrics(probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    labels = labels.astype(int)
    pred = (probs >= 0.5).astype(int)
    per, skipped = {}, []
    for k, name in enumerate(class_names):
        if len(np.unique(labels[:, k])) < 2:
            skipped.append(name)  # AUC is undefined when a column holds a single value
        else:
            per[name] = float(roc_auc_score(labels[:, k], probs[:, k]))
    return {
        "n_samples": int(len(labels)),
        "roc_auc_per_class": per,
        "roc_auc": float(np.mean(list(per.values()))) if per else None,
        "roc_auc_classes_left_out": skipped,
        "micro_f1": f1_score(labels, pred, average="micro", zero_division=0),
        "macro_f1": f1_score(labels, pred, average="macro", zero_division=0),
        "subset_accuracy": accuracy_score(labels, pred),
    }  # sklearn: exact match of whole rows


def classification_metrics(
    probs: np.ndarray, labels: np.ndarray, class_names: list[str], multi_label: bool = False
) -> dict:
    """Classification metrics as a JSON-serialisable dict.

    Single-label: accuracy, balanced_accuracy, macro/weighted precision/recall/f1, ``per_class``
    (sklearn classification_report), ``roc_auc`` (macro one-vs-rest over classes present in labels,
    with ``roc_auc_classes_left_out``), ``confusion_matrix`` (rows = true), ``confidence`` (probability
    of the predicted class per true class, correct vs wrong) and ``ece`` (15 bins).
    Multi-label: ``roc_auc_per_class``, ``roc_auc`` (mean), ``micro_f1``, ``macro_f1`` at 0.5,
    ``subset_accuracy``.

    Args:
        probs: [N, K] softmax (single-label) or sigmoid (multi-label) outputs.
        labels: [N] class indices in [0, K), or [N, K] 0/1 when ``multi_label``.
        class_names: K class names.
        multi_label: treat the task as K independent binary problems.

    Example:
        >>> classification_metrics(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1]), ["a", "b"])["macro_f1"]
        1.0
    """
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels)
    _check_probs(probs, labels, class_names, multi_label)
    fn = _multi_label_metrics if multi_label else _single_label_metrics
    return _plain(fn(probs, labels.astype(int), class_names))


def _first(predictions: Any) -> np.ndarray:
    """Trainer passes a tuple when the model returns extra outputs; logits come first."""
    return np.asarray(predictions[0] if isinstance(predictions, (tuple, list)) else predictions)


# The scalars `compute_metrics_fn` reports, by `multi_label` (the classifier's selection metrics come from here).
EVAL_METRICS = {
    False: (
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "weighted_f1",
        "macro_precision",
        "macro_recall",
        "roc_auc",
        "ece",
    ),
    True: ("roc_auc", "micro_f1", "macro_f1", "subset_accuracy"),
}


def compute_metrics_fn(class_names: list[str], multi_label: bool = False) -> Callable[[Any], dict[str, float]]:
    """Build a ``compute_metrics`` callable for ``transformers.Trainer`` (flat float scalars).

    Applies softmax (or sigmoid when ``multi_label``) to ``eval_pred.predictions`` and returns
    accuracy, balanced_accuracy, macro_f1, weighted_f1, macro_precision, macro_recall, roc_auc, ece
    (multi-label: roc_auc, micro_f1, macro_f1, subset_accuracy). An undefined ROC-AUC is NaN.

    Args:
        class_names: K class names.
        multi_label: sigmoid + multi-label metrics instead of softmax + single-label ones.

    Example:
        >>> trainer = Trainer(..., compute_metrics=compute_metrics_fn(["neutrophil", "lymphocyte"]))
    """
    keys = EVAL_METRICS[multi_label]

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        logits = _first(eval_pred.predictions).astype(float)
        probs = expit(logits) if multi_label else softmax(logits, axis=-1)
        m = classification_metrics(probs, np.asarray(eval_pred.label_ids), class_names, multi_label)
        return {k: float("nan") if m[k] is None else float(m[k]) for k in keys}

    return compute_metrics


def _check_segmentation(pred: np.ndarray, target: np.ndarray, k: int, ignore_index: int) -> None:
    if pred.shape != target.shape or pred.ndim not in (3, 4):
        raise DataError(
            f"pred {pred.shape} and target {target.shape} must both be [N, H, W] (or [N, D, H, W] volumes).",
            "Argmax the logits over the class axis and resize predictions to the label size.",
        )
    _check_int_labels(pred, k, "Predictions")
    _check_int_labels(target, k, "Target masks", allowed_extra=(ignore_index,))


def _overlap_scores(cm: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Per-class Dice and IoU from the pooled pixel confusion matrix (rows = truth).

    Dice is computed from the confusion matrix (2TP / (2TP + FP + FN), pixels pooled over the
    dataset), not with MONAI's per-image ``compute_dice``, so ignored pixels are excluded exactly.
    A class absent from both prediction and target has no score (None) and is left out of the means.
    """
    tp = np.diag(cm).astype(float)
    fp, fn = cm.sum(axis=0) - tp, cm.sum(axis=1) - tp
    dice, iou = {}, {}
    for k, name in enumerate(class_names):
        denom = tp[k] + fp[k] + fn[k]
        dice[name] = None if denom == 0 else float(2 * tp[k] / (denom + tp[k]))
        iou[name] = None if denom == 0 else float(tp[k] / denom)

    def mean(d):
        present = [v for v in d.values() if v is not None]
        return float(np.mean(present)) if present else None

    return {"dice_per_class": dice, "mean_dice": mean(dice), "iou_per_class": iou, "mean_iou": mean(iou)}


Spacing = float | Sequence[float] | Sequence[Sequence[float]]
"""Voxel sizes in mm: one number (isotropic), one per axis in the array's axis order (e.g. (D, H, W)) for every
item, or one such sequence per item."""


def _spacings(spacing: Spacing | None, n_items: int, spatial_dims: int) -> list[tuple[float, ...]] | None:
    """One per-axis spacing per item from `spacing` (None stays None); a `DataError` when it does not fit."""
    if spacing is None:
        return None
    try:
        array = np.asarray(spacing, dtype=float)
    except (TypeError, ValueError):
        array = None  # ragged or not numbers
    if array is None or array.ndim > 2:
        shape_ok = False
    elif array.ndim == 0:
        array, shape_ok = np.full((n_items, spatial_dims), float(array)), True
    elif array.ndim == 1:
        shape_ok = array.shape == (spatial_dims,)
        array = np.broadcast_to(array, (n_items, spatial_dims)) if shape_ok else array
    else:
        shape_ok = array.shape == (n_items, spatial_dims)
    if not shape_ok:
        raise DataError(
            f"spacing {spacing!r} does not fit {n_items} item(s) of {spatial_dims} spatial axes.",
            f"give one voxel size per axis in the arrays' axis order (e.g. {(1.0,) * spatial_dims} mm) for all "
            f"items, or one such sequence per item ({n_items}).",
        )
    if not (np.all(np.isfinite(array)) and np.all(array > 0)):
        raise DataError(
            f"spacing {spacing!r} holds values that are not positive numbers.",
            "give the voxel sizes in mm (e.g. from the NIfTI header's pixdim), all > 0.",
        )
    return [tuple(float(v) for v in row) for row in array]


def _check_tolerance(tolerance_mm: float) -> float:
    if not (np.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ConfigError(
            f"surface_tolerance_mm={tolerance_mm} is not a distance.",
            "give the surface Dice tolerance in mm, >= 0 (e.g. 1.0).",
        )
    return float(tolerance_mm)


def _class_means(d: np.ndarray, class_names: list[str]) -> tuple[dict[str, float | None], dict[str, int]]:
    """Per-class mean over the items where the [M, K] score is finite (None where it is nowhere), and the counts."""
    per, n_used = {}, {}
    for c, name in enumerate(class_names):
        finite = d[:, c][np.isfinite(d[:, c])]
        per[name] = float(finite.mean()) if finite.size else None
        n_used[name] = int(finite.size)
    return per, n_used


def _mean_of(per: dict[str, float | None]) -> float | None:
    vals = [v for v in per.values() if v is not None]
    return float(np.mean(vals)) if vals else None


def _hd95(
    pred: np.ndarray,
    target: np.ndarray,
    class_names: list[str],
    ignore_index: int,
    spacing: list[tuple[float, ...]] | None = None,
    tolerance_mm: float = 1.0,
) -> dict[str, Any]:
    """HD95 per class with MONAI on images without ignored pixels; NaN/inf (class absent) excluded.

    With `spacing` (one per-axis spacing per image) also HD95 in mm and the normalised surface Dice at
    `tolerance_mm`, on the same images and with the same exclusion of undefined (NaN) values.
    """
    dense = ~(target == ignore_index).reshape(len(target), -1).any(axis=1)
    skipped = int((~dense).sum())
    if not dense.any():
        out = {
            "hd95": None,
            "hd95_per_class": None,
            "hd95_images_used": 0,
            "hd95_images_skipped": skipped,
            "hd95_note": "no image is fully labeled (every image has ignore_index pixels); HD95 needs dense masks",
        }
        if spacing is not None:
            out.update(
                {
                    "hd95_mm": None,
                    "hd95_mm_per_class": None,
                    "surface_dice_per_class": None,
                    "mean_surface_dice": None,
                    "surface_tolerance_mm": tolerance_mm,
                }
            )
        return out
    k = len(class_names)
    eye = np.eye(k, dtype=np.float32)
    # [M, (D,) H, W] ints -> [M, K, (D,) H, W] one-hot, as MONAI expects
    onehot = lambda x: torch.from_numpy(np.ascontiguousarray(np.moveaxis(eye[x], -1, 1)))  # noqa: E731
    y_pred, y = onehot(pred[dense]), onehot(target[dense])
    with warnings.catch_warnings():  # MONAI warns for every class absent in an image
        warnings.simplefilter("ignore")
        d = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95).numpy()  # [M, K]
    per, n_used = _class_means(d, class_names)
    out = {
        "hd95": _mean_of(per),
        "hd95_per_class": per,
        "hd95_images_per_class": n_used,
        "hd95_images_used": int(dense.sum()),
        "hd95_images_skipped": skipped,
    }
    if spacing is not None:
        used = [sp for sp, keep in zip(spacing, dense) if keep]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d_mm = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=used).numpy()
            nsd = compute_surface_dice(
                y_pred, y, [tolerance_mm] * k, include_background=True, spacing=used
            ).numpy()  # NaN only where the class is in neither; 0 where it is in one of the two
        per_mm, _ = _class_means(d_mm, class_names)
        per_nsd, n_nsd = _class_means(nsd, class_names)
        out.update(
            {
                "hd95_mm": _mean_of(per_mm),
                "hd95_mm_per_class": per_mm,
                "surface_dice_per_class": per_nsd,
                "mean_surface_dice": _mean_of(per_nsd),
                "surface_dice_images_per_class": n_nsd,
                "surface_tolerance_mm": tolerance_mm,
            }
        )
    return out


def segmentation_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    class_names: list[str],
    ignore_index: int = 255,
    hd95: bool = True,
    spacing: Spacing | None = None,
    surface_tolerance_mm: float = 1.0,
) -> dict:
    """Semantic segmentation metrics on the labeled pixels (``target != ignore_index``).

    Returns ``per_class`` (sklearn classification_report: precision/recall/f1-score/support per class,
    macro avg, weighted avg), ``pixel_accuracy``, ``dice_per_class``/``mean_dice``,
    ``iou_per_class``/``mean_iou`` (classes absent from both pred and target are None and not
    averaged), ``confusion_matrix`` (rows = truth), and with ``hd95`` the 95th-percentile Hausdorff
    distance per class (MONAI, in pixels / voxels), averaged over the fully labeled images where the class
    is present in both prediction and truth; images with ignored pixels are skipped and counted.

    With ``hd95`` and a ``spacing``, on the same images, also in millimetres: ``hd95_mm_per_class`` /
    ``hd95_mm`` (MONAI's HD95 with that spacing) and the normalised surface Dice at ``surface_tolerance_mm``
    (MONAI's ``compute_surface_dice``: the share of both boundaries within the tolerance of the other),
    ``surface_dice_per_class`` / ``mean_surface_dice`` with ``surface_dice_images_per_class`` and
    ``surface_tolerance_mm``. The surface Dice of a class is undefined (left out) only where it is in neither
    map; a class in one map only scores 0 (HD95 leaves it out: its distance is infinite).

    Args:
        pred: [N, H, W] (or [N, D, H, W] volumes) predicted class indices.
        target: the same shape, true class indices, ``ignore_index`` for unlabeled pixels.
        class_names: K class names.
        ignore_index: label value of unlabeled pixels.
        hd95: also compute HD95 (slower: distance transforms per image and class).
        spacing: voxel sizes in mm, in the arrays' axis order (e.g. (D, H, W)): one sequence for all N items,
            one per item, or one number (isotropic); None: no millimetre metrics (the keys are as without it).
        surface_tolerance_mm: the surface Dice's tolerance, for every class.

    Example:
        >>> t = np.zeros((1, 4, 4), int); t[0, :2] = 1
        >>> segmentation_metrics(t, t, ["bg", "cell"])["mean_dice"]
        1.0
        >>> segmentation_metrics(t, t, ["bg", "cell"], spacing=(0.5, 0.5))["mean_surface_dice"]
        1.0
    """
    pred, target = np.asarray(pred), np.asarray(target)
    k = len(class_names)
    _check_segmentation(pred, target, k, ignore_index)
    spacings = _spacings(spacing, len(target), target.ndim - 1)
    surface_tolerance_mm = _check_tolerance(surface_tolerance_mm)
    keep = target != ignore_index
    if not keep.any():
        raise DataError(
            "Every target pixel equals ignore_index; nothing to evaluate.",
            f"Check the masks and ignore_index={ignore_index}.",
        )
    t, p = target[keep].astype(int), pred[keep].astype(int)
    cm = confusion_matrix(t, p, labels=range(k))
    out: dict[str, Any] = {
        "n_pixels": int(keep.sum()),
        "n_ignored": int((~keep).sum()),
        "pixel_accuracy": float(np.trace(cm) / cm.sum()),
    }
    out["per_class"] = classification_report(
        t, p, labels=range(k), target_names=class_names, output_dict=True, zero_division=0
    )
    out.update(_overlap_scores(cm, class_names))
    out["confusion_matrix"] = cm
    if hd95:
        out.update(
            _hd95(pred.astype(int), target.astype(int), class_names, ignore_index, spacings, surface_tolerance_mm)
        )
    return _plain(out)


def pooled_segmentation_metrics(
    preds: list[np.ndarray],
    labels: list[np.ndarray],
    class_names: list[str],
    ignore_index: int = 255,
    spacing: Spacing | None = None,
    surface_tolerance_mm: float = 1.0,
) -> dict:
    """`segmentation_metrics` over items of different sizes (whole test volumes, images of a new site).

    Dice / IoU / the confusion matrix pool every labelled pixel or voxel; HD95 is computed per item and class and
    averaged over the items where it is defined; `dice_per_volume` lists each item's mean Dice. With `spacing`,
    `hd95_mm_per_class` / `hd95_mm` and `surface_dice_per_class` / `mean_surface_dice` (with
    `surface_tolerance_mm`) are averaged over the items the same way.

    Args:
        preds: predicted class ids, one [H, W] or [D, H, W] array per item.
        labels: true class ids of the same shapes, `ignore_index` for unlabeled pixels.
        class_names: K class names.
        ignore_index: label value of unlabeled pixels.
        spacing: voxel sizes in mm in the arrays' axis order: one sequence (or number) for all items, or one per
            item; None: no millimetre metrics.
        surface_tolerance_mm: the surface Dice's tolerance, for every class.

    Example:
        >>> a, b = np.zeros((4, 4), int), np.ones((2, 3), int)
        >>> pooled_segmentation_metrics([a, b], [a, b], ["bg", "cell"])["mean_dice"]
        1.0
    """
    spacings = _spacings(spacing, len(labels), np.ndim(labels[0])) if len(labels) else None
    pooled = segmentation_metrics(
        np.concatenate([p.ravel() for p in preds])[None, None],
        np.concatenate([t.ravel() for t in labels])[None, None],
        class_names,
        ignore_index,
        hd95=False,
    )
    per_item = [
        segmentation_metrics(
            p[None],
            t[None],
            class_names,
            ignore_index,
            spacing=None if spacings is None else [spacings[i]],
            surface_tolerance_mm=surface_tolerance_mm,
        )
        for i, (p, t) in enumerate(zip(preds, labels))
    ]
    keys = [("hd95_per_class", "hd95")]
    if spacings is not None:
        keys += [("hd95_mm_per_class", "hd95_mm"), ("surface_dice_per_class", "mean_surface_dice")]
    for per_class, mean in keys:
        values = {
            name: [m[per_class][name] for m in per_item if (m.get(per_class) or {}).get(name) is not None]
            for name in class_names
        }
        pooled[per_class] = {name: float(np.mean(v)) if v else None for name, v in values.items()}
        pooled[mean] = _mean_of(pooled[per_class])
    if spacings is not None:
        pooled["surface_tolerance_mm"] = float(surface_tolerance_mm)
    pooled["dice_per_volume"] = [m["mean_dice"] for m in per_item]
    return pooled


def segmentation_preprocess_logits(logits: Any, labels: Any) -> torch.Tensor:
    """``preprocess_logits_for_metrics`` hook: argmax over classes so Trainer keeps [N, H, W] ints.

    Without it Trainer accumulates the full [N, K, H, W] float logits of the eval set in memory.

    Example:
        >>> Trainer(..., preprocess_logits_for_metrics=segmentation_preprocess_logits)
    """
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    return logits.argmax(dim=1)


def segmentation_compute_metrics_fn(
    class_names: list[str], ignore_index: int = 255
) -> Callable[[Any], dict[str, float]]:
    """Build a Trainer ``compute_metrics`` for segmentation (flat float scalars, no HD95).

    Accepts logits [N, K, H, W] (argmaxed here) or class maps [N, H, W] (from
    :func:`segmentation_preprocess_logits`). Returns pixel_accuracy, mean_dice, mean_iou, and
    dice_<name>, f1_<name> per class (NaN where a class is absent from both pred and target).

    Args:
        class_names: K class names.
        ignore_index: label value of unlabeled pixels.

    Example:
        >>> trainer = Trainer(..., compute_metrics=segmentation_compute_metrics_fn(["bg", "cell"]))
    """

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        pred = _first(eval_pred.predictions)
        labels = np.asarray(eval_pred.label_ids)
        if pred.ndim == labels.ndim + 1:
            pred = pred.argmax(axis=1)  # [N, K, (D,) H, W] -> [N, (D,) H, W]
        m = segmentation_metrics(pred, labels, class_names, ignore_index, hd95=False)
        nan = lambda v: float("nan") if v is None else float(v)  # noqa: E731
        out = {k: nan(m[k]) for k in ("pixel_accuracy", "mean_dice", "mean_iou")}
        for name in class_names:
            out[f"dice_{name}"] = nan(m["dice_per_class"][name])
            out[f"f1_{name}"] = float(m["per_class"][name]["f1-score"])
        return out

    return compute_metrics
