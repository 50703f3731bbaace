"""The Fine-tune section's work, on a real MRML scene: the corrected segmentation exported on the volume's grid
(label values, names, colours, terminology), the proposed slices (what differs from the last prediction), the
fine-tuning job with the fake worker (arguments, progress, validation Dice, errors, cancel), and the whole flow
— segment, correct, fine-tune, segment again — with the real worker and a tiny model."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
from hsamsegment_testlib import fake_launcher, make_volume, oblique_matrix, real_launcher

slicer = pytest.importorskip("slicer")

from hsam.data.labels import SYNAPSE_ORGANS  # noqa: E402
from HSAMSegmentLib import scene_io  # noqa: E402
from HSAMSegmentLib.errors import SegmentInputError, WorkerFailed  # noqa: E402
from HSAMSegmentLib.finetune import (FinetuneInputError, PredictionStore, format_slice_list,  # noqa: E402
                                     parse_slice_list, proposed_slices, training_labels)
from HSAMSegmentLib.models import ModelChoice  # noqa: E402
from HSAMSegmentLib.run import JobState  # noqa: E402
from HSAMSegmentLib.selftest import scene_state  # noqa: E402

DIMS = (20, 16, 10)  # i, j, k


def synapse_labels(shape=(10, 16, 20)):
    """A label map (k, j, i) with spleen (1) and stomach (6) on a few slices each, pancreas (8) on all."""
    labels = np.zeros(shape, np.uint8)
    labels[2:6, 3:7, 4:9] = 1
    labels[4:9, 8:14, 10:18] = 6
    labels[:, 1:3, 1:3] = 8
    return labels


def add_segmentation(scene, labels, volume, label_set=SYNAPSE_ORGANS, name="organs"):
    built = scene_io.build_segmentation(labels, label_set, volume, name=name)
    return scene_io.add_new_segmentation(scene, built, volume, show3d=False)


def edit_segments(node, volume, labels, label_set=SYNAPSE_ORGANS):
    """What a Segment Editor edit does to the node: the segments' contents replaced (IDs and tags kept)."""
    from HSAMSegmentLib.selftest import replace_segment_contents

    replace_segment_contents(node, volume, labels, label_set)


def fake_model():
    return ModelChoice(id="fake-model", title="Fake model", source="registry", available=True)


# ---------------------------------------------------------------------------------------------- slices

def test_slice_lists_are_formatted_and_parsed_with_readable_errors():
    assert format_slice_list([9, 3, 7, 8, 20, 8]) == "3, 7-9, 20"
    assert format_slice_list([]) == ""
    assert parse_slice_list("3, 7-9,20", 21) == [3, 7, 8, 9, 20]
    with pytest.raises(FinetuneInputError, match="No corrected slice"):
        parse_slice_list("  ", 10)
    with pytest.raises(FinetuneInputError, match="Slices 10, 12 lie outside the volume: it has 10 slices"):
        parse_slice_list("1, 10, 12", 10)
    with pytest.raises(FinetuneInputError, match="is not a slice number"):
        parse_slice_list("1, x", 10)


# ---------------------------------------------------------------------------------------------- labels

@pytest.mark.parametrize("matrix", [None, oblique_matrix(), oblique_matrix(flips=(1, -1, 1))],
                         ids=["identity", "oblique", "left-handed"])
def test_training_labels_round_trip_values_names_colours_terminology(scene, matrix):
    volume = make_volume(scene, DIMS, ijk_to_ras=matrix)
    labels = synapse_labels()
    node = add_segmentation(scene, labels, volume)
    exported, label_set = training_labels(node, volume)
    assert exported.dtype == np.uint8 and exported.shape == labels.shape
    np.testing.assert_array_equal(exported, labels)  # the model's label values kept, voxel for voxel
    assert [c.value for c in label_set.classes] == [c.value for c in SYNAPSE_ORGANS.classes]
    assert [c.name for c in label_set.classes] == [c.name for c in SYNAPSE_ORGANS.classes]
    assert [c.color for c in label_set.classes] == [c.color for c in SYNAPSE_ORGANS.classes]
    stomach = next(c for c in label_set.classes if c.value == 6)
    assert stomach.terminology is not None
    assert stomach.terminology.type.value == SYNAPSE_ORGANS.classes[5].terminology.type.value
    assert label_set.name == "organs"


def test_training_labels_of_a_segmentation_drawn_from_scratch(scene):
    volume = make_volume(scene, DIMS)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    labels = np.zeros((10, 16, 20), np.uint8)
    labels[3, 2:5, 2:6] = 1  # "tumour"
    labels[3, 8:12, 8:12] = 2  # "cyst"
    labelmap = scene_io.labelmap_node_from_array(labels, volume)
    with scene_io._quiet_vtk():
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node)
    segmentation = node.GetSegmentation()
    segmentation.GetNthSegment(0).SetName("tumour")
    segmentation.GetNthSegment(1).SetName("cyst")
    exported, label_set = training_labels(node, volume)
    np.testing.assert_array_equal(exported, labels)  # no value tags: 1..N in segment order
    assert [(c.value, c.name) for c in label_set.classes] == [(1, "tumour"), (2, "cyst")]
    slices, why = proposed_slices(exported, label_set, None)
    assert slices == [3] and "hold labels" in why


def test_training_labels_refuses_an_empty_segmentation(scene):
    volume = make_volume(scene, DIMS)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    with pytest.raises(FinetuneInputError, match="has no segments"):
        training_labels(node, volume)


def test_proposed_slices_are_those_that_differ_from_the_last_prediction(scene):
    volume = make_volume(scene, DIMS)
    predicted = synapse_labels()
    node = add_segmentation(scene, predicted, volume)
    store = PredictionStore()
    store.remember(node, predicted, SYNAPSE_ORGANS, "fake-model")
    labels, label_set = training_labels(node, volume)
    assert proposed_slices(labels, label_set, store.get(node)) == \
        ([], "no slice differs from the last prediction: correct some slices in Segment Editor first")
    corrected = predicted.copy()
    corrected[3][corrected[3] == 1] = 0  # spleen removed on slice 3
    corrected[7, 0:2, 0:4] = 6  # stomach added on slice 7
    edit_segments(node, volume, corrected)
    labels, label_set = training_labels(node, volume)
    np.testing.assert_array_equal(labels, corrected)
    slices, why = proposed_slices(labels, label_set, store.get(node))
    assert slices == [3, 7] and why.startswith("2 slice(s) differ")
    # a deleted segment: its predicted voxels changed on every slice where it was
    node.GetSegmentation().RemoveSegment("pancreas")
    labels, label_set = training_labels(node, volume)
    assert proposed_slices(labels, label_set, store.get(node))[0] == list(range(10))


def test_prediction_store_keeps_the_last_few_and_checks_identity(scene):
    volume = make_volume(scene, DIMS)
    store = PredictionStore(keep=2)
    nodes = [add_segmentation(scene, synapse_labels(), volume, name=f"s{n}") for n in range(3)]
    for node in nodes:
        store.remember(node, synapse_labels(), SYNAPSE_ORGANS)
    assert store.get(nodes[0]) is None and store.get(nodes[1]) is not None and store.get(nodes[2]) is not None
    assert store.get(None) is None


# ---------------------------------------------------------------------------------------------- the job (fake worker)

def fake_env(tmp_path, **extra):
    return {"FAKE_ARGS_FILE": tmp_path / "args.json", "FAKE_MODEL_OUT": tmp_path / "ft.safetensors", **extra}


def test_logic_finetune_runs_the_worker_with_the_corrected_slices(scene, tmp_path):
    import HSAMSegment

    volume = make_volume(scene, DIMS, ijk_to_ras=oblique_matrix(), name="CT abdomen")
    logic = HSAMSegment.HSAMSegmentLogic(launcher=fake_launcher("ok", **fake_env(tmp_path)))
    node = add_segmentation(scene, synapse_labels(), volume)
    logic.predictions.remember(node, synapse_labels(), SYNAPSE_ORGANS, "fake-model")
    before = scene_state(scene, volume)
    events = []
    job = logic.finetune(volume, node, "2, 4-5", fake_model(), mode="fast", epochs=3, device="cpu", wait=True,
                         timeout=60, listener=lambda j, what: events.append(what))
    assert job.state is JobState.SUCCEEDED, job.log_lines
    sent = json.loads((tmp_path / "args.json").read_text())
    assert sent["same_grid"] is True
    assert sent["image_name"] == "CT_abdomen.nrrd"  # the model's lineage names the volume, not a temp file
    assert sent["args"]["slices"] == "2,4,5" and sent["args"]["base"] == "fake-model"
    assert sent["args"]["mode"] == "fast" and sent["args"]["device"] == "cpu" and sent["args"]["epochs"] == 3
    assert sent["values"] == {"2": [0, 1, 8], "4": [0, 1, 6, 8], "5": [0, 1, 6, 8]}
    assert [c["name"] for c in sent["table"]["classes"]] == [c.name for c in SYNAPSE_ORGANS.classes]
    assert sent["table"]["name"] == SYNAPSE_ORGANS.name  # named after the prediction that was corrected
    assert [round(p.dice, 4) for p in job.validation] == [0.6, 0.7, 0.8]
    assert job.best_validation.epoch == 3 and "validation" in events
    assert job.model_path == tmp_path / "ft.safetensors" and job.model_name == "fake-ft-model"
    assert any("best validation Dice 0.800 (epoch 3)" in m for _, m in job.log_lines)
    assert scene_state(scene, volume) == before  # fine-tuning never changes the scene
    assert os.listdir(tempfile.gettempdir()) == []


def test_guided_segment_run_sends_the_corrected_labels_on_the_volume_grid(scene, tmp_path, fake_model):
    import HSAMSegment

    volume = make_volume(scene, DIMS, ijk_to_ras=oblique_matrix())
    logic = HSAMSegment.HSAMSegmentLogic(launcher=fake_launcher("ok", FAKE_ARGS_FILE=tmp_path / "args.json"))
    labels = synapse_labels()
    job = logic.segment(volume, fake_model, guideLabels=labels, guideSlices=[3, 4], wait=True, timeout=60)
    sent = json.loads((tmp_path / "args.json").read_text())
    assert sent["args"]["guide_slices"] == "3,4"
    assert sent["guide"] == {"same_grid": True, "nonzero": int((labels > 0).sum())}
    assert job.result_node.GetAttribute("HSAM.GuidedBySlices") == "3,4"
    with pytest.raises(SegmentInputError, match="needs both"):
        logic.segment(volume, fake_model, guideLabels=labels)
    with pytest.raises(SegmentInputError, match="voxel grid"):
        logic.segment(volume, fake_model, guideLabels=labels[:, :-1], guideSlices=[3])


def test_finetune_progress_counts_slices_then_epochs(scene, tmp_path):
    import HSAMSegment

    volume = make_volume(scene, DIMS)
    logic = HSAMSegment.HSAMSegmentLogic(launcher=fake_launcher("ok", **fake_env(tmp_path)))
    node = add_segmentation(scene, synapse_labels(), volume)
    seen = []
    logic.finetune(volume, node, [3, 4], fake_model(), epochs=2, wait=True, timeout=60,
                   listener=lambda j, what: seen.append(j.progress.text) if what == "progress" else None)
    assert "Encoding the corrected slices: 2 of 2 slices" in seen
    assert "Fine-tuning: 2 of 2 epochs" in seen


def test_finetune_inputs_are_checked_before_anything_runs(scene, tmp_path):
    import HSAMSegment

    volume = make_volume(scene, DIMS)
    logic = HSAMSegment.HSAMSegmentLogic(launcher=fake_launcher("ok", **fake_env(tmp_path)))
    labels = synapse_labels()
    labels[labels == 8] = 0  # slices 0, 1 and 9 hold no label now
    node = add_segmentation(scene, labels, volume)
    before = scene_state(scene, volume)
    cases = [((None, node, "3"), "Select an input volume"),
             ((volume, None, "3"), "Select the corrected segmentation"),
             ((volume, node, ""), "No corrected slice"),
             ((volume, node, "3, 40"), "Slices 40 lie outside the volume"),
             ((volume, node, "0-1"), "hold no segment voxel")]
    for args, message in cases:
        with pytest.raises(SegmentInputError, match=message):
            logic.finetune(*args, baseModel=fake_model())
    with pytest.raises(FinetuneInputError, match="unknown fine-tuning mode"):
        logic.finetune(volume, node, "3", fake_model(), mode="turbo")
    with pytest.raises(FinetuneInputError, match="epochs must be at least 1"):
        logic.finetune(volume, node, "3", fake_model(), epochs=-2)
    broken = ModelChoice("bad", "Bad", "user", checkpoint="x", problem="the file is damaged")
    with pytest.raises(FinetuneInputError, match="cannot be fine-tuned: the file is damaged"):
        logic.finetune(volume, node, "3", broken)
    assert not (tmp_path / "args.json").exists()
    assert scene_state(scene, volume) == before


def test_finetune_worker_error_and_cancel_leave_scene_and_files_unchanged(scene, tmp_path):
    import HSAMSegment

    volume = make_volume(scene, DIMS)
    node = add_segmentation(scene, synapse_labels(), volume)
    before = scene_state(scene, volume)
    logic = HSAMSegment.HSAMSegmentLogic(launcher=fake_launcher("error", **fake_env(tmp_path)))
    with pytest.raises(WorkerFailed, match="Label values \\[42\\]") as info:
        logic.finetune(volume, node, "3", fake_model(), wait=True, timeout=60)
    assert info.value.kind == "input"
    logic = HSAMSegment.HSAMSegmentLogic(launcher=fake_launcher("hang", FAKE_PIDFILE=tmp_path / "pids",
                                                                **fake_env(tmp_path)))
    job = logic.finetune(volume, node, "3", fake_model())
    while not (tmp_path / "pids").exists() or job.progress.stage != "embed":
        job.poll()
    logic.cancel()
    assert job.state is JobState.CANCELLED and job.model_path is None
    assert not (tmp_path / "ft.safetensors").exists()
    assert scene_state(scene, volume) == before
    assert os.listdir(tempfile.gettempdir()) == []


# ---------------------------------------------------------------------------------------------- real worker

def test_segment_correct_finetune_segment_again_with_the_real_worker(scene, tiny_model):
    """The user flow end to end with the real worker and a tiny model, as the Slicer self-test runs it: Segment
    organs → fix two slices → Propose → Fine-tune (fast, CPU) → the new model is listed, the base file untouched →
    Segment organs again with it into a new segmentation."""
    import unittest

    import HSAMSegment
    from HSAMSegmentLib import selftest

    logic = HSAMSegment.HSAMSegmentLogic(launcher=real_launcher())
    model = ModelChoice("file:" + str(tiny_model), "tiny", "file", checkpoint=str(tiny_model))
    case = unittest.TestCase()
    case.delayDisplay = lambda message: None
    selftest.check_finetune_flow(case, logic, scene, model, timeout=600)


def test_the_finished_finetune_says_what_the_held_out_slices_decided(tmp_path):
    """After fine-tuning, one line tells the user how "segment again" with the corrected slices will decide,
    read from the new model file's record; nothing is said for a model validated without guidance."""
    from hsam_testlib import make_tiny_model_file
    from HSAMSegmentLib.finetune import guided_decision_summary

    def model(name, guidance):
        return make_tiny_model_file(tmp_path / f"{name}.safetensors",
                                    provenance={"source": "tests", "finetune": {"guidance": guidance}})

    validated = {"validation_dice_propagated": {"liver": 0.9}, "prior_class_names": ["liver", "spleen"],
                 "decision": "fused", "decision_weight": 8.0}
    text = guided_decision_summary(model("a", validated))
    assert "keeps the propagated labels of liver, spleen" in text and "both stages" in text
    assert "weighing the propagated labels ×8" in text
    alone = guided_decision_summary(model("b", {**validated, "prior_class_names": [], "decision": "stage2"}))
    assert "follows the model for every structure" in alone and "stage 2 alone" in alone
    assert guided_decision_summary(model("c", {"trained": True})) == ""
    assert guided_decision_summary(tmp_path / "missing.safetensors") == ""
