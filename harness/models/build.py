"""Building multimodal models (any of `MLLM_CLASSES`) from configs, including pruned ones with per-layer widths.

Pruned configs stay standard wherever possible: uniform widths and layer removal are plain
transformers fields. Widths that differ between layers are listed under
`text_config.pruned_widths` (`WIDTHS_KEY`), one `{"heads", "kv_heads", "intermediate"}` per
layer; `resize_to_widths` gives a freshly built model those shapes. `empty_model` builds
one with parameters on the meta device, to be filled by assignment (no allocation for
weights that would be overwritten at once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from harness.errors import HarnessError
from harness.models.adapter import LMAdapter, mllm_class

# Text-config key holding per-layer widths when they differ between layers:
# a list of {"heads", "kv_heads", "intermediate"}, one per decoder layer.
WIDTHS_KEY = "pruned_widths"


def build_model(config, dtype: torch.dtype, device: torch.device | str = "cpu") -> nn.Module:
    """An uninitialised model of `config`'s multimodal class with its (possibly per-layer) widths."""
    from transformers.initialization import no_init_weights

    with torch.device(device), no_init_weights():
        model = mllm_class(config.model_type)._from_config(config, dtype=dtype)
    resize_to_widths(model)
    model.tie_weights()  # skipped under no_init_weights: a tied LM head must stay the embedding matrix
    return model


def empty_model(config, dtype: torch.dtype, device: torch.device | str = "cpu") -> nn.Module:
    """`build_model` with every parameter on the meta device, to be filled by `load_state_dict(..., assign=True)`.

    Buffers are created as in `build_model`, on `device`: non-persistent ones such as rotary
    `inv_freq` are in no state dict, so their values must come from the constructors.
    Weights are not tied: call `tie_weights` after assigning.
    """
    from transformers.initialization import no_init_weights

    device = torch.device(device)
    # A torch.device context intercepts every torch call; CPU is the default anyway.
    placement = device if device.type != "cpu" else contextlib.nullcontext()
    with placement, no_init_weights(), _parameters_on_meta():
        model = mllm_class(config.model_type)._from_config(config, dtype=dtype)
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
