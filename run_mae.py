#!/usr/bin/env python
"""Pre-train a masked autoencoder on unlabeled images.

    python run_mae.py --config configs/quickstart.yaml
    accelerate launch run_mae.py --config configs/seed001_model1_p4.yaml   # many GPUs, unchanged
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, ViTImageProcessorPil, set_seed

from hf_medmae import MedMAEConfig, MedMAEForPreTraining
from hf_medmae.cli import parse_config
from hf_medmae.data.pretraining import Augment, PretrainingDataset, channel_stats, check_channels, load_source, split_indices, tile_image
from hf_medmae.errors import CheckpointError, ConfigError, DataError
from hf_medmae.hub import pull_checkpoint, push_run, take_over_push
from hf_medmae.performance import ATTENTION_CHOICES, apply_fast_defaults, choose_attention
from hf_medmae.training import AttentionRefreshCallback, EpochCallback, ProcessSeedCallback, SampleIdRecorder, check_writable, hardware_description, resolve_precision, resolve_resume, scale_learning_rate, write_run_info

logger = logging.getLogger("run_mae")


@dataclass
class DataArguments:
    train_data: str = field(default="embedded:nuclei16", metadata={"help": "folder, .npy/.npz, hf:<dataset>, or embedded:nuclei16"})
    file_pattern: str = field(default="*", metadata={"help": 'only files matching this name pattern, e.g. "*.bmp"'})
    validation_data: str | None = field(default=None, metadata={"help": "separate validation source; else split off train_data"})
    validation_fraction: float = field(default=0.1, metadata={"help": "share of images (before tiling) held out for validation"})
    tile_size: int | None = field(default=None, metadata={"help": "cut images into tiles of this side first (e.g. 64)"})
    max_images: int | None = field(default=None, metadata={"help": "read at most this many images"})
    on_bad_file: str = field(default="error", metadata={"help": "error | skip (skipped files are counted and reported)"})
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0], metadata={"help": "random resized crop area range"})
    hflip: bool = True
    vflip: bool = True
    rot90: bool = False
    reconstruction_channels: list[int] | None = field(default=None, metadata={"help": "1 channel (grey) or 3 (RGB) shown in the reconstruction PNG"})
    record_sample_ids: bool = field(default=False, metadata={"help": "write the training sample ids each process saw (sharding check)"})


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "continue from an MAE checkpoint (dir or Hub id)"})
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
    norm_pix_loss: bool = True
    mask_ratio: float = 0.75
    mask_generator: str = "random"
    mask_generator_kwargs: dict | None = None
    throw_ratio: float = 0.0
    attention_refresh_epochs: float = 5.0
    attn_implementation: str = field(default="auto", metadata={"help": "auto (sdpa on GPU; on CPU the faster of sdpa/eager, measured) | sdpa | eager"})
    base_learning_rate: float | None = field(default=None, metadata={"help": "if set, lr = base_lr * effective batch / 256"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on capable GPUs) | bf16 | fp32"})


def build_config(model_args: ModelArguments, num_channels: int) -> MedMAEConfig:
    keys = {f for f in MedMAEConfig.__dataclass_fields__} & set(asdict(model_args))
    values = {k: getattr(model_args, k) for k in keys if k != "num_channels"}
    return MedMAEConfig(num_channels=num_channels, **values)


def load_mae_checkpoint(name_or_path: str, attn_implementation: str = "sdpa") -> MedMAEForPreTraining:
    """An MAE checkpoint with every weight loaded from safetensors, else a CheckpointError.

    `from_pretrained` only warns about another architecture or missing weights and then trains
    them from random values; continuing pre-training from such a "checkpoint" must fail instead.
    """
    fix = "point model_name_or_path at a folder written by run_mae.py / save_pretrained (config.json + model.safetensors)."
    if not Path(name_or_path).is_dir():  # a Hub id: fetch JSON + safetensors only, so no pickle is downloaded
        name_or_path = pull_checkpoint(name_or_path)  # and transformers' .bin -> safetensors conversion bot is never called
    try:
        model_type = MedMAEConfig.get_config_dict(name_or_path)[0].get("model_type")
        if model_type not in ("medmae", "vit_mae"):
            raise CheckpointError(f"{name_or_path} holds a model of type {model_type!r}, not an MAE (medmae / vit_mae).", fix)
        model, info = MedMAEForPreTraining.from_pretrained(name_or_path, use_safetensors=True, output_loading_info=True,
                                                           attn_implementation=attn_implementation)  # fmt: skip
    except OSError as err:  # no model.safetensors, e.g. only a pickled pytorch_model.bin (never unpickled)
        raise CheckpointError(f"cannot load an MAE checkpoint from {name_or_path} ({err}); pickled weights are refused.", fix) from None
    wrong = {k: info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if wrong:
        raise CheckpointError(f"the weights in {name_or_path} do not match its MAE config: {wrong}.",
                              "the checkpoint is truncated or from another architecture; re-save it with save_pretrained.")  # fmt: skip
    return model


def build_datasets(data_args: DataArguments, image_size: int, seed: int):
    images, skipped = load_source(data_args.train_data, data_args.on_bad_file, data_args.max_images, pattern=data_args.file_pattern)
    if not images:
        raise DataError(f"no images found in {data_args.train_data}.", "check train_data; supported: PNG/JPEG/BMP/TIFF folders, .npy/.npz, hf:, embedded:.")
    if data_args.validation_data:
        val_images, more = load_source(data_args.validation_data, data_args.on_bad_file, pattern=data_args.file_pattern)
        train_images, skipped = images, skipped + more
    else:  # split whole images before tiling, so no tile of a validation image is trained on
        train_idx, val_idx = split_indices(len(images), data_args.validation_fraction, seed)
        train_images, val_images = [images[i] for i in train_idx], [images[i] for i in val_idx]
    if data_args.tile_size:
        train_images = [t for im in train_images for t in tile_image(im, data_args.tile_size)]
        val_images = [t for im in val_images for t in tile_image(im, data_args.tile_size)]
    channels = check_channels(train_images + val_images, data_args.train_data)
    mean, std = channel_stats(train_images)
    augment = Augment(image_size, tuple(data_args.crop_scale), hflip=data_args.hflip, vflip=data_args.vflip, rot90=data_args.rot90)
    train = PretrainingDataset(train_images, mean, std, image_size, augment, seed=seed)
    val = PretrainingDataset(val_images, mean, std, image_size) if val_images else None
    return train, val, channels, (mean, std), skipped


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_config((ModelArguments, DataArguments, TrainingArguments), argv)
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING)
    if model_args.attn_implementation not in ATTENTION_CHOICES:  # before any data is read
        raise ConfigError(f"attn_implementation={model_args.attn_implementation!r} is not an option.", f"use one of {', '.join(ATTENTION_CHOICES)}.")
    check_writable(training_args.output_dir)
    set_seed(training_args.seed)
    train_ds, val_ds, channels, (mean, std), skipped = build_datasets(data_args, model_args.image_size, training_args.seed)
    attn = "sdpa" if model_args.attn_implementation == "auto" else model_args.attn_implementation
    if model_args.model_name_or_path:
        model = load_mae_checkpoint(model_args.model_name_or_path, attn)
        if model.config.num_channels != channels:
            raise DataError(f"the checkpoint expects {model.config.num_channels} channels, the data has {channels}.", "use data with the checkpoint's channel count, or pre-train from scratch.")
    else:
        model = MedMAEForPreTraining._from_config(build_config(model_args, channels), attn_implementation=attn)
    scale_learning_rate(training_args, model_args.base_learning_rate)
    resolve_precision(training_args, model_args.precision)
    apply_fast_defaults(training_args)
    if model_args.attn_implementation == "auto":
        choose_attention(model.to(training_args.device), training_args.per_device_train_batch_size)
    training_args.remove_unused_columns = False  # keep sample_ids for the attention generator
    training_args.prediction_loss_only = True  # evaluation needs the loss, not every reconstruction
    push = take_over_push(training_args)
    callbacks = [EpochCallback(train_ds), ProcessSeedCallback()]
    if model.config.mask_generator == "random":  # per-image masks: same masks whatever the process count
        train_ds.mask_noise_patches = model.config.num_patches
    if model.config.mask_generator == "attention":  # maps must line up with the pixels they mask
        train_ds.augment = Augment(model_args.image_size, (1.0, 1.0), hflip=False, vflip=False)
        plain = PretrainingDataset([im.numpy() for im in train_ds.images], mean, std, model_args.image_size)
        callbacks.append(AttentionRefreshCallback(plain, every_epochs=model_args.attention_refresh_epochs))
    recorder = SampleIdRecorder(model) if data_args.record_sample_ids else None
    trainer = Trainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=val_ds, callbacks=callbacks)
    logger.info("training on %d images (%d channels), validating on %d; lr %.3g", len(train_ds), channels, len(val_ds or []), training_args.learning_rate)
    train_result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    trainer.save_model()
    if recorder is not None:
        recorder.save(f"{training_args.output_dir}/sample_ids_rank{training_args.process_index}.json")
    metrics = {**train_result.metrics, **(trainer.evaluate() if val_ds is not None else {})}
    metrics.update(num_train_images=len(train_ds), num_skipped_files=len(skipped), hardware=hardware_description(),
                   global_step=trainer.state.global_step, attn_implementation=model.config._attn_implementation)
    if trainer.is_world_process_zero():
        ViTImageProcessorPil(do_resize=False, do_rescale=False, image_mean=mean, image_std=std).save_pretrained(training_args.output_dir)
        trainer.save_metrics("all", metrics)
        if skipped:
            logger.warning("skipped %d unreadable files: %s", len(skipped), skipped[:10])
        save_reconstructions(model, val_ds or train_ds, training_args.output_dir, data_args.reconstruction_channels)
        write_run_info(training_args, data_args.train_data, len(train_ds), metrics)
        push_run(training_args, push)
    return metrics


@torch.no_grad()
def save_reconstructions(model, dataset, output_dir: str, channels=None, n: int = 4) -> str:
    from hf_medmae.plots import save_reconstruction_grid

    model.eval()
    pixels = torch.stack([dataset[i]["pixel_values"] for i in range(min(n, len(dataset)))]).to(model.device)
    out = model(pixels)
    recon = model.reconstruct(pixels, out.logits, out.mask)
    return save_reconstruction_grid(pixels.cpu(), out.mask.cpu(), recon.cpu(), model.config.patch_size, f"{output_dir}/reconstruction.png", channels=channels)


if __name__ == "__main__":
    print(json.dumps(main(), indent=2, default=str))
