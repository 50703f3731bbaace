"""The inference engine: devices, precision, the batched slice segmenter, fast attention, OOM recovery."""

from __future__ import annotations

import copy
import logging
import threading

import numpy as np
import pytest
import torch

from hsam.description import sam_vit_architecture
from hsam.engine import device as device_mod
from hsam.engine.device import DeviceError, choose_precision, cpu_has_native_bf16, resolve_device
from hsam.engine.inference import (BF16Linear, BF16MLP, SliceSegmenter, authors_resize, bf16_encoder_linears,
                                   prepare_model, resize_images)
from hsam.errors import CancelledError, HSAMError, InputVolumeError
from hsam.model import build_hsam
from hsam.model.fast_attention import FastViTAttention, use_fast_attention
from hsam.model.lora import LoRAQKV

K = 3


def tiny_architecture(window_size: int = 3) -> dict:
    return sam_vit_architecture("vit_b", image_size=64, lora_rank=2, embed_dim=32, depth=2, num_heads=2,
                                global_attn_indexes=[1], window_size=window_size, out_chans=32,
                                decoder={"transformer_dim": 32, "num_heads": 2, "mlp_dim": 64})


def _randomise(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial LoRA, biases and relative positions (fresh ones are zero and would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.image_encoder.blocks:
            attn = block.attn
            for p in (attn.rel_pos_h, attn.rel_pos_w, attn.qkv.bias, attn.qkv.lora_q_b, attn.qkv.lora_v_b):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny models are all per-op overhead: one thread is faster and immune to a busy second core."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = build_hsam(tiny_architecture(), K)
    _randomise(model)
    return model


@pytest.fixture
def slices():
    rng = np.random.default_rng(0)
    return rng.random((7, 50, 90), dtype=np.float32)


def cpu_segmenter(model, **kw) -> SliceSegmenter:
    kw.setdefault("device", "cpu")
    kw.setdefault("precision", "fp32")
    return SliceSegmenter(model, K, 64, **kw)


# ------------------------------------------------------------------------------------------- devices
def test_resolve_device_cpu_and_auto(caplog):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="hsam"):
        dev = resolve_device("auto")
    assert dev.type in ("cpu", "cuda", "mps")
    assert "devices found" in caplog.text and "using" in caplog.text


def test_resolve_device_cuda_unavailable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="cuda") as info:
        resolve_device("cuda")
    assert isinstance(info.value, HSAMError)
    assert "--device cpu" in str(info.value)
    with pytest.raises(DeviceError):
        resolve_device("cuda:1")
    assert resolve_device("auto").type in ("cpu", "mps")


def test_resolve_device_cuda_index_out_of_range(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match="only 1 CUDA GPU"):
        resolve_device("cuda:3")


def test_resolve_device_mps_and_unknown(monkeypatch):
    monkeypatch.setattr(device_mod, "_mps_available", lambda torch: False)
    with pytest.raises(DeviceError, match="MPS"):
        resolve_device("mps")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")


def test_choose_precision_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert choose_precision(cpu, "fp32") is None
    assert choose_precision("cpu", "bf16") is torch.bfloat16
    with pytest.raises(DeviceError, match="fp16"):
        choose_precision(cpu, "fp16")
    with pytest.raises(DeviceError, match="unknown precision"):
        choose_precision(cpu, "int8")
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(device_mod, "CPU_BF16_DECISION", True)
    assert choose_precision(cpu, "auto") is torch.bfloat16
    monkeypatch.setattr(device_mod, "CPU_BF16_DECISION", False)
    assert choose_precision(cpu, "auto") is None
    monkeypatch.setattr(device_mod, "CPU_BF16_DECISION", True)
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: False)
    assert choose_precision(cpu, "auto") is None


def test_choose_precision_cuda(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_precision(cuda, "auto") is torch.bfloat16
    assert choose_precision(cuda, "fp16") is torch.float16
    assert choose_precision(cuda, "fp32") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_precision(cuda, "auto") is torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Old GPU")
    with pytest.raises(DeviceError, match="bfloat16"):
        choose_precision(cuda, "bf16")


def test_cpu_has_native_bf16_is_bool():
    assert isinstance(cpu_has_native_bf16(), bool)


# ---------------------------------------------------------------------------------------- segmenting
def test_segment_shape_dtype_non_square_and_ragged_batches(tiny_model, slices):
    seg = cpu_segmenter(tiny_model, batch_size=3)  # 7 slices: batches of 3, 3, 1
    labels = seg.segment(slices)
    assert labels.shape == slices.shape
    assert labels.dtype == np.uint8
    assert labels.max() < K
    assert len(np.unique(labels)) > 1, "a randomised model should not predict one class everywhere"


def test_segment_same_labels_for_any_batch_size(tiny_model, slices):
    one = cpu_segmenter(tiny_model, batch_size=1).segment(slices)
    three = cpu_segmenter(tiny_model, batch_size=3).segment(slices)
    np.testing.assert_array_equal(one, three)


def test_segment_matches_the_model_run_directly(tiny_model):
    """At S×S input no resizing happens: labels are the argmax of the model's own fused logits."""
    rng = np.random.default_rng(3)
    x = rng.random((2, 64, 64), dtype=np.float32)
    labels = cpu_segmenter(tiny_model, batch_size=2).segment(x)
    model = copy.deepcopy(tiny_model).eval()
    with torch.inference_mode():
        images = torch.from_numpy(x)[:, None].repeat(1, 3, 1, 1)
        expected = model.fused_logits(model(images)).argmax(1).numpy()
    assert (labels == expected).mean() > 0.999


def test_progress_is_monotonic_and_ends_at_total(tiny_model, slices):
    calls = []
    cpu_segmenter(tiny_model, batch_size=2).segment(slices, progress=lambda done, total: calls.append((done, total)))
    assert [d for d, _ in calls] == [2, 4, 6, 7]
    assert all(total == 7 for _, total in calls)


@pytest.mark.parametrize("kind", ["event", "callable"])
def test_cancel_between_batches(tiny_model, slices, kind):
    event = threading.Event()
    cancel = event if kind == "event" else event.is_set
    seen = []

    def progress(done, total):
        seen.append(done)
        if done >= 2:
            event.set()

    with pytest.raises(CancelledError, match="after 2 of 7"):
        cpu_segmenter(tiny_model, batch_size=2).segment(slices, progress=progress, cancel=cancel)
    assert seen == [2]


def test_empty_stack_and_bad_inputs(tiny_model):
    seg = cpu_segmenter(tiny_model, batch_size=2)
    assert seg.segment(np.zeros((0, 20, 30), np.float32)).shape == (0, 20, 30)
    with pytest.raises(InputVolumeError, match="shaped"):
        seg.segment(np.zeros((20, 30), np.float32))
    with pytest.raises(InputVolumeError, match="float"):
        seg.segment(np.zeros((1, 20, 30), np.int16))
    bad = np.zeros((2, 20, 30), np.float32)
    bad[1, 3, 4] = np.nan
    with pytest.raises(InputVolumeError, match="NaN"):
        seg.segment(bad)


def test_constructor_checks(tiny_model):
    with pytest.raises(ValueError, match="classes"):
        SliceSegmenter(tiny_model, 5, 64, device="cpu")
    with pytest.raises(ValueError, match="64-px"):
        SliceSegmenter(tiny_model, K, 128, device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        SliceSegmenter(tiny_model, K, 64, device="cpu", batch_size=0)


def test_auto_batch_size_cpu(tiny_model):
    from hsam.engine import inference

    assert cpu_segmenter(tiny_model).batch_size == inference.CPU_BATCH_SIZE


# --------------------------------------------------------------------------------------- OOM handling
def _oom():
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_cuda_oom_halves_then_falls_back_to_cpu(tiny_model, slices, caplog, monkeypatch):
    """The GPU path is simulated: the segmenter believes it is on CUDA and every batch there runs out of
    memory; it must halve 4 → 2 → 1, then continue on the CPU with the same result as a CPU run."""
    expected = cpu_segmenter(tiny_model, batch_size=1).segment(slices)
    seg = cpu_segmenter(tiny_model, batch_size=4)
    real_forward = seg._forward_batch
    tried = []

    def forward(batch):
        tried.append((seg.device.type, len(batch)))
        if seg.device.type == "cuda":
            raise _oom()
        return real_forward(batch)

    monkeypatch.setattr(seg, "_forward_batch", forward)
    seg.device = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no real empty_cache on this machine
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with caplog.at_level(logging.WARNING, logger="hsam"):
        labels = seg.segment(slices)
    np.testing.assert_array_equal(labels, expected)
    assert tried[:3] == [("cuda", 4), ("cuda", 2), ("cuda", 1)]
    assert all(dev == "cpu" for dev, _ in tried[3:])
    assert "CUDA out of memory at batch 4; retrying at batch 2" in caplog.text
    assert "CUDA out of memory at batch 2; retrying at batch 1" in caplog.text
    assert "continuing on the CPU" in caplog.text
    assert seg.device.type == "cpu"


def test_cuda_oom_keeps_the_smaller_batch_and_continues_where_it_stopped(tiny_model, slices, caplog, monkeypatch):
    seg = cpu_segmenter(tiny_model, batch_size=4)
    starts = []

    def forward(batch):
        if len(batch) > 2:
            raise _oom()
        starts.append(len(batch))
        return np.full((len(batch), *batch.shape[1:]), 1, np.uint8)

    monkeypatch.setattr(seg, "_forward_batch", forward)
    seg.device = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    progress = []
    with caplog.at_level(logging.WARNING, logger="hsam"):
        labels = seg.segment(slices, progress=lambda d, t: progress.append(d))
    assert (labels == 1).all()
    assert starts == [2, 2, 2, 1]
    assert progress == [2, 4, 6, 7]
    assert caplog.text.count("out of memory") == 1
    assert seg.batch_size == 2 and seg.device.type == "cuda"


def test_cuda_oom_halves_the_batch_actually_tried(tiny_model, slices, caplog, monkeypatch):
    seg = cpu_segmenter(tiny_model, batch_size=4096)
    sizes = []

    def forward(batch):
        sizes.append(len(batch))
        if len(batch) > 3:
            raise _oom()
        return np.zeros((len(batch), *batch.shape[1:]), np.uint8)

    monkeypatch.setattr(seg, "_forward_batch", forward)
    seg.device = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="hsam"):
        seg.segment(slices)
    assert sizes == [7, 3, 3, 1]
    assert "CUDA out of memory at batch 7; retrying at batch 3" in caplog.text


def test_other_errors_are_not_swallowed(tiny_model, slices, monkeypatch):
    seg = cpu_segmenter(tiny_model, batch_size=2)

    def forward(batch):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(seg, "_forward_batch", forward)
    seg.device = torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        seg.segment(slices)


def test_cpu_oom_is_not_retried(tiny_model, slices, monkeypatch):
    seg = cpu_segmenter(tiny_model, batch_size=2)
    monkeypatch.setattr(seg, "_forward_batch", lambda batch: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        seg.segment(slices)


# ------------------------------------------------------------------------------- resizing / round trip
def test_resize_images_antialias_only_when_shrinking():
    x = torch.rand(1, 1, 40, 40)
    assert resize_images(x, (40, 40)) is x
    up = resize_images(x, (80, 80))
    assert up.shape[-2:] == (80, 80)
    stripes = torch.zeros(1, 1, 64, 64)
    stripes[..., ::2] = 1.0
    down = resize_images(stripes, (16, 16))[..., 1:-1]  # borders: the filter sees fewer stripes
    assert torch.allclose(down, torch.full_like(down, 0.5), atol=1e-3)  # antialiased: no aliasing


def test_authors_roundtrip_changes_the_model_input(tiny_model, monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.random((2, 64, 64), dtype=np.float32)  # already S×S: the plain path does not resize at all
    captured = {}

    def capture(seg, key):
        real = seg.model.encode

        def encode(images):
            captured[key] = images.detach().clone()
            return real(images)
        monkeypatch.setattr(seg.model, "encode", encode)

    plain = cpu_segmenter(tiny_model, batch_size=2)
    capture(plain, "plain")
    plain.segment(x)
    trip = cpu_segmenter(tiny_model, batch_size=2, authors_roundtrip=24)
    capture(trip, "trip")
    trip.segment(x)
    src = torch.from_numpy(x)[:, None]
    assert torch.equal(captured["plain"], src.expand(-1, 3, -1, -1))
    expected = F_bicubic(F_bicubic(src, 24), 64)
    assert torch.allclose(captured["trip"], expected.expand(-1, 3, -1, -1), atol=1e-6)
    assert (captured["trip"] - captured["plain"]).abs().mean() > 0.05  # detail lost through 24 px
    assert torch.equal(captured["trip"][:, 0], captured["trip"][:, 2])


def F_bicubic(x, side):
    return torch.nn.functional.interpolate(x, size=(side, side), mode="bicubic", align_corners=True)


def test_authors_resize_is_close_to_scipy_zoom_order3():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    yy, xx = np.mgrid[0:128, 0:128].astype(np.float32) / 128
    img = (0.5 + 0.4 * np.sin(6 * xx) * np.cos(4 * yy)).astype(np.float32)
    ref = scipy_ndimage.zoom(scipy_ndimage.zoom(img, 56 / 128, order=3), 128 / 56, order=3)
    ours = authors_resize(torch.from_numpy(img)[None, None], 56, 128)[0, 0].numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 0.02


# ----------------------------------------------------------------------------- model preparation
def test_prepared_model_is_a_merged_copy(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    training = tiny_model.training
    grads = [p.requires_grad for p in tiny_model.parameters()]
    seg = cpu_segmenter(tiny_model, batch_size=2)
    seg.segment(np.random.default_rng(0).random((2, 64, 64), dtype=np.float32))
    after = tiny_model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert tiny_model.training == training
    assert [p.requires_grad for p in tiny_model.parameters()] == grads
    assert any(isinstance(m, LoRAQKV) for m in tiny_model.modules())
    assert not any(isinstance(m, FastViTAttention) for m in tiny_model.modules())
    assert not any(isinstance(m, LoRAQKV) for m in seg.model.modules())
    assert any(isinstance(m, FastViTAttention) for m in seg.model.modules())
    assert not seg.model.training
    assert not any(p.requires_grad for p in seg.model.parameters())
    assert seg.model.image_encoder.blocks[0].attn.qkv.weight.data_ptr() != \
        tiny_model.image_encoder.blocks[0].attn.qkv.weight.data_ptr()


def test_bf16_recipe_on_cpu(tiny_model):
    model = prepare_model(tiny_model, torch.device("cpu"), torch.bfloat16)
    bf16 = [m for m in model.modules() if isinstance(m, BF16Linear)]
    assert len(bf16) == 3 * len(model.image_encoder.blocks)  # proj, lin1, lin2 of each block
    assert all(isinstance(block.mlp, BF16MLP) for block in model.image_encoder.blocks)
    for block in model.image_encoder.blocks:
        assert isinstance(block.attn.qkv, torch.nn.Linear)  # qkv stays float32
        assert block.attn.qkv.weight.dtype == torch.float32
    ref = prepare_model(tiny_model, torch.device("cpu"), None)
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        a, b = model.encode(x), ref.encode(x)
    assert a.dtype == torch.float32
    assert ((a - b).norm() / b.norm()).item() < 2e-2
    assert bf16_encoder_linears(torch.nn.Module()) == 0


# ---------------------------------------------------------------------------------- fast attention
CORES = ["mask", "augmented", "explicit"]


@pytest.mark.parametrize("window_size", [3, 4])  # 4×4 grid: padded windows (3) and exact windows (4)
@pytest.mark.parametrize("core", CORES)
def test_fast_attention_equals_sam_attention(core, window_size):
    torch.manual_seed(0)
    model = build_hsam(tiny_architecture(window_size), K).eval()
    _randomise(model)
    x = torch.rand(2, 3, 64, 64)
    fast = copy.deepcopy(model)
    assert use_fast_attention(fast.image_encoder, core, core) == 2
    with torch.inference_mode():
        ref, out = model.encode(x), fast.encode(x)
    assert (out - ref).abs().max().item() < 1e-4
    assert list(fast.state_dict()) == list(model.state_dict())
    # undo: SAM's modules come back, same function, same keys
    assert use_fast_attention(fast.image_encoder, "original", "original") == 0
    assert not any(isinstance(m, FastViTAttention) for m in fast.modules())
    assert [b.window_size for b in fast.image_encoder.blocks] == [b.window_size for b in model.image_encoder.blocks]
    with torch.inference_mode():
        assert (fast.encode(x) - ref).abs().max().item() < 1e-5


def test_fast_attention_vit_b_block_sizes():
    """One ViT-B-sized windowed block (32×32 tokens, window 14 → 42×42 padded) and one global block."""
    from functools import partial

    from segment_anything.modeling.image_encoder import Block

    torch.manual_seed(0)
    for window in (14, 0):
        block = Block(dim=768, num_heads=12, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                      window_size=window, input_size=(32, 32)).eval()
        with torch.no_grad():
            block.attn.rel_pos_h.normal_(0, 0.3)
            block.attn.rel_pos_w.normal_(0, 0.3)
        x = torch.randn(1, 32, 32, 768)
        fast = copy.deepcopy(block)
        use_fast_attention(type("Enc", (), {"blocks": [fast]})(), "augmented", "augmented")
        with torch.inference_mode():
            diff = (fast(x) - block(x)).abs().max().item()
        assert diff < 1e-4, f"window {window}: max |Δ| = {diff}"


def test_fast_attention_after_lora_merge(tiny_model):
    x = torch.rand(1, 3, 64, 64)
    model = copy.deepcopy(tiny_model).eval()
    prepared = prepare_model(tiny_model, torch.device("cpu"), None)
    with torch.inference_mode():
        assert (prepared.encode(x) - model.encode(x)).abs().max().item() < 1e-4


def test_inference_copy_shares_the_weights_it_does_not_change(tiny_model):
    """The prepared model costs only the tensors it replaces (merged qkv): the rest are the caller's memory,
    while the caller's parameters keep their gradients and values, and the outputs equal a deep copy's."""
    from hsam.engine.inference import sharing_copy

    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    grads = {name: p.requires_grad for name, p in tiny_model.named_parameters()}
    prepared = prepare_model(tiny_model, torch.device("cpu"), None)
    original = {p.data_ptr() for p in tiny_model.parameters()}
    prepared_ptrs = [p.data_ptr() for p in prepared.parameters()]
    shared = sum(ptr in original for ptr in prepared_ptrs)
    assert shared >= len(prepared_ptrs) - len(tiny_model.image_encoder.blocks) * 2  # all but qkv weight + bias
    assert not any(p.requires_grad for p in prepared.parameters())
    assert {name: p.requires_grad for name, p in tiny_model.named_parameters()} == grads
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        reference = prepare_model_by_deepcopy(tiny_model)(x).stage2_logits
        assert torch.equal(prepared(x).stage2_logits, reference)
    assert all(torch.equal(p, before[name]) for name, p in tiny_model.named_parameters())
    copied = sharing_copy(tiny_model)
    assert copied is not tiny_model and copied.image_encoder is not tiny_model.image_encoder


def prepare_model_by_deepcopy(model):
    """What ``prepare_model`` did before it shared tensors: a full deep copy, then the same steps."""
    import hsam.engine.inference as inference

    original = inference.sharing_copy
    inference.sharing_copy = copy.deepcopy
    try:
        return prepare_model(model, torch.device("cpu"), None)
    finally:
        inference.sharing_copy = original


def test_bf16_mlp_equals_separate_bf16_linears():
    """Keeping the MLP's hidden activation in bfloat16 is the same arithmetic as rounding it for lin2."""
    from segment_anything.modeling.common import MLPBlock

    torch.manual_seed(0)
    mlp = MLPBlock(32, 128).eval()
    fused = BF16MLP(mlp)
    lin1, lin2 = BF16Linear(mlp.lin1), BF16Linear(mlp.lin2)
    x = torch.randn(5, 7, 32)
    with torch.inference_mode():
        assert torch.equal(fused(x), lin2(mlp.act(lin1(x))))
        assert fused(x).dtype == torch.float32


def test_fast_attention_ignores_other_encoders():
    assert use_fast_attention(torch.nn.Sequential(torch.nn.Linear(2, 2))) == 0
    with pytest.raises(ValueError):
        use_fast_attention(torch.nn.Module(), "flash", "mask")


# ------------------------------------------------------------------------ the CPU bf16 decision (slow)
@pytest.mark.slow
def test_cpu_bf16_recipe_agrees_with_fp32_on_the_fixture():
    """The gate behind ``choose_precision(cpu, 'auto')``: the CPU bf16 recipe must give ≥ 99.5 % of the fp32
    labels on the fixture image with the official-layout weights."""
    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bfloat16")
    from test_official_equivalence import _reference_module  # the same weight rule
    import json

    from hsam_testlib import reference_fixture_path
    from hsam.weights.official import load_official

    path = reference_fixture_path()
    rule = _reference_module(path.parent)
    sam_keys = json.loads((path.parent / "sam_vit_b_base_keys.json").read_text())
    hsam_keys = json.loads((path.parent / "hsam_official_ckpt_keys.json").read_text())
    model, _, _ = load_official({k: rule.reference_tensor(k, s) for k, (s, _d) in sam_keys.items()},
                                {k: rule.reference_tensor(k, s) for k, s in hsam_keys.items()})
    arrays = dict(np.load(path))
    fp32 = SliceSegmenter(model, 9, 512, device="cpu", precision="fp32", batch_size=2).segment(arrays["image"])
    bf16 = SliceSegmenter(model, 9, 512, device="cpu", precision="bf16", batch_size=2).segment(arrays["image"])
    assert (fp32 == arrays["fused_labels"]).mean() >= 0.9999
    agreement = (bf16 == fp32).mean()
    assert agreement >= 0.995, f"bf16 recipe agrees on {agreement:.4%} of pixels"
    dices = [2 * ((bf16 == c) & (fp32 == c)).sum() / ((bf16 == c).sum() + (fp32 == c).sum())
             for c in range(1, 9) if (fp32 == c).any() or (bf16 == c).any()]
    passes = agreement >= 0.995 and min(dices) >= 0.99
    from hsam.engine import device as device_mod

    assert device_mod.CPU_BF16_DECISION == passes, (f"the auto decision must follow the gate: agreement "
                                                    f"{agreement:.4%}, min per-class Dice {min(dices):.4f}")


def test_per_batch_normalisation_gives_the_same_labels(tiny_model):
    """``segment(raw, normalize=f)`` (what the pipeline does, without a normalised copy of the volume) equals
    ``segment(f(raw))`` exactly, skipped slices included, and raw integer slices need ``normalize``."""
    from hsam.data.intensity import IntensityNormalizer
    from hsam.description import IntensitySpec

    raw = (np.random.default_rng(3).normal(40, 300, size=(5, 40, 40))).astype(np.int16)
    normalizer = IntensityNormalizer.fit(raw, IntensitySpec())  # CT window -125..275 HU
    skip = np.array([False, True, False, False, True])
    whole = cpu_segmenter(tiny_model, batch_size=2).segment(normalizer.apply(raw), skip=skip)
    batched = cpu_segmenter(tiny_model, batch_size=2).segment(raw, skip=skip, normalize=normalizer.apply)
    assert np.array_equal(whole, batched)
    with pytest.raises(InputVolumeError, match="intensity-normalised float"):
        cpu_segmenter(tiny_model).segment(raw)
