"""Fine-tuning on a tiny synthetic problem: it learns, it is reproducible, it refuses bad input clearly,
it can be cancelled, and it never touches the base model or the user's labels."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from hsam_testlib import make_tiny_model_file
from hsam.data.labels import LabelClass, LabelSet, SYNAPSE_ORGANS
from hsam.engine.finetune import (FinetuneError, FinetuneSettings, decode_embeddings, embed_slices, finetune,
                                  parse_slice_spec)
from hsam.errors import CancelledError, InputVolumeError, ModelFileError
from hsam.weights.loader import load_model_file
from hsam.weights.modelfile import content_sha256, read_description

TWO_BLOBS = LabelSet("two-blobs", (LabelClass(1, "round blob", (200, 60, 60)),
                                   LabelClass(2, "bright blob", (60, 200, 60))))
FAST = dict(device="cpu", precision="fp32", validation=0.0, guidance=0.0)


def blob_volume(depth: int = 8, size: int = 40, seed: int = 0):
    """A CT-like volume whose two blobs move and grow along k, and their labels (k, j, i) (1 = round, 2 = bright)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(np.arange(depth), np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    shift = (zz / depth - 0.5) * 0.3
    round_blob = ((xx + 0.35 + shift) / 0.32) ** 2 + (yy / 0.32) ** 2 < 1
    bright_blob = ((xx - 0.4) / (0.15 + 0.1 * zz / depth)) ** 2 + ((yy + 0.1 - shift) / 0.2) ** 2 < 1
    body = (xx / 0.95) ** 2 + (yy / 0.8) ** 2 < 1
    volume = np.where(body, 20.0, -1000.0)
    volume[round_blob] = 90.0
    volume[bright_blob] = 260.0
    volume += rng.normal(0, 5, volume.shape)
    labels = np.zeros(volume.shape, np.uint8)
    labels[round_blob] = 1
    labels[bright_blob] = 2
    image = sitk.GetImageFromArray(volume.astype(np.int16))
    image.SetSpacing((1.0, 1.0, 2.0))
    return image, labels


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    return make_tiny_model_file(tmp_path_factory.mktemp("base") / "base.safetensors", seed=1)


@pytest.fixture
def base(base_file):
    return load_model_file(base_file)


def file_sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def dice(pred, truth, value):
    a, b = pred == value, truth == value
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def segment(loaded, image, ks):
    from hsam.data.orientation import reorientation_for

    desc = loaded.description
    emb = embed_slices(loaded.model, image, desc, ks, cache=False)
    reorient = reorientation_for(image, desc.orientation)
    idx = decode_embeddings(loaded.model, emb, reorient.model_shape[1:])
    lut = np.asarray(desc.labels.index_to_value_lut(), np.uint8)
    stack = np.zeros(reorient.model_shape, np.uint8)
    for k, sl in zip(ks, idx):
        stack[reorient.model_slice_index(k)] = lut[sl]
    return reorient.to_input(stack)[ks]


def test_parse_slice_spec():
    assert parse_slice_spec("0,10,20-23, 5") == [0, 5, 10, 20, 21, 22, 23]
    assert parse_slice_spec([3, 1, 3]) == [1, 3]
    for bad in ("", "a", "3-1", "1,,x"):
        with pytest.raises(InputVolumeError):
            parse_slice_spec(bad)


def test_fast_finetune_learns_a_new_label_set_and_is_reproducible(base, base_file, tmp_path):
    image, labels = blob_volume()
    before_labels = labels.copy()
    before_file = file_sha(base_file)
    before_state = content_sha256(base.model.state_dict())
    given, held_out = [0, 2, 4, 6, 7], [1, 3, 5]
    base_pred = None
    kwargs = dict(labelset=TWO_BLOBS, steps=80, lr=3e-3, seed=5, save=False, **FAST)
    first = finetune(image, labels, given, base, **kwargs)
    second = finetune(image, labels, given, base, **kwargs)
    # the loss went down
    losses = [r.loss for r in first.history]
    assert losses[-1] < 0.8 * losses[0], losses
    # reproducible with a seed: same losses, same weights
    assert losses == [r.loss for r in second.history]
    assert content_sha256(first.loaded.model.state_dict()) == content_sha256(second.loaded.model.state_dict())
    # better than the base with fresh heads on slices it never saw
    from hsam.engine.finetune_model import build_student
    from hsam.weights.loader import LoadedModel

    untrained, desc, _ = build_student(base, TWO_BLOBS, seed=5)
    base_pred = segment(LoadedModel(untrained.eval(), desc, "x"), image, held_out)
    pred = segment(first.loaded, image, held_out)
    for value in (1, 2):
        assert dice(pred, labels[held_out], value) > max(0.6, dice(base_pred, labels[held_out], value) + 0.2)
    # new label set: K' = 3 outputs, heads re-initialised
    assert first.loaded.model.num_classes == 3
    entry = first.description.provenance["finetune"]
    assert entry["labels"]["reinitialised"] == ["round blob", "bright blob"]
    # base and labels untouched
    assert np.array_equal(labels, before_labels)
    assert file_sha(base_file) == before_file
    assert content_sha256(base.model.state_dict()) == before_state
    # a different seed gives a different model
    other = finetune(image, labels, given, base, **{**kwargs, "seed": 6, "steps": 4})
    assert content_sha256(other.loaded.model.state_dict()) != content_sha256(first.loaded.model.state_dict())


def test_saved_model_has_lineage_and_loads(base, base_file, tmp_path):
    image, labels = blob_volume()
    out = tmp_path / "ft.safetensors"
    result = finetune(image, labels, "0-7", base, labelset=TWO_BLOBS, steps=6, seed=1, out=out,
                      image_name="blobs.nrrd", device="cpu", precision="fp32", validation=0.3)
    assert result.path == out and out.is_file()
    desc = read_description(out)
    prov = desc.provenance
    assert prov["heads_trained"] is True and prov["base_model"] == "tiny-test"
    entry = prov["finetune"]
    assert entry["base"]["content_sha256"] == content_sha256(base.model.state_dict())
    assert entry["slices"]["corrected"] == list(range(8)) and entry["slices"]["axis"] == "k"
    assert len(entry["slices"]["validation"]) == 2 and entry["validation"]["dice"].keys() == {"round blob",
                                                                                              "bright blob"}
    assert entry["settings"]["seed"] == 1 and entry["mode"] == "fast" and entry["hsam_version"]
    assert entry["date"][:2] == "20" and entry["image"]["name"] == "blobs.nrrd"
    assert prov["lineage"][-1]["date"] == entry["date"]
    assert desc.labels == TWO_BLOBS
    reloaded = load_model_file(out)
    assert reloaded.heads_trained
    # fine-tuning the fine-tuned model extends the lineage
    again = finetune(image, labels, [1, 5], reloaded, steps=2, save=False, device="cpu", precision="fp32")
    assert len(again.description.provenance["lineage"]) == 2
    assert again.description.provenance["finetune"]["labels"]["reused_from_base"] == ["round blob", "bright blob"]


def test_default_output_goes_to_the_user_models_folder(base):
    from hsam.weights.cache import models_dir

    image, labels = blob_volume()
    result = finetune(image, labels, [0, 4], base, labelset=TWO_BLOBS, steps=2, device="cpu", precision="fp32")
    assert result.path.parent == models_dir()
    assert result.path.name.startswith("two-blobs-ft-") and result.path.suffix == ".safetensors"
    from hsam.weights.loader import load_model

    assert load_model(model=result.path.stem).description.name == result.path.stem


def test_labels_sharing_class_names_reuse_the_base_heads(base):
    image, labels = blob_volume()
    labels = np.where(labels == 2, 5, labels).astype(np.uint8)  # 1 spleen, 5 liver of the base's label set
    subset = LabelSet("two-organs", (LabelClass(1, "spleen", (1, 2, 3)), LabelClass(5, "Liver", (4, 5, 6))))
    result = finetune(image, labels, [0, 3, 6], base, labelset=subset, steps=1, lr=1e-9, save=False, **FAST)
    assert result.description.provenance["finetune"]["labels"]["reused_from_base"] == ["spleen", "Liver"]
    old = base.model.state_dict()
    new = result.loaded.model.state_dict()
    liver_index = SYNAPSE_ORGANS.index_to_value_lut().index(5)
    assert torch.allclose(new["stage2.mask_tokens.weight"][2], old["stage2.mask_tokens.weight"][liver_index],
                          atol=1e-4)


def test_full_mode_trains_lora_and_decoders_only(base):
    image, labels = blob_volume(depth=4)
    result = finetune(image, labels, [0, 1, 2, 3], base, mode="full", labelset=TWO_BLOBS, steps=3, batch_size=2,
                      save=False, **FAST)
    old, new = base.model.state_dict(), result.loaded.model.state_dict()
    lora = [k for k in new if ".lora_" in k]
    assert lora and any(not torch.equal(old[k], new[k]) for k in lora)
    frozen = [k for k in new if k.startswith("image_encoder.") and ".lora_" not in k]
    assert all(torch.equal(old[k], new[k]) for k in frozen)
    assert result.description.provenance["finetune"]["settings"]["augment"] == "full"


def test_guided_training_and_guided_decode(base):
    from hsam.engine.guidance import DECISION_WEIGHTS, guided_decode, neighbour_guidance, segment_guided, within_reach

    image, labels = blob_volume()
    result = finetune(image, labels, [0, 2, 4, 6], base, labelset=TWO_BLOBS, steps=8, save=False,
                      **{**FAST, "guidance": 1.0, "validation": 0.25})
    info = result.description.provenance["finetune"]["guidance"]
    assert info["trained"] and info["decision_weight"] in {1.0 * f for f in DECISION_WEIGHTS}
    # every weight was scored on the held-out slice, for both decisions, and the recorded one scored best
    scored = {**{("fused", w): m for w, m in info["validation_mean_by_weight"].items()},
              **{("stage2", w): m for w, m in info["validation_mean_by_weight_stage2"].items()}}
    assert len(scored) == 2 * len(DECISION_WEIGHTS)
    assert scored[(info["decision"], str(info["decision_weight"]))] == max(scored.values())
    # the classes the model did not improve on (on the held-out slice) are recorded, by index and name
    assert result.validation_slices and set(info["validation_dice_propagated"]) == {"round blob", "bright blob"}
    assert set(info["prior_classes"]) <= {1, 2}
    assert info["prior_class_names"] == [TWO_BLOBS.classes[c - 1].name for c in info["prior_classes"]]
    # stage 2 alone or the model's fusion: whichever did better on the held-out slice, both recorded
    assert info["decision"] in ("fused", "stage2") and set(info["validation_dice_fused"]) == set(
        info["validation_dice"])
    emb = embed_slices(result.loaded.model, image, result.description, [1, 3, 5], cache=False)
    corrected = {k: labels[k] for k in (0, 2, 4, 6)}  # identity orientation here; values = class indices
    indices, used = guided_decode(result.loaded, corrected, [1, 3, 5], emb)
    assert indices.shape == (3, 40, 40) and indices.dtype == np.uint8
    assert used["decision_weight"] == info["decision_weight"] and used["decision"] == info["decision"]
    # the whole volume, guided by its corrected slices: those keep their labels, the others are segmented
    volume = segment_guided(image, labels, [0, 2, 4, 6], result.loaded, device="cpu", precision="fp32",
                            cache=False)
    out = sitk.GetArrayFromImage(volume)
    assert volume.GetSize() == image.GetSize() and np.array_equal(out[[0, 2, 4, 6]], labels[[0, 2, 4, 6]])
    assert set(np.unique(out)) <= {0, 1, 2}
    assert within_reach([0, 4, 6], [1, 5, 7, 10, 11]) == [True, True, True, True, False]
    guide = neighbour_guidance({0: np.zeros((4, 4), int), 4: np.ones((4, 4), int)}, 1, 3)  # constant maps
    assert guide.shape == (3, 4, 4) and torch.allclose(guide.sum(0), torch.ones(4, 4))
    assert torch.allclose(guide[0], torch.full((4, 4), 0.75)) and torch.allclose(guide[1], torch.full((4, 4), 0.25))


def test_guided_decision_is_the_best_on_the_held_out_slices():
    """Decision and weight: the highest mean Dice over both decisions and all weights (NaN classes left out);
    ties go to the fused decision, then to the weight closest to the trained one; the prior classes are judged
    against the chosen decision."""
    from hsam.engine.guidance import choose_guided_decision

    nan = float("nan")
    fused = {0.5: [0.70, 0.80], 1.0: [0.72, 0.80], 4.0: [0.75, 0.81], 8.0: [0.74, 0.81]}  # best: 4.0, 0.78
    stage2 = {0.5: [0.60, 0.80], 1.0: [0.70, 0.80], 4.0: [0.74, 0.80], 8.0: [0.79, nan]}  # 8.0: 0.79
    choice = choose_guided_decision(fused, stage2, [0.80, 0.90], 1.0)
    assert (choice.decision, choice.weight) == ("stage2", 8.0)
    assert choice.dice[0] == 0.79 and choice.prior_classes == [1]  # class 2 absent there: not judged
    assert choose_guided_decision(fused, {}, [0.80, 0.90], 1.0).weight == 4.0
    ties = ({1.0: [0.8], 4.0: [0.8]}, {1.0: [0.8], 4.0: [0.8]})
    tied = choose_guided_decision(*ties, None, 1.0)
    assert (tied.decision, tied.weight) == ("fused", 1.0)
    assert choose_guided_decision(*ties, None, 3.0).weight == 4.0  # |log 4/3| < |log 1/3|
    assert choose_guided_decision({1.0: [0.8], 16.0: [0.8]}, {}, None, 8.0).weight == 16.0
    assert choose_guided_decision({1.0: [0.8], 4.0: [0.81]}, {}, None, 1.0).prior_classes == []
    with pytest.raises(ValueError):
        choose_guided_decision({}, {}, None, 1.0)


def test_classes_validated_for_the_prior_keep_the_propagated_labels(base):
    """A class whose propagated labels beat the model's guided decision on the held-out slices is kept as
    propagated wherever it wins the guidance's arg-max, whatever the gate; the others follow the model."""
    from hsam.engine.guidance import predict_guided, prior_classes_from_validation

    nan = float("nan")
    assert prior_classes_from_validation([0.9, 0.5, nan, 0.7], [0.8, 0.6, 0.9, 0.7]) == [2]  # ties: the model
    model = base.model
    image, _ = blob_volume()
    embeddings = embed_slices(model, image, base.description, [1, 3], cache=False)
    guides = torch.zeros(2, model.num_classes, 40, 40)
    guides[:, 0] = 0.45  # uncertain everywhere: background 0.45, class 2 0.55 on the left half, class 1 right
    guides[:, 2, :, :20] = 0.55
    guides[:, 1, :, 20:] = 0.55
    free = predict_guided(model, embeddings, guides, (40, 40), 1.0, (1.0,), gate=0.9)[1.0]
    kept = predict_guided(model, embeddings, guides, (40, 40), 1.0, (1.0,), gate=0.9, prior_classes=[2])[1.0]
    assert (kept[:, :, :20] == 2).all()  # class 2 won the guidance there: kept
    assert np.array_equal(kept[:, :, 20:], free[:, :, 20:])  # elsewhere the model decides as before
    # stage 2 alone: the arg-max of stage 2 + λ·log(G + ε), stage 1 left out
    from hsam.engine.guidance import GUIDE_EPS, decode_guided, to_grid
    from hsam.engine.inference import resize_images

    alone = predict_guided(model, embeddings, guides, (40, 40), 1.0, (1.0,), stage2_only=True)[1.0]
    with torch.inference_mode():
        _, s2 = decode_guided(model, embeddings, to_grid(guides, embeddings.shape[-1]), 1.0)
        size = model.image_size
        expected = resize_images(s2 + torch.log(resize_images(guides, (size, size)) + GUIDE_EPS), (40, 40))
    assert np.array_equal(alone, expected.argmax(1).numpy())


# ------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("slices, message", [
    ([], "no corrected slice"),
    ([3, 8, 12], r"slice indices \[8, 12\] lie outside the volume.*0\.\.7"),
    ([-1], "outside the volume"),
])
def test_bad_slices(base, slices, message):
    image, labels = blob_volume()
    with pytest.raises(InputVolumeError, match=message):
        finetune(image, labels, slices, base, labelset=TWO_BLOBS, save=False, **FAST)


def test_labels_on_another_grid(base):
    image, labels = blob_volume()
    with pytest.raises(InputVolumeError, match="not on the image's voxel grid"):
        finetune(image, labels[:, :-1], [0], base, labelset=TWO_BLOBS, save=False, **FAST)
    other = sitk.GetImageFromArray(labels)
    other.SetSpacing((1.0, 1.0, 3.0))
    with pytest.raises(InputVolumeError, match="spacing"):
        finetune(image, other, [0], base, labelset=TWO_BLOBS, save=False, **FAST)


def test_label_values_outside_the_label_set(base):
    image, labels = blob_volume()
    labels = labels.copy()
    labels[5, :3, :3] = 9
    with pytest.raises(InputVolumeError, match=r"label values \[9\] \(in corrected slices \[5\]\).*two-blobs"):
        finetune(image, labels, [1, 5], base, labelset=TWO_BLOBS, save=False, **FAST)
    # values outside the set on slices that are not corrected do not matter
    finetune(image, labels, [1, 3], base, labelset=TWO_BLOBS, steps=1, save=False, **FAST)


def test_k_planes_that_are_not_model_slices(base):
    image, labels = blob_volume()
    image.SetDirection((0, 0, 1, 0, 1, 0, 1, 0, 0))  # voxel axis i runs S, k runs L: k planes are sagittal
    with pytest.raises(InputVolumeError, match="model segments axial slices, which lie along this volume's i axis"):
        finetune(image, labels, [0, 1], base, labelset=TWO_BLOBS, save=False, **FAST)


def test_corrected_slices_without_any_label(base):
    image, labels = blob_volume()
    with pytest.raises(InputVolumeError, match="no labelled voxel"):
        finetune(image, np.zeros_like(labels), [0, 1], base, labelset=TWO_BLOBS, save=False, **FAST)


def test_base_without_what_the_mode_needs(base, tmp_path):
    image, labels = blob_volume()
    from hsam_testlib import TINY_DECODER, TINY_ENCODER
    from hsam.description import sam_vit_architecture

    arch = sam_vit_architecture("vit_b", image_size=64, lora_rank=0, decoder=dict(TINY_DECODER), **TINY_ENCODER)
    no_lora = make_tiny_model_file(tmp_path / "nolora.safetensors", architecture=arch)
    with pytest.raises(ModelFileError, match="full fine-tuning trains the LoRA adapters.*--mode fast"):
        finetune(image, labels, [0], load_model_file(no_lora), mode="full", labelset=TWO_BLOBS, save=False, **FAST)
    with pytest.raises(FinetuneError, match="unknown fine-tuning mode"):
        finetune(image, labels, [0], base, mode="fastest", labelset=TWO_BLOBS, save=False, **FAST)


def test_cancel_half_way_writes_nothing(base, base_file, tmp_path):
    image, labels = blob_volume()
    out = tmp_path / "never.safetensors"
    before = file_sha(base_file)
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 5  # a few steps in

    with pytest.raises(CancelledError, match="nothing was written"):
        finetune(image, labels, [0, 2, 4, 6], base, labelset=TWO_BLOBS, steps=50, out=out, cancel=cancel, **FAST)
    assert not out.exists() and not list(tmp_path.glob(".never*"))
    assert file_sha(base_file) == before
    event = threading.Event()
    event.set()
    with pytest.raises(CancelledError):
        finetune(image, labels, [0, 2], base, labelset=TWO_BLOBS, steps=5, out=out, cancel=event, **FAST)
    assert not out.exists()


def test_refuses_to_overwrite_the_base(base, base_file):
    image, labels = blob_volume()
    before = file_sha(base_file)
    with pytest.raises(FinetuneError, match="refusing to overwrite the base model"):
        finetune(image, labels, [0], base, labelset=TWO_BLOBS, steps=1, out=base_file, **FAST)
    assert file_sha(base_file) == before


def test_progress_reports_embedding_then_epochs(base):
    image, labels = blob_volume()
    seen = []
    finetune(image, labels, [0, 3, 6], base, labelset=TWO_BLOBS, epochs=3, save=False, cache=False,
             progress=lambda d, t, s: seen.append((s, d, t)), **FAST)
    stages = [s for s, _, _ in seen]
    assert stages.index("embed") < stages.index("train")
    assert [(d, t) for s, d, t in seen if s == "train"] == [(1, 3), (2, 3), (3, 3)]


def test_embeddings_are_cached_on_disk(base, monkeypatch):
    from hsam.engine import embeddings as emb_mod

    image, labels = blob_volume()
    calls = {"n": 0}
    original = emb_mod.SliceEncoder.__call__

    def counting(self, inputs):
        calls["n"] += len(inputs)
        return original(self, inputs)

    monkeypatch.setattr(emb_mod.SliceEncoder, "__call__", counting)
    finetune(image, labels, [0, 3, 6], base, labelset=TWO_BLOBS, steps=1, save=False, **FAST)
    assert calls["n"] == 3
    finetune(image, labels, [0, 3, 6, 7], base, labelset=TWO_BLOBS, steps=1, save=False, **FAST)
    assert calls["n"] == 4  # only the new slice was encoded
    finetune(image, labels, [0, 3], base, labelset=TWO_BLOBS, steps=1, save=False, cache=False, **FAST)
    assert calls["n"] == 6  # no cache: encoded again


def test_settings_defaults_and_checks():
    s = FinetuneSettings().resolved(12)
    assert s.batch_size == 4 and s.steps == s.epochs * 3 and s.noise == 0.02 and s.augment == "none"
    assert FinetuneSettings(mode="full").resolved(12).noise == 0.2
    assert FinetuneSettings().resolved(1).guidance == 0.0
    for bad in (dict(lr=-1), dict(epochs=0), dict(augment="twist"), dict(validation=1.0)):
        with pytest.raises(FinetuneError):
            FinetuneSettings(**bad).resolved(4)


def test_embedding_cache_is_pruned_to_its_limit():
    from hsam.engine.embeddings import EmbeddingCache, embedding_cache_root, prune_cache

    old = EmbeddingCache({"volume": "old"})
    old.put(0, torch.zeros(4, 64, 64))
    import os
    import time as _time

    os.utime(old.folder, (_time.time() - 100, _time.time() - 100))
    new = EmbeddingCache({"volume": "new"})
    new.put(0, torch.zeros(4, 64, 64))
    assert {p.name for p in embedding_cache_root().iterdir()} == {old.folder.name, new.folder.name}
    assert prune_cache(limit_mb=0.04, keep=[new.folder]) == 1  # one entry ≈ 33 KB: the older one goes
    assert [p.name for p in embedding_cache_root().iterdir()] == [new.folder.name]
    assert new.get(0) is not None


def test_overlay_png_without_matplotlib(tmp_path):
    import struct
    import zlib

    from hsam.overlay import _write_grid, blend

    gray = np.linspace(0, 100, 20, dtype=np.float32).reshape(4, 5)
    labels = np.zeros((4, 5), np.uint8)
    labels[1:3, 1:4] = 2
    rgb = blend(gray, labels, {2: (255, 0, 0)}, (0.0, 100.0), alpha=1.0)
    assert rgb.shape == (4, 5, 3) and tuple(rgb[1, 1]) == (255, 0, 0) and rgb[0, 0, 1] == 0
    path = _write_grid(tmp_path / "o.png", [[rgb, rgb], [rgb, rgb]], gap=2)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (2 * 5 + 3 * 2, 2 * 4 + 3 * 2)
    idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    raw = zlib.decompress(idat)
    assert len(raw) == height * (1 + 3 * width)
