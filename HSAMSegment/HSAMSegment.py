"""HSAMSegment: one-click multi-organ segmentation of CT/MR volumes with H-SAM, in a background process.

Thin by design: the Widget holds GUI code only, the Logic is a facade over ``HSAMSegmentLib`` (parameters, scene
I/O, the worker process, the segment job, model/device lists, dependency installation), and the Test drives the
self-test helpers of ``HSAMSegmentLib.selftest``.
"""

import logging

try:  # inside 3D Slicer
    import qt
    import vtk

    import slicer
    from slicer.i18n import tr as _
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                               ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
    from slicer.util import VTKObservationMixin
except ImportError:  # PyPI slicer-core or plain Python (tests): the Logic still works on a scene
    qt = None
    import slicer  # noqa: F811  (slicer-core)
    from slicer.util import VTKObservationMixin

    from HSAMSegmentLib.headless import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,  # noqa: F401
                                         ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
    from HSAMSegmentLib.headless import tr as _

from HSAMSegmentLib.devices import device_choices
from HSAMSegmentLib.errors import SegmentInputError, WorkerFailed
from HSAMSegmentLib.finetune import FinetuneJob, PredictionStore, finetune_request, propose_corrected_slices
from HSAMSegmentLib.finetune_panel import FinetuneSection
from HSAMSegmentLib.install import DependencyInstaller
from HSAMSegmentLib.models import find_model, import_weights_file, list_model_choices
from HSAMSegmentLib.parameters import HSAMSegmentParameterNode
from HSAMSegmentLib.process import WorkerLauncher
from HSAMSegmentLib.run import JobState, SegmentJob, SegmentRequest
from HSAMSegmentLib.scene_io import UndoStore
from hsam.errors import HSAMError


#
# HSAMSegment
#


class HSAMSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("H-SAM Segment Organs")
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []  # PyTorchUtils is needed only when torch must be installed (first run)
        self.parent.contributors = ["HSAMExtension developers"]
        self.parent.helpText = _("""
Segment abdominal organs (spleen, kidneys, gallbladder, liver, stomach, aorta, pancreas, depending on the model)
in a CT volume with H-SAM, a prompt-free hierarchical extension of the Segment Anything Model.
Select the volume, a model and a device, then click <b>Segment organs</b>: the model runs in a background process
(the application stays responsive; <b>Cancel</b> stops it and leaves the scene as it was) and the result appears as
a segmentation with one named, coloured, terminology-coded segment per organ.
<b>Fine-tune</b>: correct a few slices in Segment Editor, click <b>Propose</b> to list them, then <b>Fine-tune</b>;
the adapted model joins the model list and segments the volume again.
On the first run PyTorch and a few Python packages are installed (you are asked first) and the model weights are
downloaded and checked; offline, use <b>Import weights from file…</b>.
See the <a href="https://github.com/HSAMExtension/HSAMExtension#readme">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
H-SAM: Z. Cheng, Q. Wei, H. Zhu, Y. Wang, L. Qu, W. Shao, Y. Zhou. "Unleashing the Potential of SAM for Medical
Adaptation via Hierarchical Decoding." CVPR 2024.
Segment Anything (SAM): A. Kirillov, E. Mintun, N. Ravi, H. Mao, C. Rolland, L. Gustafson, T. Xiao, S. Whitehead,
A. C. Berg, W.-Y. Lo, P. Dollár, R. Girshick. "Segment Anything." ICCV 2023.
Model weights keep their own licences (shown in the model list).
""")


#
# HSAMSegmentWidget
#


class HSAMSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI only: widgets ↔ parameter node, buttons → Logic, job progress → widgets."""

    POLL_MSEC = 200

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.job = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._models = []
        self._devices = []
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/HSAMSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = HSAMSegmentLogic()
        self.finetuneSection = FinetuneSection(self)

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MSEC)
        self._timer.timeout.connect(self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentButton.clicked.connect(self.onSegmentButton)
        self.ui.importWeightsButton.clicked.connect(self.onImportWeights)
        self.ui.restoreButton.clicked.connect(self.onRestore)
        self.ui.modelComboBox.currentIndexChanged.connect(self.onModelChanged)
        self.ui.deviceComboBox.currentIndexChanged.connect(self.onDeviceChanged)
        self.ui.outputSegmentationSelector.currentNodeChanged.connect(self.updateButtons)
        self.ui.inputVolumeSelector.currentNodeChanged.connect(self.updateButtons)

        self.ui.progressBar.setVisible(False)
        self.populateModels()
        self.ui.deviceComboBox.addItem(_("Automatic"), "auto")
        qt.QTimer.singleShot(0, self.populateDevices)  # nvidia-smi may take a moment: after the panel shows
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self.job is not None and not self.job.finished:
            self.job.cancel()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        if self.job is not None and not self.job.finished:
            self.job.cancel()
        self.logic.undo.clear()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------------------- parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self._selectComboData(self.ui.modelComboBox, self._parameterNode.modelId)
            self._selectComboData(self.ui.deviceComboBox, self._parameterNode.device)
            self.finetuneSection.parameterNodeChanged()
        self.updateButtons()

    # ------------------------------------------------------------------------------- lists
    def populateModels(self, select: str = "") -> None:
        self._models, problem = self.logic.modelChoices()
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for choice in self._models:
            combo.addItem(choice.label, choice.id)
            combo.setItemData(combo.count - 1, choice.note, qt.Qt.ToolTipRole)
        combo.blockSignals(wasBlocked)
        wanted = select or (self._parameterNode.modelId if self._parameterNode else "")
        if not self._selectComboData(combo, wanted) and combo.count:
            combo.currentIndex = 0
        self.onModelChanged()
        if problem:
            self.showStatus(problem, error=True)
        elif not self._models:
            self.showStatus(_("No model is available: import a model file with 'Import weights from file…'."),
                            error=True)

    def populateDevices(self) -> None:
        self._devices = self.logic.deviceChoices()
        combo = self.ui.deviceComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for device in self._devices:
            combo.addItem(device.label, device.id)
        combo.blockSignals(wasBlocked)
        if not self._selectComboData(combo, self._parameterNode.device if self._parameterNode else "auto"):
            combo.currentIndex = 0

    @staticmethod
    def _selectComboData(combo, data) -> bool:
        index = combo.findData(data) if data else -1
        if index >= 0:
            combo.currentIndex = index
        return index >= 0

    def currentModel(self):
        data = self.ui.modelComboBox.currentData
        return next((m for m in self._models if m.id == data), None)

    def onModelChanged(self, index=None) -> None:
        model = self.currentModel()
        self.ui.modelInfoLabel.text = model.note if model else ""
        if self._parameterNode and model and self._parameterNode.modelId != model.id:
            self._parameterNode.modelId = model.id
        self.updateButtons()

    def onDeviceChanged(self, index=None) -> None:
        device = self.ui.deviceComboBox.currentData
        if self._parameterNode and device and self._parameterNode.device != device:
            self._parameterNode.device = device

    def onImportWeights(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Import H-SAM weights"), "",
                                              _("Model weights (*.safetensors *.pth *.pt);;All files (*)"))
        if not path:
            return
        try:
            with slicer.util.WaitCursor():
                choice, message = self.logic.importWeights(path)
        except HSAMError as exc:
            self.showStatus(str(exc), error=True)
            return
        except Exception as exc:
            logging.exception("HSAMSegment: import of weights failed")
            self.showStatus(_("Import failed: {error}").format(error=exc), error=True)
            return
        self.populateModels(select=choice.id)
        self.showStatus(message)

    # ------------------------------------------------------------------------------- run
    def updateButtons(self, caller=None, event=None) -> None:
        busy = self.job is not None and not self.job.finished
        running = busy and isinstance(self.job, SegmentJob)
        p = self._parameterNode
        ready = bool(p and p.inputVolume and self.currentModel())
        self.ui.segmentButton.text = _("Cancel") if running else _("Segment organs")
        self.ui.segmentButton.enabled = running or (ready and not busy)
        self.ui.segmentButton.toolTip = (_("Stop the run; the scene stays as it was") if running else
                                         _("Segment the organs of the input volume") if ready else
                                         _("Select an input volume and a model"))
        for widget in (self.ui.inputVolumeSelector, self.ui.modelComboBox, self.ui.importWeightsButton,
                       self.ui.deviceComboBox, self.ui.outputSegmentationSelector, self.ui.show3DCheckBox):
            widget.enabled = not busy
        output = self.ui.outputSegmentationSelector.currentNode()
        self.ui.restoreButton.enabled = not busy and self.logic is not None and self.logic.canRestore(output)
        if getattr(self, "finetuneSection", None) is not None:
            self.finetuneSection.updateButtons(busy)

    def onSegmentButton(self) -> None:
        if self.job is not None and not self.job.finished:
            self.job.cancel()
            return
        self.ui.logTextEdit.clear()
        self.startSegment(self._parameterNode.outputSegmentation)

    def startSegment(self, outputSegmentation, guide=(None, None)) -> None:
        p = self._parameterNode
        try:
            self.showStatus(_("Checking the Python packages H-SAM needs…"))
            self.logic.ensureDependencies()  # does something on the first click only; asks before installing
            with slicer.util.WaitCursor():
                job = self.logic.segment(p.inputVolume, self.currentModel(), outputSegmentation,
                                         device=p.device or "auto", show3D=p.show3D, listener=self.onJobEvent,
                                         guideLabels=guide[0], guideSlices=guide[1])
        except HSAMError as exc:
            self.showStatus(str(exc), error=True)
            self.updateButtons()
            return
        except Exception as exc:
            logging.exception("HSAMSegment: could not start")
            self.showStatus(_("Could not start: {error} (details in the Python console)").format(error=exc),
                            error=True)
            self.updateButtons()
            return
        self.startPolling(job)

    def startPolling(self, job) -> None:
        self.job = job
        self.ui.progressBar.setVisible(True)
        self._timer.start()
        self.updateButtons()

    def onTimer(self) -> None:
        job = self.job
        if job is None or (not job.poll() and self.job is job):  # a finished job may have started the next one
            self._timer.stop()

    def onJobEvent(self, job, what) -> None:
        if what == "progress":
            info = job.progress
            if info.fraction is None:
                self.ui.progressBar.setRange(0, 0)
            else:
                self.ui.progressBar.setRange(0, 1000)
                self.ui.progressBar.value = int(info.fraction * 1000)
            self.ui.progressBar.format = info.text
            self.showStatus(info.text)
        elif what == "log":
            level, message = job.log_lines[-1]
            prefix = {"warning": "⚠ ", "error": "✖ "}.get(level, "")
            self.ui.logTextEdit.appendPlainText(prefix + message)
        elif what == "state" and job.finished:
            self._timer.stop()
            self.ui.progressBar.setVisible(False)
            if job.state is JobState.SUCCEEDED:
                if isinstance(job, SegmentJob):
                    self.showStatus(_("Done: {name}").format(name=job.result_node.GetName()))
            elif job.state is JobState.CANCELLED:
                self.showStatus(_("Cancelled; the scene was not changed."))
            else:
                self.showStatus(job.error_message, error=True)
            self.updateButtons()
        if isinstance(job, FinetuneJob):  # last: it may start the next job (segment again)
            self.finetuneSection.onJobEvent(job, what)

    def onRestore(self) -> None:
        node = self.ui.outputSegmentationSelector.currentNode()
        if self.logic.restorePrevious(node):
            self.showStatus(_("Restored the segments '{name}' had before the last run.").format(name=node.GetName()))
        self.updateButtons()

    def showStatus(self, text: str, error: bool = False) -> None:
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #c62828" if error else "")


#
# HSAMSegmentLogic
#


class HSAMSegmentLogic(ScriptedLoadableModuleLogic):
    """Facade over HSAMSegmentLib, usable without the GUI::

        logic = HSAMSegmentLogic()
        job = logic.segment(volumeNode, "hsam-synapse-10pct", wait=True)   # or wait=False and poll job
        segmentationNode = job.result_node
    """

    def __init__(self, scene=None, launcher: WorkerLauncher = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self.launcher = launcher or WorkerLauncher()
        self.undo = UndoStore()
        self.installer = DependencyInstaller()
        self.importedModels = []
        self.predictions = PredictionStore()
        self.job = None

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    def getParameterNode(self):
        node = super().getParameterNode()
        return HSAMSegmentParameterNode(node) if HSAMSegmentParameterNode is not None else node

    def modelChoices(self):
        return list_model_choices(self.importedModels)

    def findModel(self, modelId: str):
        return find_model(*self.modelChoices(), modelId)

    def modelIdOfFile(self, path) -> str:
        """The model-list id of a model file (e.g. one fine-tuning just wrote); "" if it is not listed."""
        return next((c.id for c in self.modelChoices()[0] if c.checkpoint and str(c.checkpoint) == str(path)), "")

    def deviceChoices(self):
        return device_choices()

    def importWeights(self, path: str):
        choice, message = import_weights_file(path)
        if choice.source == "file":
            self.importedModels = [m for m in self.importedModels if m.id != choice.id] + [choice]
        return choice, message

    def ensureDependencies(self) -> None:
        self.installer.ensure()

    def segment(self, inputVolume, model=None, outputSegmentation=None, device: str = "auto", show3D: bool = True,
                batchSize: int = None, wait: bool = False, timeout: float = None, listener=None,
                checkDependencies: bool = True, guideLabels=None, guideSlices=None) -> SegmentJob:
        """Start a run (``wait=False``: poll the returned job; ``wait=True``: return when finished, raising
        ``WorkerFailed`` with a readable message if it failed). Input problems raise before anything changes.
        ``guideLabels``/``guideSlices`` (e.g. a FinetuneJob's ``labels`` and ``request.slices``): a guided run."""
        model = self._prepare(model, checkDependencies)
        request = SegmentRequest(inputVolume, model, outputSegmentation, device, show3D, batchSize,
                                 guide_labels=guideLabels, guide_slices=guideSlices)
        job = SegmentJob(self.scene, request, self.launcher, self.undo, self.predictions.listener(listener),
                         temp_root=self._tempRoot())
        return self._run(job, wait, timeout)

    def proposeCorrectedSlices(self, inputVolume, segmentation):
        """(K slice numbers, why): the slices of ``segmentation`` that differ from this session's last prediction
        into it (without one: the slices holding labels)."""
        return propose_corrected_slices(inputVolume, segmentation, self.predictions)

    def finetune(self, inputVolume, segmentation, slices, baseModel=None, mode: str = "fast", epochs: int = None,
                 device: str = "auto", wait: bool = False, timeout: float = None, listener=None,
                 checkDependencies: bool = True) -> FinetuneJob:
        """Fine-tune ``baseModel`` on the corrected ``slices`` (K numbers, or text like "12, 40-45") of
        ``segmentation``; the new model (``job.model_path``) joins the model list. Same waiting rules as segment."""
        baseModel = self._prepare(baseModel, checkDependencies)
        request = finetune_request(inputVolume, segmentation, slices, baseModel, mode, epochs, device, self.predictions)
        return self._run(FinetuneJob(self.scene, request, self.launcher, listener, temp_root=self._tempRoot()), wait,
                         timeout)

    def _prepare(self, model, checkDependencies: bool):
        if self.job is not None and not self.job.finished:
            raise SegmentInputError("H-SAM is already running; wait for it or cancel it first")
        if checkDependencies:
            self.installer.check()
        if model is None or isinstance(model, str):
            choices, _problem = self.modelChoices()
            model = self.findModel(model) if model else next((c for c in choices if c.usable), None)
        return model

    def _run(self, job, wait: bool, timeout: float):
        self.job = job.start()
        if wait:
            job.wait(timeout)
            if job.state is JobState.FAILED:
                raise WorkerFailed(job.error_message, job.error_kind)
        return job

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def canRestore(self, segmentationNode) -> bool:
        return self.undo.can_restore(segmentationNode)

    def restorePrevious(self, segmentationNode) -> bool:
        return self.undo.restore(segmentationNode)

    @staticmethod
    def _tempRoot():
        app = getattr(slicer, "app", None)
        return app.temporaryPath if app is not None else None


#
# HSAMSegmentTest
#


class HSAMSegmentTest(ScriptedLoadableModuleTest):
    """Offline self-test: a synthetic CT-like volume, a tiny random-weight model, the real worker (the checks live
    in HSAMSegmentLib.selftest; the pytest suite runs the same checks with a fake worker)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_bad_inputs()
        self.setUp()
        self.test_segment_finetune_and_cancel()
        self.setUp()
        self.test_sample_ct_online()

    def test_bad_inputs(self):
        from HSAMSegmentLib import selftest

        selftest.check_bad_inputs(self, HSAMSegmentLogic(), slicer.mrmlScene)

    def test_segment_finetune_and_cancel(self):
        import tempfile

        from HSAMSegmentLib import selftest
        from HSAMSegmentLib.install import torch_missing

        if torch_missing():
            self.delayDisplay("PyTorch is not installed: end-to-end self-test skipped (PyTorch Utils installs it)")
            return
        with tempfile.TemporaryDirectory() as folder:
            model = selftest.tiny_model_choice(folder)
            selftest.check_segment_and_cancel(self, HSAMSegmentLogic(), slicer.mrmlScene, model)
            self.setUp()
            selftest.check_finetune_flow(self, HSAMSegmentLogic(), slicer.mrmlScene, model)

    def test_sample_ct_online(self):
        from HSAMSegmentLib import selftest

        selftest.check_sample_ct_online(self, HSAMSegmentLogic())
