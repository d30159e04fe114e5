"""Shared tiny fixtures: a small synthetic world and shrunken embedded models."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMALL_LM = {"num_hidden_layers": 2}


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    from harness.synthetic.make import WorldSpec, make_world

    return make_world(tmp_path_factory.mktemp("world") / "synth", WorldSpec(mix_size=48, benchmark_size=12, val_size=8))


@pytest.fixture
def tiny_llava():
    from harness.synthetic.models import build_embedded

    return build_embedded("tiny-llava", seed=0, scale=SMALL_LM)


@pytest.fixture(scope="session")
def saved_tiny_llava(tmp_path_factory):
    """A random-init tiny LLaVA saved as an HF checkpoint (the stand-in for a trained teacher)."""
    from harness.synthetic.models import build_embedded

    model, processor = build_embedded("tiny-llava", seed=0, scale={"num_hidden_layers": 4})
    out = tmp_path_factory.mktemp("models") / "tiny-llava"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
