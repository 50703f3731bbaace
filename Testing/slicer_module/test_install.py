"""Dependency installation on the first Segment click, with stand-ins for Slicer's PyTorchUtils and pip calls."""

from __future__ import annotations

import pytest

from HSAMSegmentLib import install
from HSAMSegmentLib.errors import DependencyError
from HSAMSegmentLib.install import DependencyInstaller, SlicerServices


class FakeSlicer:
    """Stands in for PyTorchUtils, pip_ensure/pip_install and the confirmation dialog; records the calls and, if
    ``works``, makes the packages present as a real installation would."""

    def __init__(self, monkeypatch, torch_missing=True, missing=("segment-anything>=1.0", "safetensors>=0.4"),
                 torch_result="torch-module", has_pytorch_extension=True, has_pip_ensure=True, confirm=True,
                 ensure_raises=None, works=True):
        self.calls = []
        self.torch_is_missing = torch_missing
        self.missing = list(missing)
        self.torch_result, self.confirm_answer = torch_result, confirm
        self.ensure_raises, self.works = ensure_raises, works
        monkeypatch.setattr(install, "torch_missing", lambda: self.torch_is_missing)
        monkeypatch.setattr(install, "missing_requirements", lambda reqs: [r for r in reqs if r in self.missing])
        self.services = SlicerServices(torch_logic=lambda: self if has_pytorch_extension else None,
                                       pip_ensure=self.pip_ensure if has_pip_ensure else None,
                                       pip_install=self.pip_install, confirm=self.confirm)

    def installTorch(self, askConfirmation=False, torchVersionRequirement=None):  # PyTorchUtilsLogic's signature
        self.calls.append(("installTorch", askConfirmation, torchVersionRequirement))
        if self.torch_result is not None and self.works:
            self.torch_is_missing = False
        return self.torch_result

    def pip_ensure(self, requirements, requester=None):
        self.calls.append(("pip_ensure", list(requirements), requester))
        if self.ensure_raises:
            raise self.ensure_raises
        if self.works:
            self.missing = []

    def pip_install(self, text):
        self.calls.append(("pip_install", text))
        if self.works:
            self.missing = []

    def confirm(self, text):
        self.calls.append(("confirm", text))
        return self.confirm_answer

    def ensure(self):
        DependencyInstaller(services=self.services, log=lambda text: None).ensure()


def test_nothing_missing_means_no_questions(monkeypatch):
    fake = FakeSlicer(monkeypatch, torch_missing=False, missing=())
    fake.ensure()
    assert fake.calls == []


def test_torch_through_pytorch_utils_and_the_rest_through_pip_ensure(monkeypatch):
    fake = FakeSlicer(monkeypatch)
    fake.ensure()
    assert fake.calls[0] == ("installTorch", True, ">=2.4")
    assert fake.calls[1] == ("pip_ensure", ["segment-anything>=1.0", "safetensors>=0.4"], "HSAMSegment")


def test_declining_torch_gives_a_clear_message(monkeypatch):
    fake = FakeSlicer(monkeypatch, torch_result=None)
    with pytest.raises(DependencyError, match="PyTorch was not installed .*declined"):
        fake.ensure()
    assert [c[0] for c in fake.calls] == ["installTorch"]  # nothing else attempted


def test_missing_pytorch_extension_says_where_to_get_it(monkeypatch):
    with pytest.raises(DependencyError, match="'PyTorch' extension: install it from the Extension Manager"):
        FakeSlicer(monkeypatch, has_pytorch_extension=False).ensure()


def test_declining_pip_ensure(monkeypatch):
    with pytest.raises(DependencyError, match="were not installed .*User declined"):
        FakeSlicer(monkeypatch, torch_missing=False, ensure_raises=RuntimeError("User declined")).ensure()


def test_older_slicer_asks_once_then_pip_installs(monkeypatch):
    fake = FakeSlicer(monkeypatch, torch_missing=False, has_pip_ensure=False)
    fake.ensure()
    assert fake.calls[0][0] == "confirm" and "segment-anything>=1.0" in fake.calls[0][1]
    assert fake.calls[1] == ("pip_install", "segment-anything>=1.0 safetensors>=0.4")


def test_older_slicer_declined(monkeypatch):
    fake = FakeSlicer(monkeypatch, torch_missing=False, has_pip_ensure=False, confirm=False)
    with pytest.raises(DependencyError, match="declined"):
        fake.ensure()
    assert [c[0] for c in fake.calls] == ["confirm"]


def test_torch_too_old_after_install_is_reported(monkeypatch):
    with pytest.raises(DependencyError, match=r"is installed but H-SAM needs torch>=2.4"):
        FakeSlicer(monkeypatch, works=False, torch_result=type("torch", (), {"__version__": "2.1.0"})).ensure()


def test_still_missing_after_install_is_reported(monkeypatch):
    with pytest.raises(DependencyError, match="still missing after the installation"):
        FakeSlicer(monkeypatch, torch_missing=False, works=False).ensure()


def test_requirement_checks_use_metadata_and_skip_what_slicer_ships():
    assert install.requirement_name("Segment_Anything>=1.0") == "segment-anything"
    assert install.missing_requirements(["numpy>=99", "SimpleITK>=99", "torch>=99"]) == []  # never pip-installed
    assert install.missing_requirements(["pytest>=1"]) == []  # installed here
    assert install.missing_requirements(["pytest>=999"]) == ["pytest>=999"]
    assert install.missing_requirements(["surely-not-installed-package-xyz"]) == ["surely-not-installed-package-xyz"]
    assert install.load_requirements() == ["segment-anything>=1.0", "safetensors>=0.4", "tqdm>=4.60", "psutil>=5.9"]
    assert install.torch_missing() is False  # torch>=2.4 is in this environment


def test_check_only_reports(monkeypatch):
    fake = FakeSlicer(monkeypatch)
    with pytest.raises(DependencyError, match=r"missing: torch>=2.4, segment-anything>=1.0, safetensors>=0.4"):
        DependencyInstaller(services=fake.services).check()
    assert fake.calls == []


def test_check_passes_in_this_environment():
    DependencyInstaller().check()  # torch and the requirements are installed here
