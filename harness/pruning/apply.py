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

import contextlib
import copy
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from harness.errors import HarnessError
from harness.models.adapter import LMAdapter
from harness.models.flops import DEFAULT_CONTEXT, count_params, lm_macs_per_token
from harness.pruning.hidden import hidden_slices, hidden_width, projector_linears, projector_slices
from harness.pruning.importance import SCORE_KEYS, Importance
from harness.pruning.plan import WidthCounts, lm_shape, parse_layers, plan_layers, plan_width

# Text-config key holding per-layer widths when they differ between layers:
# a list of {"heads", "kv_heads", "intermediate"}, one per decoder layer.
WIDTHS_KEY = "pruned_widths"
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


REPEAT_MODES = ("split", "identity")  # how `repeat_layers` initialises the copies


def repeat_layers(model: nn.Module, repeats: int, mode: str = "split") -> nn.Module:
    """A new model with every decoder layer repeated `repeats` times in place (progressive stacking).

    The inverse of layer removal, used to grow a shallow teacher into a deep one
    (`harness teacher train`): copies of layer i take indices i*repeats ... i*repeats+repeats-1.
    The copies' residual-branch outputs (attention output and MLP down projection, weights and
    biases) are either divided by `repeats` ("split": every copy takes a 1/repeats share of the
    layer's residual step, so all of them matter; close to the shallow model's function, not
    equal to it), or kept on the first copy and zeroed on the others ("identity": the added
    copies start as identity maps, so the deep model computes exactly what the shallow one did).
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise HarnessError(f"repeats must be a positive integer, got {repeats!r}")
    if mode not in REPEAT_MODES:
        raise HarnessError(f"repeat mode must be split or identity, got {mode!r}")
    adapter = LMAdapter(model)
    n = len(adapter.layers)
    order = [i for i in range(n) for _ in range(repeats)]
    config = model.config.to_dict()
    config["text_config"] = _text_config(adapter, config["text_config"], order, None)
    layer0 = adapter.layers[0]
    residual_outputs = {adapter.attn_linears(layer0)[1], adapter.mlp_linears(layer0)[1]}
    scaled = {name for name, module in layer0.named_modules() if module in residual_outputs}
    prefix = _module_name(model, adapter.layers) + "."
    state = {}
    for key, tensor in model.state_dict().items():
        if not key.startswith(prefix):
            state[key] = tensor.clone()
            continue
        index, rest = key[len(prefix):].split(".", 1)
        for copy_ in range(repeats):
            factor = 1.0
            if rest.rsplit(".", 1)[0] in scaled:
                factor = 1 / repeats if mode == "split" else float(copy_ == 0)
            state[f"{prefix}{int(index) * repeats + copy_}.{rest}"] = tensor * factor if factor != 1 else tensor.clone()
    return _assemble(model, config, state)


def slice_widths(model: nn.Module, kept: Sequence[dict], kept_hidden: Sequence[int] | None = None,
                 kept_projector: Sequence[int] | None = None) -> nn.Module:
    """A new model keeping, per layer, the listed query heads, KV heads and MLP channels.

    `kept[i]` is `{"heads": [...], "kv_heads": [...], "mlp": [...]}` in the layer's current
    indices; under GQA the query heads must be exactly those of the kept KV heads.
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
    expected = [g * per_group + j for g in keep["kv_heads"] for j in range(per_group)]
    if not keep["kv_heads"] or not keep["mlp"]:
        raise HarnessError(f"layer {index} would lose every attention head or every MLP channel")
    if sorted(keep["heads"]) != sorted(expected):
        raise HarnessError(f"layer {index}: kept query heads must be exactly those of the kept KV heads")


def _rebuild(model: nn.Module, kept_layers: list[int], kept: list[dict] | None,
             hidden: tuple[list[int], list[int]] | None = None) -> nn.Module:
    adapter = LMAdapter(model)
    config = model.config.to_dict()
    config["text_config"] = _text_config(adapter, config["text_config"], kept_layers, kept, hidden)
    state = _sliced_state(model, adapter, kept_layers, kept, _hidden_cuts(model, adapter, hidden))
    return _assemble(model, config, state)


def _assemble(model: nn.Module, config: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """A new model of `config` holding `state`, with the source's dtype, device, generation config and mode."""
    from transformers import LlavaConfig

    param = next(model.parameters())
    # LlavaConfig(**d) is LlavaConfig.from_dict(d) without the log line that serialises the whole config
    pruned = empty_model(LlavaConfig(**config), param.dtype, param.device)
    pruned.load_state_dict(state, strict=True, assign=True)
    pruned.tie_weights()  # after assigning: a tied LM head must be the (new) embedding matrix
    empty = [name for name, t in [*pruned.named_parameters(), *pruned.named_buffers()] if t.is_meta]
    if empty and not param.is_meta:  # a meta source (dry runs) gives a meta model, as it should
        raise HarnessError(f"pruned model has tensors without values: {empty[:3]}")
    pruned.generation_config = copy.deepcopy(model.generation_config)
    pruned.train(model.training)
    return pruned


def build_model(config, dtype: torch.dtype, device: torch.device | str = "cpu") -> nn.Module:
    """An uninitialised `LlavaForConditionalGeneration` with the (possibly per-layer) widths of `config`."""
    from transformers import LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    with torch.device(device), no_init_weights():
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    resize_to_widths(model)
    model.tie_weights()  # skipped under no_init_weights: a tied LM head must stay the embedding matrix
    return model


def empty_model(config, dtype: torch.dtype, device: torch.device | str = "cpu") -> nn.Module:
    """`build_model` with every parameter on the meta device, to be filled by `load_state_dict(..., assign=True)`.

    Buffers are created as in `build_model`, on `device`: non-persistent ones such as rotary
    `inv_freq` are in no state dict, so their values must come from the constructors.
    Weights are not tied: call `tie_weights` after assigning.
    """
    from transformers import LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    device = torch.device(device)
    # A torch.device context intercepts every torch call; CPU is the default anyway.
    placement = device if device.type != "cpu" else contextlib.nullcontext()
    with placement, no_init_weights(), _parameters_on_meta():
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
        resize_to_widths(model)
    return model


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Move each parameter registered meanwhile to the meta device; buffers stay where they are made.

    Each parameter's construction-time storage is freed as soon as it is registered, and
    `torch.empty` touches no pages, so this costs neither time nor memory for a 7B model.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def resize_to_widths(model: nn.Module) -> None:
    """Give each layer the widths listed under `pruned_widths` (new, uninitialised linears)."""
    adapter = LMAdapter(model)
    widths = getattr(adapter.config, WIDTHS_KEY, None)
    if not widths:
        return
    if len(widths) != len(adapter.layers):
        raise HarnessError(f"config lists {len(widths)} layer widths for {len(adapter.layers)} layers")
    hd = adapter.head_dim
    for layer, w in zip(adapter.layers, widths, strict=True):
        attn, mlp = adapter.attn(layer), adapter.mlp(layer)
        q_name, *kv_names = adapter.family.attn_in
        _resize(attn, q_name, rows=w["heads"] * hd)
        for name in kv_names:
            _resize(attn, name, rows=w["kv_heads"] * hd)
        _resize(attn, adapter.family.attn_out, cols=w["heads"] * hd)
        for name in adapter.family.mlp_in:
            _resize(mlp, name, rows=w["intermediate"])
        _resize(mlp, adapter.family.mlp_out, cols=w["intermediate"])


def _resize(parent: nn.Module, name: str, rows: int | None = None, cols: int | None = None) -> None:
    old = getattr(parent, name)
    new = nn.Linear(cols or old.in_features, rows or old.out_features, bias=old.bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype)
    setattr(parent, name, new)


def _text_config(adapter: LMAdapter, text: dict, kept_layers: list[int], kept: list[dict] | None,
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


def as_mistral(text: dict) -> dict:
    """Relabel a bias-free Llama text config as Mistral without a sliding window.

    transformers 5 `LlamaConfig` refuses a hidden size that is not a multiple of the head
    count, which head pruning produces. Mistral with `sliding_window=None` is the same
    architecture (RMSNorm, rotary, SiLU gate/up/down, no biases, explicit `head_dim`) and
    honours any head count, so width-pruned Llama checkpoints load with plain transformers.
    """
    from transformers import MistralConfig

    if text.get("attention_bias") or text.get("mlp_bias"):
        raise HarnessError("width pruning of a Llama with attention/MLP biases is not supported (no bias-free twin)")
    allowed = set(MistralConfig().to_dict()) | {WIDTHS_KEY}
    mistral = {k: v for k, v in text.items() if k in allowed}
    mistral.update(model_type="mistral", sliding_window=None)
    return mistral


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _hidden_cuts(model: nn.Module, adapter: LMAdapter,
                 hidden: tuple[list[int], list[int]] | None) -> dict[str, list[tuple[int, torch.Tensor, float]]]:
    """Per parameter name, the (dim, kept indices, factor) cuts that remove hidden and projector channels.

    Norm statistics: RMSNorm and LayerNorm average over the hidden channels, so removing
    channels changes what they compute. The pruned model keeps what the original computes
    with the removed channels dead (zero in the residual stream): its mean of squares still
    divides by d_old, which the pruned model reproduces exactly by scaling the kept norm
    gains by sqrt(d_old / d_new) and the norm epsilon by d_old / d_new (`_text_config`).
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
    prefix = _module_name(model, adapter.layers) + "."
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


# --- choosing what to remove from importance scores ----------------------------------------------


def select_layers(importance: Importance, n: int) -> list[int]:
    """The n layers to remove: lowest scores, or for angular distance the most redundant contiguous block."""
    if n == 0:
        return []
    if importance.method == "layer-angular":
        distance = importance.scores["block_distance"][n - 1]
        start = int(torch.argmin(distance[: distance.numel() - n + 1]))
        return list(range(start, start + n))
    order = torch.argsort(importance.scores["layer"], stable=True)
    return sorted(order[:n].tolist())


def select_width(importance: Importance, counts: WidthCounts, per_group: int) -> list[dict]:
    """Per layer, keep the highest-scoring KV groups (with their query heads) and MLP channels."""
    attn, mlp = importance.scores["attn"], importance.scores["mlp"]
    kept = []
    for i in range(attn.shape[0]):
        groups = _top(attn[i], counts.groups_removed if i in counts.attn_layers else 0)
        channels = _top(mlp[i], counts.channels_removed if i in counts.mlp_layers else 0)
        heads = [g * per_group + j for g in groups for j in range(per_group)]
        kept.append({"heads": heads, "kv_heads": groups, "mlp": channels})
    return kept


def _top(scores: torch.Tensor, removed: int) -> list[int]:
    order = torch.argsort(scores, descending=True, stable=True)
    return sorted(order[: scores.numel() - removed].tolist())


# --- the ratio-driven entry point ----------------------------------------------------------------


def apply_pruning(model: nn.Module, importance: Importance, ratio: float, *, per_layer_ratio: bool = False,
                  attn_layers: str | Sequence[int] | None = None, mlp_layers: str | Sequence[int] | None = None,
                  round_to: int = 1, prune_hidden: bool = False,
                  context: int = DEFAULT_CONTEXT) -> tuple[nn.Module, dict]:
    """Prune `model` to `ratio` using precomputed scores: no forward or backward pass runs here.

    Returns the new model and the `pruning.json` record (ratios, sizes, MACs, scores, what was kept).
    """
    shape = lm_shape(model)
    _check_scores(importance, model, shape)
    settings = {"per_layer_ratio": per_layer_ratio, "attn_layers": attn_layers, "mlp_layers": mlp_layers,
                "round_to": round_to, "prune_hidden": prune_hidden}
    by = _prune_layers if importance.kind == "layer" else _prune_width
    pruned, outcome = by(model, importance, ratio, shape, settings)
    info = describe(model, pruned, importance, ratio, context)
    info.update(settings, **outcome)
    return pruned, info


def check_layer_settings(settings: dict) -> None:
    """Layer methods remove whole layers: width options would be silently meaningless, so refuse them."""
    defaults = {"per_layer_ratio": False, "attn_layers": None, "mlp_layers": None, "round_to": 1, "prune_hidden": False}
    if any(settings.get(k, v) != v for k, v in defaults.items()):
        raise HarnessError("per_layer_ratio, attn_layers, mlp_layers, round_to and prune_hidden (--prune-hidden) "
                           "apply to width methods only")


def _prune_layers(model, importance: Importance, ratio: float, shape, settings: dict) -> tuple[nn.Module, dict]:
    check_layer_settings(settings)
    removed = select_layers(importance, plan_layers(shape, ratio))
    return remove_layers(model, removed), {"removed_layers": removed}


def _prune_width(model, importance: Importance, ratio: float, shape, settings: dict) -> tuple[nn.Module, dict]:
    attn = parse_layers(settings["attn_layers"], shape.num_layers, "attn_layers")
    mlp = parse_layers(settings["mlp_layers"], shape.num_layers, "mlp_layers")
    counts = plan_width(shape, ratio, attn, mlp, settings["per_layer_ratio"], settings["round_to"],
                        settings["prune_hidden"])
    adapter = LMAdapter(model)
    (q, k, _), _ = adapter.attn_linears(adapter.layers[0])
    kept = select_width(importance, counts, q.out_features // k.out_features)
    kept_hidden = kept_projector = None
    if settings["prune_hidden"]:
        if not set(SCORE_KEYS["width"]) <= set(importance.scores):
            raise HarnessError("these importance scores have no hidden-channel scores (computed by an older version); "
                               "recompute them")
        kept_hidden = _top(importance.scores["hidden"], counts.hidden_removed)
        kept_projector = _top(importance.scores["projector"], counts.hidden_removed)
    pruned = slice_widths(model, kept, kept_hidden, kept_projector)
    return pruned, {
        "removed_layers": [], "kept": kept, "attn_layers": list(attn), "mlp_layers": list(mlp),
        "groups_removed_per_layer": counts.groups_removed, "channels_removed_per_layer": counts.channels_removed,
        "hidden_size_before": shape.hidden, "hidden_size": hidden_width(LMAdapter(pruned)),
        "kept_hidden": kept_hidden, "kept_projector": kept_projector,
    }


def _check_scores(importance: Importance, model: nn.Module, shape) -> None:
    """Scores must describe this model's shape (a cheap guard against mixing up models)."""
    expected = {"layer": (shape.num_layers,), "block_distance": (shape.num_layers, shape.num_layers),
                "attn": (shape.num_layers, shape.groups[0]), "mlp": (shape.num_layers, shape.channels[0]),
                "hidden": (shape.hidden,)}
    if "projector" in importance.scores:
        expected["projector"] = (projector_linears(LMAdapter(model))[1].in_features,)
    for key, tensor in importance.scores.items():
        if tuple(tensor.shape) != expected[key]:
            raise HarnessError(f"importance scores {key!r} have shape {tuple(tensor.shape)}, "
                               f"this model needs {expected[key]}: they were computed for another model")


def describe(before: nn.Module, after: nn.Module, importance: Importance, ratio: float, context: int) -> dict:
    """Sizes, MACs and provenance of one pruning run (the core of `pruning.json`)."""
    lm_before, lm_after = LMAdapter(before).lm_parameters(), LMAdapter(after).lm_parameters()
    return {
        "method": importance.method,
        "ratio_requested": ratio,
        "ratio_achieved": round(1 - lm_after / lm_before, 6),
        "lm_params_before": lm_before,
        "lm_params_after": lm_after,
        "total_params_before": count_params(before),
        "total_params_after": count_params(after),
        "macs_context": context,
        "macs_per_token_before": lm_macs_per_token(before, context),
        "macs_per_token_after": lm_macs_per_token(after, context),
        "family": LMAdapter(before).family_name,
        "calibration_ids": importance.calibration_ids,
        "importance": importance.to_lists(),
        "source_fingerprint": importance.model_fingerprint,
    }
