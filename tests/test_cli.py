"""Config files and flags: overrides, typos, wrong types, missing keys."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import yaml
from transformers import TrainingArguments

from hf_medmae.cli import parse_config
from hf_medmae.errors import ConfigError
from hf_medmae.tasks.run import settle


@dataclass
class Model:
    patch_size: int = 8
    mask_ratio: float = 0.75
    crop_scale: list[float] | None = None
    mask_generator_kwargs: dict | None = None


@dataclass
class Needs:
    train_data: str


def test_file_then_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "patch_size: 4\nmask_ratio: 0.5\nlearning_rate: 1e-3\noutput_dir: out\nmask_generator_kwargs: {mix: 0.2}\n"
    )
    model, args = parse_config(
        (Model, TrainingArguments), ["--config", str(cfg), "--mask_ratio", "0.9", "--crop_scale", "[0.5, 1.0]"]
    )
    assert model.patch_size == 4 and model.mask_ratio == 0.9 and model.crop_scale == [0.5, 1.0]
    assert model.mask_generator_kwargs == {"mix": 0.2}
    assert args.learning_rate == 1e-3 and args.output_dir == "out"  # YAML's '1e-3' string became a float
    (j := tmp_path / "c.json").write_text('{"patch_size": 2, "output_dir": "o"}')
    assert parse_config((Model, TrainingArguments), ["--config", str(j), "--use_cpu", "--bf16"])[1].bf16 is True


def test_unknown_key_suggests_the_fix(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("patch_sise: 4\n")
    with pytest.raises(ConfigError, match="did you mean 'patch_size'"):
        parse_config((Model,), ["--config", str(cfg)])


def test_wrong_type_missing_key_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="'patch_size' expects int, got 'big'"):
        parse_config((Model,), ["--patch_size", "big"])
    with pytest.raises(ConfigError, match="expects int, got 2.5"):
        parse_config((Model,), ["--patch_size", "2.5"])
    with pytest.raises(ConfigError, match=r"missing config key\(s\): \['train_data'\]"):
        parse_config((Needs,), [])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config((Model,), ["--config", str(tmp_path / "none.yaml")])
    (bad := tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config((Model,), ["--config", str(bad)])


def test_flags_keep_text_where_text_is_wanted(tmp_path):
    @dataclass
    class Data:
        image_glob: str = "*"
        mask_pattern: str = "{stem}.png"
        tile_size: int | None = None

    data, args = parse_config(
        (Data, TrainingArguments),
        [
            "--image_glob",
            "*.bmp",
            "--mask_pattern",
            "{stem}_mask.png",
            "--tile_size",
            "64",
            "--output_dir",
            "o",
            "--eval_strategy",
            "no",
        ],
    )
    assert data.image_glob == "*.bmp" and data.mask_pattern == "{stem}_mask.png" and data.tile_size == 64
    assert args.eval_strategy == "no"
    (cfg := tmp_path / "c.yaml").write_text("output_dir: o\nsave_strategy: no\n")
    assert parse_config((TrainingArguments,), ["--config", str(cfg)])[0].save_strategy == "no"


def test_one_run_sequence_for_every_mode():
    """Classification's train, frozen-feature probe and predict modes all go through the shared `Task.main`."""
    from hf_medmae.tasks import classify
    from hf_medmae.tasks.run import Task

    assert "main" not in vars(classify.Classify) and classify.main == classify.TASK.main
    assert {"setup", "report", "probe", "predict"} <= set(vars(classify.Classify))
    assert classify.Classify.main is Task.main


SETTLE_CASES = {
    # the MAE keeps sample ids and labels, evaluates the loss only, and trains at least 50 steps
    "pretrain": (
        dict(
            train_data="embedded:nuclei16",
            image_size=32,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            decoder_hidden_size=32,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2,
            decoder_intermediate_size=64,
            attn_implementation="sdpa",
        ),
        {"remove_unused_columns", "prediction_loss_only", "num_train_epochs"},
    ),
    # a segmenter selects its checkpoint on validation Dice by default
    "segment": (
        dict(
            train_data="embedded:nuclei16",
            class_map={0: 0, 1: 1},
            model="unet",
            init="scratch",
            unet_features=[4, 4, 8, 8, 16, 4],
            image_size=32,
            eval_strategy="epoch",
            save_strategy="epoch",
        ),
        {"metric_for_best_model", "greater_is_better", "num_train_epochs"},
    ),
}


@pytest.mark.parametrize("name", sorted(SETTLE_CASES))
def test_setup_leaves_the_parsed_arguments_alone_and_settle_returns_a_copy(tmp_path, name):
    """After parsing, the arguments change only in the copy `settle` makes for the Trainer."""
    task = importlib.import_module(f"hf_medmae.tasks.{name}").TASK
    values, expected = SETTLE_CASES[name]
    common = dict(
        output_dir=str(tmp_path / "o"),
        report_to="none",
        use_cpu=True,
        precision="fp32",
        per_device_train_batch_size=2,
        min_train_steps=50,
        seed=0,
    )
    (cfg := tmp_path / "c.yaml").write_text(yaml.safe_dump({**common, **values}))
    model_args, data_args, args = parse_config(task.arguments_for(2), ["--config", str(cfg)])
    parsed = args.to_dict()
    setup = task.setup(model_args, data_args, args)
    assert args.to_dict() == parsed  # the task declared its needs on the setup instead of assigning to args
    settled, precision = settle(args, setup)
    assert args.to_dict() == parsed and settled is not args
    after = settled.to_dict()
    assert {key for key in parsed if after[key] != parsed[key]} == expected
    assert precision["precision"] == "fp32" and settled.mixed_precision == "no"
