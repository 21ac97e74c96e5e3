"""dinoseg's model core: pure PyTorch (+ fsspec for weights). Never imports Ray.

Names load lazily, so `from model.errors import DinosegError` (pipeline CPU tasks do it) does
not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "backbone": ("BACKBONES", "BackboneConfig", "DinoVisionTransformer", "build_backbone"),
    "checkpoint": ("HeadCheckpoint", "parse_head_checkpoint", "save_head_checkpoint"),
    "classes": ("ClassMap", "bundled", "load_class_map"),
    "dinotxt": ("TextHead",),
    "text_head": ("TextHeadRequest", "build_text_head"),
    "tokenizer": ("ClipTokenizer",),
    "errors": ("DinosegError", "ImageInputError", "UnknownModelError", "WeightsError"),
    "hub": ("build_segmenter", "load_backbone", "load_head"),
    "heads": (
        "ConvHead",
        "HeadConfig",
        "LinearHead",
        "PrototypeHead",
        "build_head",
        "default_layers",
        "prototype_state",
    ),
    "segmenter": ("META_MS_SCALES", "InferenceConfig", "Prediction", "Segmenter"),
    "weights": ("SEGMENTATION_MODELS", "describe_models"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
