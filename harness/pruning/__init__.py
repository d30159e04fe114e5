"""Structural pruning of the language model inside a LLaVA-style MLLM (layers, heads, MLP channels).

Split so that scores are computed once and reused across ratios (as Model-Optimizer does):
a method from the registry (`methods/`) scores the model on a calibration set
(`calibration.py`) and the scores are stored (`scores.py`); `apply_pruning(model,
importance, ratio)` plans the counts (`plan.py`), lets the method choose what goes and cuts
it out (`surgery.py`); `save_pruned` writes the checkpoint (`checkpoint.py`). `prune`
(`pipeline.py`) chains them for one ratio or several, with `PruneSettings` (`settings.py`).
"""

from harness.pruning.apply import apply_pruning
from harness.pruning.calibration import Calibration, calibration_set
from harness.pruning.checkpoint import save_pruned
from harness.pruning.methods import METHODS, PruningMethod, family_of, get_method
from harness.pruning.pipeline import add_prune_parser, prune
from harness.pruning.scores import (
    Importance,
    cached_fingerprint,
    cached_importance,
    compute_importance,
    load_importance,
    model_fingerprint,
    save_importance,
)
from harness.pruning.settings import PruneSettings
from harness.pruning.surgery import remove_layers, slice_widths

__all__ = [
    "METHODS", "Calibration", "Importance", "PruneSettings", "PruningMethod", "add_prune_parser", "apply_pruning",
    "cached_fingerprint", "cached_importance", "calibration_set", "compute_importance", "family_of", "get_method",
    "load_importance", "model_fingerprint", "prune", "remove_layers", "save_importance", "save_pruned",
    "slice_widths",
]
