"""Heads: Meta's BNHead semantics (resize-concat, BatchNorm, 1x1 conv), layer choices, ConvHead."""

import pytest
import torch
import torch.nn.functional as F

from model.errors import DinosegError
from model.heads import ConvHead, HeadConfig, LinearHead, build_head, default_layers


def test_default_layers_follow_meta():
    assert default_layers("linear", 12) == (11,)
    assert default_layers("ms", 12) == (8, 9, 10, 11)
    assert default_layers("ms", 24) == (20, 21, 22, 23)
    assert default_layers("ms", 40) == (36, 37, 38, 39)
    with pytest.raises(DinosegError, match="Unknown head type"):
        default_layers("mlp", 12)


def test_linear_head_is_bn_then_1x1_conv_over_resized_concatenation():
    torch.manual_seed(0)
    cfg = HeadConfig("ms", (0, 1), embed_dim=8, num_classes=3)
    head = LinearHead(cfg).eval()
    head.bn.running_mean.normal_()
    head.bn.running_var.uniform_(0.5, 2)
    head.bn.weight.data.normal_()
    head.bn.bias.data.normal_()
    a, b = torch.randn(2, 8, 6, 7), torch.randn(2, 8, 3, 4)
    out = head([a, b])
    # independent computation
    x = torch.cat([a, F.interpolate(b, size=(6, 7), mode="bilinear", align_corners=False)], 1)
    x = (x - head.bn.running_mean[None, :, None, None]) / torch.sqrt(head.bn.running_var[None, :, None, None] + 1e-5)
    x = x * head.bn.weight[None, :, None, None] + head.bn.bias[None, :, None, None]
    ref = torch.einsum("bchw,kc->bkhw", x, head.conv_seg.weight[:, :, 0, 0]) + head.conv_seg.bias[None, :, None, None]
    assert out.shape == (2, 3, 6, 7)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_state_dict_keys_match_mmseg_after_prefix():
    head = LinearHead(HeadConfig("linear", (11,), 384, 21))
    keys = set(head.state_dict())
    assert keys == {
        "conv_seg.weight",
        "conv_seg.bias",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    }
    assert head.conv_seg.weight.shape == (21, 384, 1, 1)
    ms = LinearHead(HeadConfig("ms", (8, 9, 10, 11), 384, 21))
    assert ms.conv_seg.weight.shape == (21, 1536, 1, 1)  # Meta's ViT-S VOC ms head


def test_conv_head_outputs_twice_the_patch_grid_and_trains():
    torch.manual_seed(0)
    head = ConvHead(HeadConfig("conv", (2, 3), 16, 4, hidden=32))
    feats = [torch.randn(2, 16, 5, 6), torch.randn(2, 16, 5, 6)]
    out = head(feats)
    assert out.shape == (2, 4, 10, 12)
    target = torch.randint(0, 4, (2, 10, 12))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = F.cross_entropy(head(feats), target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_build_head_and_config_round_trip():
    cfg = HeadConfig("conv", (8, 9, 10, 11), 384, 7, hidden=64)
    assert HeadConfig.from_dict(cfg.to_dict()) == cfg
    assert isinstance(build_head(cfg), ConvHead)
    assert isinstance(build_head(HeadConfig("linear", (11,), 384, 7)), LinearHead)
    with pytest.raises(DinosegError):
        build_head(HeadConfig("upernet", (11,), 384, 7))
