"""`hsam models list|fetch|import|verify` through hsam.cli.main, against a local server."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from weights_testserver import FileServer  # noqa: E402

from hsam.cli import main  # noqa: E402

SAM = os.urandom(20_000)
HSAM = os.urandom(10_000)


@pytest.fixture()
def env(tmp_path, monkeypatch):
    server = FileServer()
    server.files.update({"sam.pth": SAM, "hsam.pth": HSAM})
    doc = {"format": "hsam-registry", "format_version": 1, "models": [
        {"id": "sam-vit-b", "title": "SAM (test mirror)", "kind": "sam-base", "licence": "Apache-2.0",
         "status": "verified", "files": [{"name": "sam_vit_b_01ec64.pth", "role": "sam_checkpoint",
                                          "url": server.url("sam.pth"), "size": len(SAM),
                                          "sha256": hashlib.sha256(SAM).hexdigest()}]},
        {"id": "hsam-synapse-10pct", "title": "H-SAM (test mirror)", "kind": "hsam-official", "licence": "MIT",
         "status": "unverified", "requires": ["sam-vit-b"], "label_set": "synapse-8-organs",
         "notes": "performs poorly as released",
         "files": [{"name": "220_epoch_299.pth", "role": "checkpoint", "url": server.url("hsam.pth"),
                    "size": None, "sha256": None}]}]}
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps(doc))
    monkeypatch.setenv("HSAM_REGISTRY", str(registry))
    monkeypatch.setenv("HSAM_HOME", str(tmp_path / "home"))
    yield tmp_path
    server.close()


def test_list_table_and_json(env, capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for model_id in ("sam-vit-b", "hsam-synapse-10pct", "litemedsam-base"):
        assert model_id in out
    assert "unverified" in out and "missing" in out and str(env / "home") in out
    assert main(["models", "list", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    models = {m["id"]: m for m in doc["models"]}
    assert models["sam-vit-b"]["available"] is False
    assert models["litemedsam-base"]["available"] is True
    assert doc["cache"] == str(env / "home")


def test_fetch_verify_and_damage(env, capsys):
    assert main(["models", "fetch", "hsam-synapse-10pct"]) == 0
    captured = capsys.readouterr()
    assert "hsam-synapse-10pct: ready" in captured.out and "sam_checkpoint:" in captured.out
    assert "note: hsam-synapse-10pct is unverified" in captured.out
    assert "warning:" in captured.err and "pinning its SHA-256" in captured.err
    assert main(["models", "verify", "hsam-synapse-10pct"]) == 0
    assert "all files ok" in capsys.readouterr().out
    assert main(["models", "list"]) == 0
    assert "checked" in capsys.readouterr().out

    sam = env / "home" / "downloads" / "sam-vit-b" / "sam_vit_b_01ec64.pth"
    sam.write_bytes(b"\0" * len(SAM))
    assert main(["models", "verify", "sam-vit-b"]) == 2
    captured = capsys.readouterr()
    assert "damaged" in captured.out and "hsam models fetch sam-vit-b" in captured.err
    assert main(["models", "verify", "sam-vit-b", "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_import_good_and_wrong_file(env, capsys):
    good = env / "sam_vit_b_01ec64.pth"
    good.write_bytes(SAM)
    assert main(["models", "import", "sam-vit-b", str(good)]) == 0
    assert "imported" in capsys.readouterr().out
    wrong = env / "wrong.pth"
    wrong.write_bytes(os.urandom(len(SAM)))
    assert main(["models", "import", "sam-vit-b", str(wrong), "--as", "sam_vit_b_01ec64.pth"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nothing was imported" in err.lower() and "Traceback" not in err
    assert main(["models", "verify", "sam-vit-b"]) == 0


def test_errors_are_one_line_with_exit_code_2(env, capsys):
    assert main(["models", "fetch", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nope'" in err and "Traceback" not in err
    assert main(["models", "verify", "hsam-synapse-10pct"]) == 2
    assert "missing" in capsys.readouterr().out
    assert not (env / "home").exists()  # checking creates nothing


def test_fetch_404_exit_code(env, capsys, monkeypatch):
    registry = json.loads(Path(os.environ["HSAM_REGISTRY"]).read_text())
    registry["models"][0]["files"][0]["url"] += ".gone"
    Path(os.environ["HSAM_REGISTRY"]).write_text(json.dumps(registry))
    assert main(["models", "fetch", "sam-vit-b"]) == 2
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "Traceback" not in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["models"])
    assert info.value.code == 2
