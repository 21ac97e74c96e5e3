"""Text heads: classes named in words -> a head checkpoint of kind 'text' (`model.dinotxt.TextHead`).

    classes (a class map whose entries may carry `prompts`, or "sky, road, car")
      -> prompts (each class's own, or CLIP's templates filled with its name)
      -> CLIP tokens -> dino.txt's text tower, once (shortest prompts first, cut after their end)
      -> per class: the patch-aligned halves, normalised, averaged, normalised
      -> + dino.txt's vision head -> head.pt, which `segment --head` runs like any other head

Pixels that match no named class: by default every pixel gets its most similar class (Meta's
notebook does this). A background class — an entry with `background: true`, the class named by
`background=`, or a class called "background" — is scored by its prompts like the others; with
a `floor` its score is at least that cosine, so a pixel whose best named class is less similar
than the floor goes to background. An entry with `prompts: []` is scored by the floor alone.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from importlib import resources

import torch

from .classes import BUNDLED, ClassMap, bundled, default_color, read_class_map_file
from .errors import DinosegError, WeightsError

log = logging.getLogger(__name__)

TEMPLATE_SETS = ("imagenet", "clip7", "none")  # CLIP's 80 (Meta's notebook), CLIP's chosen 7, the name alone
DEFAULT_RESOLUTION = 448  # dino.txt trained its heads at 224; twice that gives a 32-patch short side


@dataclass(frozen=True)
class TextHeadRequest:
    """Everything that decides a text head's weights (its digest names the head)."""

    classes: str  # a class-map file / bundled name, or comma-separated names
    templates: str = "imagenet"
    background: str | None = None
    floor: float | None = None
    temperature: float | None = None  # None: model.dinotxt.DEFAULT_TEMPERATURE
    backbone: str | None = None  # None: dino.txt's, dinov2_vitl14_reg
    vision_head: str | None = None  # files; None: from the hub
    text_encoder: str | None = None
    vocabulary: str | None = None
    resolution: int = DEFAULT_RESOLUTION

    def digest(self, storage_options: dict | None = None, spec: "ClassPrompts | None" = None) -> str:
        """Names the head this request makes: its options, and the class names, prompts and
        background they resolve to (a class-map file edited in place gives another digest).
        `spec`: class_prompts(self) where the caller has it already."""
        spec = spec or class_prompts(self, storage_options)
        options = asdict(self)
        options.pop("classes")  # "sky,road" and "sky, road", or two paths to one file, make one head
        made = {
            "request": options,
            "classes": list(spec.classes.names),
            "colors": [list(c) for c in spec.classes.colors],
            "prompts": spec.prompts,
            "background": spec.background,
        }
        return hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()[:16]


def templates(name: str) -> list[str]:
    if name not in TEMPLATE_SETS:
        raise DinosegError(f"Unknown template set '{name}': use one of {', '.join(TEMPLATE_SETS)}.")
    if name == "none":
        return ["{}"]
    data = json.loads(resources.files(__package__).joinpath("data", "prompt_templates.json").read_text())
    return list(data[name])


def is_class_file(spec: str) -> bool:
    """A class-map file or bundled name, not a list of names."""
    spec = spec.strip()
    return spec in BUNDLED or spec.lower().endswith((".yaml", ".yml", ".json")) or "://" in spec


@dataclass(frozen=True)
class ClassPrompts:
    classes: ClassMap
    prompts: list[list[str]]  # per class; [] for a class scored by the floor alone
    background: int | None


def class_prompts(request: TextHeadRequest, storage_options: dict | None = None) -> ClassPrompts:
    spec = request.classes.strip()
    if spec in BUNDLED:
        classes = bundled(spec)
        entries = [{"name": n} for n in classes.names]
    elif is_class_file(spec):
        data = read_class_map_file(spec, storage_options)  # read once: the class map and its prompts
        # ids, colours and checks as everywhere else; the head's outputs count from 0
        classes = ClassMap.from_dict(data, source=spec).internal()
        entries = sorted(data["classes"], key=lambda e: int(e["id"]))
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
        if request.background and request.background not in names:
            names = [request.background, *names]  # VOC's layout: background first
        if not names:
            raise DinosegError("No class names given: pass a class map file or names such as 'sky, road, car'.")
        classes = ClassMap(tuple(names), tuple(default_color(i) for i in range(len(names))))
        entries = [{"name": n} for n in names]
    names = list(classes.names)
    if len(set(names)) != len(names):
        raise DinosegError(
            f"{spec} names a class twice: give each class one entry (several prompts go in its prompts)."
        )
    flagged = [i for i, e in enumerate(entries) if e.get("background") is True]
    if request.background:
        if request.background not in names:
            raise DinosegError(f"--background {request.background} is not one of the classes: name one of {names[:5]}.")
        flagged = [names.index(request.background)]
    elif not flagged:
        flagged = [i for i, n in enumerate(names) if n.lower() == "background"]
    if len(flagged) > 1:
        raise DinosegError(f"{spec} marks {len(flagged)} classes as background: mark one.")
    background = flagged[0] if flagged else None
    pattern = templates(request.templates)
    prompts = []
    for i, entry in enumerate(entries):
        given = entry.get("prompts")
        if given is None:
            prompts.append([t.replace("{}", names[i]) for t in pattern])
        elif isinstance(given, list) and all(isinstance(p, str) and p.strip() for p in given):
            prompts.append(list(given))
        else:
            raise DinosegError(f"class {names[i]!r}: prompts must be a list of texts, e.g. [a photo of a {names[i]}.].")
    for i, p in enumerate(prompts):
        if not p and (i != background or request.floor is None):
            raise DinosegError(
                f"class {names[i]!r} has no prompts: give it some"
                + (", or a --floor to score the background by" if i == background else "")
                + "."
            )
    if request.floor is not None:
        if background is None:
            raise DinosegError(
                "--floor scores a background class, and there is none: name one with --background NAME "
                "(or background: true in the class map)."
            )
        if not -1.0 <= request.floor <= 1.0:
            raise DinosegError(f"--floor {request.floor} is a cosine similarity: give a value in [-1, 1].")
    return ClassPrompts(classes, prompts, background)


def _file(path: str | None, relpath: str, storage_options: dict | None) -> str:
    from .weights import fetch_hub_file

    return path or str(fetch_hub_file(relpath))  # the hub's own options, not the user's


def build_text_head(
    request: TextHeadRequest,
    device: str | None = None,
    precision: str | None = None,
    batch_size: int = 128,
    storage_options: dict | None = None,
):
    """The HeadCheckpoint of a text head. The text tower is loaded, run once over every prompt and
    freed before this returns."""
    from .backbone import backbone_config
    from .checkpoint import HeadCheckpoint
    from .device import PRECISIONS, choose_device, choose_precision
    from .dinotxt import (
        BACKBONE,
        DEFAULT_TEMPERATURE,
        NAME,
        NO_SCORE,
        TEXT_ENCODER_FILE,
        VISION_HEAD_FILE,
        VOCAB_FILE,
        class_embeddings,
        encode_prompts,
        text_config,
        text_encoder_from_state,
        text_state,
        vision_head_from_state,
    )
    from .tokenizer import ClipTokenizer
    from .weights import load_checkpoint

    spec = class_prompts(request, storage_options)
    backbone = request.backbone or BACKBONE
    dim = backbone_config(backbone).embed_dim
    depth = backbone_config(backbone).depth
    temperature = DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
    if not temperature > 0:
        raise DinosegError(f"--temperature {temperature} must be positive, e.g. {DEFAULT_TEMPERATURE}.")

    if backbone_config(backbone).num_register_tokens != 4:
        raise DinosegError(
            f"dino.txt's vision head reads the 4 register tokens of a register backbone, and {backbone} has "
            f"{backbone_config(backbone).num_register_tokens}: use {BACKBONE} (or another *_reg backbone)."
        )
    vision_source = _file(request.vision_head, VISION_HEAD_FILE, storage_options)
    vision = vision_head_from_state(load_checkpoint(vision_source, storage_options), vision_source)
    width = vision.ln_final.weight.shape[0]
    if width != dim:
        raise WeightsError(
            f"{vision_source} is a vision head of width {width}, and {backbone} gives {dim}-wide tokens: "
            f"use the backbone the head was trained on ({BACKBONE} for Meta's)."
        )
    vocab_source = _file(request.vocabulary, VOCAB_FILE, storage_options)
    tokenizer = ClipTokenizer(vocab_source, storage_options)
    texts = [p for prompts in spec.prompts for p in prompts]
    owner = [i for i, prompts in enumerate(spec.prompts) for _ in prompts]

    text_source = _file(request.text_encoder, TEXT_ENCODER_FILE, storage_options)
    encoder = text_encoder_from_state(load_checkpoint(text_source, storage_options), text_source)
    if encoder.config.embed_dim != 2 * dim:
        raise WeightsError(
            f"{text_source} embeds text in {encoder.config.embed_dim} dimensions, which do not pair with a "
            f"{dim}-wide vision head (2 x {dim} expected): pass the text encoder of the same dino.txt model."
        )
    if encoder.config.vocab_size != tokenizer.vocab_size:
        raise WeightsError(
            f"{text_source} has a vocabulary of {encoder.config.vocab_size} tokens and {vocab_source} of "
            f"{tokenizer.vocab_size}: pass the vocabulary of the same dino.txt model."
        )
    where = choose_device(device)
    mixed = choose_precision(precision or "fp32", where)  # fp32 as in Meta's notebook: it runs once
    log.info("text tower: %d prompts for %d classes on %s (%s)", len(texts), len(spec.prompts), where, mixed)
    encoder.to(where)
    ids = tokenizer(texts, context=encoder.config.context)
    embeddings = encode_prompts(encoder, ids, batch_size, None if mixed == "fp32" else PRECISIONS[mixed])
    del encoder
    gc.collect()
    if where.type == "cuda":  # a driver that goes on to run a job should not keep 2 GB of cached blocks
        torch.cuda.empty_cache()

    n = len(spec.classes)
    emb = class_embeddings(embeddings, owner, n, dim)
    scored = torch.tensor([bool(p) for p in spec.prompts])
    floor = torch.full((n,), NO_SCORE)
    if spec.background is not None and request.floor is not None:
        floor[spec.background] = float(request.floor)
    state = text_state(vision, emb, scored, floor, temperature)
    config = text_config((depth - 1,), dim, n, len(vision.block_list), vision.block_list[0].mlp.w1.out_features)
    meta = {
        "dinotxt": NAME,
        "request": request.digest(spec=spec),
        "templates": request.templates,
        "prompts": len(texts),
        "background": spec.classes.names[spec.background] if spec.background is not None else None,
        "floor": request.floor,
    }
    return HeadCheckpoint(backbone, config, spec.classes, state, resolution=request.resolution, meta=meta)


__all__ = ["TEMPLATE_SETS", "TextHeadRequest", "build_text_head", "class_prompts", "templates"]
