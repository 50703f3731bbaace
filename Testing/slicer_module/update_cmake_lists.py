"""Rewrite the core file lists (HSAMCORE_PYTHON_SCRIPTS / HSAMCORE_PYTHON_RESOURCES) in HSAMSegment/CMakeLists.txt
from what is in HSAMCore/hsam now (everything but hidden entries, caches and compiled Python).

    python Testing/slicer_module/update_cmake_lists.py

test_packaging.py fails until every shipped file is listed; this fixes the core part in one step (module files of
HSAMSegment/ are few and listed by hand).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CMAKE = REPO / "HSAMSegment" / "CMakeLists.txt"


def core_files() -> list[str]:
    root = REPO / "HSAMCore"
    out = []
    for folder, dirs, files in os.walk(root / "hsam"):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        out += [(Path(folder) / f).relative_to(root).as_posix() for f in files
                if not f.startswith(".") and not f.endswith((".pyc", ".pyo"))]
    return sorted(out)


def main() -> None:
    files = core_files()
    text = CMAKE.read_text(encoding="utf-8")
    for name, selected in (("HSAMCORE_PYTHON_SCRIPTS", [f for f in files if f.endswith(".py")]),
                           ("HSAMCORE_PYTHON_RESOURCES", [f for f in files if not f.endswith(".py")])):
        block = f"set({name}\n  " + "\n  ".join(selected) + "\n  )"
        text, count = re.subn(rf"set\({name}\n.*?\n  \)", lambda _m, b=block: b, text, flags=re.S)
        if count != 1:
            raise SystemExit(f"{CMAKE}: cannot find the set({name} ...) block")
    CMAKE.write_text(text, encoding="utf-8")
    print(f"{CMAKE.relative_to(REPO)}: {len(files)} core files listed")


if __name__ == "__main__":
    main()
