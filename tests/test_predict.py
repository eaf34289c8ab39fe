"""Using a trained model: classify new folders, score other sites' labelled sets, pipelines, errors for people."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, WBC, require
from hub_server import hub_server  # noqa: F401  (pytest fixture)
from PIL import Image

from hf_medmae.errors import DataError
from hf_medmae.evaluation.probe import pooled_features
from hf_medmae.tasks import classify

NAMES = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]
LABELS_CSV = WBC.parent / "Class Labels of Dataset 1.csv"
WBC_ARGS = [
    "--data_dir",
    str(WBC),
    "--labels_csv",
    str(LABELS_CSV),
    "--id_column",
    "image ID",
    "--label_column",
    "class label",
    "--filename_template",
    "{id:03d}.bmp",
    "--label_offset",
    "1",
    "--class_names",
    *NAMES,
]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A small ViT classifier trained briefly on real WBC images at their native 120 px (no resizing anywhere)."""
    require(WBC)
    out = tmp_path_factory.mktemp("cls") / "run"
    classify.main(
        [
            *WBC_ARGS,
            "--init",
            "scratch",
            "--image_size",
            "120",
            "--patch_size",
            "12",
            "--hidden_size",
            "32",
            "--num_hidden_layers",
            "1",
            "--num_attention_heads",
            "2",
            "--intermediate_size",
            "64",
            "--max_steps",
            "30",
            "--per_device_train_batch_size",
            "16",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "15",
            "--save_strategy",
            "steps",
            "--save_steps",
            "15",
            "--learning_rate",
            "2e-3",
            "--precision",
            "fp32",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            "--output_dir",
            str(out),
        ]
    )
    return out


def wbc_subset(folder, ids, labels_csv=None):
    """Copies of WBC images `ids` (never into the repository), and optionally their 20-row labels CSV."""
    folder.mkdir(parents=True)
    for i in ids:
        shutil.copy(WBC / f"{i:03d}.bmp", folder / f"{i:03d}.bmp")
    if labels_csv is not None:
        rows = {int(r["image ID"]): r["class label"] for r in csv.DictReader(LABELS_CSV.open(encoding="utf-8-sig"))}
        with open(labels_csv, "w", newline="") as handle:
            csv.writer(handle).writerows([["image ID", "class label"], *[[i, rows[i]] for i in ids]])
    return folder


def test_one_command_classifies_a_folder_and_scores_a_labelled_set(classifier, tmp_path):
    new = wbc_subset(tmp_path / "tomorrow", range(201, 221))
    site_b = wbc_subset(tmp_path / "site_b", range(221, 241), labels_csv=tmp_path / "site_b.csv")
    result = classify.main(
        [
            "--predict_only",
            "--model_name_or_path",
            str(classifier),
            "--predict_data",
            str(new),
            str(site_b),
            "--predict_labels_csv",
            "",
            str(tmp_path / "site_b.csv"),
            "--id_column",
            "image ID",
            "--label_column",
            "class label",
            "--filename_template",
            "{id:03d}.bmp",
            "--label_offset",
            "1",
            "--predict_pattern",
            "*.bmp",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    rows = list(csv.DictReader((tmp_path / "out" / "tomorrow" / "predictions.csv").open()))
    assert len(rows) == 20 and set(rows[0]) == {"file", "predicted", *[f"p_{n}" for n in NAMES]}
    assert all(r["predicted"] in NAMES and abs(sum(float(r[f"p_{n}"]) for n in NAMES) - 1) < 1e-4 for r in rows)
    assert not (tmp_path / "out" / "tomorrow" / "test_metrics.json").exists()  # no labels: nothing to score
    metrics = json.loads((tmp_path / "out" / "site_b" / "test_metrics.json").read_text())
    assert sum(metrics["true_counts"].values()) == sum(metrics["predicted_counts"].values()) == 20
    assert 0 <= metrics["accuracy"] <= 1 and metrics["normalisation"] == "checkpoint"
    for png in ("confusion_matrix.png", "reliability.png"):
        assert (tmp_path / "out" / "site_b" / png).stat().st_size > 1000
    table = list(csv.DictReader((tmp_path / "out" / "external_metrics.csv").open()))
    assert [r["set"] for r in table] == ["tomorrow", "site_b"] and table[1]["accuracy"] and not table[0]["accuracy"]
    assert [r["set"] for r in result["sets"]] == ["tomorrow", "site_b"]
    assert (
        json.loads((classifier / "test_metrics.json").read_text())["layer_decay"] == 1.0
    )  # from scratch: no layer decay


def test_renormalise_uses_the_target_sets_statistics(classifier, tmp_path):
    site = wbc_subset(tmp_path / "dim_site", range(241, 251))
    for path in site.iterdir():  # another scanner: darker images
        Image.fromarray((np.asarray(Image.open(path)) * 0.6).astype(np.uint8)).save(path)
    common = ["--predict_only", "--model_name_or_path", str(classifier), "--predict_data", str(site)]
    classify.main([*common, "--output_dir", str(tmp_path / "plain")])
    classify.main([*common, "--renormalise", "--output_dir", str(tmp_path / "renorm")])
    plain, renorm = (
        list(csv.DictReader((tmp_path / d / "dim_site" / "predictions.csv").open())) for d in ("plain", "renorm")
    )
    assert [r["p_neutrophil"] for r in plain] != [r["p_neutrophil"] for r in renorm]
    assert next(csv.DictReader((tmp_path / "renorm" / "external_metrics.csv").open()))["normalisation"] == "target set"


def test_bad_prediction_input_gets_the_training_errors(classifier, tmp_path):
    labelled = wbc_subset(tmp_path / "odd", range(1, 5), labels_csv=tmp_path / "odd.csv")
    (tmp_path / "odd.csv").write_text("image ID,class label\n1,platelet\n2,neutrophil\n3,neutrophil\n4,neutrophil\n")
    with pytest.raises(DataError, match="platelet"):
        classify.main(
            [
                "--predict_only",
                "--model_name_or_path",
                str(classifier),
                "--predict_data",
                str(labelled),
                "--predict_labels_csv",
                str(tmp_path / "odd.csv"),
                "--id_column",
                "image ID",
                "--label_column",
                "class label",
                "--filename_template",
                "{id:03d}.bmp",
                "--output_dir",
                str(tmp_path / "o"),
            ]
        )
    grey = tmp_path / "grey"
    grey.mkdir()
    Image.fromarray(np.zeros((120, 120), np.uint8)).save(grey / "a.png")
    with pytest.raises(DataError, match="1-channel images but the classifier expects 3"):
        classify.main(
            [
                "--predict_only",
                "--model_name_or_path",
                str(classifier),
                "--predict_data",
                str(grey),
                "--output_dir",
                str(tmp_path / "o"),
            ]
        )


def test_pipeline_from_the_hub_classifies_real_images_like_predict_only(classifier, hub_server, tmp_path):  # noqa: F811
    from transformers import pipeline

    from hf_medmae import push_checkpoint

    push_checkpoint(classifier, "medmae-test/wbc-classifier")
    images = [Image.open(WBC / f"{i:03d}.bmp") for i in (261, 262, 263)]
    classifier_pipe = pipeline("image-classification", model="medmae-test/wbc-classifier", top_k=None)
    outputs = classifier_pipe(images)
    folder = wbc_subset(tmp_path / "three", (261, 262, 263))
    classify.main(
        [
            "--predict_only",
            "--model_name_or_path",
            str(classifier),
            "--predict_data",
            str(folder),
            "--output_dir",
            str(tmp_path / "o"),
        ]
    )
    ours = list(csv.DictReader((tmp_path / "o" / "three" / "predictions.csv").open()))
    for scores, row in zip(outputs, ours):
        piped = {s["label"]: s["score"] for s in scores}
        assert set(piped) == set(NAMES)
        assert piped == pytest.approx(
            {n: float(row[f"p_{n}"]) for n in NAMES}, abs=1e-4
        )  # same normalisation, same model


def test_console_prints_problem_and_fix_without_traceback(tmp_path):
    cmd = [
        sys.executable,
        "run_classification.py",
        "--predict_only",
        "--model_name_or_path",
        str(tmp_path / "none"),
        "--predict_data",
        str(tmp_path),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "error:" in done.stderr and "fix:" in done.stderr
    loud = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_MEDMAE_TRACEBACK": "1"}
    )
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "CheckpointError" in loud.stderr


@pytest.mark.parametrize("classifier_kind", ["logistic", "knn"])
def test_frozen_features_mode_is_fast_and_scores_like_fine_tuning(tmp_path, classifier_kind):
    """mode frozen_features: features once, scikit-learn on top (chosen on validation), the fine-tuning outputs."""
    require(WBC)
    metrics = classify.main(
        [
            *WBC_ARGS,
            "--init",
            "scratch",
            "--mode",
            "frozen_features",
            "--frozen_classifier",
            classifier_kind,
            "--image_size",
            "32",
            "--patch_size",
            "8",
            "--hidden_size",
            "32",
            "--num_hidden_layers",
            "1",
            "--num_attention_heads",
            "2",
            "--intermediate_size",
            "64",
            "--output_dir",
            str(tmp_path),
        ]
    )
    report = json.loads((tmp_path / "test_metrics.json").read_text())
    assert report["mode"] == "frozen_features" and report["classifier"].startswith(classifier_kind)
    assert sum(report["predicted_counts"].values()) == sum(report["true_counts"].values()) == 60  # 20% of 300
    # Even a random encoder's features separate these cells better than chance (4 classes present in test).
    assert metrics["test_macro_f1_present"] > 0.35, metrics
    for png in ("confusion_matrix.png", "reliability.png"):
        assert (tmp_path / png).is_file()
    splits = json.loads((tmp_path / "splits.json").read_text())  # which images it was scored on, as fine-tuning writes
    assert len(splits["test"]) == 60 and not set(splits["test"]) & set(splits["train"])


def test_frozen_features_of_the_last_k_blocks():
    """blocks=1 is the mean-pooled last_hidden_state; blocks=k concatenates k blocks, each through the final LayerNorm."""
    import torch
    from transformers import ViTConfig, ViTModel

    from hf_medmae.data.classification import ClassificationDataset
    from hf_medmae.errors import ConfigError

    torch.manual_seed(0)
    encoder = ViTModel(
        ViTConfig(
            image_size=16,
            patch_size=4,
            hidden_size=8,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=16,
        ),
        add_pooling_layer=False,
    ).eval()
    images = [np.random.default_rng(i).uniform(0, 255, (3, 16, 16)).astype(np.float32) for i in range(5)]
    data = ClassificationDataset(images, np.zeros(5, dtype=int), [128.0] * 3, [64.0] * 3, 16)
    one, three = pooled_features(encoder, data, 2), pooled_features(encoder, data, 2, blocks=3)
    with torch.no_grad():
        x = torch.stack([data[i]["pixel_values"] for i in range(5)])
        out = encoder(x, output_hidden_states=True)
        expected_last = out.last_hidden_state[:, 1:].mean(1).double().numpy()
        expected_first = encoder.layernorm(out.hidden_states[1])[:, 1:].mean(1).double().numpy()
    assert one.shape == (5, 8) and three.shape == (5, 24)
    np.testing.assert_allclose(one, expected_last, atol=1e-5)
    np.testing.assert_allclose(three[:, 16:], expected_last, atol=1e-5)  # the last block comes last
    np.testing.assert_allclose(three[:, :8], expected_first, atol=1e-5)
    with pytest.raises(ConfigError, match="frozen_blocks=4"):
        pooled_features(encoder, data, 2, blocks=4)


def test_early_stopping_ends_a_run_that_stopped_improving(tmp_path):
    """lr 0: validation never improves, so patience 2 stops at the third evaluation, and the best is reloaded."""
    require(WBC)
    metrics = classify.main(
        [
            *WBC_ARGS,
            "--init",
            "scratch",
            "--image_size",
            "32",
            "--patch_size",
            "8",
            "--hidden_size",
            "32",
            "--num_hidden_layers",
            "1",
            "--num_attention_heads",
            "2",
            "--intermediate_size",
            "64",
            "--learning_rate",
            "0",
            "--max_steps",
            "40",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "2",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
            "--early_stopping_patience",
            "2",
            "--precision",
            "fp32",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert metrics["global_step"] == 6 and metrics["best_model_checkpoint"].endswith("checkpoint-2")
    # ...but never before min_train_steps: a noisy small validation set must not end a run that early.
    floored = classify.main(
        [
            *WBC_ARGS,
            "--init",
            "scratch",
            "--image_size",
            "32",
            "--patch_size",
            "8",
            "--hidden_size",
            "32",
            "--num_hidden_layers",
            "1",
            "--num_attention_heads",
            "2",
            "--intermediate_size",
            "64",
            "--learning_rate",
            "0",
            "--max_steps",
            "40",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "2",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
            "--early_stopping_patience",
            "2",
            "--min_train_steps",
            "10",
            "--precision",
            "fp32",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            "--output_dir",
            str(tmp_path / "floor"),
        ]
    )
    assert floored["global_step"] == 10


def test_min_train_steps_raises_the_epochs_of_a_small_training_set(tmp_path):
    from hf_medmae import MedTrainingArguments

    args = MedTrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        num_train_epochs=30,
        per_device_train_batch_size=32,
        min_train_steps=1000,
    )
    args.ensure_min_steps(195)  # 7 steps per epoch: 30 epochs would be 210 steps
    assert args.num_train_epochs == 143
    args.ensure_min_steps(10_000)  # already long enough: unchanged
    assert args.num_train_epochs == 143


def test_min_train_steps_thins_out_per_epoch_evaluation(tmp_path):
    """5 images at batch 32 are one step per epoch: 2,000 steps must not mean 2,000 evaluations and checkpoints."""
    from hf_medmae import MedTrainingArguments

    def args(**kw):
        return MedTrainingArguments(
            output_dir=str(tmp_path),
            report_to="none",
            use_cpu=True,
            num_train_epochs=30,
            per_device_train_batch_size=32,
            min_train_steps=2000,
            eval_strategy="epoch",
            save_strategy="epoch",
            **kw,
        )

    thinned = args()
    thinned.ensure_min_steps(5)
    assert thinned.num_train_epochs == 2000
    assert (
        thinned.eval_strategy == "steps"
        and thinned.save_strategy == "steps"
        and thinned.eval_steps == thinned.save_steps == 40
    )
    assert thinned.num_train_epochs / thinned.eval_steps <= thinned.max_evaluations
    every_epoch = args(max_evaluations=0)
    every_epoch.ensure_min_steps(5)
    assert every_epoch.eval_strategy == "epoch" and every_epoch.num_train_epochs == 2000
    large = args()
    large.ensure_min_steps(195 * 32 * 3)  # a set whose 30 epochs already exceed the floor: nothing changes
    assert large.eval_strategy == "epoch" and large.num_train_epochs == 30
