"""3D pre-training: the 3D MAE on volumes (segmentation of volumes is `tasks.segment.Segment` with `spatial_dims: 3`).

`run_mae.py` hands a config with `spatial_dims: 3` to this task:

    python run_mae.py --config configs/nuclei3d_mae.yaml

Volumes are split whole (no crop of a held-out volume is trained on), normalised one by one
(`normalise_intensity`), and trained on random ROI crops; validation uses fixed crops.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch
from transformers import ViTImageProcessorPil

from ..arguments import MedTrainingArguments
from ..data.volumes import (
    VolumeDataArguments,
    VolumeDataset,
    prepare_volumes,
    split_for,
    volume_augment,
)
from ..errors import DataError
from ..loading import load_checkpoint
from ..modeling_mae import RECIPE_FIELDS, apply_recipe, fresh_masking
from ..modeling_mae3d import MedMAE3DConfig, MedMAE3DForPreTraining
from ..plots import save_volume_reconstruction
from ..training import AttentionRefreshCallback, EpochCallback
from .run import Task, TaskSetup

logger = logging.getLogger(__name__)


@dataclass
class MAE3DModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "continue from a 3D MAE checkpoint"})
    patch_size: int = field(default=8, metadata={"help": "in-plane patch side"})
    tubelet_size: int = field(
        default=8, metadata={"help": "patch depth (= patch_size for cubic patches, which UNETR needs)"}
    )
    hidden_size: int = 192
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    intermediate_size: int = 768
    decoder_hidden_size: int = 96
    decoder_num_hidden_layers: int = 2
    decoder_num_attention_heads: int = 4
    decoder_intermediate_size: int = 384
    layer_norm_eps: float = 1e-6
    # unset = MASKING_DEFAULTS for a new MAE, the checkpoint's values when continuing (as in 2D)
    norm_pix_loss: bool | None = None
    mask_ratio: float | None = None
    mask_generator: str | None = None
    mask_generator_kwargs: dict | None = None
    throw_ratio: float | None = None
    attention_refresh_epochs: float = 5.0


class Pretrain3D(Task):
    """Self pre-training of the 3D MAE on random crops of the training volumes (SelfMedMAE)."""

    arguments = (MAE3DModelArguments, VolumeDataArguments, MedTrainingArguments)

    def setup(
        self, model_args: MAE3DModelArguments, data_args: VolumeDataArguments, args: MedTrainingArguments
    ) -> TaskSetup:
        data = prepare_volumes(data_args, labelled=False)
        data.labels = None  # labels, if any, play no part in self pre-training
        train_idx, val_idx, _ = split_for(data, data_args, args.seed, 0)
        model = self.build_model(model_args, data_args, data.channels)
        roi = tuple(data_args.roi_size)
        if model.config.mask_generator == "attention":  # maps must line up with the voxels they mask: fixed crops
            train = VolumeDataset(data.subset(train_idx), roi)
            callbacks = [AttentionRefreshCallback(train, every_epochs=model_args.attention_refresh_epochs)]
        else:
            train = VolumeDataset(
                data.subset(train_idx), roi, volume_augment(data_args), data_args.samples_per_volume, args.seed
            )
            callbacks = [EpochCallback(train)]
        # No sample ids on validation crops: the attention bank is keyed by training ids, which they would collide with.
        val = VolumeDataset(data.subset(val_idx), roi, with_ids=False) if val_idx else None
        args.remove_unused_columns = False  # keep sample_ids for the attention generator
        args.prediction_loss_only = True
        processor = _processor(data.channels)
        logger.info(
            "pre-training on %d crops of %d volumes %s, validating on %d crops of %s",
            len(train),
            len(train_idx),
            [data.names[i] for i in train_idx],
            len(val or []),
            [data.names[i] for i in val_idx],
        )
        return TaskSetup(
            model,
            train,
            val,
            processor,
            data_args.train_data,
            callbacks,
            state={"train_volumes": [data.names[i] for i in train_idx]},
        )

    def build_model(
        self, model_args: MAE3DModelArguments, data_args: VolumeDataArguments, channels: int
    ) -> MedMAE3DForPreTraining:
        if model_args.model_name_or_path:
            model = load_checkpoint(MedMAE3DForPreTraining, model_args.model_name_or_path, what="a 3D MAE")
            if model.config.num_channels != channels or list(model.config.volume_size) != list(data_args.roi_size):
                raise DataError(
                    f"the checkpoint takes {model.config.num_channels}-channel crops of {list(model.config.volume_size)}, "
                    f"the data has {channels} channels and roi_size {data_args.roi_size}.",
                    f"set roi_size: {list(model.config.volume_size)} and use {model.config.num_channels}-channel volumes.",
                )
            apply_recipe(model, model_args)
            return model
        keys = set(MedMAE3DConfig.__dataclass_fields__) & set(asdict(model_args)) - set(RECIPE_FIELDS)
        d, h, w = data_args.roi_size
        config = MedMAE3DConfig(
            num_channels=channels,
            num_frames=d,
            image_size=[h, w],
            **{k: getattr(model_args, k) for k in keys},
            **fresh_masking(model_args),
        )
        return MedMAE3DForPreTraining(config)

    def report(self, trainer, setup: TaskSetup, model_args, data_args: VolumeDataArguments, is_main: bool) -> dict:
        trainer.save_model()
        metrics = trainer.evaluate() if setup.eval_dataset is not None else {}
        shown = setup.eval_dataset or setup.train_dataset
        if setup.eval_dataset is not None:
            metrics["eval_loss_mean_predictor"] = mean_predictor_loss_3d(
                setup.model, shown, trainer.args.per_device_eval_batch_size
            )
        metrics.update(
            num_train_crops=len(setup.train_dataset),
            train_volumes=setup.state["train_volumes"],
            intensity=data_args.intensity,
            roi_size=list(data_args.roi_size),
        )
        if is_main:
            save_reconstruction_3d(setup.model, shown, trainer.args.output_dir)
        return metrics

    def summary(self, metrics: dict, output_dir: str) -> str:
        lines = []
        if "eval_loss_mean_predictor" in metrics:
            lines.append(
                f"validation loss {metrics['eval_loss']:.4f}, against {metrics['eval_loss_mean_predictor']:.4f} for "
                "predicting the mean of every hidden patch"
            )
        lines += [
            f"outputs in {output_dir}: the 3D MAE (model.safetensors + config.json), reconstruction.png",
            f"next: python run_segmentation.py --config configs/nuclei3d_segmentation.yaml --model_name_or_path {output_dir}",
        ]
        return "\n".join(lines)


def _processor(channels: int) -> ViTImageProcessorPil:
    # Volumes are normalised one by one before cropping, so the model sees unit-scaled inputs: mean 0, std 1.
    return ViTImageProcessorPil(
        do_resize=False, do_rescale=False, do_normalize=False, image_mean=[0.0] * channels, image_std=[1.0] * channels
    )


@torch.no_grad()
def mean_predictor_loss_3d(model: MedMAE3DForPreTraining, dataset, batch_size: int = 4) -> float:
    """Validation loss of predicting one constant, the mean hidden target, for every hidden voxel (0 with
    `norm_pix_loss`, the data's mean otherwise), under the eval loss's masks (same batches, so the same
    batch-seeded masks): the floor a 3D MAE must beat."""
    model.eval()
    total = squares = count = 0.0
    for start in range(0, len(dataset), batch_size):
        pixels = torch.stack(
            [dataset[i]["pixel_values"] for i in range(start, min(start + batch_size, len(dataset)))]
        ).to(model.device)
        target = model.targets(pixels)[model(pixels).mask == 1].double()
        total, squares, count = total + float(target.sum()), squares + float((target**2).sum()), count + target.numel()
    return squares / max(count, 1) - (total / max(count, 1)) ** 2  # the variance: MSE of the best constant


@torch.no_grad()
def save_reconstruction_3d(model: MedMAE3DForPreTraining, dataset, output_dir: str) -> str:
    """`reconstruction.png`: one crop as orthogonal slices: original, masked input, reconstruction.

    The crop with the most structure (highest intensity spread) of the first 16, so the figure shows objects, not empty background.
    """
    model.eval()
    crops = [dataset[i]["pixel_values"] for i in range(min(16, len(dataset)))]
    pixels = max(crops, key=lambda x: float(x.std()))[None].to(model.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = model(pixels)
    recon = model.reconstruct(pixels, out.logits, out.mask)
    return save_volume_reconstruction(
        pixels[0].cpu().numpy(),
        out.mask[0].cpu().numpy(),
        recon[0].cpu().numpy(),
        model.config.patch_shape,
        f"{output_dir}/reconstruction.png",
    )


PRETRAIN_3D = Pretrain3D()

__all__ = [
    "MAE3DModelArguments",
    "PRETRAIN_3D",
    "Pretrain3D",
    "VolumeDataArguments",
    "prepare_volumes",
    "split_for",
]
