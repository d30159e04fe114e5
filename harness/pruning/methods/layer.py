"""Layer methods: score the decoder layers from the multimodal forward pass (image tokens included,
padding excluded) and remove whole layers.

- `layer-bi`: ShortGPT's Block Influence, sum over tokens of 1 - cos(h_in, h_out). The
  states are each layer's own input and output, read by hooks, except that the last
  layer's output is taken after the final norm, as the paper's official code does (it
  compares transformers' `output_hidden_states`, whose last entry is normed).
- `layer-angular`: mean over tokens of arccos(cos(h_l, h_{l+n}))/pi for every block of
  n contiguous layers (Gromov et al.), stored for every n so any ratio can be served.
- `layer-loss`: increase of the calibration loss when one layer is skipped.

The paper's calibration size for layer methods is ShortGPT's 50 samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from harness.models.adapter import LMAdapter
from harness.models.memory import FP32
from harness.pruning.methods import PruningMethod, register
from harness.pruning.methods._common import calibration_loss, hooks, layer_input, layer_output, model_inputs

CALIB_SAMPLES = 50


def boundary_states(model, adapter: LMAdapter, batch: dict, final_norm: bool = False) -> list[torch.Tensor]:
    """h_0..h_L for one batch: every layer's input plus the last layer's output, [valid tokens, hidden].

    The last output is the raw residual stream, or with `final_norm` the decoder's final norm of it.
    """
    io: dict[int, tuple] = {}

    def recorder(i):
        def hook(module, args, kwargs, output):
            io[i] = (layer_input(args, kwargs), layer_output(output))
        return hook

    def normed(module, args, output):
        io["norm"] = output

    layers = adapter.layers
    handles = [layer.register_forward_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    if final_norm:
        handles.append(adapter.final_norm.register_forward_hook(normed))
    with hooks(handles), torch.no_grad():
        model(**model_inputs(batch), use_cache=False)
    mask = batch["attention_mask"].bool()
    last = io["norm"] if final_norm else io[len(layers) - 1][1]
    states = [io[i][0] for i in range(len(layers))] + [last]
    return [s[mask].float() for s in states]


# --- scorers -------------------------------------------------------------------------------------


def block_influence(model, adapter, batches) -> dict[str, torch.Tensor]:
    total = torch.zeros(len(adapter.layers), dtype=torch.float64)
    for batch in batches:
        states = boundary_states(model, adapter, batch, final_norm=True)
        for i in range(len(states) - 1):
            total[i] += (1 - F.cosine_similarity(states[i], states[i + 1], dim=-1)).sum().item()
    return {"layer": total.float()}


def angular_distance(model, adapter, batches) -> dict[str, torch.Tensor]:
    n_layers = len(adapter.layers)
    sums = torch.zeros(n_layers + 1, n_layers + 1, dtype=torch.float64)
    tokens = 0
    for batch in batches:
        unit = F.normalize(torch.stack(boundary_states(model, adapter, batch)), dim=-1)  # [L+1, N, H]
        cos = torch.einsum("inh,jnh->ijn", unit, unit).clamp(-1, 1)
        sums += (torch.arccos(cos) / math.pi).sum(-1).double().cpu()
        tokens += unit.shape[1]
    distance = torch.full((n_layers, n_layers), math.inf)
    for n in range(1, n_layers + 1):
        for start in range(n_layers - n + 1):
            distance[n - 1, start] = sums[start, start + n] / max(tokens, 1)
    return {"block_distance": distance}


def loss_increase(model, adapter, batches) -> dict[str, torch.Tensor]:
    base = calibration_loss(model, batches)
    scores = []
    for layer in adapter.layers:
        skip = layer.register_forward_hook(lambda m, args, kwargs, out: layer_input(args, kwargs), with_kwargs=True)
        with hooks([skip]):
            scores.append(calibration_loss(model, batches) - base)
    return {"layer": torch.tensor(scores)}


# --- selectors -----------------------------------------------------------------------------------


def lowest_scores(importance, n: int) -> list[int]:
    """The n layers with the lowest scores (ties: the earlier layer)."""
    if n == 0:
        return []
    order = torch.argsort(importance.scores["layer"], stable=True)
    return sorted(order[:n].tolist())


def most_redundant_block(importance, n: int) -> list[int]:
    """The contiguous block of n layers whose input and output are closest in angle."""
    if n == 0:
        return []
    distance = importance.scores["block_distance"][n - 1]
    start = int(torch.argmin(distance[: distance.numel() - n + 1]))
    return list(range(start, start + n))


# --- memory (beyond the weights): see harness.pruning.memory -------------------------------------


def boundary_memory(cost) -> dict[str, int]:
    """A no-grad forward whose hooks keep every layer boundary ((L + 1) * B * T * H, in the weights' dtype
    plus an fp32 copy), one layer's inference activations, the logits and the vision forward."""
    s = cost.shape
    return {f"layer boundary states ({cost.kind} + fp32)": cost.boundaries * cost.tokens * s.hidden * (cost.act + FP32),
            "one layer's activations": cost.one_layer, f"logits ({cost.kind})": cost.act * cost.logits,
            "vision forward (transient)": cost.vision}


def angular_memory(cost) -> dict[str, int]:
    """Block Influence's boundaries plus the normalised fp32 stack."""
    return {**boundary_memory(cost),
            "normalised fp32 stack": cost.boundaries * cost.tokens * cost.shape.hidden * 2 * FP32}


def loss_memory(cost) -> dict[str, int]:
    """No-grad forwards with the loss: one layer's activations, logits with fp32 loss temporaries (10 bytes each)."""
    return {"one layer's activations": cost.one_layer,
            "logits and loss temporaries": (10 - 2 + cost.act) * cost.logits,
            "vision forward (transient)": cost.vision}


register(PruningMethod("layer-bi", "layer", CALIB_SAMPLES, block_influence, lowest_scores, boundary_memory,
                       ("layer",), "ShortGPT Block Influence: 1 - cos(layer input, layer output)"))
register(PruningMethod("layer-angular", "layer", CALIB_SAMPLES, angular_distance, most_redundant_block,
                       angular_memory, ("block_distance",), "angular distance of contiguous blocks (Gromov et al.)"))
register(PruningMethod("layer-loss", "layer", CALIB_SAMPLES, loss_increase, lowest_scores, loss_memory,
                       ("layer",), "calibration-loss increase when one layer is skipped"))
