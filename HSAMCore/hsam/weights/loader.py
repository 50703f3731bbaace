"""Turn what a user names — a registry model, a model file, an official checkpoint pair — into a
ready H-SAM and its description. The one place every front end (CLI, worker, benchmark) loads models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.labels import BUILTIN_LABEL_SETS, LabelSet
from ..description import ModelDescription
from ..errors import ModelFileError
from .checkpoints import KIND_HSAM_OFFICIAL, KIND_LITEMEDSAM, KIND_SAM, detect_kind, load_torch_checkpoint
from .modelfile import read_header

SAFETENSORS_SUFFIXES = (".safetensors", ".hsam")


@dataclass
class LoadedModel:
    """A model in eval mode on the CPU, its description, and where it came from."""

    model: Any  # hsam.model.HSAM (typed loosely: importing it imports torch)
    description: ModelDescription
    source: str
    import_notes: str = ""

    @property
    def heads_trained(self) -> bool:
        return bool(self.description.provenance.get("heads_trained", True))

    def require_trained(self) -> None:
        """Refuse to segment with a base model whose class heads were never trained."""
        if not self.heads_trained:
            raise ModelFileError(
                f"{self.description.name} is a base model: its class heads are untrained, so its output would "
                "be noise. Fine-tune it on a few labelled slices first (`hsam finetune`), then segment with "
                "the fine-tuned model")


def _is_our_format(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(16)
    # safetensors starts with a little-endian header length followed by '{'
    return len(head) > 9 and head[8:9] == b"{"


def load_model_file(path: str | Path) -> LoadedModel:
    """Our safetensors model file → LoadedModel (content hash checked, architecture checked)."""
    from .modelfile import read_model_file
    from .official import build_with_weights

    path = Path(path)
    state, description = read_model_file(path)
    tensors = dict(state)
    del state  # build_with_weights replaces the tensors one by one; nothing else may keep the originals
    model = build_with_weights(description, tensors, f"model file {path.name}")
    return LoadedModel(model.eval(), description, str(path))


def load_checkpoint(checkpoint: str | Path, sam_checkpoint: str | Path | None = None,
                    labels: LabelSet | None = None) -> LoadedModel:
    """A file the user has: our model file, or an official H-SAM file (+ SAM checkpoint)."""
    from .litemedsam import build_litemedsam_base
    from .official import load_official

    path = Path(checkpoint)
    if not path.is_file():
        raise ModelFileError(f"checkpoint not found: {path}")
    if _is_our_format(path):
        read_header(path)  # clear errors for truncated / foreign safetensors before building anything
        return load_model_file(path)
    state = load_torch_checkpoint(path)
    kind = detect_kind(state)
    if kind == KIND_HSAM_OFFICIAL:
        if sam_checkpoint is None:
            raise ModelFileError(
                f"{path.name} is an official H-SAM file, which holds no image encoder: also give the SAM "
                "checkpoint it was trained from (--sam-checkpoint sam_vit_b_01ec64.pth; get it with "
                "`hsam models fetch sam-vit-b` or import a copy with `hsam models import sam-vit-b FILE`)")
        from ..data.labels import SYNAPSE_ORGANS
        model, description, report = load_official(sam_checkpoint, state, labels=labels or SYNAPSE_ORGANS)
        return LoadedModel(model, description, str(path), report.summary())
    if kind == KIND_LITEMEDSAM:
        if labels is None:
            raise ModelFileError(f"{path.name} is the LiteMedSAM base: it has no class heads; fine-tune it with "
                                 "`hsam finetune` to get a model that segments")
        model, description, report = build_litemedsam_base(labels, path)
        return LoadedModel(model, description, str(path), report.summary())
    if kind == KIND_SAM:
        raise ModelFileError(f"{path.name} is a plain SAM checkpoint: it has no H-SAM decoders. Give it as "
                             "--sam-checkpoint together with an H-SAM file")
    raise ModelFileError(f"unsupported checkpoint layout in {path.name}")  # pragma: no cover


def load_registered(model_id: str, labels: LabelSet | None = None) -> LoadedModel:
    """A model of the registry (or a user model file ``<HSAM_HOME>/models/NAME.safetensors``)."""
    from .litemedsam import build_litemedsam_base
    from .official import load_official
    from .registry import load_registry

    registry = load_registry()
    paths = registry.resolve(model_id)
    if "model" in paths:
        return load_model_file(paths["model"])
    entry = registry.get(model_id)
    entry_labels = BUILTIN_LABEL_SETS.get(entry.label_set) if entry.label_set else None
    if entry.kind == "hsam-official":
        model, description, report = load_official(paths["sam_checkpoint"], paths["checkpoint"],
                                                   labels=labels or entry_labels or BUILTIN_LABEL_SETS[
                                                       "synapse-8-organs"], name=model_id)
        description = description.with_changes(
            provenance={**description.provenance, "registry_id": model_id, "registry_status": entry.status})
        return LoadedModel(model, description, model_id, report.summary())
    if entry.kind == "litemedsam":
        chosen = labels or entry_labels
        if chosen is None:
            raise ModelFileError(f"{model_id} is a base model without class heads; fine-tune it first "
                                 "(`hsam finetune --base litemedsam-base`)")
        model, description, report = build_litemedsam_base(chosen, paths["checkpoint"])
        return LoadedModel(model, description, model_id, report.summary())
    raise ModelFileError(f"{model_id} ({entry.kind}) is not a segmentation model by itself"
                         + ("; it is required by others" if entry.kind == "sam-base" else ""))


def load_model(model: str | None = None, checkpoint: str | Path | None = None,
               sam_checkpoint: str | Path | None = None, labels: LabelSet | None = None) -> LoadedModel:
    """``--model NAME`` or ``--checkpoint FILE [--sam-checkpoint FILE]`` (exactly one of the two)."""
    if (model is None) == (checkpoint is None):
        raise ModelFileError("give either a model name (--model, see `hsam models list`) or a checkpoint file "
                             "(--checkpoint)")
    if checkpoint is not None:
        return load_checkpoint(checkpoint, sam_checkpoint, labels)
    if Path(str(model)).suffix in SAFETENSORS_SUFFIXES and Path(str(model)).is_file():
        return load_model_file(model)
    return load_registered(str(model), labels)


def save_model(path: str | Path, loaded: LoadedModel) -> Path:
    """Write ``loaded`` in our format (LoRA kept unmerged so the file can be fine-tuned further)."""
    from .modelfile import save_model_file

    state = {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}
    return save_model_file(path, state, loaded.description)
