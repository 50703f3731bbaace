"""The model registry: which model files exist, where they come from, how to check them, where they are here.

No torch here (the Slicer panel lists models before torch is installed).

The built-in registry is ``registry.json`` next to this module. ``$HSAM_REGISTRY`` may name a site registry
file with the same layout: its entries replace built-in ones with the same id and add new ones (a site can
point ``sam-vit-b`` to a local mirror); ``"inherit_builtin": false`` in it drops the built-in entries.

Registry file layout::

    {"format": "hsam-registry", "format_version": 1, "models": [
      {"id": "sam-vit-b", "title": ..., "kind": "sam-base", "licence": "Apache-2.0", "status": "verified",
       "requires": [], "label_set": null, "notes": ...,
       "files": [{"name": "sam_vit_b_01ec64.pth", "role": "sam_checkpoint", "size": 375042383,
                  "sha256": "ec2d...",
                  "url": "https://..."  |  "google_drive_id": "1A1w..."  |
                  "package": {"distribution": ..., "version": ..., "module": ..., "path": ...}}]}]}

A file with ``"sha256": null`` is trusted on first use: the SHA-256 of its first download (or import) is
pinned in the cache manifest, with a warning, and every later check compares against that pin.

``resolve(id)`` returns ``{role: path}`` for the model and everything it ``requires`` (e.g.
``{"checkpoint": .../220_epoch_299.pth, "sam_checkpoint": .../sam_vit_b_01ec64.pth}``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import ChecksumError, DiskFullError, HSAMError, ModelFileError
from .cache import (
    atomic_write_text,
    check_free_space,
    downloads_dir,
    ensure_dir,
    format_bytes,
    hsam_home,
    is_disk_full,
    manifest_path,
    models_dir,
    unlink_quietly,
)
from .download import DEFAULT_TIMEOUT, download_file, google_drive_url, sha256_file

REGISTRY_ENV = "HSAM_REGISTRY"
BUILTIN_REGISTRY = Path(__file__).with_name("registry.json")
REGISTRY_FORMAT = "hsam-registry"
REGISTRY_VERSION = 1
MANIFEST_FORMAT = "hsam-cache-manifest"
MANIFEST_VERSION = 1
MODEL_STATUSES = ("verified", "unverified", "experimental", "deprecated")
USER_MODEL_SUFFIX = ".safetensors"

_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")

FetchProgress = Callable[[str, int, "int | None"], None]
"""Called as ``progress(file_name, bytes_done, bytes_total)`` while ``fetch`` downloads."""


class RegistryError(HSAMError):
    """The model registry (built-in or ``$HSAM_REGISTRY``) is invalid, or names no such model."""


class TrustOnFirstUseWarning(UserWarning):
    """A file without a published checksum was pinned to the SHA-256 of its first copy."""


class CacheWarning(UserWarning):
    """Something in the cache was repaired (e.g. a damaged file deleted before downloading it again)."""


# ---------------------------------------------------------------------------------------------- entries

@dataclass(frozen=True)
class PackageSource:
    """A file shipped inside an installed Python package (found without importing the package)."""

    distribution: str
    version: str
    module: str
    path: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}" if self.version else self.distribution


@dataclass(frozen=True)
class FileSpec:
    """One file of a registry model: its name, role, expected size/SHA-256 (None = unknown) and source."""

    name: str
    role: str
    size: int | None
    sha256: str | None
    url: str | None = None
    google_drive_id: str | None = None
    package: PackageSource | None = None

    @property
    def download_url(self) -> str | None:
        """The URL to download from (None for files that come from a package)."""
        if self.url:
            return self.url
        if self.google_drive_id:
            return google_drive_url(self.google_drive_id)
        return None

    @property
    def source_text(self) -> str:
        if self.package:
            return f"Python package {self.package.requirement}"
        if self.google_drive_id:
            return f"Google Drive file {self.google_drive_id}"
        return str(self.url)


@dataclass(frozen=True)
class ModelEntry:
    """One registry model. ``requires`` lists models whose files it also needs (e.g. the SAM base)."""

    id: str
    title: str
    kind: str
    licence: str
    status: str
    files: tuple[FileSpec, ...]
    requires: tuple[str, ...] = ()
    label_set: str | None = None
    notes: str = ""
    origin: str = ""


@dataclass
class FileState:
    """What is known about one file of a model on this machine.

    ``state``: ``ok`` (SHA-256 checked and unchanged since), ``unchecked`` (present, not yet hashed),
    ``unknown`` (present, no checksum to compare with), ``missing``, ``damaged``.
    """

    model_id: str
    name: str
    role: str
    path: Path | None
    state: str
    expected_sha256: str | None = None
    actual_sha256: str | None = None
    pinned: bool = False
    message: str = ""

    @property
    def present(self) -> bool:
        return self.state in ("ok", "unchecked", "unknown")

    def to_json(self) -> dict:
        return {"model": self.model_id, "name": self.name, "role": self.role,
                "path": str(self.path) if self.path else None, "state": self.state,
                "expected_sha256": self.expected_sha256, "actual_sha256": self.actual_sha256,
                "pinned": self.pinned, "message": self.message}


@dataclass
class ModelStatus:
    """A registry model and the state of its files (its own and those of required models) here."""

    entry: ModelEntry
    files: list[FileState]

    @property
    def available(self) -> bool:
        """Every file is present (checked or not)."""
        return all(f.present for f in self.files)

    @property
    def verified(self) -> bool:
        """Every file's SHA-256 was checked against the registry (or its pin) and is unchanged since."""
        return all(f.state == "ok" for f in self.files)

    def to_json(self) -> dict:
        e = self.entry
        return {"id": e.id, "title": e.title, "kind": e.kind, "licence": e.licence, "status": e.status,
                "requires": list(e.requires), "label_set": e.label_set, "notes": e.notes,
                "available": self.available, "verified": self.verified,
                "files": [f.to_json() for f in self.files]}


@dataclass
class VerifyReport:
    """Result of re-hashing a model's files (and those of the models it requires)."""

    model_id: str
    files: list[FileState] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.state == "ok" for f in self.files)

    def to_json(self) -> dict:
        return {"model": self.model_id, "ok": self.ok, "files": [f.to_json() for f in self.files]}


# ---------------------------------------------------------------------------------------------- parsing

def _fail(origin: str, where: str, problem: str) -> RegistryError:
    return RegistryError(f"model registry {origin} is invalid: {where}: {problem}; fix the file"
                         + (f" (it comes from ${REGISTRY_ENV})" if origin != str(BUILTIN_REGISTRY) else
                            " (the built-in registry: reinstall hsam)"))


def _opt(d: dict, key: str, kind: type | tuple[type, ...], origin: str, where: str, default: Any = None) -> Any:
    value = d.get(key, default)
    if value is not None and not isinstance(value, kind):
        raise _fail(origin, where, f"{key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _req_str(d: dict, key: str, origin: str, where: str) -> str:
    value = d.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _fail(origin, where, f"{key!r} is required and must be a non-empty string, got {value!r}")
    return value


def _parse_file(d: Any, origin: str, where: str) -> FileSpec:
    if not isinstance(d, dict):
        raise _fail(origin, where, "a file entry must be an object")
    name = _req_str(d, "name", origin, where)
    if not _FILE_NAME.match(name) or name in (".", ".."):
        raise _fail(origin, where, f"file name {name!r} must be a plain file name (no folders)")
    role = _req_str(d, "role", origin, where)
    size = d.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise _fail(origin, where, f"'size' must be a positive integer or null, got {size!r}")
    sha = d.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not _SHA256.match(sha.lower())):
        raise _fail(origin, where, f"'sha256' must be 64 hex digits or null, got {sha!r}")
    url = _opt(d, "url", str, origin, where)
    drive = _opt(d, "google_drive_id", str, origin, where)
    if drive is not None:
        try:
            google_drive_url(drive)
        except HSAMError as exc:
            raise _fail(origin, where, str(exc)) from None
    pkg = _opt(d, "package", dict, origin, where)
    if sum(x is not None for x in (url, drive, pkg)) != 1:
        raise _fail(origin, where, "give exactly one source: 'url', 'google_drive_id' or 'package'")
    if url is not None and not url.lower().startswith(("http://", "https://")):
        raise _fail(origin, where, f"'url' must be http(s), got {url!r}")
    package = None
    if pkg is not None:
        pwhere = where + ".package"
        package = PackageSource(distribution=_req_str(pkg, "distribution", origin, pwhere),
                                version=_opt(pkg, "version", str, origin, pwhere, "") or "",
                                module=_req_str(pkg, "module", origin, pwhere),
                                path=_req_str(pkg, "path", origin, pwhere))
        if ".." in Path(package.path).parts or Path(package.path).is_absolute():
            raise _fail(origin, pwhere, f"'path' must be relative inside the package, got {package.path!r}")
    return FileSpec(name=name, role=role, size=size, sha256=sha.lower() if sha else None, url=url,
                    google_drive_id=drive, package=package)


def _parse_model(d: Any, origin: str, index: int) -> ModelEntry:
    where = f"models[{index}]"
    if not isinstance(d, dict):
        raise _fail(origin, where, "a model entry must be an object")
    model_id = _req_str(d, "id", origin, where)
    if not _ID.match(model_id):
        raise _fail(origin, where, f"id {model_id!r} must be lower-case letters, digits, '.', '_' or '-'")
    where = f"models[{index}] ({model_id})"
    status = _req_str(d, "status", origin, where)
    if status not in MODEL_STATUSES:
        raise _fail(origin, where, f"'status' must be one of {', '.join(MODEL_STATUSES)}, got {status!r}")
    files = d.get("files")
    if not isinstance(files, list) or not files:
        raise _fail(origin, where, "'files' must be a non-empty list")
    specs = tuple(_parse_file(f, origin, f"{where}.files[{i}]") for i, f in enumerate(files))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise _fail(origin, where, f"file names repeat: {names}")
    requires = d.get("requires", []) or []
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise _fail(origin, where, "'requires' must be a list of model ids")
    return ModelEntry(id=model_id, title=_req_str(d, "title", origin, where), kind=_req_str(d, "kind", origin, where),
                      licence=_req_str(d, "licence", origin, where), status=status, files=specs,
                      requires=tuple(requires), label_set=_opt(d, "label_set", str, origin, where),
                      notes=_opt(d, "notes", str, origin, where, "") or "", origin=origin)


def _read_registry_file(path: Path) -> dict:
    origin = str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"model registry {path} does not exist; fix or unset ${REGISTRY_ENV}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"cannot read the model registry {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise _fail(origin, f"line {exc.lineno} column {exc.colno}", f"not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or data.get("format") != REGISTRY_FORMAT:
        raise _fail(origin, "top level", f"must be an object with \"format\": \"{REGISTRY_FORMAT}\"")
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise _fail(origin, "top level", f"'format_version' must be a positive integer, got {version!r}")
    if version > REGISTRY_VERSION:
        raise RegistryError(f"model registry {path} has format version {version}, newer than this hsam "
                            f"({REGISTRY_VERSION}); update hsam (pip install -U hsam)")
    if not isinstance(data.get("models"), list):
        raise _fail(origin, "top level", "'models' must be a list")
    return data


def parse_registry(data: dict, origin: str) -> dict[str, ModelEntry]:
    """Validate a registry document (already JSON-decoded); return its models by id."""
    models: dict[str, ModelEntry] = {}
    for i, d in enumerate(data.get("models", [])):
        entry = _parse_model(d, origin, i)
        if entry.id in models:
            raise _fail(origin, f"models[{i}]", f"id {entry.id!r} appears twice")
        models[entry.id] = entry
    return models


# ---------------------------------------------------------------------------------------------- manifest

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Manifest:
    """The cache manifest: per file (``<model id>/<file name>``) the SHA-256 found at its last check, with
    size and modification time to tell whether it changed since, and trust-on-first-use pins."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HSAMError(f"the H-SAM cache manifest {self.path} is damaged ({exc}); delete it (checksums are "
                            "recomputed, and files without a published checksum are pinned again) and retry") \
                from exc
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(
                data.get("files"), dict):
            raise HSAMError(f"{self.path} is not an H-SAM cache manifest; delete it and retry")
        if int(data.get("format_version", 0)) > MANIFEST_VERSION:
            raise HSAMError(f"the cache manifest {self.path} was written by a newer hsam; update hsam")
        return data["files"]

    def get(self, key: str) -> dict:
        return dict(self.load().get(key, {}))

    def update(self, key: str, **fields: Any) -> dict:
        """Merge ``fields`` into the record of ``key`` (None deletes a field) and save atomically."""
        files = self.load()
        record = dict(files.get(key, {}))
        for name, value in fields.items():
            if value is None:
                record.pop(name, None)
            else:
                record[name] = value
        files[key] = record
        doc = {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "files": files}
        atomic_write_text(self.path, json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return record


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ---------------------------------------------------------------------------------------------- registry

class Registry:
    """The registry's models and the cache they are stored in (``hsam_home()`` at call time)."""

    def __init__(self, models: dict[str, ModelEntry]) -> None:
        self.models = models
        self._check_requirements()

    # -------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> Registry:
        """The built-in registry merged with ``path`` (default ``$HSAM_REGISTRY``, if set)."""
        models = parse_registry(_read_registry_file(BUILTIN_REGISTRY), str(BUILTIN_REGISTRY))
        override = path if path is not None else (os.environ.get(REGISTRY_ENV, "").strip() or None)
        if override is not None:
            override_path = Path(override).expanduser()
            data = _read_registry_file(override_path)
            extra = parse_registry(data, str(override_path))
            if data.get("inherit_builtin", True) is False:
                models = {}
            models.update(extra)
        return cls(models)

    def _check_requirements(self) -> None:
        for entry in self.models.values():
            for req in entry.requires:
                if req not in self.models:
                    raise _fail(entry.origin, entry.id, f"requires unknown model {req!r}")
            chain = self.closure(entry.id)
            roles = [(m.id, s.role) for m in chain for s in m.files]
            seen: dict[str, str] = {}
            for model_id, role in roles:
                if role in seen:
                    raise _fail(entry.origin, entry.id, f"file role {role!r} is given by both {seen[role]!r} and "
                                                        f"{model_id!r} (roles must be unique with its requirements)")
                seen[role] = model_id

    def get(self, model_id: str) -> ModelEntry:
        """The entry of ``model_id``; RegistryError listing the known ids if there is none."""
        try:
            return self.models[model_id]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise RegistryError(f"unknown model {model_id!r}; known models: {known} "
                                "(see `hsam models list`)") from None

    def closure(self, model_id: str) -> list[ModelEntry]:
        """The model and every model it requires, requirements first."""
        order: list[ModelEntry] = []

        def visit(mid: str, stack: tuple[str, ...]) -> None:
            if mid in stack:
                entry = self.get(stack[0])
                raise _fail(entry.origin, entry.id, f"requirements form a cycle: {' -> '.join(stack + (mid,))}")
            entry = self.get(mid)
            for req in entry.requires:
                visit(req, stack + (mid,))
            if entry not in order:
                order.append(entry)

        visit(model_id, ())
        return order

    def _files(self, model_id: str) -> Iterator[tuple[ModelEntry, FileSpec]]:
        for entry in self.closure(model_id):
            for spec in entry.files:
                yield entry, spec

    # -------------------------------------------------------------------------------- locations
    @property
    def manifest(self) -> Manifest:
        return Manifest(manifest_path())

    def cache_path(self, entry: ModelEntry, spec: FileSpec) -> Path:
        """Where a downloadable file of ``entry`` lives in the cache."""
        return downloads_dir(create=False) / entry.id / spec.name

    def file_path(self, entry: ModelEntry, spec: FileSpec) -> Path | None:
        """Where the file is (or will be) on this machine; None for a package file that is not installed."""
        if spec.package:
            return locate_package_file(spec.package)
        return self.cache_path(entry, spec)

    @staticmethod
    def _key(entry: ModelEntry, spec: FileSpec) -> str:
        return f"{entry.id}/{spec.name}"

    def _reference(self, entry: ModelEntry, spec: FileSpec, record: dict) -> tuple[str | None, bool]:
        """The SHA-256 to compare with: the registry's, else the pin; and whether it is a pin."""
        if spec.sha256:
            return spec.sha256, False
        pin = record.get("pin")
        return (pin, True) if pin else (None, False)

    # -------------------------------------------------------------------------------- states
    def _quick_state(self, entry: ModelEntry, spec: FileSpec, records: dict[str, dict]) -> FileState:
        """State from file metadata and the manifest only (no hashing): fast enough for a GUI list."""
        record = records.get(self._key(entry, spec), {})
        expected, pinned = self._reference(entry, spec, record)
        path = self.file_path(entry, spec)
        state = FileState(entry.id, spec.name, spec.role, path, "missing", expected, None, pinned)
        if path is None or not path.is_file():
            state.message = self._missing_hint(entry, spec)
            return state
        stamp = _stamp(path)
        if spec.size is not None and stamp["size"] != spec.size:
            state.state = "damaged"
            state.message = f"{stamp['size']} bytes instead of {spec.size}"
            return state
        if expected is None:
            state.state = "unknown"
            state.message = "no checksum known yet (pinned on the next fetch)"
            return state
        unchanged = (record.get("sha256") == expected and record.get("path") == str(path)
                     and all(record.get(k) == v for k, v in stamp.items()))
        state.state = "ok" if unchanged else "unchecked"
        state.actual_sha256 = expected if unchanged else None
        return state

    def _hash_state(self, entry: ModelEntry, spec: FileSpec, record: dict) -> FileState:
        """State after hashing the file now; records a successful check in the manifest."""
        expected, pinned = self._reference(entry, spec, record)
        path = self.file_path(entry, spec)
        state = FileState(entry.id, spec.name, spec.role, path, "missing", expected, None, pinned)
        if path is None or not path.is_file():
            state.message = self._missing_hint(entry, spec)
            return state
        stamp = _stamp(path)
        if spec.size is not None and stamp["size"] != spec.size:
            state.state = "damaged"
            state.message = f"{stamp['size']} bytes instead of {spec.size}"
            return state
        actual = sha256_file(path)
        state.actual_sha256 = actual
        if expected is None:
            state.state = "unknown"
            state.message = "no checksum known yet (pinned on the next fetch)"
        elif actual != expected:
            state.state = "damaged"
            state.message = f"SHA-256 {actual} instead of {'the pinned ' if pinned else ''}{expected}"
            if record.get("sha256"):
                self.manifest.update(self._key(entry, spec), sha256=None, checked_at=None)
        else:
            state.state = "ok"
            self.manifest.update(self._key(entry, spec), sha256=actual, checked_at=_now(), path=str(path), **stamp)
        return state

    def _missing_hint(self, entry: ModelEntry, spec: FileSpec) -> str:
        if spec.package:
            return (f"comes from the Python package {spec.package.requirement}, which is not installed "
                    f"(or lacks the file); install it with `pip install {spec.package.requirement}`")
        return (f"not downloaded; run `hsam models fetch {entry.id}`, or offline copy the file here and run "
                f"`hsam models import {entry.id} FILE`")

    # -------------------------------------------------------------------------------- public API
    def list_models(self) -> list[ModelStatus]:
        """Every registry model with the state of its files (no hashing)."""
        records = self.manifest.load()
        return [ModelStatus(entry, [self._quick_state(e, s, records) for e, s in self._files(entry.id)])
                for entry in self.models.values()]

    def status(self, model_id: str) -> ModelStatus:
        """One model's :class:`ModelStatus` (no hashing)."""
        records = self.manifest.load()
        return ModelStatus(self.get(model_id), [self._quick_state(e, s, records) for e, s in self._files(model_id)])

    def fetch(self, model_id: str, progress: FetchProgress | None = None,
              timeout: float = DEFAULT_TIMEOUT) -> dict[str, Path]:
        """Make every file of ``model_id`` and its requirements present and checked; return ``{role: path}``.

        Downloads what is missing (resuming partial downloads), re-downloads damaged files, checks package
        files. Files without a published checksum are pinned on first download (TrustOnFirstUseWarning).
        """
        paths: dict[str, Path] = {}
        for entry, spec in self._files(model_id):
            key = self._key(entry, spec)
            record = self.manifest.get(key)
            state = self._quick_state(entry, spec, {key: record})
            if state.state == "unchecked" or state.state == "unknown" and spec.package:
                state = self._hash_state(entry, spec, record)
            if spec.package:
                paths[spec.role] = self._require_package_file(entry, spec, state)
                continue
            if state.state == "unknown":  # in the cache without any checksum: trust it now, say so
                self._pin(entry, spec, sha256_file(state.path), "existing file in the cache")
                state.state = "ok"
            if state.state == "damaged":
                warnings.warn(f"{state.path} is damaged ({state.message}); deleting it and downloading it again",
                              CacheWarning, stacklevel=2)
                unlink_quietly(state.path)
            if state.state != "ok":
                self._download(entry, spec, record, progress, timeout)
            paths[spec.role] = self.cache_path(entry, spec)
        return paths

    def import_file(self, model_id: str, file_name: str | None, src_path: str | os.PathLike) -> Path:
        """Copy a file the user already has into the cache as ``file_name`` of ``model_id``, after checking
        its size and SHA-256 (or pinning it, trust on first use). A wrong file is refused and the cache is
        left untouched. ``file_name`` may be None when the model has one file. Returns the cached path."""
        entry = self.get(model_id)
        spec = self._pick_file(entry, file_name, Path(src_path))
        src = Path(src_path).expanduser()
        if spec.package:
            raise RegistryError(f"{spec.name} of {entry.id} comes from the Python package "
                                f"{spec.package.requirement}; nothing to import, install it with "
                                f"`pip install {spec.package.requirement}`")
        if not src.is_file():
            raise ModelFileError(f"cannot import {src}: {'it is a folder' if src.is_dir() else 'no such file'}; "
                                 f"give the path of the downloaded {spec.name}")
        key = self._key(entry, spec)
        record = self.manifest.get(key)
        expected, pinned = self._reference(entry, spec, record)
        size = src.stat().st_size
        if spec.size is not None and size != spec.size:
            raise ChecksumError(f"{src} is not {spec.name} of {entry.id}: it has {size} bytes, the right file has "
                                f"{spec.size}; nothing was imported (the cache is unchanged). Get the file from "
                                f"{spec.source_text}")
        dest = self.cache_path(entry, spec)
        ensure_dir(dest.parent)
        if dest.exists() and dest.samefile(src):
            state = self._hash_state(entry, spec, record)
            if state.state == "damaged":
                raise ChecksumError(f"{src} is the cached {spec.name} and it is damaged ({state.message}); "
                                    f"delete it and import a good copy")
            if state.state == "unknown":
                self._pin(entry, spec, state.actual_sha256 or sha256_file(dest), f"import of {src}")
            return dest
        check_free_space(dest, size, what=f"a copy of {src.name}")
        tmp, actual = _copy_hashing(src, dest)
        try:
            if expected is not None and actual != expected:
                raise ChecksumError(
                    f"{src} is not {spec.name} of {entry.id}: its SHA-256 is {actual}, expected "
                    f"{'the pinned ' if pinned else ''}{expected}; the file is damaged or a different version. "
                    f"Nothing was imported (the cache is unchanged). Get the file from {spec.source_text}")
            os.replace(tmp, dest)
        except BaseException:
            unlink_quietly(tmp)
            raise
        self.manifest.update(key, sha256=actual, checked_at=_now(), added_at=_now(), origin=f"import:{src}",
                             path=str(dest), **_stamp(dest))
        if expected is None:
            self._pin(entry, spec, actual, f"import of {src}")
        return dest

    def verify(self, model_id: str) -> VerifyReport:
        """Re-hash every file of ``model_id`` and its requirements; report ok/missing/damaged/unknown."""
        report = VerifyReport(model_id)
        for entry, spec in self._files(model_id):
            report.files.append(self._hash_state(entry, spec, self.manifest.get(self._key(entry, spec))))
        return report

    def resolve(self, model_id: str) -> dict[str, Path]:
        """Local paths ``{role: path}`` of ``model_id`` and its requirements, checked (hashing only files
        changed since their last check). ModelFileError says how to get a missing file; ChecksumError how
        to replace a damaged one."""
        if model_id not in self.models:
            user = models_dir(create=False) / f"{model_id}{USER_MODEL_SUFFIX}"
            if user.is_file():
                return {"model": user}
        paths: dict[str, Path] = {}
        for entry, spec in self._files(model_id):
            key = self._key(entry, spec)
            record = self.manifest.get(key)
            state = self._quick_state(entry, spec, {key: record})
            if state.state == "unchecked":
                state = self._hash_state(entry, spec, record)
            if state.state == "missing":
                raise ModelFileError(f"model {model_id!r} is not available here: {spec.name} "
                                     f"({'of ' + entry.id if entry.id != model_id else 'its file'}) "
                                     f"{state.message}")
            if state.state == "damaged":
                fix = (f"reinstall it with `pip install --force-reinstall {spec.package.requirement}`"
                       if spec.package else f"delete it or run `hsam models fetch {entry.id}`")
                raise ChecksumError(f"checksum mismatch for {spec.name} ({state.path}): {state.message}; the "
                                    f"file is damaged, {fix}")
            if state.state == "unknown":
                self._pin(entry, spec, sha256_file(state.path), "first use")
            paths[spec.role] = state.path
        return paths

    # -------------------------------------------------------------------------------- helpers
    def _pick_file(self, entry: ModelEntry, file_name: str | None, src: Path) -> FileSpec:
        if file_name is not None:
            for spec in entry.files:
                if spec.name == file_name:
                    return spec
            raise RegistryError(f"model {entry.id} has no file {file_name!r}; its files: "
                                f"{', '.join(s.name for s in entry.files)}")
        if len(entry.files) == 1:
            return entry.files[0]
        for spec in entry.files:
            if spec.name == src.name:
                return spec
        raise RegistryError(f"model {entry.id} has several files ({', '.join(s.name for s in entry.files)}); "
                            "say which one this is")

    def _download(self, entry: ModelEntry, spec: FileSpec, record: dict, progress: FetchProgress | None,
                  timeout: float) -> Path:
        dest = self.cache_path(entry, spec)
        expected, _ = self._reference(entry, spec, record)
        callback = (lambda done, total: progress(spec.name, done, total)) if progress else None
        result = download_file(spec.download_url, dest, expected, size=spec.size, progress=callback,
                               timeout=timeout, google_drive=bool(spec.google_drive_id))
        self.manifest.update(self._key(entry, spec), sha256=result.sha256, checked_at=_now(), added_at=_now(),
                             origin=f"download:{spec.download_url}", path=str(dest), **_stamp(dest))
        if expected is None:
            self._pin(entry, spec, result.sha256, f"download from {spec.source_text}")
        return dest

    def _pin(self, entry: ModelEntry, spec: FileSpec, sha256: str, how: str) -> None:
        path = self.cache_path(entry, spec)
        self.manifest.update(self._key(entry, spec), pin=sha256, pinned_at=_now(), pinned_from=how,
                             sha256=sha256, checked_at=_now(), path=str(path),
                             **(_stamp(path) if path.is_file() else {}))
        warnings.warn(f"{spec.name} of {entry.id} has no published checksum; trusting this first copy "
                      f"({how}) and pinning its SHA-256 {sha256}: later checks compare against it. "
                      f"Compare it with a colleague's copy if you can.", TrustOnFirstUseWarning, stacklevel=3)

    def _require_package_file(self, entry: ModelEntry, spec: FileSpec, state: FileState) -> Path:
        assert spec.package is not None
        req = spec.package.requirement
        if state.state == "missing":
            installed = installed_version(spec.package.distribution)
            why = (f"version {installed} is installed but has no {spec.package.path}" if installed
                   else "it is not installed")
            raise ModelFileError(f"model {entry.id} needs the Python package {req} ({why}); install it with "
                                 f"`pip install {req}` (or `pip install hsam[litemedsam]`)")
        if state.state == "damaged":
            installed = installed_version(spec.package.distribution) or "unknown"
            raise ChecksumError(f"checksum mismatch for {spec.name} in the installed {spec.package.distribution} "
                                f"(version {installed}) at {state.path}: {state.message}; the file is damaged or "
                                f"another version, reinstall it with `pip install --force-reinstall {req}`")
        return state.path  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- packages

def locate_package_file(source: PackageSource) -> Path | None:
    """Path of a file inside an installed package, found with ``importlib.util.find_spec`` on the top-level
    module (which does not run the package's code, so no torch import). None if not installed/absent."""
    top = source.module.split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    sub = source.module.split(".")[1:]
    for base in spec.submodule_search_locations:
        candidate = Path(base, *sub, source.path)
        if candidate.is_file():
            return candidate
    return None


def installed_version(distribution: str) -> str | None:
    """Installed version of a distribution (from its metadata; nothing imported), or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------- copying

def _copy_hashing(src: Path, dest: Path) -> tuple[Path, str]:
    """Copy ``src`` to a temporary file next to ``dest``, hashing on the way; return (temp path, SHA-256)."""
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.import-", suffix=".tmp", dir=dest.parent)
    tmp = Path(name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            while chunk := inp.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        unlink_quietly(tmp)
        if is_disk_full(exc):
            raise DiskFullError(f"the disk filled up while copying {src} into the cache ({dest.parent}); nothing "
                                f"was imported. Free {format_bytes(src.stat().st_size)} or set HSAM_HOME to a "
                                "larger disk and retry") from exc
        raise ModelFileError(f"cannot copy {src} to {dest.parent}: {exc.strerror or exc}") from exc
    except BaseException:
        unlink_quietly(tmp)
        raise
    return tmp, digest.hexdigest()


# ---------------------------------------------------------------------------------------------- user models

@dataclass
class UserModel:
    """A model file of ours in ``<home>/models`` (e.g. a fine-tuned one)."""

    name: str
    path: Path
    title: str = ""
    error: str = ""

    def to_json(self) -> dict:
        return {"name": self.name, "path": str(self.path), "title": self.title, "error": self.error}


def list_user_models() -> list[UserModel]:
    """The ``*.safetensors`` model files in ``<home>/models``, with their titles (header only, no torch)."""
    from .modelfile import read_description  # header parsing only; no torch

    folder = models_dir(create=False)
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob(f"*{USER_MODEL_SUFFIX}")):
        try:
            desc = read_description(path)
            found.append(UserModel(path.stem, path, desc.title or desc.name))
        except HSAMError as exc:
            found.append(UserModel(path.stem, path, error=str(exc)))
    return found


# ---------------------------------------------------------------------------------------------- shortcuts

def load_registry(path: str | os.PathLike | None = None) -> Registry:
    """The built-in registry merged with ``path`` (default ``$HSAM_REGISTRY``)."""
    return Registry.load(path)


def list_models() -> list[ModelStatus]:
    """Every registry model with the state of its files here (no hashing)."""
    return load_registry().list_models()


def fetch(model_id: str, progress: FetchProgress | None = None, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Path]:
    """Download/check every file of ``model_id`` and its requirements; return ``{role: path}``."""
    return load_registry().fetch(model_id, progress=progress, timeout=timeout)


def import_file(model_id: str, file_name: str | None, src_path: str | os.PathLike) -> Path:
    """Copy a file the user already has into the cache after checking it; return the cached path."""
    return load_registry().import_file(model_id, file_name, src_path)


def verify(model_id: str) -> VerifyReport:
    """Re-hash the cached files of ``model_id`` and its requirements."""
    return load_registry().verify(model_id)


def resolve(model_id: str) -> dict[str, Path]:
    """Local paths ``{role: path}`` of ``model_id`` and its requirements (error if missing or damaged)."""
    return load_registry().resolve(model_id)


__all__ = [
    "BUILTIN_REGISTRY", "CacheWarning", "FileSpec", "FileState", "Manifest", "ModelEntry", "ModelStatus",
    "PackageSource", "REGISTRY_ENV", "Registry", "RegistryError", "TrustOnFirstUseWarning", "UserModel",
    "VerifyReport", "fetch", "hsam_home", "import_file", "installed_version", "list_models", "list_user_models",
    "load_registry", "locate_package_file", "parse_registry", "resolve", "verify",
]
