"""The pruning-method registry: a method is one record, and everything else asks the registry.

The worked example of docs/design.md (a seeded random baseline) is registered from this test
file alone and then served by `prune`, the CLI, a grid spec, the dry run, the memory estimate
and the analysis' grouping, none of which names it.
"""

from __future__ import annotations

import json

import pytest
import torch

from harness.errors import HarnessError
from harness.pruning import METHODS, PruningMethod, family_of, get_method, prune
from harness.pruning.methods import register
from harness.pruning.methods.width import SCORE_KEYS, keep_highest, magnitude_memory, width_scores
from harness.pruning.settings import PruneSettings


def random_scores(model, adapter, batches):
    shapes = {k: v.shape for k, v in width_scores(adapter, torch.zeros_like).items()}
    generator = torch.Generator().manual_seed(0)
    return {k: torch.rand(shape, generator=generator) for k, shape in shapes.items()}


@pytest.fixture
def width_random():
    method = register(PruningMethod("width-random", "width", 0, random_scores, keep_highest, magnitude_memory,
                                    SCORE_KEYS, "seeded random scores (baseline)"))
    yield method
    del METHODS["width-random"]


def test_every_registered_method_is_complete():
    assert list(METHODS) == ["layer-bi", "layer-angular", "layer-loss", "width-taylor", "width-activation",
                             "width-magnitude"]
    for name, method in METHODS.items():
        assert method.name == name and method.family == name.split("-")[0]
        assert callable(method.score) and callable(method.select) and callable(method.memory) and method.score_keys
    assert [m.calib_samples for m in METHODS.values()] == [50, 50, 50, 10, 10, 0]  # ShortGPT 50, LLM-Pruner 10


def test_unknown_method_names_the_known_ones():
    with pytest.raises(HarnessError, match="unknown pruning method 'layer-bj'; known: layer-bi, layer-angular"):
        get_method("layer-bj")
    assert family_of("layer-bj") == "other" and family_of("width-taylor") == "width"


def test_registering_twice_or_in_no_family_is_refused(width_random):
    with pytest.raises(ValueError, match="twice"):
        register(width_random)
    with pytest.raises(ValueError, match="family"):
        register(PruningMethod("depth-x", "depth", 0, random_scores, keep_highest, magnitude_memory, ()))


def test_a_new_method_is_one_registry_entry(width_random, saved_tiny_llava, tiny_world, tmp_path, monkeypatch):
    from analysis.tables import family
    from harness.cli import main
    from harness.grid.dryrun import dry_run
    from harness.grid.spec import load_spec
    from harness.pruning.memory import estimate_importance_memory

    info = prune(str(saved_tiny_llava), "width-random", 0.3, tmp_path / "api", data=tiny_world,
                 importance_dir=tmp_path / "importance")
    assert info["method"] == "width-random" and abs(info["ratio_achieved"] - 0.3) <= 0.01
    assert main(["prune", str(saved_tiny_llava), "--method", "width-random", "--ratio", "0.15", "0.3", "--out",
                 str(tmp_path / "cli-{ratio}"), "--importance-dir", str(tmp_path / "importance")]) == 0
    assert json.loads((tmp_path / "cli-0.3" / "pruning.json").read_text())["kept"] == info["kept"]
    assert PruneSettings().calibration_size("width-random") == 0
    assert estimate_importance_memory(load_config(saved_tiny_llava), "width-random").total > 0
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(json.dumps({
        "name": "registry", "data": str(tiny_world), "teachers": [str(saved_tiny_llava)], "tasks": ["synth_gqa"],
        "prune": {"methods": ["width-random"], "ratios": [0.3]}, "recover": {"recipes": ["none"]}}))
    report = dry_run(load_spec(spec_file))
    assert "width-random (no calibration data)" in report and "problems: none" in report
    assert family("width-random") == "width"


def test_width_settings_are_refused_for_layer_methods_everywhere(saved_tiny_llava, tiny_world, tmp_path):
    from harness.grid.spec import load_spec

    with pytest.raises(HarnessError, match="round_to apply to width methods only, not to layer-bi"):
        prune(str(saved_tiny_llava), "layer-bi", 0.3, tmp_path / "x", data=tiny_world, round_to=8)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(json.dumps({
        "name": "s", "data": str(tiny_world), "teachers": [str(saved_tiny_llava)], "tasks": ["synth_gqa"],
        "prune": {"methods": ["layer-bi", "width-taylor"], "ratios": [0.3], "settings": {"attn_layers": "1:3"}},
        "recover": {"recipes": ["none"]}}))
    with pytest.raises(HarnessError, match="prune settings for layer-bi: attn_layers apply to width methods only"):
        load_spec(spec_file)
    assert not (tmp_path / "x").exists()


def load_config(path):
    from transformers import LlavaConfig

    return LlavaConfig.from_pretrained(path)
