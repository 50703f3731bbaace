"""``Testing/benchmarks/memory_profile.py`` (the peak-RSS profile of ``hsam segment`` in BENCHMARKS.md) on the
tiny backbone and a 3-slice CT: it writes its inputs, runs the CLI's steps in a fresh process and reports every
step with plausible numbers, and the segmentation it writes opens as a result of the right size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import SimpleITK as sitk

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_profile.py"
STEPS = ["import", "load model file", "read volume", "checks and reorientation", "prepare model", "slice loop",
         "labels to the input grid", "write .seg.nrrd", "done"]


def test_memory_profile_reports_every_step(tmp_path):
    out = tmp_path / "profile"
    run = subprocess.run([sys.executable, str(SCRIPT), "--backbone", "tiny", "--slices", "3", "--threads", "1",
                          "--out", str(out), "--json", str(tmp_path / "p.json")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "p.json").read_text())
    assert list(result["steps"]) == STEPS and result["slices"] == 3
    for name, entry in result["steps"].items():
        assert 0 < entry["start_mb"] <= entry["peak_mb"] + 1 and entry["end_mb"] <= entry["peak_mb"] + 1, name
    assert max(e["peak_mb"] for e in result["steps"].values()) <= result["lifetime_peak_mb"] + 1
    assert "lifetime peak RSS" in run.stdout and "slice loop" in run.stdout
    written = sitk.ReadImage(str(out / "result.seg.nrrd"))
    assert written.GetSize() == (512, 512, 3)
