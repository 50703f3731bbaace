"""``hsam train``: train an H-SAM on a dataset of labelled volumes (H-SAM's recipe), on one or many processes.

    hsam train DATA --out FILE [--base MODEL] [--fraction 0.1] [--global-batch 16] [--steps N | --epochs N]
               [--lr 0.0025] [--seed 2345] [--checkpoint-every N] [--resume DIR] [--precision auto|fp32|bf16]
               [--log-csv FILE]
    torchrun --nproc_per_node 4 -m hsam.cli train DATA --out FILE ...

DATA: a folder with an image folder (images/, imagesTr/) and a label folder (labels/, labelsTr/) of matching file
names, or a CSV ``image,label``. ``--global-batch`` is the batch over all processes (split evenly among them).
Nothing here imports torch at import time.
"""

from __future__ import annotations

import logging
import os


def add_train_parser(subparsers) -> None:
    from .finetune_cli import DEFAULT_BASE

    parser = subparsers.add_parser(
        "train", help="train a model on a dataset of labelled volumes (multi-GPU with torchrun)",
        description="Train an H-SAM on the slices of labelled volumes with H-SAM's recipe. DATA is a folder with "
                    "images/ (or imagesTr/) and labels/ (or labelsTr/) holding files of matching names, or a CSV "
                    "image,label. Several GPUs: torchrun --nproc_per_node N -m hsam.cli train ...")
    parser.add_argument("data", metavar="DATA")
    parser.add_argument("--out", required=True, metavar="FILE", help="model file to write (.safetensors)")
    parser.add_argument("--base", default=DEFAULT_BASE, metavar="MODEL",
                        help=f"model to start from: registry / user model name or a model file; sam-vit-b (or "
                             f"Meta's SAM .pth) = H-SAM's start: SAM + fresh LoRA, class heads, stage 2 "
                             f"(default {DEFAULT_BASE})")
    parser.add_argument("--labels", dest="label_table", metavar="TABLE",
                        help="label table naming the classes (JSON, CSV value,name[,r,g,b] or .ctbl) or a built-in "
                             "label set (synapse-8-organs); default: the base's classes, or the values found in "
                             "the label maps for a base without class heads")
    parser.add_argument("--fraction", type=float, default=0.1,
                        help="share of all slices to train on, drawn with --seed (default 0.1, H-SAM's 10 %%)")
    parser.add_argument("--global-batch", type=int, default=16,
                        help="slices per step over all processes (default 16); must divide by the process count")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--steps", type=int, help="optimiser steps")
    group.add_argument("--epochs", type=int, help="passes over the selected slices (default 300)")
    parser.add_argument("--lr", type=float, default=0.0025, help="peak learning rate (default 0.0025)")
    parser.add_argument("--warmup", type=int, default=250, help="linear warm-up steps (default 250)")
    parser.add_argument("--seed", type=int, default=2345, help="seed of slice selection, order, augmentation")
    parser.add_argument("--augment", default="full", choices=["none", "rotate", "full"])
    parser.add_argument("--encoder", default="auto", choices=["auto", "lora", "frozen"],
                        help="auto: train the LoRA adapters when the base has them; frozen: decoders only")
    parser.add_argument("--stage2-init", default="stage1", choices=["stage1", "random"],
                        help="a base whose stage 2 is untrained: warm start from stage 1, or random (the authors')")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                        help="write a checkpoint every N steps (to --checkpoint-dir)")
    parser.add_argument("--checkpoint-dir", metavar="DIR", help="checkpoint folder (default OUT.checkpoints)")
    parser.add_argument("--resume", metavar="DIR", help="continue from the checkpoint in DIR (or a checkpoint file)")
    parser.add_argument("--stop-after", type=int, metavar="STEP",
                        help="stop after this step with a checkpoint, without writing the model (time-limited jobs)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 autocast on CUDA GPUs that support it, else fp32; bf16 needs CUDA")
    parser.add_argument("--grad-checkpoint", action="store_true",
                        help="recompute encoder blocks in the backward pass (less GPU memory, slower)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (torchrun: each process its LOCAL_RANK GPU)")
    parser.add_argument("--log-csv", "--log", dest="log", metavar="FILE",
                        help="per-step CSV log (step, epoch, lr, losses, w, slices/s); under torchrun write "
                             "--log-csv (torchrun takes --log as an abbreviation of its own --log-dir)")
    parser.add_argument("--name", help="model name (default: label set name + date)")
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only")
    parser.set_defaults(func=run_train)


def _labelset_for(args):
    """(label set or None = the base's, warnings)."""
    import numpy as np
    import SimpleITK as sitk

    from .data.labels import LabelSet
    from .engine.train import find_pairs
    from .errors import HSAMError
    from .finetune_cli import base_needs_labels, labelset_from_values

    if args.label_table:
        from .data.labels import BUILTIN_LABEL_SETS

        if args.label_table in BUILTIN_LABEL_SETS:
            return BUILTIN_LABEL_SETS[args.label_table], []
        try:
            return LabelSet.from_table(args.label_table), []
        except (OSError, ValueError, KeyError) as exc:
            raise HSAMError(f"cannot read the label table {args.label_table}: {exc}") from exc
    if not (_is_sam_base(args.base) or base_needs_labels(args.base)):
        return None, []
    values: set[int] = set()
    from .engine.train_npz import npz_cases, npz_folder, read_npz_slice

    folder = npz_folder(args.data)
    if folder is not None:
        for files in npz_cases(folder).values():
            for path in files:
                values.update(np.unique(read_npz_slice(path)[1]).tolist())
    else:
        for pair in find_pairs(args.data):
            values.update(np.unique(sitk.GetArrayViewFromImage(sitk.ReadImage(pair.label))).astype(int).tolist())
    labelset = labelset_from_values(sorted(values), "labels")
    return labelset, [f"no label table given: the classes are named {', '.join(c.name for c in labelset.classes)}; "
                      "give --labels TABLE to name them"]


def _is_sam_base(base: str) -> bool:
    """Whether ``--base`` names SAM itself (registry ``sam-vit-b`` or a SAM .pth): H-SAM built from it."""
    from pathlib import Path

    from .weights.registry import load_registry

    path = Path(base)
    if path.is_file():
        from .weights.checkpoints import KIND_SAM, detect_kind, load_torch_checkpoint
        from .weights.loader import _is_our_format

        return not _is_our_format(path) and detect_kind(load_torch_checkpoint(path)) == KIND_SAM
    registry = load_registry()
    return base in registry.models and registry.get(base).kind == "sam-base"


def _load_base(base: str, labelset, seed: int):
    from pathlib import Path

    from .finetune_cli import load_base

    if not _is_sam_base(base):
        return load_base(base, labelset)
    from .weights.loader import LoadedModel
    from .weights.registry import load_registry
    from .weights.sam_base import build_sam_base

    path = Path(base) if Path(base).is_file() else load_registry().resolve(base)["sam_checkpoint"]
    model, description = build_sam_base(path, labelset, seed=seed)
    return LoadedModel(model, description, str(path))


def run_train(args) -> int:
    from .segment_cli import configure_cli_logging

    rank = int(os.environ.get("RANK", "0") or 0)
    configure_cli_logging(quiet=args.quiet or rank != 0)
    log = logging.getLogger("hsam")
    from .engine.train import TrainSettings, train

    labelset, warnings = _labelset_for(args)
    if rank == 0:
        for text in warnings:
            log.warning(text)
    base = _load_base(args.base, labelset, args.seed)
    settings = TrainSettings(global_batch=args.global_batch, steps=args.steps, epochs=args.epochs,
                             fraction=args.fraction, lr=args.lr, warmup=args.warmup, seed=args.seed,
                             augment=args.augment, encoder=args.encoder, precision=args.precision,
                             grad_checkpoint=args.grad_checkpoint, checkpoint_every=args.checkpoint_every,
                             stage2_init=args.stage2_init, device=args.device)
    result = train(args.data, base, out=args.out, labelset=labelset, settings=settings,
                   checkpoint_dir=args.checkpoint_dir, resume=args.resume, log_path=args.log,
                   stop_after=args.stop_after, name=args.name)
    if rank == 0:
        if result.path is not None:
            print(f"model {result.loaded.description.name}: {result.step} steps in {result.seconds:.0f} s")
            print(f"wrote {result.path}")
            print(f"segment with: hsam segment IN OUT --checkpoint {result.path}")
        else:
            print(f"stopped after step {result.step} of {result.steps}; checkpoint {result.checkpoint} "
                  f"(continue with --resume {result.checkpoint.parent if result.checkpoint else 'DIR'})")
    return 0
