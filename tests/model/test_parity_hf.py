"""Parity with Hugging Face transformers' DINOv2 (an independent implementation): same weights, same outputs.

The mapping from our (Meta) key names to transformers' is written here, independently of
`model.convert`, so that a wrong mapping on either side shows up as a failing comparison.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import pytest
import torch

from model.backbone import BackboneConfig, build_backbone
from model.convert import to_meta_layout
from model.layers import swiglu_hidden

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

ATOL = 1e-4

# Shallow versions of real variants: ViT-S width/heads (mlp), and a narrow SwiGLU (ViT-g layout).
PLAIN_S = BackboneConfig("vits_shallow", 384, 2, 6)
REG_S = BackboneConfig(
    "vits_reg_shallow", 384, 2, 6, num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True
)
PLAIN_G = BackboneConfig("swiglu_shallow", 96, 2, 3, ffn="swiglu")
REG_G = BackboneConfig(
    "swiglu_reg_shallow",
    96,
    2,
    3,
    ffn="swiglu",
    num_register_tokens=4,
    interpolate_offset=0.0,
    interpolate_antialias=True,
)


# ---------------------------------------------------------------------------------------------
# helpers


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Noise on every parameter, so that no LayerScale is ~0, no norm is identity, no bias is 0."""
    g = torch.Generator().manual_seed(seed)

    def noise(p, std):
        return torch.randn(p.shape, generator=g) * std

    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.copy_(0.5 + noise(p, 0.2))
        elif re.search(r"norm\d?\.weight$", name):
            p.copy_(1.0 + noise(p, 0.1))
        elif name.endswith("bias"):
            p.add_(noise(p, 0.05))
        elif name in ("cls_token", "pos_embed", "register_tokens", "mask_token"):
            p.add_(noise(p, 0.5))
        else:  # matrices and the patch convolution
            p.add_(noise(p, 0.04))


def ours_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta layout -> transformers 5 layout (q/k/v and gate/up split out of the packed matrices)."""
    top = {
        "cls_token": "embeddings.cls_token",
        "mask_token": "embeddings.mask_token",
        "pos_embed": "embeddings.position_embeddings",
        "register_tokens": "embeddings.register_tokens",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    per_block = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn.proj": "attention.o_proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "mlp.w3": "mlp.down_proj",
    }
    out = {}
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value.clone()
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)", key)
        assert m, f"unexpected key {key}"
        n, name, kind = m.groups()
        prefix = f"encoder.layer.{n}."
        if kind == "gamma":
            out[prefix + {"ls1": "layer_scale1", "ls2": "layer_scale2"}[name] + ".lambda1"] = value.clone()
        elif name == "attn.qkv":
            q, k, v = value.chunk(3, dim=0)
            for part, t in zip(("q_proj", "k_proj", "v_proj"), (q, k, v), strict=True):
                out[f"{prefix}attention.{part}.{kind}"] = t.clone()
        elif name == "mlp.w12":
            gate, up = value.chunk(2, dim=0)
            out[f"{prefix}mlp.gate_proj.{kind}"] = gate.clone()
            out[f"{prefix}mlp.up_proj.{kind}"] = up.clone()
        else:
            out[f"{prefix}{per_block[name]}.{kind}"] = value.clone()
    return out


def hf_to_old_hub_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-5 names -> the names in the files on the Hub (older transformers)."""
    rename = {
        "attention.q_proj": "attention.attention.query",
        "attention.k_proj": "attention.attention.key",
        "attention.v_proj": "attention.attention.value",
        "attention.o_proj": "attention.output.dense",
        "mlp.down_proj": "mlp.weights_out",
    }
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"(encoder\.layer\.\d+\.)(.+)\.(weight|bias)", key)
        if m and m.group(2) in rename:
            out[f"{m.group(1)}{rename[m.group(2)]}.{m.group(3)}"] = value
        elif m and m.group(2) == "mlp.gate_proj":
            up = sd[f"{m.group(1)}mlp.up_proj.{m.group(3)}"]
            out[f"{m.group(1)}mlp.weights_in.{m.group(3)}"] = torch.cat([value, up], 0)  # packed gate|up
        elif m and m.group(2) == "mlp.up_proj":
            continue
        else:
            out[key] = value
    return out


def make_hf(cfg: BackboneConfig):
    common = {
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "mlp_ratio": int(cfg.mlp_ratio),
        "image_size": 518,
        "patch_size": 14,
        "layer_norm_eps": 1e-6,
        "use_swiglu_ffn": cfg.ffn == "swiglu",
    }
    if cfg.num_register_tokens:
        hf_cfg = Dinov2WithRegistersConfig(num_register_tokens=cfg.num_register_tokens, **common)
        hf_cfg._attn_implementation = "eager"
        return Dinov2WithRegistersModel(hf_cfg).eval()
    hf_cfg = Dinov2Config(**common)
    hf_cfg._attn_implementation = "eager"
    return Dinov2Model(hf_cfg).eval()


@functools.lru_cache(maxsize=None)  # each pair is built once per session; tests only read them
def pair(cfg: BackboneConfig, seed: int = 0):
    torch.manual_seed(seed)
    ours = build_backbone(cfg).eval()
    randomize_(ours, seed + 1)
    hf = make_hf(cfg)
    hf.load_state_dict(ours_to_hf(ours.state_dict()), strict=True)
    return ours, hf


def our_tokens(model, x):
    out = model.forward_features(x)
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]], 1)


def max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def image518():
    return torch.randn(2, 3, 518, 518, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def image_nonsquare():
    return torch.randn(2, 3, 224, 308, generator=torch.Generator().manual_seed(8))


# ---------------------------------------------------------------------------------------------
# forward parity


@pytest.mark.parametrize("cfg", [PLAIN_S, REG_S, PLAIN_G, REG_G], ids=lambda c: c.name)
@torch.no_grad()
def test_last_hidden_state_matches_hf_at_518(cfg, image518):
    ours, hf = pair(cfg)
    mine = our_tokens(ours, image518)
    out = hf(pixel_values=image518)
    assert mine.shape == (2, 1 + cfg.num_register_tokens + 37 * 37, cfg.embed_dim)
    assert mine.abs().max() > 0.1  # not a degenerate all-zero comparison
    assert max_diff(mine, out.last_hidden_state) <= ATOL
    assert max_diff(ours(image518), out.pooler_output) <= ATOL  # forward() is the normed CLS token


@pytest.mark.parametrize("cfg", [REG_S, REG_G], ids=lambda c: c.name)
@torch.no_grad()
def test_register_variant_matches_hf_at_non_square_size(cfg, image_nonsquare):
    ours, hf = pair(cfg)
    mine = our_tokens(ours, image_nonsquare)
    theirs = hf(pixel_values=image_nonsquare).last_hidden_state
    assert mine.shape == (2, 1 + 4 + 16 * 22, cfg.embed_dim)
    assert max_diff(mine, theirs) <= ATOL


@torch.no_grad()
def test_plain_variant_differs_from_hf_only_by_the_interpolation(image_nonsquare):
    ours, hf = pair(PLAIN_S)
    theirs = hf(pixel_values=image_nonsquare).last_hidden_state
    # Meta: scale_factor=(h+0.1)/37 without antialias; HF: size=(h, w). Known, expected difference.
    assert max_diff(our_tokens(ours, image_nonsquare), theirs) > ATOL

    hf_like = dataclasses.replace(PLAIN_S, interpolate_offset=0.0, interpolate_antialias=False)
    same_weights = build_backbone(hf_like).eval()
    same_weights.load_state_dict(ours.state_dict(), strict=True)
    assert max_diff(our_tokens(same_weights, image_nonsquare), theirs) <= ATOL


def test_swiglu_hidden_width_matches_transformers():
    from transformers.models.dinov2.modeling_dinov2 import Dinov2SwiGLUFFN

    for dim in (96, 384, 1536):
        hf_cfg = Dinov2Config(hidden_size=dim, mlp_ratio=4, use_swiglu_ffn=True)
        with torch.device("meta"):
            ffn = Dinov2SwiGLUFFN(hf_cfg)
        assert swiglu_hidden(dim, 4.0) == ffn.gate_proj.out_features == ffn.up_proj.out_features
    assert swiglu_hidden(1536, 4.0) == 4096  # ViT-g's w3 is 1536 x 4096


# ---------------------------------------------------------------------------------------------
# intermediate layers


@torch.no_grad()
def test_get_intermediate_layers_match_hf_hidden_states(image_nonsquare):
    cfg = dataclasses.replace(REG_S, depth=3)
    ours, hf = pair(cfg, seed=3)
    out = hf(pixel_values=image_nonsquare, output_hidden_states=True)
    assert len(out.hidden_states) == cfg.depth + 1  # embeddings, then one per block
    b, h, w, r = 2, 16, 22, cfg.num_register_tokens
    for i in range(cfg.depth):
        ref = hf.layernorm(out.hidden_states[i + 1])[:, 1 + r :]
        (flat,) = ours.get_intermediate_layers(image_nonsquare, n=[i], norm=True)
        assert flat.shape == (b, h * w, cfg.embed_dim)
        assert max_diff(flat, ref) <= ATOL
        (grid,) = ours.get_intermediate_layers(image_nonsquare, n=[i], reshape=True, norm=True)
        assert grid.shape == (b, cfg.embed_dim, h, w)
        assert max_diff(grid, ref.reshape(b, h, w, -1).permute(0, 3, 1, 2)) <= ATOL
    # the blocks really differ, so matching each index is not a coincidence
    assert max_diff(out.hidden_states[1], out.hidden_states[2]) > 0.1


# ---------------------------------------------------------------------------------------------
# the reverse mapping: model.convert


def _assert_same_state_dict(got, want):
    assert set(got) == set(want), set(got) ^ set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("cfg", [PLAIN_S, REG_S, PLAIN_G, REG_G], ids=lambda c: c.name)
def test_to_meta_layout_inverts_hf_layouts(cfg):
    ours, hf = pair(cfg)
    want = ours.state_dict()
    hf_sd = hf.state_dict()

    _assert_same_state_dict(to_meta_layout(hf_sd), want)

    old = hf_to_old_hub_names(hf_sd)
    assert any(".attention.attention.query." in k for k in old)
    if cfg.ffn == "swiglu":
        assert any(".mlp.weights_in." in k for k in old)
    _assert_same_state_dict(to_meta_layout(old), want)

    # checkpoints of HF task models keep the backbone under `dinov2.`
    _assert_same_state_dict(to_meta_layout({f"dinov2.{k}": v for k, v in old.items()}), want)

    restored = build_backbone(cfg)
    restored.load_state_dict(to_meta_layout(hf_sd), strict=True)
