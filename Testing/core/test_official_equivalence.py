"""Our H-SAM reproduces the published H-SAM code's outputs from official-layout checkpoints.

Both checkpoint files are built in memory from the fixture's deterministic weight rule
(``reference_weights.py``), loaded through our official import path, and run on the fixture image.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from hsam_testlib import reference_fixture_path
from hsam.model.lora import merge_lora
from hsam.weights.official import load_official

pytestmark = pytest.mark.slow


def _reference_module(fixture_dir):
    spec = importlib.util.spec_from_file_location("reference_weights", fixture_dir / "reference_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference():
    path = reference_fixture_path()
    if not path.is_file():
        pytest.fail(f"reference fixture not found at {path} (set HSAM_REFERENCE_FIXTURE)")
    fixture_dir = path.parent
    rule = _reference_module(fixture_dir)
    sam_keys = json.loads((fixture_dir / "sam_vit_b_base_keys.json").read_text())
    hsam_keys = json.loads((fixture_dir / "hsam_official_ckpt_keys.json").read_text())
    sam_state = {k: rule.reference_tensor(k, shape) for k, (shape, _dtype) in sam_keys.items()}
    hsam_state = {k: rule.reference_tensor(k, shape) for k, shape in hsam_keys.items()}
    return dict(np.load(path)), sam_state, hsam_state


@pytest.fixture(scope="module")
def official_run(reference):
    arrays, sam_state, hsam_state = reference
    model, description, report = load_official(sam_state, hsam_state)
    images = torch.from_numpy(arrays["image"]).unsqueeze(1).repeat(1, 3, 1, 1)
    with torch.inference_mode():
        out = model(images)
        fused = model.fused_logits(out).argmax(1)
    return arrays, model, description, report, out, fused, images


def test_stage1_logits_match(official_run):
    arrays, _, _, _, out, _, _ = official_run
    diff = (out.stage1_logits - torch.from_numpy(arrays["stage1_low_res_logits"])).abs().max().item()
    assert diff < 1e-3, f"stage-1 max |Δ| = {diff}"


def test_stage2_logits_match(official_run):
    arrays, _, _, _, out, _, _ = official_run
    diff = (out.stage2_logits - torch.from_numpy(arrays["stage2_logits_512"])).abs().max().item()
    assert diff < 1e-3, f"stage-2 max |Δ| = {diff}"


def test_fused_labels_match(official_run):
    arrays, _, _, _, _, fused, _ = official_run
    agreement = (fused.numpy().astype(np.uint8) == arrays["fused_labels"]).mean()
    assert agreement >= 0.9999, f"fused labels agree on {agreement:.6%} of pixels"


def test_dead_branch_ignored_and_reported(official_run):
    _, _, description, report, _, _, _ = official_run
    assert any(k.startswith("mask_decoder2.self_attn.") for k in report.ignored_keys)
    assert any(k.startswith("prompt_encoder2.") for k in report.ignored_keys)
    # ~12.6 M dead-branch parameters plus the duplicate prompt encoder and unused norms/IoU head.
    assert 12_000_000 < report.ignored_parameters < 14_000_000
    assert "ignored" in description.provenance["import_report"]


def test_merged_lora_computes_the_same(official_run):
    arrays, model, _, _, out, _, images = official_run
    import copy
    merged = copy.deepcopy(model)
    assert merge_lora(merged) == 12
    with torch.inference_mode():
        again = merged(images[:1])
    diff = (again.stage2_logits - out.stage2_logits[:1]).abs().max().item()
    assert diff < 1e-3
