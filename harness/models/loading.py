"""`harness.models.load`: one entry point for embedded names, local checkpoints and hub ids."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from torch import nn

from harness.errors import HarnessError
from harness.models.adapter import check_mllm, mllm_class
from harness.models.build import resize_to_widths
from harness.paths import TEACHERS_DIR

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def teacher_names() -> list[str]:
    """The trained teachers shipped with (or trained into) the repository: folders under `artifacts/teachers/`."""
    if not TEACHERS_DIR.is_dir():
        return []
    return sorted(p.name for p in TEACHERS_DIR.iterdir() if (p / "config.json").exists())


def resolve(spec: str | Path) -> Path | str:
    """Map a teacher name to its folder under `artifacts/teachers/`; leave paths and hub ids alone."""
    spec = str(spec)
    if spec in teacher_names():
        return TEACHERS_DIR / spec
    path = Path(spec)
    if path.exists():
        return path
    if "/" in spec and not spec.startswith((".", "/")) and spec.count("/") == 1:
        return spec  # a hub id; transformers resolves it from the cache or (online) the hub
    if (TEACHERS_DIR / spec / "parts").is_dir():
        raise HarnessError(f"teacher {spec} is committed as parts and not assembled yet: `make teachers` "
                           f"(or `harness teacher build {spec}`) assembles it")
    known = ", ".join(teacher_names()) or "none yet"
    raise HarnessError(f"unknown model {spec!r}: not a trained teacher ({known}; `harness teacher train NAME` trains "
                       f"an embedded one), a directory, or a hub id")


def check_checkpoint(path: Path) -> dict:
    """A directory must hold an MLLM config, safetensors weights and processor files."""
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise HarnessError(f"{path} is not a model checkpoint: no config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise HarnessError(f"{cfg_file} is not valid JSON: {e}") from None
    if "vision_config" not in cfg or "text_config" not in cfg:
        raise HarnessError(f"{path} is not a multimodal (LLaVA-style) checkpoint: config has no vision/text config")
    check_mllm(cfg.get("model_type"), path)
    if not any(path.glob("*.safetensors")):
        raise HarnessError(f"{path} has no safetensors weights")
    if not any((path / f).exists() for f in PROCESSOR_FILES):
        raise HarnessError(f"{path} has no processor files ({' or '.join(PROCESSOR_FILES)})")
    return cfg


def _check_loading_report(where, report: dict) -> None:
    """transformers only warns when config and weights disagree, and initialises the rest at random: refuse."""
    problems = {k: sorted(map(str, v)) for k, v in report.items() if k != "error_msgs" and v}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {len(v)} ({', '.join(v[:2])}, ...)" for k, v in problems.items())
        raise HarnessError(f"{where}: config.json does not match its weights ({detail})")


def load(spec: str | Path, dtype=None, device: str | None = None, processor: bool = True):
    """Return (model, processor) in eval mode. dtype and device are the caller's choice."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoProcessor

    where = resolve(spec)
    model_type = check_checkpoint(where)["model_type"] if isinstance(where, Path) else None
    dtype = dtype or torch.float32
    try:
        if isinstance(where, Path) and (where / "pruning.json").exists():
            model = load_pruned(where, dtype=dtype)
        else:
            model_type = model_type or AutoConfig.from_pretrained(where).model_type
            model, report = mllm_class(model_type).from_pretrained(where, dtype=dtype, use_safetensors=True,
                                                                   output_loading_info=True)
            _check_loading_report(where, report)
    except HarnessError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        if "ignore_mismatched_sizes" in str(e):  # transformers logs the shapes and raises this
            raise HarnessError(f"{where}: config.json does not match its weights (tensor shapes differ)") from None
        raise HarnessError(f"cannot load model from {where}: {str(e).splitlines()[0]}") from None
    if device:
        model.to(device)
    model.eval()
    return (model, AutoProcessor.from_pretrained(where)) if processor else model


@functools.cache
def _width_aware_class(model_type: str):
    """The multimodal class of `model_type`, made to take per-layer widths from its config while it is built.

    from_pretrained constructs the model (on the meta device) and then loads the weights
    with the checkpoint's key renaming; resizing inside `__init__` lets it do both for
    non-uniform shapes. transformers applies a family's renaming only to classes it knows,
    so it is registered for this one; the class is swapped back after loading.
    """
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    base = mllm_class(model_type)

    def __init__(self, config):
        base.__init__(self, config)
        resize_to_widths(self)

    width_aware = type(f"WidthAware{base.__name__}", (base,), {"__init__": __init__})
    # transformers keys a family's renaming by model_type (LLaVA) or by class name (Qwen2.5-VL)
    mapping = get_checkpoint_conversion_mapping(base.__name__) or get_checkpoint_conversion_mapping(model_type)
    if mapping:
        register_checkpoint_conversion_mapping(width_aware.__name__, mapping, overwrite=True)
    return width_aware


def load_pruned(path: str | Path, dtype=None) -> nn.Module:
    """Load a pruned checkpoint (uniform or per-layer widths) from safetensors, strictly."""
    import torch

    path = Path(path)
    model_type = json.loads((path / "config.json").read_text())["model_type"]
    model, report = _width_aware_class(model_type).from_pretrained(
        path, dtype=dtype or torch.float32, use_safetensors=True, output_loading_info=True)
    problems = {k: v for k, v in report.items() if v}
    if problems:
        detail = "; ".join(f"{k}: {sorted(map(str, v))[:3]}" for k, v in problems.items())
        raise HarnessError(f"pruned checkpoint {path} does not match its config ({detail})")
    model.__class__ = mllm_class(model_type)
    return model
