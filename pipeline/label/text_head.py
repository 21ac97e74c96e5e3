"""`run_text_head(config)`: a head for classes named in words, from Meta's dino.txt (`dinoseg text-head`).

The text tower runs here, once, on this machine (a GPU when it has one): never per image and never
in the predictor actors, which get a head file like any other (`segment --head OUTPUT.pt`). The
maths and the rules for prompts and background are `model.text_head`'s; this is the command
around them: options, the refusal to replace a head, and the record beside it.
"""

from __future__ import annotations

import logging
import posixpath
import time
from dataclasses import asdict, dataclass
from typing import Optional

from model.errors import DinosegError
from model.text_head import DEFAULT_RESOLUTION, TEMPLATE_SETS, TextHeadRequest
from pipeline.features.config import PRECISIONS
from pipeline.options import argument, option, storage_options_option

log = logging.getLogger("dinoseg.text_head")


@dataclass
class TextHeadConfig:
    classes: str = argument(
        "Class map (YAML/JSON, a bundled name; entries may carry prompts: [...] and background: true), "
        "or comma-separated names such as 'sky, road, car'."
    )
    output: str = argument("Where the head goes (a .pt; a record beside it: .json).")
    templates: str = option(
        "imagenet",
        "Prompts for a class without its own: CLIP's 80 ImageNet templates (as Meta's notebook), its chosen 7, "
        "or the name alone.",
        choices=TEMPLATE_SETS,
    )
    background: Optional[str] = option(
        None, "The class that takes pixels matching no other (added first when the list lacks it)."
    )
    floor: Optional[float] = option(
        None, "Least score (cosine) of the background class: pixels whose best class scores less go to it."
    )
    temperature: Optional[float] = option(
        None, "Softmax temperature of the cosine logits, for confidences (default: model.dinotxt's, 0.01)."
    )
    backbone: Optional[str] = option(None, "Backbone the vision head reads (default: dino.txt's, dinov2_vitl14_reg).")
    vision_head: Optional[str] = option(None, "dino.txt's vision-head file (default: from the hub).")
    text_encoder: Optional[str] = option(None, "dino.txt's text-encoder file (default: from the hub).")
    vocabulary: Optional[str] = option(None, "CLIP's BPE vocabulary, .txt.gz (default: from the hub).")
    resolution: int = option(DEFAULT_RESOLUTION, "Short side images are segmented at by default.")
    device: Optional[str] = option(None, "Where the text tower runs: auto, cpu, cuda (default auto).")
    precision: str = option(
        "fp32",
        "The text tower's precision (it runs once: fp32, as Meta's notebook; auto: bf16 on a GPU).",
        choices=PRECISIONS,
    )
    batch_size: int = option(128, "Prompts per text-tower forward.")
    overwrite: bool = option(False, "Replace the head at OUTPUT if there is one.")
    storage_options: dict = storage_options_option()

    def request(self) -> TextHeadRequest:
        from model.classes import BUNDLED
        from model.text_head import is_class_file
        from pipeline.io.files import absolute_input

        return TextHeadRequest(
            self.classes
            if self.classes in BUNDLED or not is_class_file(self.classes)
            else absolute_input(self.classes),
            self.templates,
            self.background,
            self.floor,
            self.temperature,
            self.backbone,
            absolute_input(self.vision_head),
            absolute_input(self.text_encoder),
            absolute_input(self.vocabulary),
            self.resolution,
        )


def run_text_head(config: TextHeadConfig) -> dict:
    """Build the head, write it to config.output and its record beside it; returns the record."""
    from model.checkpoint import save_head_checkpoint
    from model.storage import scope_config
    from model.text_head import build_text_head
    from pipeline.io.files import absolute_output, refuse_to_replace
    from pipeline.io.records import write_json

    config = scope_config(config)  # plain storage options for the URLs it names, as on a command line

    started = time.time()
    so = config.storage_options or None
    output = absolute_output(config.output)
    if not output.endswith(".pt"):
        raise DinosegError(f"OUTPUT {config.output} must name a .pt file, e.g. heads/text.pt.")
    if config.batch_size < 1:
        raise DinosegError(f"--batch-size {config.batch_size} must be at least 1.")
    if config.resolution < 14:
        raise DinosegError(f"--resolution {config.resolution} must be at least 14 pixels.")
    record = posixpath.splitext(output)[0] + ".json"
    request = config.request()
    if record == request.classes:
        raise DinosegError(
            f"OUTPUT {config.output} would write its record over CLASSES {config.classes}: name the head otherwise."
        )
    refuse_to_replace(output, config.overwrite, so, "OUTPUT")
    refuse_to_replace(record, config.overwrite, so, "OUTPUT (its record, .json, would replace this file)")
    ckpt = build_text_head(request, config.device, config.precision, config.batch_size, so)
    save_head_checkpoint(ckpt, output, so)
    info = {
        "head": output,
        "backbone": ckpt.backbone,
        "classes": list(ckpt.classes.names),
        "prompts": ckpt.meta["prompts"],
        "background": ckpt.meta["background"],
        "request": asdict(request),
        "wall_seconds": round(time.time() - started, 3),
    }
    write_json(record, info, so)
    return info


def summary(info: dict) -> str:
    shown = ", ".join(info["classes"][:8]) + (", ..." if len(info["classes"]) > 8 else "")
    background = f"; background: {info['background']}" if info["background"] else ""
    return (
        f"text head for {len(info['classes'])} classes ({shown}{background}) from {info['prompts']} prompts "
        f"on {info['backbone']}, in {info['wall_seconds']:.1f} s -> {info['head']}"
    )
