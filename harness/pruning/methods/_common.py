"""Helpers the scorers share: model inputs from a calibration batch, hooks, the answer-token loss."""

from __future__ import annotations

import contextlib

import torch

from harness.data.instruct import IGNORE_INDEX
from harness.errors import HarnessError


def model_inputs(batch: dict, with_labels: bool = False) -> dict:
    return {k: v for k, v in batch.items() if with_labels or k != "labels"}


@contextlib.contextmanager
def hooks(handles: list):
    """Remove the hooks when the block ends, however it ends."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def answer_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def total_answer_tokens(batches: list[dict]) -> int:
    total = sum(answer_tokens(b) for b in batches)
    if total == 0:
        raise HarnessError("calibration samples have no answer tokens to compute a loss on")
    return total


def calibration_loss(model, batches: list[dict]) -> float:
    """Next-token loss on answer tokens, averaged over all of them (independent of batching)."""
    total = total_answer_tokens(batches)
    loss = 0.0
    with torch.no_grad():
        for batch in batches:
            if answer_tokens(batch):
                loss += model(**model_inputs(batch, True), use_cache=False).loss.item() * answer_tokens(batch) / total
    return loss
