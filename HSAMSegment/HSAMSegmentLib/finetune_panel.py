"""The panel's Fine-tune section: GUI code only (the work is the Logic's ``proposeCorrectedSlices`` and ``finetune``,
implemented in :mod:`HSAMSegmentLib.finetune`). Used by ``HSAMSegmentWidget`` inside Slicer; it shares the
Widget's progress bar, status line and log, and its one-job-at-a-time rule.

Flow: the user corrects some slices of a result in Segment Editor → **Propose** lists the slices that differ
from the last prediction → **Fine-tune** runs in the background (the button turns into **Stop**), the status line
shows slices encoded, then epochs, and the validation Dice of the held-out corrected slices → the new model is
added to the model list and selected → (optional) the volume is segmented again with it into a new segmentation.
The new segmentation is *guided*: the corrected slices keep their labels and guide the slices around them
(:func:`hsam.engine.guidance.segment_guided`). **Revert to base model** selects the model the fine-tuning started
from.
"""

from __future__ import annotations

import logging

from hsam.errors import HSAMError

from .finetune import FinetuneJob, format_slice_list
from .run import JobState

MODES = (("fast", "Fast (frozen encoder; CPU, minutes)"), ("full", "Full (H-SAM recipe with LoRA; GPU)"))


def _tr(text: str) -> str:
    try:
        from slicer.i18n import tr
    except ImportError:
        return text
    return tr(text)


class FinetuneSection:
    """Owns the Fine-tune widgets of ``widget.ui``; ``widget`` is the HSAMSegmentWidget."""

    def __init__(self, widget) -> None:
        self.widget = widget
        self.ui = widget.ui
        for mode, title in MODES:
            self.ui.finetuneModeComboBox.addItem(_tr(title), mode)
        self.ui.finetuneModeComboBox.currentIndexChanged.connect(self.onModeChanged)
        self.ui.proposeSlicesButton.clicked.connect(self.onPropose)
        self.ui.finetuneButton.clicked.connect(self.onFinetuneButton)
        self.ui.revertModelButton.clicked.connect(self.onRevert)
        self.ui.finetuneSegmentationSelector.currentNodeChanged.connect(self.widget.updateButtons)

    @property
    def params(self):
        return self.widget._parameterNode

    def running(self) -> bool:
        job = self.widget.job
        return isinstance(job, FinetuneJob) and not job.finished

    # ------------------------------------------------------------------------------- state → widgets
    def parameterNodeChanged(self) -> None:
        p = self.params
        if p is not None:
            self.widget._selectComboData(self.ui.finetuneModeComboBox, p.finetuneMode or "fast")

    def updateButtons(self, busy: bool) -> None:
        p = self.params
        mine = self.running()
        ready = bool(p and p.inputVolume and p.finetuneSegmentation and self.widget.currentModel()
                     and (p.correctedSlices or "").strip())
        self.ui.finetuneButton.text = _tr("Stop") if mine else _tr("Fine-tune")
        self.ui.finetuneButton.enabled = mine or (ready and not busy)
        self.ui.finetuneButton.toolTip = (
            _tr("Stop fine-tuning; nothing is saved") if mine else
            _tr("Fine-tune the selected model on the corrected slices, in the background") if ready else
            _tr("Select the input volume, a model, the corrected segmentation and its corrected slices"))
        for widget in (self.ui.finetuneSegmentationSelector, self.ui.correctedSlicesLineEdit,
                       self.ui.proposeSlicesButton, self.ui.finetuneModeComboBox, self.ui.finetuneEpochsSpinBox,
                       self.ui.segmentAfterFinetuneCheckBox):
            widget.enabled = not busy
        base = p.baseModelId if p else ""
        known = any(m.id == base for m in self.widget._models)
        self.ui.revertModelButton.enabled = bool(not busy and base and known and base != p.modelId)

    # ------------------------------------------------------------------------------- actions
    def onModeChanged(self, index=None) -> None:
        mode = self.ui.finetuneModeComboBox.currentData
        if self.params is not None and mode and self.params.finetuneMode != mode:
            self.params.finetuneMode = mode

    def onPropose(self) -> None:
        p = self.params
        if p is None:
            return
        if p.finetuneSegmentation is None and p.outputSegmentation is not None:
            p.finetuneSegmentation = p.outputSegmentation
        try:
            slices, why = self.widget.logic.proposeCorrectedSlices(p.inputVolume, p.finetuneSegmentation)
        except HSAMError as exc:
            self.widget.showStatus(str(exc), error=True)
            return
        p.correctedSlices = format_slice_list(slices)
        self.widget.showStatus(why[:1].upper() + why[1:] + ".", error=not slices)

    def onFinetuneButton(self) -> None:
        if self.running():
            self.widget.job.cancel()
            return
        p = self.params
        self.ui.logTextEdit.clear()
        self.ui.validationLabel.text = ""
        try:
            self.widget.showStatus(_tr("Checking the Python packages H-SAM needs…"))
            self.widget.logic.ensureDependencies()
            job = self.widget.logic.finetune(p.inputVolume, p.finetuneSegmentation, p.correctedSlices,
                                             self.widget.currentModel(), mode=p.finetuneMode or "fast",
                                             epochs=p.finetuneEpochs or None, device=p.device or "auto",
                                             listener=self.widget.onJobEvent)
        except HSAMError as exc:
            self.widget.showStatus(str(exc), error=True)
            self.widget.updateButtons()
            return
        except Exception as exc:
            logging.exception("HSAMSegment: fine-tuning could not start")
            self.widget.showStatus(_tr("Could not start: {error} (details in the Python console)").format(error=exc),
                                   error=True)
            self.widget.updateButtons()
            return
        self.widget.startPolling(job)

    def onRevert(self) -> None:
        p = self.params
        if p is not None and p.baseModelId:
            self.widget.populateModels(select=p.baseModelId)
            self.widget.showStatus(_tr("Selected the base model again."))

    # ------------------------------------------------------------------------------- job events
    def onJobEvent(self, job: FinetuneJob, what: str) -> None:
        if what == "validation" and job.validation:
            last, best = job.validation[-1], job.best_validation
            text = _tr("Validation Dice {dice:.3f} after epoch {epoch}/{epochs} (best {best:.3f}, epoch {best_epoch})")
            self.ui.validationLabel.text = text.format(dice=last.dice, epoch=last.epoch, epochs=last.epochs,
                                                       best=best.dice, best_epoch=best.epoch)
        elif what == "state" and job.state is JobState.SUCCEEDED:
            p = self.params
            base = job.request.base
            self.widget.populateModels(select=self.widget.logic.modelIdOfFile(job.model_path))
            if p is not None:
                p.baseModelId = base.id
            self.widget.showStatus(_tr("Fine-tuned model '{name}' added to the model list and selected.").format(
                name=job.model_name))
            if p is not None and p.segmentAfterFinetune:  # guided by the corrected slices, into a new segmentation
                self.widget.startSegment(outputSegmentation=None, guide=(job.labels, job.request.slices))
