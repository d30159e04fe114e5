"""The pruning-method registry: one `PruningMethod` record per method, one module per family.

A method is everything `harness prune` needs to know about it: its family (`layer`
methods remove whole decoder layers, `width` methods remove attention head groups, MLP
channels and optionally hidden channels), how many calibration samples it uses by default
(0: none), how it scores the model, how it chooses what to remove from its scores, and
what scoring costs in memory. Nothing outside `harness.pruning` branches on a method's
name: it asks the registry.

Adding a method is one new module in this folder that calls `register(...)` (every
module here is imported below), plus its test; `docs/design.md` walks through one.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from harness.errors import HarnessError

FAMILIES = ("layer", "width")


@dataclass(frozen=True)
class PruningMethod:
    """One pruning method.

    score(model, adapter, batches) -> {name: tensor}: the importance scores, from collated
        calibration batches (an empty list when `calib_samples` is 0).
    select: layer family: (importance, n) -> the n layer indices to remove;
        width family: (importance, counts, per_group) -> per layer {"heads", "kv_heads", "mlp"} kept.
    memory(cost) -> {component: bytes}: peak memory of scoring beyond the weights
        (`harness.pruning.memory.ScoringCost` gives the shapes and sizes).
    score_keys: the score names `score` returns (stored scores lacking one are recomputed).
    """

    name: str
    family: str
    calib_samples: int
    score: Callable
    select: Callable
    memory: Callable
    score_keys: tuple[str, ...]
    summary: str = ""

    @property
    def needs_calibration(self) -> bool:
        return self.calib_samples > 0


METHODS: dict[str, PruningMethod] = {}


def register(method: PruningMethod) -> PruningMethod:
    if method.family not in FAMILIES:
        raise ValueError(f"pruning method {method.name}: family must be one of {FAMILIES}, got {method.family!r}")
    if method.name in METHODS:
        raise ValueError(f"pruning method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> PruningMethod:
    """The registered method, or one error naming the known ones."""
    if name not in METHODS:
        raise HarnessError(f"unknown pruning method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def family_of(name: str) -> str:
    """'layer' or 'width' for a registered method; 'other' for any other name (e.g. published baselines)."""
    return METHODS[name].family if name in METHODS else "other"


for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["FAMILIES", "METHODS", "PruningMethod", "family_of", "get_method", "register"]
