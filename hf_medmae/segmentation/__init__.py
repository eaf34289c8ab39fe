"""Segmentation on a pre-trained ViT encoder (UNETR decoder from MONAI blocks) and a U-Net baseline.

One module per concept: `configuration` (configs, skip layers), `decoder` (UNETR from MONAI blocks),
`losses`, `modeling` (the two segmenters), `inference` (sliding window, folders of files). A 3D variant
enters where `spatial_dims` does: the configs and the MONAI blocks already take it.
"""

from .configuration import (
    DECODERS,
    LOSSES,
    UNET_MULTIPLE,
    MedSegConfig,
    MedUNetConfig,
    SegmentationLossConfig,
    default_skip_layers,
    encoder_fields,
)
from .decoder import UnetrDecoder
from .inference import INFERENCE_FILE, load_segmenter, predict, predict_files, save_inference_config, training_scale
from .losses import check_labels, segmentation_loss
from .modeling import MedSegForSegmentation, MedUNetForSegmentation, build_unet_baseline

__all__ = [
    "DECODERS",
    "INFERENCE_FILE",
    "LOSSES",
    "UNET_MULTIPLE",
    "MedSegConfig",
    "MedSegForSegmentation",
    "MedUNetConfig",
    "MedUNetForSegmentation",
    "SegmentationLossConfig",
    "UnetrDecoder",
    "build_unet_baseline",
    "check_labels",
    "default_skip_layers",
    "encoder_fields",
    "load_segmenter",
    "predict",
    "predict_files",
    "save_inference_config",
    "segmentation_loss",
    "training_scale",
]
