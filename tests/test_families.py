"""Multimodal families beyond LLaVA-1.5 (`MLLM_CLASSES`): tiny random configurations of the real transformers
classes, pruned by the CLI, reloaded with plain `from_pretrained`, and equal to the original with the removed
heads, channels or layers masked or skipped."""

from __future__ import annotations

import json

import pytest
import torch

from harness.cli import main
from harness.models import load
from harness.models.adapter import LMAdapter, mllm_class
from harness.pruning.surgery import remove_layers
from harness.synthetic.models import build_tokenizer
from tests.test_pruning import skipped_copy
from tests.test_pruning_io import masked_original

TEXT = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def llava_onevision(tokenizer):
    """LLaVA-OneVision: SigLIP tower, 2-layer projector, Qwen2 language model (GQA: 4 query, 2 KV heads)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=48, patch_size=16),
        text_config=dict(TEXT, vocab_size=len(tokenizer)), image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    processor = LlavaOnevisionProcessor(image_processor=LlavaOnevisionImageProcessor(), tokenizer=tokenizer,
                                        video_processor=LlavaOnevisionVideoProcessor())
    return config, processor


def internvl(tokenizer, tmp):
    """InternVL (transformers-native): InternViT tower, pixel-shuffle projector, Qwen2 language model. Its processor
    needs the tokenizer to name its image tokens (`<img>`, `</img>`, `<image>`) and its video token."""
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
    config = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=[48, 48], patch_size=[16, 16]),
        text_config=dict(TEXT, vocab_size=len(tokenizer)), image_token_id=tokenizer.context_image_token_id)
    processor = InternVLProcessor(image_processor=GotOcr2ImageProcessor(), tokenizer=tokenizer,
                                  video_processor=InternVLVideoProcessor(), image_seq_length=9)
    return config, processor


def idefics3(tokenizer, tmp):
    """Idefics3 / SmolVLM: SigLIP tower, pixel-shuffle connector, Llama language model kept as `model.text_model`.
    Its processor adds its own image tokens to the tokenizer."""
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor

    processor = Idefics3Processor(image_processor=Idefics3ImageProcessor(), tokenizer=tokenizer, image_seq_len=1)
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=48, patch_size=16),
        text_config=dict(TEXT, model_type="llama", vocab_size=len(processor.tokenizer)), scale_factor=3,
        image_token_id=processor.image_token_id)
    return config, processor


FAMILIES = {"llava_onevision": lambda tokenizer, tmp: llava_onevision(tokenizer), "internvl": internvl,
            "idefics3": idefics3}


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
    layout = {"idefics3": ("model.text_model", "model.vision_model", "model.connector")}.get(
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
    assert plain.config.text_config.num_attention_heads == len(info["kept"][0]["heads"]) < 4
    if unit == "query":
        assert plain.config.text_config.num_key_value_heads == 2
    reference = masked_original(checkpoint, info["kept"])
    assert (text_logits(plain, IDS) - text_logits(reference, IDS)).abs().max() <= 1e-4


def test_layer_removal_saved_and_reloaded_equals_skipping(checkpoint, tmp_path):
    model, processor = load(checkpoint)
    pruned = remove_layers(model, [1, 2])
    pruned.save_pretrained(tmp_path / "layers")
    plain = type(model).from_pretrained(tmp_path / "layers").eval()
    assert plain.config.text_config.num_hidden_layers == 2
    assert (text_logits(plain, IDS) - text_logits(skipped_copy(model, [1, 2]), IDS)).abs().max() <= 1e-4


def test_a_projector_that_is_no_two_layer_mlp_refuses_hidden_pruning_by_name(checkpoint, tmp_path, capsys):
    """Idefics3's connector is one linear after a pixel shuffle: width pruning works, hidden-size pruning is
    refused with the reason (and nothing is written); the LLaVA-layout families prune the hidden size too."""
    out = tmp_path / "hidden"
    code = main(["prune", str(checkpoint), "--method", "width-magnitude", "--ratio", "0.3", "--out", str(out),
                 "--prune-hidden", "--importance-dir", str(tmp_path / "importance")])
    if json.loads((checkpoint / "config.json").read_text())["model_type"] == "idefics3":
        assert code == 2 and "projector is not Linear(vision -> hidden)" in capsys.readouterr().err
        assert not out.exists()
    else:
        assert code == 0 and json.loads((out / "pruning.json").read_text())["hidden_size"] < 64
        model, _ = load(out)  # strict: every weight (LLaVA-OneVision's image_newline too) has the pruned width
        assert LMAdapter(model).config.hidden_size == json.loads((out / "pruning.json").read_text())["hidden_size"]
