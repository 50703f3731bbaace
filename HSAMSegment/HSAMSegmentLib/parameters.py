"""The module's state, stored in the scene's parameter node (saved with the scene).

``HSAMSegmentParameters`` declares the fields as plain annotations (importable anywhere, e.g. by the tests that
check the .ui's ``SlicerParameterName`` properties); ``HSAMSegmentParameterNode`` is the same class wrapped with
Slicer's ``@parameterNodeWrapper`` (None where Slicer's GUI is not available, e.g. with PyPI's slicer-core).

Bound to .ui widgets (``SlicerParameterName``): ``inputVolume``, ``outputSegmentation``, ``show3D``,
``finetuneSegmentation``, ``correctedSlices``, ``finetuneEpochs``, ``segmentAfterFinetune``.
Set by the Widget from its own lists (model and device lists are filled at run time, which the wrapper's
combo-box binding cannot do): ``modelId``, ``device``, ``finetuneMode``, ``baseModelId``.
"""

from __future__ import annotations

try:
    from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
except ImportError:  # pure-Python use (documentation, tests without slicer-core)
    vtkMRMLScalarVolumeNode = vtkMRMLSegmentationNode = object  # type: ignore[misc,assignment]


class HSAMSegmentParameters:
    """Parameters of one HSAMSegment panel.

    inputVolume         the CT/MR volume to segment
    outputSegmentation  where the result goes; None: a new segmentation node per run
    modelId             the model list entry (registry id, user model name or "file:<path>")
    device              the worker's device: auto | cpu | cuda | mps
    show3D              create the closed-surface (3D) representation after the run

    Fine-tune section:
    finetuneSegmentation  the segmentation the user corrected
    correctedSlices       its corrected slices, K numbers as typed ("12, 40-45")
    finetuneMode          fast (frozen encoder; CPU) | full (H-SAM's recipe with LoRA; GPU)
    finetuneEpochs        passes over the corrected slices; 0 = automatic
    segmentAfterFinetune  segment the volume again with the new model when fine-tuning ends
    baseModelId           the model selected before the last fine-tuning ("Revert to base model")
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    modelId: str = ""
    device: str = "auto"
    show3D: bool = True
    finetuneSegmentation: vtkMRMLSegmentationNode
    correctedSlices: str = ""
    finetuneMode: str = "fast"
    finetuneEpochs: int = 0
    segmentAfterFinetune: bool = True
    baseModelId: str = ""


def _wrap():
    try:
        from slicer.parameterNodeWrapper import parameterNodeWrapper
    except ImportError:
        return None

    @parameterNodeWrapper
    class HSAMSegmentParameterNode(HSAMSegmentParameters):
        pass

    return HSAMSegmentParameterNode


HSAMSegmentParameterNode = _wrap()

PARAMETER_NAMES = tuple(HSAMSegmentParameters.__annotations__)
