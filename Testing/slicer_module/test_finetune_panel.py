"""The Fine-tune section's GUI code (``HSAMSegmentLib.finetune_panel``) driven through stand-in widgets (no Qt
here) with the real Logic and the fake worker: Propose fills the slice list, Fine-tune starts the job and turns
into Stop, the validation Dice is shown, the new model is selected, the volume is segmented again into a new
segmentation, and Revert selects the base model."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from hsamsegment_testlib import fake_launcher, make_volume

slicer = pytest.importorskip("slicer")

from hsam.data.labels import SYNAPSE_ORGANS  # noqa: E402
from HSAMSegmentLib.finetune import FinetuneJob  # noqa: E402
from HSAMSegmentLib.finetune_panel import FinetuneSection  # noqa: E402
from HSAMSegmentLib.models import ModelChoice  # noqa: E402
from HSAMSegmentLib.run import SegmentJob  # noqa: E402
from test_module_finetune import add_segmentation, edit_segments, synapse_labels  # noqa: E402


class Signal:
    def __init__(self):
        self.slots = []

    def connect(self, slot):
        self.slots.append(slot)

    def emit(self, *args):
        for slot in self.slots:
            slot(*args)


class FakeWidget(SimpleNamespace):
    """Enough of a Qt widget for the section: text/enabled/toolTip, items with data, signals."""

    def __init__(self):
        super().__init__(text="", enabled=True, toolTip="", items=[], currentIndex=-1, clicked=Signal(),
                         currentIndexChanged=Signal(), currentNodeChanged=Signal())

    def addItem(self, title, data):
        self.items.append((title, data))
        if self.currentIndex < 0:
            self.currentIndex = 0

    @property
    def currentData(self):
        return self.items[self.currentIndex][1] if self.items else None


class FakeModuleWidget:
    """The parts of HSAMSegmentWidget the section uses (the real ones are a few lines each)."""

    def __init__(self, logic, params, models):
        names = ("finetuneModeComboBox", "proposeSlicesButton", "finetuneButton", "revertModelButton",
                 "finetuneSegmentationSelector", "correctedSlicesLineEdit", "finetuneEpochsSpinBox",
                 "segmentAfterFinetuneCheckBox", "validationLabel")
        self.ui = SimpleNamespace(**{name: FakeWidget() for name in names},
                                  logTextEdit=SimpleNamespace(clear=lambda: 0))
        self.logic, self._parameterNode, self._models = logic, params, models
        self.job, self.status, self.segments_started = None, [], []

    def updateButtons(self, *args):
        self.section.updateButtons(self.job is not None and not self.job.finished)

    def currentModel(self):
        return next(m for m in self._models if m.id == self._parameterNode.modelId)

    def _selectComboData(self, combo, data):
        index = next((n for n, item in enumerate(combo.items) if item[1] == data), -1)
        if index >= 0:
            combo.currentIndex = index
        return index >= 0

    def populateModels(self, select=""):
        self._models, _ = self.logic.modelChoices()
        self._models += [self.base]
        self._parameterNode.modelId = select

    def showStatus(self, text, error=False):
        self.status.append((text, error))

    def startPolling(self, job):
        self.job = job
        self.updateButtons()

    def onJobEvent(self, job, what):
        if isinstance(job, FinetuneJob):
            self.section.onJobEvent(job, what)

    def startSegment(self, outputSegmentation, guide=(None, None)):
        self.segments_started.append((self._parameterNode.modelId, outputSegmentation, guide))


def test_finetune_section_flow(scene, tmp_path, monkeypatch):
    import HSAMSegment

    from hsam.weights.cache import models_dir

    out = models_dir() / "ct-ft-20261128.safetensors"  # where the core puts fine-tuned models
    logic = HSAMSegment.HSAMSegmentLogic(launcher=fake_launcher("ok", FAKE_ARGS_FILE=tmp_path / "args.json",
                                                                FAKE_MODEL_OUT=out))
    monkeypatch.setattr(logic.installer, "ensure", lambda: None)
    volume = make_volume(scene, (20, 16, 10))
    node = add_segmentation(scene, synapse_labels(), volume)
    logic.predictions.remember(node, synapse_labels(), SYNAPSE_ORGANS, "fake-model")
    base = ModelChoice(id="fake-model", title="Fake", source="registry", available=True)
    params = SimpleNamespace(inputVolume=volume, outputSegmentation=node, finetuneSegmentation=None,
                             correctedSlices="", finetuneMode="fast", finetuneEpochs=2, segmentAfterFinetune=True,
                             baseModelId="", modelId="fake-model", device="cpu")
    gui = FakeModuleWidget(logic, params, [base])
    gui.base = base
    gui.section = section = FinetuneSection(gui)
    assert [d for _, d in gui.ui.finetuneModeComboBox.items] == ["fast", "full"]
    gui.updateButtons()
    assert not gui.ui.finetuneButton.enabled  # no segmentation / slices yet

    section.onPropose()  # nothing corrected yet: the output segmentation is taken, no slice proposed
    assert params.finetuneSegmentation is node and params.correctedSlices == ""
    assert gui.status[-1] == ("No slice differs from the last prediction: correct some slices in Segment Editor "
                              "first.", True)
    corrected = synapse_labels()
    corrected[4:6][corrected[4:6] == 6] = 0
    edit_segments(node, volume, corrected)
    section.onPropose()
    assert params.correctedSlices == "4-5" and gui.status[-1][1] is False
    gui.updateButtons()
    assert gui.ui.finetuneButton.enabled and gui.ui.finetuneButton.text == "Fine-tune"

    gui.ui.finetuneButton.clicked.emit()
    assert isinstance(gui.job, FinetuneJob) and gui.ui.finetuneButton.text == "Stop"
    assert not gui.ui.correctedSlicesLineEdit.enabled and not gui.ui.revertModelButton.enabled
    deadline = time.monotonic() + 60
    while gui.job.poll():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert gui.ui.validationLabel.text == "Validation Dice 0.700 after epoch 2/2 (best 0.700, epoch 2)"
    assert params.modelId == out.stem and params.baseModelId == "fake-model"
    (model_id, output, (guide_labels, guide_slices)), = gui.segments_started  # segmented again, once,
    assert model_id == out.stem and output is None  # with the new model into a new segmentation,
    assert guide_slices == [4, 5] and guide_labels.shape == (10, 16, 20)  # guided by the corrected slices
    assert "added to the model list and selected" in gui.status[-1][0]
    gui.updateButtons()
    assert gui.ui.revertModelButton.enabled
    gui.ui.revertModelButton.clicked.emit()
    assert params.modelId == "fake-model"
    gui.updateButtons()
    assert not gui.ui.revertModelButton.enabled


def test_finetune_section_shows_input_errors_without_starting(scene, monkeypatch):
    import HSAMSegment

    logic = HSAMSegment.HSAMSegmentLogic(launcher=fake_launcher("ok"))
    monkeypatch.setattr(logic.installer, "ensure", lambda: None)
    volume = make_volume(scene, (20, 16, 10))
    node = add_segmentation(scene, synapse_labels(), volume)
    base = ModelChoice(id="fake-model", title="Fake", source="registry", available=True)
    params = SimpleNamespace(inputVolume=volume, outputSegmentation=None, finetuneSegmentation=node,
                             correctedSlices="3, 99", finetuneMode="fast", finetuneEpochs=0, segmentAfterFinetune=True,
                             baseModelId="", modelId="fake-model", device="cpu")
    gui = FakeModuleWidget(logic, params, [base])
    gui.section = FinetuneSection(gui)
    gui.ui.finetuneButton.clicked.emit()
    assert gui.job is None
    assert gui.status[-1] == ("Slices 99 lie outside the volume: it has 10 slices along K, numbered 0-9", True)
    assert not isinstance(logic.job, SegmentJob)
