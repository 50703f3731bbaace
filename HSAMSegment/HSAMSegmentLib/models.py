"""The model list of the panel, "Import weights from file…", and the worker arguments of a model choice.

Everything comes from the core's registry (``hsam.weights.registry``, imported lazily; no torch): the
registry's segmentation models, the user's own model files (``<H-SAM cache>/models/*.safetensors``, e.g.
fine-tuned ones) and checkpoint files picked by the user this session.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hsam.errors import HSAMError, ModelFileError

FILE_PREFIX = "file:"


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model list."""

    id: str
    title: str
    source: str  # "registry" | "user" | "file"
    available: bool = True
    status: str = ""
    download_bytes: int | None = None
    download_size_exact: bool = True
    problem: str = ""
    checkpoint: str | None = None
    sam_checkpoint: str | None = None

    @property
    def usable(self) -> bool:
        return not self.problem

    @property
    def label(self) -> str:
        text = self.title or self.id
        if self.status and self.status not in ("verified", ""):
            text += f" [{self.status}]"
        if self.problem:
            text += " (unusable)"
        return text

    @property
    def note(self) -> str:
        """One line for the panel: where the weights are, or what will happen on first use."""
        if self.problem:
            return self.problem
        if self.source == "file":
            return f"checkpoint file {self.checkpoint}"
        if self.source == "user":
            return f"your model file {self.checkpoint}" if self.checkpoint else "your model file"
        if self.available:
            return "weights present on this computer"
        size = ""
        if self.download_bytes:
            size = f" ({'' if self.download_size_exact else 'at least '}{self.download_bytes / 2**20:.0f} MB)"
        return (f"weights will be downloaded{size} and checked on first use; offline, use "
                "'Import weights from file…'")

    def worker_args(self) -> list[str]:
        """The model part of ``python -m hsam.worker segment …``."""
        if self.source == "file":
            args = ["--checkpoint", str(self.checkpoint)]
            if self.sam_checkpoint:
                args += ["--sam-checkpoint", str(self.sam_checkpoint)]
            return args
        return ["--model", self.id]

    @property
    def needs_download(self) -> bool:
        return self.source == "registry" and not self.available


def _registry():
    from hsam.weights import registry

    return registry


def list_model_choices(extra: list[ModelChoice] | None = None) -> tuple[list[ModelChoice], str]:
    """(choices, problem): the registry's segmentation models, the user's model files and ``extra``.
    ``problem`` is a readable message when the registry cannot be read (the list is then what could be read)."""
    choices: list[ModelChoice] = []
    problem = ""
    try:
        reg = _registry()
        registry = reg.load_registry()
        for status in registry.list_models():
            entry = status.entry
            if not entry.label_set:  # base checkpoints/backbones: not segmentation models by themselves
                continue
            sizes = {s.name: s.size for e in registry.closure(entry.id) for s in e.files}
            to_get = [f for f in status.files if f.state in ("missing", "damaged")]
            download = sum(sizes.get(f.name) or 0 for f in to_get)
            # A damaged file counts as missing: fetch deletes it and downloads it again.
            choices.append(ModelChoice(id=entry.id, title=entry.title, source="registry",
                                       available=status.available and not any(f.state == "damaged"
                                                                              for f in status.files),
                                       status=entry.status, download_bytes=download or None,
                                       download_size_exact=all(sizes.get(f.name) for f in to_get)))
        for user in reg.list_user_models():
            choices.append(ModelChoice(id=user.name, title=user.title or user.name, source="user",
                                       checkpoint=str(user.path), problem=user.error))
    except HSAMError as exc:
        problem = f"The model list could not be read: {exc}"
    except ImportError as exc:
        problem = f"The H-SAM core could not be loaded ({exc}); reinstall the HSAMExtension."
    known = {c.id for c in choices}
    choices += [c for c in (extra or []) if c.id not in known]
    return choices, problem


def find_model(choices: list[ModelChoice], problem: str, model_id: str) -> ModelChoice:
    """The entry ``model_id`` of the model list, or a readable error naming the known ones."""
    found = next((c for c in choices if c.id == model_id), None)
    if found is None:
        from .errors import SegmentInputError

        known = ", ".join(c.id for c in choices) or "none"
        raise SegmentInputError(f"unknown model {model_id!r} (known: {known}). {problem}".strip())
    return found


def fetch_weights(choice: ModelChoice, progress: Callable[[str, int, int | None], None] | None = None) -> None:
    """Download (resuming) and check every file of a registry model; raises the core's readable errors."""
    if choice.needs_download:
        _registry().fetch(choice.id, progress=progress)


def import_weights_file(path: str | Path) -> tuple[ModelChoice, str]:
    """Make a weights file the user has available; return (the model choice to select, a message).

    * ``*.safetensors`` (our model format): fully checked (header, description, content checksum), then copied
      into the user's model folder, where it is listed from now on;
    * a file a registry model names (e.g. ``220_epoch_299.pth`` or ``sam_vit_b_01ec64.pth``): checked against
      the registry's size/SHA-256 and copied into the cache (offline alternative to the download);
    * any other ``.pth``: used as given for this session (``--checkpoint``); the worker checks it when it loads.
    """
    src = Path(path).expanduser()
    if not src.is_file():
        raise ModelFileError(f"cannot import {src}: {'it is a folder' if src.is_dir() else 'no such file'}")
    reg = _registry()
    if src.suffix.lower() == ".safetensors":
        from hsam.weights.modelfile import check_model_file

        description = check_model_file(src)
        from hsam.weights.cache import models_dir

        folder = models_dir()
        dest = folder / src.name
        if not (dest.exists() and dest.samefile(src)):
            n = 2
            while dest.exists():
                dest = folder / f"{src.stem}-{n}{src.suffix}"
                n += 1
            shutil.copy2(src, dest)
        title = description.title or description.name
        return (ModelChoice(id=dest.stem, title=title, source="user", checkpoint=str(dest)),
                f"Imported your model '{title}' ({dest.name}); it is now in the model list.")
    registry = reg.load_registry()
    for entry in registry.models.values():
        for spec in entry.files:
            if spec.name == src.name and not spec.package:
                cached = registry.import_file(entry.id, spec.name, src)
                users = [m for m in registry.models.values() if m.label_set and
                         entry.id in [e.id for e in registry.closure(m.id)]]
                target = users[0] if users else entry
                choice = ModelChoice(id=target.id, title=target.title, source="registry",
                                     available=registry.status(target.id).available, status=target.status)
                return choice, (f"Imported {spec.name} for {entry.id} (checked) into {cached.parent}; "
                                f"'{target.title}' can use it.")
    return (ModelChoice(id=FILE_PREFIX + str(src), title=f"{src.name} (checkpoint file)", source="file",
                        checkpoint=str(src)),
            f"{src.name} is not a file the model registry knows; it will be used as a checkpoint as is (it is "
            "checked when the worker loads it).")
