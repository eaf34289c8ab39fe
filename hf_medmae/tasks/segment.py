"""Fine-tune a segmenter (UNETR on an MAE encoder, or a U-Net baseline) on image + mask pairs, or on labelled
volumes with `spatial_dims: 3` (`run_segmentation.py`, `medmae-segment`).

    medmae-segment --config configs/wbc_segmentation.yaml
    medmae-segment --config configs/nuclei_segmentation.yaml --init scratch --output_dir outputs/nuclei-scratch
    medmae-segment --config configs/nuclei3d_segmentation.yaml --model unetr --init mae \
        --model_name_or_path outputs/nuclei3d_mae
    medmae-segment --predict_only --model_name_or_path outputs/wbc-seg --predict_images big_images/ \
        --output_dir outputs/wbc-seg-predictions

The model is selected on validation mean Dice and scored on the test images (`test_metrics.json`); volumes are split
whole, trained on random ROI crops, validated on fixed crops, and the test volumes segmented whole by sliding windows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from transformers import ViTImageProcessorPil

from ..arguments import MedTrainingArguments
from ..cli import dimension_view
from ..data.image_set import ImageSet
from ..data.segmentation import (
    SegmentationDataset,
    covering_tiles,
    labelled_fraction,
    load_labelled,
    sparsify,
    split_pairs,
)
from ..data.splits import subsample
from ..data.transforms import PairAugment, image_processor
from ..data.volumes import (
    VolumeDataArguments,
    geometry_report,
    normalise_volumes,
    prepare_volumes,
    split_for,
    volume_classes,
    volume_crops,
    voxel_spacings,
)
from ..errors import ConfigError
from ..metrics import segmentation_compute_metrics_fn, segmentation_preprocess_logits
from ..optim import optimizer_for
from ..segmentation import (
    build_segmenter,
    check_segmenter_choice,
    load_segmentation_encoder,
    predict_files,
    predict_volume_files,
    predict_volumes,
    prediction_sets,
    save_inference_config,
    save_overlays,
    score_label_maps,
    segment_sets,
    segment_volume_sets,
    training_scale,
    write_test_report,
)
from ..training import EpochCallback, FrozenEncoderWarmup
from .run import Task, TaskSetup, console, encoder_normalisation

logger = logging.getLogger(__name__)

# ModelArguments fields of 2D runs only, and the 3D runs' own defaults (`cli.dimension_view`)
ONLY = {2: ("image_size",)}
DEFAULTS = {3: dict(loss="dice_ce", unet_features=[16, 16, 32, 64, 128, 16], sw_batch_size=2)}


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
        default=None,
        metadata={
            "help": "raw mask value -> class id (or ignore), e.g. {0: 0, 128: 1, 255: 2}; others: the class id "
            "(or ignore) of every value not listed, e.g. {0: 0, 1: 1, 6: 2, others: 0}"
        },
    )
    class_names: list[str] | None = field(default=None, metadata={"help": "one name per class id"})
    ignore_index: int = field(default=255, metadata={"help": "label of unlabeled pixels after mapping"})
    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int | None = field(default=None, metadata={"help": "seed of the image split; default: seed"})
    train_fraction: float = field(default=1.0, metadata={"help": "seeded share of the training images used"})
    train_images: int | None = field(
        default=None,
        metadata={
            "help": "seeded number of labelled training images used (instead of train_fraction); one seed's "
            "smaller sets lie inside its larger ones"
        },
    )
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
        metadata={
            "help": "MAE/ViT checkpoint (dir or Hub id; a 3D MAE for volumes); with predict_only a run's output"
        },
    )
    image_size: int = field(default=64, metadata={"help": "the model's input side (volumes: roi_size)"})
    decoder: Literal["unetr", "light"] = field(
        default="unetr",
        metadata={
            "help": "model unetr: unetr (skips from the encoder and the image) | light (the last block upsampled "
            "with a few convolutions, no skips: Primus)"
        },
    )
    feature_size: int = 16
    skip_layers: list[int] | None = None
    freeze_encoder_steps: int = field(
        default=0,
        metadata={
            "help": "model unetr: train the decoder alone for this many steps, then everything (a frozen-encoder "
            "warm-up, as RETFound's linear-probe warm-up)"
        },
    )
    loss: Literal["ce", "dice_ce"] = field(
        default="ce",
        metadata={"help": "ce (sparse labels ok) | dice_ce (masked Dice with sparse labels); volumes: dice_ce"},
    )
    class_weights: list[float] | None = None
    layer_decay: float | None = field(
        default=None, metadata={"help": "encoder lr decay per block; default 0.75 for init mae, 1.0 for scratch"}
    )
    unet_features: list[int] = field(
        default_factory=lambda: [32, 32, 64, 128, 256, 32], metadata={"help": "BasicUNet's six widths; volumes: half"}
    )
    sw_batch_size: int = field(default=4, metadata={"help": "sliding windows per pass; volumes: 2"})
    sw_overlap: float = 0.25
    predict_only: bool = field(
        default=False,
        metadata={"help": "skip training: segment predict_images (volumes: predict_volumes) with model_name_or_path"},
    )


IMAGE_MODEL_ARGUMENTS, VOLUME_MODEL_ARGUMENTS = (dimension_view(ModelArguments, d, ONLY, DEFAULTS) for d in (2, 3))


@dataclass
class SegmentState:
    """What `Segment.report` needs again from the setup.

    Args:
        test: the test set: images as a `SegmentationDataset` (2D), the whole labelled volumes (3D).
        class_names: one name per class id.
        class_map: raw mask value -> class id, and `others` -> the class id of every value not listed (if given).
        fraction: the share of training pixels (voxels) that are labelled.
        scale: 2D: the pixel scale the model was trained at (`training_scale`), for predicting new images.
        norm: 2D: the normalisation (mean, std), for predicting new images.
        split: 3D: the names of the training, validation and test volumes.
        geometry: 3D: the voxel grid the model sees and each volume's stored geometry (`geometry_report`).
        normalisation: 3D: the intensity normalisation and its training statistics (`volumes.normalisation`).
    """

    test: SegmentationDataset | ImageSet
    class_names: list[str]
    class_map: dict[int | str, int]
    fraction: float
    scale: float | None = None
    norm: tuple[list[float], list[float]] | None = None
    split: tuple[list[str], list[str], list[str]] | None = None
    geometry: dict | None = None
    normalisation: dict | None = None


class Segment(Task):
    """UNETR on an MAE's encoder (or from scratch), or MONAI's BasicUNet, on 2D images or 3D volumes."""

    arguments = (IMAGE_MODEL_ARGUMENTS, DataArguments, MedTrainingArguments)

    def arguments_for(self, spatial_dims: int) -> tuple:
        return (
            (VOLUME_MODEL_ARGUMENTS, VolumeDataArguments, MedTrainingArguments)
            if spatial_dims == 3
            else self.arguments
        )

    @staticmethod
    def spatial_dims(data_args: DataArguments | VolumeDataArguments) -> int:
        """3 for volume data arguments, 2 for images."""
        return 3 if isinstance(data_args, VolumeDataArguments) else 2

    def predict(
        self, model_args: ModelArguments, data_args: DataArguments | VolumeDataArguments, args: MedTrainingArguments
    ) -> dict:
        if self.spatial_dims(data_args) == 3:
            return segment_volume_sets(
                model_args.model_name_or_path,
                data_args.predict_volumes,
                data_args.predict_output_dir or args.output_dir,
                data_args.predict_label_dirs,
                data_args.label_pattern,
                model_args.sw_batch_size,
                model_args.sw_overlap,
                data_args.series_uid,
            )
        return segment_sets(
            model_args.model_name_or_path,
            data_args.predict_images,
            data_args.predict_output_dir or args.output_dir,
            data_args.predict_mask_dirs,
            data_args.image_glob,
            data_args.mask_pattern,
            model_args.sw_batch_size,
            model_args.sw_overlap,
            data_args.num_overlays,
            data_args.display_channels,
        )

    def setup(
        self, model_args: ModelArguments, data_args: DataArguments | VolumeDataArguments, args: MedTrainingArguments
    ) -> TaskSetup[SegmentState]:
        dims = self.spatial_dims(data_args)
        size = tuple(data_args.roi_size) if dims == 3 else (model_args.image_size,) * 2
        check_segmenter_choice(model_args.model, model_args.init, model_args.model_name_or_path, size)
        data = (self.volume_data if dims == 3 else self.image_data)(model_args, data_args, args)
        model = build_segmenter(
            model_args.model,
            model_args.init,
            data.pop("encoder"),
            data["channels"],
            data["class_names"],
            dims,
            data_args.ignore_index,
            model_args.loss,
            model_args.class_weights,
            model_args.feature_size,
            model_args.skip_layers,
            model_args.unet_features,
            model_args.decoder,
        )
        if data.get("geometry"):
            model.config.voxel_grid = data["geometry"]["voxel_grid"]  # config.json carries the grid
            model.config.normalisation = data["normalisation"]  # ... and the intensities it learnt on
        train, val = data.pop("train"), data.pop("validation")
        logger.info(
            "training %s (%s) on %d %s (%.1f%% labelled), validating on %d, testing on %d",
            model_args.model,
            model_args.init,
            len(train),
            "crops" if dims == 3 else "images",
            100 * data["fraction"],
            len(val),
            len(data["test"]),
        )
        trainer_kwargs = dict(
            compute_metrics=segmentation_compute_metrics_fn(data["class_names"], data_args.ignore_index),
            preprocess_logits_for_metrics=segmentation_preprocess_logits,  # [N, ...] ids, not [N, K, ...] logits
            optimizer_cls_and_kwargs=optimizer_for(model, model_args, args),
        )
        callbacks = [EpochCallback(train)] if dims == 3 else []
        if model_args.freeze_encoder_steps:
            if model_args.model != "unetr" or args.world_size > 1:
                raise ConfigError(
                    "freeze_encoder_steps needs model: unetr (a ViT encoder) and one process.",
                    "set freeze_encoder_steps: 0 for the U-Net or for runs on several processes.",
                )
            callbacks.append(FrozenEncoderWarmup(model.vit, model_args.freeze_encoder_steps))
        return TaskSetup(
            model,
            train,
            val,
            data.pop("processor"),
            str(data_args.train_data),
            callbacks,
            trainer_kwargs=trainer_kwargs,
            select_on="mean_dice",
            extras=SegmentState(
                data["test"],
                data["class_names"],
                data["class_map"],
                data["fraction"],
                scale=data.get("scale"),
                norm=data.get("norm"),
                split=data.get("split"),
                geometry=data.get("geometry"),
                normalisation=data.get("normalisation"),
            ),
        )

    def image_data(self, model_args: ModelArguments, data_args: DataArguments, args: MedTrainingArguments) -> dict:
        """Image + mask pairs: split, normalised (the checkpoint's statistics with init mae), augmented."""
        pairs, class_map, class_names, channels = load_labelled(
            data_args.train_data,
            data_args.class_map,
            data_args.class_names,
            data_args.ignore_index,
            data_args.mask_dir,
            data_args.image_glob,
            data_args.mask_pattern,
            data_args.max_images,
        )
        size = (model_args.image_size,) * 2
        encoder = None
        if model_args.model == "unetr":
            encoder = load_segmentation_encoder(model_args.model_name_or_path, size, channels, data_args.train_data)
        train, val, test = split_pairs(
            pairs,
            data_args.validation_fraction,
            data_args.test_fraction,
            args.seed,
            data_args.split_seed,
            data_args.train_fraction,
            data_args.label_fraction_pixels,
            data_args.ignore_index,
            data_args.train_images,
        )
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
        return dict(
            encoder=encoder,
            channels=channels,
            train=train_ds,
            validation=val_ds,
            test=test_ds,
            class_names=class_names,
            class_map=class_map,
            fraction=labelled_fraction(train.labels, data_args.ignore_index),
            processor=ViTImageProcessorPil(do_resize=False, do_rescale=False, image_mean=mean, image_std=std),
            scale=training_scale(
                [max(im.shape[1:]) for im in train.images], model_args.image_size, data_args.crop_mode
            ),
            norm=(mean, std),
        )

    def volume_data(
        self, model_args: ModelArguments, data_args: VolumeDataArguments, args: MedTrainingArguments
    ) -> dict:
        """Labelled volumes: split whole, normalised (CT: the training foreground's statistics), random ROI crops to
        train, fixed crops to validate."""
        data = prepare_volumes(data_args, labelled=True)
        class_map, class_names = volume_classes(data, data_args)
        train_idx, val_idx, test_idx = split_for(data, data_args, args.seed, data_args.test_volumes)
        if not val_idx or not test_idx:
            raise ConfigError(
                "3D segmentation selects on validation volumes and scores on test volumes.",
                "set validation_volumes and test_volumes to at least 1.",
            )
        if data_args.train_volumes is not None:  # unset: the split's volumes in the split's order, as before
            train_idx = subsample(np.asarray(train_idx), 1.0, args.seed, data_args.train_volumes, "volumes").tolist()
        train, val, test = data.subset(train_idx), data.subset(val_idx), data.subset(test_idx)
        train.labels = sparsify(train.labels, data_args.label_fraction_voxels, data_args.ignore_index, args.seed)
        roi, ignore = tuple(data_args.roi_size), data_args.ignore_index
        (train, val, test), normalisation = normalise_volumes(data_args, train, val, test, ignore_index=ignore)
        encoder = None
        if model_args.model == "unetr":
            encoder = load_segmentation_encoder(
                model_args.model_name_or_path, roi, data.channels, data_args.train_data
            )
        train_crops, val_crops = volume_crops(train, val, data_args, args.seed, ignore_index=ignore, with_ids=False)
        return dict(
            encoder=encoder,
            channels=data.channels,
            train=train_crops,
            validation=val_crops,
            test=test,
            class_names=class_names,
            class_map=class_map,
            fraction=labelled_fraction(train.labels, ignore),
            processor=image_processor(data.channels),
            split=(train.names, val.names, test.names),
            geometry=geometry_report(data),
            normalisation=normalisation,
        )

    def report(
        self,
        trainer,
        setup: TaskSetup[SegmentState],
        model_args: ModelArguments,
        data_args: DataArguments | VolumeDataArguments,
        is_main: bool,
    ) -> dict:
        trainer.save_model()  # the selected (best-on-validation) model
        state, out_dir = setup.extras, trainer.args.output_dir
        names, ignore = state.class_names, data_args.ignore_index
        inference = dict(
            model=model_args.model,
            class_map={str(k): v for k, v in state.class_map.items()},
            class_names=names,
            ignore_index=ignore,
        )
        if self.spatial_dims(data_args) == 3:
            test = state.test
            roi = tuple(data_args.roi_size)
            preds = predict_volumes(trainer.model, test.images, roi, model_args.sw_batch_size, model_args.sw_overlap)
            spacing = voxel_spacings(test)  # surface distances in mm where the volumes store their geometry
            test_metrics = score_label_maps(preds, test.labels, names, ignore, spacing=spacing)
            if is_main:
                write_test_report(
                    out_dir,
                    preds,
                    test.labels,
                    test.images,
                    names,
                    ignore,
                    title="Test voxels",
                    names=test.names,
                    extra={"test_volumes": test.names},
                    metrics=test_metrics,
                )
                info = dict(
                    inference,
                    spatial_dims=3,
                    roi_size=list(roi),
                    **state.normalisation,
                    voxel_grid=state.geometry["voxel_grid"],
                    interpolation=data_args.interpolation,
                )
                save_inference_config(out_dir, **info)
                for source, target in prediction_sets(
                    data_args.predict_volumes, data_args.predict_output_dir or f"{out_dir}/predictions"
                ):
                    predict_volume_files(
                        trainer.model, info, source, target, model_args.sw_batch_size, model_args.sw_overlap
                    )
            return {
                **state.geometry,
                "normalisation": state.normalisation,
                **trainer.evaluate(),
                **{f"test_{k}": v for k, v in test_metrics.items() if isinstance(v, (int, float)) or v is None},
                "best_checkpoint": trainer.state.best_model_checkpoint,
                "labelled_voxel_fraction": state.fraction,
                "train_volumes": state.split[0],
                "validation_volumes": state.split[1],
                "test_volumes": state.split[2],
            }
        val_out = trainer.predict(setup.eval_dataset, metric_key_prefix="eval")
        test_out = trainer.predict(state.test, metric_key_prefix="test")
        if is_main:
            shown = {}
            for key, ds in (("test", state.test), ("validation", setup.eval_dataset)):
                shown[key] = [ds[i]["pixel_values"].numpy() for i in range(min(data_args.num_overlays, len(ds)))]
            write_test_report(
                out_dir,
                list(test_out.predictions),
                list(test_out.label_ids),
                shown["test"],
                names,
                ignore,
                num_overlays=data_args.num_overlays,
                display_channels=data_args.display_channels,
            )
            save_overlays(
                f"{out_dir}/overlays_validation.png",
                shown["validation"],
                list(val_out.label_ids),
                list(val_out.predictions),
                names,
                ignore,
                data_args.num_overlays,
                data_args.display_channels,
            )
            save_inference_config(
                out_dir,
                **inference,
                image_size=model_args.image_size,
                scale=state.scale,
                crop_mode=data_args.crop_mode,
            )
            for source, target in prediction_sets(
                data_args.predict_images, data_args.predict_output_dir or f"{out_dir}/predictions"
            ):
                predict_files(
                    trainer.model,
                    source,
                    target,
                    state.norm,
                    model_args.image_size,
                    state.scale,
                    model_args.sw_batch_size,
                    model_args.sw_overlap,
                )
        return {
            **val_out.metrics,
            **test_out.metrics,
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "best_validation_metric": trainer.state.best_metric,
            "num_train_images": len(setup.train_dataset),
            "labelled_pixel_fraction": state.fraction,
        }

    def weights_from(self, model_args) -> str | None:
        return model_args.model_name_or_path if model_args.model == "unetr" and model_args.init == "mae" else None

    def summary(self, metrics: dict, output_dir: str) -> str:
        if "num_predictions" in metrics:
            return f"{metrics['num_predictions']} label maps (class ids {metrics['class_names']}) in {output_dir}"
        volumes = "test_volumes" in metrics
        dice = metrics.get("test_mean_dice")
        where = " (whole test volumes, sliding windows)" if volumes else ""
        lines = [f"test mean Dice {dice:.3f}{where}"] if isinstance(dice, float) else []
        lines.append(f"outputs in {output_dir}: the segmenter, test_metrics.json, confusion_matrix.png, overlays.png")
        kind = "volumes" if volumes else "images"
        lines.append(
            f"next: segment new {kind} with  python run_segmentation.py --predict_only "
            + ("--spatial_dims 3 " if volumes else "")
            + f"--model_name_or_path {output_dir} --predict_{kind} FOLDER --output_dir OUT"
            + (" (one NIfTI label map per volume, in its own geometry)" if volumes else "")
        )
        return "\n".join(lines)


TASK = Segment()


def main(argv: list[str] | None = None) -> dict:
    """Run from a command line (`argv`, default sys.argv); `spatial_dims: 3` segments volumes."""
    return TASK.main(argv)


def cli() -> None:
    """Console entry point `medmae-segment` (and `python run_*.py`): metrics as JSON, or the problem and its fix."""
    console(TASK)


__all__ = ["DEFAULTS", "DataArguments", "ModelArguments", "Segment", "SegmentState", "TASK", "cli", "main"]
