"""The model being fine-tuned: a trainable copy of the base for a (possibly new) label set.

The base model is never modified: its weights are copied into a fresh network built under the run's seed.
Class-specific parameters (class tokens, hyper-network heads) are reused for classes of a trained base with the
same name and initialised afresh otherwise; a base whose stage 2 was never trained (the LiteMedSAM base) gets it
warm-started from its trained stage 1.
"""

from __future__ import annotations

from ..data.labels import LabelSet
from ..errors import HSAMError, ModelFileError

MODES = ("fast", "full")

# Keys of the class-specific parameters (re-initialised for a new label set).
_STAGE1_TOKENS = "stage1.mask_tokens.weight"
_STAGE2_TOKENS = "stage2.mask_tokens.weight"
_HEAD_PREFIXES = ("stage1.output_hypernetworks_mlps.", "stage2.output_hypernetworks_mlps.")
_IOU_PREFIX = "stage1.iou_prediction_head."


class FinetuneError(HSAMError):
    """Fine-tuning cannot run with these inputs (the message says why and what to do)."""


def _norm_name(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


def check_base_for_mode(base, mode: str) -> None:
    """Refuse a base that lacks what ``mode`` trains."""
    desc = base.description
    if mode == "full":
        rank = int(desc.architecture.get("lora_rank", 0) or 0)
        if desc.backbone != "sam_vit" or rank < 1:
            raise ModelFileError(
                f"full fine-tuning trains the LoRA adapters of a SAM-ViT encoder, but the base {desc.name} "
                f"({desc.backbone} backbone, LoRA rank {rank}) has none: use --mode fast (frozen encoder, both "
                "decoders trained), or a SAM-ViT H-SAM base")
    if mode not in MODES:
        raise FinetuneError(f"unknown fine-tuning mode {mode!r}: use fast or full")


def build_student(base, labelset: LabelSet, seed: int, stage2_init: str = "stage1"):
    """A trainable copy of ``base.model`` for ``labelset``: shared weights copied, class-specific ones reused
    where a class of a trained base has the same name, else initialised afresh (seeded). Returns
    ``(model, description, reused_class_names)``. ``base`` is not modified."""
    import torch

    from ..model import build_from_description
    from ..weights.official import load_strict

    base_desc = base.description
    description = base_desc.with_changes(labels=labelset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = build_from_description(description)
    fresh = student.state_dict()
    old = base.model.state_dict()
    trained = base.heads_trained
    # new class index -> base class index (background always maps to background)
    base_names = [_norm_name("background")] + [_norm_name(c.name) for c in base_desc.labels.classes]
    new_names = [_norm_name("background")] + [_norm_name(c.name) for c in labelset.classes]
    mapping = {j: base_names.index(n) for j, n in enumerate(new_names) if trained and n in base_names}
    same_classes = trained and len(base_names) == len(new_names) and all(mapping.get(j) == j
                                                                          for j in range(len(new_names)))
    state = {}
    for key, value in fresh.items():
        if key in (_STAGE1_TOKENS, _STAGE2_TOKENS):
            value = value.clone()
            for j, i in mapping.items():
                value[j] = old[key][i]
            state[key] = value
        elif key.startswith(_HEAD_PREFIXES):
            prefix = key.split(".")[0] + ".output_hypernetworks_mlps."
            j, rest = key[len(prefix):].split(".", 1)
            i = mapping.get(int(j))
            state[key] = old[f"{prefix}{i}.{rest}"].clone() if i is not None else value
        elif key.startswith(_IOU_PREFIX):
            state[key] = old[key].clone() if same_classes and old[key].shape == value.shape else value
        elif not trained and key.startswith("stage2."):
            state[key] = value  # the base's stage 2 is untrained: seeded fresh weights (see warm start below)
        else:
            if key not in old or old[key].shape != value.shape:
                raise ModelFileError(f"the base model {base_desc.name} lacks {key} (or has another shape): it does "
                                     "not fit its own description; the file is damaged")
            state[key] = old[key].clone()
    load_strict(student, state, f"base {base_desc.name}")
    if not trained and stage2_init == "stage1":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            warm_start_stage2(student)
    reused = [labelset.classes[j - 1].name for j in mapping if j > 0]
    return student, description, reused


def _expand_attention(dst, src, generator, noise: float = 0.02) -> None:
    """Copy a SAM attention of internal width w (``src``) into a wider one (``dst``, width W = 2w, same heads):
    per head, the first half of its channels are ``src``'s, the second half start small and random, so the
    attention initially computes almost ``src``'s function."""
    import torch

    heads = dst.num_heads
    w_in, w_out = src.internal_dim, dst.internal_dim
    ch_src, ch_dst = w_in // heads, w_out // heads
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            s, d = getattr(src, name), getattr(dst, name)
            weight = torch.randn(d.weight.shape, generator=generator) * noise
            bias = torch.zeros(d.bias.shape)
            for h in range(heads):
                weight[h * ch_dst:h * ch_dst + ch_src] = s.weight[h * ch_src:(h + 1) * ch_src]
                bias[h * ch_dst:h * ch_dst + ch_src] = s.bias[h * ch_src:(h + 1) * ch_src]
            d.weight.copy_(weight)
            d.bias.copy_(bias)
        s, d = src.out_proj, dst.out_proj
        weight = torch.randn(d.weight.shape, generator=generator) * noise
        for h in range(heads):
            weight[:, h * ch_dst:h * ch_dst + ch_src] = s.weight[:, h * ch_src:(h + 1) * ch_src]
        d.weight.copy_(weight)
        d.bias.copy_(s.bias)


def warm_start_stage2(model) -> None:
    """Initialise a fresh stage 2 from the trained stage 1 (H-SAM starts stage 1 from SAM's decoder; a base whose
    stage 2 was never trained, such as the LiteMedSAM base, gets the same head start for stage 2): token
    self-attention, MLPs, norms, final attention and output upscaling are copied; the full-width cross-attentions
    get stage 1's half-width ones per head plus small random extra channels. Class tokens and heads are kept."""
    import torch

    s1, s2 = model.stage1, model.stage2
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,)).item()))
    with torch.no_grad():
        for layer1, layer2 in zip(s1.transformer.layers, s2.transformer.layers):
            for name in ("self_attn", "norm1", "norm2", "norm3", "norm4", "mlp"):
                getattr(layer2, name).load_state_dict(getattr(layer1, name).state_dict())
            for name in ("cross_attn_token_to_image", "cross_attn_image_to_token"):
                a1, a2 = getattr(layer1, name), getattr(layer2, name)
                if a1.internal_dim == a2.internal_dim:
                    a2.load_state_dict(a1.state_dict())
                else:
                    _expand_attention(a2, a1, generator)
        s2.transformer.final_attn_token_to_image.load_state_dict(s1.transformer.final_attn_token_to_image.state_dict())
        s2.transformer.norm_final_attn.load_state_dict(s1.transformer.norm_final_attn.state_dict())
        if all(a.shape == b.shape for a, b in zip(s1.output_upscaling.state_dict().values(),
                                                  s2.output_upscaling.state_dict().values())):
            s2.output_upscaling.load_state_dict(s1.output_upscaling.state_dict())


def trainable_parameters(model, mode: str) -> list:
    """Parameters that learn: both decoders and the prompt encoder's no-mask embedding (fast), plus the LoRA
    adapters (full). The IoU head is not supervised and stays frozen."""
    params = []
    for name, p in model.named_parameters():
        learn = name.startswith(("stage1.", "stage2.", "prompt_encoder.no_mask_embed"))
        if name.startswith(_IOU_PREFIX) or name.startswith("stage1.iou_token"):
            learn = False
        if mode == "full" and name.startswith("image_encoder.") and ".lora_" in name:
            learn = True
        p.requires_grad_(learn)
        if learn:
            params.append(p)
    return params
