"""hf_medmae: masked-autoencoder pre-training and transfer for medical images on Hugging Face.

    >>> from hf_medmae import MedMAEConfig, MedMAEForPreTraining, load_encoder
"""

from .configuration import MedMAEConfig
from .errors import CheckpointError, ConfigError, DataError, MedMAEError
from .masking import MASK_GENERATORS, build_mask_generator
from .modeling_mae import MedMAEForPreTraining

__version__ = "0.1.0"

__all__ = [
    "MedMAEConfig",
    "MedMAEForPreTraining",
    "MASK_GENERATORS",
    "build_mask_generator",
    "MedMAEError",
    "ConfigError",
    "DataError",
    "CheckpointError",
]
