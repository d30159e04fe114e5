"""Width methods: score KV groups (a KV head with its query heads), MLP channels, hidden channels
and the projector's inner channels; keep the highest-scoring ones.

`harness.pruning.channels` says which weights belong to a hidden channel. Hidden and
projector scores are always computed; `prune_hidden` decides whether they are used.
- `width-taylor`: LLM-Pruner's first-order |W * dL/dW| summed over each unit's weights.
- `width-activation`: Minitron's activation norms, from forward hooks only; a hidden
  channel scores its norm outputs (every layer's norms and the final one, summed).
- `width-magnitude`: L2 norm of each unit's weights; needs no calibration data.

The paper's calibration size for Taylor importance is LLM-Pruner's 10 samples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from harness.models.adapter import LMAdapter
from harness.models.memory import FP32, LOGITS_CE, layer_activation_bytes, max_layer
from harness.pruning.channels import (
    ChannelSlice,
    hidden_prunable,
    hidden_slices,
    norm_modules,
    projector_linears,
    projector_slices,
)
from harness.pruning.methods import PruningMethod, register
from harness.pruning.methods._common import answer_tokens, hooks, model_inputs, total_answer_tokens

CALIB_SAMPLES = 10
SCORE_KEYS = ("attn", "heads", "mlp", "hidden", "projector")


# --- summing an element-wise score over each unit's weights --------------------------------------


def width_scores(adapter: LMAdapter, element: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum an element-wise score over each unit's weights: groups, MLP channels, hidden and projector channels
    (the last two where the hidden size can be pruned: `hidden_prunable`)."""
    scores = _group_scores(adapter, element)
    if hidden_prunable(adapter) is None:
        scores |= {"hidden": _slice_sums(hidden_slices(adapter), element),
                   "projector": _slice_sums(projector_slices(adapter), element)}
    return scores


def _slice_sums(slices: list[ChannelSlice], element) -> torch.Tensor:
    """Per channel, the element-wise score summed over every slice (over all dimensions but the channel's)."""
    total = 0
    with torch.no_grad():
        for s in slices:
            values = element(s.param).float()
            others = [d for d in range(values.dim()) if d != s.dim]
            total = total + (values.sum(dim=others) if others else values)  # (sum over dim=[] would sum all)
    return total.cpu()


def _group_scores(adapter: LMAdapter, element: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum an element-wise score over each KV group's and each MLP channel's weights and biases."""
    attn, heads, mlp = [], [], []
    with torch.no_grad():
        for layer in adapter.layers:
            (q, k, v), o = adapter.attn_linears(layer)
            groups = k.out_features // adapter.head_dim
            per_group = sum(_row_sums(lin, element).view(groups, -1).sum(1) for lin in (q, k, v))
            attn.append(per_group + element(o.weight).float().sum(0).view(groups, -1).sum(1))
            n_heads = q.out_features // adapter.head_dim  # a query head alone: its q rows and o columns
            heads.append(_row_sums(q, element).view(n_heads, -1).sum(1)
                         + element(o.weight).float().sum(0).view(n_heads, -1).sum(1))
            ins, out = adapter.mlp_linears(layer)
            mlp.append(sum(_row_sums(lin, element) for lin in ins) + element(out.weight).float().sum(0))
    return {"attn": torch.stack(attn).cpu(), "heads": torch.stack(heads).cpu(), "mlp": torch.stack(mlp).cpu()}


def _row_sums(lin: nn.Linear, element) -> torch.Tensor:
    rows = element(lin.weight).float().sum(1)
    return rows + element(lin.bias).float() if lin.bias is not None else rows


# --- scorers -------------------------------------------------------------------------------------


def scored_params(adapter: LMAdapter) -> list[nn.Parameter]:
    """Every parameter a width score reads: the decoder linears and each hidden or projector channel's slices."""
    params = {}
    for layer in adapter.layers:
        (attn_in, attn_out), (mlp_in, mlp_out) = adapter.attn_linears(layer), adapter.mlp_linears(layer)
        for lin in [*attn_in, attn_out, *mlp_in, mlp_out]:
            params.update((id(p), p) for p in lin.parameters())
    if hidden_prunable(adapter) is None:
        params.update((id(s.param), s.param) for s in hidden_slices(adapter) + projector_slices(adapter))
    return list(params.values())


def taylor(model, adapter, batches) -> dict[str, torch.Tensor]:
    """One backward of the answer-token loss (token-weighted over batches), then |W * grad| per group."""
    total = total_answer_tokens(batches)
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    params = scored_params(adapter)
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    try:
        for batch in batches:
            if answer_tokens(batch):
                loss = model(**model_inputs(batch, True), use_cache=False).loss
                (loss * answer_tokens(batch) / total).backward()
        return width_scores(adapter, _weight_times_grad)
    finally:
        for p in params:
            p.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _weight_times_grad(p: nn.Parameter) -> torch.Tensor:
    if p.grad is None:  # a projection the loss does not reach
        return torch.zeros_like(p, dtype=torch.float32)
    return (p.float() * p.grad.float()).abs()


def magnitude(model, adapter, batches) -> dict[str, torch.Tensor]:
    scores = width_scores(adapter, lambda p: p.float() ** 2)
    return {k: v.sqrt() for k, v in scores.items()}


def activation(model, adapter, batches) -> dict[str, torch.Tensor]:
    """Minitron: per sample, the mean over its tokens of each head's output norm / each channel's |activation|;
    then the L2 norm over samples. A KV group scores the sum of its query heads; a hidden channel
    the sum over the decoder's norms of its |norm output|; a projector channel its |activation|
    entering the projector's last linear (there a sample is one image, its tokens the image's)."""
    layers = list(adapter.layers)
    with_hidden = hidden_prunable(adapter) is None
    norms = norm_modules(adapter) if with_hidden else []
    sq_attn = [None] * len(layers)
    sq_mlp = [None] * len(layers)
    sq_norm = [None] * len(norms)
    sq_projector = [torch.zeros(projector_linears(adapter)[1].in_features, dtype=torch.float64)] if with_hidden else []
    mask = {}

    def accumulate(store, i, per_token, valid=None):  # per_token: [samples, tokens, units]
        m = (mask["valid"] if valid is None else valid)[..., None]
        per_sample = (per_token * m).sum(1) / m.sum(1).clamp(min=1)
        squares = (per_sample.double() ** 2).sum(0).cpu()
        store[i] = squares if store[i] is None else store[i] + squares

    def attn_hook(i):
        def hook(module, args):
            x = args[0]
            accumulate(sq_attn, i, x.float().reshape(*x.shape[:2], -1, adapter.head_dim).norm(dim=-1))
        return hook

    def mlp_hook(i):
        def hook(module, args):
            accumulate(sq_mlp, i, args[0].float().abs())
        return hook

    def norm_hook(i):
        def hook(module, args, output):
            accumulate(sq_norm, i, output.float().abs())
        return hook

    def projector_hook(module, args):
        x = args[0].float().abs().reshape(-1, *args[0].shape[-2:])  # [images, image tokens, channels]
        accumulate(sq_projector, 0, x, valid=x.new_ones(x.shape[:2]))

    handles = [projector_linears(adapter)[1].register_forward_pre_hook(projector_hook)] if with_hidden else []
    handles += [norm.register_forward_hook(norm_hook(i)) for i, norm in enumerate(norms)]
    for i, layer in enumerate(layers):
        handles.append(adapter.attn_linears(layer)[1].register_forward_pre_hook(attn_hook(i)))
        handles.append(adapter.mlp_linears(layer)[1].register_forward_pre_hook(mlp_hook(i)))
    with hooks(handles), torch.no_grad():
        for batch in batches:
            mask["valid"] = batch["attention_mask"].float()
            model(**model_inputs(batch), use_cache=False)
    groups = [adapter.attn_linears(layer)[0][1].out_features // adapter.head_dim for layer in layers]
    heads = [s.sqrt() for s in sq_attn]
    attn = [h.view(g, -1).sum(1) for h, g in zip(heads, groups, strict=True)]
    scores = {"attn": torch.stack(attn).float(), "heads": torch.stack(heads).float(),
              "mlp": torch.stack(sq_mlp).sqrt().float()}
    if with_hidden:
        scores |= {"hidden": torch.stack(sq_norm).sqrt().sum(0).float(), "projector": sq_projector[0].sqrt().float()}
    return scores


# --- selector ------------------------------------------------------------------------------------


def keep_highest(importance, counts, per_group: int) -> list[dict]:
    """Per layer, keep the highest-scoring attention units and MLP channels.

    Units are KV groups (with all their query heads), or with `counts.attn_unit == "query"`
    query heads: every KV group keeps its highest-scoring `per_group - groups_removed` heads.
    """
    attn, mlp = importance.scores["attn"], importance.scores["mlp"]
    kept = []
    for i in range(attn.shape[0]):
        removed = counts.groups_removed if i in counts.attn_layers else 0
        channels = top(mlp[i], counts.channels_removed if i in counts.mlp_layers else 0)
        if counts.attn_unit == "query":
            groups = list(range(attn.shape[1]))
            by_group = importance.scores["heads"][i].view(len(groups), per_group)
            heads = [g * per_group + j for g in groups for j in top(by_group[g], removed)]
        else:
            groups = top(attn[i], removed)
            heads = [g * per_group + j for g in groups for j in range(per_group)]
        kept.append({"heads": heads, "kv_heads": groups, "mlp": channels})
    return kept


def top(scores: torch.Tensor, removed: int) -> list[int]:
    """Indices of all but the `removed` lowest scores, in order (ties: the earlier unit is kept)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return sorted(order[: scores.numel() - removed].tolist())


# --- memory (beyond the weights): see harness.pruning.memory -------------------------------------


def taylor_memory(cost) -> dict[str, int]:
    """One forward + backward without checkpointing: gradients of every scored weight in the weights' dtype
    (the whole language model, embeddings and LM head included, and the projector), every layer's
    activations, logits with the loss and its gradient, and fp32 |W * grad| temporaries of the largest linear."""
    s, act = cost.shape, cost.act
    return {
        f"gradients of the scored weights ({cost.kind})": act * (s.lm_params + s.projector_params),
        "activations (all layers, no checkpointing)": cost.tokens * sum(
            layer_activation_bytes(s, layer, act=act) for layer in s.layers) + cost.tokens * (FP32 + act) * s.hidden,
        # fp32 logits need no fp32 upcast for the loss
        "logits, loss and its gradient": (act + LOGITS_CE - (FP32 if act == FP32 else 0)) * cost.logits,
        "|W * grad| fp32 temporaries": 3 * FP32 * s.largest_linear,
        "vision forward (transient)": cost.vision,
    }


def activation_memory(cost) -> dict[str, int]:
    """A no-grad forward with fp32 per-channel hooks."""
    return {"one layer's activations": cost.one_layer,
            "fp32 hook temporaries": cost.tokens * FP32 * 2 * max_layer(cost.shape, lambda layer: layer.intermediate),
            f"logits ({cost.kind})": cost.act * cost.logits, "vision forward (transient)": cost.vision}


def magnitude_memory(cost) -> dict[str, int]:
    """Weights only, and one fp32 square of the largest linear."""
    return {"fp32 temporaries": 2 * FP32 * cost.shape.largest_linear}


register(PruningMethod("width-taylor", "width", CALIB_SAMPLES, taylor, keep_highest, taylor_memory, SCORE_KEYS,
                       "LLM-Pruner's first-order Taylor importance |W * dL/dW|"))
register(PruningMethod("width-activation", "width", CALIB_SAMPLES, activation, keep_highest, activation_memory,
                       SCORE_KEYS, "Minitron's activation norms"))
register(PruningMethod("width-magnitude", "width", 0, magnitude, keep_highest, magnitude_memory, SCORE_KEYS,
                       "L2 norm of each unit's weights (no calibration data)"))
