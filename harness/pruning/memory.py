"""Peak memory of scoring a model for pruning, from its config alone (no weights read).

The weights are common to every method; what scoring adds on top is each method's own
`memory` function (`harness.pruning.methods`), given a `ScoringCost`: the model's shapes,
the batch and the bytes per activation. The per-method assumptions are stated next to
each method; `harness.models.memory` holds the shared shapes and per-layer byte counts.
`importance_estimate_line` is what `harness prune` prints before scoring.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from torch import nn

from harness.models.memory import (
    BF16,
    FP32,
    MemoryEstimate,
    ModelShape,
    check_sizes,
    describe_bytes,
    dtype_bytes,
    finish,
    layer_inference_bytes,
    max_layer,
    model_shape,
    vision_transient,
)


@dataclass(frozen=True)
class ScoringCost:
    """What a method's memory estimate needs: shapes, B x T tokens, bytes per activation."""

    shape: ModelShape
    batch_size: int
    seq_len: int
    act: int  # bytes per weight / activation element (2: bf16, 4: fp32)

    @property
    def kind(self) -> str:
        return "bf16" if self.act == BF16 else "fp32"

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def logits(self) -> int:
        """Elements of the full-vocabulary logits."""
        return self.tokens * self.shape.vocab

    @property
    def boundaries(self) -> int:
        """Layer boundary states h_0 .. h_L."""
        return len(self.shape.layers) + 1

    @cached_property
    def one_layer(self) -> int:
        """Inference activations of the largest layer, for the whole batch."""
        return self.tokens * max_layer(self.shape, lambda layer: layer_inference_bytes(self.shape, layer, self.act))

    @cached_property
    def vision(self) -> int:
        return vision_transient(self.shape, self.batch_size, self.act)


def estimate_importance_memory(config, method: str, batch_size: int = 1, seq_len: int = 512,
                               dtype="bfloat16", device: str = "cuda") -> MemoryEstimate:
    """Peak memory of scoring `method` on the model of `config` (a config or a built model), B = batch_size,
    T = seq_len, weights in `dtype` (bf16 by default, as on the paper's GPUs) on `device` ("cuda" adds the
    CUDA context; on "cpu" the runtime's own memory is not counted)."""
    from harness.pruning.methods import get_method

    scorer = get_method(method)
    check_sizes(batch_size, seq_len)
    cost = ScoringCost(model_shape(config), batch_size, seq_len, dtype_bytes(dtype))
    parts = {f"weights ({cost.kind})": cost.act * cost.shape.total_params, **scorer.memory(cost)}
    return finish(parts, cuda=str(device).startswith("cuda"))


def importance_estimate_line(model: nn.Module, method: str, batch_size: int, seq_len: int) -> str:
    """What `harness prune` prints before scoring: the estimate for this model's dtype and device."""
    param = next(model.parameters())
    est = estimate_importance_memory(model, method, batch_size, seq_len, param.dtype, param.device.type)
    return (f"importance memory estimate ({method}, batch {batch_size} x {seq_len} tokens, "
            f"{str(param.dtype).removeprefix('torch.')} on {param.device.type}): {describe_bytes(est)}")


__all__ = ["FP32", "ScoringCost", "estimate_importance_memory", "importance_estimate_line"]
