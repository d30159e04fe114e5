"""From a requested ratio to how many layers, head groups and MLP channels to remove.

`ratio` is the share of language-model parameters removed (embeddings and LM head
included), as the paper's tables count it. Plans depend only on the model's shape,
never on importance scores, so an impossible request is refused before any forward
pass runs or any file is written.
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
class LMShape:
    """What planning needs to know about the language model.

    A "group" is one KV head with the query heads that share it (one query head without
    GQA): removing whole groups keeps `num_attention_heads / num_key_value_heads` valid.
    """

    num_layers: int
    lm_params: int
    layer_params: tuple[int, ...]
    groups: tuple[int, ...]  # KV groups per layer
    channels: tuple[int, ...]  # MLP intermediate channels per layer
    group_params: int  # parameters removed with one group (q/k/v rows, o columns, biases)
    channel_params: int  # parameters removed with one MLP channel (gate/up rows, down column)

    @property
    def uniform(self) -> bool:
        return len(set(self.groups)) == 1 and len(set(self.channels)) == 1


@dataclass(frozen=True)
class WidthCounts:
    """Groups and channels removed in each layer of the attention and MLP ranges."""

    groups_removed: int
    channels_removed: int
    attn_layers: tuple[int, ...]
    mlp_layers: tuple[int, ...]
    ratio: float  # predicted share of LM parameters removed


def lm_shape(model: nn.Module) -> LMShape:
    adapter = LMAdapter(model)
    layers = list(adapter.layers)
    groups = tuple(adapter.attn_linears(layer)[0][1].out_features // adapter.head_dim for layer in layers)
    channels = tuple(adapter.mlp_linears(layer)[1].in_features for layer in layers)
    first = layers[0]
    return LMShape(
        num_layers=len(layers),
        lm_params=adapter.lm_parameters(),
        layer_params=tuple(sum(p.numel() for p in layer.parameters()) for layer in layers),
        groups=groups,
        channels=channels,
        group_params=_params_per_unit(*adapter.attn_linears(first), groups[0]),
        channel_params=_params_per_unit(*adapter.mlp_linears(first), channels[0]),
    )


def _params_per_unit(ins: list[nn.Linear], out: nn.Linear, units: int) -> int:
    """Parameters tied to one unit: its rows of every input projection and its columns of the output one."""
    rows = sum((lin.out_features // units) * (lin.in_features + (lin.bias is not None)) for lin in ins)
    return rows + (out.in_features // units) * out.out_features


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
               per_layer_ratio: bool = False, round_to: int = 1) -> WidthCounts:
    """Groups and channels to remove in every layer of the ranges.

    Default mode: `ratio` is the share of LM parameters; the pair of per-layer counts with
    (nearly) the same fraction of heads and of channels whose result is closest wins.
    Per-layer mode (LLM-Pruner's block-wise setting): `ratio` is the fraction of heads and
    of channels removed in each layer of the ranges; the LM share is whatever follows.
    """
    check_ratio(ratio)
    if not shape.uniform:
        raise HarnessError("width pruning needs uniform layer widths; this model's widths were already pruned unevenly")
    if round_to < 1:
        raise HarnessError(f"round_to must be >= 1, got {round_to}")
    groups, channels = shape.groups[0], shape.channels[0]
    attn_unit = len(attn_layers) * shape.group_params / shape.lm_params
    mlp_unit = len(mlp_layers) * shape.channel_params / shape.lm_params
    if per_layer_ratio:
        g, c = round(ratio * groups), _nearest_channel_counts(ratio * channels, channels, round_to)[0]
    else:
        g, c = _search_counts(ratio, groups, channels, attn_unit, mlp_unit, round_to)
    if g >= groups and attn_layers:
        raise HarnessError(f"ratio {ratio} would remove every attention head of a layer ({groups} head groups)")
    predicted = g * attn_unit + c * mlp_unit
    if not per_layer_ratio and abs(predicted - ratio) > TOLERANCE:
        most = (groups - 1) * attn_unit + _nearest_channel_counts(channels, channels, round_to)[0] * mlp_unit
        if ratio > most:
            raise HarnessError(f"ratio {ratio} would remove every head or channel of a layer: at most {most:.3f} "
                               f"of LM parameters can be removed from these layer ranges")
        raise HarnessError(f"the closest achievable ratio is {predicted:.4f}, more than {TOLERANCE} from {ratio}: "
                           f"one head group removes {attn_unit:.4f} and one channel {mlp_unit:.5f} of LM parameters")
    return WidthCounts(g, c, attn_layers if g else (), mlp_layers if c else (), predicted)


def _search_counts(ratio: float, groups: int, channels: int, attn_unit: float, mlp_unit: float,
                   round_to: int) -> tuple[int, int]:
    """The (groups, channels) pair closest to removing the same fraction of both, among those within tolerance.

    Head groups are coarse (8 or 2 per layer in small models), so two group counts bracket the
    shared fraction and channels make up the difference; balance decides, then the error.
    """
    if attn_unit + mlp_unit == 0:
        raise HarnessError("no layers selected for pruning")
    fraction = ratio / (attn_unit * groups + mlp_unit * channels)
    group_options = {0}
    if attn_unit:
        group_options = {min(groups - 1, max(0, f(fraction * groups))) for f in (math.floor, math.ceil)}
    candidates = []
    for g in group_options:
        wanted = (ratio - g * attn_unit) / mlp_unit if mlp_unit else 0
        for c in _nearest_channel_counts(wanted, channels, round_to) if mlp_unit else [0]:
            error = abs(g * attn_unit + c * mlp_unit - ratio)
            candidates.append((error > TOLERANCE, abs(g / groups - c / channels), error, g, c))
    *_, g, c = min(candidates)
    return g, c


def _nearest_channel_counts(wanted: float, channels: int, round_to: int) -> list[int]:
    """Removed-channel counts around `wanted` whose kept width is a multiple of `round_to` (or untouched)."""
    kept = channels - wanted
    options = {0} | {channels - k * round_to for k in range(1, channels // round_to + 1)}
    options = sorted(c for c in options if c < channels)
    return sorted(options, key=lambda c: abs((channels - c) - kept))[:2]
