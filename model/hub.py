"""Named constructors: a backbone, a head, or a whole Segmenter from names, paths and URLs."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .backbone import IMAGENET_MEAN, IMAGENET_STD, DinoVisionTransformer, backbone_config, build_backbone
from .checkpoint import is_head_checkpoint, parse_head_checkpoint
from .classes import BUNDLED, ClassMap, bundled, default_color
from .convert import check_fits, to_meta_layout
from .errors import DinosegError, WeightsError
from .heads import head_from_mmseg
from .segmenter import InferenceConfig, Segmenter
from .weights import DATASETS, backbone_file, fetch_hub_file, head_file, load_checkpoint, segmentation_model

log = logging.getLogger(__name__)

RANDOM = "random"  # backbone weights: random initialisation (offline demo and tests)
RANDOM_SEED = 0  # the same random backbone in every process: a head trained on it works at segment time


def load_backbone(name: str, weights: str | None = None, storage_options: dict | None = None) -> DinoVisionTransformer:
    """A named backbone with its released weights (from the hub) or the weights at `weights`."""
    if weights == RANDOM:
        log.info("%s has random weights: its features mean nothing beyond local colour", name)  # asked for by name
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            return build_backbone(name)
    # The modules with their parameters on the meta device: a checkpoint replaces every one of
    # them, so neither their random initialisation (2.9 s for ViT-L here) nor a second copy in
    # memory is spent; the loaded tensors become the parameters, in the model's dtype as before.
    with torch.device("meta"):
        model = build_backbone(name)
    source = weights or str(fetch_hub_file(backbone_file(name)))
    sd = to_meta_layout(load_checkpoint(source, storage_options), source)
    expected = model.state_dict()
    check_fits(sd, expected, name)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True, assign=True)
    return model


@dataclass
class LoadedHead:
    head: nn.Module
    classes: ClassMap
    backbone: str
    resolution: int = 512
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    checksum: str = ""
    meta: dict = field(default_factory=dict)


def head_checksum(state_dict: dict) -> str:
    """What resume compares: a digest of a head's tensors, by key."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        h.update(key.encode())
        h.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _classes_for(num_classes: int) -> ClassMap:
    for name in BUNDLED:
        if DATASETS[name] == num_classes:
            return bundled(name)
    return ClassMap(
        tuple(f"class_{i}" for i in range(num_classes)), tuple(default_color(i) for i in range(num_classes))
    )


def load_head(
    source: str, backbone: str | None = None, kind: str | None = None, storage_options: dict | None = None
) -> LoadedHead:
    """A head trained by dinoseg (it names its backbone) or one of Meta's mmseg head files."""
    obj = load_checkpoint(source, storage_options)
    if is_head_checkpoint(obj):
        ckpt = parse_head_checkpoint(obj, source, backbone)
        head = ckpt.build(source)
        return LoadedHead(
            head,
            ckpt.classes,
            ckpt.backbone,
            ckpt.resolution,
            ckpt.mean,
            ckpt.std,
            head_checksum(ckpt.state_dict),
            ckpt.meta,
        )
    if backbone is None:
        raise WeightsError(f"{source} is one of Meta's head files, which do not name their backbone: pass --backbone.")
    cfg = backbone_config(backbone)
    if kind is None:  # Meta's 'ms' heads read 4 blocks: their conv has 4x the backbone's width
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
        w = sd.get("decode_head.conv_seg.weight") if isinstance(sd, dict) else None
        kind = "ms" if w is not None and w.dim() == 4 and w.shape[1] == 4 * cfg.embed_dim else "linear"
    head = head_from_mmseg(obj, kind, cfg.embed_dim, cfg.depth, source)
    return LoadedHead(head, _classes_for(head.config.num_classes), backbone, checksum=head_checksum(head.state_dict()))


def resolve_head(
    model: str | None, backbone: str | None, head: str | None, storage_options: dict | None = None
) -> tuple[LoadedHead, str]:
    """The head `build_segmenter` uses for these arguments, checked against its backbone, and
    the model id it reports. Every refusal of a name or a head file is made here."""
    if model and head:
        raise DinosegError("Both --model and --head were given: pass one (a named model, or a head with its backbone).")
    if model:
        spec = segmentation_model(model)
        if backbone and backbone != spec.backbone:
            raise DinosegError(f"Model {model} uses {spec.backbone}, not {backbone}: leave --backbone out.")
        head_path = str(fetch_hub_file(head_file(spec.backbone, spec.dataset, spec.head)))
        loaded = load_head(head_path, spec.backbone, spec.head, storage_options)
        loaded.classes = bundled(spec.dataset)
        if loaded.head.config.num_classes != len(loaded.classes):  # the hub holds another file under its name
            raise WeightsError(
                f"{head_path} predicts {loaded.head.config.num_classes} classes, not the {len(loaded.classes)} of "
                f"{spec.dataset}: it is not {model}'s head; put the released file there (or point DINOSEG_HUB at a copy of them)."
            )
    elif head:
        loaded = load_head(head, backbone, storage_options=storage_options)
    else:
        raise DinosegError("No model given: pass --model NAME (see `dinoseg models`) or --head URL of a trained head.")
    _check_head_fits_backbone(loaded, head or model)
    return loaded, model or f"{loaded.backbone}+{head}"


def _check_head_fits_backbone(loaded: LoadedHead, source: str) -> None:
    """A head reads blocks of its backbone at its width; a file that says otherwise would fail
    every image on the actors instead of the run at its start."""
    cfg, backbone = loaded.head.config, backbone_config(loaded.backbone)
    layers = list(cfg.layers)
    if cfg.embed_dim != backbone.embed_dim or not layers or not all(0 <= i < backbone.depth for i in layers):
        raise WeightsError(
            f"{source} is a head over {cfg.embed_dim}-wide features of blocks {layers}, and {loaded.backbone} has "
            f"{backbone.embed_dim}-wide blocks 0-{backbone.depth - 1}: the file is damaged or was edited; "
            "retrain or re-export it."
        )


def resolve_config(config: InferenceConfig | None, loaded: LoadedHead) -> InferenceConfig:
    """The inference options with the resolution the head was trained at where none is given."""
    if config is None or config.resolution is None:
        config = replace(config or InferenceConfig(), resolution=loaded.resolution)
    return config


def build_segmenter(
    model: str | None = None,
    *,
    backbone: str | None = None,
    head: str | None = None,
    backbone_weights: str | None = None,
    config: InferenceConfig | None = None,
    device: str | None = None,
    storage_options: dict | None = None,
) -> Segmenter:
    """`model`: a named segmentation model (Meta's backbone + head from the hub); or `head`: a
    head checkpoint (trained by dinoseg, or Meta's with `backbone`). `backbone_weights`
    overrides where the backbone's weights come from. `model.describe.describe_segmenter` makes
    the same checks and reports the same names without building the backbone."""
    loaded, model_id = resolve_head(model, backbone, head, storage_options)
    vit = load_backbone(loaded.backbone, backbone_weights, storage_options)
    config = resolve_config(config, loaded)
    return Segmenter(
        vit, loaded.head, loaded.classes, config, device, loaded.mean, loaded.std, model_id, loaded.checksum
    )


__all__ = ["RANDOM", "LoadedHead", "build_segmenter", "load_backbone", "load_head", "resolve_config", "resolve_head"]
