"""Label sets: tables, terminology strings, value checks; importing them never imports torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hsam.data.labels import SYNAPSE_ORGANS, LabelSet, Terminology
from hsam.data.segfile import write_color_table
from hsam.errors import HSAMError


def test_synapse_terminology_strings():
    liver = SYNAPSE_ORGANS.by_value(5)
    assert liver.terminology.to_slicer_tag() == (
        "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~"
        "SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")
    right_kidney = SYNAPSE_ORGANS.by_value(2).terminology
    assert "SCT^64033007^Kidney~SCT^24028007^Right" in right_kidney.to_slicer_tag()
    assert Terminology.from_slicer_tag(right_kidney.to_slicer_tag()) == right_kidney
    assert Terminology.from_slicer_tag(right_kidney.to_slicer_tag() + "|") == right_kidney
    assert SYNAPSE_ORGANS.num_classes == 9
    assert SYNAPSE_ORGANS.index_to_value_lut() == list(range(9))


def test_json_round_trip():
    assert LabelSet.from_json(SYNAPSE_ORGANS.to_json()) == SYNAPSE_ORGANS


def test_csv_table(tmp_path):
    table = tmp_path / "labels.csv"
    table.write_text("value,name,r,g,b\n0,background,0,0,0\n1,frontal lobe,200,10,10\n4,cerebellum\n")
    labels = LabelSet.from_table(table)
    assert labels.values == (1, 4)
    assert labels.by_value(1).name == "frontal lobe" and labels.by_value(1).color == (200, 10, 10)
    assert labels.by_value(4).color != labels.by_value(1).color


def test_slicer_color_table_round_trip(tmp_path):
    path = tmp_path / "organs.ctbl"
    write_color_table(SYNAPSE_ORGANS, path)
    labels = LabelSet.from_table(path)
    assert [(c.value, c.name, c.color) for c in labels.classes] == [
        (c.value, c.name, c.color) for c in SYNAPSE_ORGANS.classes]


def test_unknown_values_rejected_with_names():
    with pytest.raises(HSAMError, match=r"\[9, 12\].*synapse-8-organs"):
        SYNAPSE_ORGANS.check_values([0, 1, 9, 12])
    SYNAPSE_ORGANS.check_values([0, 1, 8])


@pytest.mark.parametrize("bad", [dict(value=0), dict(value=300), dict(color=(0, 0))])
def test_invalid_classes(bad):
    from hsam.data.labels import LabelClass
    args = dict(value=1, name="x", color=(1, 2, 3)) | bad
    with pytest.raises(ValueError):
        LabelClass(**args)


def test_duplicate_values_rejected():
    from hsam.data.labels import LabelClass
    with pytest.raises(ValueError, match="repeats a label value"):
        LabelSet("x", (LabelClass(1, "a", (1, 1, 1)), LabelClass(1, "b", (1, 1, 1))))


def test_light_modules_do_not_import_torch():
    code = ("import sys, hsam, hsam.data.labels, hsam.description, hsam.errors, hsam.worker_protocol, "
            "hsam.data.volume, hsam.data.orientation, hsam.data.segfile, hsam.weights.registry, "
            "hsam.weights.modelfile; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
