"""3D segmentation: segment volumes with a 3D UNETR (or the 3D U-Net baseline); the 3D MAE is pre-trained by
`tasks/pretrain.py`'s `Pretrain`.

`run_segmentation.py` hands a config with `spatial_dims: 3` to this task:

    python run_mae.py --config configs/nuclei3d_mae.yaml
    python run_segmentation.py --config configs/nuclei3d_segmentation.yaml --model_name_or_path outputs/nuclei3d-mae

Volumes are split whole (no crop of a held-out volume is trained on), normalised one by one
(`normalise_intensity`), and trained on random ROI crops; validation uses fixed crops, the test volumes
are segmented whole by sliding windows and scored with Dice and HD95 (voxels) per class.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers import ViTImageProcessorPil

from ..arguments import MedTrainingArguments
from ..data.segmentation import labelled_fraction, parse_class_map, sparsify
from ..data.volumes import (
    VolumeDataArguments,
    VolumeDataset,
    VolumeSet,
    prepare_volumes,
    split_for,
    volume_augment,
)
from ..encoder import load_encoder
from ..errors import ConfigError, DataError
from ..metrics import segmentation_compute_metrics_fn, segmentation_metrics, segmentation_preprocess_logits
from ..optim import optimizer_for
from ..plots import plot_confusion_matrix, plot_volume_overlays
from ..segmentation import MedSegConfig, MedSegForSegmentation, build_unet_baseline, encoder_fields, predict
from ..segmentation.configuration import UNET_MULTIPLE
from ..segmentation.inference import save_inference_config
from ..training import EpochCallback
from .run import Task, TaskSetup

logger = logging.getLogger(__name__)


@dataclass
class Seg3DModelArguments:
    model: Literal["unetr", "unet"] = field(
        default="unetr", metadata={"help": "unetr (3D MAE encoder + UNETR) | unet (MONAI BasicUNet 3D)"}
    )
    init: Literal["mae", "scratch"] = "mae"
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "a 3D MAE checkpoint (its encoder; weights with init mae)"}
    )
    feature_size: int = 16
    skip_layers: list[int] | None = None
    loss: Literal["ce", "dice_ce"] = field(
        default="dice_ce", metadata={"help": "dice_ce (masked Dice with sparse labels) | ce"}
    )
    class_weights: list[float] | None = None
    layer_decay: float | None = field(default=None, metadata={"help": "default 0.75 for init mae, 1.0 for scratch"})
    unet_features: list[int] = field(default_factory=lambda: [16, 16, 32, 64, 128, 16])
    sw_batch_size: int = 2
    sw_overlap: float = 0.25


def _processor(channels: int) -> ViTImageProcessorPil:
    # Volumes are normalised one by one before cropping, so the model sees unit-scaled inputs: mean 0, std 1.
    return ViTImageProcessorPil(
        do_resize=False, do_rescale=False, do_normalize=False, image_mean=[0.0] * channels, image_std=[1.0] * channels
    )


class Segment3D(Task):
    """3D UNETR on the 3D MAE's encoder (or from scratch), or MONAI's 3D BasicUNet, on labelled volumes."""

    arguments = (Seg3DModelArguments, VolumeDataArguments, MedTrainingArguments)

    def setup(
        self, model_args: Seg3DModelArguments, data_args: VolumeDataArguments, args: MedTrainingArguments
    ) -> TaskSetup:
        data = prepare_volumes(data_args, labelled=True)
        class_map, names = labels_to_classes(data, data_args)
        train_idx, val_idx, test_idx = split_for(data, data_args, args.seed, data_args.test_volumes)
        if not val_idx or not test_idx:
            raise ConfigError(
                "3D segmentation selects on validation volumes and scores on test volumes.",
                "set validation_volumes and test_volumes to at least 1.",
            )
        train, val, test = data.subset(train_idx), data.subset(val_idx), data.subset(test_idx)
        train.labels = sparsify(train.labels, data_args.label_fraction_voxels, data_args.ignore_index, args.seed)
        roi = tuple(data_args.roi_size)
        model = build_segmenter_3d(model_args, data.channels, roi, names, data_args.ignore_index)
        train_ds = VolumeDataset(
            train,
            roi,
            volume_augment(data_args, data_args.ignore_index),
            data_args.samples_per_volume,
            args.seed,
            data_args.ignore_index,
            with_ids=False,
        )
        val_ds = VolumeDataset(val, roi, ignore_index=data_args.ignore_index, with_ids=False)
        fraction = labelled_fraction(train.labels, data_args.ignore_index)
        logger.info(
            "training %s (%s) on crops of %s (%.1f%% of voxels labelled), validating on %s, testing on %s",
            model_args.model,
            model_args.init,
            train.names,
            100 * fraction,
            val.names,
            test.names,
        )
        trainer_kwargs = dict(
            compute_metrics=segmentation_compute_metrics_fn(names, data_args.ignore_index),
            preprocess_logits_for_metrics=segmentation_preprocess_logits,
            optimizer_cls_and_kwargs=optimizer_for(model, model_args, args),
        )
        state = dict(
            test=test,
            class_names=names,
            class_map=class_map,
            fraction=fraction,
            split=(train.names, val.names, test.names),
        )
        return TaskSetup(
            model,
            train_ds,
            val_ds,
            _processor(data.channels),
            data_args.train_data,
            [EpochCallback(train_ds)],
            trainer_kwargs=trainer_kwargs,
            select_on="mean_dice",
            state=state,
        )

    def report(
        self, trainer, setup: TaskSetup, model_args: Seg3DModelArguments, data_args: VolumeDataArguments, is_main: bool
    ) -> dict:
        trainer.save_model()
        state, out_dir, test = setup.state, trainer.args.output_dir, setup.state["test"]
        device = trainer.args.device
        images = [torch.from_numpy(np.ascontiguousarray(v))[None].to(device) for v in test.volumes]
        preds = [
            predict(trainer.model, x, tuple(data_args.roi_size), model_args.sw_batch_size, model_args.sw_overlap)[0]
            .cpu()
            .numpy()
            for x in images
        ]
        test_metrics = volume_metrics(preds, test.labels, state["class_names"], data_args.ignore_index)
        metrics = {
            **trainer.evaluate(),
            **{f"test_{k}": v for k, v in test_metrics.items() if isinstance(v, (int, float)) or v is None},
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "labelled_voxel_fraction": state["fraction"],
            "train_volumes": state["split"][0],
            "validation_volumes": state["split"][1],
            "test_volumes": state["split"][2],
        }
        if is_main:
            Path(out_dir, "test_metrics.json").write_text(
                json.dumps({**test_metrics, "test_volumes": test.names}, indent=2, default=str)
            )
            plot_confusion_matrix(
                np.asarray(test_metrics["confusion_matrix"]),
                state["class_names"],
                f"{out_dir}/confusion_matrix.png",
                title="Test voxels",
            )
            plot_volume_overlays(
                test.volumes,
                test.labels,
                preds,
                f"{out_dir}/overlays.png",
                state["class_names"],
                data_args.ignore_index,
                names=test.names,
            )
            save_inference_config(
                out_dir,
                model=model_args.model,
                spatial_dims=3,
                roi_size=list(data_args.roi_size),
                intensity=data_args.intensity,
                window=data_args.window,
                percentiles=data_args.percentiles,
                foreground_threshold=data_args.foreground_threshold,
                class_names=state["class_names"],
                class_map={str(k): v for k, v in state["class_map"].items()},
                ignore_index=data_args.ignore_index,
            )
        return metrics

    def summary(self, metrics: dict, output_dir: str) -> str:
        dice = metrics.get("test_mean_dice")
        lines = [f"test mean Dice {dice:.3f} (whole test volumes, sliding windows)"] if isinstance(dice, float) else []
        return "\n".join(
            lines + [f"outputs in {output_dir}: the segmenter, test_metrics.json, confusion_matrix.png, overlays.png"]
        )


def labels_to_classes(data: VolumeSet, data_args: VolumeDataArguments) -> tuple[dict[int, int], list[str]]:
    """Map raw label values to class ids (`class_map`; default: the values already are ids 0..K-1)."""
    if data_args.class_map is None:
        values = sorted({int(v) for m in data.labels for v in np.unique(m)} - {data_args.ignore_index})
        k = len(data_args.class_names) if data_args.class_names else (max(values) + 1 if values else 0)
        if not values or values[0] < 0 or values[-1] >= k:
            raise DataError(
                f"label values {values[:10]} are not class ids 0..{k - 1}.",
                "set class_map: {raw value: class id} (and class_names), or save labels as 0..K-1.",
            )
        class_map = {i: i for i in range(k)}
    else:
        class_map = parse_class_map(data_args.class_map, data_args.ignore_index)
        to_ids = partial(_map_labels, lookup={**class_map, data_args.ignore_index: data_args.ignore_index})
        data.labels = data.labels.map(to_ids) if data.lazy else [to_ids(m) for m in data.labels]
    k = len(set(class_map.values()))
    names = list(data_args.class_names or [f"class_{i}" for i in range(k)])
    if len(names) != k:
        raise ConfigError(f"class_names has {len(names)} entries for {k} classes.", "give one name per class id.")
    return class_map, names


def _map_labels(labels: np.ndarray, lookup: dict[int, int]) -> np.ndarray:
    """Raw values -> class ids through a sorted lookup table; a value missing from `class_map` is a DataError."""
    bad = sorted(set(np.unique(labels).tolist()) - set(lookup))
    if bad:
        raise DataError(f"label values {bad[:10]} are missing from class_map {lookup}.", "add them to class_map.")
    keys = np.array(sorted(lookup))
    return np.array([lookup[k] for k in keys], dtype=np.int64)[np.searchsorted(keys, labels)]


def build_segmenter_3d(
    model_args: Seg3DModelArguments, channels: int, roi: tuple[int, int, int], names: list[str], ignore_index: int
):
    labels = dict(num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    loss = dict(loss=model_args.loss, class_weights=model_args.class_weights, ignore_index=ignore_index)
    if model_args.model == "unet":
        if model_args.init == "mae" or any(s % UNET_MULTIPLE for s in roi):
            raise ConfigError(
                f"the 3D U-Net trains from scratch on crops that are multiples of {UNET_MULTIPLE} (got {list(roi)}).",
                f"use init: scratch and a roi_size of multiples of {UNET_MULTIPLE}, e.g. [32, 64, 64].",
            )
        return build_unet_baseline(
            channels, spatial_dims=3, features=tuple(model_args.unet_features), **labels, **loss
        )
    if not model_args.model_name_or_path:
        raise ConfigError(
            "model unetr needs model_name_or_path: the 3D MAE whose encoder it uses.",
            "pass the folder written by run_mae.py with a 3D config, e.g. outputs/nuclei3d-mae.",
        )
    encoder = load_encoder(model_args.model_name_or_path)
    if getattr(encoder.config, "num_frames", None) is None:
        raise ConfigError(
            f"{model_args.model_name_or_path} is a 2D encoder.",
            "pre-train a 3D MAE (run_mae.py with spatial_dims: 3).",
        )
    if encoder.config.num_channels != channels or list(encoder.config.volume_size) != list(roi):
        raise DataError(
            f"the encoder takes {encoder.config.num_channels}-channel crops of {list(encoder.config.volume_size)}; "
            f"the data has {channels} channels and roi_size {list(roi)}.",
            f"set roi_size: {list(encoder.config.volume_size)} (the 3D positions are made for it).",
        )
    decoder = dict(feature_size=model_args.feature_size, skip_layers=model_args.skip_layers)
    if model_args.init == "mae":
        return MedSegForSegmentation.from_encoder(encoder, **labels, **loss, **decoder)
    config = MedSegConfig(vit_config=encoder_fields(encoder.config, 3), spatial_dims=3, **labels, **loss, **decoder)
    return MedSegForSegmentation(config)  # the same architecture, random weights


def volume_metrics(
    preds: list[np.ndarray], labels: list[np.ndarray], class_names: list[str], ignore_index: int
) -> dict:
    """Dice / IoU pooled over every labelled test voxel; HD95 (voxels) per volume and class, averaged over volumes."""
    pooled = segmentation_metrics(
        np.concatenate([p.ravel() for p in preds])[None, None],
        np.concatenate([t.ravel() for t in labels])[None, None],
        class_names,
        ignore_index,
        hd95=False,
    )
    per_volume = [segmentation_metrics(p[None], t[None], class_names, ignore_index) for p, t in zip(preds, labels)]
    hd = {
        name: [
            m["hd95_per_class"][name]
            for m in per_volume
            if m.get("hd95_per_class") and m["hd95_per_class"][name] is not None
        ]
        for name in class_names
    }
    pooled["hd95_per_class"] = {name: float(np.mean(v)) if v else None for name, v in hd.items()}
    values = [v for v in pooled["hd95_per_class"].values() if v is not None]
    pooled["hd95"] = float(np.mean(values)) if values else None
    pooled["dice_per_volume"] = [m["mean_dice"] for m in per_volume]
    return pooled


SEGMENT_3D = Segment3D()

__all__ = [
    "SEGMENT_3D",
    "Seg3DModelArguments",
    "Segment3D",
    "VolumeDataArguments",
    "prepare_volumes",
    "split_for",
    "volume_metrics",
]
