"""Our model file: one safetensors file = the state dict's tensors + the model's description.

Metadata (safetensors ``__metadata__``, strings only)::

    hsam_format_version  "1"
    hsam_description     ModelDescription JSON (backbone, input size, labels, intensity, provenance, ...)
    hsam_content_sha256  SHA-256 over every tensor's name, dtype, shape and bytes, names in sorted order

Reading the description (``read_description``) parses only the header (8-byte little-endian length +
JSON) and needs no torch, so model lists open fast and before torch is installed. ``read_model_file``
imports torch lazily and reads each tensor straight into its own torch allocation (safetensors writes the
files). Files are written atomically: a temporary file in the same folder, then ``os.replace``; a failed
save leaves the previous file (or nothing), never half a file.

Content hash, per tensor in sorted-name order: ``len(head)`` as 8 bytes little-endian, ``head`` =
compact JSON ``[name, dtype, shape, nbytes]`` (dtype as safetensors spells it, e.g. ``"BF16"``), then the
tensor's raw little-endian bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..description import DescriptionError, ModelDescription
from ..errors import ChecksumError, DiskFullError, ModelFileError
from .cache import is_disk_full, unlink_quietly

if TYPE_CHECKING:  # pragma: no cover
    import torch

FORMAT_VERSION = "1"
META_VERSION = "hsam_format_version"
META_DESCRIPTION = "hsam_description"
META_CONTENT = "hsam_content_sha256"
MAX_HEADER_BYTES = 100 * 1024 * 1024
SUFFIX = ".safetensors"

# Bytes per element of each safetensors dtype.
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
               "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
# torch dtype attribute name → safetensors dtype.
_TORCH_DTYPES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
                 "uint16": "U16", "int16": "I16", "float16": "F16", "bfloat16": "BF16", "uint32": "U32",
                 "int32": "I32", "float32": "F32", "uint64": "U64", "int64": "I64", "float64": "F64"}

_SAFETENSORS_TO_TORCH = {code: name for name, code in _TORCH_DTYPES.items()}


class StateDict(dict):
    """A state dict read from a model file; ``source_path`` is that file (so it is never overwritten by a
    save of these same tensors)."""

    source_path: Path | None = None


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed safetensors header: string metadata, tensor entries, and where the tensor data starts."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, dict[str, Any]]
    data_start: int
    file_size: int


# ---------------------------------------------------------------------------------------------- header

def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and check a safetensors header without torch. ModelFileError for a missing, truncated or
    foreign file (e.g. a PyTorch ``.pth`` checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file {path} does not exist; check the path (`hsam models list` shows "
                             "the models installed here)")
    if not path.is_file():
        raise ModelFileError(f"{path} is a folder, not a model file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if _looks_like_pytorch(prefix):
            raise ModelFileError(
                f"{path} is not an H-SAM model file: this looks like a PyTorch checkpoint (.pth). Import it "
                "with `hsam models import` (registry files such as the official H-SAM or SAM checkpoints) or "
                "load it with the official-checkpoint loader (`hsam segment --checkpoint FILE`)")
        if len(prefix) < 8:
            raise ModelFileError(f"{path} is truncated or not a model file: it has only {size} bytes; download or "
                                 "copy it again")
        header_len = int.from_bytes(prefix, "little")
        opening = fh.read(1)
        if opening != b"{" or header_len < 2:
            raise ModelFileError(f"{path} is not a safetensors model file (no safetensors header); give an H-SAM "
                                 "model file (.safetensors) written by hsam")
        if header_len > MAX_HEADER_BYTES:
            raise ModelFileError(f"{path} is damaged or not a model file: its header claims {header_len} bytes")
        if 8 + header_len > size:
            raise ModelFileError(f"{path} is truncated: its header needs {header_len} bytes but the file has only "
                                 f"{size - 8} after the length field (an incomplete download or copy); copy or "
                                 "save it again")
        raw = opening + fh.read(header_len - 1)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} is damaged: its safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path} is damaged: its safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelFileError(f"{path} is damaged: its safetensors metadata is not a string map")
    data_start = 8 + header_len
    data_len = size - data_start
    needed = 0
    for name, entry in header.items():
        needed = max(needed, _check_entry(path, name, entry, data_len))
    if needed > data_len:
        raise ModelFileError(f"{path} is truncated: its header describes {needed} bytes of tensor data but the file "
                             f"holds only {data_len} (an incomplete download or copy); copy or save it again")
    return SafetensorsHeader(path=path, metadata=metadata, tensors=header, data_start=data_start, file_size=size)


def _looks_like_pytorch(prefix: bytes) -> bool:
    """A zip archive (torch.save since 1.6) or a raw pickle (older torch.save)."""
    return prefix.startswith(b"PK\x03\x04") or prefix[:1] == b"\x80" and prefix[1:2] in (b"\x02", b"\x03", b"\x04",
                                                                                          b"\x05")


def _check_entry(path: Path, name: str, entry: Any, data_len: int) -> int:
    """Validate one tensor entry; return the end offset of its data."""
    bad = f"{path} is damaged: tensor {name!r} has a malformed header entry"
    if not isinstance(entry, dict):
        raise ModelFileError(bad)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if (not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(offsets, list)
            or len(offsets) != 2 or not all(isinstance(x, int) and x >= 0 for x in shape + offsets)
            or offsets[0] > offsets[1]):
        raise ModelFileError(bad)
    if dtype in DTYPE_SIZES:
        numel = 1
        for dim in shape:
            numel *= dim
        if offsets[1] - offsets[0] != numel * DTYPE_SIZES[dtype]:
            raise ModelFileError(f"{bad} (shape {shape} of {dtype} does not match its {offsets[1] - offsets[0]} "
                                 "bytes)")
    return offsets[1]


def _description_from_metadata(path: Path, metadata: Mapping[str, str]) -> ModelDescription:
    version = metadata.get(META_VERSION)
    text = metadata.get(META_DESCRIPTION)
    if version is None and text is None:
        raise ModelFileError(f"{path} is a safetensors file but not an H-SAM model file: it carries no H-SAM "
                             "description; use a file written by hsam (fine-tuning or conversion writes one)")
    if version is None or not version.isdigit():
        raise ModelFileError(f"{path} is damaged: its H-SAM format version is {version!r}")
    if int(version) > int(FORMAT_VERSION):
        raise ModelFileError(f"{path} was written by a newer hsam (model file format {version}; this hsam reads "
                             f"format {FORMAT_VERSION}); update hsam (pip install -U hsam, or update the extension)")
    if not text:
        raise ModelFileError(f"{path} has no model description ({META_DESCRIPTION}); the file is damaged or "
                             "was not written by hsam")
    try:
        return ModelDescription.loads(text)
    except (DescriptionError, ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"the model description in {path} is unusable: {exc}") from None


def read_description(path: str | os.PathLike) -> ModelDescription:
    """The model description of a model file, from its header only (fast; no torch)."""
    header = read_header(path)
    return _description_from_metadata(header.path, header.metadata)


# ---------------------------------------------------------------------------------------------- content hash

def _record(name: str, dtype: str, shape: Iterable[int], nbytes: int) -> bytes:
    head = json.dumps([name, dtype, [int(d) for d in shape], int(nbytes)], separators=(",", ":")).encode("utf-8")
    return len(head).to_bytes(8, "little") + head


def _tensor_dtype_code(tensor: torch.Tensor) -> str:
    name = str(tensor.dtype).removeprefix("torch.")
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise ModelFileError(f"tensors of dtype {tensor.dtype} cannot be stored in a model file (supported: "
                             f"{', '.join(sorted(_TORCH_DTYPES))})") from None


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    import torch

    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.contiguous().view(torch.uint8).numpy()).cast("B")


def content_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Content hash of a state dict (see the module docstring); equals ``content_sha256_of_file`` of a file
    that holds these tensors."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        data = _tensor_bytes(tensor)
        digest.update(_record(name, _tensor_dtype_code(tensor), tensor.shape, data.nbytes))
        digest.update(data)
    return digest.hexdigest()


def content_sha256_of_file(path: str | os.PathLike) -> str:
    """Content hash of the tensors in a safetensors file, from its raw bytes (no torch)."""
    header = read_header(path)
    digest = hashlib.sha256()
    with open(header.path, "rb") as fh:
        for name in sorted(header.tensors):
            entry = header.tensors[name]
            begin, end = entry["data_offsets"]
            digest.update(_record(name, entry["dtype"], entry["shape"], end - begin))
            fh.seek(header.data_start + begin)
            remaining = end - begin
            while remaining:
                chunk = fh.read(min(remaining, 1 << 20))
                if not chunk:
                    raise ModelFileError(f"{header.path} is truncated inside tensor {name!r}")
                digest.update(chunk)
                remaining -= len(chunk)
    return digest.hexdigest()


def check_model_file(path: str | os.PathLike) -> ModelDescription:
    """Full check of a model file without torch: header, description and content hash. Returns the
    description; ChecksumError if the tensor data was modified."""
    header = read_header(path)
    description = _description_from_metadata(header.path, header.metadata)
    _compare_content(header.path, header.metadata, content_sha256_of_file(header.path))
    return description


def _compare_content(path: Path, metadata: Mapping[str, str], actual: str) -> None:
    expected = metadata.get(META_CONTENT)
    if not expected:
        raise ModelFileError(f"{path} has no content checksum ({META_CONTENT}); the file is damaged or was not "
                             "written by hsam")
    if actual != expected:
        raise ChecksumError(f"content checksum mismatch for {path}: the tensors differ from what was saved (the "
                            "file was modified or is damaged); do not use it: restore it from a backup or "
                            "create it again")


# ---------------------------------------------------------------------------------------------- read / write

def _read_tensors(header: SafetensorsHeader) -> tuple[dict, str]:
    """Every tensor of the file, each read straight into its own fresh torch allocation (aligned, exactly its
    size; no intermediate buffer, so loading never holds the weights twice), and the content hash computed on
    the way. Little-endian hosts (safetensors stores little-endian bytes)."""
    import sys

    import torch

    if sys.byteorder != "little":  # pragma: no cover - no big-endian host runs torch wheels
        raise ModelFileError("model files can be read on little-endian machines only")
    tensors = {}
    digest = hashlib.sha256()
    with open(header.path, "rb") as fh:
        for name in sorted(header.tensors):
            entry = header.tensors[name]
            dtype = getattr(torch, _SAFETENSORS_TO_TORCH.get(entry["dtype"], ""), None)
            if not isinstance(dtype, torch.dtype):
                raise ModelFileError(f"{header.path}: tensor {name!r} has dtype {entry['dtype']}, which this torch "
                                     f"{torch.__version__} cannot hold")
            begin, end = entry["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            fh.seek(header.data_start + begin)
            view = memoryview(raw.numpy()).cast("B")
            done = 0
            while done < len(view):
                count = fh.readinto(view[done:])
                if not count:
                    raise ModelFileError(f"{header.path} is truncated inside tensor {name!r}; copy or save it again")
                done += count
            digest.update(_record(name, entry["dtype"], entry["shape"], end - begin))
            digest.update(view)
            tensors[name] = raw.view(dtype).reshape(entry["shape"]) if end > begin else \
                torch.empty(entry["shape"], dtype=dtype)
    return tensors, digest.hexdigest()


def read_model_file(path: str | os.PathLike, verify: bool = True) -> tuple[StateDict, ModelDescription]:
    """Load a model file's tensors (on CPU) and description. ``verify`` checks the content hash
    (ChecksumError if the tensors were modified)."""
    header = read_header(path)
    description = _description_from_metadata(header.path, header.metadata)
    try:
        tensors, digest = _read_tensors(header)
    except OSError as exc:
        raise ModelFileError(f"cannot read the tensors of {header.path}: {exc}; the file is damaged, copy or save "
                             "it again") from exc
    if verify:
        _compare_content(header.path, header.metadata, digest)
    state = StateDict(tensors)
    state.source_path = header.path
    return state, description


def save_model_file(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
                    description: ModelDescription, *, source: str | os.PathLike | None = None) -> Path:
    """Write ``state_dict`` and ``description`` to ``path`` atomically (temp file + ``os.replace``).

    Tensors are moved to CPU and made contiguous; tensors sharing memory are copied. Refuses to overwrite
    the file the tensors were read from (``source``, or the ``source_path`` of a :class:`StateDict`).
    """
    import torch

    path = Path(path)
    if not isinstance(description, ModelDescription):
        raise TypeError(f"description must be a ModelDescription, got {type(description).__name__}")
    if not path.parent.is_dir():
        raise ModelFileError(f"cannot save {path}: the folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise ModelFileError(f"cannot save the model as {path}: that is a folder; give a file name ending in "
                             f"{SUFFIX}")
    for origin in (source, getattr(state_dict, "source_path", None)):
        if origin is not None and path.exists() and Path(origin).exists() and os.path.samefile(origin, path):
            raise ModelFileError(f"refusing to overwrite {path}: the weights being saved were read from this same "
                                 "file; save to a new file name (and replace the old one afterwards if you mean to)")

    tensors: dict[str, torch.Tensor] = {}
    storages: set[tuple[str, int]] = set()
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise ModelFileError(f"state dict key {name!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise ModelFileError(f"state dict entry {name!r} is a {type(value).__name__}, not a tensor")
        _tensor_dtype_code(value)
        tensor = value.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        whole = storage.nbytes() == tensor.numel() * tensor.element_size()
        if key in storages or not whole:  # shared or partial storage: store an own copy
            tensor = tensor.clone()
        storages.add(key)
        tensors[name] = tensor

    metadata = {META_VERSION: FORMAT_VERSION, META_DESCRIPTION: description.dumps(),
                META_CONTENT: content_sha256(tensors)}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        unlink_quietly(tmp)
        if isinstance(exc, OSError) and is_disk_full(exc) or "No space left" in str(exc) or "os error 28" in str(exc):
            raise DiskFullError(f"the disk is full: could not save {path}; nothing was written. Free some space "
                                "and save again") from exc
        raise
    return path
