"""CNN baselines for classification: MONAI's ResNet and DenseNet as transformers models.

What a practitioner would otherwise train (seed 003), so every hf_medmae study can compare against
it: the same data, split, Trainer, metrics, plots, safetensors checkpoint and `--predict_only` as the
ViT classifier, chosen by one key (`architecture: resnet18` in `run_classification.py`).

    >>> model = MedCNNForImageClassification(MedCNNConfig(architecture="resnet10", num_channels=3, num_labels=5))
    >>> model(torch.randn(2, 3, 64, 64)).logits.shape
    torch.Size([2, 5])
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from monai.networks import nets
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from .classification import SINGLE, ClassificationLossMixin, check_head_fields
from .errors import ConfigError
from .validation import check_pixels


def _resnet(depth: int):
    return lambda dims, cin, k: getattr(nets, f"resnet{depth}")(spatial_dims=dims, n_input_channels=cin, num_classes=k)


# name -> MONAI constructor taking (spatial_dims, in_channels, num_classes)
CNN_ARCHITECTURES = {
    **{f"resnet{d}": _resnet(d) for d in (10, 18, 34, 50)},
    "densenet121": lambda dims, cin, k: nets.DenseNet121(spatial_dims=dims, in_channels=cin, out_channels=k),
}


@strict
class MedCNNConfig(PreTrainedConfig):
    r"""Configuration of [`MedCNNForImageClassification`].

    Args:
        architecture (`str`, defaults to `"resnet18"`): one of `CNN_ARCHITECTURES`
            (MONAI ResNet-10/18/34/50, DenseNet-121).
        num_channels (`int`, defaults to 3): image channels.
        image_size (`int`, defaults to 64): the training size (the network itself takes any size).
        label_smoothing, class_weights, problem_type: as in `MedClsConfig`.
    """

    model_type = "medmae_cnn"

    architecture: str = "resnet18"
    num_channels: int = 3
    image_size: int = 64
    label_smoothing: float = 0.0
    class_weights: list[float] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.problem_type is None:
            self.problem_type = SINGLE
        self.check()

    def check(self) -> None:
        if self.architecture not in CNN_ARCHITECTURES:
            raise ConfigError(
                f"architecture={self.architecture!r} is not a CNN baseline.",
                f"use one of {sorted(CNN_ARCHITECTURES)}.",
            )
        if self.num_channels < 1:
            raise ConfigError(f"num_channels={self.num_channels}.", "use the images' channel count (>= 1).")
        check_head_fields(self, ("label_smoothing",))


class MedCNNForImageClassification(ClassificationLossMixin, PreTrainedModel):
    """A MONAI ResNet / DenseNet under `cnn`, with the ViT classifier's outputs, label checks and loss."""

    config_class = MedCNNConfig
    config: MedCNNConfig
    base_model_prefix = "cnn"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    accepts_loss_kwargs = False  # per-batch mean loss, as MedClsForImageClassification

    def __init__(self, config: MedCNNConfig):
        super().__init__(config)
        self.cnn = CNN_ARCHITECTURES[config.architecture](2, config.num_channels, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Keep MONAI's own initialisation (Kaiming convs, unit batch norms): what these networks train with.
        pass

    def forward(
        self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs
    ) -> ImageClassifierOutput:
        r"""pixel_values: [B, C, H, W] normalised images; labels: [B] class indices or [B, K] 0/1 targets."""
        check_pixels(
            pixel_values,
            self.config.num_channels,
            f"the {self.config.architecture}",
            channel_fix=f"convert the images to {self.config.num_channels} channels, as the training images were.",
        )
        logits = self.cnn(pixel_values)
        loss = self.classification_loss(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def build_cnn(
    architecture: str, num_channels: int, num_labels: int, image_size: int = 64, **cfg
) -> MedCNNForImageClassification:
    """A CNN baseline from random weights. `**cfg`: `id2label`, `label_smoothing`, `class_weights`, `problem_type`."""
    if "id2label" in cfg:
        cfg["id2label"] = {int(k): str(v) for k, v in cfg["id2label"].items()}
        cfg.setdefault("label2id", {v: k for k, v in cfg["id2label"].items()})
    else:
        cfg["num_labels"] = num_labels
    return MedCNNForImageClassification(
        MedCNNConfig(architecture=architecture, num_channels=num_channels, image_size=image_size, **cfg)
    )


AutoConfig.register(MedCNNConfig.model_type, MedCNNConfig)
AutoModelForImageClassification.register(MedCNNConfig, MedCNNForImageClassification)

__all__ = ["CNN_ARCHITECTURES", "MedCNNConfig", "MedCNNForImageClassification", "build_cnn"]
