"""Push and pull checkpoints through the real `huggingface_hub` client against a local Hub server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, constants
from transformers import AutoImageProcessor, BertConfig, ViTImageProcessor

from hf_medmae import (
    CheckpointError,
    MedClsForImageClassification,
    MedMAEConfig,
    MedMAEForPreTraining,
    MedSegForSegmentation,
)
from hf_medmae.hub import BASE_TAGS, KIND_TASKS, pull_checkpoint, push_checkpoint

IMAGE_MEAN, IMAGE_STD = [0.62, 0.48, 0.55], [0.21, 0.24, 0.19]
RUN_INFO = {
    "hardware": "test CPU",
    "epochs": 1.0,
    "steps": 3,
    "dataset": "synthetic-noise",
    "num_images": 2,
    "seed": 0,
    "command": "pytest tests/test_hub.py",
}
# Written next to the real metrics: the card must leave it out of the model-index.
BOOKKEEPING = {"eval_runtime": 0.01, "epoch": 1.0}


def tiny_mae_config() -> MedMAEConfig:
    return MedMAEConfig(
        num_channels=3,
        image_size=32,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
        mask_generator="grid",
        mask_ratio=0.5,
    )


def build_mae_checkpoint(folder: Path) -> tuple[torch.nn.Module, dict[str, float]]:
    """A saved tiny MAE whose metrics.json holds the loss it really has on a fixed random batch."""
    torch.manual_seed(0)
    model = MedMAEForPreTraining(tiny_mae_config()).eval()
    with torch.no_grad():
        metrics = {"eval_loss": model(torch.randn(2, 3, 32, 32)).loss.item()}
    return model, metrics


def build_classifier_checkpoint(folder: Path) -> tuple[torch.nn.Module, dict[str, float]]:
    """A classifier on the tiny MAE encoder; its metrics are its real accuracy on a fixed random batch."""
    torch.manual_seed(0)
    encoder = MedMAEForPreTraining(tiny_mae_config()).vit
    model = MedClsForImageClassification.from_encoder(encoder, num_labels=3, id2label={0: "a", 1: "b", 2: "c"}).eval()
    with torch.no_grad():
        logits = model(torch.randn(6, 3, 32, 32)).logits
    accuracy = (logits.argmax(-1) == torch.tensor([0, 1, 2, 0, 1, 2])).float().mean().item()
    return model, {"eval_accuracy": accuracy}


def build_segmenter_checkpoint(folder: Path) -> tuple[torch.nn.Module, dict[str, float]]:
    """A UNETR on the tiny MAE encoder; its metric is its real loss on a fixed random batch."""
    torch.manual_seed(0)
    encoder = MedMAEForPreTraining(tiny_mae_config()).vit
    model = MedSegForSegmentation.from_encoder(encoder, num_labels=2).eval()
    with torch.no_grad():
        loss = model(torch.randn(2, 3, 32, 32), labels=torch.randint(0, 2, (2, 32, 32))).loss.item()
    return model, {"eval_loss": loss}


# kind -> builder returning (model, real eval metrics). A new checkpoint kind is one entry here.
CHECKPOINT_BUILDERS = {
    "mae": build_mae_checkpoint,
    "classifier": build_classifier_checkpoint,
    "segmenter": build_segmenter_checkpoint,
}


def save_checkpoint(folder: Path, kind: str) -> tuple[torch.nn.Module, dict[str, float]]:
    model, metrics = CHECKPOINT_BUILDERS[kind](folder)
    model.save_pretrained(folder)
    size = 32  # every tiny test checkpoint takes 32 px images
    ViTImageProcessor(
        image_mean=IMAGE_MEAN, image_std=IMAGE_STD, size={"height": size, "width": size}
    ).save_pretrained(folder)
    (folder / "metrics.json").write_text(json.dumps({**metrics, **BOOKKEEPING}))
    (folder / "run_info.json").write_text(json.dumps(RUN_INFO))
    return model, metrics


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("kind", sorted(CHECKPOINT_BUILDERS))
def test_push_pull_round_trip(kind, hub_server, tmp_path):
    folder = tmp_path / "ckpt"
    model, metrics = save_checkpoint(folder, kind)
    repo_id = f"medmae-test/tiny-{kind}"

    sha = push_checkpoint(folder, repo_id)
    assert push_checkpoint(folder, repo_id) == sha  # unchanged files: no new commit
    local = Path(pull_checkpoint(repo_id, cache_dir=tmp_path / "fresh-cache"))

    assert local.name == sha  # the snapshot pulled is the commit pushed
    assert {p.name for p in local.iterdir()} == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "metrics.json",
        "run_info.json",
        "README.md",
    }
    # Through transformers' own Hub code path, by repo id.
    loaded = type(model).from_pretrained(repo_id)
    assert_same_weights(model, loaded)
    assert_same_weights(model, type(model).from_pretrained(local))
    drop = {"transformers_version", "_name_or_path"}
    assert {k: v for k, v in loaded.config.to_dict().items() if k not in drop} == {
        k: v for k, v in model.config.to_dict().items() if k not in drop
    }
    processor = AutoImageProcessor.from_pretrained(repo_id)
    assert list(processor.image_mean) == IMAGE_MEAN and list(processor.image_std) == IMAGE_STD
    assert hub_server.unhandled == []  # every route the client used is one we serve on purpose

    check_card(local / "README.md", kind, repo_id, metrics)


def check_card(path: Path, kind: str, repo_id: str, metrics: dict[str, float]) -> None:
    card = ModelCard.load(path)  # ignore_metadata_errors=False: a malformed model-index raises here
    meta = card.data.to_dict()
    tag, pipeline_tag, task_type = KIND_TASKS[kind]
    assert meta["tags"] == [*BASE_TAGS, tag]
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert meta["datasets"] == [RUN_INFO["dataset"]]
    assert meta.get("pipeline_tag") == pipeline_tag
    # model-index values are the metrics JSON's, and nothing else (no runtime / epoch).
    assert card.data.model_name == repo_id
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == metrics
    assert {r.task_type for r in card.data.eval_results} == {task_type}
    # Local validation: the metadata survives a ModelCardData round trip unchanged.
    assert ModelCardData(**meta).to_dict() == meta
    # `validate` posts to {ENDPOINT}/api/validate-yaml: here the local server, which only checks that the
    # front matter is a YAML mapping (the real Hub's schema checks cannot run offline).
    card.validate()
    text = card.text
    for value in (*IMAGE_MEAN, RUN_INFO["hardware"], RUN_INFO["command"], f'"{repo_id}"', "not a medical device"):
        assert str(value) in text
    for key in metrics:
        assert f"| {key} |" in text


def test_pull_works_offline_from_cache(hub_server, tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, "mae")
    push_checkpoint(folder, "medmae-test/offline")
    cache = tmp_path / "cache"
    online = pull_checkpoint("medmae-test/offline", cache_dir=cache)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once at import by huggingface_hub
    requests_before = len(hub_server.log)
    assert pull_checkpoint("medmae-test/offline", cache_dir=cache) == online
    assert len(hub_server.log) == requests_before  # served from the cache, no request made
    with pytest.raises(CheckpointError, match="not \\(completely\\) in the local cache"):
        pull_checkpoint("medmae-test/offline", cache_dir=tmp_path / "empty-cache")


def test_push_to_a_branch(hub_server, tmp_path):
    folder = tmp_path / "ckpt"
    model, _ = save_checkpoint(folder, "mae")
    (folder / "README.md").write_text("# My own card\n")  # an existing card is uploaded as it is
    push_checkpoint(folder, "medmae-test/branch", revision="experiment-1", commit_message="try grid masking")
    local = pull_checkpoint("medmae-test/branch", revision="experiment-1", cache_dir=tmp_path / "cache")
    assert_same_weights(model, MedMAEForPreTraining.from_pretrained(local))
    assert (Path(local) / "README.md").read_text() == "# My own card\n"
    with pytest.raises(CheckpointError, match="config.json is missing"):  # main only has .gitattributes
        pull_checkpoint("medmae-test/branch", cache_dir=tmp_path / "cache")


def test_pull_missing_repo(hub_server):
    with pytest.raises(CheckpointError, match="repo medmae-test/nope does not exist or is private") as err:
        pull_checkpoint("medmae-test/nope")
    assert "token" in err.value.fix


def test_pull_missing_revision(hub_server, tmp_path):
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, "mae")
    push_checkpoint(folder, "medmae-test/revs")
    with pytest.raises(CheckpointError, match="revision 'v9' does not exist in medmae-test/revs") as err:
        pull_checkpoint("medmae-test/revs", revision="v9")
    assert "list_repo_refs" in err.value.fix


def test_pull_refuses_pickled_weights(hub_server, tmp_path):
    repo_id = "medmae-test/pickles"
    api = HfApi()
    api.create_repo(repo_id)
    api.upload_file(
        path_or_fileobj=tiny_mae_config().to_json_string().encode(), path_in_repo="config.json", repo_id=repo_id
    )
    # Never unpickled: any bytes make the point.
    api.upload_file(path_or_fileobj=b"\x80\x04not really a pickle", path_in_repo="pytorch_model.bin", repo_id=repo_id)
    with pytest.raises(CheckpointError, match="refusing pickled weights") as err:
        pull_checkpoint(repo_id, cache_dir=tmp_path / "cache")
    assert "pytorch_model.bin" in err.value.problem
    assert not list((tmp_path / "cache").rglob("*.bin"))  # the pickle was never downloaded


def test_push_refuses_pickled_weights(hub_server, tmp_path):
    folder = tmp_path / "ckpt"
    tiny_mae_config().save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match="refusing pickled weights"):
        push_checkpoint(folder, "medmae-test/pickled")
    assert not any("repos/create" in line for line in hub_server.log)  # refused before any request


def test_push_refuses_other_architectures(hub_server, tmp_path):
    folder = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        folder
    )
    with pytest.raises(CheckpointError, match="checkpoint of another architecture: model_type 'bert'"):
        push_checkpoint(folder, "medmae-test/bert")
    with pytest.raises(CheckpointError, match="card_kind='classifier' does not match"):
        push_checkpoint(_saved_mae_config(tmp_path / "mae"), "medmae-test/mae", card_kind="classifier")
    assert hub_server.log == []


def _saved_mae_config(folder: Path) -> Path:
    tiny_mae_config().save_pretrained(folder)
    return folder


def test_run_mae_push_to_hub_publishes_its_own_metrics(hub_server, tmp_path):
    """`run_mae.py --push_to_hub`: the Trainer's Hub arguments push the run with our card, once, at the end."""
    from hf_medmae.tasks import pretrain

    out = tmp_path / "run"
    pretrain.main(
        [
            "--train_data",
            "embedded:nuclei16",
            "--max_images",
            "3",
            "--tile_size",
            "64",
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
            "--decoder_hidden_size",
            "32",
            "--decoder_num_hidden_layers",
            "1",
            "--decoder_num_attention_heads",
            "2",
            "--decoder_intermediate_size",
            "64",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "8",
            "--save_strategy",
            "no",
            "--report_to",
            "none",
            "--output_dir",
            str(out),
            "--push_to_hub",
            "--hub_model_id",
            "medmae-test/quick-run",
        ]
    )
    local = Path(pull_checkpoint("medmae-test/quick-run", cache_dir=tmp_path / "cache"))
    assert "training_args.bin" not in {p.name for p in local.iterdir()}  # nothing pickled is published
    results = json.loads((out / "all_results.json").read_text())
    card = ModelCard.load(local / "README.md")  # strict metadata parse
    card.validate()  # the client's own check (the local server accepts any YAML mapping front matter)
    assert ModelCardData(**card.data.to_dict()).to_dict() == card.data.to_dict()
    published = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert published["eval_loss"] == pytest.approx(results["eval_loss"])
    assert json.loads((local / "run_info.json").read_text())["dataset"] == "embedded:nuclei16"
    assert MedMAEForPreTraining.from_pretrained("medmae-test/quick-run").config.num_channels == 16
