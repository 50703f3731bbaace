"""``precision="int8"``: the opt-in CPU path with the encoder's linears int8 (dynamic quantisation). Never a
default: it fails the fast-path accuracy gate (``Testing/benchmarks/int8_encoder.py``, BENCHMARKS.md)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from hsam.engine.device import DeviceError, choose_precision
from hsam.engine.inference import SliceSegmenter, int8_encoder_linears
from hsam_testlib import ct_like_volume


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixtures ``one_torch_thread``, ``tiny``: conftest.py


def _float_linears(module: nn.Module) -> int:
    return sum(type(m) is nn.Linear for m in module.modules())


def test_int8_segmenter_quantizes_the_encoder_linears_of_its_copy(tiny):
    before = _float_linears(tiny.model.image_encoder)
    seg = SliceSegmenter(tiny.model, tiny.description.num_classes, 64, device="cpu", precision="int8")
    assert seg.int8 and seg.dtype is None
    assert _float_linears(seg.model.image_encoder) == 0  # every encoder linear is int8 now
    quantized = [m for m in seg.model.image_encoder.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(quantized) == 4 * len(seg.model.image_encoder.blocks)  # qkv (LoRA merged), proj, lin1, lin2
    assert _float_linears(seg.model.stage1) > 0  # the decoders stay float
    assert _float_linears(tiny.model.image_encoder) == before  # the caller's model is untouched
    slices = np.random.default_rng(0).random((3, 40, 50), dtype=np.float32)
    labels = seg.segment(slices)
    fp32 = SliceSegmenter(tiny.model, tiny.description.num_classes, 64, device="cpu", precision="fp32").segment(slices)
    assert labels.shape == slices.shape and labels.dtype == np.uint8
    assert (labels == fp32).mean() > 0.9  # close to fp32, not equal (the gate is measured on real volumes)


def test_int8_is_never_chosen_automatically():
    assert choose_precision(torch.device("cpu"), "auto") in (None, torch.bfloat16)


def test_int8_is_cpu_only(tiny):
    with pytest.raises(DeviceError, match="CPU only"):
        SliceSegmenter(tiny.model, tiny.description.num_classes, 64, device=torch.device("cuda"), precision="int8")


def test_int8_without_the_quantization_api(monkeypatch):
    monkeypatch.delattr(torch.ao.quantization, "quantize_dynamic")
    with pytest.raises(DeviceError, match="quantize_dynamic"):
        int8_encoder_linears(nn.Sequential(nn.Linear(4, 4)))


def test_cli_precision_int8(tmp_path, tiny_model_file):
    from hsam.cli import main

    src, out = tmp_path / "ct.nrrd", tmp_path / "labels.nrrd"
    sitk.WriteImage(ct_like_volume(shape=(2, 30, 30)), str(src))
    assert main(["segment", str(src), str(out), "--checkpoint", str(tiny_model_file), "--quiet", "--device", "cpu",
                 "--precision", "int8"]) == 0
    assert sitk.ReadImage(str(out)).GetSize() == (30, 30, 2)
