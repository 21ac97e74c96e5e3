"""The DINOv2 backbone: variants and key layout, position embeddings, token order, intermediate layers."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import model.layers as layers_mod
from model.backbone import BACKBONES, BackboneConfig, build_backbone, count_flops

# From DESIGN.md: name -> (embed dim, depth, heads, ffn).
DESIGN = {
    "dinov2_vits14": (384, 12, 6, "mlp"),
    "dinov2_vitb14": (768, 12, 12, "mlp"),
    "dinov2_vitl14": (1024, 24, 16, "mlp"),
    "dinov2_vitg14": (1536, 40, 24, "swiglu"),
}
ALL_NAMES = [n for base in DESIGN for n in (base, base + "_reg")]

TINY = BackboneConfig("tiny", 32, 4, 2)
TINY_REG = BackboneConfig(
    "tiny_reg", 32, 4, 2, num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True
)


def meta_build(name: str):
    with torch.device("meta"):
        return build_backbone(name)


def expected_shapes(name: str) -> dict[str, tuple]:
    """Meta's released key names and shapes, written out from DESIGN.md."""
    d, depth, _, ffn = DESIGN[name.removesuffix("_reg")]
    shapes = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1370, d),
        "mask_token": (1, d),
        "patch_embed.proj.weight": (d, 3, 14, 14),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    if name.endswith("_reg"):
        shapes["register_tokens"] = (1, 4, d)
    if ffn == "swiglu":
        mlp = {"mlp.w12.weight": (8192, d), "mlp.w12.bias": (8192,), "mlp.w3.weight": (d, 4096), "mlp.w3.bias": (d,)}
    else:
        mlp = {
            "mlp.fc1.weight": (4 * d, d),
            "mlp.fc1.bias": (4 * d,),
            "mlp.fc2.weight": (d, 4 * d),
            "mlp.fc2.bias": (d,),
        }
    for i in range(depth):
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
        shapes.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return shapes


@pytest.fixture(scope="module")
def giant_meta():
    return meta_build("dinov2_vitg14")


def tiny(cfg: BackboneConfig, seed: int = 0):
    torch.manual_seed(seed)
    m = build_backbone(cfg).eval()
    with torch.no_grad():  # make every block matter
        for name, p in m.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.5)
            elif name in ("cls_token", "pos_embed", "register_tokens"):
                p.normal_()
    return m


# ---------------------------------------------------------------------------------------------
# variants and keys


def test_the_eight_variants_have_design_dimensions():
    assert sorted(BACKBONES) == sorted(ALL_NAMES)
    for name in ALL_NAMES:
        cfg = BACKBONES[name]
        d, depth, heads, ffn = DESIGN[name.removesuffix("_reg")]
        assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.ffn) == (d, depth, heads, ffn), name
        assert (cfg.patch_size, cfg.mlp_ratio, cfg.pos_grid) == (14, 4.0, 37), name
        if name.endswith("_reg"):
            assert (cfg.num_register_tokens, cfg.interpolate_offset, cfg.interpolate_antialias) == (4, 0.0, True)
        else:
            assert (cfg.num_register_tokens, cfg.interpolate_offset, cfg.interpolate_antialias) == (0, 0.1, False)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_state_dict_keys_and_shapes_match_meta_release(name, giant_meta):
    m = giant_meta if name == "dinov2_vitg14" else meta_build(name)
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == expected_shapes(name)


def test_layernorm_eps_and_biases_follow_meta(giant_meta):
    for m in (build_backbone(TINY), giant_meta):
        norms = [mod for mod in m.modules() if isinstance(mod, torch.nn.LayerNorm)]
        assert len(norms) == 2 * len(m.blocks) + 1
        assert {mod.eps for mod in norms} == {1e-6}
        assert all(mod.bias is not None for mod in m.modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)))


def test_giant_layout(giant_meta):
    sd = giant_meta.state_dict()
    assert sd["blocks.0.mlp.w12.weight"].shape == (8192, 1536)
    assert sd["blocks.0.mlp.w3.weight"].shape == (1536, 4096)
    assert sd["pos_embed"].shape == (1, 1370, 1536)
    assert "blocks.39.ls2.gamma" in sd and "blocks.40.norm1.weight" not in sd
    n_params = sum(p.numel() for p in giant_meta.parameters())
    assert 1.10e9 < n_params < 1.15e9  # ViT-g/14: ~1.1B


def test_real_giant_strict_loads_a_state_dict_of_its_shapes():
    # Measured on 2 CPUs: a real fp32 (or bf16-default) build takes ~30 s, almost all of it the random
    # init of 1.1B weights. So: construct on the meta device (runs the same __init__), cast to bf16,
    # materialise real CPU storage (2.3 GB), and strict-load. The state dict holds broadcast random
    # rows (no extra memory) with values distinct per key, so we can check that they landed.
    with torch.device("meta"):
        giant = build_backbone("dinov2_vitg14")
    giant = giant.to(torch.bfloat16).to_empty(device="cpu")
    try:
        assert all(p.device.type == "cpu" for p in giant.parameters())
        g = torch.Generator().manual_seed(0)
        sd = {
            k: (torch.randn(v.shape[-1], generator=g) + i).to(torch.bfloat16).expand(v.shape)
            for i, (k, v) in enumerate(giant.state_dict().items())
        }
        result = giant.load_state_dict(sd, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        for k in ("pos_embed", "blocks.0.mlp.w12.weight", "blocks.39.mlp.w3.bias", "blocks.20.ls1.gamma", "norm.bias"):
            assert torch.equal(giant.state_dict()[k], sd[k]), k
        with pytest.raises(RuntimeError, match="Missing key"):
            giant.load_state_dict({k: v for k, v in sd.items() if k != "blocks.39.mlp.w3.weight"}, strict=True)
    finally:
        del giant, sd
        gc.collect()


# ---------------------------------------------------------------------------------------------
# position embeddings


def _grid(pos_embed: torch.Tensor) -> torch.Tensor:
    d = pos_embed.shape[-1]
    return pos_embed[:, 1:].float().reshape(1, 37, 37, d).permute(0, 3, 1, 2)


def _flatten(cls_pos, grid):
    d = grid.shape[1]
    return torch.cat([cls_pos.float(), grid.permute(0, 2, 3, 1).reshape(1, -1, d)], 1)


@pytest.mark.parametrize("cfg", [TINY, TINY_REG], ids=["plain", "reg"])
def test_pos_embed_is_used_as_is_at_518(cfg):
    m = tiny(cfg)
    assert torch.equal(m.interpolate_pos_encoding(37, 37), m.pos_embed)


@pytest.mark.parametrize("hw", [(16, 22), (37, 20), (50, 45)])
@torch.no_grad()
def test_plain_pos_embed_uses_meta_scale_factor_with_offset(hw):
    h, w = hw
    m = tiny(TINY)
    got = m.interpolate_pos_encoding(h, w)
    grid = F.interpolate(
        _grid(m.pos_embed), scale_factor=((h + 0.1) / 37, (w + 0.1) / 37), mode="bicubic", antialias=False
    )
    want = _flatten(m.pos_embed[:, :1], grid)
    assert got.shape == (1, 1 + h * w, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    hf_style = _flatten(m.pos_embed[:, :1], F.interpolate(_grid(m.pos_embed), size=(h, w), mode="bicubic"))
    assert (got - hf_style).abs().max() > 1e-3  # the offset matters: the test can tell them apart


@pytest.mark.parametrize("hw", [(16, 22), (37, 20), (50, 45)])
@torch.no_grad()
def test_register_pos_embed_uses_size_with_antialias(hw):
    h, w = hw
    m = tiny(TINY_REG)
    got = m.interpolate_pos_encoding(h, w)
    want = _flatten(m.pos_embed[:, :1], F.interpolate(_grid(m.pos_embed), size=(h, w), mode="bicubic", antialias=True))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    if min(h, w) < 37:  # antialias only changes a downsampling
        no_aa = _flatten(m.pos_embed[:, :1], F.interpolate(_grid(m.pos_embed), size=(h, w), mode="bicubic"))
        assert (got - no_aa).abs().max() > 1e-3


@torch.no_grad()
def test_pos_embed_interpolation_runs_in_fp32_for_bf16_models():
    h, w = 16, 22
    plain = tiny(TINY).to(torch.bfloat16)
    got = plain.interpolate_pos_encoding(h, w)
    assert got.dtype == torch.bfloat16
    grid = F.interpolate(_grid(plain.pos_embed), scale_factor=((h + 0.1) / 37, (w + 0.1) / 37), mode="bicubic")
    assert torch.equal(got, _flatten(plain.pos_embed[:, :1], grid).to(torch.bfloat16))
    bf16_grid = F.interpolate(
        _grid(plain.pos_embed).to(torch.bfloat16), scale_factor=((h + 0.1) / 37, (w + 0.1) / 37), mode="bicubic"
    )
    assert not torch.equal(got, _flatten(plain.pos_embed[:, :1], bf16_grid).to(torch.bfloat16))

    reg = tiny(TINY_REG).to(torch.bfloat16)  # antialiased bicubic has no bf16 kernel on CPU at all
    got = reg.interpolate_pos_encoding(h, w)
    grid = F.interpolate(_grid(reg.pos_embed), size=(h, w), mode="bicubic", antialias=True)
    assert torch.equal(got, _flatten(reg.pos_embed[:, :1], grid).to(torch.bfloat16))
    # and the whole bf16 forward works at a non-518 size
    assert reg(torch.randn(1, 3, 224, 308, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# tokens


def _first_block_input(m, x):
    seen = []
    handle = m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        m(x)
    finally:
        handle.remove()
    (tokens,) = seen
    return tokens


@pytest.mark.parametrize("cfg", [TINY, TINY_REG], ids=["plain", "reg"])
@torch.no_grad()
def test_token_order_and_where_position_embeddings_go(cfg):
    m = tiny(cfg)
    with torch.no_grad():
        m.cls_token.fill_(10.0)
        if cfg.num_register_tokens:
            m.register_tokens.copy_(100.0 + torch.arange(4 * 32, dtype=torch.float32).reshape(1, 4, 32))
    x = torch.randn(2, 3, 518, 518)
    tokens = _first_block_input(m, x)
    r = cfg.num_register_tokens
    patches = F.conv2d(x, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=14).flatten(2).transpose(1, 2)
    assert tokens.shape == (2, 1 + r + 37 * 37, 32)
    torch.testing.assert_close(tokens[:, 0], (10.0 + m.pos_embed[0, 0]).expand(2, -1))  # CLS first, with pos
    if r:
        assert torch.equal(tokens[:, 1 : 1 + r], m.register_tokens.expand(2, -1, -1))  # registers: no pos
    torch.testing.assert_close(tokens[:, 1 + r :], patches + m.pos_embed[:, 1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 3, 225, 224), (1, 3, 224, 230), (1, 3, 13, 14)])
def test_input_not_multiple_of_14_raises(shape):
    m = tiny(TINY)
    x = torch.randn(shape)
    with pytest.raises(ValueError, match="14"):
        m(x)
    with pytest.raises(ValueError, match="14"):
        m.get_intermediate_layers(x, n=1)


# ---------------------------------------------------------------------------------------------
# get_intermediate_layers


@pytest.fixture(scope="module")
def reg_model_and_reference():
    m = tiny(TINY_REG, seed=1)
    x = torch.randn(2, 3, 56, 84)  # 4 x 6 patches
    with torch.no_grad():
        tokens = m.prepare_tokens(x)
        raw = []
        for block in m.blocks:
            tokens = block(tokens)
            raw.append(tokens)
    return m, x, raw


R = 4  # registers in TINY_REG


@torch.no_grad()
def test_intermediate_int_n_is_last_blocks_normed_without_registers(reg_model_and_reference):
    m, x, raw = reg_model_and_reference
    out = m.get_intermediate_layers(x, n=2)
    assert len(out) == 2
    for got, i in zip(out, (2, 3), strict=True):
        assert got.shape == (2, 24, 32)
        torch.testing.assert_close(got, m.norm(raw[i])[:, 1 + R :])
    # the last block, normed, is what forward_features returns
    torch.testing.assert_close(m.get_intermediate_layers(x, n=1)[0], m.forward_features(x)["x_norm_patchtokens"])


@torch.no_grad()
def test_intermediate_list_n_norm_false_and_class_token(reg_model_and_reference):
    m, x, raw = reg_model_and_reference
    out = m.get_intermediate_layers(x, n=[0, 2], norm=False)
    assert len(out) == 2
    torch.testing.assert_close(out[0], raw[0][:, 1 + R :])
    torch.testing.assert_close(out[1], raw[2][:, 1 + R :])
    assert (out[0] - m.norm(raw[0])[:, 1 + R :]).abs().max() > 1e-3  # norm=False really is raw

    pairs = m.get_intermediate_layers(x, n=[1, 3], return_class_token=True)
    assert len(pairs) == 2
    for (patch, cls), i in zip(pairs, (1, 3), strict=True):
        torch.testing.assert_close(patch, m.norm(raw[i])[:, 1 + R :])
        torch.testing.assert_close(cls, m.norm(raw[i])[:, 0])
        assert cls.shape == (2, 32)

    (neg,) = m.get_intermediate_layers(x, n=[-1])  # negative indices count from the end
    torch.testing.assert_close(neg, m.norm(raw[3])[:, 1 + R :])


@torch.no_grad()
def test_intermediate_reshape_gives_feature_maps(reg_model_and_reference):
    m, x, raw = reg_model_and_reference
    (grid,) = m.get_intermediate_layers(x, n=[1], reshape=True)
    assert grid.shape == (2, 32, 4, 6)
    flat = m.norm(raw[1])[:, 1 + R :]
    for row, col in [(0, 0), (0, 5), (3, 0), (2, 4)]:
        torch.testing.assert_close(grid[:, :, row, col], flat[:, row * 6 + col])
    pairs = m.get_intermediate_layers(x, n=1, reshape=True, return_class_token=True)
    assert pairs[0][0].shape == (2, 32, 4, 6) and pairs[0][1].shape == (2, 32)


@torch.no_grad()
def test_blocks_after_the_last_requested_are_not_run(reg_model_and_reference):
    m, x, _ = reg_model_and_reference
    calls = [0] * len(m.blocks)
    handles = [
        b.register_forward_hook(lambda mod, args, out, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, b in enumerate(m.blocks)
    ]
    try:
        m.get_intermediate_layers(x, n=[0, 1])
        assert calls == [1, 1, 0, 0]
        calls[:] = [0] * 4
        m.get_intermediate_layers(x, n=2)
        assert calls == [1, 1, 1, 1]
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def test_intermediate_outputs_come_in_block_order_like_meta(reg_model_and_reference):
    m, x, raw = reg_model_and_reference
    out = m.get_intermediate_layers(x, n=[3, 1])  # Meta's loop appends in block order
    torch.testing.assert_close(out[0], m.norm(raw[1])[:, 1 + R :])
    torch.testing.assert_close(out[1], m.norm(raw[3])[:, 1 + R :])


@pytest.mark.parametrize("n", [0, 5, -1, [], [4], [-5], [0, 7], [1, 1], [3, -1]])
def test_invalid_n_raises(n, reg_model_and_reference):
    m, x, _ = reg_model_and_reference
    with pytest.raises(ValueError):
        m.get_intermediate_layers(x, n=n)


# ---------------------------------------------------------------------------------------------
# attention and cost


@torch.no_grad()
def test_attention_goes_through_sdpa(monkeypatch):
    m = tiny(TINY_REG)
    x = torch.randn(2, 3, 56, 56)
    expected = m(x)
    original = layers_mod.F.scaled_dot_product_attention
    seen = []

    def counting(q, k, v, *args, **kwargs):
        seen.append(tuple(q.shape))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(layers_mod.F, "scaled_dot_product_attention", counting)
    got = m(x)
    assert len(seen) == TINY_REG.depth
    assert set(seen) == {(2, 2, 1 + 4 + 16, 16)}  # (B, heads, tokens, head_dim)
    torch.testing.assert_close(got, expected)


def hand_flops(d: int, depth: int, tokens: int, patches: int, ffn_hidden: int, swiglu: bool) -> int:
    """FLOPs = 2 x multiply-adds of the matmuls (bias, norms, softmax, activations not counted).

    patch embedding:  2 * patches * (3*14*14) * d
    per block:        qkv 2*N*d*3d + proj 2*N*d*d + q@k^T 2*N*N*d + attn@v 2*N*N*d
                      mlp 2*N*d*h + 2*N*h*d  (SwiGLU: w12 is 2*N*d*2h, w3 2*N*h*d)
    ViT-S/14 at 224 (N = 1 + 16*16 = 257, d = 384, h = 1536, 12 blocks) comes to ~12.2 GFLOPs,
    i.e. ~6.1 G multiply-adds (the often-quoted 4.6 "GFLOPs" is ViT-S/16's multiply-adds at 197 tokens).
    """
    n = tokens
    attn = 2 * n * d * 3 * d + 2 * n * d * d + 2 * (2 * n * n * d)
    mlp = (2 * n * d * 2 * ffn_hidden if swiglu else 2 * n * d * ffn_hidden) + 2 * n * ffn_hidden * d
    return 2 * patches * 3 * 14 * 14 * d + depth * (attn + mlp)


def test_count_flops_matches_hand_formula():
    got = count_flops(BACKBONES["dinov2_vits14"], 224, 224)
    want = hand_flops(384, 12, 257, 256, 1536, swiglu=False)
    assert got == pytest.approx(want, rel=1e-9)
    assert 12.0e9 < got < 12.5e9
    g = count_flops(BACKBONES["dinov2_vitg14_reg"], 518, 518)
    assert g == pytest.approx(hand_flops(1536, 40, 1 + 4 + 1369, 1369, 4096, swiglu=True), rel=1e-9)


@torch.no_grad()
def test_count_flops_matches_torch_flop_counter():
    m = build_backbone("dinov2_vits14").eval()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        m(torch.randn(1, 3, 224, 224))
    assert count_flops(BACKBONES["dinov2_vits14"], 224, 224) == pytest.approx(counter.get_total_flops(), rel=1e-6)
