"""What a segment run is: its options (declared once, here) and the inference settings they make.
No torch, no Ray: the command line imports it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from model.errors import DinosegError
from pipeline.data.decode import max_megapixels_option
from pipeline.features.config import PRECISIONS
from pipeline.options import address_option, argument, option, storage_options_option
from pipeline.runtime.resources import DECODE_CPUS

DEFAULT_MODEL = "dinov2_vits14_voc2012_linear"
MASK_FORMATS = ("png", "parquet", "both")
MODES = ("whole", "slide")


def _confidence_bits(on) -> int:
    return 8 if on is True else int(on or 0)


@dataclass
class SegmentConfig:
    input: str = argument("Folder, fsspec URL prefix, glob, or manifest (.txt/.csv/.parquet).")
    output: str = argument("Folder or fsspec URL prefix for masks/, predictions/, errors/, run.json.")
    model: Optional[str] = option(DEFAULT_MODEL, "Named segmentation model (see `dinoseg models`).")
    backbone: Optional[str] = option(None, "Backbone name, with --head of one of Meta's head files.")
    head: Optional[str] = option(None, "Head checkpoint URL (trained by dinoseg; it names its backbone).")
    classes_text: Optional[str] = option(
        None,
        "Classes named in words, e.g. 'sky, road, car': a dino.txt text head built first, into OUTPUT/text_head.pt "
        "(`dinoseg text-head` sets prompts and background).",
    )
    backbone_weights: Optional[str] = option(None, "Where the backbone's weights come from (path or URL).")
    resolution: Optional[int] = option(
        None, "Short side the image is resized to (default: the head's training resolution; 512 for Meta's)."
    )
    mode: str = option("whole", "whole image, or Meta's sliding window.", choices=MODES)
    crop: int = option(512, "Sliding-window crop.")
    stride: int = option(341, "Sliding-window stride.")
    tta: bool = option(False, "Flip and Meta's multi-scale test-time augmentation (about 10x the work).")
    precision: str = option("auto", "auto: bf16 on a GPU, fp32 on the CPU.", choices=PRECISIONS)
    batch_size: int = option(8, "Images per predictor call.")
    device: Optional[str] = option(None, "auto, cpu, cuda (default auto).")
    actors: Optional[int] = option(None, "Predictor actors (default: one per GPU, or one on the CPU).")
    gpus_per_actor: Optional[float] = option(None, "GPUs per predictor actor (default 1 with GPUs).")
    cpus_per_actor: Optional[float] = option(None, "CPUs reserved per predictor actor.")
    decode_cpus: float = option(DECODE_CPUS, "CPUs per read/decode/write task.")
    masks: str = option("png", "png files, rows in Parquet, or both.", choices=MASK_FORMATS)
    rle: bool = option(False, "Add per-class COCO RLE to the prediction rows.")
    overlays: bool = option(False, "Write overlays/<key>.jpg to look at.")
    # bits of the confidence/<key>.png maps (8 or 16; 0: none); the command line switches 8 on
    confidence: int = option(
        0,
        "Write confidence/<key>.png: the winning class's probability, 0-255.",
        cli_type=bool,
        cli_default=False,
        parse=_confidence_bits,
    )
    mean_confidence: bool = option(
        False,
        "Fill the predictions' mean_confidence column (null otherwise; --confidence fills it too). "
        "It costs a full-resolution softmax over every class per image.",
    )
    overwrite: bool = option(False, "Redo keys that an earlier run finished.")
    take_over_lease: bool = option(
        False, "Take over OUTPUT's lease from a run known to be dead (a lease without a heartbeat is taken anyway)."
    )
    max_megapixels: float = max_megapixels_option()
    storage_options: dict = storage_options_option()
    address: Optional[str] = address_option()
    max_classes: Optional[int] = None  # for callers whose outputs hold fewer classes (pseudo-labels: 255)
    max_classes_reason: str = ""

    def __post_init__(self):
        if self.classes_text is not None and not self.classes_text.strip():
            raise DinosegError("--classes-text is empty: name the classes, e.g. --classes-text 'sky, road, car'.")
        if self.head and self.classes_text:
            raise DinosegError("Both --head and --classes-text were given: pass one (--classes-text builds the head).")
        if self.head or self.classes_text:
            self.model = None  # a head names its own backbone and classes


def inference_config(config: SegmentConfig):
    from model.segmenter import META_MS_SCALES, InferenceConfig

    extra = {"resolution": config.resolution}  # None: the head's (a dinoseg head names it; Meta's: 512)
    tta = {"flip": True, "scales": META_MS_SCALES} if config.tta else {}
    return InferenceConfig(
        mode=config.mode,
        crop=config.crop,
        stride=config.stride,
        precision=config.precision,
        batch_size=config.batch_size,
        **extra,
        **tta,
    ).validate()


def shrink_for(inference) -> int:
    """The short side decoding may shrink an image to: what the largest TTA view needs."""
    return int(round(inference.resolution * max(inference.scales)))
