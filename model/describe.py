"""What a Segmenter would be, learnt without building it: for a job's driver (a cluster's head
node), which only validates the options and names the model before the actors build it.

`describe_segmenter` takes `build_segmenter`'s arguments and raises the same one-sentence errors
for the same bad names and files: the head file is loaded and checked exactly as the build does
(it is small); the backbone's weights file is opened memory-mapped and its keys and shapes are
compared with the architecture's, read from `backbone_shapes` (the config's arithmetic, no
module: building one, even on the meta device, runs torch's meta kernels, whose first use
imports torch._dynamo, about 4 s here). No backbone parameter is allocated, initialised, cast or
read: 'random' weights cost nothing (the build initialises them: 1.1 GB and seconds for ViT-L),
nor does a bf16 file (the build casts it to float32). A legacy (non-zip) checkpoint and the
stacked q|k|v of a Hugging Face layout are read as the build reads them (no mmap there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backbone import BackboneConfig, backbone_config
from .classes import ClassMap
from .convert import check_fits, to_meta_layout
from .device import choose_precision
from .heads import HeadConfig
from .hub import RANDOM, resolve_config, resolve_head
from .layers import swiglu_hidden
from .segmenter import InferenceConfig
from .weights import backbone_file, fetch_hub_file, load_checkpoint


@dataclass(frozen=True)
class SegmenterDescription:
    """What `build_segmenter` with the same arguments reports (a Segmenter's attributes of the
    same names), without its modules."""

    model_id: str
    classes: ClassMap
    head_checksum: str
    config: InferenceConfig  # validated, the resolution resolved (the head's when None)
    mean: tuple[float, ...]  # as the Segmenter holds them: float32, for digests that match
    std: tuple[float, ...]
    backbone: str  # the backbone's name (Segmenter.backbone.config.name)
    head: HeadConfig

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def backbone_shapes(config: BackboneConfig) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes of `build_backbone(config)`, in its order, from the config
    alone (tests hold it equal to the module's for every variant)."""
    d, hidden = config.embed_dim, int(config.embed_dim * config.mlp_ratio)
    shapes: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + config.pos_grid**2, d)}
    if config.num_register_tokens:
        shapes["register_tokens"] = (1, config.num_register_tokens, d)
    shapes["mask_token"] = (1, d)
    shapes["patch_embed.proj.weight"] = (d, 3, config.patch_size, config.patch_size)
    shapes["patch_embed.proj.bias"] = (d,)
    if config.ffn == "swiglu":
        h = swiglu_hidden(d, config.mlp_ratio)
        mlp = {"mlp.w12.weight": (2 * h, d), "mlp.w12.bias": (2 * h,), "mlp.w3.weight": (d, h), "mlp.w3.bias": (d,)}
    else:
        mlp = {"mlp.fc1.weight": (hidden, d), "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (d, hidden)}
        mlp["mlp.fc2.bias"] = (d,)
    block = {
        "norm1.weight": (d,),
        "norm1.bias": (d,),
        "attn.qkv.weight": (3 * d, d),
        "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d),
        "attn.proj.bias": (d,),
        "ls1.gamma": (d,),
        "norm2.weight": (d,),
        "norm2.bias": (d,),
        **mlp,
        "ls2.gamma": (d,),
    }
    for n in range(config.depth):
        shapes.update({f"blocks.{n}.{k}": v for k, v in block.items()})
    shapes["norm.weight"] = (d,)
    shapes["norm.bias"] = (d,)
    return shapes


def check_backbone_weights(name: str, weights: str | None = None, storage_options: dict | None = None) -> None:
    """`load_backbone(name, weights)`'s refusals (no such file, not a checkpoint, truncated, the
    wrong model's weights, keys missing) without loading: the file is memory-mapped (a remote
    one fetched to a temporary file, as the build does), only its index is read."""
    if weights == RANDOM:
        return  # nothing to check: the build initialises it
    source = weights or str(fetch_hub_file(backbone_file(name)))
    sd = to_meta_layout(load_checkpoint(source, storage_options), source)
    # empty meta tensors carry the shapes check_fits compares; making them runs no kernel
    expected = {k: torch.empty(shape, device="meta") for k, shape in backbone_shapes(backbone_config(name)).items()}
    check_fits(sd, expected, name)


def describe_segmenter(
    model: str | None = None,
    *,
    backbone: str | None = None,
    head: str | None = None,
    backbone_weights: str | None = None,
    config: InferenceConfig | None = None,
    storage_options: dict | None = None,
) -> SegmenterDescription:
    """`build_segmenter`'s checks and report for these arguments, without building it (see the
    module's docstring). The device is not asked for: the driver may have none of the actors'."""
    loaded, model_id = resolve_head(model, backbone, head, storage_options)
    check_backbone_weights(loaded.backbone, backbone_weights, storage_options)
    config = resolve_config(config, loaded).validate()
    choose_precision(config.precision, torch.device("cpu"))  # an unknown precision: the Segmenter's sentence
    # the float32 round trip the Segmenter's buffers make (x 255 and back), so digests match its
    mean, std = (
        (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) * 255 / 255).flatten().tolist()
        for v in (loaded.mean, loaded.std)
    )
    return SegmenterDescription(
        model_id, loaded.classes, loaded.checksum, config, tuple(mean), tuple(std), loaded.backbone, loaded.head.config
    )


__all__ = ["SegmenterDescription", "backbone_shapes", "check_backbone_weights", "describe_segmenter"]
