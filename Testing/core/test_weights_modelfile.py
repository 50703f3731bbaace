"""hsam.weights.modelfile: our safetensors model format (round trip, refusals, header-only reads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hsam.data.labels import SYNAPSE_ORGANS
from hsam.description import ModelDescription, sam_vit_architecture
from hsam.errors import ChecksumError, ModelFileError
from hsam.weights import modelfile
from hsam.weights.modelfile import (check_model_file, content_sha256, content_sha256_of_file, read_description,
                                    read_header, read_model_file, save_model_file)


@pytest.fixture()
def description() -> ModelDescription:
    return ModelDescription(name="test-model", title="Test model", architecture=sam_vit_architecture(),
                            labels=SYNAPSE_ORGANS, provenance={"parent": "hsam-synapse-10pct", "slices": [1, 2]},
                            licence="MIT")


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    half = torch.randn(3, 5, generator=g).half()
    half[0, 0], half[0, 1], half[0, 2] = float("nan"), float("inf"), -0.0
    return {
        "encoder.weight": torch.randn(4, 6, generator=g),
        "decoder.half": half,
        "decoder.bf16": torch.randn(7, 2, generator=g).bfloat16(),
        "steps": torch.tensor(12, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "transposed": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),  # not contiguous
    }


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_round_trip_is_bit_identical(tmp_path, description):
    state = _state()
    path = save_model_file(tmp_path / "m.safetensors", state, description)
    loaded, desc = read_model_file(path)
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert _raw(loaded[name]) == _raw(tensor), name
    assert desc == description and desc.to_json() == description.to_json()
    assert read_description(path) == description
    assert check_model_file(path) == description
    header = read_header(path)
    assert header.metadata["hsam_format_version"] == "1"
    assert header.metadata["hsam_content_sha256"] == content_sha256(state) == content_sha256_of_file(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_read_tensors_are_fresh_aligned_allocations(tmp_path, description):
    """Each tensor read owns exactly its memory, aligned as torch allocates (the model holds them as they are:
    no second copy, and the same kernels as for a freshly allocated parameter)."""
    path = save_model_file(tmp_path / "m.safetensors", _state(), description)
    loaded, _ = read_model_file(path)
    for name, tensor in loaded.items():
        if tensor.numel():
            assert tensor.data_ptr() % 64 == 0, name
            assert tensor.untyped_storage().nbytes() == tensor.nbytes and tensor.is_contiguous(), name


def test_tied_and_sliced_tensors_are_saved(tmp_path, description):
    base = torch.randn(10)
    state = {"a": base, "b": base, "slice": base[2:5]}
    loaded, _ = read_model_file(save_model_file(tmp_path / "t.safetensors", state, description))
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_refuses_to_overwrite_its_source(tmp_path, description):
    path = save_model_file(tmp_path / "m.safetensors", _state(), description)
    state, desc = read_model_file(path)
    with pytest.raises(ModelFileError, match="refusing to overwrite .* read from this same file"):
        save_model_file(path, state, desc)
    with pytest.raises(ModelFileError, match="refusing to overwrite"):
        save_model_file(path, dict(state), desc, source=path)
    save_model_file(tmp_path / "copy.safetensors", state, desc.with_changes(name="copy"))
    assert read_description(tmp_path / "copy.safetensors").name == "copy"


def test_failed_save_keeps_the_old_file(tmp_path, description, monkeypatch):
    path = save_model_file(tmp_path / "m.safetensors", _state(), description)
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_model_file(path, {"w": torch.ones(2)}, description)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_missing_folder_and_bad_entries(tmp_path, description):
    with pytest.raises(ModelFileError, match="folder .* does not exist"):
        save_model_file(tmp_path / "no" / "m.safetensors", _state(), description)
    with pytest.raises(ModelFileError, match="'x' is a list, not a tensor"):
        save_model_file(tmp_path / "m.safetensors", {"x": [1, 2]}, description)
    with pytest.raises(TypeError, match="ModelDescription"):
        save_model_file(tmp_path / "m.safetensors", {}, {"name": "x"})


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        read_description(tmp_path / "absent.safetensors")


def test_truncated_files_are_refused(tmp_path, description):
    path = save_model_file(tmp_path / "m.safetensors", _state(), description)
    data = path.read_bytes()
    (tmp_path / "cut_data.safetensors").write_bytes(data[:-10])
    with pytest.raises(ModelFileError, match="truncated: its header describes"):
        read_description(tmp_path / "cut_data.safetensors")
    with pytest.raises(ModelFileError, match="truncated"):
        read_model_file(tmp_path / "cut_data.safetensors")
    (tmp_path / "cut_header.safetensors").write_bytes(data[:100])
    with pytest.raises(ModelFileError, match="truncated: its header needs"):
        read_description(tmp_path / "cut_header.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    with pytest.raises(ModelFileError, match="truncated"):
        read_description(tmp_path / "tiny.safetensors")


def test_flipped_byte_in_tensor_data_is_refused(tmp_path, description):
    path = save_model_file(tmp_path / "m.safetensors", _state(), description)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="content checksum mismatch"):
        read_model_file(path)
    with pytest.raises(ChecksumError):
        check_model_file(path)
    loaded, _ = read_model_file(path, verify=False)  # explicitly unchecked reads still work
    assert set(loaded) == set(_state())


def test_pytorch_checkpoint_is_refused(tmp_path):
    path = tmp_path / "220_epoch_299.pth"
    torch.save({"w_a_000": torch.zeros(2)}, path)
    with pytest.raises(ModelFileError, match="looks like a PyTorch checkpoint.*hsam models import"):
        read_description(path)
    with pytest.raises(ModelFileError, match="PyTorch checkpoint"):
        read_model_file(path)


def test_other_files_are_refused(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_bytes(b"hello world, this is not a model file at all")
    with pytest.raises(ModelFileError, match="not a safetensors model file"):
        read_description(path)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ModelFileError, match="not an H-SAM model file"):
        read_description(plain)


def _with_metadata(tmp_path: Path, description: ModelDescription, **changes: str | None) -> Path:
    tensors = {"w": torch.zeros(2)}
    metadata = {"hsam_format_version": "1", "hsam_description": description.dumps(),
                "hsam_content_sha256": content_sha256(tensors)}
    for key, value in changes.items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    path = tmp_path / "meta.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_description_problems_are_refused(tmp_path, description):
    with pytest.raises(ModelFileError, match="no model description"):
        read_description(_with_metadata(tmp_path, description, hsam_description=None))
    with pytest.raises(ModelFileError, match="description .* is unusable"):
        read_description(_with_metadata(tmp_path, description, hsam_description="{broken"))
    bad = description.to_json()
    del bad["labels"]
    with pytest.raises(ModelFileError, match="unusable"):
        read_description(_with_metadata(tmp_path, description, hsam_description=json.dumps(bad)))
    newer = dict(description.to_json(), format_version=2)
    with pytest.raises(ModelFileError, match="newer"):
        read_description(_with_metadata(tmp_path, description, hsam_description=json.dumps(newer)))
    with pytest.raises(ModelFileError, match="written by a newer hsam .*update hsam"):
        read_description(_with_metadata(tmp_path, description, hsam_format_version="2"))
    with pytest.raises(ModelFileError, match="no content checksum"):
        read_model_file(_with_metadata(tmp_path, description, hsam_content_sha256=None))


def test_header_read_does_not_import_torch(tmp_path, description):
    path = save_model_file(tmp_path / "m.safetensors", _state(), description)
    code = ("import sys\nimport hsam.weights.modelfile as mf\n"
            f"d = mf.read_description({str(path)!r})\nmf.check_model_file({str(path)!r})\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint(d.name)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "test-model"


def test_header_entry_inconsistent_with_shape(tmp_path, description):
    path = save_model_file(tmp_path / "m.safetensors", {"w": torch.zeros(4)}, description)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["w"]["shape"] = [5]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    assert len(text) == n
    path.write_bytes(data[:8] + text + data[8 + n:])
    with pytest.raises(ModelFileError, match="malformed header entry"):
        read_description(path)
    assert modelfile.FORMAT_VERSION == "1"
