"""`harness.models.load`: one entry point for embedded names, local checkpoints and hub ids."""

from __future__ import annotations

import json
from pathlib import Path

from harness.errors import HarnessError
from harness.models.embedded import EMBEDDED

# Trained embedded teachers are committed here (HF-native, safetensors).
TEACHERS_DIR = Path(__file__).resolve().parents[2] / "artifacts" / "teachers"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def resolve(spec: str | Path) -> Path | str:
    """Map an embedded name to its teacher folder; leave paths and hub ids alone."""
    spec = str(spec)
    if spec in EMBEDDED:
        path = TEACHERS_DIR / spec
        if not (path / "config.json").exists():
            raise HarnessError(f"embedded teacher {spec!r} is not trained yet: run `harness teacher train {spec}`")
        return path
    path = Path(spec)
    if path.exists():
        return path
    if "/" in spec and not spec.startswith((".", "/")) and spec.count("/") == 1:
        return spec  # a hub id; transformers resolves it from the cache or (online) the hub
    known = ", ".join(sorted(EMBEDDED))
    raise HarnessError(f"unknown model {spec!r}: not an embedded name ({known}), a directory, or a hub id")


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
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    where = resolve(spec)
    if isinstance(where, Path):
        check_checkpoint(where)
    dtype = dtype or torch.float32
    try:
        if isinstance(where, Path) and (where / "pruning.json").exists():
            from harness.pruning.checkpoint import load_pruned

            model = load_pruned(where, dtype=dtype)
        else:
            model, report = LlavaForConditionalGeneration.from_pretrained(where, dtype=dtype, use_safetensors=True,
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
