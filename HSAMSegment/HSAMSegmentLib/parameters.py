"""The module's state, stored in the scene's parameter node (saved with the scene).

``HSAMSegmentParameters`` declares the fields as plain annotations (importable anywhere, e.g. by the tests that
check the .ui's ``SlicerParameterName`` properties); ``HSAMSegmentParameterNode`` is the same class wrapped with
Slicer's ``@parameterNodeWrapper`` (None where Slicer's GUI is not available, e.g. with PyPI's slicer-core).

Bound to .ui widgets (``SlicerParameterName``): ``inputVolume``, ``outputSegmentation``, ``show3D``.
Set by the Widget from its own lists (model and device lists are filled at run time, which the wrapper's
combo-box binding cannot do): ``modelId``, ``device``.
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
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    modelId: str = ""
    device: str = "auto"
    show3D: bool = True


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
