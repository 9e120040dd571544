"""Drop-in PS3 (Scaling Vision Pre-Training to 4K Resolution) on ps3-kernels."""

from transformers import AutoConfig, AutoModel

from .configuration_ps3 import PS3Config, PS3TextConfig, PS3VisionConfig
from .image_processing_ps3 import PS3ImageProcessor
from .modeling_ps3 import PS3Model, PS3TextModel, PS3VisionEncoder, PS3VisionModel, PS3VisionModelOutput
from .tokenization_ps3 import PS3Tokenizer
from .vila_hd import VilaHDPipeline, VilaHDProjector
from .vision_tower import PS3VisionTower, load_vila_hd

for _config, _model in ((PS3VisionConfig, PS3VisionModel), (PS3TextConfig, PS3TextModel), (PS3Config, PS3Model)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)

__all__ = [
    "PS3Config",
    "PS3TextConfig",
    "PS3VisionConfig",
    "PS3Model",
    "PS3TextModel",
    "PS3VisionModel",
    "PS3VisionEncoder",
    "PS3VisionModelOutput",
    "PS3ImageProcessor",
    "PS3Tokenizer",
    "PS3VisionTower",
    "VilaHDPipeline",
    "VilaHDProjector",
    "load_vila_hd",
]
