"""Stand-ins for Slicer's scripted-module base classes where the desktop application is absent (PyPI's
``slicer-core`` in tests, plain Python): ``HSAMSegment.py`` then still imports, and its Logic runs on a scene.
Inside Slicer the real classes from ``slicer.ScriptedLoadableModule`` are used and this file is not imported.
"""

from __future__ import annotations

import logging
import os
import unittest


def tr(text: str) -> str:
    return text


class ScriptedLoadableModule:
    def __init__(self, parent) -> None:
        self.parent = parent
        self.moduleName = self.__class__.__name__

    def resourcePath(self, filename: str) -> str:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Resources", filename)


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None) -> None:
        self.parent = parent
        self.moduleName = self.__class__.__name__.removesuffix("Widget")

    def resourcePath(self, filename: str) -> str:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Resources", filename)

    def setup(self) -> None:
        raise RuntimeError("the HSAMSegment panel needs the 3D Slicer application")


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None) -> None:
        self.parent = parent
        self.moduleName = self.__class__.__name__.removesuffix("Logic")

    def getParameterNode(self):
        import slicer

        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node = scene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message: str, msec: int = 1000) -> None:
        logging.info(message)
