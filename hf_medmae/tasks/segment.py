"""Fine-tune a segmenter (UNETR on an MAE encoder, or a U-Net baseline) on image + mask pairs
(`run_segmentation.py`, `medmae-segment`).

    medmae-segment --config configs/wbc_segmentation.yaml
    medmae-segment --config configs/nuclei_segmentation.yaml --init scratch --output_dir outputs/nuclei-scratch
    medmae-segment --predict_only --model_name_or_path outputs/wbc-seg --predict_images big_images/ \
        --output_dir outputs/wbc-seg-predictions

The model is selected on validation mean Dice and scored on the test images (`test_metrics.json`).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from transformers import ViTImageProcessorPil

from ..arguments import MedTrainingArguments
from ..cli import spatial_dims
from ..data.segmentation import (
    SegmentationDataset,
    SegmentationPairs,
    covering_tiles,
    labelled_fraction,
    load_pairs,
    map_mask,
    parse_class_map,
    sparsify,
)
from ..data.splits import split_three, subsample
from ..data.transforms import PairAugment, check_channels
from ..encoder import load_encoder
from ..errors import ConfigError, DataError
from ..metrics import segmentation_compute_metrics_fn, segmentation_metrics, segmentation_preprocess_logits
from ..optim import optimizer_for
from ..plots import plot_confusion_matrix, plot_segmentation_overlays
from ..segmentation import (
    UNET_MULTIPLE,
    MedSegConfig,
    MedSegForSegmentation,
    build_unet_baseline,
    encoder_fields,
    load_segmenter,
    predict_files,
    save_inference_config,
    training_scale,
)
from .run import Task, TaskSetup, console, encoder_normalisation

logger = logging.getLogger(__name__)


@dataclass
class DataArguments:
    train_data: str = field(
        default="embedded:nuclei16",
        metadata={"help": "image folder (masks beside or in mask_dir), .npz (images, masks), embedded:nuclei16"},
    )
    mask_dir: str | None = field(default=None, metadata={"help": "folder of the masks; default: the image folder"})
    image_glob: str = field(default="*", metadata={"help": "which files of the folder are images, e.g. *.bmp"})
    mask_pattern: str = field(default="{stem}.png", metadata={"help": "mask file name of an image; {stem}, {name}"})
    class_map: dict | None = field(
        default=None, metadata={"help": "raw mask value -> class id, e.g. {0: 0, 128: 1, 255: 2}"}
    )
    class_names: list[str] | None = field(default=None, metadata={"help": "one name per class id"})
    ignore_index: int = field(default=255, metadata={"help": "label of unlabeled pixels after mapping"})
    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int | None = field(default=None, metadata={"help": "seed of the image split; default: seed"})
    train_fraction: float = field(default=1.0, metadata={"help": "seeded share of the training images used"})
    label_fraction_pixels: float = field(
        default=1.0, metadata={"help": "seeded share of labelled pixels kept per training image (sparse labels)"}
    )
    max_images: int | None = None
    crop_mode: Literal["resize", "random_crop"] = field(
        default="resize", metadata={"help": "resize (whole image) | random_crop (image_size windows)"}
    )
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    num_overlays: int = field(default=4, metadata={"help": "images drawn in overlays.png"})
    display_channels: list[int] | None = field(default=None, metadata={"help": "channels shown in overlays (1 or 3)"})
    predict_images: list[str] | None = field(
        default=None,
        metadata={
            "help": "image files or folders to segment by sliding window, "
            "one set each (several sets: one sub-folder of the output per set)"
        },
    )
    predict_mask_dirs: list[str] | None = field(
        default=None,
        metadata={
            "help": "predict_only: one mask folder per predict_images set "
            "('' for none); scores that set's label maps (another site's data)"
        },
    )
    predict_output_dir: str | None = field(
        default=None, metadata={"help": "default: output_dir/predictions (predict_only: output_dir)"}
    )


@dataclass
class ModelArguments:
    model: Literal["unetr", "unet"] = field(
        default="unetr", metadata={"help": "unetr (ViT encoder + UNETR decoder) | unet (MONAI BasicUNet baseline)"}
    )
    init: Literal["mae", "scratch"] = field(
        default="mae",
        metadata={"help": "mae (encoder weights of the checkpoint) | scratch (same architecture, random)"},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "MAE/ViT checkpoint (dir or Hub id); with predict_only a run_segmentation output"},
    )
    image_size: int = 64
    feature_size: int = 16
    skip_layers: list[int] | None = None
    loss: Literal["ce", "dice_ce"] = field(
        default="ce", metadata={"help": "ce (sparse labels ok) | dice_ce (dense labels)"}
    )
    class_weights: list[float] | None = None
    layer_decay: float | None = field(
        default=None, metadata={"help": "encoder lr decay per block; default 0.75 for init mae, 1.0 for scratch"}
    )
    unet_features: list[int] = field(default_factory=lambda: [32, 32, 64, 128, 256, 32])
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    predict_only: bool = field(
        default=False, metadata={"help": "skip training: segment predict_images with model_name_or_path"}
    )


def check_model_args(args: ModelArguments) -> None:
    if args.model == "unetr" and not args.model_name_or_path:
        raise ConfigError(
            "model unetr needs model_name_or_path (its encoder architecture, and weights with init mae).",
            "pass the folder written by run_mae.py, e.g. outputs/quickstart.",
        )
    if args.model == "unet" and args.init == "mae":
        raise ConfigError(
            "the U-Net baseline has no ViT encoder to take MAE weights.", "use init: scratch with model: unet."
        )
    if args.model == "unet" and args.image_size % UNET_MULTIPLE:
        raise ConfigError(
            f"image_size {args.image_size} is not divisible by {UNET_MULTIPLE} (the U-Net's stride).",
            f"use a multiple of {UNET_MULTIPLE}, e.g. {max(UNET_MULTIPLE, args.image_size // UNET_MULTIPLE * UNET_MULTIPLE)}.",
        )


def load_labelled(data_args: DataArguments) -> tuple[SegmentationPairs, dict[int, int], list[str], int]:
    """Pairs with masks mapped to class ids, the class map, class names and the channel count."""
    class_map = parse_class_map(data_args.class_map, data_args.ignore_index)
    num_labels = len(set(class_map.values()) - {data_args.ignore_index})
    names = data_args.class_names or [f"class_{k}" for k in range(num_labels)]
    if len(names) != num_labels:
        raise ConfigError(
            f"class_names has {len(names)} entries but class_map defines {num_labels} classes.",
            "give one name per class id.",
        )
    pairs = load_pairs(
        data_args.train_data, data_args.mask_dir, data_args.image_glob, data_args.mask_pattern, data_args.max_images
    )
    pairs.masks = [map_mask(m, class_map, name) for m, name in zip(pairs.masks, pairs.names)]
    return pairs, class_map, list(names), check_channels(pairs.images, data_args.train_data)


def split_pairs(pairs: SegmentationPairs, data_args: DataArguments, seed: int) -> tuple[SegmentationPairs, ...]:
    """Seeded train / validation / test split; train_fraction and sparse labels apply to train only."""
    split_seed = seed if data_args.split_seed is None else data_args.split_seed
    train_idx, val_idx, test_idx = split_three(
        len(pairs.images), data_args.validation_fraction, data_args.test_fraction, split_seed
    )
    train = pairs.subset(subsample(train_idx, data_args.train_fraction, seed))
    # Validation and test stay dense, so scores compare across label budgets.
    train.masks = sparsify(train.masks, data_args.label_fraction_pixels, data_args.ignore_index, seed)
    return train, pairs.subset(val_idx), pairs.subset(test_idx)


def build_model(model_args: ModelArguments, encoder, channels: int, class_names: list[str], ignore_index: int):
    labels = dict(
        num_labels=len(class_names),
        id2label=dict(enumerate(class_names)),
        label2id={n: i for i, n in enumerate(class_names)},
    )
    loss = dict(loss=model_args.loss, class_weights=model_args.class_weights, ignore_index=ignore_index)
    if model_args.model == "unet":
        return build_unet_baseline(channels, features=tuple(model_args.unet_features), **labels, **loss)
    decoder = dict(feature_size=model_args.feature_size, skip_layers=model_args.skip_layers)
    if model_args.init == "mae":
        return MedSegForSegmentation.from_encoder(encoder, **labels, **loss, **decoder)
    return MedSegForSegmentation(
        MedSegConfig(vit_config=encoder_fields(encoder.config), **labels, **loss, **decoder)
    )  # random weights


class Segment(Task):
    arguments = (ModelArguments, DataArguments, MedTrainingArguments)

    def predict(self, model_args: ModelArguments, data_args: DataArguments, args: MedTrainingArguments) -> dict:
        return predict_only(model_args, data_args, args.output_dir)

    def setup(self, model_args: ModelArguments, data_args: DataArguments, args: MedTrainingArguments) -> TaskSetup:
        check_model_args(model_args)
        pairs, class_map, class_names, channels = load_labelled(data_args)
        encoder = None
        if model_args.model == "unetr":  # raises ConfigError when image_size is not a multiple of the patch size
            encoder = load_encoder(model_args.model_name_or_path, image_size=model_args.image_size)
            if encoder.config.num_channels != channels:
                raise DataError(
                    f"the checkpoint expects {encoder.config.num_channels}-channel images but {data_args.train_data} has {channels} channels.",
                    "use an encoder pre-trained on data with this channel count (run_mae.py on these images), or init: scratch with such a checkpoint.",
                )
        train, val, test = split_pairs(pairs, data_args, args.seed)
        mean, std = encoder_normalisation(encoder, model_args.init, train.images)
        if data_args.crop_mode == "random_crop":  # score every pixel at the training scale
            val, test = covering_tiles(val, model_args.image_size), covering_tiles(test, model_args.image_size)
        augment = PairAugment(
            model_args.image_size, data_args.crop_mode, data_args.hflip, data_args.vflip, data_args.rot90
        )
        train_ds, val_ds, test_ds = (
            SegmentationDataset(p, mean, std, model_args.image_size, a)
            for p, a in ((train, augment), (val, None), (test, None))
        )
        model = build_model(model_args, encoder, channels, class_names, data_args.ignore_index)
        fraction = labelled_fraction(train.masks, data_args.ignore_index)
        logger.info(
            "training %s (%s) on %d images (%.1f%% of pixels labelled), validating on %d, testing on %d",
            model_args.model,
            model_args.init,
            len(train_ds),
            100 * fraction,
            len(val_ds),
            len(test_ds),
        )
        trainer_kwargs = dict(
            compute_metrics=segmentation_compute_metrics_fn(class_names, data_args.ignore_index),
            preprocess_logits_for_metrics=segmentation_preprocess_logits,  # [N, H, W] ids, not [N, K, H, W] logits
            optimizer_cls_and_kwargs=optimizer_for(model, model_args, args),
        )
        processor = ViTImageProcessorPil(do_resize=False, do_rescale=False, image_mean=mean, image_std=std)
        scale = training_scale([max(im.shape[1:]) for im in train.images], model_args.image_size, data_args.crop_mode)
        state = dict(
            test=test_ds,
            class_names=class_names,
            class_map=class_map,
            fraction=fraction,
            scale=scale,
            norm=(mean, std),
        )
        return TaskSetup(
            model,
            train_ds,
            val_ds,
            processor,
            str(data_args.train_data),
            trainer_kwargs=trainer_kwargs,
            select_on="mean_dice",
            state=state,
        )

    def summary(self, metrics: dict, output_dir: str) -> str:
        if "num_predictions" in metrics:
            return f"{metrics['num_predictions']} label maps (class ids {metrics['class_names']}) in {output_dir}"
        lines = (
            [f"test mean Dice {metrics['test_mean_dice']:.3f}"]
            if isinstance(metrics.get("test_mean_dice"), float)
            else []
        )
        lines += [
            f"outputs in {output_dir}: the segmenter, test_metrics.json, confusion_matrix.png, overlays.png",
            f"next: segment new images with  python run_segmentation.py --predict_only --model_name_or_path {output_dir} "
            "--predict_images FOLDER --output_dir OUT",
        ]
        return "\n".join(lines)

    def report(
        self, trainer, setup: TaskSetup, model_args: ModelArguments, data_args: DataArguments, is_main: bool
    ) -> dict:
        trainer.save_model()  # the selected (best-on-validation) model
        state, out_dir = setup.state, trainer.args.output_dir
        val_out = trainer.predict(setup.eval_dataset, metric_key_prefix="eval")
        test_out = trainer.predict(state["test"], metric_key_prefix="test")
        metrics = {
            **val_out.metrics,
            **test_out.metrics,
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "best_validation_metric": trainer.state.best_metric,
            "num_train_images": len(setup.train_dataset),
            "labelled_pixel_fraction": state["fraction"],
        }
        if is_main:
            save_outputs(
                out_dir, test_out, val_out, (setup.eval_dataset, state["test"]), state["class_names"], data_args
            )
            save_inference_config(
                out_dir,
                model=model_args.model,
                image_size=model_args.image_size,
                scale=state["scale"],
                crop_mode=data_args.crop_mode,
                class_map={str(k): v for k, v in state["class_map"].items()},
                class_names=state["class_names"],
                ignore_index=data_args.ignore_index,
            )
            for source, target in prediction_sets(
                data_args.predict_images, data_args.predict_output_dir or f"{out_dir}/predictions"
            ):
                predict_files(
                    trainer.model,
                    source,
                    target,
                    state["norm"],
                    model_args.image_size,
                    state["scale"],
                    model_args.sw_batch_size,
                    model_args.sw_overlap,
                )
        return metrics


def save_outputs(
    output_dir: str, test_out, val_out, datasets, class_names: list[str], data_args: DataArguments
) -> dict:
    """test_metrics.json (full metrics with HD95), confusion matrix and overlay PNGs."""
    ignore = data_args.ignore_index
    test_metrics = segmentation_metrics(
        np.asarray(test_out.predictions), np.asarray(test_out.label_ids), class_names, ignore
    )
    Path(output_dir, "test_metrics.json").write_text(json.dumps(test_metrics, indent=2))
    plot_confusion_matrix(
        np.asarray(test_metrics["confusion_matrix"]),
        class_names,
        f"{output_dir}/confusion_matrix.png",
        title="Test pixels",
    )
    for name, out, ds in (("overlays.png", test_out, datasets[1]), ("overlays_validation.png", val_out, datasets[0])):
        n = min(data_args.num_overlays, len(ds))
        images = torch.stack([ds[i]["pixel_values"] for i in range(n)]).numpy()
        plot_segmentation_overlays(
            images,
            np.asarray(out.label_ids[:n]),
            np.asarray(out.predictions[:n]),
            f"{output_dir}/{name}",
            class_names,
            ignore,
            channels=data_args.display_channels,
        )
    return test_metrics


def prediction_sets(sources: list[str] | None, output_dir: str) -> list[tuple[str, str]]:
    """(set, folder its label maps go to): `output_dir` itself for one set, `output_dir/<set name>` for several."""
    sources = sources or []
    return [(src, output_dir if len(sources) == 1 else str(Path(output_dir, Path(src).stem))) for src in sources]


def predict_only(model_args: ModelArguments, data_args: DataArguments, output_dir: str) -> dict:
    """Segment each `predict_images` set with a model saved by this task (no training); score the sets that
    have masks (`predict_mask_dirs`) and list them in `external_metrics.csv`."""
    if not data_args.predict_images or not model_args.model_name_or_path:
        raise ConfigError(
            "predict_only needs predict_images and a model_name_or_path written by run_segmentation.py.",
            "pass --model_name_or_path OUTPUT_DIR_OF_A_RUN --predict_images FOLDER [FOLDER ...].",
        )
    masks = data_args.predict_mask_dirs or [""] * len(data_args.predict_images)
    if len(masks) != len(data_args.predict_images):
        raise ConfigError(
            f"{len(masks)} predict_mask_dirs for {len(data_args.predict_images)} predict_images sets.",
            "give one mask folder per set, in the same order ('' for a set without masks).",
        )
    model, info, norm = load_segmenter(model_args.model_name_or_path)
    out_dir = data_args.predict_output_dir or output_dir
    written, rows = 0, []
    for (source, target), mask_dir in zip(prediction_sets(data_args.predict_images, out_dir), masks):
        written += len(
            predict_files(
                model,
                source,
                target,
                norm,
                info["image_size"],
                info["scale"],
                model_args.sw_batch_size,
                model_args.sw_overlap,
                pattern=data_args.image_glob,
            )
        )
        if mask_dir:  # a labelled set from elsewhere: score the label maps against its masks
            rows.append({"set": Path(source).stem, **score_label_maps(source, mask_dir, target, data_args, info)})
    if rows:
        with Path(out_dir, "external_metrics.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return {"num_predictions": written, "class_names": info["class_names"], "sets": rows}


def score_label_maps(source: str, mask_dir: str, out_dir: str, data_args: DataArguments, info: dict) -> dict:
    """test_metrics.json, confusion matrix and overlays of `predict_files`' label maps against the set's own masks,
    mapped with the class map the model was trained with (so the raw mask values must mean the same)."""
    pairs = load_pairs(source, mask_dir, data_args.image_glob, data_args.mask_pattern)
    class_map, names, ignore = (
        {int(k): v for k, v in info["class_map"].items()},
        info["class_names"],
        info["ignore_index"],
    )
    truth = [map_mask(m, class_map, name) for m, name in zip(pairs.masks, pairs.names)]
    preds = [
        np.asarray(Image.open(Path(out_dir, f"{Path(name).stem}_labels.png")), dtype=np.int64) for name in pairs.names
    ]
    same_size = len({t.shape for t in truth}) == 1
    if same_size:  # [N, H, W]: per-image HD95 too
        metrics = segmentation_metrics(np.stack(preds), np.stack(truth), names, ignore)
    else:  # images of several sizes: pixel metrics over all of them, no HD95
        metrics = segmentation_metrics(
            np.concatenate([p.ravel() for p in preds])[None, None],
            np.concatenate([t.ravel() for t in truth])[None, None],
            names,
            ignore,
            hd95=False,
        )
    metrics.update(data=source, masks=mask_dir, num_images=len(truth))
    Path(out_dir, "test_metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    plot_confusion_matrix(
        np.asarray(metrics["confusion_matrix"]), names, f"{out_dir}/confusion_matrix.png", title="Predicted pixels"
    )
    if same_size:
        n = min(data_args.num_overlays, len(truth))
        images = np.stack([pairs.images[i] for i in range(n)]).astype(np.float32)
        plot_segmentation_overlays(
            images,
            np.stack(truth[:n]),
            np.stack(preds[:n]),
            f"{out_dir}/overlays.png",
            names,
            ignore,
            channels=data_args.display_channels,
        )
    return {
        "images": len(truth),
        "mean_dice": metrics["mean_dice"],
        "pixel_accuracy": metrics["pixel_accuracy"],
        **{f"dice_{name}": metrics["dice_per_class"][name] for name in names},
    }


TASK = Segment()


def main(argv: list[str] | None = None) -> dict:
    """Run from a command line (`argv`, default sys.argv): the 3D task when `spatial_dims: 3`, else this one."""
    from .volumes import SEGMENT_3D

    return (SEGMENT_3D if spatial_dims(argv) == 3 else TASK).main(argv)


def cli() -> None:
    """Console entry point `medmae-segment` (and `python run_*.py`): metrics as JSON, or the problem and its fix."""
    from .volumes import SEGMENT_3D

    console(SEGMENT_3D if spatial_dims() == 3 else TASK)


__all__ = ["DataArguments", "ModelArguments", "Segment", "cli", "load_labelled", "main", "predict_only", "split_pairs"]
