"""run_segmentation.py and its data pipeline: learning on real WBC masks, sparse labels, paired geometry, named
errors."""

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
from transformers import AutoModelForSemanticSegmentation, ViTImageProcessorPil

from hf_medmae import MedMAEForPreTraining
from hf_medmae.cli import parse_config
from hf_medmae.data.segmentation import load_labelled, load_pairs, map_labels, sparsify, split_pairs
from hf_medmae.data.splits import split_three
from hf_medmae.data.transforms import PairAugment
from hf_medmae.errors import ConfigError, DataError
from hf_medmae.tasks import segment

WBC_MAP = {0: 0, 128: 1, 255: 2}
WBC_NAMES = ["background", "cytoplasm", "nucleus"]
# Subprocesses get one OpenMP thread: on a 2-core machine shared with other jobs, two spinning threads
# made a tiny UNETR step ~20x slower (measured 1.0-2.5 s vs 0.05 s).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def mae3(tmp_path_factory):
    """A tiny 3-channel MAE checkpoint (patch 4) with a preprocessor_config, as run_mae.py writes."""
    path = tmp_path_factory.mktemp("mae3")
    MedMAEForPreTraining(tiny_config(num_channels=3)).save_pretrained(path)
    # Roughly the RGB statistics of the WBC images (background ~200, stained cells darker).
    ViTImageProcessorPil(
        do_resize=False, do_rescale=False, image_mean=[200.0, 180.0, 190.0], image_std=[40.0, 50.0, 40.0]
    ).save_pretrained(path)
    return path


def wbc_config(path, wbc_dir, **values):
    config = dict(
        train_data=str(wbc_dir),
        image_glob="*.bmp",
        class_map=WBC_MAP,
        class_names=WBC_NAMES,
        image_size=32,
        feature_size=8,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=2e-3,
        report_to="none",
        dataloader_num_workers=0,
        seed=0,
        logging_steps=50,
    )
    config.update(values)
    path.write_text(yaml.safe_dump(config))
    return str(path)


def mosaic(wbc_dir, stems):
    """A 240 x 240 image of four WBC images (2 x 2) and its mapped mask: larger than any training image."""
    pairs = [
        (np.asarray(Image.open(wbc_dir / f"{s}.bmp")), np.asarray(Image.open(wbc_dir / f"{s}.png"))) for s in stems
    ]
    image, mask = (
        np.concatenate([np.concatenate([pairs[0][k], pairs[1][k]], 1), np.concatenate([pairs[2][k], pairs[3][k]], 1)])
        for k in (0, 1)
    )
    return image, map_labels(mask.astype(np.int64), WBC_MAP, "mosaic")


def nucleus_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred == 2, truth == 2
    return float(2 * (p & t).sum() / (p.sum() + t.sum()))


def test_wbc_end_to_end_learns_nuclei_and_predicts_large_images(tmp_path, wbc_dir, mae3):
    big_dir = tmp_path / "big"
    big_dir.mkdir()
    big_image, big_mask = mosaic(wbc_dir, ["003", "010", "020", "030"])
    Image.fromarray(big_image).save(big_dir / "mosaic.png")
    out = tmp_path / "run"
    cfg = wbc_config(
        tmp_path / "c.yaml",
        wbc_dir,
        model_name_or_path=str(mae3),
        max_steps=150,
        eval_strategy="steps",
        eval_steps=75,
        save_strategy="steps",
        save_steps=75,
        save_total_limit=1,
        load_best_model_at_end=True,
        warmup_steps=10,
        lr_scheduler_type="cosine",
        output_dir=str(out),
        predict_images=str(big_dir),
    )
    result = subprocess.run(
        [sys.executable, "run_segmentation.py", "--config", cfg],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **ONE_THREAD},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for name in (
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "all_results.json",
        "test_metrics.json",
        "confusion_matrix.png",
        "overlays.png",
        "inference_config.json",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert set(metrics["per_class"]) >= set(WBC_NAMES) and metrics["per_class"]["nucleus"]["support"] > 0
    assert np.asarray(metrics["confusion_matrix"]).shape == (3, 3) and metrics["hd95_per_class"]["nucleus"] is not None
    assert json.loads((out / "preprocessor_config.json").read_text())["image_mean"] == [
        200.0,
        180.0,
        190.0,
    ]  # init mae: the checkpoint's
    assert Image.open(out / "overlays.png").size[1] > 300

    # Trivial baseline on the same test pixels: predicting "nucleus" everywhere gives nucleus Dice
    # 2n / (n + N) (n nucleus pixels of N), ~0.22 on WBC where ~12% of pixels are nucleus; any other
    # constant predictor (e.g. the majority class, background) scores 0. The nucleus is the darkest,
    # most saturated structure, so a tiny UNETR at 32 px separates it within 150 steps (measured 0.93,
    # ~8 s of training with one thread). Requiring 0.4 above the trivial Dice and at least 0.7 leaves
    # room for run-to-run noise but fails for a model that learnt nothing or only "cell vs background".
    cm = np.asarray(metrics["confusion_matrix"])
    n_nucleus, n_pixels = cm[2].sum(), cm.sum()
    trivial = 2 * n_nucleus / (n_nucleus + n_pixels)
    learned = metrics["dice_per_class"]["nucleus"]
    assert 0.1 < trivial < 0.35
    assert learned > max(trivial + 0.4, 0.7), (learned, trivial)

    # Sliding-window prediction on a 240 px image (4x the 120 px training images, 7.5x the 32 px input):
    # same size as the input, class ids only, and nuclei found beyond the trivial level there too.
    labels = np.asarray(Image.open(out / "predictions" / "mosaic_labels.png"))
    assert labels.shape == big_mask.shape and set(np.unique(labels)) <= {0, 1, 2}
    trivial_big = 2 * (big_mask == 2).sum() / ((big_mask == 2).sum() + big_mask.size)
    assert nucleus_dice(labels, big_mask) > trivial_big + 0.3

    # predict_only reloads the saved model (safetensors) and reproduces the in-run label map exactly.
    segment.main(
        [
            "--predict_only",
            "--model_name_or_path",
            str(out),
            "--predict_images",
            str(big_dir),
            "--output_dir",
            str(tmp_path / "again"),
        ]
    )
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / "mosaic_labels.png")), labels)

    # Another site's labelled set: with mask_dir, predict_only also scores the label maps against its masks.
    site = tmp_path / "site"
    site.mkdir()
    Image.fromarray(big_image).save(site / "mosaic.bmp")
    raw = np.select([big_mask == 1, big_mask == 2], [128, 255], 0).astype(np.uint8)  # back to WBC's raw mask values
    Image.fromarray(raw).save(site / "mosaic.png")
    scored = segment.main(
        [
            "--predict_only",
            "--model_name_or_path",
            str(out),
            "--predict_images",
            str(site),
            "--predict_mask_dirs",
            str(site),
            "--image_glob",
            "*.bmp",
            "--output_dir",
            str(tmp_path / "scored"),
        ]
    )
    external = json.loads((tmp_path / "scored" / "test_metrics.json").read_text())
    assert external["dice_per_class"]["nucleus"] == pytest.approx(nucleus_dice(labels, big_mask), abs=1e-6)
    assert scored["num_predictions"] == 1 and (tmp_path / "scored" / "overlays.png").is_file()
    assert scored["sets"][0]["dice_nucleus"] == external["dice_per_class"]["nucleus"]  # the external_metrics.csv row
    # Several sets in one call: one sub-folder each, one table row per scored set.
    (unlabelled := tmp_path / "unlabelled").mkdir()
    Image.fromarray(big_image).save(unlabelled / "mosaic.bmp")
    segment.main(
        [
            "--predict_only",
            "--model_name_or_path",
            str(out),
            "--predict_images",
            str(unlabelled),
            str(site),
            "--predict_mask_dirs",
            "",
            str(site),
            "--image_glob",
            "*.bmp",
            "--output_dir",
            str(tmp_path / "both"),
        ]
    )
    assert (tmp_path / "both" / "site" / "mosaic_labels.png").is_file() and (
        tmp_path / "both" / "site" / "test_metrics.json"
    ).is_file()
    table = (tmp_path / "both" / "external_metrics.csv").read_text().splitlines()
    assert (
        len(table) == 2
        and table[1].startswith("site,")
        and (tmp_path / "both" / "unlabelled" / "mosaic_labels.png").is_file()
    )
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(out, use_safetensors=True)
    assert reloaded.config.id2label[2] == "nucleus"


def test_sparse_labels_keep_the_requested_fraction(wbc_dir):
    pairs = load_pairs(str(wbc_dir), image_glob="*.bmp", max_images=20)
    masks = [map_labels(m, WBC_MAP, n) for m, n in zip(pairs.labels, pairs.names)]
    sparse = sparsify(masks, 0.023, 255, seed=1)
    for dense, kept in zip(masks, sparse):
        labelled = kept != 255
        # round(0.023 * 14400) = 331 pixels per 120 x 120 mask: exact up to rounding
        assert abs(labelled.mean() - 0.023) < 0.0005
        assert np.array_equal(kept[labelled], dense[labelled])  # kept pixels keep their class
        assert set(np.unique(kept[~labelled])) == {255}
    assert len(set(np.unique(np.concatenate([k[k != 255] for k in sparse])))) == 3  # every class is sampled
    again, other = sparsify(masks, 0.023, 255, seed=1), sparsify(masks, 0.023, 255, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(sparse, again))
    assert not all(np.array_equal(a, b) for a, b in zip(sparse, other))


def test_sparse_option_reaches_only_training_masks(tmp_path, wbc_dir):
    (model_args, data_args, training_args) = parse_config(
        segment.Segment.arguments,
        [
            "--config",
            wbc_config(
                tmp_path / "c.yaml", wbc_dir, max_images=40, label_fraction_pixels=0.02, output_dir=str(tmp_path / "o")
            ),
        ],
    )
    pairs, _, names, channels = load_labelled(
        data_args.train_data,
        data_args.class_map,
        data_args.class_names,
        data_args.ignore_index,
        image_glob=data_args.image_glob,
        max_images=data_args.max_images,
    )
    train, val, test = split_pairs(
        pairs,
        data_args.validation_fraction,
        data_args.test_fraction,
        training_args.seed,
        label_fraction=data_args.label_fraction_pixels,
        ignore_index=data_args.ignore_index,
    )
    assert (len(train.images), len(val.images), len(test.images)) == (28, 6, 6) and channels == 3
    train_fraction = np.mean([(m != 255).mean() for m in train.labels])
    assert abs(train_fraction - 0.02) < 0.001
    assert all((m != 255).all() for m in val.labels + test.labels)  # evaluation stays dense
    assert not set(train.names) & set(val.names + test.names)
    # a few-label curve: counts of labelled images, one seed's smaller sets inside its larger ones, same split
    sets = {n: split_pairs(pairs, 0.15, 0.15, seed=3, split_seed=0, train_images=n) for n in (1, 3, 10)}
    names = {n: set(train.names) for n, (train, _, _) in sets.items()}
    assert [len(names[n]) for n in (1, 3, 10)] == [1, 3, 10] and names[1] < names[3] < names[10]
    assert len({tuple(test.names) for _, _, test in sets.values()}) == 1
    with pytest.raises(ConfigError, match="train_images=99"):
        split_pairs(pairs, 0.15, 0.15, seed=3, train_images=99)


def asymmetric_pair(size: int = 12):
    """A mask with no symmetry (an L plus a dot, four classes) and an image whose channel 0 equals it."""
    mask = torch.zeros(size, size, dtype=torch.long)
    mask[1:8, 2] = 1
    mask[7, 2:6] = 2
    mask[size - 2, size - 3] = 3
    image = torch.stack([mask.float(), torch.arange(size * size).float().reshape(size, size), -mask.float()])
    return image, mask


@pytest.mark.parametrize("mode, size", [("resize", 12), ("random_crop", 8)])
def test_flips_and_rotations_move_image_and_mask_together(mode, size):
    image, mask = asymmetric_pair()
    augment = PairAugment(size, crop_mode=mode, hflip=True, vflip=True, rot90=True)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(40):
        out_image, out_mask = augment(image, mask, gen)
        assert out_mask.dtype == torch.long and out_image.shape == (3, size, size)
        assert torch.equal(out_image[0], out_mask.float()) and torch.equal(out_image[2], -out_mask.float())
        seen.add(tuple(out_image[1].flatten().tolist()))
    assert len(seen) >= 8  # the draws really vary: 8 dihedral poses (x crop positions)


def test_resize_keeps_class_ids():
    image, mask = asymmetric_pair(12)
    out_image, out_mask = PairAugment(24, hflip=False, vflip=False, rot90=False)(image, mask)
    assert out_image.shape == (3, 24, 24) and set(out_mask.unique().tolist()) <= {0, 1, 2, 3}  # nearest, no blends


def write_pair(folder, stem, image_hw, mask):
    folder.mkdir(exist_ok=True)
    Image.fromarray(np.full((*image_hw, 3), 100, np.uint8)).save(folder / f"{stem}.bmp")
    Image.fromarray(np.asarray(mask, np.uint8)).save(folder / f"{stem}_mask.png")


def test_named_error_mask_size_differs_from_image(tmp_path):
    write_pair(tmp_path / "d", "a", (16, 16), np.zeros((16, 16)))
    write_pair(tmp_path / "d", "b", (16, 16), np.zeros((12, 16)))
    with pytest.raises(DataError, match=r"b\.bmp: the image is \[H, W\] \(16, 16\) but its mask is \(12, 16\)"):
        load_pairs(str(tmp_path / "d"), image_glob="*.bmp", mask_pattern="{stem}_mask.png")


def test_named_error_label_value_not_in_class_map(tmp_path):
    for stem in "abc":
        mask = np.zeros((32, 32))
        mask[:4] = 7 if stem == "b" else 128
        write_pair(tmp_path / "d", stem, (32, 32), mask)
    # cli.parse_cli_flags YAML-parses flag values, so glob and pattern need YAML quotes on the command line.
    argv = [
        "--train_data",
        str(tmp_path / "d"),
        "--image_glob",
        '"*.bmp"',
        "--mask_pattern",
        '"{stem}_mask.png"',
        "--class_map",
        "{0: 0, 128: 1}",
        "--model",
        "unet",
        "--init",
        "scratch",
        "--image_size",
        "32",
        "--output_dir",
        str(tmp_path / "o"),
        "--report_to",
        "none",
    ]
    with pytest.raises(DataError, match=r"b\.bmp.*\[7\]"):
        segment.main(argv)


def test_named_error_image_size_not_divisible_by_patch(tmp_path, wbc_dir, mae3):
    cfg = wbc_config(
        tmp_path / "c.yaml",
        wbc_dir,
        model_name_or_path=str(mae3),
        image_size=30,
        max_images=6,
        output_dir=str(tmp_path / "o"),
    )
    with pytest.raises(ConfigError, match=r"30x30.*patch_size 4x4"):
        segment.main(["--config", cfg])


def test_named_error_three_channel_checkpoint_on_sixteen_channel_data(tmp_path, mae3):
    argv = [
        "--train_data",
        "embedded:nuclei16",
        "--class_map",
        "{0: 0, 1: 1}",
        "--model_name_or_path",
        str(mae3),
        "--image_size",
        "32",
        "--output_dir",
        str(tmp_path / "o"),
        "--report_to",
        "none",
    ]
    with pytest.raises(DataError, match=r"3-channel.*16 channels"):
        segment.main(argv)


def test_class_map_must_be_explicit(tmp_path, wbc_dir):
    cfg = wbc_config(
        tmp_path / "c.yaml", wbc_dir, class_map=None, model="unet", init="scratch", output_dir=str(tmp_path / "o")
    )
    with pytest.raises(ConfigError, match="class_map"):
        segment.main(["--config", cfg])


def test_unet_baseline_runs_through_the_script_on_sixteen_channels(tmp_path, one_thread):
    out = tmp_path / "unet"
    metrics = segment.main(
        [
            "--train_data",
            "embedded:nuclei16",
            "--class_map",
            "{0: 0, 1: 1}",
            "--class_names",
            "[background, nucleus]",
            "--model",
            "unet",
            "--init",
            "scratch",
            "--unet_features",
            "[4, 4, 8, 8, 16, 4]",
            "--image_size",
            "32",
            "--crop_mode",
            "random_crop",
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "4",
            "--eval_strategy",
            '"no"',
            "--save_strategy",
            '"no"',
            "--report_to",
            "none",
            "--output_dir",
            str(out),
            "--num_overlays",
            "2",
            "--display_channels",
            "[8]",
        ]
    )
    assert metrics["num_train_images"] == 8 and metrics["test_mean_dice"] >= 0.0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "medmae_unet" and saved["in_channels"] == 16
    test_metrics = json.loads((out / "test_metrics.json").read_text())
    # 2 test images of 256 px, each cut into 8 x 8 covering tiles of 32 px: every pixel scored once
    assert test_metrics["n_pixels"] == 2 * 256 * 256
    assert (out / "overlays.png").is_file() and (out / "confusion_matrix.png").is_file()


def test_split_is_seeded_and_disjoint():
    a, b = split_three(50, 0.2, 0.2, seed=3), split_three(50, 0.2, 0.2, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sorted(np.concatenate(a).tolist()) == list(range(50)) and [len(s) for s in a] == [30, 10, 10]
    assert not np.array_equal(a[2], split_three(50, 0.2, 0.2, seed=4)[2])


@pytest.mark.parametrize("name", ["wbc_segmentation.yaml", "nuclei_segmentation.yaml"])
def test_shipped_configs_parse(name):
    model_args, data_args, training_args = parse_config(
        segment.Segment.arguments, ["--config", str(ROOT / "configs" / name)]
    )
    assert training_args.load_best_model_at_end and training_args.metric_for_best_model == "mean_dice"
    assert len(data_args.class_names) == len(set(data_args.class_map.values()))


def test_one_segment_task_takes_images_and_volumes():
    from hf_medmae.data.volumes import VolumeDataArguments

    (model_2d, data_2d, _), (model_3d, data_3d, _) = segment.TASK.arguments_for(2), segment.TASK.arguments_for(3)
    assert data_2d is segment.DataArguments and data_3d is VolumeDataArguments
    images, volumes = model_2d(), model_3d()
    assert (images.image_size, images.loss, images.sw_batch_size, images.unet_features[0]) == (64, "ce", 4, 32)
    assert not hasattr(volumes, "image_size")  # volumes are cropped to roi_size
    assert (volumes.loss, volumes.sw_batch_size, volumes.unet_features[0]) == ("dice_ce", 2, 16)
    assert model_3d(loss="ce").loss == "ce"  # a set value is kept
    assert model_3d().unet_features is not volumes.unet_features  # each run its own list


def test_no_overlays_asked_for_means_no_picture(tmp_path):
    from hf_medmae.segmentation.evaluation import write_test_report

    mask = np.zeros((8, 8), np.int64)
    mask[2:5, 2:5] = 1
    images = [np.zeros((3, 8, 8), np.float32)]
    metrics = write_test_report(tmp_path, [mask], [mask], images, ["bg", "cell"], num_overlays=0)
    assert metrics["mean_dice"] == 1.0 and (tmp_path / "test_metrics.json").is_file()
    assert not (tmp_path / "overlays.png").exists()
    write_test_report(tmp_path, [mask], [mask], images, ["bg", "cell"], num_overlays=1)
    assert (tmp_path / "overlays.png").is_file()


@pytest.mark.parametrize("dims", [2, 3])
def test_light_decoder_is_a_fraction_of_unetr_and_round_trips(tmp_path, dims):
    from hf_medmae.segmentation import MedSegConfig, MedSegForSegmentation

    vit = dict(image_size=16, patch_size=4, hidden_size=48, num_hidden_layers=2, num_attention_heads=2)
    vit.update(intermediate_size=64, num_channels=2)
    if dims == 3:
        vit.update(num_frames=16, tubelet_size=4)
    models = {
        name: MedSegForSegmentation(MedSegConfig(vit_config=vit, num_labels=3, spatial_dims=dims, decoder=name))
        for name in ("unetr", "light")
    }
    size = (2, 2, *(16,) * dims)
    logits = models["light"](torch.randn(size)).logits
    assert logits.shape == (2, 3, *(16,) * dims)
    params = {k: sum(p.numel() for p in m.decoder.parameters()) for k, m in models.items()}
    assert params["light"] < params["unetr"] / 2, params
    models["light"].save_pretrained(tmp_path)
    loaded = MedSegForSegmentation.from_pretrained(tmp_path)
    assert loaded.config.decoder == "light"
    x = torch.randn(size)
    torch.testing.assert_close(loaded.eval()(x).logits, models["light"].eval()(x).logits)


def test_frozen_encoder_warm_up_trains_the_decoder_first(tmp_path, wbc_dir, mae3, one_thread):
    from safetensors.torch import load_file

    encoder = {k: v for k, v in MedMAEForPreTraining.from_pretrained(mae3).vit.state_dict().items()}

    def run(freeze: int, name: str) -> dict:
        cfg = wbc_config(
            tmp_path / f"{name}.yaml", wbc_dir, model_name_or_path=str(mae3), max_images=24, max_steps=2,
            freeze_encoder_steps=freeze, decoder="light", eval_strategy="no", save_strategy="no",
            output_dir=str(tmp_path / name), num_overlays=0,
        )  # fmt: skip
        segment.main(["--config", cfg])
        return load_file(tmp_path / name / "model.safetensors")

    frozen, warm = run(2, "frozen"), run(1, "warm")
    for key, value in encoder.items():
        if key.startswith("embeddings.mask_token") or f"vit.{key}" not in frozen:
            continue
        assert torch.equal(frozen[f"vit.{key}"], value), key  # two steps, both frozen: the MAE's weights
    changed = [k for k in encoder if f"vit.{k}" in warm and not torch.equal(warm[f"vit.{k}"], encoder[k])]
    assert changed  # the second step trained the encoder too
    assert any(not torch.equal(frozen[k], warm[k]) for k in frozen if k.startswith("decoder."))
