"""Metrics on small cases whose answers can be checked by hand."""

import json
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice
from transformers import EvalPrediction

from hf_medmae.errors import ConfigError, DataError
from hf_medmae.metrics import (
    calibration_bins,
    classification_metrics,
    compute_metrics_fn,
    expected_calibration_error,
    pooled_segmentation_metrics,
    segmentation_compute_metrics_fn,
    segmentation_metrics,
    segmentation_preprocess_logits,
)
from hf_medmae.segmentation.evaluation import score_label_maps, write_test_report

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


# --- surface metrics in millimetres (spacing) ------------------------------------------------------------------

OLD_SEGMENTATION_KEYS = {  # segmentation_metrics' keys before spacing existed
    "n_pixels",
    "n_ignored",
    "pixel_accuracy",
    "per_class",
    "dice_per_class",
    "mean_dice",
    "iou_per_class",
    "mean_iou",
    "confusion_matrix",
    "hd95",
    "hd95_per_class",
    "hd95_images_per_class",
    "hd95_images_used",
    "hd95_images_skipped",
}
MM_KEYS = {
    "hd95_mm",
    "hd95_mm_per_class",
    "surface_dice_per_class",
    "mean_surface_dice",
    "surface_dice_images_per_class",
    "surface_tolerance_mm",
}


def _onehot(x: np.ndarray, k: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.eye(k, dtype=np.float32)[x], -1, 1)))


def _volumes_3d():
    """Two [D, H, W] label volumes with 3 classes (nested boxes) and predictions that miss by a voxel or two."""
    target = np.zeros((2, 10, 12, 12), int)
    target[0, 2:8, 3:9, 3:9], target[0, 4:6, 5:7, 5:7] = 1, 2
    target[1, 1:6, 2:10, 4:11], target[1, 2:4, 4:8, 6:9] = 1, 2
    pred = target.copy()
    pred[0] = np.roll(target[0], 1, axis=1)  # box shifted by one row
    pred[1, 2:4, 4:8, 6:7] = 1  # class 2 thinned
    pred[1, 7, 1, 1] = 2  # a stray voxel far away
    return pred, target


def _finite_class_means(d: torch.Tensor) -> list:
    d = d.numpy()
    return [
        float(d[np.isfinite(d[:, c]), c].mean()) if np.isfinite(d[:, c]).any() else None for c in range(d.shape[1])
    ]


@pytest.mark.parametrize("spacing", [(2.0, 0.7, 1.3), [(2.0, 0.7, 1.3), (1.0, 1.5, 0.5)], 0.8])
def test_hd95_mm_and_surface_dice_are_monais_own_calls_with_that_spacing(spacing):
    pred, target = _volumes_3d()
    m = segmentation_metrics(pred, target, NAMES, spacing=spacing, surface_tolerance_mm=1.5)
    per_item = spacing if isinstance(spacing, list) else [np.broadcast_to(spacing, 3).tolist()] * 2
    y_pred, y = _onehot(pred, 3), _onehot(target, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=per_item)
        nsd = compute_surface_dice(y_pred, y, [1.5] * 3, include_background=True, spacing=per_item)
        voxels = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95)
    assert [m["hd95_mm_per_class"][n] for n in NAMES] == pytest.approx(_finite_class_means(hd))
    assert [m["surface_dice_per_class"][n] for n in NAMES] == pytest.approx(_finite_class_means(nsd))
    assert [m["hd95_per_class"][n] for n in NAMES] == pytest.approx(_finite_class_means(voxels))  # voxels stay
    assert m["hd95_mm"] == pytest.approx(np.mean(_finite_class_means(hd)))
    assert m["mean_surface_dice"] == pytest.approx(np.mean(_finite_class_means(nsd)))
    assert m["surface_tolerance_mm"] == 1.5 and m["hd95_mm"] != m["hd95"]
    json.dumps(m, allow_nan=False)


def _sphere_and_shift(radius=4, shape=(20, 16, 16), shift=2):
    z, y, x = np.indices(shape)
    centre = np.array(shape) // 2
    sphere = ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius**2).astype(int)
    return np.roll(sphere, shift, axis=0)[None], sphere[None]  # shifted along D, far from the border


def test_a_shift_along_the_thick_axis_grows_by_its_spacing():
    """Scaling an axis by s scales each surface distance by between 1 and s: a sphere shifted 2 voxels along D
    at spacing (3, 1, 1) has a larger HD95 in mm than in voxels, but at most 3x. It is not 3x: away from the poles
    a nearer boundary voxel lies in-plane, and the 95th percentile is taken there. A slab spanning the whole
    plane has only distances along D: its HD95 in mm is exactly 3x, and an isotropic spacing s scales any shape's
    HD95 by s."""
    pred, target = _sphere_and_shift()
    names = ["background", "sphere"]
    m = segmentation_metrics(pred, target, names, spacing=(3.0, 1.0, 1.0))
    vox, mm = m["hd95_per_class"]["sphere"], m["hd95_mm_per_class"]["sphere"]
    assert 0 < vox <= 2.0 and vox < mm <= 3 * vox
    iso = segmentation_metrics(pred, target, names, spacing=(2.5, 2.5, 2.5))
    assert iso["hd95_mm_per_class"]["sphere"] == pytest.approx(2.5 * vox)
    slab = np.zeros((1, 16, 8, 8), int)
    slab[0, 5:9] = 1
    shifted = np.roll(slab, 2, axis=1)
    s = segmentation_metrics(shifted, slab, names, spacing=(3.0, 1.0, 1.0))
    assert s["hd95_per_class"]["sphere"] == pytest.approx(2.0)  # the shift, in voxels
    assert s["hd95_mm_per_class"]["sphere"] == pytest.approx(3 * s["hd95_per_class"]["sphere"])


def test_surface_dice_counts_the_boundary_within_the_tolerance():
    """Every boundary voxel of the shifted sphere is within the shift (2 voxels x 3 mm = 6 mm) of the other
    boundary, and the poles are exactly that far: the surface Dice is 1 above 6 mm and below 1 under it."""
    pred, target = _sphere_and_shift()
    names, spacing = ["background", "sphere"], (3.0, 1.0, 1.0)
    shift_mm = 2 * spacing[0]
    same = segmentation_metrics(target, target, names, spacing=spacing, surface_tolerance_mm=0.0)
    assert same["surface_dice_per_class"] == {"background": 1.0, "sphere": 1.0} and same["hd95_mm"] == 0.0
    below = [
        segmentation_metrics(pred, target, names, spacing=spacing, surface_tolerance_mm=t)["surface_dice_per_class"]
        for t in (1.0, shift_mm - 0.1)
    ]
    assert below[0]["sphere"] < below[1]["sphere"] < 1.0
    above = segmentation_metrics(pred, target, names, spacing=spacing, surface_tolerance_mm=shift_mm + 0.1)
    assert above["surface_dice_per_class"]["sphere"] == 1.0 and above["mean_surface_dice"] == 1.0


def test_a_class_in_one_map_only_scores_surface_dice_zero_and_no_hd95():
    """MONAI: a class absent from both maps has no surface Dice (NaN: left out, like HD95); a class in one map only
    has no HD95 (infinite: left out) but a surface Dice of 0 (no boundary voxel within the tolerance), which counts."""
    pred, target = _volumes_3d()
    pred[1][pred[1] == 2] = 1  # item 1: class c missed entirely
    names = NAMES + ["absent"]
    m = segmentation_metrics(pred, target, names, spacing=(1.0, 1.0, 1.0))
    assert m["hd95_images_per_class"]["c"] == 1 and m["surface_dice_images_per_class"]["c"] == 2
    alone = segmentation_metrics(pred[:1], target[:1], names, spacing=(1.0, 1.0, 1.0))
    assert m["surface_dice_per_class"]["c"] == pytest.approx(alone["surface_dice_per_class"]["c"] / 2)
    assert m["hd95_mm_per_class"]["c"] == pytest.approx(alone["hd95_mm_per_class"]["c"])
    assert m["hd95_mm_per_class"]["absent"] is None and m["surface_dice_per_class"]["absent"] is None
    assert m["surface_dice_images_per_class"]["absent"] == 0
    json.dumps(m, allow_nan=False)


def test_without_spacing_the_keys_and_values_are_as_before():
    pred, target = _volumes_3d()
    plain = segmentation_metrics(pred, target, NAMES)
    assert set(plain) == OLD_SEGMENTATION_KEYS
    with_mm = segmentation_metrics(pred, target, NAMES, spacing=(2.0, 1.0, 1.0))
    assert set(with_mm) == OLD_SEGMENTATION_KEYS | MM_KEYS
    assert {k: with_mm[k] for k in plain} == plain
    pooled = pooled_segmentation_metrics(list(pred), list(target), NAMES)
    pooled_mm = pooled_segmentation_metrics(list(pred), list(target), NAMES, spacing=(2.0, 1.0, 1.0))
    assert set(pooled_mm) - set(pooled) == {
        "hd95_mm",
        "hd95_mm_per_class",
        "surface_dice_per_class",
        "mean_surface_dice",
        "surface_tolerance_mm",
    }
    assert "hd95_mm" not in pooled and {k: pooled_mm[k] for k in pooled} == pooled
    masks = np.zeros((2, 8, 8), int)
    masks[:, 2:6, 2:6] = 1
    assert set(score_label_maps(masks, masks, ["bg", "cell"])) == OLD_SEGMENTATION_KEYS


def test_spacing_per_volume_through_the_test_report(tmp_path):
    """Volumes of different sizes and spacings: each is scored at its own spacing, the classes averaged over them."""
    pred, target = _volumes_3d()
    preds, truths = [pred[0], pred[1][:8]], [target[0], target[1][:8]]
    spacing = [(3.0, 0.8, 0.8), (1.0, 1.0, 1.0)]
    metrics = write_test_report(tmp_path, preds, truths, None, NAMES, spacing=spacing, surface_tolerance_mm=2.0)
    each = [
        segmentation_metrics(p[None], t[None], NAMES, spacing=s, surface_tolerance_mm=2.0)
        for p, t, s in zip(preds, truths, spacing)
    ]
    for key in ("hd95_mm_per_class", "surface_dice_per_class"):
        want = {n: np.mean([m[key][n] for m in each if m[key][n] is not None]) for n in NAMES}
        assert metrics[key] == pytest.approx(want)
    written = json.loads((tmp_path / "test_metrics.json").read_text())
    assert written["hd95_mm"] == pytest.approx(metrics["hd95_mm"]) and written["surface_tolerance_mm"] == 2.0


@pytest.mark.parametrize(
    "spacing, match",
    [((1.0, 1.0), "does not fit"), ([(1.0, 1.0, 1.0)], "does not fit"), ((1.0, 0.0, 1.0), "not positive")],
)
def test_spacing_that_does_not_fit_is_named(spacing, match):
    pred, target = _volumes_3d()
    with pytest.raises(DataError, match=match):
        segmentation_metrics(pred, target, NAMES, spacing=spacing)


def test_negative_surface_tolerance_is_a_config_error():
    pred, target = _volumes_3d()
    with pytest.raises(ConfigError, match="surface_tolerance_mm"):
        segmentation_metrics(pred, target, NAMES, spacing=1.0, surface_tolerance_mm=-1.0)
