"""Which weights belong to one hidden channel (one coordinate of the residual stream), and to one projector channel.

A hidden channel is written by the embeddings, the projector's last linear and every
residual-writing projection (attention output, MLP output: rows and biases), is
normalised by every norm (weights and biases), and is read by every input projection
and the LM head (columns). One list of such slices serves both scoring (Taylor and
magnitude sum over them) and surgery (the same slices are cut), so the two cannot
disagree about what a channel is.

transformers' LLaVA projector is `Linear(vision -> hidden) -> act -> Linear(hidden -> hidden)`:
its inner width is also `text_config.hidden_size`, so a checkpoint with a smaller hidden
size only loads with plain `from_pretrained` if the projector's inner width shrinks with
it. Those inner channels are scored and kept like MLP channels (`projector_slices`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from harness.errors import HarnessError
from harness.models.adapter import LMAdapter


@dataclass(frozen=True)
class ChannelSlice:
    """`param` indexed by the channel along `dim`; `norm_weight` marks norm gains (rescaled by the surgery)."""

    param: nn.Parameter
    dim: int
    norm_weight: bool = False


def hidden_width(adapter: LMAdapter) -> int:
    return adapter.decoder.get_input_embeddings().embedding_dim


def norm_modules(adapter: LMAdapter) -> list[nn.Module]:
    """The decoder's norms: every module owning parameters besides the embeddings and the attention/MLP projections.

    That finds the per-layer and final norms of every supported family without naming them;
    anything else owning parameters (e.g. Phi's per-head qk_layernorm) is refused, since it
    is not indexed by hidden channels and this code would not know how to slice it.
    """
    embed = adapter.decoder.get_input_embeddings()
    projections = {id(lin) for layer in adapter.layers for lin in _projections(adapter, layer)}
    hidden = hidden_width(adapter)
    norms = []
    for name, module in adapter.decoder.named_modules():
        own = list(module.parameters(recurse=False))
        if module is embed or id(module) in projections or not own:
            continue
        if any(tuple(p.shape) != (hidden,) for p in own):
            raise HarnessError(f"cannot prune the hidden size: decoder module {name!r} ({type(module).__name__}) "
                               f"has parameters that are not one value per hidden channel")
        norms.append(module)
    return norms


def projector_linears(adapter: LMAdapter) -> tuple[nn.Linear, nn.Linear]:
    """The projector's first and last linear; the inner width between them is the hidden size (module docstring)."""
    linears = [m for m in adapter.projector.modules() if isinstance(m, nn.Linear)]
    hidden = hidden_width(adapter)
    if len(linears) != 2 or (linears[0].out_features, linears[1].in_features, linears[1].out_features) != (hidden,) * 3:
        raise HarnessError("cannot prune the hidden size: the projector is not Linear(vision -> hidden) -> act -> "
                           "Linear(hidden -> hidden)")
    return linears[0], linears[1]


def hidden_prunable(adapter: LMAdapter) -> str | None:
    """None when the hidden size can be pruned, else why not (e.g. a projector that is no 2-layer MLP)."""
    try:
        projector_linears(adapter)
        norm_modules(adapter)
    except HarnessError as e:
        return str(e)
    return None


def hidden_slices(adapter: LMAdapter) -> list[ChannelSlice]:
    """Every parameter slice indexed by a hidden channel (module docstring), each parameter once."""
    slices = [ChannelSlice(adapter.decoder.get_input_embeddings().weight, 1)]
    for norm in norm_modules(adapter):
        slices += [ChannelSlice(p, 0, norm_weight=(name == "weight")) for name, p in norm.named_parameters()]
    for layer in adapter.layers:
        for ins, out in (adapter.attn_linears(layer), adapter.mlp_linears(layer)):
            slices += [ChannelSlice(lin.weight, 1) for lin in ins]
            slices += [ChannelSlice(p, 0) for p in out.parameters()]  # output rows and bias
    slices.append(ChannelSlice(adapter.lm_head.weight, 1))
    slices += [ChannelSlice(p, 0) for p in adapter.hidden_params]
    slices += [ChannelSlice(p, 0) for p in projector_linears(adapter)[1].parameters()]
    return _unique(slices)


def projector_slices(adapter: LMAdapter) -> list[ChannelSlice]:
    """The projector's inner channels: rows (and bias) of its first linear, columns of its last."""
    first, last = projector_linears(adapter)
    return [*(ChannelSlice(p, 0) for p in first.parameters()), ChannelSlice(last.weight, 1)]


def _projections(adapter: LMAdapter, layer: nn.Module) -> list[nn.Linear]:
    (attn_in, attn_out), (mlp_in, mlp_out) = adapter.attn_linears(layer), adapter.mlp_linears(layer)
    return [*attn_in, attn_out, *mlp_in, mlp_out]


def _unique(slices: list[ChannelSlice]) -> list[ChannelSlice]:
    """Tied parameters (an LM head sharing the embedding matrix) are listed, scored and cut once."""
    seen, out = set(), []
    for s in slices:
        if (id(s.param), s.dim) not in seen:
            seen.add((id(s.param), s.dim))
            out.append(s)
    return out
