"""Peak GPU memory of one recovery step, from the student's and teacher's configs alone.

Recovery (`estimate_recovery_memory`):
- weights, under mixed precision (`auto` and `bf16-mixed`, as LLaVA and Bunny train): frozen
  parameters in bf16 (2 bytes), trainable ones as fp32 master weights (4 bytes) plus the bf16
  copy autocast makes of each for the forward pass (2 bytes). Under `bf16-true` every
  parameter is bf16 (2 bytes) and the optimizer updates bf16 weights directly (at lr 2e-5
  most updates are below bf16's resolution: not the paper's setting).
- trainable state: fp32 gradient + two fp32 Adam moments = 12 bytes per trainable
  parameter (projector always; LM decoder and LM head for `full`); LoRA parameters are counted
  in fp32 with fp32 gradient and moments = 16 bytes each, r * (in + out) per adapted linear.
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
- `optimizer_shards=N` divides gradients, optimizer states and fp32 master weights by N (ZeRO-2 /
  FSDP-style sharding over N GPUs): the per-GPU peak when one GPU is not enough.

"GB" is 10^9 bytes; the shared assumptions (bf16 weights, SDPA attention, frozen vision
tower) are stated in `harness.models.memory`.
"""

from __future__ import annotations

from harness.errors import HarnessError
from harness.models.memory import (
    ADAM_STATE,
    BF16,
    FP32,
    LOGITS_BASE,
    LOGITS_CE,
    LOGITS_KL,
    MemoryEstimate,
    ModelShape,
    check_sizes,
    finish,
    layer_activation_bytes,
    layer_inference_bytes,
    max_layer,
    model_shape,
    vision_transient,
)


def gpu_precision(recipe) -> str:
    """The precision a recipe trains in on a GPU (`auto` is bf16 mixed precision with fp32 masters)."""
    return "bf16-mixed" if recipe.precision == "auto" else recipe.precision


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
    check_sizes(batch, seq_len)
    if optimizer_shards < 1:
        raise HarnessError(f"optimizer_shards must be >= 1, got {optimizer_shards}")
    s = model_shape(student_config)
    tokens = batch * seq_len
    logits = tokens * s.vocab
    train = trainable_params(s, recipe)
    lora_r = recipe.lora_r if recipe.language_model == "lora" else 0
    dense = sum(v for k, v in train.items() if k != "lora")
    if gpu_precision(recipe) == "bf16-true":  # every weight in bf16, the optimizer steps them in bf16
        weights = {"student weights (bf16)": BF16 * s.total_params}
    else:  # mixed: frozen weights in bf16, trainable ones as fp32 masters, cast to bf16 by autocast
        weights = {"student frozen weights (bf16)": BF16 * (s.total_params - dense),
                   "trainable fp32 master weights": FP32 * dense / optimizer_shards,  # optimizer state (ZeRO)
                   "autocast bf16 copies of trainable weights": BF16 * dense}
    parts = {
        **weights,
        "trainable: grads + Adam (fp32)": ADAM_STATE * dense / optimizer_shards,
        "LoRA weights + grads + Adam (fp32)": (FP32 + ADAM_STATE / optimizer_shards) * train.get("lora", 0),
        "layer checkpoints (bf16)": len(s.layers) * tokens * BF16 * s.hidden,
        "recomputed layer + its gradients": 2 * tokens * max_layer(s, lambda la: layer_activation_bytes(s, la, lora_r)),
        "final norm and projector": tokens * 6 * s.hidden
        + batch * s.image_tokens * (BF16 * s.vision_hidden + 2 * BF16 * s.hidden),
        "student logits": (LOGITS_BASE + (LOGITS_CE if recipe.ce > 0 else 0) + (LOGITS_KL if recipe.kl > 0 else 0))
        * logits,
        "vision forward (transient)": vision_transient(s, batch),
    }
    if recipe.needs_teacher:
        if teacher_config is None:
            raise HarnessError(f"recipe {recipe.name} distils: a teacher config is needed for its memory estimate")
        t = model_shape(teacher_config)
        parts["teacher weights (bf16, no grads)"] = BF16 * t.total_params
        parts["teacher forward (one layer, no grad)"] = tokens * max_layer(t, lambda la: layer_inference_bytes(t, la))
        parts["teacher logits (bf16)"] = BF16 * tokens * t.vocab
        if recipe.hidden > 0:
            pairs = 1 if not isinstance(recipe.hidden_pairs, tuple) else len(recipe.hidden_pairs)
            if recipe.hidden_pairs == "kept":
                pairs = len(s.layers) + 1
            parts["teacher hidden states (bf16)"] = (len(t.layers) + 1) * tokens * BF16 * t.hidden
            parts["hidden MSE temporaries (fp32)"] = pairs * tokens * 3 * FP32 * t.hidden
    return finish(parts)


