"""Pruned checkpoints on disk: safetensors + config + processor + `pruning.json`, never pickles.

Uniform widths and layer removal give standard configs that plain
`LlavaForConditionalGeneration.from_pretrained` reads. Non-uniform widths are listed per
layer under `text_config.pruned_widths`; `load_pruned` builds those shapes before
transformers fills them from the safetensors, with missing, unexpected or mis-shaped
tensors treated as errors.
"""

from __future__ import annotations

import functools
from pathlib import Path

from torch import nn

from harness.errors import HarnessError
from harness.io import atomic_dir, read_json, write_json
from harness.pruning.apply import resize_to_widths

# What makes two pruning runs "the same": an output dir holding a run with these values may be overwritten.
IDENTITY_KEYS = ("source_fingerprint", "method", "ratio_requested", "per_layer_ratio", "attn_layers",
                 "mlp_layers", "round_to", "prune_hidden")
# Identity keys added after checkpoints were written: a record without them had the default.
_IDENTITY_DEFAULTS = {"prune_hidden": False}


def check_output_dir(out: str | Path, identity: dict) -> None:
    """Refuse an output dir holding anything but an earlier run of this same pruning."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise HarnessError(f"output path {out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    recorded = {**_IDENTITY_DEFAULTS, **_recorded(out)}
    if all(recorded.get(k) == identity.get(k) for k in IDENTITY_KEYS):
        return
    raise HarnessError(f"output directory {out} already holds a different model; choose another --out or delete it")


def _recorded(out: Path) -> dict:
    """The run recorded in `out/pruning.json`; empty when there is none or it cannot be read."""
    try:
        record = read_json(out / "pruning.json")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def save_pruned(model: nn.Module, processor, info: dict, out: str | Path) -> Path:
    """Write the pruned model, its processor and `pruning.json` atomically."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        write_json(tmp / "pruning.json", info)
    return out


@functools.cache
def _width_aware_class():
    """A `LlavaForConditionalGeneration` that takes per-layer widths from its config while it is built.

    from_pretrained constructs the model (on the meta device) and then loads the weights
    with the checkpoint's key renaming; resizing inside `__init__` lets it do both for
    non-uniform shapes. transformers applies the Llava renaming only to classes it knows,
    so it is registered for this one; the class is swapped back after loading.
    """
    from transformers import LlavaForConditionalGeneration
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    class WidthAwareLlava(LlavaForConditionalGeneration):
        def __init__(self, config):
            super().__init__(config)
            resize_to_widths(self)

    register_checkpoint_conversion_mapping(WidthAwareLlava.__name__, get_checkpoint_conversion_mapping("llava"),
                                           overwrite=True)
    return WidthAwareLlava


def load_pruned(path: str | Path, dtype=None) -> nn.Module:
    """Load a pruned checkpoint (uniform or per-layer widths) from safetensors, strictly."""
    import torch
    from transformers import LlavaForConditionalGeneration

    path = Path(path)
    model, report = _width_aware_class().from_pretrained(
        path, dtype=dtype or torch.float32, use_safetensors=True, output_loading_info=True)
    problems = {k: v for k, v in report.items() if v}
    if problems:
        detail = "; ".join(f"{k}: {sorted(map(str, v))[:3]}" for k, v in problems.items())
        raise HarnessError(f"pruned checkpoint {path} does not match its config ({detail})")
    model.__class__ = LlavaForConditionalGeneration
    return model
