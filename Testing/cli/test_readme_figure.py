"""``Testing/benchmarks/render_readme_figure.py`` (the README's picture) on a tiny synthetic result: two balls in a
32³ volume written by the core's ``write_segmentation``, laid out like an ``hsam demo`` folder.

The VTK offscreen route is used where a GL library works (probed in a child process) and the matplotlib fallback
otherwise; the fallback is also forced, so both the picture's layout and the no-GL path run on every machine."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hsam.data.labels import LabelClass, LabelSet
from hsam.data.segfile import write_segmentation

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "render_readme_figure.py"
RED, BLUE = (220, 40, 40), (40, 80, 220)
SIZE = (640, 320)


@pytest.fixture(scope="module")
def figure_module():
    spec = importlib.util.spec_from_file_location("render_readme_figure", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    before = os.environ.get("VTK_DEFAULT_OPENGL_WINDOW")  # find_gl_route sets it for the process
    yield module
    module.find_gl_route.cache_clear()
    if before is None:
        os.environ.pop("VTK_DEFAULT_OPENGL_WINDOW", None)
    else:
        os.environ["VTK_DEFAULT_OPENGL_WINDOW"] = before
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """An ``hsam demo``-like folder: image, guided segmentation (a red and a blue ball), dice.json."""
    folder = tmp_path_factory.mktemp("demo")
    k, j, i = np.mgrid[:32, :32, :32]
    red = (k - 16) ** 2 + (j - 12) ** 2 + (i - 11) ** 2 <= 6 ** 2
    blue = (k - 15) ** 2 + (j - 19) ** 2 + (i - 21) ** 2 <= 5 ** 2
    volume = (40 + 30 * np.sin(i / 3.0) + 120 * red + 80 * blue).astype(np.int16)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((1.0, 1.2, 1.5))
    image.SetOrigin((10.0, -20.0, 5.0))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS-stored, like the Colin27 NIfTI
    sitk.WriteImage(image, str(folder / "colin27_t1.nii.gz"))
    labels = sitk.GetImageFromArray((red * 1 + blue * 2).astype(np.uint8))
    labels.CopyInformation(image)
    labelset = LabelSet("balls", (LabelClass(1, "red ball", RED), LabelClass(2, "blue ball", BLUE)))
    write_segmentation(labels, labelset, folder / "colin27_hsam_guided.seg.nrrd")
    dice = {"extent": [4, 27], "levels": [{"every": 6, "percent": 16.7, "given": [4, 10, 16, 22], "evaluated_count": 20,
                                           "methods": {"hsam-guided": {"mean_dice": 0.5, "dice": {"red ball": 0.4,
                                                                                                  "blue ball": 0.6}}}}]}
    (folder / "dice.json").write_text(json.dumps(dice), encoding="utf-8")
    return folder


def colour_pixels(rgb: np.ndarray, color) -> int:
    """Pixels whose hue is ``color``'s (shaded or not): its dominant channel clearly above the other two."""
    rgb = rgb[..., :3].astype(np.float32)
    c = np.asarray(color, np.float32) / 255
    main = int(np.argmax(c))
    others = [n for n in range(3) if n != main]
    ok = rgb[..., main] > 0.3
    for n in others:
        ok &= rgb[..., n] < rgb[..., main] * (c[n] / c[main] + 0.25)
    return int(ok.sum())


def check_picture(path: Path, size=SIZE) -> None:
    import matplotlib.image

    assert path.is_file()
    rgb = matplotlib.image.imread(str(path))
    assert rgb.shape[:2] == (size[1], size[0])
    width = size[0]
    left, slices = rgb[:, : width // 2], rgb[: size[1] // 2, width // 2:]
    background = np.asarray([0x11, 0x14, 0x18]) / 255
    assert (np.abs(left[..., :3] - background).max(axis=-1) > 0.1).mean() > 0.02  # something is drawn in 3D
    for color in (RED, BLUE):
        assert colour_pixels(left, color) > 150, f"no {color} surface in the 3D view"
        assert colour_pixels(slices, color) > 15, f"no {color} outline in the axial/coronal slices"


def test_demo_folder_layout_auto_backend(figure_module, demo_dir, tmp_path, capsys):
    """The script's command line on a demo folder: VTK offscreen where GL works here, else the fallback."""
    window = figure_module.find_gl_route()  # probed once per process, in a child process
    out = tmp_path / "Screenshots" / "result.png"
    assert figure_module.main([str(demo_dir), "--out", str(out), "--size", f"{SIZE[0]}x{SIZE[1]}"]) == 0
    check_picture(out)
    printed = capsys.readouterr().out
    expected = f"3D: VTK offscreen ({window})" if window else "3D: matplotlib 3D (no GL route works)"
    assert expected in printed, printed


def test_matplotlib_fallback(figure_module, demo_dir, tmp_path):
    """The no-GL path, forced: same picture, surfaces drawn by matplotlib, Dice read from the demo's json."""
    out = tmp_path / "fallback.png"
    result = figure_module.render_figure(demo_dir / "colin27_hsam_guided.seg.nrrd", demo_dir / "colin27_t1.nii.gz",
                                         out, demo_dir / "dice.json", size=SIZE, backend="matplotlib")
    assert result["backend"] == "matplotlib"
    assert result["segments"] == ["red ball", "blue ball"]
    check_picture(out)
    info = figure_module.demo_dice(demo_dir / "dice.json", demo_dir / "colin27_hsam_guided.seg.nrrd")
    assert info["mean"] == 0.5 and info["given"] == 4 and info["extent"] == 24
