#!/usr/bin/env python
"""Fine-tune a segmenter (UNETR on an MAE encoder, or a U-Net baseline) on image + mask pairs.

    python run_segmentation.py --config configs/wbc_segmentation.yaml
    python run_segmentation.py --config configs/nuclei_segmentation.yaml --init scratch --output_dir outputs/nuclei-scratch
    python run_segmentation.py --predict_only --model_name_or_path outputs/wbc-seg --predict_images big_images/ \
        --output_dir outputs/wbc-seg-predictions

The model is selected on validation mean Dice and scored on the test images (`test_metrics.json`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForSemanticSegmentation, Trainer, TrainingArguments, ViTImageProcessorPil, set_seed

from hf_medmae.cli import parse_config
from hf_medmae.data.io import list_image_files, read_image
from hf_medmae.data.pretraining import channel_stats, check_channels
from hf_medmae.data.segmentation import (
    CROP_MODES, PairAugment, SegmentationDataset, SegmentationPairs, covering_tiles, labelled_fraction, load_pairs,
    map_mask, parse_class_map, resize_pair, sparsify, split_three, subsample,
)
from hf_medmae.encoder import load_encoder
from hf_medmae.errors import ConfigError, DataError
from hf_medmae.hub import check_safetensors_weights
from hf_medmae.metrics import segmentation_compute_metrics_fn, segmentation_metrics, segmentation_preprocess_logits
from hf_medmae.optim import param_groups_layer_decay
from hf_medmae.plots import plot_confusion_matrix, plot_segmentation_overlays
from hf_medmae.segmentation import (
    UNET_MULTIPLE, MedSegConfig, MedSegForSegmentation, build_config, build_unet_baseline, encoder_fields, predict,
)
from hf_medmae.hub import push_run, take_over_push
from hf_medmae.performance import apply_fast_defaults
from hf_medmae.training import ProcessSeedCallback, check_writable, hardware_description, resolve_precision, resolve_resume, write_run_info

logger = logging.getLogger("run_segmentation")
INFERENCE_FILE = "inference_config.json"


@dataclass
class DataArguments:
    train_data: str = field(default="embedded:nuclei16", metadata={"help": "image folder (masks beside or in mask_dir), .npz (images, masks), embedded:nuclei16"})
    mask_dir: str | None = field(default=None, metadata={"help": "folder of the masks; default: the image folder"})
    image_glob: str = field(default="*", metadata={"help": "which files of the folder are images, e.g. *.bmp"})
    mask_pattern: str = field(default="{stem}.png", metadata={"help": "mask file name of an image; {stem}, {name}"})
    class_map: dict | None = field(default=None, metadata={"help": "raw mask value -> class id, e.g. {0: 0, 128: 1, 255: 2}"})
    class_names: list[str] | None = field(default=None, metadata={"help": "one name per class id"})
    ignore_index: int = field(default=255, metadata={"help": "label of unlabeled pixels after mapping"})
    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int | None = field(default=None, metadata={"help": "seed of the image split; default: seed"})
    train_fraction: float = field(default=1.0, metadata={"help": "seeded share of the training images used"})
    label_fraction_pixels: float = field(default=1.0, metadata={"help": "seeded share of labelled pixels kept per training image (sparse labels)"})
    max_images: int | None = None
    crop_mode: str = field(default="resize", metadata={"help": "resize (whole image) | random_crop (image_size windows)"})
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    num_overlays: int = field(default=4, metadata={"help": "images drawn in overlays.png"})
    display_channels: list[int] | None = field(default=None, metadata={"help": "channels shown in overlays (1 or 3)"})
    predict_images: str | None = field(default=None, metadata={"help": "image file or folder to segment by sliding window"})
    predict_output_dir: str | None = field(default=None, metadata={"help": "default: output_dir/predictions"})


@dataclass
class ModelArguments:
    model: str = field(default="unetr", metadata={"help": "unetr (ViT encoder + UNETR decoder) | unet (MONAI BasicUNet baseline)"})
    init: str = field(default="mae", metadata={"help": "mae (encoder weights of the checkpoint) | scratch (same architecture, random)"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "MAE/ViT checkpoint (dir or Hub id); with predict_only a run_segmentation output"})
    image_size: int = 64
    feature_size: int = 16
    skip_layers: list[int] | None = None
    loss: str = field(default="ce", metadata={"help": "ce (sparse labels ok) | dice_ce (dense labels)"})
    class_weights: list[float] | None = None
    layer_decay: float | None = field(default=None, metadata={"help": "encoder lr decay per block; default 0.75 for init mae, 1.0 for scratch"})
    unet_features: list[int] = field(default_factory=lambda: [32, 32, 64, 128, 256, 32])
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on capable GPUs) | bf16 | fp32"})
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    predict_only: bool = field(default=False, metadata={"help": "skip training: segment predict_images with model_name_or_path"})


@dataclass
class SegmentationTrainingArguments(TrainingArguments):
    metric_for_best_model: str | None = field(default="mean_dice", metadata={"help": "validation metric that selects the model"})


def check_model_args(args: ModelArguments) -> None:
    if args.model not in ("unetr", "unet") or args.init not in ("mae", "scratch"):
        raise ConfigError(f"model={args.model!r}, init={args.init!r} is not an option.", "use model: unetr | unet and init: mae | scratch.")
    if args.model == "unetr" and not args.model_name_or_path:
        raise ConfigError("model unetr needs model_name_or_path (its encoder architecture, and weights with init mae).",
                          "pass the folder written by run_mae.py, e.g. outputs/quickstart.")
    if args.model == "unet" and args.init == "mae":
        raise ConfigError("the U-Net baseline has no ViT encoder to take MAE weights.", "use init: scratch with model: unet.")
    if args.model == "unet" and args.image_size % UNET_MULTIPLE:
        raise ConfigError(f"image_size {args.image_size} is not divisible by {UNET_MULTIPLE} (the U-Net's stride).",
                          f"use a multiple of {UNET_MULTIPLE}, e.g. {max(UNET_MULTIPLE, args.image_size // UNET_MULTIPLE * UNET_MULTIPLE)}.")


def check_encoder(encoder, channels: int, source: str) -> None:
    if encoder.config.num_channels != channels:
        raise DataError(f"the checkpoint expects {encoder.config.num_channels}-channel images but {source} has {channels} channels.",
                        "use an encoder pre-trained on data with this channel count (run_mae.py on these images), or init: scratch with such a checkpoint.")


def load_labelled(data_args: DataArguments) -> tuple[SegmentationPairs, dict[int, int], list[str], int]:
    """Pairs with masks mapped to class ids, the class map, class names and the channel count."""
    class_map = parse_class_map(data_args.class_map, data_args.ignore_index)
    num_labels = len(set(class_map.values()) - {data_args.ignore_index})
    names = data_args.class_names or [f"class_{k}" for k in range(num_labels)]
    if len(names) != num_labels:
        raise ConfigError(f"class_names has {len(names)} entries but class_map defines {num_labels} classes.", "give one name per class id.")
    pairs = load_pairs(data_args.train_data, data_args.mask_dir, data_args.image_glob, data_args.mask_pattern, data_args.max_images)
    pairs.masks = [map_mask(m, class_map, name) for m, name in zip(pairs.masks, pairs.names)]
    return pairs, class_map, list(names), check_channels(pairs.images, data_args.train_data)


def split_pairs(pairs: SegmentationPairs, data_args: DataArguments, seed: int) -> tuple[SegmentationPairs, ...]:
    """Seeded train / validation / test split; train_fraction and sparse labels apply to train only."""
    split_seed = seed if data_args.split_seed is None else data_args.split_seed
    train_idx, val_idx, test_idx = split_three(len(pairs.images), data_args.validation_fraction, data_args.test_fraction, split_seed)
    train = pairs.subset(subsample(train_idx, data_args.train_fraction, seed))
    # Validation and test stay dense, so scores compare across label budgets.
    train.masks = sparsify(train.masks, data_args.label_fraction_pixels, data_args.ignore_index, seed)
    return train, pairs.subset(val_idx), pairs.subset(test_idx)


def normalisation(model_args: ModelArguments, encoder, train: SegmentationPairs) -> tuple[list[float], list[float]]:
    """The encoder's own image_mean/std when fine-tuning MAE weights (its inputs were scaled so), else train stats."""
    if model_args.init == "mae" and encoder is not None and encoder.image_mean is not None:
        if len(encoder.image_mean) != train.images[0].shape[0]:
            raise DataError(f"the checkpoint's image_mean has {len(encoder.image_mean)} entries for {train.images[0].shape[0]}-channel data.",
                            "re-save the checkpoint's preprocessor_config.json with per-channel statistics of its data.")
        return list(encoder.image_mean), list(encoder.image_std)
    if model_args.init == "mae" and encoder is not None:
        logger.warning("the checkpoint has no image_mean/std; normalising with statistics of the training images")
    return channel_stats(train.images)


def build_datasets(splits, data_args: DataArguments, image_size: int, mean, std):
    train, val, test = splits
    augment = PairAugment(image_size, data_args.crop_mode, data_args.hflip, data_args.vflip, data_args.rot90)
    if data_args.crop_mode not in CROP_MODES:
        raise ConfigError(f"crop_mode={data_args.crop_mode!r} is not an option.", f"use one of {list(CROP_MODES)}.")
    if data_args.crop_mode == "random_crop":  # score every pixel at the training scale
        val, test = covering_tiles(val, image_size), covering_tiles(test, image_size)
    return tuple(SegmentationDataset(p, mean, std, image_size, a) for p, a in ((train, augment), (val, None), (test, None)))


def build_model(model_args: ModelArguments, encoder, channels: int, class_names: list[str], ignore_index: int):
    labels = dict(num_labels=len(class_names), id2label=dict(enumerate(class_names)), label2id={n: i for i, n in enumerate(class_names)})
    loss = dict(loss=model_args.loss, class_weights=model_args.class_weights, ignore_index=ignore_index)
    if model_args.model == "unet":
        return build_unet_baseline(channels, features=tuple(model_args.unet_features), **labels, **loss)
    decoder = dict(feature_size=model_args.feature_size, skip_layers=model_args.skip_layers)
    if model_args.init == "mae":
        return MedSegForSegmentation.from_encoder(encoder, **labels, **loss, **decoder)
    config = build_config(MedSegConfig, vit_config=encoder_fields(encoder.config), **labels, **loss, **decoder)
    return MedSegForSegmentation(config)  # same architecture as the checkpoint, random weights


def optimizer_for(model, model_args: ModelArguments, args: TrainingArguments):
    """AdamW over layer-decay groups for ViT segmenters (Trainer's default optimiser for the U-Net)."""
    if model_args.model != "unetr":
        return None
    decay = model_args.layer_decay if model_args.layer_decay is not None else (0.75 if model_args.init == "mae" else 1.0)
    groups = param_groups_layer_decay(model, args.learning_rate, args.weight_decay, decay)
    return torch.optim.AdamW, {"params": groups, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_config((ModelArguments, DataArguments, SegmentationTrainingArguments), argv)
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING)
    check_writable(training_args.output_dir)
    if model_args.predict_only:
        return predict_only(model_args, data_args, training_args.output_dir)
    check_model_args(model_args)
    set_seed(training_args.seed)
    pairs, class_map, class_names, channels = load_labelled(data_args)
    encoder = None
    if model_args.model == "unetr":  # raises ConfigError when image_size is not a multiple of the patch size
        encoder = load_encoder(model_args.model_name_or_path, image_size=model_args.image_size)
        check_encoder(encoder, channels, data_args.train_data)
    splits = split_pairs(pairs, data_args, training_args.seed)
    mean, std = normalisation(model_args, encoder, splits[0])
    train_ds, val_ds, test_ds = build_datasets(splits, data_args, model_args.image_size, mean, std)
    model = build_model(model_args, encoder, channels, class_names, data_args.ignore_index)
    resolve_precision(training_args, model_args.precision)
    apply_fast_defaults(training_args)
    push = take_over_push(training_args)  # we push once at the end, with our model card
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_ds, eval_dataset=val_ds,
        callbacks=[ProcessSeedCallback()],
        compute_metrics=segmentation_compute_metrics_fn(class_names, data_args.ignore_index),
        preprocess_logits_for_metrics=segmentation_preprocess_logits,  # keeps [N, H, W] ids, not [N, K, H, W] logits
        optimizer_cls_and_kwargs=optimizer_for(model, model_args, training_args),
    )
    logger.info("training %s (%s) on %d images (%.1f%% of pixels labelled), validating on %d, testing on %d",
                model_args.model, model_args.init, len(train_ds), 100 * labelled_fraction(splits[0].masks, data_args.ignore_index),
                len(val_ds), len(test_ds))
    train_result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    trainer.save_model()
    val_out = trainer.predict(val_ds, metric_key_prefix="eval")
    test_out = trainer.predict(test_ds, metric_key_prefix="test")
    metrics = {**train_result.metrics, **val_out.metrics, **test_out.metrics}
    metrics.update(best_checkpoint=trainer.state.best_model_checkpoint, best_validation_metric=trainer.state.best_metric,
                   num_train_images=len(train_ds), labelled_pixel_fraction=labelled_fraction(splits[0].masks, data_args.ignore_index),
                   hardware=hardware_description())
    if trainer.is_world_process_zero():
        scale = training_scale(splits[0], model_args.image_size, data_args.crop_mode)
        save_outputs(training_args.output_dir, test_out, val_out, (val_ds, test_ds), class_names, data_args, (mean, std))
        save_inference_config(training_args.output_dir, model_args, data_args, class_map, class_names, scale)
        trainer.save_metrics("all", metrics)
        write_run_info(training_args, str(data_args.train_data), len(train_ds), {**metrics, "global_step": trainer.state.global_step})
        push_run(training_args, push)
        if data_args.predict_images:
            out = data_args.predict_output_dir or f"{training_args.output_dir}/predictions"
            predict_files(trainer.model, data_args.predict_images, out, (mean, std), model_args, scale)
    return metrics


def save_outputs(output_dir: str, test_out, val_out, datasets, class_names: list[str], data_args: DataArguments, norm) -> dict:
    """test_metrics.json (full metrics with HD95), preprocessor_config.json, confusion matrix and overlay PNGs."""
    ignore = data_args.ignore_index
    test_metrics = segmentation_metrics(np.asarray(test_out.predictions), np.asarray(test_out.label_ids), class_names, ignore)
    Path(output_dir, "test_metrics.json").write_text(json.dumps(test_metrics, indent=2))
    mean, std = norm
    ViTImageProcessorPil(do_resize=False, do_rescale=False, image_mean=mean, image_std=std).save_pretrained(output_dir)
    plot_confusion_matrix(np.asarray(test_metrics["confusion_matrix"]), class_names, f"{output_dir}/confusion_matrix.png",
                          title="Test pixels")
    for name, out, ds in (("overlays.png", test_out, datasets[1]), ("overlays_validation.png", val_out, datasets[0])):
        n = min(data_args.num_overlays, len(ds))
        images = torch.stack([ds[i]["pixel_values"] for i in range(n)]).numpy()
        plot_segmentation_overlays(images, np.asarray(out.label_ids[:n]), np.asarray(out.predictions[:n]), f"{output_dir}/{name}",
                                   class_names, ignore, channels=data_args.display_channels)
    return test_metrics


def training_scale(train: SegmentationPairs, image_size: int, crop_mode: str) -> float:
    """Pixel scale the model was trained at: image_size / typical image side when images were resized, else 1."""
    if crop_mode == "random_crop":
        return 1.0
    return float(image_size / np.median([max(im.shape[1:]) for im in train.images]))


def save_inference_config(output_dir: str, model_args, data_args, class_map, class_names, scale: float) -> None:
    values = dict(model=model_args.model, image_size=model_args.image_size, scale=scale, crop_mode=data_args.crop_mode,
                  class_map={str(k): v for k, v in class_map.items()}, class_names=class_names, ignore_index=data_args.ignore_index)
    Path(output_dir, INFERENCE_FILE).write_text(json.dumps(values, indent=2))


def predict_files(model, source: str, output_dir: str, norm, model_args: ModelArguments, scale: float = 1.0) -> list[str]:
    """Segment every image of `source` (file or folder) by sliding window; write class-id PNGs.

    Images are rescaled by `scale` (the training scale), segmented in image_size tiles blended with
    `sw_overlap`, and the label map is resized back (nearest) to the original size.
    """
    files = [Path(source)] if Path(source).is_file() else list_image_files(source)
    if not files:
        raise DataError(f"no images found in {source}.", "point predict_images at an image file or a folder of images.")
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in norm)
    device = next(model.parameters()).device
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for path in files:
        image = (torch.from_numpy(read_image(path)) - mean) / std
        h, w = image.shape[1:]
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        scaled, _ = resize_pair(image, torch.zeros(h, w, dtype=torch.long), size)
        labels = predict(model, scaled[None].to(device), model_args.image_size, model_args.sw_batch_size, model_args.sw_overlap)[0].cpu()
        _, labels = resize_pair(scaled, labels, (h, w))
        target = Path(output_dir, f"{path.stem}_labels.png")
        Image.fromarray(labels.numpy().astype(np.uint8)).save(target)
        written.append(str(target))
    logger.info("wrote %d label maps (class ids) to %s", len(written), output_dir)
    return written


def predict_only(model_args: ModelArguments, data_args: DataArguments, output_dir: str) -> dict:
    """Segment `predict_images` with a model saved by this script (no training)."""
    folder = Path(model_args.model_name_or_path or "")
    if not data_args.predict_images or not (folder / INFERENCE_FILE).is_file():
        raise ConfigError("predict_only needs predict_images and a model_name_or_path written by run_segmentation.py "
                          f"(with {INFERENCE_FILE}).", "pass --model_name_or_path OUTPUT_DIR_OF_A_RUN --predict_images FOLDER.")
    check_safetensors_weights(folder)  # a folder with only pytorch_model.bin is refused by name, never unpickled
    info = json.loads((folder / INFERENCE_FILE).read_text())
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    model = AutoModelForSemanticSegmentation.from_pretrained(folder, use_safetensors=True).eval()
    model_args.image_size = info["image_size"]
    written = predict_files(model, data_args.predict_images, data_args.predict_output_dir or output_dir,
                            (processor["image_mean"], processor["image_std"]), model_args, info["scale"])
    return {"num_predictions": len(written), "class_names": info["class_names"]}


if __name__ == "__main__":
    print(json.dumps(main(), indent=2, default=str))
