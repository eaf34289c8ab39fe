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
    # the shared run sequence's files; the logistic regression is saved as a classifier, k-NN (no linear head) is not
    assert json.loads((tmp_path / "all_results.json").read_text())["classifier"] == metrics["classifier"]
    assert json.loads((tmp_path / "run_info.json").read_text())["steps"] == 0
    assert (tmp_path / "model.safetensors").is_file() == (classifier_kind == "logistic") == metrics["saved_classifier"]


def test_frozen_features_of_the_last_k_blocks():
    """blocks=1 is the mean-pooled last_hidden_state.

    blocks=k concatenates k blocks, each through the final LayerNorm.
    """
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
    args = args.settle(num_train_samples=195)  # 7 steps per epoch: 30 epochs would be 210 steps
    assert args.num_train_epochs == 143
    args = args.settle(num_train_samples=10_000)  # already long enough: unchanged
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

    thinned = args().settle(num_train_samples=5)
    assert thinned.num_train_epochs == 2000
    assert (
        thinned.eval_strategy == "steps"
        and thinned.save_strategy == "steps"
        and thinned.eval_steps == thinned.save_steps == 40
    )
    assert thinned.num_train_epochs / thinned.eval_steps <= thinned.max_evaluations
    every_epoch = args(max_evaluations=0).settle(num_train_samples=5)
    assert every_epoch.eval_strategy == "epoch" and every_epoch.num_train_epochs == 2000
    # a set whose 30 epochs already exceed the floor: nothing changes
    large = args().settle(num_train_samples=195 * 32 * 3)
    assert large.eval_strategy == "epoch" and large.num_train_epochs == 30


# ----------------------------------------------------------------------------- frozen features as a classifier


def test_frozen_probe_head_gives_the_probes_probabilities(tmp_path):
    """The logistic regression, folded into the classifier's head and saved, gives scikit-learn's probabilities."""
    import torch
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    from hf_medmae.classification import MedClsForImageClassification
    from hf_medmae.data.classification import ClassificationDataset
    from hf_medmae.evaluation.probe import fit_probe, set_linear_head
    from hf_medmae.inference.classification import load_classifier, predict_probs

    torch.manual_seed(0)
    vit = ViTConfig(
        image_size=16, patch_size=4, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16
    )
    encoder = ViTModel(vit, add_pooling_layer=False).eval()
    rng = np.random.default_rng(0)
    images = [rng.uniform(0, 255, (3, 16, 16)).astype(np.float32) for _ in range(40)]
    for num_classes, present in ((4, [0, 1, 3]), (2, [0, 1])):  # class 2 never trained on; a two-class fit
        labels = np.asarray([present[i % len(present)] for i in range(40)])
        data = ClassificationDataset(images, labels, [128.0] * 3, [64.0] * 3, 16)
        feats = pooled_features(encoder, data, 8, blocks=2)
        probe = fit_probe({"train": feats}, {"train": labels}, num_classes, grid=(1.0,))
        names = {i: f"class{i}" for i in range(num_classes)}
        model = MedClsForImageClassification.from_encoder(
            encoder, num_classes, id2label=names, pooling="features", feature_blocks=2, drop_path_rate=0.0
        )
        set_linear_head(model, probe).save_pretrained(tmp_path / str(num_classes))
        ViTImageProcessorPil(
            do_resize=False, do_rescale=False, image_mean=[128.0] * 3, image_std=[64.0] * 3
        ).save_pretrained(tmp_path / str(num_classes))
        loaded, _ = load_classifier(str(tmp_path / str(num_classes)))
        np.testing.assert_allclose(predict_probs(loaded, data, 8), probe.proba(feats), atol=1e-4)


def test_head_features_are_what_the_output_layer_reads():
    """ViT and CNN: the output layer applied to `head_features` gives the classifier's own probabilities, so a head
    fitted on them replaces the trained one exactly where it sits."""
    import torch
    from transformers import ViTConfig, ViTModel

    from hf_medmae.classification import MedClsForImageClassification
    from hf_medmae.cnn import build_cnn
    from hf_medmae.data.classification import ClassificationDataset
    from hf_medmae.inference.classification import head_features, output_layer, predict_probs

    torch.manual_seed(0)
    vit = ViTConfig(
        image_size=16, patch_size=4, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16
    )
    rng = np.random.default_rng(0)
    images = [rng.uniform(0, 255, (3, 16, 16)).astype(np.float32) for _ in range(10)]
    data = ClassificationDataset(images, np.zeros(10), [128.0] * 3, [64.0] * 3, 16)
    models = {
        "vit": MedClsForImageClassification.from_encoder(ViTModel(vit, add_pooling_layer=False), 3),
        "cnn": build_cnn("resnet10", 3, 3, image_size=16),
    }
    for name, model in models.items():
        model.eval()
        feats = head_features(model, data, batch_size=4)
        layer = output_layer(model)
        assert feats.shape == (10, layer.in_features), name
        logits = torch.from_numpy(feats) @ layer.weight.detach().double().T + layer.bias.detach().double()
        np.testing.assert_allclose(logits.softmax(-1).numpy(), predict_probs(model, data, 4), atol=1e-5, err_msg=name)
        assert not output_layer(model)._forward_hooks, f"{name}: the capturing hook was left behind"


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    """mode frozen_features with a logistic regression on a random 120 px encoder (native size: no resizing)."""
    require(WBC)
    out = tmp_path_factory.mktemp("frozen") / "run"
    metrics = classify.main(
        [
            *WBC_ARGS,
            "--init",
            "scratch",
            "--mode",
            "frozen_features",
            "--frozen_blocks",
            "2",
            "--image_size",
            "120",
            "--patch_size",
            "12",
            "--hidden_size",
            "32",
            "--num_hidden_layers",
            "2",
            "--num_attention_heads",
            "2",
            "--intermediate_size",
            "64",
            "--report_to",
            "none",
            "--output_dir",
            str(out),
        ]
    )
    return out, metrics


def test_frozen_features_saves_a_classifier_that_predict_only_and_pipeline_load(frozen_run, tmp_path):
    from transformers import pipeline

    out, metrics = frozen_run
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "all_results.json", "run_info.json"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "all_results.json").read_text())["test_macro_f1"] == pytest.approx(
        metrics["test_macro_f1"]
    )
    report = json.loads((out / "test_metrics.json").read_text())
    # predict_only on the run's own test images reproduces its test scores, so its probabilities
    test_ids = [int(f.removesuffix(".bmp")) for f in json.loads((out / "splits.json").read_text())["test"]]
    folder = wbc_subset(tmp_path / "test_split", test_ids, labels_csv=tmp_path / "test.csv")
    classify.main(
        [
            "--predict_only",
            "--model_name_or_path",
            str(out),
            "--predict_data",
            str(folder),
            "--predict_labels_csv",
            str(tmp_path / "test.csv"),
            *WBC_ARGS[4:],
            "--output_dir",
            str(tmp_path / "o"),
        ]
    )
    again = json.loads((tmp_path / "o" / "test_split" / "test_metrics.json").read_text())
    assert again["predicted_counts"] == report["predicted_counts"] and again["true_counts"] == report["true_counts"]
    for key in ("accuracy", "macro_f1", "ece", "roc_auc"):
        assert again[key] == pytest.approx(report[key], abs=1e-4), key
    # pipeline() loads the folder and labels the images as predict_only does (those at the model's 120 px: the
    # pipeline's PIL resize and ours differ slightly)
    rows = list(csv.DictReader((tmp_path / "o" / "test_split" / "predictions.csv").open()))
    native = [(r, Image.open(folder / r["file"])) for r in rows]
    native = [(r, image) for r, image in native if image.size == (120, 120)]
    assert len(native) >= 10
    piped = pipeline("image-classification", model=str(out), top_k=None)([image for _, image in native])
    for scores, (row, _) in zip(piped, native):
        assert scores[0]["label"] == row["predicted"]
        assert {s["label"]: s["score"] for s in scores} == pytest.approx(
            {n: float(row[f"p_{n}"]) for n in NAMES}, abs=1e-4
        )


# ----------------------------------------------------------------------------- class folders and case


def test_class_folders_match_the_models_classes_ignoring_case(classifier, tmp_path, caplog):
    for name, ids in (("Neutrophil", (1, 2)), ("LYMPHOCYTE", (3,))):
        wbc_subset(tmp_path / "site" / name, ids)
    with caplog.at_level("INFO"):
        result = classify.main(
            [
                "--predict_only",
                "--model_name_or_path",
                str(classifier),
                "--predict_data",
                str(tmp_path / "site"),
                "--output_dir",
                str(tmp_path / "o"),
            ]
        )
    assert result["sets"][0]["images"] == 3
    metrics = json.loads((tmp_path / "o" / "site" / "test_metrics.json").read_text())
    assert metrics["true_counts"]["neutrophil"] == 2 and metrics["true_counts"]["lymphocyte"] == 1
    assert "Neutrophil matched class 'neutrophil' ignoring case" in caplog.text


def test_class_folders_equal_ignoring_case_stay_an_error(tmp_path):
    from hf_medmae.data.classification import load_class_folders

    for name in ("Neutrophil", "neutrophil"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(tmp_path / name / "a.png")
    with pytest.raises(DataError, match="differ only in case"):
        load_class_folders(tmp_path, ["neutrophil", "lymphocyte"])
    with pytest.raises(DataError, match="not in class_names"):  # neither spelling of the class is unambiguous
        load_class_folders(tmp_path, ["NEUTROPHIL", "Neutrophil"])
    assert load_class_folders(tmp_path).class_names == ["Neutrophil", "neutrophil"]  # two classes when asked for none


def test_stain_normalisation_maps_another_sites_colours_onto_the_training_images(classifier, tmp_path):
    """The classifier carries its training images' colour statistics; --stain_normalisation reinhard uses them."""
    from skimage.color import rgb2lab

    from hf_medmae.data.io import read_image
    from hf_medmae.data.stain import stain_normalise, stain_reference

    reference = json.loads((classifier / "preprocessor_config.json").read_text())["stain_reference"]
    assert reference["method"] == "reinhard" and len(reference["lab_mean"]) == 3
    site = wbc_subset(tmp_path / "purple_site", range(251, 261))
    for path in site.iterdir():  # another stain: red and blue swapped, less green
        rgb = np.asarray(Image.open(path)).astype(np.float32)
        Image.fromarray(np.stack([rgb[..., 2], rgb[..., 1] * 0.8, rgb[..., 0]], -1).astype(np.uint8)).save(path)
    lab_mean = lambda image: rgb2lab(image.transpose(1, 2, 0) / 255).reshape(-1, 3).mean(0)  # noqa: E731
    goal = np.asarray(reference["lab_mean"])
    for path in sorted(site.iterdir()):
        image = read_image(path)
        before, after = (np.abs(lab_mean(x) - goal).sum() for x in (image, stain_normalise(image, reference)))
        assert after < 0.1 * before, (path.name, before, after)  # onto the training images' colours
    common = ["--predict_only", "--model_name_or_path", str(classifier), "--predict_data", str(site)]
    classify.main([*common, "--stain_normalisation", "reinhard", "--output_dir", str(tmp_path / "stain")])
    row = next(csv.DictReader((tmp_path / "stain" / "external_metrics.csv").open()))
    assert row["stain_normalisation"] == "reinhard"
    # one image of the reference set against a reference of itself comes back unchanged
    cell = read_image(WBC / "001.bmp")
    assert float(np.abs(stain_normalise(cell, stain_reference([cell])) - cell).max()) < 1.0


def test_run_info_records_the_data_lineage_of_continued_and_fine_tuned_models(classifier, tmp_path):
    from hf_medmae.training import parent_datasets

    info = json.loads((classifier / "run_info.json").read_text())
    assert info["datasets"] == [info["dataset"]] == [str(WBC)]
    (tmp_path / "mae").mkdir()
    (tmp_path / "mae" / "run_info.json").write_text(json.dumps({"dataset": "site_a", "datasets": ["a", "b"]}))
    assert parent_datasets(str(tmp_path / "mae")) == ["a", "b"]
    assert parent_datasets("someone/mae-on-hub") == ["the checkpoint someone/mae-on-hub"]


def test_a_trained_classifiers_encoder_gets_a_new_layer_for_another_site(classifier, tmp_path):
    """README's step for a new site: `--init mae --mode frozen_features` on a trained classifier keeps its encoder
    as it is and fits a new output layer on the new site's labelled images."""
    from safetensors.numpy import load_file

    site = wbc_subset(tmp_path / "site_b", range(1, 61), tmp_path / "site_b.csv")
    out = tmp_path / "site_b_head"
    metrics = classify.main(
        [
            *WBC_ARGS[4:],
            "--data_dir",
            str(site),
            "--labels_csv",
            str(tmp_path / "site_b.csv"),
            "--init",
            "mae",
            "--mode",
            "frozen_features",
            "--model_name_or_path",
            str(classifier),
            "--image_size",
            "120",
            "--report_to",
            "none",
            "--output_dir",
            str(out),
        ]
    )
    assert metrics["mode"] == "frozen_features" and 0 <= metrics["test_macro_f1_present"] <= 1
    old, new = load_file(classifier / "model.safetensors"), load_file(out / "model.safetensors")
    encoder = [k for k in old if k.startswith("vit.")]
    assert encoder and all(np.array_equal(old[k], new[k]) for k in encoder)
    assert not np.array_equal(old["head.weight"], new["head.weight"][:, : old["head.weight"].shape[1]])
