"""The real models' configs, shipped with the harness so they can be sized without a download.

`harness/models/configs/` holds one `config.json` per real target, as a native
`LlavaForConditionalGeneration` sees it:

- `llava-1.5-7b-hf.json`: llava-hf/llava-1.5-7b-hf (CLIP ViT-L/14-336 + Vicuna-7B-v1.5);
- `bunny-v1_0-3b-native.json`: BAAI/Bunny-v1_0-3B after `harness convert bunny`
  (SigLIP-so400m without its last layer + Phi-2).

Each file carries a `_source` field saying where its values come from; `real_config`
drops it. Loading weights still goes through `harness.models.load` (hub id or the
converted directory): these configs only build models on the meta device, for plans,
parameter counts and memory estimates.
"""

from __future__ import annotations

import json
from pathlib import Path

from harness.errors import HarnessError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Hub id -> shipped file stem. BAAI/Bunny-v1_0-3B maps to its *converted* native config.
REAL_MODELS = {
    "llava-hf/llava-1.5-7b-hf": "llava-1.5-7b-hf",
    "BAAI/Bunny-v1_0-3B": "bunny-v1_0-3b-native",
}

# BAAI/Bunny-v1_0-3B's own config.json (remote code, model_type bunny-phi), as published.
# `bunny_native_config` runs the converter's config logic on it; a test checks the shipped file against that.
BUNNY_V1_0_3B_CONFIG = {
    "_name_or_path": "BAAI/bunny-phi-2-siglip", "architectures": ["BunnyPhiForCausalLM"],
    "attention_dropout": 0.0, "bos_token_id": 50256, "embd_pdrop": 0.0, "eos_token_id": 50256,
    "freeze_mm_mlp_adapter": False, "hidden_act": "gelu_new", "hidden_size": 2560, "image_aspect_ratio": "pad",
    "initializer_range": 0.02, "intermediate_size": 10240, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048, "mm_hidden_size": 1152, "mm_projector_lr": 2e-05,
    "mm_projector_type": "mlp2x_gelu", "mm_vision_tower": "google/siglip-so400m-patch14-384",
    "model_type": "bunny-phi", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pad_token_id": 50256, "partial_rotary_factor": 0.4, "qk_layernorm": False, "resid_pdrop": 0.1,
    "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False, "tokenizer_model_max_length": 2048,
    "tokenizer_padding_side": "right", "torch_dtype": "float16", "transformers_version": "4.36.2",
    "tune_mm_mlp_adapter": False, "use_cache": True, "use_mm_proj": True, "vocab_size": 50295,
}
# Bunny v1.0 deleted SigLIP-so400m's last layer (27 -> 26) and its pooling head before saving.
BUNNY_VISION_LAYERS = 26
# Phi-2's tokenizer: 50257 BPE tokens + 38 added ones = Bunny's vocab_size; `<image>` becomes the next id.
BUNNY_IMAGE_TOKEN_ID = 50295


def known_names() -> list[str]:
    return sorted(REAL_MODELS) + sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def find_real_config(name: str | Path) -> Path | None:
    """The shipped config file for a hub id, a file stem or name, or a path ending in one; None if unknown.

    `checkpoints/bunny-v1_0-3b-native` (where `harness convert bunny` is told to write) maps to
    `bunny-v1_0-3b-native.json`, so a spec naming the converted directory can be sized before it exists.
    """
    name = str(name).rstrip("/")
    stem = REAL_MODELS.get(name)
    if stem is None:
        leaf = name.rsplit("/", 1)[-1]
        stem = leaf[:-5] if leaf.endswith(".json") else leaf
    path = CONFIG_DIR / f"{stem}.json"
    return path if path.is_file() else None


def read_real_config(name: str | Path) -> dict:
    """The shipped config as a dict, without its `_source` note."""
    path = find_real_config(name)
    if path is None:
        raise HarnessError(f"no shipped config for {str(name)!r}; known: {', '.join(known_names())}")
    raw = json.loads(path.read_text())
    return {k: v for k, v in raw.items() if k != "_source"}


def real_config(name: str | Path):
    """A `LlavaConfig` for `llava-hf/llava-1.5-7b-hf`, `BAAI/Bunny-v1_0-3B` (native, converted) or a file name."""
    from transformers import LlavaConfig

    return LlavaConfig.from_dict(read_real_config(name))


def source_note(name: str | Path) -> dict:
    """Where the shipped config's values come from (its `_source` field)."""
    path = find_real_config(name)
    if path is None:
        raise HarnessError(f"no shipped config for {str(name)!r}; known: {', '.join(known_names())}")
    return json.loads(path.read_text()).get("_source", {})


def bunny_native_config(bunny_config: dict | None = None, vision_layers: int = BUNNY_VISION_LAYERS,
                        image_token_id: int = BUNNY_IMAGE_TOKEN_ID):
    """The native `LlavaConfig` `harness convert bunny` writes for Bunny-v1_0-3B, from its config and tower shape.

    The converter reads the tower's depth, widths and patch size off the weights; meta tensors
    of the published shapes stand in for them here.
    """
    import torch

    from harness.convert.bunny import VISION_SRC, build_llava_config, vision_config

    cfg = dict(bunny_config or BUNNY_V1_0_3B_CONFIG)
    d, patch, grid, inter = 1152, 14, 27, 4304  # SigLIP-so400m-patch14-384
    shapes = {
        f"{VISION_SRC}embeddings.patch_embedding.weight": torch.empty(d, 3, patch, patch, device="meta"),
        f"{VISION_SRC}embeddings.position_embedding.weight": torch.empty(grid * grid, d, device="meta"),
        **{f"{VISION_SRC}encoder.layers.{i}.mlp.fc1.weight": torch.empty(inter, d, device="meta")
           for i in range(vision_layers)},
    }
    vision, feature_layer = vision_config(cfg, shapes)
    vocab = max(int(cfg["vocab_size"]), image_token_id + 1)
    config = build_llava_config(cfg, vision, feature_layer, image_token_id, vocab)
    config.bunny_conversion["tokenizer"] = "tokenizer and processor saved"
    return config
