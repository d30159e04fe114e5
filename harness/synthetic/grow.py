"""Growing a shallow language model into a deep one (progressive stacking), for teacher training.

The inverse of layer removal: `harness teacher train` trains a shallow language model
first, which learns the synthetic world's questions several times faster per step, then
repeats every layer to the embedded spec's depth and trains all of it.
"""

from __future__ import annotations

from torch import nn

from harness.errors import HarnessError
from harness.models.adapter import LMAdapter
from harness.pruning.surgery import assemble, module_name, pruned_text_config

REPEAT_MODES = ("split", "identity")  # how `repeat_layers` initialises the copies


def repeat_layers(model: nn.Module, repeats: int, mode: str = "split") -> nn.Module:
    """A new model with every decoder layer repeated `repeats` times in place (progressive stacking).

    Copies of layer i take indices i*repeats ... i*repeats+repeats-1.
    The copies' residual-branch outputs (attention output and MLP down projection, weights and
    biases) are either divided by `repeats` ("split": every copy takes a 1/repeats share of the
    layer's residual step, so all of them matter; close to the shallow model's function, not
    equal to it), or kept on the first copy and zeroed on the others ("identity": the added
    copies start as identity maps, so the deep model computes exactly what the shallow one did).
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise HarnessError(f"repeats must be a positive integer, got {repeats!r}")
    if mode not in REPEAT_MODES:
        raise HarnessError(f"repeat mode must be split or identity, got {mode!r}")
    adapter = LMAdapter(model)
    n = len(adapter.layers)
    order = [i for i in range(n) for _ in range(repeats)]
    config = model.config.to_dict()
    config["text_config"] = pruned_text_config(adapter, config["text_config"], order, None)
    layer0 = adapter.layers[0]
    residual_outputs = {adapter.attn_linears(layer0)[1], adapter.mlp_linears(layer0)[1]}
    scaled = {name for name, module in layer0.named_modules() if module in residual_outputs}
    prefix = module_name(model, adapter.layers) + "."
    state = {}
    for key, tensor in model.state_dict().items():
        if not key.startswith(prefix):
            state[key] = tensor.clone()
            continue
        index, rest = key[len(prefix):].split(".", 1)
        for copy_ in range(repeats):
            factor = 1.0
            if rest.rsplit(".", 1)[0] in scaled:
                factor = 1 / repeats if mode == "split" else float(copy_ == 0)
            state[f"{prefix}{int(index) * repeats + copy_}.{rest}"] = tensor * factor if factor != 1 else tensor.clone()
    return assemble(model, config, state)
