"""Bunny -> native LLaVA conversion, checked against an independent forward pass.

The checkpoints here are scaled-down Bunny-v1.0-3B look-alikes with Bunny's exact
parameter names. The reference forward reads those Bunny weights directly: SigLIP
layers in plain torch (Bunny's feature path), the mlp2x_gelu projector, then a
`PhiForCausalLM` holding Bunny's LM weights with the image features spliced in
where Bunny's -200 image token stood.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from harness.convert.bunny import (
    ConversionError,
    convert_bunny,
    main_convert_bunny,
    vision_config,
)

V = "model.vision_tower.vision_tower.vision_model."
VIS = {"hidden": 32, "inter": 48, "heads": 2, "patch": 8, "image": 32, "eps": 1e-6}
PHI = {"hidden": 64, "inter": 128, "layers": 2, "heads": 4}
WORDS = ["<unk>", "<pad>", "<|endoftext|>"] + [f"w{i}" for i in range(97)]  # 100 tokens
PROMPT_BEFORE, PROMPT_AFTER = ["w1", "w2"], ["w3", "w4", "w5"]
N_PATCHES = (VIS["image"] // VIS["patch"]) ** 2

# name: (vision layers in the checkpoint, pooling head present, fused qkv, LM vocab rows)
VARIANTS = {
    "v1_0": (2, False, False, 100),  # Bunny v1.0: 3-layer tower, last layer deleted, head -> Identity
    "full_stack": (3, True, False, 104),  # later Bunny: whole tower + head, select_layer -2
    "fused_qkv": (2, False, True, 100),  # Bunny before Feb 2024: Phi query_key_value
}


def _rand(gen, *shape, scale=0.1):
    return torch.randn(*shape, generator=gen) * scale


def _linear(gen, out, name, n_out, n_in):
    out[f"{name}.weight"] = _rand(gen, n_out, n_in)
    out[f"{name}.bias"] = _rand(gen, n_out)


def _norm(gen, out, name, n):
    out[f"{name}.weight"] = 1 + _rand(gen, n)
    out[f"{name}.bias"] = _rand(gen, n)


def vision_weights(gen, layers: int, head: bool) -> dict:
    d, f = VIS["hidden"], VIS["inter"]
    w = {f"{V}embeddings.patch_embedding.weight": _rand(gen, d, 3, VIS["patch"], VIS["patch"]),
         f"{V}embeddings.patch_embedding.bias": _rand(gen, d),
         f"{V}embeddings.position_embedding.weight": _rand(gen, N_PATCHES, d)}
    for i in range(layers):
        p = f"{V}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(gen, w, p + "self_attn." + proj, d, d)
        _norm(gen, w, p + "layer_norm1", d)
        _norm(gen, w, p + "layer_norm2", d)
        _linear(gen, w, p + "mlp.fc1", f, d)
        _linear(gen, w, p + "mlp.fc2", d, f)
    _norm(gen, w, f"{V}post_layernorm", d)
    if head:
        w[f"{V}head.probe"] = _rand(gen, 1, 1, d)
        w[f"{V}head.attention.in_proj_weight"] = _rand(gen, 3 * d, d)
        w[f"{V}head.attention.in_proj_bias"] = _rand(gen, 3 * d)
        _linear(gen, w, f"{V}head.attention.out_proj", d, d)
        _norm(gen, w, f"{V}head.layernorm", d)
        _linear(gen, w, f"{V}head.mlp.fc1", f, d)
        _linear(gen, w, f"{V}head.mlp.fc2", d, f)
    return w


def lm_weights(gen, vocab: int) -> dict:
    h, f = PHI["hidden"], PHI["inter"]
    w = {"model.embed_tokens.weight": _rand(gen, vocab, h, scale=1.0)}
    for i in range(PHI["layers"]):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "dense"):
            _linear(gen, w, p + "self_attn." + proj, h, h)
        _linear(gen, w, p + "mlp.fc1", f, h)
        _linear(gen, w, p + "mlp.fc2", h, f)
        _norm(gen, w, p + "input_layernorm", h)
    _norm(gen, w, "model.final_layernorm", h)
    w["lm_head.weight"] = _rand(gen, vocab, h)  # Bunny's lm_head: nn.Linear(..., bias=False)
    return w


def fuse_qkv(w: dict) -> dict:
    """Write q/k/v the way early Bunny Phi stored them: one matrix, per head [q, k, v]."""
    out, heads = dict(w), PHI["heads"]
    for i in range(PHI["layers"]):
        p = f"model.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            parts = [out.pop(f"{p}{n}_proj.{kind}") for n in "qkv"]
            per_head = [t.reshape(heads, -1, *t.shape[1:]) for t in parts]
            out[f"{p}query_key_value.{kind}"] = torch.stack(per_head, dim=1).reshape(-1, *parts[0].shape[1:])
    return out


def bunny_config(vocab: int) -> dict:
    return {
        "model_type": "bunny-phi", "architectures": ["BunnyPhiForCausalLM"],
        "mm_vision_tower": "tests/siglip-tiny-patch8-32", "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": VIS["hidden"], "use_mm_proj": True, "image_aspect_ratio": "pad",
        "vision_config": {"num_attention_heads": VIS["heads"], "layer_norm_eps": VIS["eps"]},
        "vocab_size": vocab, "hidden_size": PHI["hidden"], "intermediate_size": PHI["inter"],
        "num_hidden_layers": PHI["layers"], "num_attention_heads": PHI["heads"],
        "num_key_value_heads": PHI["heads"], "partial_rotary_factor": 0.4, "rope_theta": 10000.0,
        "rope_scaling": None, "hidden_act": "gelu_new", "layer_norm_eps": 1e-5, "qk_layernorm": False,
        "max_position_embeddings": 128, "tie_word_embeddings": False, "bos_token_id": 2, "eos_token_id": 2,
        "tokenizer_model_max_length": 128, "tokenizer_padding_side": "right",
    }


def save_tokenizer(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                            eos_token="<|endoftext|>").save_pretrained(path)


def make_bunny(path, variant: str = "v1_0"):
    """Write a tiny Bunny checkpoint; returns its unfused weights for the reference forward."""
    layers, head, fused, vocab = VARIANTS[variant]
    gen = torch.Generator().manual_seed(1234)
    weights = {**vision_weights(gen, layers, head), **lm_weights(gen, vocab)}
    _linear(gen, weights, "model.mm_projector.0", PHI["hidden"], VIS["hidden"])
    _linear(gen, weights, "model.mm_projector.2", PHI["hidden"], PHI["hidden"])
    path.mkdir(parents=True, exist_ok=True)
    save_file(fuse_qkv(weights) if fused else weights, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(bunny_config(vocab)))
    save_tokenizer(path)
    return weights


# ---------------------------------------------------------------- reference forward


def _ln(x, w, name):
    return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], VIS["eps"])


def _lin(x, w, name):
    return F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"])


def siglip_layer(x, w, p):
    b, t, d = x.shape
    heads = VIS["heads"]
    h = _ln(x, w, p + "layer_norm1")
    q, k, v = (_lin(h, w, f"{p}self_attn.{n}_proj").view(b, t, heads, -1).transpose(1, 2) for n in "qkv")
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
    x = x + _lin(att.transpose(1, 2).reshape(b, t, d), w, p + "self_attn.out_proj")
    h = _ln(x, w, p + "layer_norm2")
    return x + _lin(F.gelu(_lin(h, w, p + "mlp.fc1"), approximate="tanh"), w, p + "mlp.fc2")


def bunny_image_features(w, pixels, layers_run: int):
    """Bunny's tower output: embeddings, then `layers_run` encoder layers; no post_layernorm, no head."""
    x = F.conv2d(pixels, w[f"{V}embeddings.patch_embedding.weight"], w[f"{V}embeddings.patch_embedding.bias"],
                 stride=VIS["patch"]).flatten(2).transpose(1, 2)
    x = x + w[f"{V}embeddings.position_embedding.weight"]
    for i in range(layers_run):
        x = siglip_layer(x, w, f"{V}encoder.layers.{i}.")
    return _lin(F.gelu(_lin(x, w, "model.mm_projector.0")), w, "model.mm_projector.2")


def bunny_phi(w, vocab: int):
    from transformers import PhiConfig, PhiForCausalLM

    cfg = {k: v for k, v in bunny_config(vocab).items() if not k.startswith(("mm_", "vision", "architectures"))}
    model = PhiForCausalLM(PhiConfig(**{**cfg, "model_type": "phi"})).eval()
    state = {k: v for k, v in w.items() if k.startswith(("model.embed", "model.layers", "model.final", "lm_head"))}
    state["lm_head.bias"] = torch.zeros(vocab)  # native Phi's lm_head has a bias; Bunny's has none
    model.load_state_dict(state, strict=True)
    return model


def reference_logits(w, variant: str, pixels, before, after):
    """Logits of Bunny's forward: token embeddings | image features (in place of -200) | token embeddings."""
    layers, head, _, vocab = VARIANTS[variant]
    layers_run = layers - 1 if head else layers  # select_layer -2 of the full tower vs. -1 of the shortened one
    feats = bunny_image_features(w, pixels, layers_run)[0]
    phi = bunny_phi(w, vocab)
    embed = phi.model.embed_tokens
    seq = torch.cat([embed(torch.tensor(before)), feats, embed(torch.tensor(after))])
    return phi(inputs_embeds=seq[None]).logits[0]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def converted(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    weights = make_bunny(base / "bunny", request.param)
    dst = convert_bunny(base / "bunny", base / "native")
    return request.param, weights, dst


def _ids(words):
    return [WORDS.index(x) for x in words]


# ---------------------------------------------------------------- equivalence


@torch.no_grad()
def test_native_logits_match_bunny_reference(converted):
    from transformers import LlavaForConditionalGeneration

    variant, weights, dst = converted
    model = LlavaForConditionalGeneration.from_pretrained(dst, dtype=torch.float32).eval()
    image_id = model.config.image_token_id
    pixels = torch.randn(1, 3, VIS["image"], VIS["image"], generator=torch.Generator().manual_seed(7))
    before, after = _ids(PROMPT_BEFORE), _ids(PROMPT_AFTER)
    ids = torch.tensor([before + [image_id] * N_PATCHES + after])
    got = model(input_ids=ids, pixel_values=pixels).logits[0]
    want = reference_logits(weights, variant, pixels, before, after)
    vocab = VARIANTS[variant][3]
    assert got.shape[0] == want.shape[0] == len(before) + N_PATCHES + len(after)
    assert (got[:, :vocab] - want).abs().max().item() <= 1e-5
    assert got.shape[1] == max(vocab, image_id + 1)


def test_config_records_decisions(converted):
    variant, _, dst = converted
    layers, head, _, vocab = VARIANTS[variant]
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["vision_feature_select_strategy"] == "full"
    assert cfg["vision_feature_layer"] == (-2 if head else -1)
    assert cfg["vision_config"]["num_hidden_layers"] == layers
    assert cfg["vision_config"]["image_size"] == VIS["image"] and cfg["vision_config"]["patch_size"] == VIS["patch"]
    assert cfg["image_token_index"] == len(WORDS)  # the id the tokenizer gave `<image>`
    assert cfg["text_config"]["vocab_size"] == max(vocab, len(WORDS) + 1)
    assert cfg["bunny_conversion"]["vocab_rows_added"] == max(0, len(WORDS) + 1 - vocab)
    assert cfg["vision_config"]["vision_use_head"] is False


@torch.no_grad()
def test_processor_expands_image_token(converted):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    _, _, dst = converted
    processor = AutoProcessor.from_pretrained(dst)
    image = Image.new("RGB", (40, 30), color=(200, 30, 90))
    text = " ".join(PROMPT_BEFORE + ["<image>"] + PROMPT_AFTER)
    inputs = processor(images=image, text=text, return_tensors="pt")
    image_id = len(WORDS)
    expected = _ids(PROMPT_BEFORE) + [image_id] * N_PATCHES + _ids(PROMPT_AFTER)
    assert inputs["input_ids"][0].tolist() == expected
    assert tuple(inputs["pixel_values"].shape) == (1, 3, VIS["image"], VIS["image"])
    model = LlavaForConditionalGeneration.from_pretrained(dst).eval()
    assert torch.isfinite(model(**inputs).logits).all()


def test_real_bunny_vision_shapes_map_to_26_layers_feature_minus_one():
    """The shipped Bunny-v1_0-3B tower: 26 of SigLIP-so400m's 27 layers, no head, name-only config."""
    d = 1152
    w = {f"{V}embeddings.patch_embedding.weight": torch.empty(d, 3, 14, 14, device="meta"),
         f"{V}embeddings.position_embedding.weight": torch.empty(729, d, device="meta"),
         **{f"{V}encoder.layers.{i}.mlp.fc1.weight": torch.empty(4304, d, device="meta") for i in range(26)}}
    cfg = {"mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_hidden_size": d}
    vision, layer = vision_config(cfg, w)
    assert layer == -1
    assert (vision["num_hidden_layers"], vision["num_attention_heads"], vision["image_size"]) == (26, 16, 384)
    assert vision["intermediate_size"] == 4304 and not vision["vision_use_head"]
    with pytest.raises(ConversionError, match="cannot tell"):
        vision_config(cfg, {**w, f"{V}encoder.layers.26.mlp.fc1.weight": torch.empty(4304, d, device="meta")})


# ---------------------------------------------------------------- errors and atomicity


def _no_leftovers(parent, name):
    return not any(p.name.startswith(f".{name}.tmp-") for p in parent.iterdir())


def test_missing_weights_file(tmp_path):
    src = tmp_path / "bunny"
    make_bunny(src)
    (src / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"model\.safetensors or model\.safetensors\.index\.json"):
        convert_bunny(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unexpected_parameter_is_named_and_leaves_no_dst(tmp_path):
    from safetensors.torch import load_file

    src = tmp_path / "bunny"
    make_bunny(src)
    weights = load_file(str(src / "model.safetensors"))
    weights["model.layers.0.mlp.extra_gate.weight"] = torch.zeros(2, 2)
    save_file(weights, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.mlp\.extra_gate\.weight"):
        convert_bunny(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path, "out")


def test_unmapped_name_outside_known_prefixes(tmp_path):
    from safetensors.torch import load_file

    src = tmp_path / "bunny"
    make_bunny(src)
    weights = load_file(str(src / "model.safetensors"))
    weights["model.mm_projector.4.weight"] = torch.zeros(2, 2)
    save_file(weights, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"unexpected parameter names.*model\.mm_projector\.4\.weight"):
        convert_bunny(src, tmp_path / "out")


def test_missing_parameter_is_named_in_bunny_terms(tmp_path):
    from safetensors.torch import load_file

    src = tmp_path / "bunny"
    make_bunny(src)
    weights = load_file(str(src / "model.safetensors"))
    del weights["model.final_layernorm.bias"]
    save_file(weights, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"missing.*model\.final_layernorm\.bias"):
        convert_bunny(src, tmp_path / "out")


def test_not_a_bunny_config(tmp_path):
    src = tmp_path / "bunny"
    make_bunny(src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "llava"}))
    with pytest.raises(ConversionError, match="not a Bunny"):
        convert_bunny(src, tmp_path / "out")


def test_non_empty_dst_is_refused_and_kept(tmp_path):
    src, dst = tmp_path / "bunny", tmp_path / "out"
    make_bunny(src)
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not an empty directory"):
        convert_bunny(src, dst)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_failure_while_writing_leaves_no_dst(tmp_path, monkeypatch):
    import harness.convert.bunny as bunny

    def broken(*args, **kwargs):
        raise ConversionError("simulated failure while saving")

    src, dst = tmp_path / "bunny", tmp_path / "out"
    make_bunny(src)
    monkeypatch.setattr(bunny, "build_processor", broken)
    with pytest.raises(ConversionError, match="simulated"):
        convert_bunny(src, dst)
    assert not dst.exists() and _no_leftovers(tmp_path, "out")


def test_cli_success_and_error(tmp_path, capsys):
    src, dst = tmp_path / "bunny", tmp_path / "out"
    make_bunny(src)
    assert main_convert_bunny([str(src), str(dst), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("converted")
    assert main_convert_bunny([str(src), str(dst)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_sharded_bfloat16_checkpoint(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    src = tmp_path / "bunny"
    make_bunny(src)
    weights = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: weights[n].to(torch.bfloat16) for n in part}, str(src / file))
    index = {"weight_map": {n: file for file, part in shards.items() for n in part}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    dst = convert_bunny(src, tmp_path / "out")
    files = list(dst.glob("*.safetensors"))
    assert files
    with safe_open(str(files[0]), framework="pt") as f:
        assert all(f.get_tensor(n).dtype == torch.bfloat16 for n in f.keys())


def test_without_tokenizer_appends_image_row(tmp_path):
    src = tmp_path / "bunny"
    make_bunny(src)
    for p in src.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens")):
            p.unlink()
    dst = convert_bunny(src, tmp_path / "out", dtype="float32")
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["image_token_index"] == 100 and cfg["text_config"]["vocab_size"] == 101
    assert cfg["bunny_conversion"]["tokenizer"] == "no tokenizer files"
    assert not (dst / "tokenizer.json").exists()
