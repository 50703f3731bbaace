"""Interpolation-guided H-SAM: the corrected slices around a slice become a dense prompt for it.

Within one volume, the corrected slices next to the slice being segmented are strong evidence. Their labels give
a soft class map (the *guidance* G, (K, H, W), summing to 1 per pixel): the one-hot labels of the nearest
corrected slice below and above, each blurred by a Gaussian (σ = 2 pixels) and blended with weights ∝ 1/d. H-SAM
already has a dense class prompt: stage 2's cross-attentions are multiplied by a prior P (B, K, g·g), normally
the softmax of stage 1's logits. The guided mode replaces P by ``(1 − mix)·P + mix·G`` (G averaged onto the
embedding grid), so class tokens gather features where the neighbours say the class is and pixels receive their
neighbours' class tokens, while stage 2 still sees the image; stage 2's logits are added to ``λ·log(G + ε)``, so
stage 2 learns a correction of the guidance from the image (stage 1 stays prompt-free), and the decision fuses
the stages as usual. No parameter is added: a model fine-tuned with guidance is still a plain H-SAM file and
runs prompt-free (``hsam segment``) as well; the guided path needs the corrected labels, so it is a separate
call (:func:`segment_guided`, the benchmark, the demo). Guided decisions keep the neighbours' class where the
guidance is confident (largest class probability ≥ ``gate``, 0.6) and take the model's elsewhere — at boundaries
and where the neighbours disagree. Three choices are made on the held-out corrected slices when fine-tuning and
recorded in the model file (:func:`choose_guided_decision`): whether the model's decision there fuses stage 1
(prompt-free, blind to the guidance) with the guided stage 2 as H-SAM does, or takes the guided stage 2 alone
(``decision``); the weight λ of ``log(G + ε)`` in that decision (``decision_weight``, from ``DECISION_WEIGHTS``
× the trained weight: a larger λ leans on the propagated labels); and the classes whose propagated labels alone
beat the model's decision (``prior_classes``), which keep the propagated class wherever it wins the guidance's
arg-max.

Training (``FinetuneSettings.guidance`` > 0): a batch is decoded with guidance with that probability; the
guidance of a training slice comes from the *other* training slices (leave-one-out) or, for a share of the
samples (``guidance_self``), from its own labels under a random smooth deformation — leave-one-out neighbours are
twice as far as the neighbours of a slice segmented later, so this keeps the model from learning to distrust
good guidance.

Measured (``Testing/benchmarks/results/fewshot_colin27.md``, Colin27 + AAL, 2.7 / 5.5 / 10.3 / 20.5 % of the
slices given): the guided model 0.619 / 0.830 / 0.896 / 0.924 mean Dice, its registration-propagated prior alone
0.653 / 0.832 / 0.896 / 0.928, the plain blend 0.540 / 0.773 / 0.882 / 0.930, ITK contour interpolation 0.408 /
0.742 / 0.859 / 0.917 — level with its prior at 10 % (above it on 4 of 7 structures), not clearly above it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

GUIDE_EPS = 1e-3
# Blur of the neighbours' one-hot labels, in pixels. Measured on Colin27/AAL (arg-max of G alone, mean Dice over
# 7 structures, every 10th / 20th / 5th / 40th slice given): σ = 2 px 0.882 / 0.773 / 0.930 / 0.540;
# σ = max(1, d/4) 0.877 / 0.773 / 0.930 / 0.538; linear interpolation of signed distance maps 0.878 / 0.754 /
# 0.936 / 0.422; ITK morphological contour interpolation 0.859 / 0.742 / 0.917 / 0.408.
GUIDE_SIGMA = 2.0
# Factors of the trained weight λ tried on the held-out corrected slices (:func:`choose_guided_decision`); a large
# λ leans on the propagated labels, λ → ∞ is the propagated labels alone.
DECISION_WEIGHTS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(C, H, W) → separable Gaussian blur with replicated borders."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-t * t / (2 * sigma * sigma))
    kernel = kernel / kernel.sum()
    y = x[:, None].float()
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), kernel[None, None, :, None])
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), kernel[None, None, None, :])
    return y[:, 0]


def nearest_labelled(labels: dict[int, np.ndarray], k: int, exclude: Sequence[int] = ()) -> list[tuple[int, float]]:
    """[(slice, weight)] of the nearest labelled slice below and above ``k`` (not ``k`` itself nor ``exclude``),
    weights ∝ 1/distance summing to 1."""
    skip = set(int(e) for e in exclude) | {int(k)}
    candidates = sorted(s for s in labels if s not in skip)
    if not candidates:
        raise ValueError("guidance needs at least one other labelled slice")
    below = [s for s in candidates if s < k]
    above = [s for s in candidates if s > k]
    chosen = ([below[-1]] if below else []) + ([above[0]] if above else [])
    weights = np.array([1.0 / abs(s - k) for s in chosen])
    return list(zip(chosen, (weights / weights.sum()).tolist()))


def neighbour_guidance(labels: dict[int, np.ndarray], k: int, num_classes: int, exclude: Sequence[int] = (),
                       sigma_per_slice: float = 0.0, min_sigma: float = GUIDE_SIGMA) -> torch.Tensor:
    """G (K, H, W) for slice ``k`` from the labelled slices ``labels`` {slice: (H, W) class indices}, except
    ``exclude`` (and ``k`` itself): the nearest labelled slice below and above, one-hot, blurred with
    σ = max(min_sigma, sigma_per_slice·distance) pixels, blended with weights ∝ 1/distance."""
    out = None
    for s, w in nearest_labelled(labels, k, exclude):
        onehot = F.one_hot(torch.from_numpy(np.asarray(labels[s], dtype=np.int64)), num_classes)
        blurred = _gaussian_blur(onehot.permute(2, 0, 1).float(), max(min_sigma, sigma_per_slice * abs(s - k)))
        out = w * blurred if out is None else out + w * blurred
    return out / out.sum(0, keepdim=True).clamp_min(1e-6)


def to_grid(guide: torch.Tensor, grid: int) -> torch.Tensor:
    """G (B, K, H, W) → (B, K, g·g) averaged over each embedding cell (the model's prior layout)."""
    return F.adaptive_avg_pool2d(guide.float(), (grid, grid)).flatten(2)


def decode_guided(model, embeddings: torch.Tensor, guide_grid: torch.Tensor | None, mix: float = 1.0):
    """H-SAM's decode with stage 2's prior mixed with the guidance: ``(1 − mix)·P + mix·G``.
    Returns (stage-1 logits, stage-2 logits); ``guide_grid`` None = the plain prompt-free decode."""
    from ..model.hsam import prior_from_stage1

    if guide_grid is None:
        out = model.decode(embeddings)
        return out.stage1_logits, out.stage2_logits
    grid = tuple(embeddings.shape[-2:])
    dense = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).to(embeddings.dtype)
    image_pe = model.prompt_encoder.get_dense_pe().to(embeddings.dtype)
    features = embeddings + dense
    s1 = model.stage1(features, image_pe)
    prior = prior_from_stage1(s1.logits, grid)
    prior = (1 - mix) * prior + mix * guide_grid.to(prior.dtype)
    s2 = model.stage2(2 * features, image_pe, prior, s1.upscaled)
    return s1.logits, s2


def fused(model, stage1_logits: torch.Tensor, stage2_logits: torch.Tensor) -> torch.Tensor:
    """The model's decision logits from both stages (its fusion rule)."""
    from ..model.hsam import HSAMOutput

    return model.fused_logits(HSAMOutput(stage1_logits=stage1_logits, stage2_logits=stage2_logits, stage1=None))


@torch.inference_mode()
def predict_guided(model, embeddings: torch.Tensor, guides: torch.Tensor, slice_size: tuple[int, int],
                   mix: float, decision_weights: Sequence[float] = (1.0,), device="cpu", dtype=None,
                   batch_size: int = 4, cancel=None, gate: float | None = None,
                   progress=None, prior_classes: Sequence[int] = (),
                   stage2_only: bool = False) -> dict[float, np.ndarray]:
    """Class indices (n, H, W) per weight λ: the model's fusion of stage 1 and ``stage 2 + λ·log(G + ε)`` (G at
    the model's input size, as in training), resized to the slice size, arg-max; with ``gate``, pixels where the
    guidance's largest class probability reaches ``gate`` keep that class, and so do pixels where the
    guidance's arg-max is one of ``prior_classes`` (classes the model did not improve on, see
    :func:`prior_classes_from_validation`). ``stage2_only``: decide on ``stage 2 + λ·log(G + ε)`` alone, without
    stage 1 (which does not see the guidance). ``guides`` (n, K, H, W) at the slice size."""
    from ..errors import CancelledError
    from .inference import is_cancelled
    from .inference import resize_images

    device = torch.device(device)
    model = model.to(device).eval()
    grid = embeddings.shape[-1]
    size = int(model.image_size)
    out: dict[float, list] = {float(w): [] for w in decision_weights}
    for b in range(0, len(embeddings), batch_size):
        if is_cancelled(cancel):
            raise CancelledError("cancelled: nothing was written")
        emb = embeddings[b:b + batch_size].to(device)
        guide = guides[b:b + batch_size].float()
        log_guide = torch.log(resize_images(guide, (size, size)) + GUIDE_EPS).to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            s1, s2 = decode_guided(model, emb, to_grid(guide, grid).to(device), mix)
        s1, s2 = s1.float(), s2.float()
        confident = None
        if gate is not None or len(prior_classes):  # where the neighbours agree this much, their class is kept
            best = guide.max(1)
            keep = best.values >= (gate if gate is not None else math.inf)
            if len(prior_classes):
                keep |= torch.isin(best.indices, torch.as_tensor(list(prior_classes), dtype=best.indices.dtype))
            confident = (keep, best.indices.to(torch.uint8))
        for w in out:
            decision = s2 + w * log_guide if stage2_only else fused(model, s1, s2 + w * log_guide)
            logits = resize_images(decision, tuple(slice_size))
            pred = logits.argmax(1).to(torch.uint8).cpu()
            if confident is not None:
                pred = torch.where(confident[0], confident[1], pred)
            out[w].append(pred.numpy())
        if progress:
            progress(min(len(embeddings), b + batch_size), len(embeddings))
    return {w: np.concatenate(v) for w, v in out.items()}


def guidance_info(description) -> dict:
    """How a model's guided mode decides: ``mix``, ``decision_weight``, ``gate`` and whether it was ``trained``
    with guidance (from its fine-tuning record; defaults for other models)."""
    info = dict(description.provenance.get("finetune", {}).get("guidance") or {})
    return {"mix": float(info.get("mix", 1.0)), "decision_weight": float(info.get("decision_weight", 1.0)),
            "gate": info.get("gate", 0.6), "trained": bool(info.get("trained", False)),
            "prior_classes": [int(c) for c in info.get("prior_classes") or ()],
            "decision": str(info.get("decision", "fused"))}


def prior_classes_from_validation(guided_dice: Sequence[float], prior_dice: Sequence[float]) -> list[int]:
    """Class indices (1..K−1) whose Dice on the held-out corrected slices was higher with the propagated labels
    alone than with the model's guided decision (``*_dice`` per class 1..K−1, NaN where absent): for these the
    guided mode keeps the propagated class. Held-out slices lie twice as far from their neighbours as the slices
    segmented later, which favours the model there (the propagated labels are better closer by), so a class
    handed to the prior here would most likely not have been better served by the model."""
    return [c + 1 for c, (g, p) in enumerate(zip(guided_dice, prior_dice))
            if not (math.isnan(g) or math.isnan(p)) and p > g]


@dataclass
class GuidedDecision:
    """How the guided mode decides, chosen on the held-out corrected slices: ``decision`` "fused" (H-SAM's fusion
    of stage 1 and the guided stage 2) or "stage2" (the guided stage 2 alone), the decision ``weight`` λ, their
    Dice per class 1..K−1 there (``dice``), and the classes that keep the propagated labels (``prior_classes``)."""

    decision: str
    weight: float
    dice: list[float]
    prior_classes: list[int]


def _mean_present(values: Sequence[float]) -> float:
    present = [v for v in values if not math.isnan(v)]
    return sum(present) / len(present) if present else 0.0


def choose_guided_decision(fused_dice: dict[float, Sequence[float]], stage2_dice: dict[float, Sequence[float]],
                           prior_dice: Sequence[float] | None, trained_weight: float) -> GuidedDecision:
    """The decision (fused or stage 2 alone) and weight λ with the highest mean Dice on the held-out corrected
    slices (``*_dice`` {λ: Dice per class 1..K−1, NaN where absent}; ties, equal to 4 decimals, go to the fused decision,
    then to the λ closest to the ``trained_weight``), and the classes whose propagated labels alone
    (``prior_dice``) beat it there (:func:`prior_classes_from_validation`).

    Held-out slices lie twice as far from their neighbours as the slices segmented later, and the propagated
    labels are better closer by, so the held-out slices favour the model: a λ chosen there errs towards the model
    (small λ), not towards the propagated labels."""
    if not fused_dice:
        raise ValueError("no guided validation scores to choose from")

    def rank(item):
        (decision, weight), dice = item
        closeness = -abs(math.log(weight / trained_weight)) if weight > 0 and trained_weight > 0 else 0.0
        return round(_mean_present(dice), 4), decision == "fused", closeness

    candidates = {("fused", float(w)): list(d) for w, d in fused_dice.items()}
    candidates.update({("stage2", float(w)): list(d) for w, d in stage2_dice.items()})
    (decision, weight), dice = max(candidates.items(), key=rank)
    prior = prior_classes_from_validation(dice, prior_dice) if prior_dice is not None else []
    return GuidedDecision(decision=decision, weight=weight, dice=dice, prior_classes=prior)


def within_reach(corrected: Sequence[int], targets: Sequence[int]) -> list[bool]:
    """For each target slice, whether guidance applies: it lies no farther from the nearest corrected slice than the
    largest gap between consecutive corrected slices (at least 1) — between and just beyond the corrected ones,
    not far outside them, where the neighbours say nothing."""
    ks = sorted(set(int(k) for k in corrected))
    gaps = [b - a for a, b in zip(ks, ks[1:])]
    reach = max(gaps + [1])
    return [min(abs(int(t) - k) for k in ks) <= reach for t in targets]


def guidance_for(corrected: dict[int, np.ndarray], targets: Sequence[int], num_classes: int,
                 images: dict[int, np.ndarray] | None = None, cancel=None) -> torch.Tensor:
    """G (n, K, H, W) of the slices ``targets``: registration-propagated (:mod:`hsam.engine.propagation`) when the
    slices' ``images`` {slice: (H, W) in [0, 1]} are given, else the plain blend of the neighbours."""
    from .inference import is_cancelled

    guides = []
    for k in targets:
        if is_cancelled(cancel):
            from ..errors import CancelledError

            raise CancelledError("cancelled while propagating the corrected slices")
        if images is not None:
            from .propagation import registered_guidance

            guides.append(registered_guidance(images, corrected, int(k), num_classes))
        else:
            guides.append(neighbour_guidance(corrected, int(k), num_classes))
    return torch.stack(guides)


def guided_decode(loaded, corrected: dict[int, np.ndarray], targets: Sequence[int], embeddings: torch.Tensor,
                  dtype=None, cancel=None, device="cpu", progress=None,
                  images: dict[int, np.ndarray] | None = None,
                  guides: torch.Tensor | None = None) -> tuple[np.ndarray, dict]:
    """Segment the slices ``targets`` (embeddings in the same order) with a fine-tuned model guided by
    ``corrected`` {slice: (H, W) class indices in model orientation} (slice numbers on one axis, e.g. k); with
    ``images`` {slice: (H, W) normalised image, for the corrected and target slices} the guidance is propagated by
    registration; ``guides`` (n, K, H, W): the guidance, already computed (:func:`guidance_for`).
    Returns class indices (n, H, W) and what was used."""
    info = guidance_info(loaded.description)
    first = next(iter(corrected.values()))
    if guides is None:
        info["propagation"] = "registration" if images is not None else "blend"
        guides = guidance_for(corrected, targets, loaded.description.num_classes, images, cancel)
    preds = predict_guided(loaded.model, embeddings, guides, tuple(first.shape), info["mix"],
                           (info["decision_weight"],), device=device, dtype=dtype, cancel=cancel, gate=info["gate"],
                           progress=progress, prior_classes=info["prior_classes"],
                           stage2_only=info["decision"] == "stage2")
    return preds[info["decision_weight"]], info


def segment_guided(image, labels, slices, loaded, *, device: str = "auto", precision: str = "auto",
                   cache: bool = True, progress=None, cancel=None, propagate: bool = True):
    """Segment a volume guided by its corrected slices: the k planes ``slices`` of ``labels`` (a ``(k, j, i)``
    array or label image on ``image``'s grid) keep their labels; the planes within reach of them
    (:func:`within_reach`) are segmented guided (``propagate``: with registration-propagated guidance); the others
    prompt-free. ``progress(done, total, stage)`` reports "embed" then "segment". Returns a SimpleITK uint8 label
    image on ``image``'s grid."""
    from ..data.orientation import labels_to_image, reorientation_for
    from .device import resolve_device
    from .finetune import autocast_dtype, decode_embeddings, embed_slices
    from .finetune_data import prepare_corrected_slices

    import logging

    desc = loaded.description
    loaded.require_trained()
    info = guidance_info(desc)
    if not info["trained"]:
        logging.getLogger("hsam").warning("%s was not fine-tuned with guidance: the guided mode may be poor; "
                                          "fine-tune with guidance > 0", desc.name)
    data = prepare_corrected_slices(image, labels, slices, desc, desc.labels)
    reorient = reorientation_for(image, desc.orientation)
    dev = resolve_device(device)
    dtype = autocast_dtype(dev, precision)
    depth = reorient.input_shape[0]
    targets = [k for k in range(depth) if k not in set(data.k_indices)]
    embeddings = embed_slices(loaded.model, image, desc, targets, device=dev, dtype=dtype, cache=cache,
                              progress=(lambda d, n: progress(d, n, "embed")) if progress else None, cancel=cancel)
    reach = within_reach(data.k_indices, targets)
    corrected = dict(zip(data.k_indices, data.targets))
    size = tuple(reorient.model_shape[1:])
    out = np.zeros(reorient.model_shape, dtype=np.uint8)
    for k, m, t in zip(data.k_indices, data.model_indices, data.targets):
        out[m] = t
    guided = [i for i, r in enumerate(reach) if r]
    plain = [i for i, r in enumerate(reach) if not r]
    done = 0

    def step(d, n):
        if progress:
            progress(done + d, len(targets), "segment")

    if guided:
        from .finetune_data import slice_inputs

        needed = sorted(set(data.k_indices) | {targets[i] for i in guided})
        normalised = slice_inputs(image, desc, needed, reorient)[0] if propagate else None
        images = dict(zip(needed, normalised)) if propagate else None
        idx, _ = guided_decode(loaded, corrected, [targets[i] for i in guided], embeddings[guided], dtype=dtype,
                               cancel=cancel, device=dev, progress=step, images=images)
        for i, sl in zip(guided, idx):
            out[reorient.model_slice_index(targets[i])] = sl
        done = len(guided)
    if plain:
        idx = decode_embeddings(loaded.model, embeddings[plain], size, device=dev, dtype=dtype, cancel=cancel,
                                progress=step)
        for i, sl in zip(plain, idx):
            out[reorient.model_slice_index(targets[i])] = sl
    lut = np.asarray(desc.labels.index_to_value_lut(), dtype=np.uint8)
    return labels_to_image(lut[reorient.to_input(out)], image)


def segment_guided_file(input_path, output_path, loaded, guide_labels, guide_slices, *, device: str = "auto",
                        progress=None, cancel=None):
    """:func:`segment_guided` from files to a file: IN (any volume ``read_image`` reads), the corrected k planes
    ``guide_slices`` (``"0,10,20-25"``) of the label map ``guide_labels`` (on IN's grid) → OUT (``.seg.nrrd`` or a
    label map, written atomically). Returns the written path."""
    from ..data.segfile import read_labels, write_segmentation
    from ..data.volume import read_image
    from ..errors import InputVolumeError
    from .finetune_data import parse_slice_spec

    if not guide_slices:
        raise InputVolumeError("--guide-labels needs --guide-slices (the corrected slices, e.g. 0,10,20-25)")
    image = read_image(input_path)
    labels = read_labels(guide_labels, image, None)
    slices = parse_slice_spec(guide_slices)
    result = segment_guided(image, labels, slices, loaded, device=device, progress=progress, cancel=cancel)
    return write_segmentation(result, loaded.description.labels, output_path,
                              extra_metadata={"HSAM_Model": loaded.description.name,
                                              "HSAM_GuidedBySlices": ",".join(str(k) for k in slices)})
