"""What peak-memory estimates are made of: model shapes from a config alone, and bytes per layer and token.

The shapes come from the model itself, built on the meta device (no weights are read),
so pruned configs (fewer layers, narrower or per-layer widths) are counted exactly.
Every estimate is a `MemoryEstimate`: `total` bytes and a `breakdown` by component.
"GB" below is 10^9 bytes.

Assumed setting (the paper's, on one GPU): weights in bf16; the vision tower frozen;
attention through SDPA's flash / memory-efficient kernels (no T x T score matrix is
stored); B = micro-batch size, T = sequence length (image tokens included), V = vocabulary,
H = LM hidden size, L = decoder layers.

Recovery estimates (`harness.recovery.memory`) and scoring estimates (`harness.pruning.memory`,
one function per pruning method) build on the shapes and per-layer byte counts here.

These are upper-bound-style estimates at T = the configured maximum length: real batches
are padded only to their longest sample. They are meant to decide "fits one 80 GB GPU or
not" with margin, not to predict the allocator to the megabyte.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

from torch import nn

from harness.errors import HarnessError

GB = 10**9
GPU_80GB = 80 * GB  # "80 GB" cards hold 79.2-80 GiB (85-86 * 10^9 bytes); 80 * 10^9 leaves headroom
BF16, FP32 = 2, 4
ADAM_STATE = FP32 + 2 * FP32  # fp32 gradient + two fp32 moments per trainable parameter
CUDA_CONTEXT = 1 * GB
FRAGMENTATION = 0.05

LOGITS_BASE = BF16  # the student's bf16 logits
LOGITS_CE = 12  # cross-entropy: fp32 upcast and saved log-softmax (8), then fp32 gradients in backward (4 more)
LOGITS_KL = 20  # fp32 T-scaled student and teacher, log-softmaxes, exp and difference
LOGITS_TAYLOR = BF16 + LOGITS_CE


def dtype_bytes(dtype) -> int:
    """Bytes per element of a floating dtype given as a torch dtype or a name ("bfloat16", "bf16", "float32", ...)."""
    name = str(dtype).removeprefix("torch.").lower()
    sizes = {"bfloat16": BF16, "bf16": BF16, "float16": BF16, "fp16": BF16, "half": BF16,
             "float32": FP32, "fp32": FP32, "float": FP32}
    if name not in sizes:
        raise HarnessError(f"memory estimates cover bfloat16, float16 and float32 weights, not {dtype}")
    return sizes[name]


class MemoryEstimate(NamedTuple):
    """Peak bytes and what they are made of (component -> bytes)."""

    total: int
    breakdown: dict

    def fits(self, capacity: int = GPU_80GB) -> bool:
        return self.total <= capacity

    def describe(self, top: int = 6) -> str:
        parts = sorted(((v, k) for k, v in self.breakdown.items() if v >= 0.05 * GB), reverse=True)[:top]
        inner = ", ".join(f"{k} {v / GB:.1f}" for v, k in parts)
        return f"{self.total / GB:.1f} GB ({inner})"


@dataclass(frozen=True)
class LayerShape:
    q_width: int  # query heads * head_dim
    kv_width: int  # KV heads * head_dim
    heads: int
    intermediate: int
    linears: tuple[tuple[int, int], ...]  # (in_features, out_features) of every decoder linear
    params: int


@dataclass(frozen=True)
class ModelShape:
    family: str
    total_params: int
    vision_params: int
    projector_params: int
    lm_params: int  # decoder (embeddings, layers, final norm) + LM head
    hidden: int
    vocab: int
    image_tokens: int
    vision_hidden: int
    vision_intermediate: int
    layers: tuple[LayerShape, ...]

    @property
    def decoder_linear_params(self) -> int:
        return sum(i * o for layer in self.layers for i, o in layer.linears)

    @property
    def largest_linear(self) -> int:
        return max((i * o for layer in self.layers for i, o in layer.linears), default=0)


def model_shape(config_or_model) -> ModelShape:
    """Shapes of a multimodal config (built on the meta device) or of an already built model."""
    if isinstance(config_or_model, nn.Module):
        return _shape_of(config_or_model)
    return _shape_of_config(config_or_model.to_json_string(use_diff=False))


@functools.lru_cache(maxsize=32)
def _shape_of_config(config_json: str) -> ModelShape:
    import json

    import torch

    from harness.models.adapter import mllm_config
    from harness.models.build import build_model

    config = mllm_config(json.loads(config_json))
    return _shape_of(build_model(config, torch.bfloat16, "meta"))


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _shape_of(model: nn.Module) -> ModelShape:
    from harness.models.adapter import LMAdapter

    a = LMAdapter(model)
    layers = []
    for layer in a.layers:
        (q, k, v), o = a.attn_linears(layer)
        ins, out = a.mlp_linears(layer)
        linears = tuple((lin.in_features, lin.out_features) for lin in (q, k, v, o, *ins, out))
        layers.append(LayerShape(q.out_features, k.out_features, q.out_features // a.head_dim,
                                 out.in_features, linears, _numel(layer)))
    vc = model.config.vision_config
    vision = _numel(a.vision_tower) - (_numel(a.projector) if a.projector_in_tower else 0)
    return ModelShape(
        family=a.family_name, total_params=_numel(model), vision_params=vision,
        projector_params=_numel(a.projector), lm_params=a.lm_parameters(), hidden=a.config.hidden_size,
        vocab=a.lm_head.out_features, image_tokens=int(getattr(model.config, "image_seq_length", 0) or 0),
        vision_hidden=vc.hidden_size, vision_intermediate=vc.intermediate_size, layers=tuple(layers),
    )


# --- per-token activation bytes ------------------------------------------------------------------


def _norms(shape: ModelShape) -> int:
    return 1 if shape.family == "phi" else 2


def layer_activation_bytes(shape: ModelShape, layer: LayerShape, lora_r: int = 0, act: int = BF16) -> int:
    """Bytes one decoder layer keeps for backward, per token (see the module docstring); `act`: activation bytes."""
    h = shape.hidden
    norms = _norms(shape) * (FP32 * h + act * h)
    attn = act * (layer.q_width + 2 * layer.kv_width) + act * layer.q_width + FP32 * layer.heads
    mlp = act * layer.intermediate * 4
    dropout = 2 * h if shape.family == "phi" else 0
    lora = sum(5 * i + FP32 * lora_r for i, _ in layer.linears) if lora_r else 0
    return norms + attn + mlp + dropout + lora


def layer_inference_bytes(shape: ModelShape, layer: LayerShape, act: int = BF16) -> int:
    """Bytes per token alive while one layer runs without gradients (input, norm, q/k/v, output, MLP)."""
    h = shape.hidden
    return act * (3 * h + 2 * layer.q_width + 2 * layer.kv_width + 2 * layer.intermediate) + FP32 * h


def max_layer(shape: ModelShape, per_token) -> int:
    return max((per_token(layer) for layer in shape.layers), default=0)


def vision_transient(shape: ModelShape, batch: int, act: int = BF16) -> int:
    return batch * shape.image_tokens * (8 * shape.vision_hidden + 4 * shape.vision_intermediate) * act // BF16


def finish(parts: dict, cuda: bool = True) -> MemoryEstimate:
    parts = {k: int(v) for k, v in parts.items() if v}
    subtotal = sum(parts.values())
    if cuda:
        parts["overhead (CUDA context, fragmentation)"] = int(CUDA_CONTEXT + FRAGMENTATION * subtotal)
    else:
        parts["overhead (fragmentation)"] = int(FRAGMENTATION * subtotal)
    return MemoryEstimate(sum(parts.values()), parts)


def describe_bytes(est: MemoryEstimate, top: int = 4) -> str:
    """Like `MemoryEstimate.describe` but in MB below 1 GB (embedded and mid-size models)."""
    if est.total >= GB:
        return est.describe(top)
    parts = sorted(((v, k) for k, v in est.breakdown.items() if v >= 0.05 * est.total), reverse=True)[:top]
    return f"{est.total / 1e6:.0f} MB (" + ", ".join(f"{k} {v / 1e6:.0f}" for v, k in parts) + ")"


def check_sizes(batch: int, seq_len: int) -> None:
    if batch < 1 or seq_len < 1:
        raise HarnessError(f"batch size and sequence length must be >= 1, got {batch} and {seq_len}")
