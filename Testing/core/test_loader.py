"""Loading what users have: official .pth pairs from disk and through the registry, our model files."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from hsam_testlib import make_tiny_model_file
from hsam.errors import ModelFileError
from hsam.weights.loader import load_checkpoint, load_model, load_model_file, save_model
from test_official_equivalence import reference  # noqa: F401  (module-scoped fixture)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def official_files(reference, tmp_path_factory):  # noqa: F811
    arrays, sam_state, hsam_state = reference
    folder = tmp_path_factory.mktemp("official")
    sam_path, hsam_path = folder / "sam_vit_b_01ec64.pth", folder / "220_epoch_299.pth"
    torch.save(sam_state, sam_path)
    torch.save(hsam_state, hsam_path)
    return arrays, sam_path, hsam_path


@pytest.mark.slow
def test_official_pair_from_disk_via_registry_import(official_files, tmp_path, monkeypatch):
    """`hsam models import` the two files (checksums pinned in a site registry), then load by name."""
    arrays, sam_path, hsam_path = official_files
    registry = {"format": "hsam-registry", "format_version": 1, "inherit_builtin": False, "models": [
        {"id": "sam-vit-b", "title": "SAM", "kind": "sam-base", "licence": "Apache-2.0", "status": "verified",
         "requires": [], "label_set": None, "files": [
             {"name": "sam_vit_b_01ec64.pth", "role": "sam_checkpoint", "url": "http://127.0.0.1:9/none",
              "size": sam_path.stat().st_size, "sha256": _sha(sam_path)}]},
        {"id": "hsam-synapse-10pct", "title": "H-SAM", "kind": "hsam-official", "licence": "MIT",
         "status": "unverified", "requires": ["sam-vit-b"], "label_set": "synapse-8-organs", "files": [
             {"name": "220_epoch_299.pth", "role": "checkpoint", "google_drive_id": "1A1wqTT_FD6FXzqCj9LNStxT425ZfYpnE", "size": None,
              "sha256": None}]}]}
    site = tmp_path / "site.json"
    site.write_text(json.dumps(registry))
    monkeypatch.setenv("HSAM_REGISTRY", str(site))
    from hsam.cli import main
    assert main(["models", "import", "sam-vit-b", str(sam_path)]) == 0
    assert main(["models", "import", "hsam-synapse-10pct", str(hsam_path)]) == 0
    loaded = load_model("hsam-synapse-10pct")
    assert loaded.description.provenance["registry_status"] == "unverified"
    assert "ignored" in loaded.import_notes
    image = torch.from_numpy(arrays["image"][:1]).unsqueeze(1).repeat(1, 3, 1, 1)
    with torch.inference_mode():
        out = loaded.model(image)
    ref = torch.from_numpy(arrays["stage2_logits_512"][:1])
    assert (out.stage2_logits - ref).abs().max().item() < 1e-3
    # and it converts to our single-file format with identical outputs
    single = save_model(tmp_path / "synapse.safetensors", loaded)
    again = load_model_file(single)
    with torch.inference_mode():
        out2 = again.model(image)
    assert torch.equal(out2.stage2_logits, out.stage2_logits)


def test_model_file_round_trip_same_outputs(tmp_path):
    path = make_tiny_model_file(tmp_path / "m.safetensors", seed=3)
    first = load_model_file(path)
    copy = save_model(tmp_path / "copy.safetensors", first)
    second = load_model_file(copy)
    assert second.description == first.description
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        a, b = first.model(x), second.model(x)
    assert torch.equal(a.stage2_logits, b.stage2_logits) and torch.equal(a.stage1_logits, b.stage1_logits)


def test_model_file_loads_into_the_read_tensors_exactly_as_a_copying_load(tmp_path):
    """Built on the meta device and given the file's tensors: same values and outputs as building normally and
    copying the state in, nothing left on the meta device, gradients as a built model has them."""
    from hsam.model import build_from_description
    from hsam.weights.modelfile import read_model_file

    path = make_tiny_model_file(tmp_path / "m.safetensors", seed=4)
    loaded = load_model_file(path)
    state, description = read_model_file(path)
    copied = build_from_description(description)
    copied.load_state_dict(dict(state))
    copied.eval()
    assert not any(t.is_meta for t in list(loaded.model.parameters()) + list(loaded.model.buffers()))
    assert [(n, p.requires_grad) for n, p in loaded.model.named_parameters()] == \
        [(n, p.requires_grad) for n, p in copied.named_parameters()]
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x).stage2_logits, copied(x).stage2_logits)


def test_plain_sam_checkpoint_is_not_a_model(tmp_path):
    path = tmp_path / "sam.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(1),
                "mask_decoder.mask_tokens.weight": torch.zeros(1)}, path)
    with pytest.raises(ModelFileError, match="plain SAM checkpoint"):
        load_checkpoint(path)


def test_exactly_one_source_required():
    with pytest.raises(ModelFileError, match="either"):
        load_model()
    with pytest.raises(ModelFileError, match="either"):
        load_model(model="x", checkpoint="y")
