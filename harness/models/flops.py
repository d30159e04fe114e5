"""Parameter and MAC accounting, read off the modules actually present.

Reading shapes from the modules (not from the config) keeps the numbers exact for
layer-pruned and non-uniform-width models alike.

Definition of `lm_macs_per_token` (one new token, batch 1, multiply-accumulates):
- every `nn.Linear` in the language-model decoder plus the LM head costs
  `in_features * out_features` (biases, norms, activations, rotary and softmax are
  not counted; embedding lookups cost nothing);
- attention scores: in each layer the token's queries meet `context` keys (QK^T) and
  mix `context` values (AV): `2 * query_width * context`, where `query_width` is the
  output width of the layer's query projection (heads * head_dim).
The vision tower and projector are not counted: they run once per image, not per token.

`lm_macs_for_tokens` sums this over a run of new tokens (a prefill, or decode steps after
a cached prompt): token t of the run attends to `past + t` positions (t = 1..tokens).
"""

from __future__ import annotations

from torch import nn

from harness.errors import HarnessError
from harness.models.adapter import LMAdapter

DEFAULT_CONTEXT = 2048  # the paper's maximum training length; state it whenever MACs are reported


def count_params(model: nn.Module) -> int:
    """All parameters of the model (vision tower, projector and language model), shared ones once."""
    return sum(p.numel() for p in model.parameters())


def lm_linear_macs(model: nn.Module) -> int:
    """MACs of the LM's linear layers for one token: the part that does not grow with context."""
    adapter = LMAdapter(model)
    linears = [m for m in adapter.decoder.modules() if isinstance(m, nn.Linear)] + [adapter.lm_head]
    return sum(m.in_features * m.out_features for m in linears)


def attention_score_macs(model: nn.Module, context: int = DEFAULT_CONTEXT) -> int:
    """MACs of QK^T and AV for one token attending to `context` positions, summed over layers."""
    adapter = LMAdapter(model)
    return sum(2 * adapter.attn_linears(layer)[0][0].out_features * context for layer in adapter.layers)


def lm_macs_per_token(model: nn.Module, context: int = DEFAULT_CONTEXT) -> int:
    """Language-model MACs per generated token at the stated context length (see the module docstring)."""
    if context < 0:
        raise HarnessError(f"context must be >= 0, got {context}")
    return lm_linear_macs(model) + attention_score_macs(model, context)


def lm_macs_for_tokens(model: nn.Module, tokens: int, past: int = 0) -> int:
    """Language-model MACs of processing `tokens` new tokens after `past` cached ones (batch 1).

    A prefill of T tokens is `lm_macs_for_tokens(model, T)`; N decode steps after a
    P-token prompt are `lm_macs_for_tokens(model, N, past=P)`. Causal attention: the
    t-th new token meets `past + t` keys, so the score part totals
    `attention_score_macs(model, 1) * (tokens * past + tokens * (tokens + 1) / 2)`.
    """
    if tokens < 0 or past < 0:
        raise HarnessError(f"tokens and past must be >= 0, got {tokens} and {past}")
    positions = tokens * past + tokens * (tokens + 1) // 2
    return tokens * lm_linear_macs(model) + attention_score_macs(model, 1) * positions
