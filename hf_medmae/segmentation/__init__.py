"""Segmentation on a pre-trained ViT encoder (UNETR decoder from MONAI blocks) and a U-Net baseline.

One module per concept: `configuration` (configs, skip layers), `decoder` (UNETR from MONAI blocks),
`losses`, `modeling` (the two segmenters), `builder` (a run's segmenter from its choices), `evaluation` (scores,
confusion matrix, overlays), `inference` (sliding window, folders of files, prediction sets). 2D and 3D are one
code path: `spatial_dims` is recorded in the configs and passed to every MONAI block.
"""

from .builder import build_segmenter, check_segmenter_choice, load_segmentation_encoder
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
from .decoder import LightDecoder, UnetrDecoder
from .evaluation import save_overlays, score_label_maps, write_test_report
from .inference import (
    INFERENCE_FILE,
    load_segmenter,
    predict,
    predict_files,
    predict_volume_files,
    predict_volumes,
    prediction_sets,
    save_inference_config,
    score_predictions,
    segment_sets,
    segment_volume_sets,
    training_scale,
    volume_grid,
)
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
    "LightDecoder",
    "UnetrDecoder",
    "build_segmenter",
    "build_unet_baseline",
    "check_labels",
    "check_segmenter_choice",
    "default_skip_layers",
    "encoder_fields",
    "load_segmentation_encoder",
    "load_segmenter",
    "predict",
    "predict_files",
    "predict_volume_files",
    "predict_volumes",
    "prediction_sets",
    "save_inference_config",
    "save_overlays",
    "score_label_maps",
    "score_predictions",
    "segment_sets",
    "segment_volume_sets",
    "volume_grid",
    "segmentation_loss",
    "training_scale",
    "write_test_report",
]
