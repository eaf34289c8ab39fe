"""run_mae.py end to end: learning on real BCCD smears, exact reload, named errors, 2-process sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, tiny_config
from PIL import Image

from hf_medmae import MedMAEForPreTraining
from hf_medmae.errors import ConfigError, DataError
from hf_medmae.pretraining import mae_config
from hf_medmae.tasks import pretrain

TINY = dict(
    image_size=32,
    patch_size=4,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    decoder_hidden_size=64,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=4,
    decoder_intermediate_size=128,
    report_to="none",
    dataloader_num_workers=0,
    seed=0,
    attn_implementation="sdpa",  # fixed kernel: "auto" may pick another one run to run, and these tests compare runs
)


def write_config(path, **values):
    path.write_text(yaml.safe_dump({**TINY, **values}))
    return str(path)


def run_script(args, env=None, timeout=900):
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_pretraining_learns_on_real_smears_and_reloads_exactly(tmp_path, bccd_dir):
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml",
        train_data=str(bccd_dir),
        max_images=40,
        tile_size=96,
        validation_fraction=0.2,
        mask_ratio=0.75,
        crop_scale=[0.3, 1.0],
        max_steps=200,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=128,
        learning_rate=2e-3,
        adam_beta2=0.95,
        weight_decay=0.05,
        lr_scheduler_type="cosine",
        warmup_steps=20,
        eval_strategy="steps",
        eval_steps=100,
        eval_on_start=True,
        save_strategy="steps",
        save_steps=200,
        logging_steps=50,
        output_dir=str(out),
    )
    run_script(["run_mae.py", "--config", cfg])
    history = json.loads((out / "checkpoint-200" / "trainer_state.json").read_text())["log_history"]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    # With norm_pix_loss every target patch has zero mean and unit variance, so a model that predicts
    # nothing but the patch mean scores ~1.0. Falling below 0.8 x the untrained loss means it predicts
    # real structure of the hidden patches from their neighbours (we measured ~0.65 after 200 steps).
    assert len(evals) == 3 and evals[0] > 0.9
    assert evals[-1] < 0.8 * evals[0], evals
    for name in (
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "all_results.json",
        "reconstruction.png",
    ):
        assert (out / name).is_file(), name
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert len(processor["image_mean"]) == 3 and 50 < processor["image_mean"][0] < 255  # RGB stats of real smears
    assert Image.open(out / "reconstruction.png").size[0] > 100
    final, checkpoint = (
        MedMAEForPreTraining.from_pretrained(out).eval(),
        MedMAEForPreTraining.from_pretrained(out / "checkpoint-200").eval(),
    )
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    assert torch.equal(final(x, noise=noise).logits, checkpoint(x, noise=noise).logits)
    assert not torch.equal(
        final(x, noise=noise).logits, MedMAEForPreTraining(final.config).eval()(x, noise=noise).logits
    )


@pytest.mark.slow
def test_two_processes_see_disjoint_shards(tmp_path):
    out = tmp_path / "ddp"
    cfg = write_config(
        tmp_path / "c.yaml",
        train_data="embedded:nuclei16",
        tile_size=64,
        validation_fraction=0.2,
        max_images=5,
        mask_generator="block",
        max_steps=4,
        per_device_train_batch_size=8,
        save_strategy="no",
        eval_strategy="no",
        record_sample_ids=True,
        output_dir=str(out),
    )
    run_script(
        [
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "run_mae.py",
            "--config",
            cfg,
        ],
        env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
    )
    seen = [json.loads((out / f"sample_ids_rank{r}.json").read_text()) for r in (0, 1)]
    # 4 images x 16 tiles = 64 training tiles; 4 steps x 2 processes x 8 = one epoch exactly
    assert len(seen[0]) == len(seen[1]) == 32
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(64))
    assert json.loads((out / "all_results.json").read_text())["num_train_images"] == 64


def base_args(tmp_path, **values):
    cfg = write_config(tmp_path / "bad.yaml", output_dir=str(tmp_path / "o"), max_steps=1, **values)
    return ["--config", cfg]


@pytest.mark.parametrize(
    "values,error,message",
    [
        ({"train_data": "embedded:nuclei16", "mask_generator": "nope"}, ConfigError, "unknown mask_generator 'nope'"),
        ({"train_data": "embedded:nuclei16", "mask_ratio": 1.5}, ConfigError, "outside"),
        ({"train_data": "embedded:nuclei16", "image_size": 30}, ConfigError, "not divisible by patch_size"),
        ({"train_data": "embedded:nuclei16", "mask_ratoi": 0.5}, ConfigError, "did you mean 'mask_ratio'"),
        ({"train_data": "embedded:nuclei16", "learning_rate": "fast"}, ConfigError, "expects float"),
        ({"train_data": "embedded:missing"}, DataError, "unknown embedded data set"),
    ],
)
def test_bad_config_is_named(tmp_path, values, error, message):
    with pytest.raises(error, match=message):
        pretrain.main(base_args(tmp_path, **values))


def test_bad_data_is_named(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    with pytest.raises(DataError, match="no images found"):
        pretrain.main(base_args(tmp_path, train_data=str(folder)))
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "good.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match="corrupt.jpg"):
        pretrain.main(base_args(tmp_path, train_data=str(folder)))
    ckpt = tmp_path / "ckpt16"
    MedMAEForPreTraining(tiny_config(num_channels=16)).save_pretrained(ckpt)
    (folder / "corrupt.jpg").unlink()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "second.png")
    with pytest.raises(DataError, match="checkpoint expects 16 channels, the data has 3"):
        pretrain.main(base_args(tmp_path, train_data=str(folder), model_name_or_path=str(ckpt)))


def test_continued_pretraining_keeps_the_checkpoints_masking_unless_the_run_sets_it(tmp_path, caplog):
    """Unset masking fields keep the checkpoint's values; set ones replace them (said in the log, saved, checked)."""
    ckpt = tmp_path / "ckpt"
    MedMAEForPreTraining(
        tiny_config(num_channels=16, mask_ratio=0.75, mask_generator="grid", norm_pix_loss=False)
    ).save_pretrained(ckpt)
    out = tmp_path / "continued"
    with caplog.at_level("WARNING"):
        pretrain.main(
            [
                "--config",
                write_config(
                    tmp_path / "c.yaml",
                    train_data="embedded:nuclei16",
                    model_name_or_path=str(ckpt),
                    mask_ratio=0.5,
                    max_steps=1,
                    output_dir=str(out),
                ),
            ]
        )
    saved = json.loads((out / "config.json").read_text())
    assert (saved["mask_ratio"], saved["mask_generator"], saved["norm_pix_loss"]) == (0.5, "grid", False)
    assert "checkpoint was pre-trained with {'mask_ratio': 0.75}" in caplog.text
    model = MedMAEForPreTraining.from_pretrained(out)
    codes = model.generate_codes(torch.zeros(2, 16, 32, 32))
    assert (codes == 1).float().mean().item() == 0.5  # the grid generator at the run's 0.5
    with pytest.raises(ConfigError, match="throw_ratio"):  # the new settings are checked like a fresh config's
        model.set_masking(throw_ratio=0.6)
    fresh = mae_config(pretrain.ModelArguments(), 3)  # a new MAE: the MAE defaults
    assert (fresh.mask_ratio, fresh.mask_generator, fresh.norm_pix_loss, fresh.throw_ratio) == (
        0.75,
        "random",
        True,
        0.0,
    )


def test_output_dir_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        pretrain.main(["--train_data", "embedded:nuclei16", "--output_dir", str(blocker / "sub")])


@pytest.mark.slow
def test_resume_continues_exactly_where_it_stopped(tmp_path):
    """A run restarted from checkpoint-3 (as if killed right after saving it) ends where an uninterrupted run ends."""
    import shutil

    from safetensors.torch import load_file

    common = dict(
        train_data="embedded:nuclei16",
        tile_size=64,
        max_images=4,
        validation_fraction=0.25,
        mask_generator="block",
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=3,
        eval_strategy="no",
        logging_steps=1,
    )
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_script(["run_mae.py", "--config", write_config(tmp_path / "a.yaml", output_dir=str(full), **common)])
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    (resumed / "checkpoint-6").mkdir()  # a checkpoint the kill left half-written: must not be picked
    (resumed / "checkpoint-6" / "config.json").write_text("{}")
    run_script(
        [
            "run_mae.py",
            "--config",
            write_config(tmp_path / "b.yaml", output_dir=str(resumed), resume_from_checkpoint="true", **common),
        ]
    )
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    # Optimizer, scheduler, data order and RNG (augmentation, masks) are restored, so on one CPU the
    # weights agree to float rounding; a lost optimizer state or a re-drawn mask would move them ~1e-3.
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst

    def losses(d):
        return [
            h["loss"]
            for h in json.loads((d / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
            if "loss" in h
        ]

    assert losses(resumed)[-3:] == pytest.approx(losses(full)[-3:], rel=1e-5)
    # precision and attention kernel are measured once (auto): the resumed run takes them from checkpoint-3
    # rather than measuring again on a machine that may be busier now
    choices = json.loads((full / "checkpoint-3" / "measured_choices.json").read_text())
    results = json.loads((resumed / "all_results.json").read_text())
    assert results["precision"] == choices["precision"] and results["precision_from"].endswith(
        "checkpoint-3/measured_choices.json"
    )
    assert results["attn_implementation"] == choices["attn_implementation"]


def test_one_model_arguments_with_a_view_per_dimension(tmp_path):
    """Volume-only keys are unknown in a 2D run (image-only ones in a 3D run: tests/test_3d.py); 3D runs get
    their own decoder defaults, whose widths 3D sin-cos positions can divide by 6."""
    with pytest.raises(ConfigError, match="unknown config key.*'tubelet_size'"):
        pretrain.main(["--tubelet_size", "4", "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    task = pretrain.Pretrain()
    images, volumes = task.arguments_for(2)[0](), task.arguments_for(3)[0]()
    assert (images.decoder_hidden_size, images.decoder_intermediate_size) == (128, 512)
    assert (volumes.decoder_hidden_size, volumes.decoder_intermediate_size, volumes.tubelet_size) == (96, 384, None)
    assert not hasattr(volumes, "image_size") and not hasattr(images, "tubelet_size")
    assert mae_config(volumes, 1, volume_size=(16, 32, 32)).patch_shape == (8, 8, 8)  # tubelet_size: patch_size
