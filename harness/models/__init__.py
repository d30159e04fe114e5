"""Model registry and loading: embedded teachers, local checkpoints, hub ids."""

from harness.models.adapter import LMAdapter
from harness.models.embedded import EMBEDDED, build_embedded
from harness.models.loading import load

__all__ = ["EMBEDDED", "LMAdapter", "build_embedded", "load"]
