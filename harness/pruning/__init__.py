"""Structural pruning of the language model inside a LLaVA-style MLLM (layers, heads, MLP channels).

Split so that scores are computed once and reused across ratios:
`compute_importance` / `cached_importance` -> `Importance` (saved with `save_importance`),
then `apply_pruning(model, importance, ratio)` -> `(pruned_model, info)`, saved with
`save_pruned`. `prune` chains them for the CLI (`add_prune_parser`); `prune_ratios` does so for
several ratios, loading and scoring once.
"""

from harness.pruning.apply import apply_pruning, remove_layers, slice_widths
from harness.pruning.checkpoint import load_pruned, save_pruned
from harness.pruning.importance import (
    METHODS,
    Calibration,
    Importance,
    cached_fingerprint,
    cached_importance,
    calibration_set,
    compute_importance,
    load_importance,
    model_fingerprint,
    save_importance,
)
from harness.pruning.prune import add_prune_parser, prune, prune_ratios

__all__ = [
    "METHODS", "Calibration", "Importance", "add_prune_parser", "apply_pruning", "cached_fingerprint", "cached_importance",
    "calibration_set", "compute_importance", "load_importance", "load_pruned", "model_fingerprint", "prune", "prune_ratios",
    "remove_layers", "save_importance", "save_pruned", "slice_widths",
]
