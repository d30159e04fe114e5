"""Multimodal families beyond LLaVA-1.5 (`MLLM_CLASSES`): tiny random configurations of the real transformers
classes, pruned by the CLI, reloaded with plain `from_pretrained`, and equal to the original with the removed
heads, channels or layers masked or skipped."""

from __future__ import annotations

import json

import pytest
import torch

from harness.cli import main
from harness.data.instruct import IGNORE_INDEX, Collator
from harness.models import load
from harness.models.adapter import LMAdapter, mllm_class
from harness.pruning.surgery import remove_layers
from harness.synthetic.models import CHAT_TEMPLATE, build_tokenizer
from tests.test_pruning import skipped_copy
from tests.test_pruning_io import masked_original

TEXT = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
# Each processor is sized to its tiny tower (48 or 64 pixels) and renders the embedded models' chat template; the
# synthetic world's images (96 pixels) are resized by it, as a real processor resizes a photo.


def llava_onevision(tokenizer, tmp):
    """LLaVA-OneVision: SigLIP tower, 2-layer projector, Qwen2 language model (GQA: 4 query, 2 KV heads); any-res
    tiling over a single 48-pixel grid point (a base view plus one crop, 9 tokens each, and a newline token)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    config = LlavaOnevisionConfig(
        vision_config=dict(VISION, model_type="siglip_vision_model", image_size=48, patch_size=16),
        text_config=dict(TEXT, vocab_size=len(tokenizer)), image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=[[48, 48]], vision_aspect_ratio="anyres_max_1")
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": 48, "width": 48}, image_grid_pinpoints=[[48, 48]]),
        tokenizer=tokenizer, video_processor=LlavaOnevisionVideoProcessor(), num_image_tokens=9,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1", chat_template=CHAT_TEMPLATE)
    return config, processor


def internvl(tokenizer, tmp):
    """InternVL (transformers-native): InternViT tower, pixel-shuffle projector (4x4 patches -> 4 tokens), Qwen2
    language model. Its processor needs the tokenizer to name its image tokens (`<img>`, `</img>`, `<image>`)
    and its video token."""
    from transformers import (
        AutoTokenizer,
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    tokenizer.add_tokens(["<img>", "</img>", "<video>"], special_tokens=True)
    tokenizer.save_pretrained(tmp / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tmp / "tokenizer", extra_special_tokens={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<image>",
        "video_token": "<video>"})
    config = InternVLConfig(vision_config=dict(VISION, image_size=[64, 64], patch_size=[16, 16]),
                            text_config=dict(TEXT, vocab_size=len(tokenizer)),
                            image_token_id=tokenizer.context_image_token_id)
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size={"height": 64, "width": 64}, crop_to_patches=False),
        tokenizer=tokenizer, video_processor=InternVLVideoProcessor(), image_seq_length=4, chat_template=CHAT_TEMPLATE)
    return config, processor


def idefics3(tokenizer, tmp):
    """Idefics3 / SmolVLM: SigLIP tower, pixel-shuffle connector, Llama language model kept as `model.text_model`.
    Its processor adds its own image tokens to the tokenizer (one image token per image here, no splitting)."""
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor

    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(size={"longest_edge": 48}, max_image_size={"longest_edge": 48},
                                               do_image_splitting=False),
        tokenizer=tokenizer, image_seq_len=1, chat_template=CHAT_TEMPLATE)
    config = Idefics3Config(vision_config=dict(VISION, image_size=48, patch_size=16),
                            text_config=dict(TEXT, model_type="llama", vocab_size=len(processor.tokenizer)),
                            scale_factor=3, image_token_id=processor.image_token_id)
    return config, processor


def qwen2_5_vl(tokenizer, tmp):
    """Qwen2.5-VL: its own windowed ViT whose patch merger (2-layer MLP over 2x2 patches) is the projector, inside
    the tower; Qwen2 language model with multimodal rotary positions. Images at 56x56 pixels: 4x4 patches of 14,
    merged into 4 tokens. The template wraps the image token as Qwen's does (`<|vision_start|>...<|vision_end|>`);
    the processor takes the tokenizer's `image_token` (`<image>` here, `<|image_pad|>` in Qwen's own)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tokenizer.add_tokens(["<|video_pad|>", "<|vision_start|>", "<|vision_end|>"], special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1]),
        text_config=dict(TEXT, model_type="qwen2_5_vl_text", vocab_size=len(tokenizer),
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])),
        image_token_id=ids("<image>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56), tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE.replace("<image>", "<|vision_start|><image><|vision_end|>"))
    return config, processor


FAMILIES = {"llava_onevision": llava_onevision, "internvl": internvl, "idefics3": idefics3, "qwen2_5_vl": qwen2_5_vl}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    """A random-init checkpoint of the family's real class, saved with its processor."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp(request.param)
    config, processor = FAMILIES[request.param](build_tokenizer(), tmp)
    model = mllm_class(config.model_type)(config).eval()
    path = tmp / "model"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def text_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


IDS = torch.tensor([[5, 17, 33, 9, 41, 60, 12, 7, 25, 50]])


def test_loads_as_its_own_class_with_its_parts_found(checkpoint):
    model, processor = load(checkpoint)
    cls = mllm_class(json.loads((checkpoint / "config.json").read_text())["model_type"])
    assert type(model) is cls and type(processor).__name__.endswith("Processor")
    adapter = LMAdapter(model)
    assert len(adapter.layers) == 4 and adapter.num_kv_heads == 2
    names = {id(m): n for n, m in model.named_modules()}
    layout = {"idefics3": ("model.text_model", "model.vision_model", "model.connector"),
              "qwen2_5_vl": ("model.language_model", "model.visual", "model.visual.merger")}.get(
        model.config.model_type, ("model.language_model", "model.vision_tower", "model.multi_modal_projector"))
    assert (names[id(adapter.decoder)], names[id(adapter.vision_tower)], names[id(adapter.projector)]) == layout


@pytest.mark.parametrize("unit", ["group", "query"])
def test_width_pruning_by_the_cli_equals_masking(checkpoint, tmp_path, unit):
    out = tmp_path / "pruned"
    assert main(["prune", str(checkpoint), "--method", "width-magnitude", "--ratio", "0.3", "--out", str(out),
                 "--attn-unit", unit, "--importance-dir", str(tmp_path / "importance")]) == 0
    info = json.loads((out / "pruning.json").read_text())
    config = json.loads((out / "config.json").read_text())
    plain = mllm_class(config["model_type"]).from_pretrained(out).eval()  # plain transformers, no harness code
    if config["model_type"] == "qwen2_5_vl":  # heads fixed (`Family.heads_fixed`): the MLP channels carry the ratio
        assert info["attn_layers"] == [] and plain.config.text_config.num_attention_heads == 4
        assert plain.config.text_config.intermediate_size == len(info["kept"][0]["mlp"]) < 128
    else:
        assert plain.config.text_config.num_attention_heads == len(info["kept"][0]["heads"]) < 4
    if unit == "query":
        assert plain.config.text_config.num_key_value_heads == 2
    reference = masked_original(checkpoint, info["kept"])
    assert (text_logits(plain, IDS) - text_logits(reference, IDS)).abs().max() <= 1e-4


def test_a_family_with_a_fixed_head_count_refuses_an_attention_range_by_name(checkpoint, tmp_path, capsys):
    if json.loads((checkpoint / "config.json").read_text())["model_type"] != "qwen2_5_vl":
        pytest.skip("heads can be pruned in this family")
    out = tmp_path / "pruned"
    assert main(["prune", str(checkpoint), "--method", "width-magnitude", "--ratio", "0.3", "--out", str(out),
                 "--attn-layers", "0:4", "--importance-dir", str(tmp_path / "importance")]) == 2
    assert "head_dim = hidden_size / num_heads" in capsys.readouterr().err and not out.exists()


def test_layer_removal_saved_and_reloaded_equals_skipping(checkpoint, tmp_path):
    model, processor = load(checkpoint)
    pruned = remove_layers(model, [1, 2])
    pruned.save_pretrained(tmp_path / "layers")
    plain = type(model).from_pretrained(tmp_path / "layers").eval()
    assert plain.config.text_config.num_hidden_layers == 2
    assert (text_logits(plain, IDS) - text_logits(skipped_copy(model, [1, 2]), IDS)).abs().max() <= 1e-4


def test_a_projector_that_is_no_two_layer_mlp_refuses_hidden_pruning_by_name(checkpoint, tmp_path, capsys):
    """Idefics3's connector is one linear after a pixel shuffle, Qwen2.5-VL's merger an MLP whose inner width is the
    vision width x 4: width pruning works, hidden-size pruning is refused with the reason (and nothing is written); the LLaVA-layout families prune the hidden size too."""
    out = tmp_path / "hidden"
    code = main(["prune", str(checkpoint), "--method", "width-magnitude", "--ratio", "0.3", "--out", str(out),
                 "--prune-hidden", "--importance-dir", str(tmp_path / "importance")])
    if json.loads((checkpoint / "config.json").read_text())["model_type"] in ("idefics3", "qwen2_5_vl"):
        assert code == 2 and "projector is not Linear(vision -> hidden)" in capsys.readouterr().err
        assert not out.exists()
    else:
        assert code == 0 and json.loads((out / "pruning.json").read_text())["hidden_size"] < 64
        model, _ = load(out)  # strict: every weight (LLaVA-OneVision's image_newline too) has the pruned width
        assert LMAdapter(model).config.hidden_size == json.loads((out / "pruning.json").read_text())["hidden_size"]


def test_batches_supervise_exactly_the_answers_and_the_model_takes_them(checkpoint, tiny_world):
    """The collator lets each family's processor expand its images (its own token count, start/end or row
    markers) and carries the labels over: only the answers (and their end token) are supervised."""
    model, processor = load(checkpoint)
    records = json.loads((tiny_world / "mix.json").read_text())[:3]
    batch = Collator(processor, model.config, tiny_world, 512)(records)
    for i, record in enumerate(records):
        ids, labels = batch["input_ids"][i].tolist(), batch["labels"][i].tolist()
        supervised = processor.tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])
        answers = [t["value"].lower() for t in record["conversations"] if t["from"] == "gpt"]
        assert supervised.replace(" ", "") == "".join(a.replace(" ", "") + "</s>" for a in answers)
    assert torch.isfinite(model(**batch).loss)


def test_one_recovery_step_with_distillation_gives_a_plain_checkpoint(checkpoint, tiny_world, tmp_path):
    from harness.recovery.train import recover

    student = tmp_path / "student"
    assert main(["prune", str(checkpoint), "--method", "layer-bi", "--ratio", "0.3", "--out", str(student),
                 "--data", str(tiny_world), "--calib-samples", "4", "--importance-dir", str(tmp_path / "imp")]) == 0
    record = recover(str(checkpoint), student, "sft+kd-logit", tiny_world, 0.2, tmp_path / "rec",
                     overrides={"max_steps": 1, "batch_size": 4, "val_checks": 0}, progress=False)
    assert record["steps"] == 1
    before = mllm_class(json.loads((student / "config.json").read_text())["model_type"]).from_pretrained(student)
    after = type(before).from_pretrained(tmp_path / "rec")  # plain transformers: LoRA merged, nothing extra
    changed = {n for n, p in after.named_parameters() if not torch.equal(p, before.get_parameter(n))}
    layout = LMAdapter(after).layout
    under = lambda prefix: {n for n, _ in after.named_parameters() if n.startswith(prefix + ".")}  # noqa: E731
    assert under(layout.projector) <= changed  # trained (LoRA: the decoder's linears too)
    assert under(layout.decoder) & changed
    assert not (under(layout.vision_tower) - under(layout.projector)) & changed  # the tower stays frozen


def test_the_lmms_eval_plugin_answers_with_images(checkpoint, tiny_world):
    """One lmms-eval pass over a few synthetic items, images included, through the family's own processor."""
    from harness.evaluation.evaluate import evaluate
    from tests.test_evaluation import LIMIT, expected_yes_scores, yes_sayer

    model, processor = load(checkpoint)
    yes_sayer(model, processor.tokenizer)
    record = evaluate((model, processor), "synth_pope,synth_mme", None, limit=LIMIT,
                      data_dir=tiny_world / "benchmarks", batch_size=2, efficiency=False)
    expected = expected_yes_scores(tiny_world / "benchmarks")
    for task in ("synth_pope", "synth_mme"):
        for metric, value in expected[task].items():
            assert record["scores"][task][metric] == pytest.approx(value), (task, metric)
