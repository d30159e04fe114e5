"""Pruned checkpoints on disk, importance reuse, the CLI entry, and MAC accounting."""

from __future__ import annotations

import argparse
import json
import os
import shutil

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from harness.errors import HarnessError
from harness.models import load
from harness.models.adapter import LMAdapter
from harness.models.flops import count_params, lm_macs_per_token
from harness.pruning import (
    Importance,
    add_prune_parser,
    apply_pruning,
    cached_fingerprint,
    cached_importance,
    calibration_set,
    model_fingerprint,
    prune,
    save_importance,
)
from harness.synthetic.make import WorldSpec, make_world
from harness.synthetic.models import build_embedded

FAMILIES = ["tiny-llava", "tiny-bunny", "tiny-llava-gqa", "tiny-qwen2"]
REQUIRED = {"method", "ratio_requested", "ratio_achieved", "lm_params_before", "lm_params_after",
            "total_params_before", "total_params_after", "macs_per_token_before", "macs_per_token_after",
            "calibration_ids", "importance", "removed_layers", "ratio_achieved_decoder_layers",
            "decoder_layer_params_before", "decoder_layer_params_after"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("pruning_io")


@pytest.fixture(scope="module")
def world(root):
    make_world(root / "world", WorldSpec(mix_size=40, benchmark_size=10))
    return root / "world"


@pytest.fixture(scope="module")
def checkpoints(root):
    """Random-init 4-layer models saved like teachers (safetensors + processor), by family."""
    paths = {}
    for name in FAMILIES:
        model, processor = build_embedded(name, seed=2, scale={"num_hidden_layers": 4})
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
        paths[name] = root / name
    return paths


@pytest.fixture(scope="module")
def batch(world, checkpoints):
    model, processor = load(checkpoints["tiny-llava"])
    return calibration_set(world, 2, batch_size=2).batches(processor, model)[0]


def logits(model, batch):
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    return out[batch["attention_mask"].bool()]


def _prune(checkpoints, world, root, name, method, ratio, out, **kw):
    return prune(str(checkpoints[name]), method, ratio, root / out, data=world, calib_samples=4,
                 importance_dir=root / "importance", **kw)


def masked_original(path, kept):
    """The unpruned model with removed heads' output columns and removed channels' down columns zeroed."""
    model, _ = load(path)
    adapter = LMAdapter(model)
    hd = adapter.head_dim
    with torch.no_grad():
        for layer, keep in zip(adapter.layers, kept, strict=True):
            out = adapter.attn_linears(layer)[1]
            for h in set(range(out.in_features // hd)) - set(keep["heads"]):
                out.weight[:, h * hd:(h + 1) * hd] = 0
            down = adapter.mlp_linears(layer)[1]
            for c in set(range(down.in_features)) - set(keep["mlp"]):
                down.weight[:, c] = 0
    return model


@pytest.mark.parametrize(("name", "method", "ratio"), [
    ("tiny-llava", "width-taylor", 0.15),  # 7 heads: 96 % 7 != 0, which LlamaConfig would refuse
    ("tiny-bunny", "width-magnitude", 0.3), ("tiny-llava-gqa", "width-magnitude", 0.3),
    ("tiny-qwen2", "width-magnitude", 0.3)])
def test_uniform_width_loads_with_plain_transformers(checkpoints, world, root, batch, name, method, ratio):
    info = _prune(checkpoints, world, root, name, method, ratio, f"{name}-w")
    out = root / f"{name}-w"
    assert REQUIRED <= set(info) and info["removed_layers"] == [] and len(info["kept"]) == 4
    assert json.loads((out / "pruning.json").read_text())["ratio_achieved"] == info["ratio_achieved"]
    # the share of decoder-layer parameters is larger: the embeddings and LM head are not pruned
    layers = info["decoder_layer_params_before"] - info["decoder_layer_params_after"]
    assert layers == info["lm_params_before"] - info["lm_params_after"]
    assert info["ratio_achieved_decoder_layers"] == round(layers / info["decoder_layer_params_before"], 6)
    assert info["ratio_achieved_decoder_layers"] > info["ratio_achieved"]
    text = json.loads((out / "config.json").read_text())["text_config"]
    if name == "tiny-llava":
        assert text["model_type"] == "mistral" and text["sliding_window"] is None
        assert text["num_attention_heads"] == 7 and text["head_dim"] == 12
    plain = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert plain.config.text_config.num_attention_heads == len(info["kept"][0]["heads"])
    assert torch.equal(logits(plain, batch), logits(load(out)[0], batch))
    reference = masked_original(checkpoints[name], info["kept"])
    assert (logits(plain, batch) - logits(reference, batch)).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["width-magnitude", "width-taylor", "width-activation"])
def test_query_heads_pruned_inside_kv_groups(checkpoints, world, root, batch, method):
    """Minitron-style: every KV head stays and keeps the same number of its query heads (8 -> 6 of 8, 2 KV heads)."""
    info = _prune(checkpoints, world, root, "tiny-llava-gqa", method, 0.3, f"gqa-q-{method}", attn_unit="query")
    assert info["attn_unit"] == "query" and abs(info["ratio_achieved"] - 0.3) <= 0.01
    for keep in info["kept"]:
        assert keep["kv_heads"] == [0, 1]
        per_group = [[h for h in keep["heads"] if h // 4 == g] for g in (0, 1)]
        assert len(per_group[0]) == len(per_group[1]) < 4
    plain = LlavaForConditionalGeneration.from_pretrained(root / f"gqa-q-{method}").eval()
    text = plain.config.text_config
    assert text.num_key_value_heads == 2 and text.num_attention_heads == len(info["kept"][0]["heads"]) < 8
    reference = masked_original(checkpoints["tiny-llava-gqa"], info["kept"])
    assert (logits(plain, batch) - logits(reference, batch)).abs().max() <= 1e-5


def test_query_unit_needs_grouped_query_attention(checkpoints, world, root):
    with pytest.raises(HarnessError, match="no grouped-query attention"):
        _prune(checkpoints, world, root, "tiny-llava", "width-magnitude", 0.3, "no-gqa", attn_unit="query")
    with pytest.raises(HarnessError, match="attn_unit must be one of group, query"):
        _prune(checkpoints, world, root, "tiny-llava-gqa", "width-magnitude", 0.3, "bad-unit", attn_unit="heads")
    assert not (root / "no-gqa").exists() and not (root / "bad-unit").exists()


@pytest.mark.parametrize(("name", "method"), [("tiny-llava", "width-taylor"), ("tiny-bunny", "width-magnitude")])
def test_hidden_pruned_loads_with_plain_transformers(checkpoints, world, root, batch, name, method):
    info = _prune(checkpoints, world, root, name, method, 0.3, f"{name}-h", prune_hidden=True)
    out = root / f"{name}-h"
    record = json.loads((out / "pruning.json").read_text())
    assert record["prune_hidden"] and record["hidden_size_before"] == 96
    assert record["hidden_size"] == len(record["kept_hidden"]) == len(record["kept_projector"]) < 96
    assert abs(record["ratio_achieved"] - 0.3) <= 0.01
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert text["hidden_size"] == info["hidden_size"]
    if name == "tiny-llava":
        assert text["model_type"] == "mistral" and text["head_dim"] == 12
    plain = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert plain.model.multi_modal_projector.linear_2.weight.shape == (info["hidden_size"],) * 2
    assert torch.equal(logits(plain, batch), logits(load(out)[0], batch))
    # the saved model is the one pruned in memory from the same (cached) scores
    source, processor = load(checkpoints[name])
    calib = calibration_set(world, 4) if method == "width-taylor" else None
    importance = cached_importance(source, processor, method, calib, root / "importance")
    in_memory, again = apply_pruning(source, importance, 0.3, prune_hidden=True)
    assert again["kept_hidden"] == info["kept_hidden"]
    assert torch.equal(logits(plain, batch), logits(in_memory.eval(), batch))
    removed_lm = info["lm_params_before"] - info["lm_params_after"]
    assert info["total_params_before"] - info["total_params_after"] > removed_lm  # the projector shrank too


def test_scores_stored_without_hidden_channels_are_recomputed(checkpoints, root):
    model, processor = load(checkpoints["tiny-qwen2"])
    importance_dir = root / "old-importance"
    fresh = cached_importance(model, processor, "width-magnitude", None, importance_dir)
    (folder,) = importance_dir.iterdir()
    key = folder.name.removeprefix("width-magnitude-")
    old = Importance(fresh.method, {k: fresh.scores[k] for k in ("attn", "mlp")}, [], fresh.model_fingerprint)
    save_importance(old, importance_dir, key)  # as written before hidden channels were scored
    again = cached_importance(model, processor, "width-magnitude", None, importance_dir)
    assert torch.equal(again.scores["hidden"], fresh.scores["hidden"])


def test_layer_pruned_loads_with_plain_transformers(checkpoints, world, root, batch):
    info = _prune(checkpoints, world, root, "tiny-llava", "layer-bi", 0.24, "tiny-llava-l1")
    assert len(info["removed_layers"]) == 1 and len(info["calibration_ids"]) == 4
    assert info["importance"]["layer"] and "kept" not in info
    plain = LlavaForConditionalGeneration.from_pretrained(root / "tiny-llava-l1").eval()
    assert plain.config.text_config.model_type == "llama" and plain.config.text_config.num_hidden_layers == 3
    assert torch.equal(logits(plain, batch), logits(load(root / "tiny-llava-l1")[0], batch))


def test_non_uniform_widths_load_through_harness(checkpoints, world, root, batch):
    source, processor = load(checkpoints["tiny-bunny"])
    info = prune(source, "width-activation", 0.3, root / "bunny-blocks", processor=processor, data=world,
                 calib_samples=4, importance_dir=root / "importance", per_layer_ratio=True, attn_layers="1:3",
                 mlp_layers="1:4")
    config = json.loads((root / "bunny-blocks" / "config.json").read_text())["text_config"]
    assert [w["heads"] for w in config["pruned_widths"]] == [8, 6, 6, 8]
    assert [w["intermediate"] for w in config["pruned_widths"]] == [256, 179, 179, 179]
    assert 0 < info["ratio_achieved"] < 0.3
    model, _ = load(root / "bunny-blocks")
    assert type(model) is LlavaForConditionalGeneration
    # A recovered student is written by plain save_pretrained with the side files copied: it loads the same way.
    model.save_pretrained(root / "bunny-recovered")
    for f in (root / "bunny-blocks").iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, root / "bunny-recovered" / f.name)
    assert torch.equal(logits(load(root / "bunny-recovered")[0], batch), logits(model, batch))


def count_forward_passes(monkeypatch) -> list:
    """A list that grows by one on every LlavaForConditionalGeneration forward pass."""
    calls = []
    original = LlavaForConditionalGeneration.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "forward", counting)
    return calls


def test_importance_reuse_runs_no_forward_pass(checkpoints, world, root, monkeypatch):
    calls = count_forward_passes(monkeypatch)
    importance_dir = root / "reuse-importance"
    prune(str(checkpoints["tiny-llava-gqa"]), "width-taylor", 0.15, root / "reuse-15", data=world,
          calib_samples=4, importance_dir=importance_dir)
    assert len(calls) == 4  # batch size 1
    calls.clear()
    for ratio in (0.3, 0.45):
        prune(str(checkpoints["tiny-llava-gqa"]), "width-taylor", ratio, root / f"reuse-{ratio}", data=world,
              calib_samples=4, importance_dir=importance_dir)
    # hidden-channel scores are part of the same stored scores
    info = prune(str(checkpoints["tiny-llava-gqa"]), "width-taylor", 0.3, root / "reuse-hidden", data=world,
                 calib_samples=4, importance_dir=importance_dir, prune_hidden=True)
    scores = [p for p in importance_dir.iterdir() if not p.name.startswith(".")]  # (.fingerprints)
    assert calls == [] and len(scores) == 1 and info["hidden_size"] < 96


def test_prune_ratios_loads_and_scores_once(checkpoints, world, root, monkeypatch, capsys):
    calls = count_forward_passes(monkeypatch)
    path = str(checkpoints["tiny-llava-gqa"])
    infos = prune(path, "width-taylor", [0.3, 0.15], root / "multi" / "r-{ratio}", data=world, calib_samples=4,
                         importance_dir=root / "multi-importance")
    assert len(calls) == 4 and [i["ratio_requested"] for i in infos] == [0.3, 0.15]
    single = prune(path, "width-taylor", 0.3, root / "multi-single", data=world, calib_samples=4,
                   importance_dir=root / "single-importance")
    assert single == infos[0]
    a, b = load(root / "multi" / "r-0.3", processor=False), load(root / "multi-single", processor=False)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())
    assert load(root / "multi" / "r-0.15", processor=False).num_parameters() > a.num_parameters()
    with pytest.raises(HarnessError, match="template"):
        prune(path, "width-taylor", [0.3, 0.45], root / "multi-no-template", data=world)
    with pytest.raises(HarnessError, match="repeat"):
        prune(path, "width-taylor", [0.3, 0.3], root / "m-{ratio}", data=world)
    with pytest.raises(HarnessError, match="different model"):  # every output is checked before scoring
        prune(path, "width-magnitude", [0.2, 0.3], root / "multi" / "r-{ratio}", data=world,
                     importance_dir=root / "multi-importance")
    assert not (root / "multi" / "r-0.2").exists()
    calls.clear()
    parser = argparse.ArgumentParser(prog="harness")
    add_prune_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prune", path, "--method", "width-taylor", "--ratio", "0.3", "0.15", "--out",
                              str(root / "multi" / "r-{ratio}"), "--data", str(world), "--calib-samples", "4",
                              "--importance-dir", str(root / "multi-importance")])
    assert args.func(args) == infos and calls == []  # same runs again: outputs rewritten, scores reused
    out = capsys.readouterr().out
    assert f"saved to {root / 'multi' / 'r-0.3'}" in out and f"saved to {root / 'multi' / 'r-0.15'}" in out


def test_fingerprint_is_hashed_once_per_checkpoint_state(checkpoints, root, monkeypatch):
    import harness.pruning.scores as importance

    source = root / "fingerprint-source"
    shutil.copytree(checkpoints["tiny-llava"], source)
    model, _ = load(source)
    hashed = []

    def counting(m):
        hashed.append(1)
        return model_fingerprint(m)

    monkeypatch.setattr(importance, "model_fingerprint", counting)
    cache = root / "fingerprint-importance"
    expected = model_fingerprint(model)
    assert cached_fingerprint(model, source, cache) == expected and len(hashed) == 1
    assert cached_fingerprint(model, source, cache) == expected and len(hashed) == 1
    assert [p.name for p in cache.iterdir()] == [".fingerprints"]  # not taken for a score folder
    assert cached_fingerprint(model, None, cache) == expected and len(hashed) == 2  # no folder: always hashed
    weights = source / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # the folder changed: hashed again
    assert cached_fingerprint(model, source, cache) == expected and len(hashed) == 3
    assert cached_fingerprint(model.to(torch.float64), source, cache) != expected and len(hashed) == 4


def test_output_dir_reuse_is_idempotent_only_for_the_same_run(checkpoints, world, root):
    first = _prune(checkpoints, world, root, "tiny-llava", "width-magnitude", 0.3, "same")
    again = _prune(checkpoints, world, root, "tiny-llava", "width-magnitude", 0.3, "same")
    assert first == again
    with pytest.raises(HarnessError, match="different model"):
        _prune(checkpoints, world, root, "tiny-llava", "width-magnitude", 0.45, "same")
    with pytest.raises(HarnessError, match="different model"):
        _prune(checkpoints, world, root, "tiny-llava", "width-magnitude", 0.3, "same", prune_hidden=True)
    assert json.loads((root / "same" / "pruning.json").read_text())["ratio_requested"] == 0.3


def test_cli_subcommand(checkpoints, world, root, capsys):
    parser = argparse.ArgumentParser(prog="harness")
    add_prune_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prune", str(checkpoints["tiny-bunny"]), "--method", "layer-angular", "--ratio",
                              "0.24", "--out", str(root / "cli"), "--data", str(world), "--calib-samples", "3",
                              "--importance-dir", str(root / "importance")])
    info = args.func(args)
    assert "removed 0.2398 of LM parameters" in capsys.readouterr().out and len(info["removed_layers"]) == 1
    assert (root / "cli" / "model.safetensors").exists() and (root / "cli" / "processor_config.json").exists()


def test_macs_and_params_follow_the_modules(checkpoints, world, root):
    model, _ = load(checkpoints["tiny-llava"])
    linear = 4 * (4 * 96 * 96 + 3 * 96 * 256) + 96 * 76
    assert lm_macs_per_token(model, context=100) == linear + 4 * 2 * 96 * 100
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    info = _prune(checkpoints, world, root, "tiny-llava", "width-magnitude", 0.3, "macs", per_layer_ratio=True,
                  attn_layers="0:2", mlp_layers="2:4")
    pruned, _ = load(root / "macs")
    heads = [len(k["heads"]) * 12 for k in info["kept"]]
    mlp = [len(k["mlp"]) for k in info["kept"]]
    expected = sum(4 * 96 * h + 3 * 96 * m + 2 * h * 2048 for h, m in zip(heads, mlp, strict=True)) + 96 * 76
    assert lm_macs_per_token(pruned) == expected == info["macs_per_token_after"]
    assert info["total_params_before"] - info["total_params_after"] == \
        info["lm_params_before"] - info["lm_params_after"]


def test_taylor_calibration_like_the_official_code(checkpoints, world, root):
    """Samples with an image and at most N text tokens, drawn in a seeded order, recorded in pruning.json."""
    from harness.pruning.calibration import text_tokens

    _, processor = load(checkpoints["tiny-llava"])
    lengths = sorted(text_tokens(r, processor.tokenizer) for r in calibration_set(world, 40).records)
    cap = lengths[len(lengths) // 2]  # half the mix is short enough
    calib = calibration_set(world, 6, max_text_tokens=cap, require_image=True, tokenizer=processor.tokenizer)
    assert all(r.get("image") and text_tokens(r, processor.tokenizer) <= cap for r in calib.records)
    assert calib.ids == calibration_set(world, 6, max_text_tokens=cap, require_image=True,
                                        tokenizer=processor.tokenizer).ids  # seeded
    with pytest.raises(HarnessError, match="has only"):
        calibration_set(world, 6, max_text_tokens=1, tokenizer=processor.tokenizer)
    info = prune(str(checkpoints["tiny-llava"]), "width-taylor", 0.3, root / "official-calib", data=world,
                 calib_samples=4, calib_max_text_tokens=cap, calib_require_image=True,
                 importance_dir=root / "importance")
    assert info["calibration"] == {"samples": 4, "seed": 42, "batch_size": 1, "max_length": 512,
                                   "max_text_tokens": cap, "require_image": True}
    assert len(info["calibration_ids"]) == 4
