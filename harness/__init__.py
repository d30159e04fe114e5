"""Structural pruning and recovery of multimodal LLMs: a reproducible research harness."""

__version__ = "0.3.0"
