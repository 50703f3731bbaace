"""Extension packaging: every shipped file is listed in the module CMakeLists.txt (a file that is not listed is
silently left out of the extension), the index entries agree, the icons are right, and the panel's code can be
imported before torch is installed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hsamsegment_testlib import MODULE_DIR, REPO

CORE_DIR = REPO / "HSAMCore"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"


def cmake_lists(path: Path) -> dict[str, list[str]]:
    """``set(NAME a b "c d")`` blocks of a CMakeLists.txt (comments dropped, quotes removed, ${MODULE_NAME}
    expanded)."""
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|#[^\n]*|\(|\)|[^\s()#"]+', path.read_text(encoding="utf-8"))
    tokens = [t for t in tokens if not t.startswith("#")]
    blocks: dict[str, list[str]] = {}
    for n, token in enumerate(tokens):
        if token.lower() == "set" and n + 2 < len(tokens) and tokens[n + 1] == "(":
            end = tokens.index(")", n + 2)
            blocks[tokens[n + 2]] = [t[1:-1] if t.startswith('"') else t for t in tokens[n + 3:end]]
    module = blocks.get("MODULE_NAME", [""])[0]
    return {k: [v.replace("${MODULE_NAME}", module) for v in values] for k, values in blocks.items()}


def shipped_files(root: Path, sub: str = ".") -> list[str]:
    """Files under ``root/sub`` that ship, relative to ``root``: everything but hidden entries, caches,
    compiled Python and the module's own CMakeLists.txt."""
    out = []
    for folder, dirs, files in os.walk(root / sub):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for name in files:
            if name.startswith(".") or name.endswith((".pyc", ".pyo")) or name == "CMakeLists.txt":
                continue
            out.append((Path(folder) / name).relative_to(root).as_posix())
    return sorted(out)


def test_every_module_file_is_listed():
    lists = cmake_lists(MODULE_CMAKE)
    listed = set(lists["MODULE_PYTHON_SCRIPTS"]) | set(lists["MODULE_PYTHON_RESOURCES"])
    missing = [f for f in shipped_files(MODULE_DIR) if f not in listed]
    assert not missing, ("files of HSAMSegment/ missing from HSAMSegment/CMakeLists.txt (add them to "
                         "MODULE_PYTHON_SCRIPTS or MODULE_PYTHON_RESOURCES):\n  " + "\n  ".join(missing))
    for name in listed:
        assert (MODULE_DIR / name).is_file(), f"HSAMSegment/CMakeLists.txt lists {name}, which does not exist"
    assert all(f.endswith(".py") for f in lists["MODULE_PYTHON_SCRIPTS"])


def test_every_core_file_is_listed():
    lists = cmake_lists(MODULE_CMAKE)
    listed = set(lists["HSAMCORE_PYTHON_SCRIPTS"]) | set(lists["HSAMCORE_PYTHON_RESOURCES"])
    shipped = shipped_files(CORE_DIR, "hsam")
    missing = [f for f in shipped if f not in listed]
    scripts = [f for f in missing if f.endswith(".py")]
    resources = [f for f in missing if not f.endswith(".py")]
    assert not missing, ("files of HSAMCore/hsam missing from HSAMSegment/CMakeLists.txt (they would not ship in "
                         "the extension); run `python Testing/slicer_module/update_cmake_lists.py`, or add"
                         "\n  to HSAMCORE_PYTHON_SCRIPTS: " + " ".join(scripts)
                         + "\n  to HSAMCORE_PYTHON_RESOURCES: " + " ".join(resources))
    stale = [f for f in listed if not (CORE_DIR / f).is_file()]
    assert not stale, f"HSAMSegment/CMakeLists.txt lists core files that do not exist: {stale}"
    assert "hsam/worker.py" in listed or not (CORE_DIR / "hsam" / "worker.py").exists()
    assert "hsam/weights/registry.json" in lists["HSAMCORE_PYTHON_RESOURCES"]


def test_module_cmake_builds_a_scripted_module_and_installs_the_core_next_to_it():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}\s+SCRIPTS \$\{MODULE_PYTHON_SCRIPTS\}"
                     r"\s+RESOURCES \$\{MODULE_PYTHON_RESOURCES\}\s+WITH_GENERIC_TESTS", text)
    assert cmake_lists(MODULE_CMAKE)["MODULE_NAME"] == ["HSAMSegment"]
    assert "SOURCE_DIR ${HSAMCORE_SOURCE_DIR}" in text
    assert "DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/HSAMCore" in text
    assert "INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/HSAMCore" in text
    # The runtime looks for the core exactly there (installed layout) or in the source tree.
    from HSAMSegmentLib import corepath

    assert corepath.bundled_core_dir() == CORE_DIR.resolve()
    assert "MODULE_DIR / \"HSAMCore\"" in Path(corepath.__file__).read_text(encoding="utf-8")


def _s4ext() -> dict[str, str]:
    out = {}
    for line in (REPO / "HSAMExtension.s4ext").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            out[key] = value.strip()
    return out


def test_extension_description_agrees_everywhere():
    top = cmake_lists(REPO / "CMakeLists.txt")
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"^project\(HSAMExtension\)", text, re.M)
    for needed in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(HSAMSegment)",
                   "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert needed in text
    value = {k: " ".join(v) for k, v in top.items()}
    s4ext = _s4ext()
    index = json.loads((REPO / "HSAMExtension.json").read_text(encoding="utf-8"))
    assert value["EXTENSION_CATEGORY"] == s4ext["category"] == index["category"] == "Segmentation"
    assert value["EXTENSION_DEPENDS"] == s4ext["depends"] == " ".join(index["build_dependencies"]) == "PyTorch"
    assert value["EXTENSION_HOMEPAGE"] == s4ext["homepage"]
    assert value["EXTENSION_ICONURL"] == s4ext["iconurl"] and value["EXTENSION_ICONURL"].endswith("HSAMExtension.png")
    assert value["EXTENSION_SCREENSHOTURLS"] == s4ext["screenshoturls"]
    for url in (value["EXTENSION_ICONURL"], *value["EXTENSION_SCREENSHOTURLS"].split()):
        assert (REPO / url.split("/main/", 1)[1]).is_file(), f"{url} names a file the repository does not have"
    assert value["EXTENSION_DESCRIPTION"] == s4ext["description"]
    assert value["EXTENSION_CONTRIBUTORS"] == s4ext["contributors"]
    assert s4ext["scmurl"] == index["scm_url"] and s4ext["scm"] == "git"
    assert not "HSAMExtension".startswith("Slicer")
    assert (REPO / "LICENSE").is_file()


def test_index_entry_follows_the_catalog_schema():
    index = json.loads((REPO / "HSAMExtension.json").read_text(encoding="utf-8"))
    assert index["$schema"] == ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                "slicer-extension-catalog-entry-schema-v1.0.1.json#")
    allowed = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
               "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}
    for key in ("$schema", "category", "scm_url"):
        assert key in index
    for key, value in index.items():
        assert key in allowed, f"{key} is not allowed by the schema (additionalProperties: false)"
        assert isinstance(value, allowed[key]), key
    assert 1 <= index.get("tier", 1) <= 5


@pytest.mark.parametrize("path", ["HSAMSegment/Resources/Icons/HSAMSegment.png", "Resources/HSAMExtension.png"])
def test_icons_are_128_pixel_pngs(path):
    data = (REPO / path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)


def test_requirements_match_the_core_except_what_slicer_ships():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from HSAMSegmentLib.install import SLICER_SHIPPED, load_requirements, requirement_name

    core = tomllib.loads((CORE_DIR / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    expected = sorted(r.replace(" ", "") for r in core if requirement_name(r) not in SLICER_SHIPPED)
    assert sorted(r.replace(" ", "") for r in load_requirements()) == expected
    assert any(requirement_name(r) == "torch" for r in core)  # torch comes from the PyTorch extension


def test_the_panel_code_imports_without_torch_or_qt():
    """What the panel imports at startup must not import torch (it may not be installed yet and is slow)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import HSAMSegment\n"
        "from HSAMSegmentLib import devices, install, models, parameters, process, run, scene_io, selftest\n"
        "models.list_model_choices(); devices.device_choices(gpus=[])\n"
        "bad = [m for m in ('torch', 'qt', 'PySide6', 'segment_anything') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    env = dict(os.environ, HSAM_HOME=str(REPO / "nonexistent-home-for-test"))
    out = subprocess.run([sys.executable, "-c", code, str(MODULE_DIR)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
