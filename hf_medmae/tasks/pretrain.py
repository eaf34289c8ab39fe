"""Pre-train a masked autoencoder on unlabeled images (`run_mae.py`, `medmae-pretrain`).

medmae-pretrain --config configs/quickstart.yaml
accelerate launch run_mae.py --config configs/seed001_model1_p4.yaml   # many GPUs, unchanged
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
from transformers import ViTImageProcessorPil

from ..arguments import MedTrainingArguments
from ..classification import class_weights
from ..cli import spatial_dims
from ..configuration import MedMAEConfig
from ..data.classification import read_labels_csv
from ..data.io import item_to_chw, progress
from ..data.pretraining import PretrainingDataset, item_labels, load_source, streaming_dataset
from ..data.sources import (
    ImageSource,
    ListSource,
    TiledSource,
    base_items,
    open_hf_dataset,
    sample_stats,
    source_channels,
)
from ..data.sources import image_column as hf_image_column
from ..data.splits import label_subset, split_indices
from ..data.transforms import Augment, channel_moments
from ..errors import ConfigError, DataError
from ..loading import load_checkpoint
from ..masking import RandomMaskGenerator
from ..modeling_mae import RECIPE_FIELDS, MedMAEForPreTraining, apply_recipe, fresh_masking
from ..performance import choose_attention
from ..training import AttentionRefreshCallback, EpochCallback, LossTermsCallback, SampleIdRecorder
from .run import Task, TaskSetup, console

logger = logging.getLogger(__name__)


@dataclass
class DataArguments:
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
            "help": "channels: show reconstruction_channels | mean: the average of all channels (a z-projection of a z-stack, "
            "which averages out photon noise)"
        },
    )
    in_memory: bool = field(
        default=False,
        metadata={
            "help": "read the whole pool into memory first (small pools of slow-to-decode files); default: read each image when used"
        },
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "hf: sources only: stream the pool with datasets' IterableDataset (pools larger than the disk); needs max_steps "
            "and a separate validation_data (or validation_fraction: 0)"
        },
    )
    shuffle_buffer: int = field(
        default=256,
        metadata={
            "help": "streaming: images in the shuffle buffer (it holds them decoded: about 8 bytes per pixel and channel each)"
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
            "help": "MSMAE's supervised head (supervised_loss_weight > 0): class labels for all or part of a train_data folder, in "
            "run_classification.py's CSV format (id_column, label_column, filename_template, label_offset, label_map); "
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
            "help": "labels_csv: a seeded, class-stratified share of its rows kept (the rest of the images are unlabeled), "
            "to pre-train with labels for part of the pool"
        },
    )


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "continue from an MAE checkpoint (dir or Hub id)"}
    )
    image_size: int = 64
    patch_size: int = 8
    num_channels: int | None = field(default=None, metadata={"help": "default: taken from the data"})
    hidden_size: int = 192
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    intermediate_size: int = 768
    decoder_hidden_size: int = 128
    decoder_num_hidden_layers: int = 2
    decoder_num_attention_heads: int = 4
    decoder_intermediate_size: int = 512
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
            "reconstruction (needs labels_csv; MSMAE uses 0.1); 0 = plain MAE"
        },
    )
    class_weighting: Literal["none", "balanced"] = field(
        default="none",
        metadata={
            "help": "supervised head: none | balanced (inverse class frequency over the labelled training images)"
        },
    )
    attn_implementation: Literal["auto", "sdpa", "eager"] = field(
        default="auto",
        metadata={"help": "auto (sdpa on GPU; on CPU the faster of sdpa/eager, measured) | sdpa | eager"},
    )


def mae_config(model_args: ModelArguments, num_channels: int, **extra) -> MedMAEConfig:
    """The `MedMAEConfig` the arguments describe, for images of `num_channels` channels (`extra`: more config fields)."""
    keys = set(MedMAEConfig.__dataclass_fields__) & set(asdict(model_args)) - {"num_channels"} - set(extra) - set(
        RECIPE_FIELDS
    )
    return MedMAEConfig(
        num_channels=num_channels, **{k: getattr(model_args, k) for k in keys}, **fresh_masking(model_args), **extra
    )


@dataclass
class Supervision:
    """The labels of a supervised (MSMAE) pre-training: per item of the train and validation sources, -100 = unlabeled."""

    class_names: list[str]
    train: np.ndarray
    val: np.ndarray
    class_weights: list[float] | None = None

    def config_fields(self) -> dict:
        return dict(id2label=dict(enumerate(self.class_names)), class_weights=self.class_weights)


def read_supervision(
    data_args: DataArguments, model_args: ModelArguments, train: ImageSource, val: ImageSource, seed: int = 0
) -> Supervision | None:
    """The labels `labels_csv` gives the training (and validation) images, matched by file, checked for use."""
    if data_args.labels_csv is None:
        if model_args.supervised_loss_weight > 0:
            raise ConfigError(
                f"supervised_loss_weight={model_args.supervised_loss_weight} needs labels for the supervised head.",
                "give labels_csv (labels for all or part of train_data), or set supervised_loss_weight: 0.",
            )
        return None
    if model_args.supervised_loss_weight <= 0 and not model_args.model_name_or_path:
        raise ConfigError(
            "labels_csv is given but supervised_loss_weight is 0, so no label would be used.",
            "set supervised_loss_weight > 0 (MSMAE: 0.1) for the supervised head, or drop labels_csv.",
        )
    paths, labels, names = read_labels_csv(
        data_args.train_data,
        data_args.labels_csv,
        data_args.id_column,
        [data_args.label_column],
        data_args.filename_template,
        data_args.class_names,
        data_args.label_offset,
        data_args.label_map,
    )
    if data_args.label_fraction < 1:  # labels for part of the pool: the other rows are dropped, their images unlabeled
        kept = label_subset(np.asarray(labels), names, data_args.label_fraction, seed)
        paths, labels = [paths[i] for i in kept], [labels[i] for i in kept]
    by_file = {path.resolve(): int(label) for path, label in zip(paths, labels)}
    from_files = getattr(base_items(val)[0], "files", None) is not None  # a separate validation_data may be an array
    supervision = Supervision(
        names, item_labels(train, by_file), item_labels(val, by_file) if from_files else np.full(len(val), -100)
    )
    labelled = supervision.train[supervision.train >= 0]
    if not len(labelled):
        raise DataError(
            f"no training image of {data_args.train_data} has a row in {data_args.labels_csv}.",
            "check id_column and filename_template: they must name files of train_data.",
        )
    supervision.class_weights = class_weights(labelled, len(names), model_args.class_weighting)
    logger.info(
        "supervised head: %d of %d training items labelled, %s",
        len(labelled),
        len(supervision.train),
        {name: int((labelled == i).sum()) for i, name in enumerate(names)},
    )
    return supervision


def load_images(data_args: DataArguments, seed: int) -> tuple[ImageSource, ImageSource, list[str]]:
    """(train, validation, skipped files) as lazy sources: whole images split before tiling, so no tile of a
    validation image is trained on; tiles are an index into the images, not copies."""
    images, skipped = load_source(
        data_args.train_data,
        data_args.on_bad_file,
        data_args.max_images,
        pattern=data_args.file_pattern,
        image_column=data_args.image_column,
    )
    if not len(images):
        raise DataError(
            f"no images found in {data_args.train_data}.",
            "check train_data; supported: PNG/JPEG/BMP/TIFF folders, .npy/.npz, hf:, embedded:.",
        )
    if data_args.in_memory:
        files = getattr(images, "files", None)
        images = ListSource(
            [images[i] for i in progress(range(len(images)), desc="reading into memory", unit="image")]
        )
        images.files = files  # labels_csv matches its rows to these file names
    if data_args.validation_data:
        val, more = load_source(
            data_args.validation_data,
            data_args.on_bad_file,
            pattern=data_args.file_pattern,
            image_column=data_args.image_column,
        )
        train, skipped = images, skipped + more
    else:
        train_idx, val_idx = split_indices(len(images), data_args.validation_fraction, seed)
        train, val = images.subset(train_idx), images.subset(val_idx)
    if data_args.tile_size:
        train, val = TiledSource(train, data_args.tile_size), TiledSource(val, data_args.tile_size)
    return train, val, skipped


class Pretrain(Task):
    arguments = (ModelArguments, DataArguments, MedTrainingArguments)

    def setup(self, model_args: ModelArguments, data_args: DataArguments, args: MedTrainingArguments) -> TaskSetup:
        if data_args.streaming:
            return self.setup_stream(model_args, data_args, args)
        train_images, val_images, skipped = load_images(data_args, args.seed)
        channels = source_channels(train_images, data_args.train_data)
        if (
            len(val_images)
            and source_channels(val_images, data_args.validation_data or data_args.train_data) != channels
        ):
            raise DataError(
                f"the validation images have {source_channels(val_images, '')} channels, the training images {channels}.",
                "use validation data with the training data's channel count.",
            )
        supervision = read_supervision(data_args, model_args, train_images, val_images, args.seed)
        model = self.build_model(model_args, channels, supervision)
        config = model.config
        mean, std, stats_images = sample_stats(train_images, data_args.stats_sample_size, args.seed)
        random_masks = config.mask_generator == "random"  # per-image masks: the same whatever the process count
        if config.mask_generator == "attention":
            # The maps are of the whole un-augmented images (`plain` below), so a training view must keep every patch
            # where its map has it: no random resized crop; flips and 90-degree turns permute whole patches, and the
            # model turns each map along with its view (`view_ids`).
            augment = Augment(
                model_args.image_size, crop=False, hflip=data_args.hflip, vflip=data_args.vflip, rot90=data_args.rot90
            )
            logger.info(
                "attention masking: the random resized crop is off (crop_scale is not used); flips and rotations stay"
            )
        else:
            augment = Augment(
                model_args.image_size,
                tuple(data_args.crop_scale),
                hflip=data_args.hflip,
                vflip=data_args.vflip,
                rot90=data_args.rot90,
            )
        labels = {"train": supervision.train, "val": supervision.val} if supervision else {}
        train = PretrainingDataset(
            train_images,
            mean,
            std,
            model_args.image_size,
            augment,
            seed=args.seed,
            mask_noise_patches=config.num_patches if random_masks else 0,
            labels=labels.get("train"),
        )
        # validation ids would look up the *training* images' attention maps (the bank's keys): masks drawn at random instead
        val = (
            PretrainingDataset(
                val_images,
                mean,
                std,
                model_args.image_size,
                labels=labels.get("val"),
                with_ids=config.mask_generator != "attention",
            )
            if len(val_images)
            else None
        )
        callbacks = [EpochCallback(train)]
        if config.mask_generator == "attention":
            plain = PretrainingDataset(
                train_images,
                mean,
                std,
                model_args.image_size,
                Augment(model_args.image_size, crop=False, hflip=False, vflip=False),
            )
            callbacks.append(AttentionRefreshCallback(plain, every_epochs=model_args.attention_refresh_epochs))
        if model_args.attn_implementation == "auto":
            choose_attention(model.to(args.device), args.per_device_train_batch_size)
        args.remove_unused_columns = (
            False  # keep sample_ids for the attention generator, labels for the supervised head
        )
        args.prediction_loss_only = True  # evaluation needs the loss, not every reconstruction
        processor = ViTImageProcessorPil(do_resize=False, do_rescale=False, image_mean=mean, image_std=std)
        logger.info(
            "training on %d images (%d channels), validating on %d; lr %.3g",
            len(train),
            channels,
            len(val or []),
            args.learning_rate,
        )
        if supervision:
            callbacks.append(LossTermsCallback())
        if data_args.record_sample_ids:
            callbacks.append(SampleIdRecorder())
        return TaskSetup(
            model,
            train,
            val,
            processor,
            data_args.train_data,
            callbacks,
            state={
                "skipped": skipped,
                "sources": (train_images, val_images),
                "stats_images": stats_images,
                "labelled_train_images": int((supervision.train >= 0).sum()) if supervision else None,
            },
        )

    def build_model(
        self, model_args: ModelArguments, channels: int, supervision: Supervision | None = None
    ) -> MedMAEForPreTraining:
        attn = "sdpa" if model_args.attn_implementation == "auto" else model_args.attn_implementation
        if not model_args.model_name_or_path:
            extra = supervision.config_fields() if supervision else {}
            return MedMAEForPreTraining._from_config(
                mae_config(model_args, channels, **extra), attn_implementation=attn
            )
        model = load_checkpoint(
            MedMAEForPreTraining,
            model_args.model_name_or_path,
            model_types=("medmae", "vit_mae"),
            what="an MAE",
            attn_implementation=attn,
        )
        if model.config.num_channels != channels:
            raise DataError(
                f"the checkpoint expects {model.config.num_channels} channels, the data has {channels}.",
                "use data with the checkpoint's channel count, or pre-train from scratch.",
            )
        head = model.classifier is not None
        if supervision is not None and not (head and model.config.num_labels == len(supervision.class_names)):
            raise ConfigError(
                f"labels_csv has {len(supervision.class_names)} classes but the checkpoint "
                + (f"has a supervised head for {model.config.num_labels}." if head else "has no supervised head."),
                "continue from a checkpoint pre-trained with the same classes, or pre-train from scratch with labels_csv.",
            )
        if supervision is None and head:
            logger.warning(
                "the checkpoint has a supervised head but no labels_csv is given: its cross-entropy term is 0"
            )
        apply_recipe(model, model_args)
        return model

    def setup_stream(
        self, model_args: ModelArguments, data_args: DataArguments, args: MedTrainingArguments
    ) -> TaskSetup:
        """`streaming: true`: a shuffled `datasets.IterableDataset`, sharded across processes by accelerate."""
        if not data_args.train_data.startswith("hf:"):
            raise ConfigError(
                f"streaming needs an hf: source; train_data is {data_args.train_data!r}.",
                "use train_data: hf:<dataset or save_to_disk folder>, or streaming: false (folders and .npy are read lazily anyway).",
            )
        if args.max_steps <= 0:
            raise ConfigError(
                "a stream has no length, so num_train_epochs cannot set the schedule.",
                "set max_steps (optimizer steps).",
            )
        if data_args.validation_data is None and data_args.validation_fraction > 0:
            raise ConfigError(
                "a stream cannot be split into train and validation without reading it first.",
                "give validation_data (e.g. hf:<name>::validation or a small folder), or set validation_fraction: 0.",
            )
        if model_args.mask_generator == "attention":
            raise ConfigError(
                "the attention mask generator keeps a map per image, which a stream has no index for.",
                "use mask_generator: random, block, grid or foreground with streaming.",
            )
        if data_args.labels_csv or model_args.supervised_loss_weight > 0:
            raise ConfigError(
                "the supervised head matches labels_csv rows to image files, which a stream has no index for.",
                "pre-train a folder source with labels_csv (streaming: false), or drop labels_csv.",
            )
        name, _, split = data_args.train_data[3:].partition("::")
        stream = open_hf_dataset(name, split or "train", streaming=True, with_ids=data_args.record_sample_ids)
        column = data_args.image_column or hf_image_column(
            stream.column_names or list(next(iter(stream)).keys()), name
        )
        if data_args.max_images:
            stream = stream.take(data_args.max_images)
        stream = stream.shuffle(seed=args.seed, buffer_size=data_args.shuffle_buffer)
        first = itertools.islice(stream, data_args.stats_sample_size or 1000)
        mean, std, stats_images = channel_moments(item_to_chw(item[column], name) for item in first)  # a seeded sample
        channels = len(mean)
        model = self.build_model(model_args, channels)
        augment = Augment(
            model_args.image_size,
            tuple(data_args.crop_scale),
            hflip=data_args.hflip,
            vflip=data_args.vflip,
            rot90=data_args.rot90,
        )
        train = streaming_dataset(stream, column, mean, std, model_args.image_size, augment, data_args.tile_size, name)
        val_images, skipped = (
            load_source(
                data_args.validation_data,
                data_args.on_bad_file,
                pattern=data_args.file_pattern,
                image_column=data_args.image_column,
            )
            if data_args.validation_data
            else (None, [])
        )
        if val_images is not None and data_args.tile_size:
            val_images = TiledSource(val_images, data_args.tile_size)
        val = (
            PretrainingDataset(val_images, mean, std, model_args.image_size)
            if val_images is not None and len(val_images)
            else None
        )
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if args.accelerator_config.dispatch_batches is None and train.n_shards >= world:
            args.accelerator_config.dispatch_batches = (
                False  # each process reads its own file shards, not all via rank 0
            )
        if model_args.attn_implementation == "auto":
            choose_attention(model.to(args.device), args.per_device_train_batch_size)
        args.remove_unused_columns, args.prediction_loss_only = False, True
        processor = ViTImageProcessorPil(do_resize=False, do_rescale=False, image_mean=mean, image_std=std)
        logger.info(
            "streaming %s (%d shards, shuffle buffer %d); statistics from its first %d images",
            name,
            train.n_shards,
            data_args.shuffle_buffer,
            stats_images,
        )
        if args.resume_from_checkpoint not in (None, "", False, "false", "False"):
            logger.warning(
                "resuming a stream: the Trainer re-reads it (same seed, same order) up to the step it stopped at, so "
                "training continues at the right place; the augmentation and masks of what follows are drawn anew, "
                "so the run is not bit-identical to an uninterrupted one"
            )
        callbacks = [SampleIdRecorder()] if data_args.record_sample_ids else []
        return TaskSetup(
            model,
            train,
            val,
            processor,
            data_args.train_data,
            callbacks,
            state={"skipped": skipped, "sources": (val_images,), "stats_images": stats_images, "streaming": True},
        )

    def report(self, trainer, setup: TaskSetup, model_args, data_args: DataArguments, is_main: bool) -> dict:
        trainer.save_model()
        args, model = trainer.args, setup.model
        skipped = list(
            dict.fromkeys(setup.state["skipped"] + [f for src in setup.state["sources"] for f in read_time_skips(src)])
        )
        metrics = trainer.evaluate() if setup.eval_dataset is not None else {}
        if setup.eval_dataset is not None:
            metrics["eval_loss_mean_predictor"] = mean_predictor_loss(
                model, setup.eval_dataset, args.per_device_eval_batch_size
            )
            if (
                getattr(model, "classifier", None) is not None
            ):  # eval_loss adds the labelled images' weighted cross-entropy
                metrics["eval_reconstruction_loss"] = reconstruction_only_loss(
                    model, setup.eval_dataset, args.per_device_eval_batch_size
                )
        metrics.update(
            num_train_images=len(setup.train_dataset) if hasattr(setup.train_dataset, "__len__") else None,
            num_skipped_files=len(skipped),
            normalisation_sample_images=setup.state["stats_images"],
            labelled_train_images=setup.state.get("labelled_train_images"),
            attn_implementation=model.config._attn_implementation,
        )
        if is_main:
            if skipped:
                logger.warning("skipped %d unreadable files: %s", len(skipped), skipped[:10])
            shown = setup.eval_dataset or (
                setup.train_dataset
                if hasattr(setup.train_dataset, "__len__")
                else list(itertools.islice(setup.train_dataset, 4))
            )
            save_reconstructions(
                model,
                shown,
                args.output_dir,
                data_args.reconstruction_channels,
                mean_view=data_args.reconstruction_view == "mean",
            )
        return metrics

    def summary(self, metrics: dict, output_dir: str) -> str:
        lines = []
        if "eval_loss" in metrics and "eval_loss_mean_predictor" in metrics:
            loss, base = (
                metrics.get("eval_reconstruction_loss", metrics["eval_loss"]),
                metrics["eval_loss_mean_predictor"],
            )
            verdict = (
                f"{1 - loss / base:.0%} lower: the model reconstructs structure from the visible patches"
                if loss < base
                else "not lower: the model has not learned more than the mean yet; train longer or check the learning rate"
            )
            lines.append(
                f"validation loss {loss:.4f}, against {base:.4f} for predicting the mean of every hidden patch ({verdict})"
            )
        lines += [
            f"outputs in {output_dir}: model.safetensors + config.json (the MAE), reconstruction.png, all_results.json",
            f"next: the encoder in Python, hf_medmae.load_encoder({output_dir!r}); or fine-tune it with",
            f"  python run_segmentation.py --config configs/nuclei_segmentation.yaml --model_name_or_path {output_dir}",
        ]
        return "\n".join(lines)


def read_time_skips(source) -> list[str]:
    """Files a lazy folder source could index but not decode during training (this process's count)."""
    while not hasattr(source, "skipped_at_read") and hasattr(source, "source"):
        source = source.source
    return list(getattr(source, "skipped_at_read", []))


@torch.no_grad()
def mean_predictor_loss(model: MedMAEForPreTraining, dataset, batch_size: int = 64) -> float:
    """The validation loss of predicting the mean for every hidden pixel (0: the data mean in normalised units;
    with norm_pix_loss, each patch's own mean), on the same images under masks of the same ratio: the floor
    a model must beat to have learned anything from the visible patches."""
    model.eval()
    total, count = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for start in range(0, len(dataset), batch_size):
            pixels = torch.stack(
                [dataset[i]["pixel_values"] for i in range(start, min(start + batch_size, len(dataset)))]
            ).to(model.device)
            out = model(pixels)  # for the mask: [B, L], 1 = hidden
            total += model.reconstruction_loss(pixels, torch.zeros_like(out.logits), out.mask).item() * len(pixels)
            count += len(pixels)
    return total / max(count, 1)


@torch.no_grad()
def reconstruction_only_loss(model: MedMAEForPreTraining, dataset, batch_size: int = 64) -> float:
    """The validation loss without the supervised head's term (no labels given): comparable with `mean_predictor_loss`."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        pixels = torch.stack(
            [dataset[i]["pixel_values"] for i in range(start, min(start + batch_size, len(dataset)))]
        ).to(model.device)
        total += model(pixels).loss.item() * len(pixels)
        count += len(pixels)
    return total / max(count, 1)


@torch.no_grad()
def save_reconstructions(
    model: MedMAEForPreTraining, dataset, output_dir: str, channels=None, n: int = 4, mean_view: bool = False
) -> str:
    """`reconstruction.png`: originals, what the encoder saw, and the reconstruction of `n` images (random masks at
    the model's ratio; a model that throws patches in training has every hidden patch reconstructed here).

    `mean_view` shows the average of all channels (original and reconstruction alike) as one grey image.
    """
    from ..plots import save_reconstruction_grid

    model.eval()
    pixels = torch.stack([torch.as_tensor(dataset[i]["pixel_values"]) for i in range(min(n, len(dataset)))]).to(
        model.device
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same masks in every figure of a run's images
        codes = None
        if model.config.throw_ratio > 0:  # thrown patches are never trained to be reconstructed: hide, don't throw
            uniform = RandomMaskGenerator(model.config.mask_ratio, model.mask_generator.grid_size)
            codes = uniform(len(pixels), device=model.device)
        out = model(pixels, mask_codes=codes)
    recon = model.reconstruct(pixels, out.logits, out.mask)
    if mean_view:
        pixels, recon, channels = pixels.mean(1, keepdim=True), recon.mean(1, keepdim=True), [0]
    return save_reconstruction_grid(
        pixels.cpu(),
        out.mask.cpu(),
        recon.cpu(),
        model.config.patch_size,
        f"{output_dir}/reconstruction.png",
        channels=channels,
    )


TASK = Pretrain()


def main(argv: list[str] | None = None) -> dict:
    """Run from a command line (`argv`, default sys.argv): the 3D task when `spatial_dims: 3`, else this one."""
    from .volumes import PRETRAIN_3D

    return (PRETRAIN_3D if spatial_dims(argv) == 3 else TASK).main(argv)


def cli() -> None:
    """Console entry point `medmae-pretrain` (and `python run_*.py`): metrics as JSON, or the problem and its fix."""
    from .volumes import PRETRAIN_3D

    console(PRETRAIN_3D if spatial_dims() == 3 else TASK)


__all__ = [
    "DataArguments",
    "ModelArguments",
    "Pretrain",
    "Supervision",
    "cli",
    "load_images",
    "mae_config",
    "main",
    "read_supervision",
    "save_reconstructions",
]
