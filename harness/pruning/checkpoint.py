"""Pruned checkpoints on disk: safetensors + config + processor + `pruning.json`, never pickles.

Uniform widths and layer removal give standard configs that plain
`LlavaForConditionalGeneration.from_pretrained` reads. Non-uniform widths are listed per
layer under `text_config.pruned_widths`; `harness.models.loading.load_pruned` builds those
shapes before transformers fills them from the safetensors.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from harness.errors import HarnessError
from harness.io import atomic_dir, read_json, write_json
from harness.pruning.settings import IDENTITY

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
    if all(recorded.get(k) == identity.get(k) for k in IDENTITY):
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
