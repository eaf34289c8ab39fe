"""Scoring a classifier's probabilities: the metrics, what was predicted per class, and the three plots."""

from __future__ import annotations

import logging

import numpy as np
from scipy.special import expit, softmax
from sklearn.metrics import precision_recall_fscore_support
from torch.utils.data import Dataset
from transformers import Trainer

from ..data.splits import class_counts
from ..metrics import classification_metrics
from ..plots import plot_confidence, plot_confusion_matrix, plot_reliability

logger = logging.getLogger(__name__)


def present_class_scores(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Macro precision/recall/F1 over the classes present in `labels` (train-only classes left out of the mean).

    Args:
        probs: [N, K] class probabilities.
        labels: [N] class indices.
    """
    present = np.unique(labels)
    p, r, f, _ = precision_recall_fscore_support(
        labels, probs.argmax(1), labels=present, average="macro", zero_division=0
    )
    return {"macro_precision_present": float(p), "macro_recall_present": float(r), "macro_f1_present": float(f)}


def score(
    probs: np.ndarray, labels: np.ndarray, class_names: list[str], multi_label: bool, output_dir: str | None
) -> dict:
    """`classification_metrics` plus, for single-label data, what was predicted per class and the three plots.

    `predicted_counts` next to `true_counts` makes a collapse onto one class obvious at a glance.

    Args:
        probs: [N, K] probabilities (softmax, or sigmoid for multi-label).
        labels: [N] class indices, or [N, K] 0/1 targets.
        class_names: The K class names.
        multi_label: Whether the labels are [N, K] 0/1 targets.
        output_dir: Where confusion_matrix.png, confidence.png and reliability.png go; None draws none.
    """
    metrics = classification_metrics(probs, labels, class_names, multi_label)
    if multi_label:
        return metrics
    metrics.update(present_class_scores(probs, labels))
    metrics["true_counts"] = class_counts(labels, class_names)
    metrics["predicted_counts"] = class_counts(probs.argmax(1), class_names)
    if output_dir is None:
        return metrics
    plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), class_names, f"{output_dir}/confusion_matrix.png")
    if 0 < int((probs.argmax(1) == labels).sum()) < len(labels):
        plot_confidence(probs, labels, class_names, f"{output_dir}/confidence.png")
    else:  # plot_confidence cannot draw an empty correct (or wrong) group
        logger.warning(
            "confidence.png not drawn: every test prediction is %s", "right" if metrics["accuracy"] == 1 else "wrong"
        )
    plot_reliability(probs, labels, f"{output_dir}/reliability.png")
    return metrics


def evaluate_test(
    trainer: Trainer, test_set: Dataset, class_names: list[str], multi_label: bool, output_dir: str | None
) -> dict:
    """Metrics of the trainer's model on the test split, plus the three plots (single-label) when `output_dir`.

    Args:
        trainer: The Trainer holding the selected model.
        test_set: The test dataset (its `labels` a tensor).
        class_names: The class names.
        multi_label: Sigmoid instead of softmax.
        output_dir: Where the plots go; None draws none (e.g. on other processes than the main one).
    """
    logits = trainer.predict(test_set).predictions
    logits = (logits[0] if isinstance(logits, tuple) else logits).astype(np.float64)
    probs = expit(logits) if multi_label else softmax(logits, axis=-1)  # [N, K]
    return score(probs, test_set.labels.numpy(), class_names, multi_label, output_dir)


__all__ = ["evaluate_test", "present_class_scores", "score"]
