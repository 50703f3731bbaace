"""Python packages H-SAM needs inside Slicer, installed on the first "Segment organs" click (never at module
import or panel creation).

* torch through the PyTorch extension (``PyTorchUtils.installTorch``), which picks the right CUDA/CPU build and
  asks the user first;
* the rest (``Resources/requirements.txt``) through ``slicer.packaging.pip_ensure`` (Slicer 5.12+, asks first) or,
  on older Slicer, one confirmation dialog and ``slicer.util.pip_install``;
* packages Slicer ships (numpy, SimpleITK, vtk, requests, ...) are never (re)installed;
* the H-SAM core itself is bundled in the extension (see ``corepath``), not installed.

The Slicer calls go through :class:`SlicerServices` so tests can stand in for them.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import DependencyError

REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
TORCH_REQUIREMENT = ">=2.4"
SLICER_SHIPPED = frozenset({"numpy", "simpleitk", "vtk", "requests", "packaging", "pip", "setuptools", "wheel",
                            "pydicom", "torch", "torchvision"})
"""Never installed with pip here (shipped by Slicer; torch comes from the PyTorch extension)."""

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return normalize(match.group(1))


def load_requirements(path: str | Path = REQUIREMENTS_FILE) -> list[str]:
    """Requirement lines of a requirements file (comments and blank lines dropped)."""
    lines = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def satisfied(requirement: str) -> bool:
    """Whether ``requirement`` is met by the installed distributions (read from metadata; nothing imported)."""
    version = installed_version(requirement_name(requirement))
    if version is None:
        return False
    try:
        from packaging.requirements import Requirement
        from packaging.version import InvalidVersion, Version
    except ImportError:  # no packaging: presence is all we can check
        return True
    try:
        return Requirement(requirement).specifier.contains(Version(version), prereleases=True)
    except (InvalidVersion, ValueError):
        return True


def missing_requirements(requirements: list[str]) -> list[str]:
    """The requirements not yet satisfied, without those Slicer ships."""
    return [r for r in requirements if requirement_name(r) not in SLICER_SHIPPED and not satisfied(r)]


def torch_missing() -> bool:
    return not satisfied("torch" + TORCH_REQUIREMENT)


# ---------------------------------------------------------------------------------------------- Slicer calls

@dataclass
class SlicerServices:
    """The few Slicer calls the installer makes (replaced by fakes in tests)."""

    torch_logic: Callable[[], Any]
    pip_ensure: Callable[..., Any] | None
    pip_install: Callable[[str], Any]
    confirm: Callable[[str], bool]

    @classmethod
    def from_slicer(cls) -> "SlicerServices":
        import slicer

        try:
            from slicer import packaging as slicer_packaging

            pip_ensure = getattr(slicer_packaging, "pip_ensure", None)
        except ImportError:
            pip_ensure = None
        return cls(torch_logic=_pytorch_utils_logic, pip_ensure=pip_ensure, pip_install=slicer.util.pip_install,
                   confirm=lambda text: bool(slicer.util.confirmOkCancelDisplay(text, "HSAMSegment")))


def _pytorch_utils_logic() -> Any:
    import slicer

    try:
        return slicer.util.getModuleLogic("PyTorchUtils")
    except (RuntimeError, AttributeError):
        pass
    try:
        import PyTorchUtils

        return PyTorchUtils.PyTorchUtilsLogic()
    except ImportError:
        return None


@dataclass
class DependencyInstaller:
    """Checks and installs what the worker needs. ``ensure()`` is cheap once everything is present."""

    services: SlicerServices | None = None
    requirements_file: Path = REQUIREMENTS_FILE
    log: Callable[[str], None] = logging.info

    def missing(self) -> tuple[bool, list[str]]:
        """(torch missing, other requirements missing)."""
        return torch_missing(), missing_requirements(load_requirements(self.requirements_file))

    def check(self) -> None:
        """Raise :class:`DependencyError` (without installing anything) if a package is missing."""
        need_torch, need_other = self.missing()
        names = (["torch" + TORCH_REQUIREMENT] if need_torch else []) + need_other
        if names:
            raise DependencyError(f"Python packages H-SAM needs are missing: {', '.join(names)}. Click 'Segment "
                                  "organs' in the module panel (it offers to install them), or call "
                                  "HSAMSegmentLogic().ensureDependencies() first.")

    def ensure(self) -> None:
        """Install what is missing (asking first); raise :class:`DependencyError` with a readable message if the
        user declines or the installation fails."""
        need_torch, need_other = self.missing()
        if not need_torch and not need_other:
            return
        services = self.services or SlicerServices.from_slicer()
        if need_torch:
            self._install_torch(services)
        if need_other:
            self._install_others(services, need_other)

    def _install_torch(self, services: SlicerServices) -> None:
        logic = services.torch_logic()
        if logic is None:
            raise DependencyError(
                "H-SAM needs PyTorch, which comes with the 'PyTorch' extension: install it from the Extension "
                "Manager (View > Extension Manager), restart Slicer, then click 'Segment organs' again.")
        self.log(f"Installing PyTorch {TORCH_REQUIREMENT} through the PyTorch extension…")
        try:
            torch = logic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT)
        except Exception as exc:  # network, disk, incompatible wheels
            raise DependencyError(f"PyTorch could not be installed: {exc}. Check the internet connection and free "
                                  "disk space, or install it from the PyTorch Utils module, then try again.") from exc
        if torch is None:
            raise DependencyError("PyTorch was not installed (the installation was declined). H-SAM cannot run "
                                  "without it; click 'Segment organs' again to be asked again, or install it from "
                                  "the PyTorch Utils module.")
        if torch_missing():
            raise DependencyError(f"PyTorch {getattr(torch, '__version__', '?')} is installed but H-SAM needs "
                                  f"torch{TORCH_REQUIREMENT}; update it in the PyTorch Utils module (uninstall, "
                                  "restart, install) and try again.")

    def _install_others(self, services: SlicerServices, missing: list[str]) -> None:
        listing = ", ".join(missing)
        if services.pip_ensure is not None:
            self.log(f"Installing {listing}…")
            try:
                services.pip_ensure(missing, requester="HSAMSegment")
            except RuntimeError as exc:  # raised when the user declines
                raise DependencyError(f"The Python packages H-SAM needs were not installed ({listing}): {exc}. "
                                      "Click 'Segment organs' again to be asked again.") from exc
            except Exception as exc:
                raise DependencyError(f"Installing {listing} failed: {exc}. Check the internet connection and "
                                      "try again.") from exc
        else:
            if not services.confirm(f"H-SAM needs these Python packages, which will now be downloaded and "
                                    f"installed into Slicer's Python:\n\n{listing}\n\nContinue?"):
                raise DependencyError(f"The Python packages H-SAM needs were not installed ({listing}): the "
                                      "installation was declined. Click 'Segment organs' again to be asked again.")
            self.log(f"Installing {listing}…")
            try:
                services.pip_install(" ".join(missing))
            except Exception as exc:
                raise DependencyError(f"Installing {listing} failed: {exc}. Check the internet connection and "
                                      "try again.") from exc
        still = missing_requirements(missing)
        if still:
            raise DependencyError(f"These packages are still missing after the installation: {', '.join(still)}; "
                                  "restart Slicer and try again.")
