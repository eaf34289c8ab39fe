"""CNN baselines (MONAI ResNet / DenseNet) through the classification runner: one config key, same outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WBC, require
from PIL import Image
from safetensors.torch import load_file

from hf_medmae.cnn import CNN_ARCHITECTURES, MedCNNForImageClassification, build_cnn
from hf_medmae.errors import ConfigError, DataError
from hf_medmae.loading import load_checkpoint
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


@pytest.mark.parametrize("name", sorted(CNN_ARCHITECTURES))
def test_every_architecture_builds_with_any_channel_count_and_keeps_monais_init(name):
    torch.manual_seed(0)
    model = build_cnn(name, num_channels=5, num_labels=3)
    torch.manual_seed(0)
    bare = CNN_ARCHITECTURES[name](2, 5, 3)
    # the weights are MONAI's own initialisation (Kaiming convs), not re-drawn by transformers' post_init
    for (key, ours), theirs in zip(model.cnn.state_dict().items(), bare.state_dict().values()):
        assert torch.equal(ours, theirs), key
    assert model(torch.randn(2, 5, 32, 32)).logits.shape == (2, 3)
    with pytest.raises(DataError, match="3 channels but the resnet10 expects 5"):
        build_cnn("resnet10", 5, 3)(torch.randn(1, 3, 32, 32))


def test_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="one of"):
        build_cnn("vgg16", 3, 5)
    with pytest.raises(ConfigError, match="class_weights"):
        build_cnn("resnet10", 3, 5, class_weights=[1.0, 2.0])


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    """A ResNet-10 trained briefly on real WBC images, chosen by `--architecture` on top of the shipped ViT config."""
    require(WBC)
    out = tmp_path_factory.mktemp("cnn") / "run"
    metrics = classify.main(
        [
            "--config",
            "configs/wbc_classification.yaml",
            *WBC_ARGS,
            "--architecture",
            "resnet10",
            "--image_size",
            "32",
            "--max_steps",
            "24",
            "--per_device_train_batch_size",
            "16",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "12",
            "--save_strategy",
            "steps",
            "--save_steps",
            "12",
            "--learning_rate",
            "2e-3",
            "--precision",
            "fp32",
            "--logging_steps",
            "4",
            "--disable_tqdm",
            "true",
            "--output_dir",
            str(out),
        ]
    )
    return out, metrics


def test_one_key_trains_a_cnn_with_the_vit_runs_outputs(cnn_run):
    out, metrics = cnn_run
    for name in ("test_metrics.json", "preprocessor_config.json", "splits.json"):
        assert json.loads((out / name).read_text()), name  # valid JSON, not empty
    with Image.open(out / "confusion_matrix.png") as png:
        png.verify()
    config = json.loads((out / "config.json").read_text())
    assert (
        config["model_type"] == "medmae_cnn"
        and config["architecture"] == "resnet10"
        and config["id2label"]["4"] == "basophil"
    )
    report = json.loads((out / "test_metrics.json").read_text())
    assert (
        report["architecture"] == "resnet10" and report["init"] == "scratch"
    )  # the config's init: mae does not apply
    assert report["n_samples"] == 60 and report["selected_on"] == "validation"
    state = json.loads((out / "checkpoint-24" / "trainer_state.json").read_text())
    losses = [log["loss"] for log in state["log_history"] if "loss" in log]
    assert np.mean(losses[-2:]) < losses[0]  # it learns
    assert metrics["test_accuracy"] == pytest.approx(report["accuracy"])
    loaded = load_checkpoint(MedCNNForImageClassification, out)
    assert type(loaded) is MedCNNForImageClassification and loaded.config.architecture == "resnet10"
    saved = load_file(out / "model.safetensors")
    assert saved.keys() == loaded.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in loaded.state_dict().items())


def test_predict_only_and_the_hub_card_work_for_a_cnn(cnn_run, hub_server, tmp_path):
    from hf_medmae import pull_checkpoint, push_checkpoint

    out, _ = cnn_run
    result = classify.main(
        [
            "--predict_only",
            "--model_name_or_path",
            str(out),
            "--predict_data",
            str(WBC),
            "--predict_labels_csv",
            str(LABELS_CSV),
            *WBC_ARGS[4:],
            "--output_dir",
            str(tmp_path / "pred"),
        ]
    )
    assert result["sets"][0]["images"] == 300
    # the reloaded model (batch-norm statistics included) reproduces the run's own test accuracy
    truth = {
        f"{int(r['image ID']):03d}.bmp": NAMES[int(r["class label"]) - 1]
        for r in csv.DictReader(LABELS_CSV.open(encoding="utf-8-sig"))
    }
    predicted = {
        r["file"]: r["predicted"] for r in csv.DictReader((tmp_path / "pred" / WBC.name / "predictions.csv").open())
    }
    test_files = json.loads((out / "splits.json").read_text())["test"]
    accuracy = np.mean([predicted[f] == truth[f] for f in test_files])
    assert accuracy == pytest.approx(json.loads((out / "test_metrics.json").read_text())["accuracy"])
    push_checkpoint(out, "medmae-test/wbc-resnet10")
    card = (Path(pull_checkpoint("medmae-test/wbc-resnet10")) / "README.md").read_text()
    assert "convolutional **image classifier** (MONAI resnet10)" in card and "- cnn" in card and "vit-mae" not in card


def test_cnn_refuses_vit_only_modes(tmp_path):
    require(WBC)
    base = [
        "--config",
        "configs/wbc_classification.yaml",
        *WBC_ARGS,
        "--architecture",
        "resnet18",
        "--output_dir",
        str(tmp_path),
    ]
    with pytest.raises(ConfigError, match="mode: full with a CNN"):
        classify.main([*base, "--mode", "last_k:2"])
    with pytest.raises(ConfigError, match="frozen_features evaluates a pre-trained ViT"):
        classify.main([*base, "--mode", "frozen_features"])
