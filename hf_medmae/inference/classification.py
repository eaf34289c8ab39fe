"""Classify new images with a saved classifier: load it, predict probabilities, write predictions and scores."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForImageClassification

from ..classification import MULTI, MedClsForImageClassification
from ..cnn import MedCNNForImageClassification
from ..data.classification import ClassificationDataset, LabelLayout, read_prediction_set
from ..data.io import progress
from ..data.stain import STAIN_NORMALISATIONS, stain_normalise
from ..data.transforms import channel_stats, check_channels
from ..errors import CheckpointError, ConfigError, DataError
from ..evaluation.classification import score
from ..loading import load_checkpoint, resolve_checkpoint
from ..validation import as_pair
from .sets import sets_with_truths, write_external_metrics

logger = logging.getLogger(__name__)

Classifier = MedClsForImageClassification | MedCNNForImageClassification


def load_classifier(name_or_path: str) -> tuple[Classifier, dict]:
    """A classifier saved by run_classification.py (ViT or CNN, local or Hub), strictly loaded, and its
    preprocessor settings.

    Args:
        name_or_path: The run's output folder or a Hub id.
    """
    model = load_checkpoint(
        AutoModelForImageClassification,
        name_or_path,
        model_types=("medmae_classifier", "medmae_cnn"),
        what="an hf_medmae classifier",
    )
    folder = resolve_checkpoint(name_or_path)
    processor = (
        json.loads((folder / "preprocessor_config.json").read_text())
        if (folder / "preprocessor_config.json").is_file()
        else {}
    )
    if processor.get("image_mean") is None:
        raise CheckpointError(
            f"{name_or_path} has no preprocessor_config.json with image_mean/image_std.",
            "point at the output_dir of run_classification.py, which saves the normalisation beside the weights.",
        )
    return model.eval(), processor


@torch.no_grad()
def predict_probs(model: Classifier, dataset: ClassificationDataset, batch_size: int = 64) -> np.ndarray:
    """[N, K] class probabilities (softmax, or sigmoid for multi-label) of every image of `dataset`.

    Args:
        model: The classifier.
        dataset: Items with normalised "pixel_values".
        batch_size: Images per forward pass.
        stain_normalisation: "reinhard": each RGB image's colours are first mapped onto the training images'
            (`data.stain.stain_normalise`, with the reference the classifier saved); "none": as read.
    """
    multi = model.config.problem_type == MULTI
    out = []
    for batch in progress(DataLoader(dataset, batch_size=batch_size), desc="classifying", unit="batch"):
        logits = model(batch["pixel_values"].to(model.device)).logits.double()
        out.append((logits.sigmoid() if multi else logits.softmax(-1)).cpu().numpy())
    return np.concatenate(out)


def output_layer(model: Classifier) -> torch.nn.Linear:
    """The linear layer that turns features into class logits (the ViT's `head`; a MONAI CNN's last `Linear`)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


@torch.no_grad()
def head_features(model: Classifier, dataset: ClassificationDataset, batch_size: int = 64) -> np.ndarray:
    """[N, F] the features the classifier's output layer reads for each image of `dataset`, in float64: what a new
    head is fitted on (`evaluation.probe.fit_probe`), e.g. one for another site from a few of its labelled images.

    Example:
        >>> model, processor = load_classifier("outputs/wbc-cls")  # doctest: +SKIP
        >>> feats = head_features(model, ClassificationDataset(images, labels, mean, std, 120))  # doctest: +SKIP
    """
    captured = []
    hook = output_layer(model).register_forward_hook(lambda m, inputs, out: captured.append(inputs[0].double().cpu()))
    try:
        predict_probs(model, dataset, batch_size)
    finally:
        hook.remove()
    return torch.cat(captured).numpy()


def input_config(model: Classifier) -> dict:
    """The config that describes the classifier's inputs (image size, channels): a ViT's encoder's, a CNN's own."""
    return getattr(model.config, "vit_config", None) or model.config.to_dict()


def input_size(model: Classifier, processor: dict) -> int:
    """The image side the classifier was trained at (its preprocessor's, else its input config's)."""
    return processor.get("size", {}).get("height") or as_pair(input_config(model)["image_size"])[0]


def _write_predictions(path: Path, files: list[str], probs: np.ndarray, names: list[str], multi: bool) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "predicted", *[f"p_{n}" for n in names]])
        for file, p in zip(files, probs):
            predicted = ", ".join(n for n, q in zip(names, p) if q >= 0.5) if multi else names[int(p.argmax())]
            writer.writerow([file, predicted, *[f"{q:.6f}" for q in p]])


def classify_sets(
    model_name_or_path: str | None,
    sources: list[str] | None,
    labels_csvs: list[str] | None,
    layout: LabelLayout,
    output_dir: str,
    pattern: str = "*",
    renormalise: bool = False,
    batch_size: int = 64,
    stain_normalisation: str = "none",
) -> dict:
    """Classify each set with a trained classifier: `<set>/predictions.csv`, and for labelled sets
    `<set>/test_metrics.json` with the training run's plots; one row per set in `external_metrics.csv`.

    Args:
        model_name_or_path: The classifier (a run's output folder or a Hub id).
        sources: Image folders or files; a folder of class sub-folders, or one with a labels CSV, is scored.
        labels_csvs: One labels CSV (or "" / None) per source.
        layout: The CSV columns and on_bad_file (see `LabelLayout`).
        output_dir: Where the per-set folders and external_metrics.csv go.
        pattern: Which files of a plain folder are images.
        renormalise: Normalise each set with its own per-channel statistics instead of the checkpoint's.
        batch_size: Images per forward pass.
        stain_normalisation: "reinhard": each RGB image's colours are first mapped onto the training images'
            (`data.stain.stain_normalise`, with the reference the classifier saved); "none": as read.

    Returns:
        {"sets": one row per set (images, normalisation, and for labelled sets the scores)}.
    """
    csvs = sets_with_truths(
        sources, labels_csvs, model_name_or_path, "predict_data", "predict_labels_csv", "run_classification.py"
    )
    model, processor = load_classifier(model_name_or_path)
    if stain_normalisation not in STAIN_NORMALISATIONS:
        raise ConfigError(
            f"unknown stain_normalisation {stain_normalisation!r}.", f"use one of {STAIN_NORMALISATIONS}."
        )
    reference = processor.get("stain_reference")
    if stain_normalisation != "none" and reference is None:
        raise CheckpointError(
            f"{model_name_or_path} carries no stain reference (its training images were not 8-bit RGB, or it was "
            "trained before references were saved).",
            "retrain the classifier on RGB images with this version, or leave stain_normalisation at none.",
        )
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    size, channels, rows = input_size(model, processor), input_config(model)["num_channels"], []
    for source, labels_csv in zip(sources, csvs):
        data = read_prediction_set(source, labels_csv, layout, names, pattern)
        found = check_channels(data.images, source)
        if found != channels:
            raise DataError(
                f"{source} has {found}-channel images but the classifier expects {channels}.",
                f"convert the images to {channels} channels, as the training images were.",
            )
        if stain_normalisation == "reinhard":
            data.images = [stain_normalise(im, reference) for im in progress(data.images, desc="stain", unit="image")]
        mean, std = channel_stats(data.images) if renormalise else (processor["image_mean"], processor["image_std"])
        dataset = ClassificationDataset(data.images, np.zeros(len(data.images)), mean, std, size)
        probs = predict_probs(model, dataset, batch_size)
        name = Path(source).stem or "predict"
        target = Path(output_dir, name)
        target.mkdir(parents=True, exist_ok=True)
        _write_predictions(target / "predictions.csv", data.files, probs, names, data.multi_label)
        row = {
            "set": name,
            "images": len(data.files),
            "normalisation": "target set" if renormalise else "checkpoint",
            "stain_normalisation": stain_normalisation,
        }
        if labels_csv or (data.labels.ndim == 1 and (data.labels >= 0).all()) or data.multi_label:
            metrics = score(probs, data.labels, names, data.multi_label, str(target))
            info = {"data": source, "model": model_name_or_path, "image_mean": list(mean), "image_std": list(std)}
            (target / "test_metrics.json").write_text(json.dumps({**metrics, **info, **row}, indent=2, default=str))
            scores = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc")
            row.update({k: metrics[k] for k in scores if isinstance(metrics.get(k), (int, float))})
            row["predicted_counts"] = json.dumps(metrics.get("predicted_counts"))
        rows.append(row)
        logger.info("%s: %d images -> %s", name, len(data.files), target)
    write_external_metrics(rows, output_dir)
    return {"sets": rows}


__all__ = ["classify_sets", "head_features", "input_size", "load_classifier", "output_layer", "predict_probs"]
