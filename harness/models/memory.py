"""Peak GPU-memory estimates for importance estimation and recovery, from a config alone.

The shapes come from the model itself, built on the meta device (no weights are read),
so pruned configs (fewer layers, narrower or per-layer widths) are counted exactly.
Every estimate is a `MemoryEstimate`: `total` bytes and a `breakdown` by component.
"GB" below is 10^9 bytes.

Assumed setting (the paper's, on one GPU): weights in bf16; the vision tower frozen;
attention through SDPA's flash / memory-efficient kernels (no T x T score matrix is
stored); B = micro-batch size, T = sequence length (image tokens included), V = vocabulary,
H = LM hidden size, L = decoder layers.

Recovery (`estimate_recovery_memory`):
- weights: every student parameter in bf16 (2 bytes).
- trainable state: fp32 gradient + two fp32 Adam moments = 12 bytes per trainable bf16
  parameter (projector always; LM decoder and LM head for `full`); LoRA parameters are counted
  in fp32 with fp32 gradient and moments = 16 bytes each, r * (in + out) per adapted linear
  (peft's `get_peft_model` upcasts adapters to fp32; `inject_adapter_in_model`, which
  recovery uses, gives them the base weights' dtype, so with bf16 weights this is an upper
  bound). No fp32 master copy of bf16 weights is counted (a "bf16-true" optimizer).
- activations, gradient checkpointing per decoder layer: each layer keeps its bf16 input,
  L * B * T * H * 2; the layer being recomputed in backward holds its full activations and
  their gradients, 2 * B * T * a_layer, where per token a_layer =
  norms: n_norm * (4H fp32 input + 2H bf16 output) (n_norm = 2 for Llama-likes, 1 for Phi) +
  attention: 2 * (q + 2 kv) (q/k/v after rotary) + 2q (attention output) + 4 * heads (logsumexp) +
  MLP: 2 * I * k (k = 4: gate, up, act(gate), product; Phi: fc1 output and gelu_new's
  intermediates, also 4) + Phi's dropout masks 2H +
  LoRA: per adapted linear 5 * in (dropout mask and fp32 input) + 4r (adapter bottleneck).
  Plus the final norm (6H per token) and the trainable projector (B * N_img * (2 H_vision + 4H)).
- logits (B * T * V elements): student logits in bf16 (2 bytes) always; cross-entropy adds its
  fp32 upcast, log-softmax and fp32 + bf16 gradients (12); the KL term adds the fp32
  temperature-scaled student and teacher log-softmaxes, exp and difference (20).
- teacher (when the recipe distils): bf16 weights, no gradients; its forward under no_grad
  holds one layer's inference activations, its bf16 logits (2 bytes per element, produced
  even when only hidden states are used) and, for hidden-state KD, all L_t + 1 hidden states
  (B * T * H * 2 each); the MSE adds fp32 differences (12 bytes per B * T * H per pair).
- vision forward (frozen, no grad): transient, B * N_img * (8 H_vision + 4 I_vision).
- overhead: CUDA context (1 GB) + 5 % of everything else for allocator fragmentation.
- `optimizer_shards=N` divides gradients and optimizer states by N (ZeRO-2 / FSDP-style
  sharding over N GPUs): the per-GPU peak when one GPU is not enough.

Importance estimation (`estimate_importance_memory`), batches of B samples of T tokens:
- weights in bf16 for every method;
- layer-bi / layer-angular: a no-grad forward whose hooks keep every layer boundary
  ((L + 1) * B * T * H, bf16 plus an fp32 copy = 6 bytes; angular adds the normalised fp32
  stack, 8 more), one layer's inference activations and bf16 logits;
- layer-loss: no-grad forwards with the loss: one layer's inference activations and
  logits with their fp32 loss temporaries (10 bytes per element);
- width-taylor: one forward + backward without checkpointing (as `importance._taylor`
  runs it): gradients of every scored weight in the weights' dtype (bf16: the whole language
  model, embeddings and LM head included, and the projector), every layer's
  activations L * B * T * a_layer, logits with the loss and its gradient (14 bytes per
  element), and fp32 |W * grad| temporaries of the largest linear (12 bytes per weight);
- width-activation: a no-grad forward with fp32 per-channel hooks; width-magnitude: weights only.
`estimate_importance_memory(..., dtype=torch.float32, device="cpu")` sizes the same run with
fp32 weights, gradients and activations (what `harness prune` does on a CPU: models load in
fp32) and without the CUDA context; `importance_estimate_line` is the one-line summary
`harness prune` prints before scoring, for the model's own dtype and device.

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
    """Shapes of a `LlavaConfig` (built on the meta device) or of an already built model."""
    if isinstance(config_or_model, nn.Module):
        return _shape_of(config_or_model)
    return _shape_of_config(config_or_model.to_json_string(use_diff=False))


@functools.lru_cache(maxsize=32)
def _shape_of_config(config_json: str) -> ModelShape:
    import json

    import torch
    from transformers import LlavaConfig

    from harness.pruning.apply import build_model

    config = LlavaConfig.from_dict(json.loads(config_json))
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
    return ModelShape(
        family=a.family_name, total_params=_numel(model), vision_params=_numel(a.vision_tower),
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


def _max_layer(shape: ModelShape, per_token) -> int:
    return max((per_token(layer) for layer in shape.layers), default=0)


def _vision_transient(shape: ModelShape, batch: int, act: int = BF16) -> int:
    return batch * shape.image_tokens * (8 * shape.vision_hidden + 4 * shape.vision_intermediate) * act // BF16


def _finish(parts: dict, cuda: bool = True) -> MemoryEstimate:
    parts = {k: int(v) for k, v in parts.items() if v}
    subtotal = sum(parts.values())
    if cuda:
        parts["overhead (CUDA context, fragmentation)"] = int(CUDA_CONTEXT + FRAGMENTATION * subtotal)
    else:
        parts["overhead (fragmentation)"] = int(FRAGMENTATION * subtotal)
    return MemoryEstimate(sum(parts.values()), parts)


# --- importance estimation -----------------------------------------------------------------------


def estimate_importance_memory(config, method: str, batch_size: int = 1, seq_len: int = 512,
                               dtype="bfloat16", device: str = "cuda") -> MemoryEstimate:
    """Peak memory of scoring `method` on the model of `config` (a config or a built model), B = batch_size,
    T = seq_len, weights in `dtype` (bf16 by default, as on the paper's GPUs) on `device` ("cuda" adds the
    CUDA context; on "cpu" the runtime's own memory is not counted)."""
    from harness.pruning.importance import check_method

    check_method(method)
    _check_sizes(batch_size, seq_len)
    act = dtype_bytes(dtype)
    kind = "bf16" if act == BF16 else "fp32"
    s = model_shape(config)
    tokens = batch_size * seq_len
    logits = tokens * s.vocab
    n_bounds = len(s.layers) + 1
    parts = {f"weights ({kind})": act * s.total_params}
    infer = tokens * _max_layer(s, lambda layer: layer_inference_bytes(s, layer, act))
    vision = _vision_transient(s, batch_size, act)
    if method in ("layer-bi", "layer-angular"):
        parts[f"layer boundary states ({kind} + fp32)"] = n_bounds * tokens * s.hidden * (act + FP32)
        if method == "layer-angular":
            parts["normalised fp32 stack"] = n_bounds * tokens * s.hidden * 2 * FP32
        parts["one layer's activations"] = infer
        parts[f"logits ({kind})"] = act * logits
        parts["vision forward (transient)"] = vision
    elif method == "layer-loss":
        parts["one layer's activations"] = infer
        parts["logits and loss temporaries"] = (10 - BF16 + act) * logits
        parts["vision forward (transient)"] = vision
    elif method == "width-taylor":
        # `importance._taylor` keeps a gradient for every parameter a width score reads: the decoder
        # linears and every hidden or projector channel's slices (embeddings, norms, LM head, projector).
        parts[f"gradients of the scored weights ({kind})"] = act * (s.lm_params + s.projector_params)
        parts["activations (all layers, no checkpointing)"] = tokens * sum(
            layer_activation_bytes(s, layer, act=act) for layer in s.layers) + tokens * (FP32 + act) * s.hidden
        # fp32 logits need no fp32 upcast for the loss
        parts["logits, loss and its gradient"] = (act + LOGITS_CE - (FP32 if act == FP32 else 0)) * logits
        parts["|W * grad| fp32 temporaries"] = 3 * FP32 * s.largest_linear
        parts["vision forward (transient)"] = vision
    elif method == "width-activation":
        parts["one layer's activations"] = infer
        parts["fp32 hook temporaries"] = tokens * FP32 * 2 * _max_layer(s, lambda layer: layer.intermediate)
        parts[f"logits ({kind})"] = act * logits
        parts["vision forward (transient)"] = vision
    else:  # width-magnitude: weights and one fp32 square of the largest linear
        parts["fp32 temporaries"] = 2 * FP32 * s.largest_linear
    return _finish(parts, cuda=str(device).startswith("cuda"))


def importance_estimate_line(model: nn.Module, method: str, batch_size: int, seq_len: int) -> str:
    """What `harness prune` prints before scoring: the estimate for this model's dtype and device."""
    param = next(model.parameters())
    est = estimate_importance_memory(model, method, batch_size, seq_len, param.dtype, param.device.type)
    return (f"importance memory estimate ({method}, batch {batch_size} x {seq_len} tokens, "
            f"{str(param.dtype).removeprefix('torch.')} on {param.device.type}): {describe_bytes(est)}")


def describe_bytes(est: MemoryEstimate, top: int = 4) -> str:
    """Like `MemoryEstimate.describe` but in MB below 1 GB (embedded and mid-size models)."""
    if est.total >= GB:
        return est.describe(top)
    parts = sorted(((v, k) for k, v in est.breakdown.items() if v >= 0.05 * est.total), reverse=True)[:top]
    return f"{est.total / 1e6:.0f} MB (" + ", ".join(f"{k} {v / 1e6:.0f}" for v, k in parts) + ")"


# --- recovery ------------------------------------------------------------------------------------


def lora_params(shape: ModelShape, r: int) -> int:
    """LoRA parameters when every decoder linear gets rank-r adapters: r * (in + out) each."""
    return sum(r * (i + o) for layer in shape.layers for i, o in layer.linears)


def trainable_params(shape: ModelShape, recipe) -> dict[str, int]:
    """Trainable bf16 parameters by component, and LoRA parameters (fp32) under 'lora'."""
    out = {}
    if recipe.projector == "full":
        out["projector"] = shape.projector_params
    if recipe.vision == "full":
        out["vision"] = shape.vision_params
    if recipe.language_model == "full":
        out["language model"] = shape.lm_params
    elif recipe.language_model == "lora":
        out["lora"] = lora_params(shape, recipe.lora_r)
    return out


def estimate_recovery_memory(student_config, teacher_config, recipe, seq_len: int | None = None,
                             batch_size: int | None = None, optimizer_shards: int = 1) -> MemoryEstimate:
    """Peak memory of one recovery step: student trained with `recipe`, teacher (if it distils) frozen in bf16.

    `recipe` is a `Recipe` or a preset name; B and T default to its batch_size and max_length.
    `optimizer_shards` > 1: gradients and optimizer states split over that many GPUs (ZeRO-2 /
    FSDP-style sharding; weights and activations stay whole on each GPU), the per-GPU peak.
    """
    from harness.recovery.recipes import Recipe, get_recipe

    if not isinstance(recipe, Recipe):
        recipe = get_recipe(str(recipe))
    batch = batch_size or recipe.batch_size
    seq_len = seq_len or recipe.max_length
    _check_sizes(batch, seq_len)
    if optimizer_shards < 1:
        raise HarnessError(f"optimizer_shards must be >= 1, got {optimizer_shards}")
    s = model_shape(student_config)
    tokens = batch * seq_len
    logits = tokens * s.vocab
    train = trainable_params(s, recipe)
    lora_r = recipe.lora_r if recipe.language_model == "lora" else 0
    parts = {
        "student weights (bf16)": BF16 * s.total_params,
        "trainable: grads + Adam (fp32)": ADAM_STATE * sum(v for k, v in train.items() if k != "lora")
        / optimizer_shards,
        "LoRA weights + grads + Adam (fp32)": (FP32 + ADAM_STATE / optimizer_shards) * train.get("lora", 0),
        "layer checkpoints (bf16)": len(s.layers) * tokens * BF16 * s.hidden,
        "recomputed layer + its gradients": 2 * tokens * _max_layer(s, lambda la: layer_activation_bytes(s, la, lora_r)),
        "final norm and projector": tokens * 6 * s.hidden
        + batch * s.image_tokens * (BF16 * s.vision_hidden + 2 * BF16 * s.hidden),
        "student logits": (LOGITS_BASE + (LOGITS_CE if recipe.ce > 0 else 0) + (LOGITS_KL if recipe.kl > 0 else 0))
        * logits,
        "vision forward (transient)": _vision_transient(s, batch),
    }
    if recipe.needs_teacher:
        if teacher_config is None:
            raise HarnessError(f"recipe {recipe.name} distils: a teacher config is needed for its memory estimate")
        t = model_shape(teacher_config)
        parts["teacher weights (bf16, no grads)"] = BF16 * t.total_params
        parts["teacher forward (one layer, no grad)"] = tokens * _max_layer(t, lambda la: layer_inference_bytes(t, la))
        parts["teacher logits (bf16)"] = BF16 * tokens * t.vocab
        if recipe.hidden > 0:
            pairs = 1 if not isinstance(recipe.hidden_pairs, tuple) else len(recipe.hidden_pairs)
            if recipe.hidden_pairs == "kept":
                pairs = len(s.layers) + 1
            parts["teacher hidden states (bf16)"] = (len(t.layers) + 1) * tokens * BF16 * t.hidden
            parts["hidden MSE temporaries (fp32)"] = pairs * tokens * 3 * FP32 * t.hidden
    return _finish(parts)


def _check_sizes(batch: int, seq_len: int) -> None:
    if batch < 1 or seq_len < 1:
        raise HarnessError(f"batch size and sequence length must be >= 1, got {batch} and {seq_len}")
