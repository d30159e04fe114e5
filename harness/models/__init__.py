"""Models: the language-model adapter per family, loading, construction from configs, FLOPs and memory shapes."""

from harness.models.adapter import LMAdapter
from harness.models.loading import load

__all__ = ["LMAdapter", "load"]
