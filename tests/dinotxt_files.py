"""dino.txt's files in Meta's layout with random weights, for tests: the state dicts are written
from the key list of Meta's released files (../shared/DESIGN.md, "Facts about dino.txt"), not
from our modules, so a key or shape of ours that drifted fails to load them. The vocabulary is
CLIP's real one, as the `open_clip_torch` package ships it (installed for the tests only)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
from pathlib import Path

import torch

VISION = "dinov2_vitl14/dinov2_vitl14_reg4_dinotxt_tet1280d20h24l_vision_head.pth"
TEXT = "dinov2_vitl14/dinov2_vitl14_reg4_dinotxt_tet1280d20h24l_text_encoder.pth"
VOCAB = "thirdparty/bpe_simple_vocab_16e6.txt.gz"


def _random(seed: int):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.02, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    return r


def vision_head_state(dim: int = 1024, blocks: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Meta's vision-head keys: block_list.N.{norm1, attn.qkv (no bias), attn.proj, ls1.gamma,
    norm2, mlp.w1, mlp.w2, mlp.w3, ls2.gamma}, ln_final. SwiGLU width: int(4 dim 2/3) rounded up to 64."""
    hidden = int(4 * dim * 2 / 3)
    hidden += -hidden % 64
    r = _random(seed)
    sd = {}
    for b in range(blocks):
        p = f"block_list.{b}."
        sd |= {
            p + "norm1.weight": r(dim, std=0.1, mean=1.0),
            p + "norm1.bias": r(dim),
            p + "attn.qkv.weight": r(3 * dim, dim, std=dim**-0.5),
            p + "attn.proj.weight": r(dim, dim, std=dim**-0.5),
            p + "attn.proj.bias": r(dim),
            p + "ls1.gamma": r(dim, std=0.1, mean=0.3),
            p + "norm2.weight": r(dim, std=0.1, mean=1.0),
            p + "norm2.bias": r(dim),
            p + "mlp.w1.weight": r(hidden, dim, std=dim**-0.5),
            p + "mlp.w1.bias": r(hidden),
            p + "mlp.w2.weight": r(hidden, dim, std=dim**-0.5),
            p + "mlp.w2.bias": r(hidden),
            p + "mlp.w3.weight": r(dim, hidden, std=hidden**-0.5),
            p + "mlp.w3.bias": r(dim),
            p + "ls2.gamma": r(dim, std=0.1, mean=0.3),
        }
    sd |= {"ln_final.weight": r(dim, std=0.1, mean=1.0), "ln_final.bias": r(dim)}
    return sd


def text_encoder_state(
    width: int = 1280, layers: int = 24, embed: int = 2048, vocab: int = 49408, context: int = 77, seed: int = 1
) -> dict[str, torch.Tensor]:
    """Meta's text-encoder keys: backbone.{token_embedding, positional_embedding, blocks.N.{
    attention_norm, attention.qkv (no bias), attention.proj, ffn_norm, feed_forward.fc1, fc2},
    ln_final}, head.linear_projection (no bias)."""
    r = _random(seed)
    sd = {"backbone.token_embedding.weight": r(vocab, width), "backbone.positional_embedding": r(context, width)}
    for n in range(layers):
        p = f"backbone.blocks.{n}."
        sd |= {
            p + "attention_norm.weight": r(width, std=0.1, mean=1.0),
            p + "attention_norm.bias": r(width),
            p + "attention.qkv.weight": r(3 * width, width, std=width**-0.5),
            p + "attention.proj.weight": r(width, width, std=width**-0.5),
            p + "attention.proj.bias": r(width),
            p + "ffn_norm.weight": r(width, std=0.1, mean=1.0),
            p + "ffn_norm.bias": r(width),
            p + "feed_forward.fc1.weight": r(4 * width, width, std=width**-0.5),
            p + "feed_forward.fc1.bias": r(4 * width),
            p + "feed_forward.fc2.weight": r(width, 4 * width, std=(4 * width) ** -0.5),
            p + "feed_forward.fc2.bias": r(width),
        }
    sd |= {
        "backbone.ln_final.weight": r(width, std=0.1, mean=1.0),
        "backbone.ln_final.bias": r(width),
        "head.linear_projection.weight": r(embed, width, std=width**-0.5),
    }
    return sd


def clip_vocabulary() -> Path:
    """CLIP's bpe_simple_vocab_16e6.txt.gz as open_clip ships it."""
    dist = importlib.metadata.distribution("open_clip_torch")
    return Path(dist.locate_file("open_clip/bpe_simple_vocab_16e6.txt.gz"))


def reference_tokenizer():
    """open_clip's SimpleTokenizer, loaded from its file alone: the package's __init__ imports
    torchvision, which the tests do not install (it is open_clip's, not ours)."""
    dist = importlib.metadata.distribution("open_clip_torch")
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", dist.locate_file("open_clip/tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(clip_vocabulary()))


def write_dinotxt_hub(root: Path, dim: int = 384, width: int = 128, layers: int = 2, seed: int = 0) -> dict:
    """dino.txt's three files under `root` in the hub's layout; small by default: a vision head
    for a `dim`-wide backbone (384: ViT-S/14) and a `layers`-deep text tower of `width`.
    Returns the state dicts by file."""
    written = {
        VISION: vision_head_state(dim, seed=seed),
        TEXT: text_encoder_state(width, layers, embed=2 * dim, seed=seed + 1),
    }
    for rel, sd in written.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        torch.save(sd, root / rel)
    (root / VOCAB).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(clip_vocabulary(), root / VOCAB)
    return written
