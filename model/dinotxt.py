"""Meta's dino.txt ("DINOv2 Meets Text", arXiv 2412.16334): the vision head and the text tower,
key-compatible with the released files (`load_state_dict(strict=True)`, no renaming).

- Vision head: two pre-norm blocks (no qkv bias, LayerScale, SwiGLU with separate `w1`/`w2`)
  over [CLS, registers, patches] of the backbone's last block after its final norm, then
  `ln_final`. LayerNorms here use torch's default eps (1e-5); the backbone's use 1e-6.
- Text tower: token + position embeddings, causal pre-norm blocks (GELU MLP, no LayerScale),
  `ln_final`, the token at the end-of-text id (the largest id) pooled, a bias-free projection
  to twice the vision width: [global half | patch-aligned half].

Dense use (`TextHead`): each patch token of the vision head, normalised, against the normalised
patch-aligned half of each class's text embedding; cosine / temperature on the patch grid, which
the Segmenter upsamples like every other head's logits. The text tower runs once per head, on
the machine that builds it (`encode_prompts`), never per image.

Widths and depths are read from the files' shapes (head width 64, as in CLIP and DINOv2), so
the same code loads Meta's files and the small random ones the tests build.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .convert import describe_mismatch
from .errors import WeightsError
from .heads import HeadConfig
from .layers import Attention, LayerScale, Mlp

log = logging.getLogger(__name__)

NAME = "dinov2_vitl14_reg4_dinotxt_tet1280d20h24l"
BACKBONE = "dinov2_vitl14_reg"  # the frozen backbone dino.txt's heads were trained on
VISION_HEAD_FILE = f"dinov2_vitl14/{NAME}_vision_head.pth"
TEXT_ENCODER_FILE = f"dinov2_vitl14/{NAME}_text_encoder.pth"
VOCAB_FILE = "thirdparty/bpe_simple_vocab_16e6.txt.gz"
HEAD_WIDTH = 64  # per attention head, in both towers: 1024 / 16, 1280 / 20
KIND = "text"
DEFAULT_TEMPERATURE = 0.01  # CLIP's trained logit scale (100); dino.txt's is not released
NO_SCORE = -2.0  # below any cosine: a class scored by its floor alone


def aligned_swiglu_hidden(dim: int, align: int = 64) -> int:
    """dino.txt's SwiGLU width: 2/3 of 4 x dim, rounded up to a multiple of `align` (1024 -> 2752)."""
    d = int(4 * dim * 2 / 3)
    return d + (-d % align)


class SwiGLUAligned(nn.Module):
    """silu(w1 x) * (w2 x), projected back by w3; w1 and w2 are separate (ViT-g packs them)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class VisionBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, dim // HEAD_WIDTH, qkv_bias=False)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwiGLUAligned(dim, hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionHead(nn.Module):
    """[CLS, registers, patches] of the backbone -> the same tokens, aligned with text."""

    def __init__(self, dim: int, blocks: int = 2, hidden: int | None = None):
        super().__init__()
        self.block_list = nn.ModuleList(VisionBlock(dim, hidden or aligned_swiglu_hidden(dim)) for _ in range(blocks))
        self.ln_final = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.block_list:
            tokens = block(tokens)
        return self.ln_final(tokens)


class TextBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = Attention(dim, dim // HEAD_WIDTH, qkv_bias=False, causal=True)
        self.ffn_norm = nn.LayerNorm(dim)
        self.feed_forward = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    context: int = 77
    width: int = 1280
    layers: int = 24
    hidden: int = 5120
    embed_dim: int = 2048  # the projection's output: [global | patch-aligned], each the vision width


class TextTransformer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.zeros(config.context, config.width))
        self.blocks = nn.ModuleList(TextBlock(config.width, config.hidden) for _ in range(config.layers))
        self.ln_final = nn.LayerNorm(config.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_final(x)


class _Projection(nn.Module):
    def __init__(self, width: int, embed_dim: int):
        super().__init__()
        self.linear_projection = nn.Linear(width, embed_dim, bias=False)


class TextEncoder(nn.Module):
    """Token ids (B, L) -> text embeddings (B, embed_dim), pooled at the end-of-text token."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.backbone = TextTransformer(config)
        self.head = _Projection(config.width, config.embed_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone(ids)
        pooled = tokens[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]
        return self.head.linear_projection(pooled)


# ---- reading the released files -----------------------------------------------------------------

_INDEX = re.compile(r"^(?:block_list|backbone\.blocks)\.(\d+)\.")


def _count(sd: dict, prefix: str) -> int:
    found = {int(m.group(1)) for k in sd if k.startswith(prefix) and (m := _INDEX.match(k))}
    return max(found) + 1 if found else 0


def _tensor(sd: dict, key: str, what: str, fix: str) -> torch.Tensor:
    value = sd.get(key)
    if not isinstance(value, torch.Tensor):
        raise WeightsError(f"{what} has no '{key}': it is not {fix}.")
    return value


def _unwrap(obj, what: str) -> dict:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{what} holds no state dict of tensors: pass one of Meta's dino.txt files.")
    return obj


def _load_strict(module: nn.Module, sd: dict, what: str, fix: str) -> None:
    expected = module.state_dict()
    found = describe_mismatch(sd, expected)
    if found:
        raise WeightsError(f"{what} does not fit {fix} ({found}): pass the file of that name from Meta's hub.")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True, assign=True)


VISION_FIX = "dino.txt's vision head (*_dinotxt_*_vision_head.pth)"
TEXT_FIX = "dino.txt's text encoder (*_dinotxt_*_text_encoder.pth)"


def vision_head_from_state(obj, what: str) -> VisionHead:
    """A VisionHead holding the weights of Meta's vision-head file (shapes give its size)."""
    sd = _unwrap(obj, what)
    dim = int(_tensor(sd, "ln_final.weight", what, VISION_FIX).shape[0])
    blocks = _count(sd, "block_list.")
    if not blocks:
        raise WeightsError(f"{what} has no 'block_list.N.' blocks: it is not {VISION_FIX}.")
    hidden = int(_tensor(sd, "block_list.0.mlp.w1.weight", what, VISION_FIX).shape[0])
    if dim % HEAD_WIDTH:
        raise WeightsError(f"{what} has width {dim}, not a multiple of {HEAD_WIDTH}: it is not {VISION_FIX}.")
    with torch.device("meta"):
        head = VisionHead(dim, blocks, hidden)
    _load_strict(head, sd, what, VISION_FIX)
    return head


def text_config_from_state(sd: dict, what: str) -> TextConfig:
    emb = _tensor(sd, "backbone.token_embedding.weight", what, TEXT_FIX)
    pos = _tensor(sd, "backbone.positional_embedding", what, TEXT_FIX)
    proj = _tensor(sd, "head.linear_projection.weight", what, TEXT_FIX)
    fc1 = _tensor(sd, "backbone.blocks.0.feed_forward.fc1.weight", what, TEXT_FIX)
    width = int(emb.shape[1])
    if width % HEAD_WIDTH:
        raise WeightsError(f"{what} has width {width}, not a multiple of {HEAD_WIDTH}: it is not {TEXT_FIX}.")
    return TextConfig(
        vocab_size=int(emb.shape[0]),
        context=int(pos.shape[0]),
        width=width,
        layers=_count(sd, "backbone.blocks."),
        hidden=int(fc1.shape[0]),
        embed_dim=int(proj.shape[0]),
    )


def text_encoder_from_state(obj, what: str) -> TextEncoder:
    """A TextEncoder holding the weights of Meta's text-encoder file. Built on the meta device and
    given the loaded tensors (memory-mapped by `load_checkpoint`): no second copy of 0.5 B
    parameters, no random initialisation."""
    sd = _unwrap(obj, what)
    config = text_config_from_state(sd, what)
    with torch.device("meta"):
        encoder = TextEncoder(config)
    _load_strict(encoder, sd, what, TEXT_FIX)
    return encoder.eval()


@torch.inference_mode()
def encode_prompts(
    encoder: TextEncoder, ids: torch.Tensor, batch_size: int = 128, autocast_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Token ids (N, context) -> float32 embeddings (N, embed_dim).

    Prompts are run shortest first, each batch cut after its longest prompt's end-of-text token:
    attention is causal, so the tokens after it change nothing the pooled token sees, and a
    prompt of 12 tokens costs 12 positions, not 77."""
    device = next(encoder.parameters()).device
    lengths = ids.argmax(dim=-1) + 1  # the end-of-text id is the vocabulary's largest
    order = torch.argsort(lengths, stable=True)
    out = torch.empty(len(ids), encoder.config.embed_dim, dtype=torch.float32)
    started = time.perf_counter()
    for i in range(0, len(ids), batch_size):
        if i:
            rate = i / (time.perf_counter() - started)
            log.info("text tower: %d of %d prompts, %.1f prompts/s", i, len(ids), rate)
        rows = order[i : i + batch_size]
        batch = ids[rows, : int(lengths[rows].max())].to(device)
        mixed = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with mixed:
            out[rows] = encoder(batch).float().cpu()
    return out


def class_embeddings(embeddings: torch.Tensor, prompt_class: Sequence[int], num_classes: int, dim: int) -> torch.Tensor:
    """Per class: the patch-aligned half of each of its prompts' embeddings, normalised, averaged
    and normalised again (Meta's notebook and CLIP average normalised prompt embeddings).
    Classes without prompts get a zero row."""
    patch_half = F.normalize(embeddings[:, -dim:].float(), dim=-1)
    index = torch.as_tensor(list(prompt_class), dtype=torch.long)
    summed = torch.zeros(num_classes, dim).index_add_(0, index, patch_half)
    return F.normalize(summed, dim=-1)  # a zero row stays zero


# ---- the head -----------------------------------------------------------------------------------


def text_config(layers: Sequence[int], embed_dim: int, num_classes: int, blocks: int, hidden: int) -> HeadConfig:
    return HeadConfig(
        KIND,
        tuple(int(i) for i in layers),
        embed_dim,
        num_classes,
        extra={"blocks": int(blocks), "hidden": int(hidden)},
    )


class TextHead(nn.Module):
    """Open-vocabulary segmentation head: dino.txt's vision head, then cosine similarity of each
    patch to each class's text embedding.

    State: the vision head's weights (`block_list.*`, `ln_final.*`), `embeddings` (C, D) unit rows
    (zero for a class scored by its floor alone), `scored` (C,) which rows count, `floor` (C,)
    the least score of each class (NO_SCORE but for a background class) and `temperature` ().
    Logit = max(cosine, floor) / temperature, so the Segmenter's softmax is the confidence."""

    reads_tokens = True  # the Segmenter passes (patches, cls, registers) of the last block

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        d = config.embed_dim
        hidden = int(config.extra.get("hidden") or aligned_swiglu_hidden(d))
        vision = VisionHead(d, int(config.extra.get("blocks", 2)), hidden)
        self.block_list, self.ln_final = vision.block_list, vision.ln_final
        self.register_buffer("embeddings", torch.zeros(config.num_classes, d))
        self.register_buffer("scored", torch.ones(config.num_classes, dtype=torch.bool))
        self.register_buffer("floor", torch.full((config.num_classes,), NO_SCORE))
        self.register_buffer("temperature", torch.tensor(DEFAULT_TEMPERATURE))

    def patch_tokens(self, features) -> torch.Tensor:
        """(patches (B, D, h, w), cls (B, D), registers (B, r, D)) -> aligned patches (B, D, h, w)."""
        patches, cls, registers = features[-1]
        b, d, h, w = patches.shape
        tokens = torch.cat([cls[:, None], registers, patches.flatten(2).transpose(1, 2)], dim=1)
        for block in self.block_list:
            tokens = block(tokens)
        tokens = self.ln_final(tokens)[:, 1 + registers.shape[1] :]
        return tokens.transpose(1, 2).reshape(b, d, h, w)

    def forward(self, features) -> torch.Tensor:
        x = self.patch_tokens(features)
        with torch.autocast(x.device.type, enabled=False):  # cosines in fp32, as prototype heads do
            x = F.normalize(x.float(), dim=1)
            sims = torch.einsum("bdhw,cd->bchw", x, self.embeddings.float())
            sims = sims.masked_fill(~self.scored[None, :, None, None], NO_SCORE)
            sims = torch.maximum(sims, self.floor.float()[None, :, None, None])
            return sims / self.temperature.float()


def text_state(
    vision: VisionHead,
    embeddings: torch.Tensor,
    scored: torch.Tensor,
    floor: torch.Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
) -> dict:
    if not temperature > 0:
        raise WeightsError(f"temperature {temperature} must be positive, e.g. {DEFAULT_TEMPERATURE}.")
    state = {k: v.detach().float().cpu().contiguous() for k, v in vision.state_dict().items()}
    state.update(
        embeddings=(F.normalize(embeddings.float(), dim=-1) * scored[:, None]).contiguous(),
        scored=scored.bool().contiguous(),
        floor=floor.float().contiguous(),
        temperature=torch.tensor(float(temperature)),
    )
    return state


__all__ = [
    "BACKBONE",
    "KIND",
    "NAME",
    "TEXT_ENCODER_FILE",
    "VISION_HEAD_FILE",
    "VOCAB_FILE",
    "TextConfig",
    "TextEncoder",
    "TextHead",
    "VisionHead",
    "class_embeddings",
    "encode_prompts",
    "text_encoder_from_state",
    "text_state",
    "vision_head_from_state",
]
