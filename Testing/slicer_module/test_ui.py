"""The panel's .ui file: it parses (XML, and Qt's own loader when PySide6 is installed), every widget and widget
member the module code uses exists, and every ``SlicerParameterName`` is a field of the parameter class with a
widget that can show it."""

from __future__ import annotations

import ast
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hsamsegment_testlib import MODULE_DIR

UI_FILE = MODULE_DIR / "Resources" / "UI" / "HSAMSegment.ui"
MODULE_FILE = MODULE_DIR / "HSAMSegment.py"
GUI_FILES = (MODULE_FILE, MODULE_DIR / "HSAMSegmentLib" / "finetune_panel.py")  # code that touches ``self.ui``
QT_BASES = {"QWidget", "QLabel", "QComboBox", "QPushButton", "QCheckBox", "QProgressBar", "QPlainTextEdit",
            "QLineEdit", "QSpinBox", "QVBoxLayout", "QHBoxLayout", "QFormLayout"}


def gui_source() -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in GUI_FILES)


def ui_tree():
    return ET.parse(UI_FILE).getroot()


def widgets():
    """{name: class} of every widget in the .ui."""
    return {w.get("name"): w.get("class") for w in ui_tree().iter("widget")}


def parameter_names():
    """{widget name: SlicerParameterName}."""
    out = {}
    for widget in ui_tree().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                out[widget.get("name")] = prop.find("string").text
    return out


def ui_uses():
    """{widget name: set of members} for every ``self.ui.<name>[.<member>]`` in the GUI code."""
    uses: dict[str, set[str]] = {}
    for match in re.finditer(r"self\.ui\.(\w+)(?:\.(\w+))?", gui_source()):
        uses.setdefault(match.group(1), set())
        if match.group(2):
            uses[match.group(1)].add(match.group(2))
    return uses


def test_ui_is_well_formed_with_unique_names_and_declared_custom_widgets():
    root = ui_tree()
    assert root.tag == "ui" and root.get("version") == "4.0" and root.findtext("class") == "HSAMSegment"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "HSAMSegment"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique"
    custom = {c.findtext("class") for c in root.iter("customwidget")}
    for cls in set(widgets().values()):
        assert cls in QT_BASES or cls in custom, f"{cls} is neither a Qt class nor declared as a custom widget"
    for connection in root.iter("connection"):
        assert connection.findtext("sender") in names and connection.findtext("receiver") in names


def test_every_widget_the_module_touches_exists():
    present = widgets()
    missing = sorted(set(ui_uses()) - set(present))
    assert not missing, f"HSAMSegment.py uses widgets missing from the .ui: {missing}"
    for required in ("inputVolumeSelector", "modelComboBox", "importWeightsButton", "deviceComboBox",
                     "outputSegmentationSelector", "segmentButton", "progressBar", "statusLabel", "logTextEdit",
                     "show3DCheckBox", "finetuneSegmentationSelector", "correctedSlicesLineEdit", "proposeSlicesButton",
                     "finetuneModeComboBox", "finetuneEpochsSpinBox", "finetuneButton", "revertModelButton",
                     "validationLabel"):
        assert required in present


def test_every_slicer_parameter_name_is_a_parameter_field_with_a_fitting_widget():
    from HSAMSegmentLib.parameters import PARAMETER_NAMES, HSAMSegmentParameters

    bound = parameter_names()
    assert set(bound.values()) == {"inputVolume", "outputSegmentation", "show3D", "finetuneSegmentation",
                                   "correctedSlices", "finetuneEpochs", "segmentAfterFinetune"}
    annotations = HSAMSegmentParameters.__annotations__
    classes = widgets()
    root = ui_tree()
    for widget_name, parameter in bound.items():
        assert parameter in PARAMETER_NAMES, f"{widget_name}: {parameter!r} is not a field of the parameter class"
        kind = str(annotations[parameter])
        if "vtkMRML" in kind:
            assert classes[widget_name] == "qMRMLNodeComboBox"
            element = next(w for w in root.iter("widget") if w.get("name") == widget_name)
            node_types = [s.text for p in element.findall("property") if p.get("name") == "nodeTypes"
                          for s in p.iter("string")]
            assert node_types == [kind.strip("'\"")], (widget_name, node_types, kind)
        else:
            assert classes[widget_name] == {"bool": "QCheckBox", "int": "QSpinBox", "str": "QLineEdit"}[kind]
    # Fields that are not bound are set by the GUI code itself.
    for field in set(PARAMETER_NAMES) - set(bound.values()):
        assert re.search(rf"\.{field}\b", gui_source()), field


def test_parameter_class_defaults():
    from HSAMSegmentLib.parameters import HSAMSegmentParameters

    assert HSAMSegmentParameters.device == "auto" and HSAMSegmentParameters.show3D is True
    assert HSAMSegmentParameters.modelId == ""


def test_qt_loads_the_ui_and_every_member_the_module_uses_exists():
    """Qt's own .ui loader (PySide6); Slicer's custom widgets fall back to their base class there, so members
    of those are not checked."""
    pytest.importorskip("PySide6.QtUiTools", reason="PySide6 not installed")
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QFile, QIODevice
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication, QWidget

    app = QApplication.instance() or QApplication([])
    assert app is not None
    handle = QFile(str(UI_FILE))
    assert handle.open(QIODevice.OpenModeFlag.ReadOnly)
    try:
        top = QUiLoader().load(handle)
    finally:
        handle.close()
    assert top is not None and top.objectName() == "HSAMSegment"
    loaded = {w.objectName(): w for w in top.findChildren(QWidget)}
    custom = {c.findtext("class") for c in ui_tree().iter("customwidget")}
    classes = widgets()
    for name, members in ui_uses().items():
        widget = loaded[name]
        if classes[name] in custom:
            continue
        meta = widget.metaObject()
        for member in members:
            ok = hasattr(widget, member) or meta.indexOfProperty(member) >= 0
            assert ok, f"{name} ({classes[name]}) has no member or property {member!r}"
        assert widget.property("SlicerParameterName") == parameter_names().get(name)
    top.deleteLater()


def test_widget_code_holds_gui_code_only():
    """The Widget class reaches the scene and the worker only through the Logic."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "HSAMSegmentWidget")
    source = ast.get_source_segment(MODULE_FILE.read_text(encoding="utf-8"), widget)
    for forbidden in ("subprocess", "SegmentJob(", "export_volume", "import_result", "ImportLabelmap",
                      "SimpleITK", "torch", "AddNode("):
        assert forbidden not in source, f"the Widget should not use {forbidden}"
    logic = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "HSAMSegmentLogic")
    assert logic.end_lineno - logic.lineno < 120, "the Logic is a facade; put the work in HSAMSegmentLib"
    assert len(Path(MODULE_FILE).read_text(encoding="utf-8").splitlines()) < 500, "keep the module file thin"


def test_finetune_section_holds_gui_code_only():
    source = (MODULE_DIR / "HSAMSegmentLib" / "finetune_panel.py").read_text(encoding="utf-8")
    for forbidden in ("subprocess", "FinetuneJob(", "SegmentJob(", "training_labels", "export_volume", "SimpleITK",
                      "torch", "AddNode("):
        assert forbidden not in source, f"the Fine-tune section should not use {forbidden}"
