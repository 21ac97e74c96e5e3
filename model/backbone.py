"""DINOv2 vision transformer, key-compatible with Meta's released `*_pretrain.pth` files.

A released checkpoint loads with `load_state_dict(sd, strict=True)` and no renaming; other
layouts (chunked blocks, wrapper prefixes, Hugging Face) go through `model.convert` first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnknownModelError
from .geometry import IMAGENET_MEAN, IMAGENET_STD, PATCH_SIZE
from .layers import Block, PatchEmbed, swiglu_hidden

POS_GRID = 37  # released position embeddings cover a 37x37 patch grid (518 px)


@dataclass(frozen=True)
class BackboneConfig:
    name: str
    embed_dim: int
    depth: int
    num_heads: int
    ffn: str = "mlp"  # "mlp" (fc1/fc2) or "swiglu" (w12/w3, ViT-g)
    num_register_tokens: int = 0
    mlp_ratio: float = 4.0
    patch_size: int = PATCH_SIZE
    pos_grid: int = POS_GRID
    # How Meta resizes position embeddings: the original models pass scale_factor=(n+0.1)/37
    # without antialias, the register models size=(h, w) with antialias.
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _variant(name: str, dim: int, depth: int, heads: int, ffn: str = "mlp") -> dict:
    plain = BackboneConfig(name, dim, depth, heads, ffn)
    reg = BackboneConfig(
        f"{name}_reg",
        dim,
        depth,
        heads,
        ffn,
        num_register_tokens=4,
        interpolate_offset=0.0,
        interpolate_antialias=True,
    )
    return {plain.name: plain, reg.name: reg}


BACKBONES: dict[str, BackboneConfig] = {
    **_variant("dinov2_vits14", 384, 12, 6),
    **_variant("dinov2_vitb14", 768, 12, 12),
    **_variant("dinov2_vitl14", 1024, 24, 16),
    **_variant("dinov2_vitg14", 1536, 40, 24, "swiglu"),
}


def backbone_config(name: str) -> BackboneConfig:
    try:
        return BACKBONES[name]
    except KeyError:
        known = ", ".join(BACKBONES)
        raise UnknownModelError(f"Unknown backbone '{name}'; choose one of: {known}.") from None


class DinoVisionTransformer(nn.Module):
    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.embed_dim = d
        self.patch_size = config.patch_size
        self.num_register_tokens = config.num_register_tokens
        self.patch_embed = PatchEmbed(config.patch_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.pos_grid**2, d))
        if config.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # unused at inference, kept for strict loading
        self.blocks = nn.ModuleList(
            Block(d, config.num_heads, config.mlp_ratio, config.ffn) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random weights in the spirit of Meta's init (tests and the offline demo use them)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.num_register_tokens:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def device(self) -> torch.device:
        return self.cls_token.device

    def interpolate_pos_encoding(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an h x w patch grid, computed in fp32 as Meta does."""
        grid = self.config.pos_grid
        if h == grid and w == grid:
            return self.pos_embed
        pos = self.pos_embed.float()
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        patch_pos = patch_pos.reshape(1, grid, grid, self.embed_dim).permute(0, 3, 1, 2)
        offset = self.config.interpolate_offset
        if offset:
            resize = {"scale_factor": ((h + offset) / grid, (w + offset) / grid)}
        else:
            resize = {"size": (h, w)}
        patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=self.config.interpolate_antialias, **resize)
        if patch_pos.shape[-2:] != (h, w):  # the offset exists to make this hold
            raise RuntimeError(f"position embedding resized to {tuple(patch_pos.shape[-2:])}, not {(h, w)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, self.embed_dim)
        return torch.cat((cls_pos, patch_pos), dim=1).to(self.pos_embed.dtype)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> tokens [CLS, registers, patches]; H and W must be multiples of 14."""
        b, _, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"input {height}x{width} is not a multiple of the patch size {p}; pad it first")
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(height // p, width // p).to(tokens.dtype)
        if self.num_register_tokens:  # inserted after the position embeddings, between CLS and patches
            regs = self.register_tokens.expand(b, -1, -1).to(tokens.dtype)
            tokens = torch.cat((tokens[:, :1], regs, tokens[:, 1:]), dim=1)
        return tokens

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.prepare_tokens(x)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": tokens[:, 0],
            "x_norm_regtokens": tokens[:, 1 : 1 + r],
            "x_norm_patchtokens": tokens[:, 1 + r :],
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS token after the final norm, as Meta's hub models return it."""
        return self.forward_features(x)["x_norm_clstoken"]

    def block_indices(self, n: int | Sequence[int]) -> list[int]:
        """Meta's `n`: an int means the last n blocks, a sequence names block indices."""
        depth = len(self.blocks)
        if isinstance(n, int):
            if not 1 <= n <= depth:
                raise ValueError(f"n={n} must be between 1 and the depth {depth}")
            return list(range(depth - n, depth))
        indices = [i + depth if i < 0 else i for i in n]  # negative indices count from the end
        if not indices or any(not 0 <= i < depth for i in indices) or len(set(indices)) != len(indices):
            raise ValueError(f"block indices {list(n)} must be distinct and lie in [0, {depth})")
        return sorted(indices)  # outputs come in block order, as in Meta's loop

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
        return_register_tokens: bool = False,
    ) -> tuple:
        """Outputs of the chosen blocks with Meta's semantics, registers dropped unless asked for.

        Each output is the patch tokens (B, N, D), or (B, D, H/14, W/14) with `reshape`; with
        `return_class_token` each is a (patches, cls) pair, with `return_register_tokens` a
        (patches, registers (B, r, D)) pair, with both a (patches, cls, registers) triple (as
        dino.txt's wrapper of the backbone returns them). Blocks after the last one asked for
        are not run.
        """
        wanted = self.block_indices(n)
        tokens = self.prepare_tokens(x)
        taken: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks[: max(wanted) + 1]):
            tokens = block(tokens)
            if i in wanted:
                taken[i] = tokens
        outputs = [self.norm(taken[i]) if norm else taken[i] for i in wanted]
        r = self.num_register_tokens
        cls = [out[:, 0] for out in outputs]
        patches = [out[:, 1 + r :] for out in outputs]
        if reshape:
            b, _, height, width = x.shape
            h, w = height // self.patch_size, width // self.patch_size
            patches = [p.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        extra = [cls] if return_class_token else []
        if return_register_tokens:
            extra.append([out[:, 1 : 1 + r] for out in outputs])
        if extra:
            return tuple(zip(patches, *extra, strict=True))
        return tuple(patches)


def build_backbone(name_or_config: str | BackboneConfig) -> DinoVisionTransformer:
    """An untrained backbone of a named variant (weights come from `model.weights`)."""
    config = name_or_config if isinstance(name_or_config, BackboneConfig) else backbone_config(name_or_config)
    return DinoVisionTransformer(config)


def count_flops(config: BackboneConfig, height: int, width: int) -> float:
    """Multiply-add FLOPs (x2) of one forward pass at height x width: matmuls and attention."""
    patches = (height // config.patch_size) * (width // config.patch_size)
    d, tokens = config.embed_dim, 1 + config.num_register_tokens + patches
    flops = 2 * patches * 3 * config.patch_size**2 * d  # patch embedding
    if config.ffn == "swiglu":
        hidden = swiglu_hidden(d, config.mlp_ratio)
        mlp = 2 * tokens * (d * 2 * hidden + hidden * d)
    else:
        mlp = 2 * tokens * 2 * d * int(d * config.mlp_ratio)
    attn = 2 * tokens * 4 * d * d + 2 * 2 * tokens * tokens * d
    return float(flops + config.depth * (attn + mlp))


__all__ = [
    "BACKBONES",
    "BackboneConfig",
    "DinoVisionTransformer",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PATCH_SIZE",
    "backbone_config",
    "build_backbone",
    "count_flops",
]
