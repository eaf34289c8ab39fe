"""Metrics on small cases whose answers can be checked by hand."""

import json

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from hf_medmae.errors import DataError
from hf_medmae.metrics import (
    calibration_bins,
    classification_metrics,
    compute_metrics_fn,
    expected_calibration_error,
    segmentation_compute_metrics_fn,
    segmentation_metrics,
    segmentation_preprocess_logits,
)

NAMES = ["a", "b", "c"]


def _probs_for(pred, conf=0.8, k=3):
    """Rows whose argmax is `pred` with max probability `conf`, rest spread evenly."""
    p = np.full((len(pred), k), (1 - conf) / (k - 1))
    p[np.arange(len(pred)), pred] = conf
    return p


def test_perfect_predictor():
    labels = np.array([0, 1, 2, 1, 0, 2])
    m = classification_metrics(np.eye(3)[labels], labels, NAMES)
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["roc_auc"] == 1.0
    assert m["ece"] < 1e-9
    json.dumps(m)  # plain Python types only


def test_known_confusion_matrix_and_averages():
    labels, pred = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0])
    m = classification_metrics(_probs_for(pred), labels, NAMES)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    # class b: precision 2/3, recall 1 -> F1 0.8; class a: 1/2, 1/2; class c: 0
    assert m["per_class"]["b"]["f1-score"] == pytest.approx(0.8)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_confidence_split_counts_and_values():
    labels, pred = np.array([0, 0, 0, 1, 2]), np.array([0, 0, 1, 1, 0])
    probs = _probs_for(pred)
    probs[1] = [0.6, 0.2, 0.2]
    conf = classification_metrics(probs, labels, NAMES)["confidence"]
    assert conf["a"]["correct"]["count"] == 2 and conf["a"]["wrong"]["count"] == 1
    assert conf["a"]["correct"]["mean"] == pytest.approx(0.7)
    assert conf["a"]["correct"]["median"] == pytest.approx(0.7)
    assert conf["b"]["wrong"]["count"] == 0 and conf["b"]["wrong"]["mean"] is None
    assert conf["c"]["correct"]["count"] == 0 and conf["c"]["wrong"]["count"] == 1


@pytest.mark.parametrize("n_correct, expected", [(4, 0.0), (2, 0.4)])
def test_ece_by_hand(n_correct, expected):
    # every sample has confidence 0.8; accuracy n_correct / 5
    probs = np.array([[0.8, 0.2]] * 5)
    labels = np.array([0] * n_correct + [1] * (5 - n_correct))
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    assert calibration_bins(probs, labels)["count"].sum() == 5


def test_roc_auc_leaves_out_absent_classes():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.4, 0.5, 0.1]])
    m = classification_metrics(probs, labels, NAMES)
    assert m["roc_auc_classes_left_out"] == ["c"] and m["roc_auc"] == pytest.approx(1.0)
    one_class = classification_metrics(probs, np.zeros(4, int), NAMES)
    assert one_class["roc_auc"] is None


def test_multi_label():
    labels = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 1]])
    probs = np.array([[0.9, 0.2, 0.7], [0.3, 0.8, 0.6], [0.6, 0.4, 0.9]])
    m = classification_metrics(probs, labels, NAMES, multi_label=True)
    assert m["roc_auc_classes_left_out"] == ["c"]  # column c is all ones
    assert m["roc_auc_per_class"] == {"a": 1.0, "b": 1.0}
    assert m["subset_accuracy"] == pytest.approx(2 / 3)  # row 3 misses class b


def test_compute_metrics_fn_returns_flat_floats():
    labels = np.array([0, 1, 2, 2])
    logits = np.array([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [3.0, 0, 0]])
    out = compute_metrics_fn(NAMES)(EvalPrediction(predictions=logits, label_ids=labels))
    assert all(type(v) is float for v in out.values())
    assert out["accuracy"] == pytest.approx(0.75)
    assert {"balanced_accuracy", "macro_f1", "weighted_f1", "roc_auc", "ece"} <= out.keys()
    ml = compute_metrics_fn(NAMES, multi_label=True)(
        EvalPrediction(predictions=(logits - 1.5,), label_ids=(logits > 0).astype(float))
    )
    assert ml["subset_accuracy"] == 1.0


@pytest.mark.parametrize(
    "probs, labels, match",
    [
        (np.full((3, 3), 1 / 3), np.array([0, 1]), "rows"),
        (np.full((3, 3), 1 / 3), np.array([0, 1, 7]), r"\[7\]"),
        (np.full((2, 3), 1 / 3), np.array([-1, 0]), r"\[-1\]"),
        (np.full((2, 2), 1 / 2), np.array([0, 1]), r"\[N, 3\]"),
    ],
)
def test_classification_data_errors(probs, labels, match):
    with pytest.raises(DataError, match=match):
        classification_metrics(probs, labels, NAMES)


def _seg_case():
    target = np.zeros((2, 8, 8), int)
    target[:, 2:6, 2:6] = 1
    target[:, 3:5, 3:5] = 2
    pred = target.copy()
    pred[0, 2, 2:6] = 0  # one row of class 1 missed
    return pred, target


def test_identical_masks_dice_one_hd_zero():
    _, target = _seg_case()
    m = segmentation_metrics(target, target, NAMES)
    assert m["mean_dice"] == 1.0 and m["mean_iou"] == 1.0 and m["pixel_accuracy"] == 1.0
    assert m["hd95"] == 0.0


def test_dice_by_hand():
    target = np.zeros((1, 4, 4), int)
    target[0, :2, :2] = 1
    pred = np.zeros_like(target)
    pred[0, 0, 0] = 1
    m = segmentation_metrics(pred, target, ["bg", "cell"], hd95=False)
    assert m["dice_per_class"]["cell"] == pytest.approx(2 * 1 / (1 + 4))
    assert m["iou_per_class"]["cell"] == pytest.approx(1 / 4)
    assert m["dice_per_class"]["cell"] == pytest.approx(m["per_class"]["cell"]["f1-score"])


def test_ignored_pixels_do_not_change_metrics():
    pred, target = _seg_case()
    target[1, :, 0] = 255
    base = segmentation_metrics(pred, target, NAMES)
    pred2 = pred.copy()
    pred2[1, :, 0] = 2  # change predictions only where the target is unlabeled
    assert segmentation_metrics(pred2, target, NAMES) == base
    assert base["n_ignored"] == 8 and base["hd95_images_used"] == 1 and base["hd95_images_skipped"] == 1


def test_hd95_none_when_no_image_fully_labeled():
    pred, target = _seg_case()
    target[:, 0, 0] = 255
    m = segmentation_metrics(pred, target, NAMES)
    assert m["hd95"] is None and "fully labeled" in m["hd95_note"]


def test_hd95_shift_is_positive_and_bounded():
    target = np.zeros((1, 16, 16), int)
    target[0, 4:10, 4:10] = 1
    pred = np.roll(target, 2, axis=2)  # object shifted by 2 pixels
    m = segmentation_metrics(pred, target, ["bg", "cell"])
    assert 0 < m["hd95_per_class"]["cell"] <= 2.0


def test_absent_class_gives_no_nan():
    pred, target = _seg_case()
    names = NAMES + ["absent"]
    m = segmentation_metrics(pred, target, names)
    assert m["dice_per_class"]["absent"] is None and m["hd95_per_class"]["absent"] is None
    for key in ("mean_dice", "mean_iou", "hd95"):
        assert np.isfinite(m[key])
    json.dumps(m, allow_nan=False)


@pytest.mark.parametrize(
    "pred_shape, bad_value, match",
    [
        ((2, 8, 7), None, "must both be"),
        ((2, 8, 8), 5, r"\[5\]"),
    ],
)
def test_segmentation_data_errors(pred_shape, bad_value, match):
    _, target = _seg_case()
    pred = np.zeros(pred_shape, int)
    if bad_value is not None:
        pred[0, 0, 0] = bad_value
    with pytest.raises(DataError, match=match):
        segmentation_metrics(pred, target, NAMES)


def test_target_out_of_range_names_value():
    pred, target = _seg_case()
    target[0, 0, 0] = 9
    with pytest.raises(DataError, match=r"\[9\]"):
        segmentation_metrics(pred, target, NAMES)


def test_segmentation_compute_metrics_fn_logits_and_preprocessed():
    pred, target = _seg_case()
    logits = np.eye(3)[pred].transpose(0, 3, 1, 2)  # [N, H, W] -> [N, K, H, W]
    fn = segmentation_compute_metrics_fn(NAMES)
    out = fn(EvalPrediction(predictions=logits, label_ids=target))
    assert all(type(v) is float for v in out.values())
    assert out["pixel_accuracy"] == pytest.approx(1 - 4 / 128)
    assert {"mean_dice", "mean_iou", "dice_a", "f1_c"} <= out.keys()
    argmaxed = segmentation_preprocess_logits(torch.from_numpy(logits), None).numpy()
    assert fn(EvalPrediction(predictions=argmaxed, label_ids=target)) == out
