"""Ratio semantics, layer ranges, rounding, and refusal of impossible or malformed requests."""

from __future__ import annotations

import pytest

from harness.errors import HarnessError
from harness.models.adapter import LMAdapter
from harness.pruning import apply_pruning, compute_importance, prune
from harness.pruning.plan import lm_shape, parse_layers, plan_layers, plan_width
from harness.synthetic.models import build_embedded


@pytest.fixture(scope="module")
def full():
    """The embedded models at their real shapes (12 layers)."""
    return {name: build_embedded(name, seed=0) for name in ("tiny-llava", "tiny-bunny", "tiny-llava-gqa")}


@pytest.fixture(scope="module")
def small():
    return build_embedded("tiny-llava", seed=0, scale={"num_hidden_layers": 4})


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-bunny", "tiny-llava-gqa"])
@pytest.mark.parametrize("ratio", [0.15, 0.3, 0.45, 0.6])
def test_width_ratio_lands_within_tolerance(full, name, ratio):
    model, processor = full[name]
    importance = compute_importance(model, processor, "width-magnitude", None)
    pruned, info = apply_pruning(model, importance, ratio)
    assert abs(info["ratio_achieved"] - ratio) <= 0.01
    before, after = LMAdapter(model).lm_parameters(), LMAdapter(pruned).lm_parameters()
    assert (info["lm_params_before"], info["lm_params_after"]) == (before, after)
    assert info["ratio_achieved"] == pytest.approx(1 - after / before, abs=1e-6)
    heads, channels = info["groups_removed_per_layer"] / 8, info["channels_removed_per_layer"] / 256
    if name != "tiny-llava-gqa":  # 2 KV groups cannot follow the channel fraction closely
        assert abs(heads - channels) <= 1 / 8


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-bunny", "tiny-llava-gqa"])
def test_hidden_ratio_lands_within_tolerance(full, name):
    model, processor = full[name]
    importance = compute_importance(model, processor, "width-magnitude", None)
    for ratio in (0.15, 0.3, 0.45, 0.6):
        pruned, info = apply_pruning(model, importance, ratio, prune_hidden=True)
        assert abs(info["ratio_achieved"] - ratio) <= 0.01
        after = LMAdapter(pruned).lm_parameters()
        assert (info["lm_params_after"], pruned.config.text_config.hidden_size) == (after, info["hidden_size"])
        hidden, channels = 1 - info["hidden_size"] / 96, info["channels_removed_per_layer"] / 256
        assert abs(hidden - channels) <= 0.05  # the same fraction of hidden and MLP channels
        assert info["kept_hidden"] == sorted(info["kept_hidden"]) and len(info["kept_hidden"]) == info["hidden_size"]


def test_round_to_applies_to_the_hidden_width(full):
    shape = lm_shape(full["tiny-llava"][0])
    everywhere = tuple(range(12))
    counts = plan_width(shape, 0.3, everywhere, everywhere, round_to=16, prune_hidden=True)
    assert (96 - counts.hidden_removed) % 16 == 0 and counts.hidden_removed > 0
    assert (256 - counts.channels_removed) % 16 == 0 and abs(counts.ratio - 0.3) <= 0.01
    per_layer = plan_width(shape, 0.3, everywhere, everywhere, per_layer_ratio=True, round_to=16, prune_hidden=True)
    assert per_layer.hidden_removed == 32  # 30 % of 96 leaves 67.2: the nearest multiple of 16 is 64


def test_layer_count_is_the_closest(full):
    shape = lm_shape(full["tiny-llava"][0])
    share = sum(shape.layer_params) / shape.num_layers / shape.lm_params
    n = plan_layers(shape, 0.49)
    assert n == round(0.49 / share)
    assert plan_layers(shape, 0.3) == 4  # 12 layers of ~0.082 each: 0.330 is nearer than 0.247
    with pytest.raises(HarnessError, match="below half a layer"):
        plan_layers(shape, 0.03)


def test_per_layer_ratio_ranges_and_rounding(full):
    model, processor = full["tiny-llava"]
    importance = compute_importance(model, processor, "width-magnitude", None)
    pruned, info = apply_pruning(model, importance, 0.25, per_layer_ratio=True, attn_layers="3:9",
                                 mlp_layers="3:8", round_to=16)
    widths = pruned.config.text_config.pruned_widths
    assert [w["heads"] for w in widths] == [8] * 3 + [6] * 6 + [8] * 3
    kept_mlp = [w["intermediate"] for w in widths]
    assert kept_mlp == [256] * 3 + [192] * 5 + [256] * 4
    assert all(k % 16 == 0 for k in kept_mlp)
    assert info["attn_layers"] == list(range(3, 9)) and info["mlp_layers"] == list(range(3, 8))
    assert 0 < info["ratio_achieved"] < 0.25


def test_round_to_in_ratio_mode(full):
    shape = lm_shape(full["tiny-bunny"][0])
    counts = plan_width(shape, 0.3, tuple(range(12)), tuple(range(12)), round_to=32)
    assert (256 - counts.channels_removed) % 32 == 0 and abs(counts.ratio - 0.3) <= 0.01


def test_parse_layers():
    assert parse_layers("3:21", 32, "x") == tuple(range(3, 21))
    assert parse_layers(":2", 4, "x") == (0, 1) and parse_layers("2:", 4, "x") == (2, 3)
    for bad in ("3-21", "5:2", "0:40", "a:b"):
        with pytest.raises(HarnessError):
            parse_layers(bad, 32, "attn_layers")


def _assert_refused(tmp_path, model, processor, match, **kwargs):
    out, importance_dir = tmp_path / "out", tmp_path / "importance"
    args = dict(method="width-magnitude", ratio=0.3) | kwargs
    with pytest.raises(HarnessError, match=match):
        prune(model, args.pop("method"), args.pop("ratio"), out, processor=processor,
              importance_dir=importance_dir, **args)
    assert not out.exists() and not importance_dir.exists()


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.2])
def test_ratio_outside_unit_interval(tmp_path, small, ratio):
    _assert_refused(tmp_path, *small, "ratio must be in", ratio=ratio)


def test_ratio_removing_every_head(tmp_path, small):
    _assert_refused(tmp_path, *small, "every attention head", ratio=0.97, per_layer_ratio=True)
    _assert_refused(tmp_path, *small, "every head or channel", ratio=0.97)


def test_ratio_removing_every_layer(tmp_path, small):
    _assert_refused(tmp_path, *small, "every layer", method="layer-bi", ratio=0.95)


def test_layer_granularity(tmp_path, small):
    # The small test model has 4 layers of ~0.24 each: 0.1 is below half a layer.
    _assert_refused(tmp_path, *small, "below half a layer", method="layer-bi", ratio=0.1)


def test_unknown_method_lists_known(tmp_path, small):
    _assert_refused(tmp_path, *small, "known: layer-bi, layer-angular, layer-loss, width-taylor", method="random")


def test_width_options_rejected_for_layer_methods(tmp_path, small):
    _assert_refused(tmp_path, *small, "width methods only", method="layer-bi", ratio=0.24, attn_layers="1:3")


def test_prune_hidden_needs_a_width_method(tmp_path, small):
    _assert_refused(tmp_path, *small, "prune_hidden .*apply to width methods only", method="layer-bi", ratio=0.24,
                    prune_hidden=True)


def test_ratio_removing_every_hidden_channel(tmp_path, small):
    # kept widths must be multiples of 64: below 64 of the 96 hidden channels only 0 is left
    _assert_refused(tmp_path, *small, "or every hidden channel: at most 0.843", ratio=0.9, prune_hidden=True,
                    round_to=64)


def test_unsupported_family(tmp_path, monkeypatch):
    model, processor = build_embedded("tiny-llava", scale={"num_hidden_layers": 2})
    monkeypatch.setattr(model.config.text_config, "model_type", "gpt_neox")
    _assert_refused(tmp_path, model, processor, "unsupported language-model family 'gpt_neox'")


def test_output_dir_with_another_model(tmp_path, small):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(HarnessError, match="already holds a different model"):
        prune(small[0], "width-magnitude", 0.3, out, processor=small[1], importance_dir=tmp_path / "imp")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"] and not (tmp_path / "imp").exists()
