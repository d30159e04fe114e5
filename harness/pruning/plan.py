"""From a requested ratio to how many layers, head groups, MLP channels and hidden channels to remove.

`ratio` is the share of language-model parameters removed (embeddings and LM head
included), as the paper's tables count it. Plans depend only on the model's shape,
never on importance scores, so an impossible request is refused before any forward
pass runs or any file is written.

Parameter counts are exact for any combination: every LM parameter belongs to a KV
group or an MLP channel (`UnitCost`, a weight part that scales with the hidden width
plus a bias part that does not) or is one of `hidden_params` per hidden channel
(embeddings, LM head, norms, residual-writing biases).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from harness.errors import HarnessError
from harness.models.adapter import LMAdapter

TOLERANCE = 0.01  # how far the achieved ratio may land from the requested one


@dataclass(frozen=True)
class UnitCost:
    """LM parameters removed with one unit (a KV group or an MLP channel) at hidden width h: `per_hidden * h + fixed`."""

    per_hidden: int  # weight entries per hidden channel: its rows of the input projections, columns of the output one
    fixed: int  # its biases in the input projections

    def at(self, hidden: int) -> int:
        return self.per_hidden * hidden + self.fixed


@dataclass(frozen=True)
class LMShape:
    """What planning needs to know about the language model.

    A "group" is one KV head with the query heads that share it (one query head without
    GQA): removing whole groups keeps `num_attention_heads / num_key_value_heads` valid.
    """

    num_layers: int
    lm_params: int
    layer_params: tuple[int, ...]
    groups: tuple[int, ...]  # attention units per layer: KV groups, or query heads per KV group
    channels: tuple[int, ...]  # MLP intermediate channels per layer
    group: UnitCost  # one attention unit: its q/k/v rows (and biases), o columns
    channel: UnitCost  # one MLP channel: gate/up rows (and biases), down column
    hidden: int  # hidden width
    hidden_params: float  # LM parameters per hidden channel outside the units
    attn_unit: str = "group"  # what one attention unit is (`lm_shape`)
    heads_fixed: str | None = None  # why no attention head may be removed (`Family.heads_fixed`)

    def params(self, groups: int, channels: int, hidden: int) -> float:
        """LM parameters with `groups` KV groups and `channels` MLP channels in all (summed over layers)."""
        return groups * self.group.at(hidden) + channels * self.channel.at(hidden) + hidden * self.hidden_params

    @property
    def uniform(self) -> bool:
        return len(set(self.groups)) == 1 and len(set(self.channels)) == 1


@dataclass(frozen=True)
class WidthCounts:
    """Groups and channels removed in each layer of the attention and MLP ranges, and hidden channels removed."""

    groups_removed: int
    channels_removed: int
    attn_layers: tuple[int, ...]
    mlp_layers: tuple[int, ...]
    ratio: float  # predicted share of LM parameters removed
    hidden_removed: int = 0
    attn_unit: str = "group"  # what `groups_removed` counts (`lm_shape`)


ATTN_UNITS = ("group", "query")


def lm_shape(model: nn.Module, attn_unit: str = "group") -> LMShape:
    """The model's shape for planning; `attn_unit` says what one attention unit is.

    "group": a KV head with its query heads (removing one keeps every remaining group whole).
    "query": one query head in every KV group (Minitron-style: the KV heads all stay, each keeps
    the same number of query heads, so the head count stays a multiple of the KV heads).
    """
    adapter = LMAdapter(model)
    layers = list(adapter.layers)
    first = layers[0]
    kv = tuple(adapter.attn_linears(layer)[0][1].out_features // adapter.head_dim for layer in layers)
    if attn_unit == "group":
        groups = kv
        group = _unit_cost(*adapter.attn_linears(first), groups[0])
    elif attn_unit == "query":
        (q, _, _), o = adapter.attn_linears(first)
        groups = tuple(adapter.attn_linears(layer)[0][0].out_features // adapter.head_dim // k
                       for layer, k in zip(layers, kv, strict=True))
        if groups[0] < 2:
            raise HarnessError("attn_unit query removes query heads inside KV groups: this model has one query "
                               "head per KV head (no grouped-query attention); use attn_unit group")
        per_unit = kv[0] * adapter.head_dim  # one query head in each KV group: its q rows and o columns
        group = UnitCost(per_hidden=2 * per_unit, fixed=per_unit if q.bias is not None else 0)
    else:
        raise HarnessError(f"attn_unit must be one of {', '.join(ATTN_UNITS)}, got {attn_unit!r}")
    channels = tuple(adapter.mlp_linears(layer)[1].in_features for layer in layers)
    channel = _unit_cost(*adapter.mlp_linears(first), channels[0])
    hidden = adapter.decoder.get_input_embeddings().embedding_dim
    lm_params = adapter.lm_parameters()
    in_units = sum(groups) * group.at(hidden) + sum(channels) * channel.at(hidden)
    return LMShape(
        num_layers=len(layers),
        lm_params=lm_params,
        layer_params=tuple(sum(p.numel() for p in layer.parameters()) for layer in layers),
        groups=groups,
        channels=channels,
        group=group,
        channel=channel,
        hidden=hidden,
        hidden_params=(lm_params - in_units) / hidden,
        attn_unit=attn_unit,
        heads_fixed=adapter.family.heads_fixed,
    )


def _unit_cost(ins: list[nn.Linear], out: nn.Linear, units: int) -> UnitCost:
    """One unit's rows of every input projection (with their biases) and its columns of the output one."""
    rows = [lin.out_features // units for lin in ins]
    return UnitCost(per_hidden=sum(rows) + out.in_features // units,
                    fixed=sum(r for r, lin in zip(rows, ins, strict=True) if lin.bias is not None))


def check_ratio(ratio: float) -> None:
    if not 0 < ratio < 1:
        raise HarnessError(f"ratio must be in (0, 1), got {ratio}")


def parse_layers(spec: str | Sequence[int] | None, num_layers: int, what: str) -> tuple[int, ...]:
    """`"3:21"` (end exclusive, either side may be empty), a list of indices, or None for all layers."""
    if spec is None:
        return tuple(range(num_layers))
    if isinstance(spec, str):
        start, sep, end = spec.partition(":")
        try:
            if not sep:
                raise ValueError
            first = int(start) if start.strip() else 0
            stop = int(end) if end.strip() else num_layers
        except ValueError:
            raise HarnessError(f"{what} must look like START:END (end exclusive), got {spec!r}") from None
        if not 0 <= first < stop <= num_layers:
            raise HarnessError(f"{what} {spec!r} is not a non-empty range within the model's {num_layers} layers")
        return tuple(range(first, stop))
    layers = tuple(sorted(set(int(i) for i in spec)))
    if not layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise HarnessError(f"{what} {list(spec)} must be non-empty indices within the model's {num_layers} layers")
    return layers


def attention_layers(shape: LMShape, spec: str | Sequence[int] | None) -> tuple[int, ...]:
    """The layers whose attention heads width pruning may remove: the `attn_layers` setting (`parse_layers`),
    or none in a family whose head count is fixed (an explicit range there is refused with the reason)."""
    if shape.heads_fixed is None:
        return parse_layers(spec, shape.num_layers, "attn_layers")
    if spec is not None and len(spec):
        raise HarnessError(f"attn_layers {spec!r}: {shape.heads_fixed}")
    return ()


def plan_layers(shape: LMShape, ratio: float) -> int:
    """The number of whole layers whose removal lands closest to `ratio`.

    Layers are indivisible, so the +/-0.01 rule of width pruning cannot hold for them
    (the paper itself removes 5/10/15/21 of 32 layers for "15/30/45/60%"); the achieved
    share is reported in pruning.json. Removing no layer or every layer is refused.
    """
    check_ratio(ratio)
    per_layer = sum(shape.layer_params) / shape.num_layers
    share = per_layer / shape.lm_params
    n = round(ratio / share)
    if n >= shape.num_layers:
        raise HarnessError(f"ratio {ratio} would remove every layer ({shape.num_layers} layers of {share:.3f} each)")
    if n == 0:
        raise HarnessError(f"ratio {ratio} is below half a layer ({share:.3f} of LM parameters each): nothing to remove")
    return n


def plan_width(shape: LMShape, ratio: float, attn_layers: tuple[int, ...], mlp_layers: tuple[int, ...],
               per_layer_ratio: bool = False, round_to: int = 1, prune_hidden: bool = False) -> WidthCounts:
    """Groups and channels to remove in every layer of the ranges, and hidden channels with `prune_hidden`.

    Default mode: `ratio` is the share of LM parameters; among the counts that land within
    tolerance, the most balanced wins: the fractions of head groups, of MLP channels and
    (with `prune_hidden`) of hidden channels removed are as equal as the granularity allows.
    Per-layer mode (LLM-Pruner's block-wise setting): `ratio` is the fraction of heads and
    of channels removed in each layer of the ranges, and of hidden channels; the LM share is
    whatever follows. `round_to` keeps the MLP widths and the hidden width multiples of N.
    """
    check_ratio(ratio)
    if not shape.uniform:
        raise HarnessError("width pruning needs uniform layer widths; this model's widths were already pruned unevenly")
    if round_to < 1:
        raise HarnessError(f"round_to must be >= 1, got {round_to}")
    groups, channels, hidden = shape.groups[0], shape.channels[0], shape.hidden
    n_attn, n_mlp = len(attn_layers), len(mlp_layers)
    if per_layer_ratio:
        g, c = round(ratio * groups), _nearest_counts(ratio * channels, channels, round_to)[0]
        h = _nearest_counts(ratio * hidden, hidden, round_to)[0] if prune_hidden else 0
    else:
        g, c, h = _search_counts(shape, ratio, n_attn, n_mlp, round_to, prune_hidden)
    if g >= groups and attn_layers:
        raise HarnessError(f"ratio {ratio} would remove every attention head of a layer ({groups} head groups)")
    predicted = _removed_share(shape, g * n_attn, c * n_mlp, h)
    if not per_layer_ratio and abs(predicted - ratio) > TOLERANCE:
        most_hidden = _nearest_counts(hidden, hidden, round_to)[0] if prune_hidden else 0
        most = _removed_share(shape, (groups - 1) * n_attn, _nearest_counts(channels, channels, round_to)[0] * n_mlp,
                              most_hidden)
        if ratio > most:
            what = "every head or channel of a layer" + (" or every hidden channel" if prune_hidden else "")
            limits = "these layer ranges" + (f" and round_to {round_to}" if round_to > 1 else "")
            raise HarnessError(f"ratio {ratio} would remove {what}: at most {most:.3f} "
                               f"of LM parameters can be removed with {limits}")
        attn_unit, mlp_unit = (n * cost.at(hidden) / shape.lm_params
                               for n, cost in ((n_attn, shape.group), (n_mlp, shape.channel)))
        raise HarnessError(f"the closest achievable ratio is {predicted:.4f}, more than {TOLERANCE} from {ratio}: "
                           f"one head group removes {attn_unit:.4f} and one channel {mlp_unit:.5f} of LM parameters")
    return WidthCounts(g, c, attn_layers if g else (), mlp_layers if c else (), predicted, h, shape.attn_unit)


def _removed_share(shape: LMShape, groups_removed: int, channels_removed: int, hidden_removed: int) -> float:
    """Share of LM parameters removed with these totals (summed over layers) and hidden channels gone."""
    kept = shape.params(sum(shape.groups) - groups_removed, sum(shape.channels) - channels_removed,
                        shape.hidden - hidden_removed)
    return 1 - kept / shape.lm_params


def _search_counts(shape: LMShape, ratio: float, n_attn: int, n_mlp: int, round_to: int,
                   prune_hidden: bool) -> tuple[int, int, int]:
    """Removed (groups, channels, hidden channels) closest to removing the same fraction of each, within tolerance.

    Every hidden width is tried (only the full one without `prune_hidden`); for each, the
    shared fraction of groups and channels that reaches `ratio` follows. Head groups are
    coarse (8 or 2 per layer in small models), so two group counts bracket that fraction and
    channels make up the difference; balance decides, then the error.
    """
    if n_attn + n_mlp == 0:
        raise HarnessError("no layers selected for pruning")
    groups, channels, hidden = shape.groups[0], shape.channels[0], shape.hidden
    keep = (1 - ratio) * shape.lm_params
    candidates = []
    for h in _kept_widths(hidden, round_to) if prune_hidden else [hidden]:
        group_cost, channel_cost = n_attn * shape.group.at(h), n_mlp * shape.channel.at(h)  # one per layer in range
        excess = shape.params(sum(shape.groups), sum(shape.channels), h) - keep  # for groups and channels to remove
        fraction = excess / (group_cost * groups + channel_cost * channels)
        group_options = {0}
        if group_cost:
            group_options = {min(groups - 1, max(0, f(fraction * groups))) for f in (math.floor, math.ceil)}
        for g in group_options:
            wanted = (excess - g * group_cost) / channel_cost if channel_cost else 0
            for c in _nearest_counts(wanted, channels, round_to) if channel_cost else [0]:
                error = abs(_removed_share(shape, g * n_attn, c * n_mlp, hidden - h) - ratio)
                fractions = [g / groups, c / channels] + ([1 - h / hidden] if prune_hidden else [])
                candidates.append((error > TOLERANCE, max(fractions) - min(fractions), error, g, c, hidden - h))
    *_, g, c, removed_hidden = min(candidates)
    return g, c, removed_hidden


def _kept_widths(units: int, round_to: int) -> list[int]:
    """Every width that may be kept: the full one, or a positive multiple of `round_to`."""
    return sorted({units} | {k * round_to for k in range(1, units // round_to + 1)})


def _nearest_counts(wanted: float, units: int, round_to: int) -> list[int]:
    """The two removed counts nearest `wanted` whose kept width is a multiple of `round_to` (or untouched), never all.

    Ties go to the larger kept width. Only the lattice points around the wanted width are
    looked at, so this costs the same for 256 or 11008 channels.
    """
    kept = min(max(units - wanted, 0), units)
    base = int(kept // round_to)
    widths = {units} | {k * round_to for k in range(base - 2, base + 3) if 1 <= k <= units // round_to}
    return [units - w for w in sorted(widths, key=lambda w: (abs(w - kept), -w))[:2]]
