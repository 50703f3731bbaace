"""``hsam train`` (hsam.engine.train): slice selection, sharding, 1 vs 2 processes (gloo), exact resume,
safe checkpoints. Tiny model (64 px), two synthetic 32×32×6 volumes; the whole file runs in well under a minute
on 2 CPU cores."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sitk = pytest.importorskip("SimpleITK")

from hsam_testlib import write_training_dataset  # noqa: E402

from hsam.engine import train as tr  # noqa: E402
from hsam.weights.loader import load_model_file  # noqa: E402
from hsam.weights.modelfile import read_model_file  # noqa: E402

COMMON = dict(global_batch=4, warmup=1, lr=1e-3, fraction=0.5, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return write_training_dataset(tmp_path_factory.mktemp("train_data"), cases=2, shape=(6, 32, 32))


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _state(path) -> dict:
    state, _ = read_model_file(path)
    return dict(state)


# ---------------------------------------------------------------------------------------------- (c) data, sampling

def test_fraction_protocol_is_seeded_and_exact():
    depths = [123] * 17 + [120]  # 2,211 slices, like Synapse's 18 training volumes
    assert sum(depths) == 2211
    chosen = tr.select_slices(depths, 0.1, 2345)
    assert len(chosen) == 221 and len(set(chosen)) == 221 and chosen == sorted(chosen)
    assert chosen == tr.select_slices(depths, 0.1, 2345)
    assert chosen != tr.select_slices(depths, 0.1, 2346)
    assert all(0 <= k < depths[v] for v, k in chosen)
    assert tr.select_slices([3, 2], 1.0, 0) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]


def test_stream_is_epoch_permutations_and_shards_concatenate():
    n, batch = 6, 4
    stream = [i for step in range(3) for _, i in tr.global_batch_positions(step, batch, n, 7)]
    assert sorted(stream[:6]) == list(range(6)) and sorted(stream[6:12]) == list(range(6))
    assert stream == [i for step in range(3) for _, i in tr.global_batch_positions(step, batch, n, 7)]
    whole = tr.global_batch_positions(2, batch, n, 7)
    assert [p for p, _ in whole] == [8, 9, 10, 11]
    assert tr.shard(whole, 0, 2) + tr.shard(whole, 1, 2) == whole


def test_dataset_from_folder_and_csv(dataset_dir, tiny_model_file, tmp_path):
    base = load_model_file(tiny_model_file)
    pairs = tr.find_pairs(dataset_dir)
    assert [Path(p.image).name for p in pairs] == ["case0.nii.gz", "case1.nii.gz"]
    table = tmp_path / "data.csv"
    table.write_text("image,label\n" + "".join(f"{p.image},{p.label}\n" for p in pairs))
    assert tr.find_pairs(table) == pairs
    a = tr.SliceDataset(pairs, base.description, base.description.labels, 0.5, 2345)
    b = tr.SliceDataset(tr.find_pairs(table), base.description, base.description.labels, 0.5, 2345)
    assert len(a) == 6 and a.entries == b.entries and a.sha256() == b.sha256()
    assert a.images.shape == (6, 64, 64) and a.targets.shape == (6, 64, 64)
    assert 0 <= float(a.images.min()) and float(a.images.max()) <= 1
    assert set(torch.unique(a.targets).tolist()) <= {0, 1, 5}  # spleen (1), liver (5): class index = value here
    assert a.record()["selected_slices"] == 6 and a.record()["total_slices"] == 12


# ---------------------------------------------------------------------------------------------- (d) errors

def test_global_batch_must_divide_by_world(dataset_dir, tiny_model_file, monkeypatch):
    with pytest.raises(tr.TrainError, match="does not divide by the 2 processes"):
        tr.shard(list(range(5)), 0, 2)
    monkeypatch.setattr(tr, "_init_distributed", lambda device: tr._Dist(world=2, device=torch.device("cpu")))
    base = load_model_file(tiny_model_file)
    with pytest.raises(tr.TrainError, match="global batch 3 does not divide by the 2 processes"):
        tr.train(dataset_dir, base, **{**COMMON, "global_batch": 3, "steps": 1})
    with pytest.raises(tr.TrainError, match="bf16 autocast is for CUDA"):
        tr._autocast_dtype(torch.device("cpu"), "bf16")


# ---------------------------------------------------------------------------------------------- (a) 1 vs 2 processes

def test_two_gloo_processes_match_one_process(dataset_dir, tiny_model_file, tmp_path):
    one = tr.train(dataset_dir, load_model_file(tiny_model_file), out=tmp_path / "one.safetensors", steps=3,
                   **COMMON)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "hsam.cli", "train", str(dataset_dir), "--out", str(tmp_path / "two.safetensors"),
           "--base", str(tiny_model_file), "--steps", "3", "--global-batch", "4", "--warmup", "1", "--lr", "1e-3",
           "--fraction", "0.5", "--device", "cpu", "--precision", "fp32", "--quiet",
           "--log-csv", str(tmp_path / "two.csv"), "--grad-checkpoint"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    a, b = _state(one.path), _state(tmp_path / "two.safetensors")
    base = _state(tiny_model_file)
    assert a.keys() == b.keys()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    moved = max(float((a[k].float() - base[k].float()).abs().max()) for k in a if k in base)
    assert moved > 1e-3  # training changed the parameters…
    # …identically (up to summation order) with 2 processes of half the batch (and encoder recomputation)
    assert diff < 1e-5, diff
    with open(tmp_path / "two.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert [float(r["loss"]) for r in rows] == pytest.approx([float(r["loss"]) for r in one.history], abs=1e-5)
    entry = one.loaded.description.provenance["lineage"][-1]
    assert entry["mode"] == "train" and entry["dataset"]["selected_slices"] == 6 and entry["steps"] == 3
    assert read_model_file(tmp_path / "two.safetensors")[1].provenance["train"]["world_size"] == 2


# ---------------------------------------------------------------------------------------------- (b, e) resume

def test_resume_is_bit_identical_and_checkpoints_are_weights_only(dataset_dir, tiny_model_file, tmp_path):
    settings = dict(COMMON, steps=4, checkpoint_every=2)
    full = tr.train(dataset_dir, load_model_file(tiny_model_file), out=tmp_path / "full.safetensors", **settings)
    log = tmp_path / "part.csv"
    ckpt = tmp_path / "ckpt"
    stopped = tr.train(dataset_dir, load_model_file(tiny_model_file), out=tmp_path / "part.safetensors",
                       checkpoint_dir=ckpt, log_path=log, stop_after=2, **settings)
    assert stopped.loaded is None and stopped.step == 2 and not (tmp_path / "part.safetensors").exists()

    state = torch.load(ckpt / "last.pt", map_location="cpu", weights_only=True)  # (e) safe to load
    assert state["step"] == 2 and state["sample_position"] == 8
    assert isinstance(state["rng"]["torch_cpu"], torch.Tensor)
    assert state["model"] and all(isinstance(v, torch.Tensor) for v in state["model"].values())
    assert state["optimizer"]["state"] and state["scheduler"]["total"] == 4
    assert not list(ckpt.glob(".*tmp*"))  # written atomically, nothing left behind

    resumed = tr.train(dataset_dir, load_model_file(tiny_model_file), out=tmp_path / "part.safetensors",
                       resume=ckpt, log_path=log, **settings)
    a, b = _state(full.path), _state(resumed.path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with open(log, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in full.history]

    with pytest.raises(tr.TrainError, match="differs in"):
        tr.train(dataset_dir, load_model_file(tiny_model_file), out=tmp_path / "other.safetensors",
                 resume=ckpt, **{**settings, "seed": 1})


# ---------------------------------------------------------------------------------------------- SAM as the base

def test_sam_base_starts_from_sam_and_trains(dataset_dir, tiny_model_file, tmp_path):
    from hsam.data.labels import SYNAPSE_ORGANS
    from hsam.weights.loader import LoadedModel
    from hsam.weights.sam_base import build_sam_base

    tiny = load_model_file(tiny_model_file)
    own = tiny.model.state_dict()
    sam = {k: v.clone() for k, v in own.items()
           if k.startswith(("image_encoder.", "prompt_encoder.")) and ".lora_" not in k}
    sam.update({"mask_decoder." + k[len("stage1."):]: v.clone() for k, v in own.items()
                if k.startswith("stage1.") and ".output_hypernetworks_mlps." not in k})
    sam["mask_decoder.mask_tokens.weight"] = torch.randn(4, own["stage1.mask_tokens.weight"].shape[1])  # SAM: 4
    model, description = build_sam_base(sam, SYNAPSE_ORGANS, image_size=64,
                                        architecture=tiny.description.architecture)
    state = model.state_dict()
    assert description.provenance["heads_trained"] is False
    assert all(torch.equal(state[k], sam[k]) for k in sam if k.startswith(("image_encoder.", "prompt_encoder.")))
    assert torch.equal(state["stage1.transformer.layers.0.mlp.lin1.weight"],
                       sam["mask_decoder.transformer.layers.0.mlp.lin1.weight"])
    assert all(float(v.abs().max()) == 0 for k, v in state.items() if k.endswith(("lora_q_b", "lora_v_b")))
    result = tr.train(dataset_dir, LoadedModel(model, description, "sam"), steps=1, **COMMON)
    assert result.loaded.description.provenance["heads_trained"] is True
    from hsam.errors import ModelFileError

    with pytest.raises(ModelFileError):  # our own layout is not SAM's
        build_sam_base(own, SYNAPSE_ORGANS)


# ---------------------------------------------------------------------------------------------- TransUNet layout

def _write_npz_slices(folder: Path, cases=("case0005", "case0006"), n=4, size=32) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for case in cases:
        for k in range(n):
            image = rng.random((size, size)).astype(np.float32)
            label = np.zeros((size, size), np.uint8)
            label[4:12, 4 + k:12 + k] = 1  # spleen
            label[16:28, 16:28] = 6  # stomach
            np.savez(folder / f"{case}_slice{k:03d}.npz", image=image, label=label)


def test_transunet_npz_slices_train(tiny_model_file, tmp_path):
    """TransUNet's ``train_npz`` (what SAMed/H-SAM train on): slices used as they are, selected by the same protocol,
    Synapse label values mapped to class indices; the model trains from them; bad files are refused safely."""
    from hsam.engine.train_npz import npz_folder

    data = tmp_path / "Synapse"
    _write_npz_slices(data / "train_npz")
    assert npz_folder(data) == data / "train_npz" and npz_folder(tmp_path) is None
    base = load_model_file(tiny_model_file)
    labelset = base.description.labels
    dataset = tr.open_dataset(data, base.description, labelset, 0.5, 2345)
    assert dataset.depths == [4, 4] and len(dataset) == 4
    assert dataset.entries == tr.select_slices([4, 4], 0.5, 2345)
    size = base.description.image_size
    assert tuple(dataset.images.shape) == (4, size, size) and tuple(dataset.targets.shape) == (4, size, size)
    index = {v: i for i, v in enumerate(labelset.index_to_value_lut())}
    assert set(torch.unique(dataset.targets).tolist()) == {0, index[1], index[6]}
    record = dataset.record()
    assert record["total_slices"] == 8 and record["selected_slices"] == 4 and not dataset.warnings
    result = tr.train(data, base, out=tmp_path / "npz.safetensors", steps=2, **COMMON)
    assert result.path.is_file()

    bad = tmp_path / "bad"
    _write_npz_slices(bad, cases=("case0001",), n=1)
    np.savez(bad / "case0001_slice001.npz", image=np.array([object()], dtype=object), label=np.zeros(2))
    with pytest.raises(Exception, match="cannot be read safely|image .* and label"):
        tr.open_dataset(bad, base.description, labelset, 1.0, 0)
    (bad / "notes.npz").write_bytes(b"x")
    with pytest.raises(tr.TrainError, match="not named like TransUNet"):
        tr.open_dataset(bad, base.description, labelset, 1.0, 0)
