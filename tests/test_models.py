"""Embedded models: native transformers classes, save/reload, adapters, loading errors."""

from __future__ import annotations

import json

import pytest
import torch

from harness.errors import HarnessError
from harness.models import LMAdapter, load
from harness.synthetic.models import EMBEDDED, build_embedded

from .conftest import SMALL_LM


def _inputs(processor, model):
    from PIL import Image

    from harness.evaluation.generate import build_prompt

    image = Image.new("RGB", (48, 48), (200, 30, 30))
    text = build_prompt(processor, "what color is the square? one word.")
    return processor(text=[text], images=[image], return_tensors="pt")


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_embedded_shapes_and_families(name):
    model, processor = build_embedded(name, scale=SMALL_LM)
    adapter = LMAdapter(model)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert adapter.family_name == EMBEDDED[name].text_type
    assert len(adapter.layers) == 2
    ins, out = adapter.attn_linears(adapter.layers[0])
    assert ins[0].out_features == adapter.num_heads * adapter.head_dim
    assert ins[1].out_features == adapter.num_kv_heads * adapter.head_dim
    assert out.in_features == adapter.num_heads * adapter.head_dim
    with torch.no_grad():
        logits = model(**_inputs(processor, model)).logits
    assert logits.shape[-1] == len(processor.tokenizer)


def test_default_teachers_are_shaped_for_a_pruning_study():
    for name in ("tiny-llava", "tiny-bunny"):
        cfg = EMBEDDED[name].text
        assert cfg["num_hidden_layers"] >= 12 and cfg["num_attention_heads"] >= 8
        assert cfg["intermediate_size"] >= 2.5 * cfg["hidden_size"]
    assert EMBEDDED["tiny-llava-gqa"].text["num_key_value_heads"] < EMBEDDED["tiny-llava-gqa"].text["num_attention_heads"]


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-bunny"])
def test_save_and_plain_reload_give_identical_logits(name, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, processor = build_embedded(name, scale=SMALL_LM)
    model.eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    proc2 = AutoProcessor.from_pretrained(tmp_path)
    with torch.no_grad():
        a = model(**_inputs(processor, model)).logits
        b = again(**_inputs(proc2, again)).logits
    assert torch.equal(a, b)
    loaded, _ = load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**_inputs(proc2, loaded)).logits, a)


def test_processor_round_trip_expands_image_tokens(tmp_path):
    from transformers import AutoProcessor

    model, processor = build_embedded("tiny-bunny", scale=SMALL_LM)
    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    enc = _inputs(again, model)
    assert int((enc["input_ids"] == model.config.image_token_index).sum()) == 9
    assert again.tokenizer.decode(again.tokenizer("is the red circle above the blue square?").input_ids) == \
        "is the red circle above the blue square?"


def test_load_errors(tmp_path):
    with pytest.raises(HarnessError, match="unknown model"):
        load("no-such-model")
    with pytest.raises(HarnessError, match="no config.json"):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(HarnessError, match="not a multimodal"):
        load(tmp_path)


def test_an_unknown_multimodal_family_is_one_clear_error(tmp_path):
    """A checkpoint of a multimodal class the adapter does not know (here a tiny LLaVA-NeXT) is refused by
    name, with the known families, before transformers would fail inside the wrong class."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from harness.models import load

    cfg = LlavaNextConfig(
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, vocab_size=64),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=48, patch_size=16),
        image_grid_pinpoints=[[48, 48]])
    LlavaNextForConditionalGeneration(cfg).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{}")
    with pytest.raises(HarnessError, match=r"is a 'llava_next' model; supported multimodal families: "
                                           r"llava \(LlavaForConditionalGeneration\)"):
        load(tmp_path)


def test_unsupported_family_is_rejected():
    model, _ = build_embedded("tiny-llava", scale=SMALL_LM)
    model.config.text_config.model_type = "gpt2"
    with pytest.raises(HarnessError, match="unsupported language-model family"):
        LMAdapter(model)


def test_vision_pretraining_targets_read_every_cell():
    """Stage 0's targets: what each cell holds, row-major like the patches; empty cells are class 0."""
    import random

    from harness.synthetic import world
    from harness.synthetic.vision_pretrain import HEADS, cell_labels

    scene = world.random_scene(random.Random(3), text_prob=1.0)
    labels = cell_labels(scene)
    assert labels.shape == (world.GRID**2, len(HEADS))
    for t in scene.things:
        kind, color, size = labels[t.row * world.GRID + t.col].tolist()
        assert color == 1 + list(world.COLORS).index(t.color)
        assert kind == (1 + len(world.SHAPES) + t.digit if t.digit >= 0 else 1 + world.SHAPES.index(t.shape))
    empty = [i for i in range(world.GRID**2) if scene.at(i // world.GRID, i % world.GRID) is None]
    assert all(labels[i].tolist() == [0, 0, 0] for i in empty)


def test_vision_pretraining_teaches_the_features_where_each_patch_is():
    """Stage 0's cell head: the projector's input layer names its cell, as CLIP/SigLIP features do.

    Without it the tower dropped its position embeddings: a linear probe on the earlier
    teachers' image tokens found the cell at chance.
    """
    from harness.synthetic.vision_pretrain import pretrain_vision

    model, processor = build_embedded("tiny-bunny", seed=0, scale={"num_hidden_layers": 1})
    metrics = pretrain_vision(model, processor, steps=150, batch_size=32, progress=False)
    assert metrics["vision/cell_acc"] > 0.9  # every patch, empty ones included; chance is 1/9
    assert metrics["vision/color_acc"] > 0.9  # and the content heads still learn


def test_teacher_training_runs_every_stage(tiny_world, tmp_path):
    """`harness teacher train` end to end on a few steps: an HF checkpoint and a record of each stage."""
    from transformers import LlavaForConditionalGeneration

    from harness.synthetic.teachers import train_teacher

    stages = {"vision": dict(steps=2, batch_size=8), "align": dict(max_steps=1, batch_size=4),
              "full": dict(max_steps=2, batch_size=4), "grow": dict(layers=3), "deep": dict(max_steps=1, batch_size=4)}
    summary = train_teacher("tiny-llava", tiny_world, tmp_path / "t", stages=stages, progress=False)
    assert set(summary["stages"]) == {"vision", "align", "full", "deep"}
    assert summary["stages"]["full"]["steps"] == 2 and summary["stages"]["deep"]["steps"] == 1
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "t")
    assert model.config.text_config.num_hidden_layers == 12  # 3 trained layers, each repeated 4 times
    assert (tmp_path / "t" / "teacher.json").exists()
    with pytest.raises(HarnessError, match="must divide"):
        train_teacher("tiny-llava", tiny_world, tmp_path / "t5", stages={**stages, "grow": dict(layers=5)})
    assert not (tmp_path / "t5").exists()


def test_teacher_settings_layer_stages_then_teacher_then_overrides():
    from harness.synthetic.teachers import GROWN, PLANS, STAGES, TEACHER_SETTINGS, stage_settings

    assert stage_settings(name="tiny-llava") == stage_settings() == {stage: STAGES[stage] for stage in GROWN}
    smol = stage_settings(name="smol-llava")  # a pretrained LM: no growing, LoRA instruction tuning
    assert tuple(smol) == PLANS["smol-llava"] and "grow" not in smol and smol["instruct"] == STAGES["instruct"]
    with pytest.raises(HarnessError, match="'deep.epochs' must be STAGE.FIELD with STAGE one of smol-llava's stages: "
                                           "vision, words, align, instruct"):
        stage_settings({"deep.epochs": 2}, name="smol-llava")
    bunny = stage_settings(name="tiny-bunny")
    assert bunny["deep"]["epochs"] == TEACHER_SETTINGS["tiny-bunny"]["deep.epochs"] != STAGES["deep"]["epochs"]
    assert bunny["full"] == STAGES["full"]
    assert stage_settings({"deep.epochs": 2}, name="tiny-bunny")["deep"]["epochs"] == 2  # the command line wins


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-bunny"])
def test_committed_teacher_is_what_teacher_train_builds(name):
    """`harness teacher train NAME` must reproduce the committed teacher: its recorded stage settings
    and its language model's config are today's defaults (a changed default means retraining it)."""
    from harness.paths import TEACHERS_DIR
    from harness.synthetic.teachers import stage_settings

    record = json.loads((TEACHERS_DIR / name / "teacher.json").read_text())
    assert record["settings"] == stage_settings(name=name)
    text = json.loads((TEACHERS_DIR / name / "config.json").read_text())["text_config"]
    text = {**text, **text.get("rope_parameters", {})}
    assert {k: text.get(k) for k in EMBEDDED[name].text} == EMBEDDED[name].text


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-bunny", "tiny-llava-gqa", "tiny-qwen2"])
def test_repeat_layers_copies_each_layer_with_scaled_residual_outputs(name, tmp_path):
    """Growth for teacher training: layer j of the deep model is layer j // k of the shallow one, residual
    outputs divided by k; once (k = 1) it is the same function; the result reloads with plain from_pretrained."""
    from transformers import LlavaForConditionalGeneration

    from harness.models.adapter import LMAdapter
    from harness.synthetic.grow import repeat_layers

    model, _ = build_embedded(name, scale={"num_hidden_layers": 2})
    model.eval()
    ids = torch.randint(5, 60, (2, 12))
    with torch.no_grad():
        assert torch.equal(repeat_layers(model, 1)(input_ids=ids).logits, model(input_ids=ids).logits)
    grown = repeat_layers(model, 3)
    small, big = LMAdapter(model), LMAdapter(grown)
    assert len(big.layers) == 6 == grown.config.text_config.num_hidden_layers
    outputs = {id(m) for layer in big.layers for m in (big.attn_linears(layer)[1], big.mlp_linears(layer)[1])}
    for j, layer in enumerate(big.layers):
        source = dict(small.layers[j // 3].named_modules())
        for mod_name, module in layer.named_modules():
            for p_name, p in module.named_parameters(recurse=False):
                expected = getattr(source[mod_name], p_name) / (3 if id(module) in outputs else 1)
                assert torch.allclose(p, expected, atol=0, rtol=1e-6), (j, mod_name, p_name)
    identity = repeat_layers(model, 3, mode="identity").eval()  # the added copies start as identity maps
    with torch.no_grad():
        assert torch.allclose(identity(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)
    grown.save_pretrained(tmp_path / "g")
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "g").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, grown.eval()(input_ids=ids).logits)
    with pytest.raises(HarnessError, match="positive integer"):
        repeat_layers(model, 0)
    with pytest.raises(HarnessError, match="split or identity"):
        repeat_layers(model, 2, mode="zero")
