"""Shapes and structure of the network for every configuration the description allows (tiny widths)."""

from __future__ import annotations

import pytest
import torch

from hsam_testlib import TINY_DECODER, TINY_ENCODER
from hsam.description import SAM_VIT_PRESETS, sam_vit_architecture
from hsam.model import build_hsam, merge_lora
from hsam.model.hsam import prior_from_stage1


@pytest.mark.parametrize("size, grid", [(224, 14), (512, 32), (64, 4)])
@pytest.mark.parametrize("classes", [2, 9, 14])
def test_logit_shapes_at_each_input_size(size, grid, classes):
    arch = sam_vit_architecture("vit_b", image_size=size, lora_rank=3, decoder=dict(TINY_DECODER),
                                **{**TINY_ENCODER, "depth": 1, "global_attn_indexes": [0]})
    model = build_hsam(arch, classes).eval()
    with torch.inference_mode():
        out = model(torch.rand(2, 3, size, size))
    assert out.stage1_logits.shape == (2, classes, 4 * grid, 4 * grid)
    assert out.stage2_logits.shape == (2, classes, size, size)
    assert out.stage1.affinity.shape == (2, classes, grid * grid)
    assert model.fused_logits(out).shape == (2, classes, size, size)


@pytest.mark.parametrize("variant", sorted(SAM_VIT_PRESETS))
def test_vit_variants_have_the_published_layout(variant):
    arch = sam_vit_architecture(variant, image_size=512, lora_rank=5)
    preset = SAM_VIT_PRESETS[variant]
    assert arch["encoder"]["embed_dim"] == preset["embed_dim"] and arch["encoder"]["depth"] == preset["depth"]
    if variant == "vit_b":
        model = build_hsam(arch, 9)
        blocks = model.image_encoder.blocks
        assert len(blocks) == 12 and blocks[2].attn.rel_pos_h.shape == (63, 64)
        assert blocks[0].attn.rel_pos_h.shape == (27, 64)
        learnable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or not n.startswith("image_encoder"))
        assert 9e6 < learnable < 12e6  # ≈ 11.1 M learn in the published model (less the dead branch)


def test_prior_is_a_distribution_over_classes():
    logits = torch.randn(3, 5, 128, 128)
    prior = prior_from_stage1(logits, (32, 32))
    assert prior.shape == (3, 5, 1024)
    torch.testing.assert_close(prior.sum(1), torch.ones(3, 1024))


def test_stage2_fusion_option_and_lora_merge():
    arch = sam_vit_architecture("vit_b", image_size=64, lora_rank=2, decoder=dict(TINY_DECODER), **TINY_ENCODER)
    model = build_hsam(arch, 4, fusion="stage2").eval()
    for name, p in model.named_parameters():
        if name.endswith(("lora_q_b", "lora_v_b")):
            torch.nn.init.normal_(p, std=0.05)
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        out = model(x)
        assert torch.equal(model.fused_logits(out), out.stage2_logits)
        before = out.stage2_logits.clone()
        assert merge_lora(model) == 2
        torch.testing.assert_close(model(x).stage2_logits, before, atol=1e-4, rtol=1e-4)
