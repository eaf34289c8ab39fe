"""The frozen-feature probe: an encoder's pooled features, extracted once, and a linear (or k-NN) classifier on top.

The low-label protocol of the self-supervised literature, in seconds rather than minutes. The fitted logistic
regression is a linear head: `set_linear_head` folds its feature standardisation into the weights of a
`MedClsForImageClassification(pooling="features")`, so the probe saves and loads as any other classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, Dataset
from transformers import ViTModel

from ..classification import MedClsForImageClassification, block_features
from ..data.io import progress
from ..errors import ConfigError

# Logistic regression's strengths C and k-NN's k tried on validation.
LOGISTIC_GRID = (0.01, 0.1, 1.0)
KNN_GRID = (1, 5, 15)
# Bias of a class the probe never saw in training: softmax gives it probability 0, as scikit-learn does.
ABSENT_CLASS_BIAS = -1e4


@torch.no_grad()
def pooled_features(encoder: ViTModel, dataset: Dataset, batch_size: int = 64, blocks: int = 1) -> np.ndarray:
    """[N, blocks x D] features of the frozen encoder (`classification.block_features`), in float64.

    Args:
        encoder: The encoder (a `ViTModel`).
        dataset: Items with normalised "pixel_values" [C, H, W].
        batch_size: Images per forward pass.
        blocks: How many last blocks' mean patch tokens to concatenate (1: `last_hidden_state`'s).

    Example:
        >>> feats = pooled_features(load_encoder("runs/mae"), ClassificationDataset(...))  # doctest: +SKIP
    """
    if not 1 <= blocks <= encoder.config.num_hidden_layers:
        raise ConfigError(
            f"frozen_blocks={blocks} but the encoder has {encoder.config.num_hidden_layers} blocks.",
            f"use 1..{encoder.config.num_hidden_layers}.",
        )
    encoder.eval()
    out = []
    for batch in progress(DataLoader(dataset, batch_size=batch_size), desc="features", unit="batch"):
        hidden = encoder(batch["pixel_values"].to(encoder.device), output_hidden_states=True).hidden_states
        out.append(block_features(encoder, hidden, blocks).double().cpu().numpy())
    return np.concatenate(out)


@dataclass
class FrozenProbe:
    """A fitted probe: `estimator` (scikit-learn), `choice` (e.g. "C=0.1") and the number of classes."""

    estimator: BaseEstimator
    choice: str
    num_classes: int

    def proba(self, features: np.ndarray) -> np.ndarray:
        """[N, K] probabilities over all K classes, 0 for those absent from the training labels."""
        out = np.zeros((len(features), self.num_classes))
        out[:, self.estimator.classes_] = self.estimator.predict_proba(features)
        return out


def _candidates(classifier: str, grid: tuple | None, num_train: int) -> list[tuple[str, BaseEstimator]]:
    if classifier == "logistic":
        return [
            (
                f"C={c}",
                make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=3000)),
            )
            for c in grid or LOGISTIC_GRID
        ]
    if classifier == "knn":
        k_max = max(1, min(max(grid or KNN_GRID), num_train))
        return [
            (f"k={k}", KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance"))
            for k in sorted({1, *(k for k in grid or KNN_GRID if k < k_max), k_max})
        ]
    raise ConfigError(f"frozen_classifier={classifier!r} is unknown.", "use 'logistic' or 'knn'.")


def fit_probe(
    features: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    num_classes: int,
    classifier: str = "logistic",
    grid: tuple | None = None,
) -> FrozenProbe:
    """Fit a probe on `features["train"]`, choosing its strength on validation macro-F1 when there is a choice.

    Logistic regression on standardised features (balanced class weights) or k-nearest neighbours (cosine).

    Args:
        features: {"train": [N, F], "val": [M, F] (needed when the grid has several values)}.
        labels: {"train": [N], "val": [M]} class indices.
        num_classes: K, the classes of the task (some may be absent from training).
        classifier: "logistic" | "knn".
        grid: The C values (logistic) or k values (knn) to try; default `LOGISTIC_GRID` / `KNN_GRID`.

    Example:
        >>> probe = fit_probe({"train": x, "val": xv}, {"train": y, "val": yv}, num_classes=5)  # doctest: +SKIP
        >>> probe.proba(x_test).argmax(1)  # doctest: +SKIP
    """
    candidates = _candidates(classifier, grid, len(labels["train"]))

    def fitted(candidate: tuple[str, BaseEstimator]) -> FrozenProbe:
        return FrozenProbe(candidate[1].fit(features["train"], labels["train"]), candidate[0], num_classes)

    if len(candidates) == 1:
        return fitted(candidates[0])

    def val_f1(candidate: tuple[str, BaseEstimator]) -> float:
        predicted = fitted(candidate).proba(features["val"]).argmax(1)
        return f1_score(labels["val"], predicted, average="macro", zero_division=0)

    return fitted(max(candidates, key=val_f1))


def linear_head(probe: FrozenProbe) -> tuple[np.ndarray, np.ndarray]:
    """The logistic-regression probe as one linear layer on the raw features: weight [K, F] and bias [K].

    The standardisation is folded in (w / s, b - (w / s) . m); a two-class fit's single logit z becomes the pair
    (-z / 2, z / 2), whose softmax is scikit-learn's (1 - sigmoid(z), sigmoid(z)).
    """
    if not isinstance(probe.estimator, Pipeline) or not isinstance(probe.estimator[-1], LogisticRegression):
        raise ConfigError(
            f"a {type(probe.estimator).__name__} probe is not a linear head.", "use frozen_classifier: logistic."
        )
    scaler, logistic = probe.estimator[0], probe.estimator[-1]
    coef, intercept = logistic.coef_, logistic.intercept_
    if len(logistic.classes_) == 2:
        coef, intercept = np.concatenate([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2
    scale = scaler.scale_ if scaler.with_std else np.ones(coef.shape[1])
    mean = scaler.mean_ if scaler.with_mean else np.zeros(coef.shape[1])
    weight = np.zeros((probe.num_classes, coef.shape[1]))
    bias = np.full(probe.num_classes, ABSENT_CLASS_BIAS)
    weight[logistic.classes_] = coef / scale
    bias[logistic.classes_] = intercept - (coef / scale) @ mean
    return weight, bias


@torch.no_grad()
def set_linear_head(model: MedClsForImageClassification, probe: FrozenProbe) -> MedClsForImageClassification:
    """Put a logistic-regression probe into `model.head` (a classifier with `pooling="features"`).

    Args:
        model: The classifier whose frozen encoder gave the probe's features.
        probe: The fitted logistic-regression probe.
    """
    if model.config.pooling != "features":
        raise ConfigError(
            f"the probe was fitted on the encoder's features, the classifier pools {model.config.pooling!r}.",
            "build the classifier with pooling='features' and the probe's feature_blocks.",
        )
    weight, bias = linear_head(probe)
    if weight.shape != tuple(model.head.weight.shape):
        raise ConfigError(
            f"the probe's head is {weight.shape}, the classifier's {tuple(model.head.weight.shape)}.",
            "build the classifier with the probe's feature_blocks and classes.",
        )
    model.head.weight.copy_(torch.from_numpy(weight))
    model.head.bias.copy_(torch.from_numpy(bias))
    return model


__all__ = ["FrozenProbe", "fit_probe", "linear_head", "pooled_features", "set_linear_head"]
