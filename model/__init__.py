"""dinoseg's model core: pure PyTorch (+ fsspec for weights). Never imports Ray."""

from .backbone import BACKBONES, BackboneConfig, DinoVisionTransformer, build_backbone
from .checkpoint import HeadCheckpoint, parse_head_checkpoint, save_head_checkpoint
from .classes import ClassMap, bundled, load_class_map
from .errors import DinosegError, ImageInputError, UnknownModelError, WeightsError
from .heads import ConvHead, HeadConfig, LinearHead, build_head, default_layers
from .hub import build_segmenter, load_backbone, load_head
from .segmenter import META_MS_SCALES, InferenceConfig, Prediction, Segmenter
from .weights import SEGMENTATION_MODELS, describe_models

__all__ = [
    "BACKBONES", "BackboneConfig", "ClassMap", "ConvHead", "DinoVisionTransformer", "DinosegError",
    "HeadCheckpoint", "HeadConfig", "ImageInputError", "InferenceConfig", "LinearHead", "META_MS_SCALES",
    "Prediction", "SEGMENTATION_MODELS", "Segmenter", "UnknownModelError", "WeightsError", "build_backbone",
    "build_head", "build_segmenter", "bundled", "default_layers", "describe_models", "load_backbone",
    "load_class_map", "load_head", "parse_head_checkpoint", "save_head_checkpoint",
]
