"""Pruned models must compute exactly what the unpruned model computes with the same parts masked out."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from harness.evaluation.generate import build_prompt
from harness.models.adapter import LMAdapter
from harness.models.build import build_model
from harness.pruning import apply_pruning, calibration_set, compute_importance, get_method, remove_layers, slice_widths
from harness.pruning.methods._common import calibration_loss as _calibration_loss
from harness.synthetic.make import WorldSpec, make_world
from harness.synthetic.models import build_embedded

FAMILIES = ["tiny-llava", "tiny-bunny", "tiny-llava-gqa", "tiny-qwen2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pruning") / "world"
    make_world(root, WorldSpec(mix_size=40, benchmark_size=10))
    return root


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            model, processor = build_embedded(name, seed=1, scale={"num_hidden_layers": 4})
            cache[name] = (model.eval(), processor)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def calib(world):
    return calibration_set(world, 4, seed=42, batch_size=2)


def logits(model, batch):
    """Logits at real (non-padding) positions."""
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    return out[batch["attention_mask"].bool()]


def masked_copy(model, kept):
    """The unpruned model with removed heads' o_proj columns and removed channels' down_proj columns zeroed."""
    ref = copy.deepcopy(model)
    adapter = LMAdapter(ref)
    hd = adapter.head_dim
    with torch.no_grad():
        for layer, keep in zip(adapter.layers, kept, strict=True):
            _, o = adapter.attn_linears(layer)
            for h in set(range(o.in_features // hd)) - set(keep["heads"]):
                o.weight[:, h * hd:(h + 1) * hd] = 0
            _, down = adapter.mlp_linears(layer)
            for c in set(range(down.in_features)) - set(keep["mlp"]):
                down.weight[:, c] = 0
    return ref


def _norms(model):
    """The decoder's norms, found by type (independently of the pruning code)."""
    return [m for m in LMAdapter(model).decoder.modules()
            if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")]


def dead_copy(model, info):
    """The unpruned model with the pruned heads/channels masked and the removed hidden channels dead.

    Dead: zero in the embeddings, the projector's output and every residual-writing row
    (attention and MLP outputs, with biases), and in every norm's weight and bias, so they
    stay zero all the way to the LM head. The projector's removed inner channels are masked
    like MLP channels (columns of its last linear). With LayerNorm (Phi) the writers are also
    centred over the kept channels, so the dead zeros do not shift the norm's mean; that
    offset is invisible to the pruned model, whose LayerNorms see only the kept channels.
    """
    ref = masked_copy(model, info["kept"])
    adapter = LMAdapter(ref)
    kept = info["kept_hidden"]
    gone = sorted(set(range(info["hidden_size_before"])) - set(kept))
    gone_inner = sorted(set(range(info["hidden_size_before"])) - set(info["kept_projector"]))
    embed, projector = adapter.decoder.get_input_embeddings(), adapter.projector.linear_2
    writers = [projector] + [lin for layer in adapter.layers
                             for lin in (adapter.attn_linears(layer)[1], adapter.mlp_linears(layer)[1])]
    centre = any(isinstance(m, nn.LayerNorm) for m in _norms(ref))
    with torch.no_grad():
        embed.weight[:, gone] = 0
        projector.weight[:, gone_inner] = 0
        for lin in writers:
            for p in lin.parameters():
                p[gone] = 0
                if centre:
                    p[kept] -= p[kept].mean(0, keepdim=True)
        if centre:
            embed.weight[:, kept] -= embed.weight[:, kept].mean(1, keepdim=True)
        for norm in _norms(ref):
            for p in norm.parameters():
                p[gone] = 0
    return ref


class Skip(nn.Module):
    """Stands in for a removed decoder layer: passes the hidden states through."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def skipped_copy(model, removed):
    ref = copy.deepcopy(model)
    layers = LMAdapter(ref).layers
    for i in removed:
        layers[i] = Skip()
    return ref


def test_keep_everything_gives_identical_logits(models, calib):
    model, processor = models("tiny-llava")
    batch = calib.batches(processor, model)[0]
    adapter = LMAdapter(model)
    keep_all = [{"heads": list(range(8)), "kv_heads": list(range(8)), "mlp": list(range(256))}
                for _ in adapter.layers]
    relabelled = slice_widths(model, keep_all)
    assert relabelled.config.text_config.model_type == "mistral"
    assert torch.equal(logits(relabelled, batch), logits(model, batch))
    assert torch.equal(logits(remove_layers(model, []), batch), logits(model, batch))


def test_pruned_model_is_complete_and_shares_nothing(models):
    """Parameters start on the meta device and are assigned: none may be left there, none may be the
    original's, and the buffers the constructors make (rotary inv_freq, position ids) must be real."""
    model, _ = models("tiny-llava")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    originals = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    for pruned in (remove_layers(model, [1]), slice_widths(model, [
            {"heads": [0, 2], "kv_heads": [0, 2], "mlp": list(range(0, 256, 2))}] * 4)):
        tensors = dict([*pruned.named_parameters(), *pruned.named_buffers()])
        assert not any(t.is_meta for t in tensors.values())
        assert not {t.data_ptr() for t in tensors.values()} & originals
        reference = build_model(pruned.config, torch.float32)
        buffers = dict(reference.named_buffers())
        assert buffers.keys() == dict(pruned.named_buffers()).keys()
        assert all(torch.equal(t, buffers[k]) and t.dtype == buffers[k].dtype for k, t in pruned.named_buffers())
        assert "model.language_model.rotary_emb.inv_freq" in buffers
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())


@pytest.mark.parametrize(("name", "method"), [(name, "width-magnitude") for name in FAMILIES]
                         + [("tiny-llava-gqa", "width-taylor"), ("tiny-bunny", "width-activation")])
def test_width_pruning_equals_masking(models, calib, name, method):
    model, processor = models(name)
    importance = compute_importance(model, processor, method, calib)
    pruned, info = apply_pruning(model, importance, 0.3)
    assert abs(info["ratio_achieved"] - 0.3) <= 0.01
    batch = calib.batches(processor, model)[0]
    diff = (logits(pruned, batch) - logits(masked_copy(model, info["kept"]), batch)).abs().max()
    assert diff <= 1e-5


def test_gqa_removes_whole_kv_groups(models, calib):
    model, processor = models("tiny-llava-gqa")
    importance = compute_importance(model, processor, "width-magnitude", None)
    pruned, info = apply_pruning(model, importance, 0.45)
    text = pruned.config.text_config
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 1)
    for keep in info["kept"]:
        assert keep["heads"] == [g * 4 + j for g in keep["kv_heads"] for j in range(4)]


@pytest.mark.parametrize(("name", "method"), [("tiny-llava", "width-magnitude"), ("tiny-bunny", "width-activation"),
                                             ("tiny-llava-gqa", "width-taylor"), ("tiny-qwen2", "width-magnitude")])
def test_hidden_pruning_equals_dead_channels(models, calib, name, method):
    model, processor = models(name)
    importance = compute_importance(model, processor, method, calib)
    pruned, info = apply_pruning(model, importance, 0.3, prune_hidden=True)
    assert abs(info["ratio_achieved"] - 0.3) <= 0.01
    text, before = pruned.config.text_config, model.config.text_config
    assert text.hidden_size == info["hidden_size"] == len(info["kept_hidden"]) < 96
    assert LMAdapter(pruned).head_dim == LMAdapter(model).head_dim
    eps = "layer_norm_eps" if name == "tiny-bunny" else "rms_norm_eps"
    assert getattr(text, eps) == pytest.approx(getattr(before, eps) * 96 / text.hidden_size)
    batch = calib.batches(processor, model)[0]
    diff = (logits(pruned, batch) - logits(dead_copy(model, info), batch)).abs().max()
    assert diff <= 1e-5


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-bunny", "tiny-qwen2"])
def test_layer_pruning_equals_skipping(models, calib, name):
    model, processor = models(name)
    batch = calib.batches(processor, model)[0]
    pruned = remove_layers(model, [1, 2])
    assert pruned.config.text_config.num_hidden_layers == 2
    assert [LMAdapter(pruned).attn(layer).layer_idx for layer in LMAdapter(pruned).layers] == [0, 1]
    if name == "tiny-qwen2":
        assert len(pruned.config.text_config.layer_types) == 2
    diff = (logits(pruned, batch) - logits(skipped_copy(model, [1, 2]), batch)).abs().max()
    assert diff <= 1e-5


def test_layer_bi_prunes_lowest_scores(models, calib):
    model, processor = models("tiny-llava")
    importance = compute_importance(model, processor, "layer-bi", calib)
    pruned, info = apply_pruning(model, importance, 0.24)
    lowest = int(torch.argmin(importance.scores["layer"]))
    assert info["removed_layers"] == [lowest]
    batch = calib.batches(processor, model)[0]
    assert (logits(pruned, batch) - logits(skipped_copy(model, [lowest]), batch)).abs().max() <= 1e-5


def test_block_influence_matches_independent_cosine(models, calib):
    model, processor = models("tiny-llava")
    importance = compute_importance(model, processor, "layer-bi", calib)
    layers = LMAdapter(model).layers
    expected = torch.zeros(len(layers), dtype=torch.float64)
    for batch in calib.batches(processor, model):
        with torch.no_grad():
            hidden = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True).hidden_states
        states = list(hidden)  # hidden[-1] is after the final norm, as the official code compares it
        mask = batch["attention_mask"].bool()
        for i in range(len(layers)):
            a, b = states[i][mask].double(), states[i + 1][mask].double()
            cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
            expected[i] += (1 - cos).sum()
    assert torch.allclose(importance.scores["layer"].double(), expected, rtol=1e-4, atol=1e-4)


def test_block_influence_of_the_last_layer_uses_the_final_norm(models, calib):
    """The official code compares the last layer's input with the final-norm output, not its raw output."""
    from harness.pruning.methods.layer import boundary_states

    model, processor = models("tiny-llava")
    adapter = LMAdapter(model)
    last = len(adapter.layers) - 1
    with torch.no_grad():  # the last layer becomes an identity map, and the final norm turns the stream
        adapter.attn_linears(adapter.layers[last])[1].weight.zero_()
        adapter.mlp_linears(adapter.layers[last])[1].weight.zero_()
        adapter.final_norm.weight.fill_(-1.0)  # the normed stream points the other way: 1 - cos = 2
    batch = calib.batches(processor, model)[0]
    raw = boundary_states(model, adapter, batch)
    assert (1 - F.cosine_similarity(raw[last], raw[last + 1], dim=-1)).abs().max() < 1e-5  # raw BI: 0, pruned first
    importance = compute_importance(model, processor, "layer-bi", calib)
    assert importance.scores["layer"][last] == importance.scores["layer"].max()
    assert get_method("layer-bi").select(importance, 1) != [last]


def test_angular_distance_removes_closest_block(models, calib):
    model, processor = models("tiny-llava")
    importance = compute_importance(model, processor, "layer-angular", calib)
    distance = importance.scores["block_distance"]
    assert distance.shape == (4, 4) and torch.isinf(distance[3, 1:]).all()
    assert ((distance[~torch.isinf(distance)] >= 0) & (distance[~torch.isinf(distance)] <= 1)).all()
    start = int(torch.argmin(distance[1, :3]))
    assert get_method("layer-angular").select(importance, 2) == [start, start + 1]
    batch = calib.batches(processor, model)[0]
    h = [s[batch["attention_mask"].bool()] for s in _all_states(model, batch)]
    by_hand = (torch.arccos(F.cosine_similarity(h[0], h[2], dim=-1).clamp(-1, 1)) / math.pi).mean()
    assert by_hand.item() == pytest.approx(
        compute_importance(model, processor, "layer-angular", _single(calib)).scores["block_distance"][1, 0].item(),
        rel=1e-4)


def _single(calib):
    return type(calib)(calib.records[:2], calib.ids[:2], calib.image_root, 2, calib.max_length)


def _all_states(model, batch):
    with torch.no_grad():
        hidden = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True).hidden_states
    return hidden[:-1]


def test_layer_loss_is_loss_increase_without_the_layer(models, calib):
    model, processor = models("tiny-llava")
    importance = compute_importance(model, processor, "layer-loss", calib)
    batches = calib.batches(processor, model)
    base = _calibration_loss(model, batches)
    without_2 = _calibration_loss(remove_layers(model, [2]), batches)
    assert importance.scores["layer"][2].item() == pytest.approx(without_2 - base, rel=1e-4, abs=1e-5)


def test_taylor_is_weight_times_gradient_per_group(models, calib):
    model, processor = models("tiny-bunny")
    importance = compute_importance(model, processor, "width-taylor", calib)
    ref = copy.deepcopy(model)
    batches = calib.batches(processor, ref)
    total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    for b in batches:
        (ref(**b, use_cache=False).loss * int((b["labels"][:, 1:] != -100).sum()) / total).backward()
    adapter = LMAdapter(ref)
    (q, k, v), dense = adapter.attn_linears(adapter.layers[1])
    hd = adapter.head_dim
    head = 3
    expected = sum(((lin.weight * lin.weight.grad).abs()[head * hd:(head + 1) * hd].sum()
                    + (lin.bias * lin.bias.grad).abs()[head * hd:(head + 1) * hd].sum()) for lin in (q, k, v))
    expected = expected + (dense.weight * dense.weight.grad).abs()[:, head * hd:(head + 1) * hd].sum()
    assert importance.scores["attn"][1, head].item() == pytest.approx(expected.item(), rel=1e-4)
    fc1, fc2 = adapter.mlp_linears(adapter.layers[1])[0][0], adapter.mlp_linears(adapter.layers[1])[1]
    channel = (fc1.weight * fc1.weight.grad).abs()[7].sum() + (fc1.bias * fc1.bias.grad).abs()[7] \
        + (fc2.weight * fc2.weight.grad).abs()[:, 7].sum()
    assert importance.scores["mlp"][1, 7].item() == pytest.approx(channel.item(), rel=1e-4)
    taylor = lambda p: (p * p.grad).abs()  # noqa: E731
    assert importance.scores["hidden"][5].item() == pytest.approx(hidden_by_hand(ref, 5, taylor).item(), rel=1e-4)
    assert importance.scores["projector"][9].item() == pytest.approx(
        projector_by_hand(ref, 9, taylor).item(), rel=1e-4)
    assert all(p.grad is None for p in model.parameters())


def hidden_by_hand(model, c, element):
    """Sum of `element` over every weight of hidden channel c, written out per module."""
    adapter = LMAdapter(model)
    total = element(adapter.decoder.get_input_embeddings().weight)[:, c].sum()
    total = total + element(adapter.lm_head.weight)[:, c].sum()
    projector = adapter.projector.linear_2
    total = total + element(projector.weight)[c].sum() + element(projector.bias)[c]
    for norm in _norms(model):
        total = total + sum(element(p)[c] for p in norm.parameters())
    for layer in adapter.layers:
        for ins, out in (adapter.attn_linears(layer), adapter.mlp_linears(layer)):
            total = total + sum(element(lin.weight)[:, c].sum() for lin in ins) + element(out.weight)[c].sum()
            if out.bias is not None:
                total = total + element(out.bias)[c]
    return total


def projector_by_hand(model, c, element):
    first, last = LMAdapter(model).projector.linear_1, LMAdapter(model).projector.linear_2
    return element(first.weight)[c].sum() + element(first.bias)[c] + element(last.weight)[:, c].sum()


@pytest.mark.parametrize("name", ["tiny-bunny", "tiny-llava"])
def test_hidden_magnitude_is_l2_over_every_slice(models, name):
    model, processor = models(name)
    scores = compute_importance(model, processor, "width-magnitude", None).scores
    square = lambda p: p.detach() ** 2  # noqa: E731
    assert scores["hidden"][11].item() == pytest.approx(hidden_by_hand(model, 11, square).sqrt().item(), rel=1e-5)
    assert scores["projector"][4].item() == pytest.approx(projector_by_hand(model, 4, square).sqrt().item(), rel=1e-5)


def test_activation_scores_are_forward_only_and_nonnegative(models, calib):
    model, processor = models("tiny-qwen2")
    importance = compute_importance(model, processor, "width-activation", calib)
    scores = importance.scores
    assert scores["attn"].shape == (4, 4) and scores["mlp"].shape == (4, 256)
    assert scores["hidden"].shape == (96,) and scores["projector"].shape == (96,)
    assert (scores["attn"] > 0).all() and (scores["mlp"] >= 0).all()
    assert (scores["hidden"] > 0).all() and (scores["projector"] >= 0).all()
    assert all(p.grad is None for p in model.parameters())
    # a hidden channel whose norm outputs are all zero scores zero (the score reads the norm outputs)
    silent = copy.deepcopy(model)
    with torch.no_grad():
        for norm in _norms(silent):
            norm.weight[3] = 0
    assert compute_importance(silent, processor, "width-activation", calib).scores["hidden"][3] == 0


@pytest.mark.parametrize("case", ["layers", "non-uniform", "hidden", "hidden-phi"])
def test_greedy_generation_with_cache_equals_without(models, calib, case):
    model, processor = models("tiny-bunny" if case == "hidden-phi" else "tiny-llava")
    if case == "layers":
        pruned = remove_layers(model, [0, 2])
    elif case.startswith("hidden"):
        importance = compute_importance(model, processor, "width-magnitude", None)
        pruned, _ = apply_pruning(model, importance, 0.3, prune_hidden=True)
    else:
        importance = compute_importance(model, processor, "width-magnitude", None)
        pruned, _ = apply_pruning(model, importance, 0.3, per_layer_ratio=True, attn_layers="1:3", mlp_layers="2:4")
    image = Image.open(calib.image_root / calib.records[0]["image"]).convert("RGB")
    prompt = processor(text=[build_prompt(processor, "what color is the square?")], images=[image],
                       return_tensors="pt")
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = pruned.generate(**prompt, use_cache=True, **kwargs)
        uncached = pruned.generate(**prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
