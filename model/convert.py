"""Bring other layouts of DINOv2 weights to Meta's key names, and check them against a model.

Accepted: Meta's released files as they are; training checkpoints (`teacher`/`model`/`state_dict`
wrappers, `module.`/`backbone.` prefixes, chunked `blocks.K.N.` keys); Hugging Face
`facebook/dinov2-*` (`Dinov2Model` / `Dinov2WithRegistersModel`, optionally under `dinov2.`).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from .errors import WeightsError

_WRAPPERS = ("teacher", "model", "state_dict", "module")
_PREFIXES = ("module.", "backbone.", "dinov2.", "model.")
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")

# Hugging Face name -> Meta name, per block; q/k/v (and SwiGLU's gate/up) are stacked separately.
# Files on the Hub use the first names of each pair, transformers >= 5 state dicts the second.
_HF_BLOCK = {
    "norm1": "norm1",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",
    "mlp.weights_out": "mlp.w3",
    "mlp.down_proj": "mlp.w3",
    "layer_scale2.lambda1": "ls2.gamma",
}
_HF_STACKED = {  # name -> (Meta name, part); parts are concatenated in the order listed
    "attention.attention.query": ("attn.qkv", 0),
    "attention.attention.key": ("attn.qkv", 1),
    "attention.attention.value": ("attn.qkv", 2),
    "attention.q_proj": ("attn.qkv", 0),
    "attention.k_proj": ("attn.qkv", 1),
    "attention.v_proj": ("attn.qkv", 2),
    "mlp.gate_proj": ("mlp.w12", 0),
    "mlp.up_proj": ("mlp.w12", 1),
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap(obj, source: str = "the file") -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint (possibly nested in training wrappers)."""
    while not _is_tensor_dict(obj):
        if not isinstance(obj, Mapping):
            raise WeightsError(f"{source} holds no state dict of tensors: pass a DINOv2 checkpoint.")
        inner = next((obj[k] for k in _WRAPPERS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
            raise WeightsError(f"{source} holds no state dict of tensors: pass a DINOv2 checkpoint.")
        obj = inner
    return dict(obj)


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A training checkpoint holds heads beside the backbone: keep only the backbone's keys.
    if any(k.startswith("backbone.") for k in sd) and not all(k.startswith("backbone.") for k in sd):
        sd = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                changed = True
    return sd


def _from_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    stacked: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        m = re.match(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$", key)
        if not m:
            if key.startswith("pooler."):
                continue  # HF pooler is not part of DINOv2
            raise WeightsError(f"unexpected key '{key}' in a Hugging Face DINOv2 checkpoint")
        n, name, kind = int(m.group(1)), m.group(2), m.group(3)
        if name in _HF_STACKED:
            target, part = _HF_STACKED[name]
            stacked.setdefault(f"blocks.{n}.{target}.{kind}", {})[part] = value
        elif kind == "lambda1":
            out[f"blocks.{n}.{_HF_BLOCK[name + '.lambda1']}"] = value
        elif name in _HF_BLOCK:
            out[f"blocks.{n}.{_HF_BLOCK[name]}.{kind}"] = value
        else:
            raise WeightsError(f"unexpected key '{key}' in a Hugging Face DINOv2 checkpoint")
    for key, parts in stacked.items():
        out[key] = torch.cat([parts[i] for i in sorted(parts)], 0)
    if "mask_token" in out and out["mask_token"].dim() == 3:
        out["mask_token"] = out["mask_token"].reshape(1, -1)
    return out


def to_meta_layout(checkpoint, source: str = "the file") -> dict[str, torch.Tensor]:
    """Any accepted layout -> Meta's released key names."""
    sd = _strip_prefixes(unwrap(checkpoint, source))
    if any(k.startswith("embeddings.") for k in sd):
        sd = _from_hf(sd)
    if any(_CHUNKED.match(k) for k in sd):
        sd = {_CHUNKED.sub(r"blocks.\1.", k): v for k, v in sd.items()}
    return sd


def describe_variant(sd: Mapping[str, torch.Tensor]) -> str | None:
    """A guess at which released variant a Meta-layout state dict belongs to, for error messages."""
    from .backbone import BACKBONES

    pos = sd.get("pos_embed")
    if pos is None or pos.dim() != 3:
        return None
    dim = pos.shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    reg = "register_tokens" in sd
    for name, cfg in BACKBONES.items():
        if cfg.embed_dim == dim and cfg.depth == depth and bool(cfg.num_register_tokens) == reg:
            return name
    return f"a ViT with width {dim} and {depth} blocks"


def key_mismatch(sd: Mapping, expected: Mapping) -> tuple[list[str], list[str], list[str]]:
    """What keeps `sd` from loading strictly into a module whose state dict is `expected`: the
    missing keys, the unexpected ones, and 'key (shape) vs (shape)' for each mismatched shape."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    return missing, unexpected, shapes


def describe_mismatch(sd: Mapping, expected: Mapping) -> str:
    """key_mismatch in a few words ('missing a, b; unexpected c; shape d (1,) vs (2,)'), or ''
    when `sd` fits: for the one-sentence errors of head files."""
    missing, unexpected, shapes = key_mismatch(sd, expected)
    parts = [
        f"missing {', '.join(missing[:3])}" if missing else "",
        f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
        f"shape {', '.join(shapes[:2])}" if shapes else "",
    ]
    return "; ".join(p for p in parts if p)


def check_fits(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise one sentence naming the first mismatched keys/shapes when `sd` is not for `what`."""
    missing, unexpected, shapes = key_mismatch(sd, expected)
    if not (missing or unexpected or shapes):
        return
    parts = []
    if shapes:
        parts.append("shape mismatch: " + ", ".join(shapes[:3]) + (" ..." if len(shapes) > 3 else ""))
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    guess = describe_variant(sd)
    looks = f"; they look like {guess} weights" if guess and guess != what else ""
    raise WeightsError(
        f"These weights do not fit {what} ({'; '.join(parts)}){looks}: "
        f"pass weights of {what}, or choose the model that matches the file."
    )
