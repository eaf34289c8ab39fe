"""Pre-train a masked autoencoder (`run_mae.py`, `medmae-pretrain`): the 2D MAE on images, or with `spatial_dims: 3`
the 3D MAE on random crops of volumes (SelfMedMAE).

medmae-pretrain --config configs/quickstart.yaml
python run_mae.py --config configs/nuclei3d_mae.yaml                    # volumes
accelerate launch run_mae.py --config configs/seed001_model1_p4.yaml   # many GPUs, unchanged
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Literal

from ..arguments import MedTrainingArguments
from ..cli import dimension_view
from ..data.pretraining import (
    PretrainingDataset,
    image_channels,
    load_images,
    open_stream,
    pretraining_augment,
    read_supervision,
    streaming_dataset,
    validation_images,
    volume_pool,
)
from ..data.sources import ImageSource, sample_stats, skipped_files
from ..data.transforms import Augment, PhotometricArguments, image_processor
from ..data.volumes import VolumeDataArguments, geometry_report, volume_crops
from ..evaluation.reconstruction import reconstruction_metrics, save_reconstructions
from ..performance import choose_attention
from ..pretraining import build_mae
from ..training import AttentionRefreshCallback, EpochCallback, LossTermsCallback, SampleIdRecorder
from .run import Task, TaskSetup, console

logger = logging.getLogger(__name__)

# ModelArguments fields of one dimension's runs only, and the 3D runs' own defaults (`cli.dimension_view`)
ONLY = {
    2: ("image_size", "num_channels", "supervised_loss_weight", "class_weighting", "attn_implementation"),
    3: ("tubelet_size",),
}
DEFAULTS = {3: {"decoder_hidden_size": 96, "decoder_intermediate_size": 384}}


@dataclass
class DataArguments(PhotometricArguments):
    train_data: str = field(
        default="embedded:nuclei16",
        metadata={"help": "folder, .npy/.npz, hf:<dataset>[::split], or embedded:nuclei16"},
    )
    file_pattern: str = field(default="*", metadata={"help": 'only files matching this name pattern, e.g. "*.bmp"'})
    validation_data: str | None = field(
        default=None, metadata={"help": "separate validation source; else split off train_data"}
    )
    validation_fraction: float = field(
        default=0.1, metadata={"help": "share of images (before tiling) held out for validation"}
    )
    tile_size: int | None = field(
        default=None, metadata={"help": "cut images into tiles of this side first (e.g. 64)"}
    )
    max_images: int | None = field(default=None, metadata={"help": "read at most this many images"})
    on_bad_file: Literal["error", "skip"] = field(
        default="error", metadata={"help": "error | skip (skipped files are counted and reported)"}
    )
    crop_scale: list[float] = field(
        default_factory=lambda: [0.2, 1.0], metadata={"help": "random resized crop area range"}
    )
    hflip: bool = True
    vflip: bool = True
    rot90: bool = False
    reconstruction_channels: list[int] | None = field(
        default=None, metadata={"help": "1 channel (grey) or 3 (RGB) shown in the reconstruction PNG"}
    )
    reconstruction_view: Literal["channels", "mean"] = field(
        default="channels",
        metadata={
            "help": "channels: show reconstruction_channels | mean: the average of all channels "
            "(a z-projection of a z-stack, "
            "which averages out photon noise)"
        },
    )
    in_memory: bool = field(
        default=False,
        metadata={
            "help": "read the whole pool into memory first (small pools of slow-to-decode files); "
            "default: read each image when used"
        },
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "hf: sources only: stream the pool with datasets' IterableDataset (pools larger than the disk); "
            "needs max_steps "
            "and a separate validation_data (or validation_fraction: 0)"
        },
    )
    shuffle_buffer: int = field(
        default=256,
        metadata={
            "help": "streaming: images in the shuffle buffer "
            "(it holds them decoded: about 8 bytes per pixel and channel each)"
        },
    )
    image_column: str | None = field(
        default=None,
        metadata={"help": "hf: sources: the column with the images (default: image, img or pixel_values)"},
    )
    stats_sample_size: int | None = field(
        default=1000,
        metadata={
            "help": "per-channel mean/std from a seeded sample of this many training images (tiles); null: all of them"
        },
    )
    record_sample_ids: bool = field(
        default=False, metadata={"help": "write the training sample ids each process saw (sharding check)"}
    )
    labels_csv: str | None = field(
        default=None,
        metadata={
            "help": "MSMAE's supervised head (supervised_loss_weight > 0): class labels for all or part of a "
            "train_data folder, in run_classification.py's CSV format (id_column, label_column, filename_template, "
            "label_offset, label_map); "
            "images without a row are unlabeled"
        },
    )
    id_column: str = field(default="filename", metadata={"help": "labels_csv: the column with the file name or id"})
    label_column: str = field(
        default="label", metadata={"help": "labels_csv: the column with the class (name or integer)"}
    )
    filename_template: str | None = field(
        default=None, metadata={"help": "labels_csv: id -> file name, e.g. '{id:03d}.bmp'"}
    )
    class_names: list[str] | None = field(
        default=None, metadata={"help": "labels_csv: class order; default: sorted labels"}
    )
    label_offset: int = field(
        default=0, metadata={"help": "labels_csv: subtracted from integer labels (1 for classes 1..K)"}
    )
    label_map: dict | None = field(
        default=None, metadata={"help": "labels_csv: {raw CSV value: class name or integer}"}
    )
    label_fraction: float = field(
        default=1.0,
        metadata={
            "help": "labels_csv: a seeded, class-stratified share of its rows kept "
            "(the rest of the images are unlabeled), "
            "to pre-train with labels for part of the pool"
        },
    )


@dataclass
class ModelArguments:
    """The MAE of a 2D or a 3D run; `ONLY` names the fields of one dimension, `DEFAULTS` the 3D defaults."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "continue from an MAE checkpoint (dir or Hub id; a 3D MAE for volumes)"}
    )
    image_size: int = field(default=64, metadata={"help": "side of the model input (volumes: roi_size)"})
    patch_size: int = field(default=8, metadata={"help": "patch side (volumes: in-plane)"})
    tubelet_size: int | None = field(
        default=None,
        metadata={"help": "patch depth; default patch_size (cubic patches, which UNETR needs)"},
    )
    num_channels: int | None = field(default=None, metadata={"help": "default: taken from the data"})
    hidden_size: int = 192
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    intermediate_size: int = 768
    decoder_hidden_size: int = field(default=128, metadata={"help": "volumes: default 96"})
    decoder_num_hidden_layers: int = 2
    decoder_num_attention_heads: int = 4
    decoder_intermediate_size: int = field(default=512, metadata={"help": "volumes: default 384"})
    layer_norm_eps: float = 1e-6
    # Masking and loss: unset = the MAE defaults (MASKING_DEFAULTS) for a new MAE, and the checkpoint's own values when
    # continuing from model_name_or_path; set = this run's, also over a checkpoint's (see `apply_recipe`).
    norm_pix_loss: bool | None = field(default=None, metadata={"help": "default true; continuing: the checkpoint's"})
    mask_ratio: float | None = field(default=None, metadata={"help": "default 0.75; continuing: the checkpoint's"})
    mask_generator: str | None = field(default=None, metadata={"help": "default random; continuing: the checkpoint's"})
    mask_generator_kwargs: dict | None = None
    throw_ratio: float | None = field(default=None, metadata={"help": "default 0; continuing: the checkpoint's"})
    attention_refresh_epochs: float = 5.0
    supervised_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "MSMAE: weight of the cross-entropy of a linear head on the masked pass's CLS token, beside the "
            "reconstruction (needs labels_csv; MSMAE uses 0.1); 0 = plain MAE",
        },
    )
    class_weighting: Literal["none", "balanced"] = field(
        default="none",
        metadata={
            "help": "supervised head: none | balanced (inverse class frequency over the labelled training images)",
        },
    )
    attn_implementation: Literal["auto", "sdpa", "eager"] = field(
        default="auto",
        metadata={"help": "auto (sdpa on GPU; on CPU the faster of sdpa/eager, measured) | sdpa | eager"},
    )


IMAGE_MODEL_ARGUMENTS, VOLUME_MODEL_ARGUMENTS = (dimension_view(ModelArguments, d, ONLY, DEFAULTS) for d in (2, 3))


@dataclass
class PretrainState:
    """What `Pretrain.report` needs again from the setup.

    Args:
        facts: values reported as they are (training images or crops, the normalisation sample, volumes).
        skipped: the files left out while indexing the pool.
        sources: the image pools whose files skipped at read time are reported too (None: volumes).
    """

    facts: dict
    skipped: list[str] = field(default_factory=list)
    sources: tuple[ImageSource, ...] | None = None


class Pretrain(Task):
    """Self pre-training of an MAE: the 2D MAE on images (`DataArguments`), or the 3D MAE on random crops of the
    training volumes (`VolumeDataArguments`, chosen by `spatial_dims: 3`)."""

    arguments = (IMAGE_MODEL_ARGUMENTS, DataArguments, MedTrainingArguments)

    def arguments_for(self, spatial_dims: int) -> tuple:
        if spatial_dims == 3:
            return (VOLUME_MODEL_ARGUMENTS, VolumeDataArguments, MedTrainingArguments)
        return self.arguments

    def setup(
        self, model_args, data_args: DataArguments | VolumeDataArguments, args: MedTrainingArguments
    ) -> TaskSetup[PretrainState]:
        self.data_args = data_args  # the closing hint suggests the next step for this data
        if isinstance(data_args, VolumeDataArguments):
            setup = self.setup_volumes(model_args, data_args, args)
        elif data_args.streaming:
            setup = self.setup_stream(model_args, data_args, args)
        else:
            setup = self.setup_images(model_args, data_args, args)
        # keep sample_ids for the attention generator and labels for the head; evaluation needs only the loss
        return dataclasses.replace(setup, keep_columns=True, loss_only_eval=True)

    def setup_images(
        self, model_args, data_args: DataArguments, args: MedTrainingArguments
    ) -> TaskSetup[PretrainState]:
        train_images, val_images, skipped = load_images(data_args, args.seed)
        channels = image_channels(train_images, val_images, data_args)
        supervision = read_supervision(data_args, model_args, train_images, val_images, args.seed)
        model = build_mae(model_args, channels, supervision=supervision)
        config, size = model.config, model_args.image_size
        mean, std, stats_images = sample_stats(train_images, data_args.stats_sample_size, args.seed)
        attention = config.mask_generator == "attention"
        if attention:
            # The maps are of the whole un-augmented images (`plain` below), so a training view must keep every patch
            # where its map has it: no random resized crop; flips and 90-degree turns permute whole patches, and the
            # model turns each map along with its view (`view_ids`).
            logger.info("attention masking: the random resized crop is off (crop_scale is not used)")
        labels = {"train": supervision.train, "val": supervision.val} if supervision else {}
        train = PretrainingDataset(
            train_images,
            mean,
            std,
            size,
            pretraining_augment(size, data_args, channels, crop=not attention),
            seed=args.seed,
            # per-image masks: the same whatever the process count
            mask_noise_patches=config.num_patches if config.mask_generator == "random" else 0,
            labels=labels.get("train"),
            defer_views=args.augment_on_device,  # normalise, flip and turn on the GPU (`MedTrainer`)
        )
        # validation ids would look up the *training* images' attention maps (the bank's keys): random masks instead
        val = (
            PretrainingDataset(val_images, mean, std, size, labels=labels.get("val"), with_ids=not attention)
            if len(val_images)
            else None
        )
        callbacks = [EpochCallback(train)]
        if attention:
            plain = PretrainingDataset(
                train_images, mean, std, size, Augment(size, crop=False, hflip=False, vflip=False)
            )
            callbacks.append(AttentionRefreshCallback(plain, every_epochs=model_args.attention_refresh_epochs))
        if supervision:
            callbacks.append(LossTermsCallback())
        if data_args.record_sample_ids:
            callbacks.append(SampleIdRecorder())
        if model_args.attn_implementation == "auto":
            choose_attention(model.to(args.device), args.per_device_train_batch_size)
        logger.info(
            "training on %d images (%d channels), validating on %d; lr %.3g",
            len(train),
            channels,
            len(val or []),
            args.learning_rate,
        )
        facts = {
            "num_train_images": len(train),
            "normalisation_sample_images": stats_images,
            "labelled_train_images": int((supervision.train >= 0).sum()) if supervision else None,
        }
        state = PretrainState(facts, skipped, (train_images, val_images))
        processor = image_processor(channels, mean, std)
        return TaskSetup(model, train, val, processor, data_args.train_data, callbacks, extras=state)

    def setup_stream(
        self, model_args, data_args: DataArguments, args: MedTrainingArguments
    ) -> TaskSetup[PretrainState]:
        """`streaming: true`: a shuffled `datasets.IterableDataset`, sharded across processes by accelerate."""
        stream = open_stream(data_args, model_args, args.max_steps, args.seed)
        mean, std, size = stream.image_mean, stream.image_std, model_args.image_size
        model = build_mae(model_args, len(mean))
        augment = pretraining_augment(size, data_args, len(mean))
        train = streaming_dataset(
            stream.dataset, stream.column, mean, std, size, augment, data_args.tile_size, stream.name
        )
        val_images, skipped = validation_images(data_args)
        val = PretrainingDataset(val_images, mean, std, size) if val_images is not None and len(val_images) else None
        own_shards = train.n_shards >= int(os.environ.get("WORLD_SIZE", "1"))  # each process reads its own shards
        if model_args.attn_implementation == "auto":
            choose_attention(model.to(args.device), args.per_device_train_batch_size)
        logger.info(
            "streaming %s (%d shards, shuffle buffer %d); statistics from its first %d images",
            stream.name,
            train.n_shards,
            data_args.shuffle_buffer,
            stream.stats_images,
        )
        if args.resume_from_checkpoint not in (None, "", False, "false", "False"):
            logger.warning(
                "resuming a stream: the Trainer re-reads it (same seed, same order) up to the step it stopped at, so "
                "training continues at the right place; the augmentation and masks of what follows are drawn anew, "
                "so the run is not bit-identical to an uninterrupted one"
            )
        callbacks = [SampleIdRecorder()] if data_args.record_sample_ids else []
        state = PretrainState(
            {"num_train_images": None, "normalisation_sample_images": stream.stats_images},
            skipped,
            (val_images,) if val_images is not None else (),
        )
        processor = image_processor(len(mean), mean, std)
        return TaskSetup(
            model,
            train,
            val,
            processor,
            data_args.train_data,
            callbacks,
            dispatch_batches=False if own_shards else None,
            extras=state,
        )

    def setup_volumes(
        self, model_args, data_args: VolumeDataArguments, args: MedTrainingArguments
    ) -> TaskSetup[PretrainState]:
        train_volumes, val_volumes, normalisation = volume_pool(data_args, args.seed)
        model = build_mae(model_args, train_volumes.channels, tuple(data_args.roi_size))
        attention = model.config.mask_generator == "attention"  # maps must line up with the voxels: fixed crops
        train, val = volume_crops(train_volumes, val_volumes, data_args, args.seed, fixed=attention)
        if attention:
            callbacks = [AttentionRefreshCallback(train, every_epochs=model_args.attention_refresh_epochs)]
        else:
            callbacks = [EpochCallback(train)]
        val_names = val_volumes.names if val_volumes is not None else []
        logger.info(
            "pre-training on %d crops of %d volumes %s, validating on %d crops of %s",
            len(train),
            len(train_volumes),
            train_volumes.names,
            len(val or []),
            val_names,
        )
        geometry = geometry_report(train_volumes)
        if val_volumes is not None:
            geometry["volumes"].update(geometry_report(val_volumes)["volumes"])
        model.config.voxel_grid = geometry["voxel_grid"]  # config.json carries the grid the encoder learnt on
        model.config.normalisation = normalisation  # ... and the intensities
        facts = {
            "num_train_crops": len(train),
            "train_volumes": list(train_volumes.names),
            "intensity": data_args.intensity,
            "normalisation": normalisation,
            "roi_size": list(data_args.roi_size),
            **geometry,
        }
        processor = image_processor(train_volumes.channels)
        return TaskSetup(model, train, val, processor, data_args.train_data, callbacks, extras=PretrainState(facts))

    def report(self, trainer, setup: TaskSetup[PretrainState], model_args, data_args, is_main: bool) -> dict:
        trainer.save_model()
        args, model = trainer.args, setup.model
        metrics = trainer.evaluate() if setup.eval_dataset is not None else {}
        if setup.eval_dataset is not None:
            metrics.update(reconstruction_metrics(model, setup.eval_dataset, args.per_device_eval_batch_size))
        state = setup.extras
        metrics.update(state.facts, attn_implementation=model.config._attn_implementation)
        skipped = skipped_files(state.skipped, state.sources) if state.sources is not None else None
        if skipped is not None:
            metrics["num_skipped_files"] = len(skipped)
        if is_main:
            if skipped:
                logger.warning("skipped %d unreadable files: %s", len(skipped), skipped[:10])
            shown = setup.eval_dataset or setup.train_dataset
            if not hasattr(shown, "__len__"):  # a stream: its first images
                shown = list(itertools.islice(shown, 4))
            save_reconstructions(
                model,
                shown,
                args.output_dir,
                getattr(data_args, "reconstruction_channels", None),
                mean_view=getattr(data_args, "reconstruction_view", "channels") == "mean",
            )
        return metrics

    def next_step(self, data: DataArguments | VolumeDataArguments | None, output_dir: str) -> list[str]:
        """The fine-tuning that fits the run's data: segmentation for volumes, classification for a pool with
        labels_csv, segmentation for the embedded nuclei, and a template of either for other images."""
        tail = f"--model_name_or_path {output_dir}"
        unetr = f"--model unetr --init mae {tail}"  # some segmentation configs default to the U-Net
        if isinstance(data, VolumeDataArguments):
            name = "mni152" if "mni152" in data.train_data else "nuclei3d"
            more = "" if data.train_data.startswith("embedded:") else " --train_data <your labelled volumes>"
            return [f"  python run_segmentation.py --config configs/{name}_segmentation.yaml{more} {unetr}"]
        if data is not None and data.labels_csv:
            return [
                f"  python run_classification.py --config configs/wbc_classification.yaml --data_dir "
                f"{data.train_data!r} --labels_csv {data.labels_csv!r} {tail}",
                "  (set id_column, label_column and filename_template for your CSV as in that config)",
            ]
        if data is None or data.train_data == "embedded:nuclei16":
            return [f"  python run_segmentation.py --config configs/nuclei_segmentation.yaml {unetr}"]
        return [
            f"  python run_classification.py --config configs/wbc_classification.yaml --data_dir <labelled images> "
            f"--labels_csv <their labels> {tail}",
            f"  or: python run_segmentation.py --config configs/wbc_segmentation.yaml --train_data <images with "
            f"masks> {unetr}",
        ]

    def weights_from(self, model_args) -> str | None:
        return model_args.model_name_or_path  # set: this run continues that MAE

    def summary(self, metrics: dict, output_dir: str) -> str:
        lines = []
        if "eval_loss" in metrics and "eval_loss_mean_predictor" in metrics:
            loss = metrics.get("eval_reconstruction_loss", metrics["eval_loss"])
            base = metrics["eval_loss_mean_predictor"]
            verdict = (
                f"{1 - loss / base:.0%} lower: the model reconstructs structure from the visible patches"
                if loss < base
                else "not lower: the model has not learned more than the mean yet; train longer or check the "
                "learning rate"
            )
            lines.append(
                f"validation loss {loss:.4f}, against {base:.4f} for predicting the mean of every hidden patch "
                f"({verdict})"
            )
        lines += [
            f"outputs in {output_dir}: model.safetensors + config.json (the MAE), reconstruction.png, "
            "all_results.json",
            f"next: the encoder in Python, hf_medmae.load_encoder({output_dir!r}); or fine-tune it with",
            *self.next_step(getattr(self, "data_args", None), output_dir),
        ]
        return "\n".join(lines)


TASK = Pretrain()
main = TASK.main


def cli() -> None:
    """Console entry point `medmae-pretrain` (and `python run_mae.py`): metrics as JSON, or the problem and its fix."""
    console(TASK)


__all__ = [
    "DataArguments",
    "IMAGE_MODEL_ARGUMENTS",
    "ModelArguments",
    "Pretrain",
    "PretrainState",
    "TASK",
    "VOLUME_MODEL_ARGUMENTS",
    "cli",
    "main",
]
