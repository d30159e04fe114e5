"""Structural surgery: remove decoder layers, slice attention head groups, MLP channels and hidden channels.

Every pruned model is built fresh from its final config and filled from a sliced state
dict, never edited in place. That way the in-memory result is exactly what a reload
from disk gives: attention `layer_idx` values (used by the KV cache) are numbered by
construction, per-layer config lists match the layers, and nothing of the original
model is shared or mutated. The new model's parameters are created on the meta device
and the sliced tensors assigned to them (`empty_model`), so no memory is allocated,
initialised or copied for weights that would be overwritten at once; its buffers
(rotary `inv_freq`, position ids) are built by the constructors, as before.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn

from harness.errors import HarnessError
from harness.models.adapter import LMAdapter, mllm_config
from harness.models.build import WIDTHS_KEY, as_mistral, empty_model
from harness.pruning.channels import hidden_slices, hidden_width, projector_slices

# Text-config fields that hold one entry per decoder layer and must follow layer removal.
PER_LAYER_KEYS = ("layer_types", WIDTHS_KEY)


def remove_layers(model: nn.Module, removed: Sequence[int]) -> nn.Module:
    """A new model without the decoder layers at the given (current) indices."""
    n = len(LMAdapter(model).layers)
    removed = sorted(set(removed))
    if any(not 0 <= i < n for i in removed):
        raise HarnessError(f"layer indices {removed} out of range for {n} layers")
    if len(removed) >= n:
        raise HarnessError(f"cannot remove all {n} layers")
    kept_layers = [i for i in range(n) if i not in removed]
    return _rebuild(model, kept_layers, None)


def slice_widths(model: nn.Module, kept: Sequence[dict], kept_hidden: Sequence[int] | None = None,
                 kept_projector: Sequence[int] | None = None) -> nn.Module:
    """A new model keeping, per layer, the listed query heads, KV heads and MLP channels.

    `kept[i]` is `{"heads": [...], "kv_heads": [...], "mlp": [...]}` in the layer's current
    indices; under GQA every kept KV head keeps the same number of its own query heads (all of
    them when whole groups go, fewer when query heads are pruned inside groups).
    `kept_hidden` keeps those hidden channels everywhere (`_hidden_cuts`); then
    `kept_projector` lists as many of the projector's inner channels to keep.
    """
    adapter = LMAdapter(model)
    if len(kept) != len(adapter.layers):
        raise HarnessError(f"need one kept-entry per layer ({len(adapter.layers)}), got {len(kept)}")
    if adapter.family_name == "phi" and getattr(adapter.config, "qk_layernorm", False):
        raise HarnessError("width pruning of Phi models with qk_layernorm is not supported")
    for i, (layer, keep) in enumerate(zip(adapter.layers, kept, strict=True)):
        _check_keep(adapter, layer, keep, i)
    hidden = None
    if kept_hidden is not None or kept_projector is not None:
        width = hidden_width(adapter)
        hidden = (_channels(kept_hidden, width, "kept_hidden"), _channels(kept_projector, width, "kept_projector"))
        if len(hidden[0]) != len(hidden[1]):
            raise HarnessError("the projector's inner width is the hidden size: keep as many projector channels "
                               f"as hidden channels ({len(hidden[0])}), not {len(hidden[1])}")
    return _rebuild(model, list(range(len(adapter.layers))), list(kept), hidden)


def _channels(kept: Sequence[int] | None, width: int, what: str) -> list[int]:
    kept = sorted(set(int(i) for i in kept or []))
    if not kept or kept[0] < 0 or kept[-1] >= width:
        raise HarnessError(f"{what} must list at least one channel index in [0, {width})")
    return kept


def _check_keep(adapter: LMAdapter, layer: nn.Module, keep: dict, index: int) -> None:
    (q, k, _), _ = adapter.attn_linears(layer)
    per_group = q.out_features // k.out_features
    if not keep["kv_heads"] or not keep["mlp"] or not keep["heads"]:
        raise HarnessError(f"layer {index} would lose every attention head or every MLP channel")
    by_group = {g: [h for h in keep["heads"] if h // per_group == g] for g in keep["kv_heads"]}
    if sum(map(len, by_group.values())) != len(set(keep["heads"])) or len({len(v) for v in by_group.values()}) != 1:
        raise HarnessError(f"layer {index}: every kept KV head must keep the same number of its own query heads "
                           "(and no query head of a removed KV head may stay)")


def _rebuild(model: nn.Module, kept_layers: list[int], kept: list[dict] | None,
             hidden: tuple[list[int], list[int]] | None = None) -> nn.Module:
    adapter = LMAdapter(model)
    config = model.config.to_dict()
    config["text_config"] = pruned_text_config(adapter, config["text_config"], kept_layers, kept, hidden)
    state = _sliced_state(model, adapter, kept_layers, kept, _hidden_cuts(model, adapter, hidden))
    return assemble(model, config, state)


def assemble(model: nn.Module, config: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """A new model of `config` holding `state`, with the source's dtype, device, generation config and mode."""
    param = next(model.parameters())
    pruned = empty_model(mllm_config(config), param.dtype, param.device)
    pruned.load_state_dict(state, strict=True, assign=True)
    pruned.tie_weights()  # after assigning: a tied LM head must be the (new) embedding matrix
    empty = [name for name, t in [*pruned.named_parameters(), *pruned.named_buffers()] if t.is_meta]
    if empty and not param.is_meta:  # a meta source (dry runs) gives a meta model, as it should
        raise HarnessError(f"pruned model has tensors without values: {empty[:3]}")
    pruned.generation_config = copy.deepcopy(model.generation_config)
    pruned.train(model.training)
    return pruned


def pruned_text_config(adapter: LMAdapter, text: dict, kept_layers: list[int], kept: list[dict] | None,
                 hidden: tuple[list[int], list[int]] | None = None) -> dict:
    """The pruned text config: layer count, per-layer lists, and widths (uniform fields or a per-layer list).

    A smaller hidden size scales every norm epsilon (`*norm_eps`) by d_old / d_new (`_hidden_cuts`).
    """
    text = dict(text)
    if hidden is not None:
        old, new = hidden_width(adapter), len(hidden[0])
        text.update({k: v * old / new for k, v in text.items() if k.endswith("norm_eps")}, hidden_size=new)
    for key in PER_LAYER_KEYS:
        if isinstance(text.get(key), list):
            text[key] = [text[key][i] for i in kept_layers]
    text["num_hidden_layers"] = len(kept_layers)
    if kept is None:
        return text
    text["head_dim"] = adapter.head_dim
    widths = [{"heads": len(k["heads"]), "kv_heads": len(k["kv_heads"]), "intermediate": len(k["mlp"])}
              for k in (kept[i] for i in kept_layers)]
    text.pop(WIDTHS_KEY, None)
    if all(w == widths[0] for w in widths):
        text.update(num_attention_heads=widths[0]["heads"], num_key_value_heads=widths[0]["kv_heads"],
                    intermediate_size=widths[0]["intermediate"])
    else:
        text[WIDTHS_KEY] = widths
    return as_mistral(text) if text.get("model_type") == "llama" else text


def module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _hidden_cuts(model: nn.Module, adapter: LMAdapter,
                 hidden: tuple[list[int], list[int]] | None) -> dict[str, list[tuple[int, torch.Tensor, float]]]:
    """Per parameter name, the (dim, kept indices, factor) cuts that remove hidden and projector channels.

    Norm statistics: RMSNorm and LayerNorm average over the hidden channels, so removing
    channels changes what they compute. The pruned model keeps what the original computes
    with the removed channels dead (zero in the residual stream): its mean of squares still
    divides by d_old, which the pruned model reproduces exactly by scaling the kept norm
    gains by sqrt(d_old / d_new) and the norm epsilon by d_old / d_new (`pruned_text_config`).
    Re-normalising over the survivors instead would shrink every norm output by about
    sqrt(d_new / d_old) (0.84 with 30 % of the channels gone), for recovery to undo. LayerNorm
    also subtracts the mean: the pruned model equals the dead-channel original whose stream
    is centred over the kept channels, a change the pruned model cannot see (its LayerNorms
    remove any offset shared by the kept channels); tests/test_pruning.py builds that reference.
    """
    if hidden is None:
        return {}
    kept_hidden, kept_projector = (torch.as_tensor(k, dtype=torch.long) for k in hidden)
    gain = math.sqrt(hidden_width(adapter) / len(kept_hidden))
    by_param = defaultdict(list)
    for slices, index in ((hidden_slices(adapter), kept_hidden), (projector_slices(adapter), kept_projector)):
        for s in slices:
            by_param[id(s.param)].append((s.dim, index, gain if s.norm_weight else 1.0))
    return {name: by_param[id(p)] for name, p in model.named_parameters(remove_duplicate=False) if id(p) in by_param}


def _cut(tensor: torch.Tensor, cuts: list[tuple[int, torch.Tensor, float]]) -> torch.Tensor:
    for dim, index, factor in cuts:
        tensor = tensor.index_select(dim, index.to(tensor.device))
        if factor != 1.0:
            tensor = tensor * factor
    return tensor


def _sliced_state(model: nn.Module, adapter: LMAdapter, kept_layers: list[int], kept: list[dict] | None,
                  cuts: dict[str, list] | None = None) -> dict[str, torch.Tensor]:
    """The original state dict with removed layers dropped, the rest renumbered and sliced.

    Every tensor is new (sliced, or cloned when kept whole): the pruned model shares nothing.
    """
    prefix = module_name(model, adapter.layers) + "."
    new_index = {old: new for new, old in enumerate(kept_layers)}
    indices = {}  # per kept layer: {module name: (dim, kept rows or columns)}
    state = {}
    for key, original in model.state_dict().items():
        tensor = _cut(original, (cuts or {}).get(key, []))
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if int(index) not in new_index:
                continue
            if kept is not None:
                if int(index) not in indices:
                    indices[int(index)] = _slice_indices(adapter, kept[int(index)], tensor.device)
                tensor = _slice(rest, tensor, indices[int(index)])
            key = f"{prefix}{new_index[int(index)]}.{rest}"
        state[key] = tensor.clone() if tensor is original else tensor
    return state


def _slice_indices(adapter: LMAdapter, keep: dict, device) -> dict[str, tuple[int, torch.Tensor]]:
    """Per projection of one layer, the dimension to slice and the indices of kept units along it."""
    f = adapter.family
    q_name, *kv_names = f.attn_in
    heads = _head_rows(keep["heads"], adapter.head_dim, device)
    kv = _head_rows(keep["kv_heads"], adapter.head_dim, device)
    channels = torch.as_tensor(keep["mlp"], dtype=torch.long, device=device)
    return {f"{f.attn}.{q_name}": (0, heads), **{f"{f.attn}.{n}": (0, kv) for n in kv_names},
            **{f"{f.mlp}.{n}": (0, channels) for n in f.mlp_in},
            f"{f.attn}.{f.attn_out}": (1, heads), f"{f.mlp}.{f.mlp_out}": (1, channels)}


def _slice(name: str, tensor: torch.Tensor, indices: dict[str, tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Rows of input projections (weights and biases) and columns of output projections (weights only)."""
    module, _, kind = name.rpartition(".")
    if module not in indices:
        return tensor
    dim, index = indices[module]
    if dim == 1 and kind != "weight":
        return tensor
    return tensor.index_select(dim, index.to(tensor.device))


def _head_rows(heads: Sequence[int], head_dim: int, device) -> torch.Tensor:
    heads = torch.as_tensor(sorted(heads), dtype=torch.long, device=device)
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=device)).reshape(-1)
