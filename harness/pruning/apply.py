"""From importance scores and a ratio to a pruned model and its `pruning.json` record.

No forward or backward pass runs here: the plan (`plan.py`) says how many layers, head
groups, MLP channels and hidden channels go, the method's selector (`methods/`) says
which, and the surgery (`surgery.py`) builds the smaller model.
"""

from __future__ import annotations

from torch import nn

from harness.errors import HarnessError
from harness.models.adapter import LMAdapter
from harness.models.flops import count_params, lm_macs_per_token
from harness.pruning.channels import hidden_prunable, hidden_width, projector_linears
from harness.pruning.methods import get_method
from harness.pruning.methods.width import top
from harness.pruning.plan import attention_layers, lm_shape, parse_layers, plan_layers, plan_width
from harness.pruning.scores import Importance
from harness.pruning.settings import PruneSettings
from harness.pruning.surgery import remove_layers, slice_widths
from harness.settings import from_mapping


def apply_pruning(model: nn.Module, importance: Importance, ratio: float, settings: PruneSettings | None = None,
                  **overrides) -> tuple[nn.Module, dict]:
    """Prune `model` to `ratio` using precomputed scores: no forward or backward pass runs here.

    `settings` (or keyword overrides of its fields) give the width options and the MAC context.
    Returns the new model and the `pruning.json` record (ratios, sizes, MACs, scores, what was kept).
    """
    settings = from_mapping(PruneSettings, overrides, "prune settings", base=settings or PruneSettings())
    settings.for_method(importance.method)
    shape = lm_shape(model)
    _check_scores(importance, model, shape)
    method = get_method(importance.method)
    by = _prune_layers if method.family == "layer" else _prune_width
    pruned, outcome = by(model, importance, method, ratio, shape, settings)
    info = describe(model, pruned, importance, ratio, settings.context)
    info.update(settings.width(), **outcome)
    if settings.calibration(importance.method):
        info["calibration"] = settings.calibration(importance.method)
    return pruned, info


def _prune_layers(model, importance: Importance, method, ratio: float, shape, settings) -> tuple[nn.Module, dict]:
    removed = method.select(importance, plan_layers(shape, ratio))
    return remove_layers(model, removed), {"removed_layers": removed}


def _prune_width(model, importance: Importance, method, ratio: float, shape, settings) -> tuple[nn.Module, dict]:
    shape = lm_shape(model, settings.attn_unit)
    attn = attention_layers(shape, settings.attn_layers)
    mlp = parse_layers(settings.mlp_layers, shape.num_layers, "mlp_layers")
    counts = plan_width(shape, ratio, attn, mlp, settings.per_layer_ratio, settings.round_to, settings.prune_hidden)
    adapter = LMAdapter(model)
    (q, k, _), _ = adapter.attn_linears(adapter.layers[0])
    if settings.attn_unit == "query" and "heads" not in importance.scores:
        raise HarnessError("these importance scores have no per-query-head scores (computed by an older version); "
                           "recompute them")
    kept = method.select(importance, counts, q.out_features // k.out_features)
    kept_hidden = kept_projector = None
    if settings.prune_hidden:
        if (why := hidden_prunable(adapter)) is not None:
            raise HarnessError(why)
        if not {"hidden", "projector"} <= set(importance.scores):
            raise HarnessError("these importance scores have no hidden-channel scores (computed by an older version); "
                               "recompute them")
        kept_hidden = top(importance.scores["hidden"], counts.hidden_removed)
        kept_projector = top(importance.scores["projector"], counts.hidden_removed)
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
                "heads": (shape.num_layers, LMAdapter(model).num_heads),
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
    layers_before, layers_after = (sum(p.numel() for p in LMAdapter(m).layers.parameters()) for m in (before, after))
    return {
        "method": importance.method,
        "ratio_requested": ratio,
        # `ratio` is the share of language-model parameters (embeddings and LM head included), as the
        # paper's tables count it; the share of decoder-layer parameters is recorded beside it, since
        # the embedding is 2 % of LLaVA-7B's LM but 21 % of SmolLM2-135M's.
        "ratio_achieved": round(1 - lm_after / lm_before, 6),
        "ratio_achieved_decoder_layers": round(1 - layers_after / layers_before, 6),
        "decoder_layer_params_before": layers_before,
        "decoder_layer_params_after": layers_after,
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
