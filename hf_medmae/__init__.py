"""hf_medmae: masked-autoencoder pre-training and transfer for medical images on Hugging Face.

    >>> from hf_medmae import MedMAEConfig, MedMAEForPreTraining, load_encoder

Importing the package registers our configs and models with transformers' Auto classes.
"""

from .arguments import MedTrainingArguments
from .classification import MedClsConfig, MedClsForImageClassification, freeze
from .cnn import MedCNNConfig, MedCNNForImageClassification, build_cnn
from .configuration import MedMAEConfig
from .encoder import load_encoder, mae_encoder_state_dict, vit_config_dict, vit_config_from
from .errors import CheckpointError, ConfigError, DataError, MedMAEError
from .hub import pull_checkpoint, push_checkpoint, render_model_card
from .loading import load_checkpoint
from .masking import MASK_GENERATORS, build_mask_generator
from .modeling_mae import MedMAEForPreTraining
from .modeling_mae3d import MedMAE3DConfig, MedMAE3DForPreTraining, MedMAE3DModel
from .optim import add_drop_path, param_groups_layer_decay
from .segmentation import (
    MedSegConfig,
    MedSegForSegmentation,
    MedUNetConfig,
    MedUNetForSegmentation,
    build_unet_baseline,
    predict,
)

__version__ = "0.1.0"

__all__ = [
    "MedMAEConfig",
    "MedMAEForPreTraining",
    "MedMAE3DConfig",
    "MedMAE3DForPreTraining",
    "MedMAE3DModel",
    "MASK_GENERATORS",
    "build_mask_generator",
    "load_encoder",
    "mae_encoder_state_dict",
    "vit_config_dict",
    "vit_config_from",
    "MedClsConfig",
    "MedClsForImageClassification",
    "freeze",
    "MedCNNConfig",
    "MedCNNForImageClassification",
    "build_cnn",
    "add_drop_path",
    "param_groups_layer_decay",
    "MedSegConfig",
    "MedSegForSegmentation",
    "MedUNetConfig",
    "MedUNetForSegmentation",
    "build_unet_baseline",
    "predict",
    "push_checkpoint",
    "pull_checkpoint",
    "render_model_card",
    "load_checkpoint",
    "MedTrainingArguments",
    "MedMAEError",
    "ConfigError",
    "DataError",
    "CheckpointError",
]
