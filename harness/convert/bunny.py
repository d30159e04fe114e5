"""Convert a Bunny Phi checkpoint (``model_type: bunny-phi``) into native LLaVA.

Bunny ships as remote code. The project runs only native transformers models, so
this converter renames the weights and writes a ``LlavaForConditionalGeneration``
(SigLIP vision config, Phi text config) that ``from_pretrained`` loads without
``trust_remote_code``. It never runs Bunny's code and never unpickles anything.

Names, read from BAAI-DCAI/Bunny (bunny_arch.py, language_model/bunny_phi.py,
multimodal_encoder/siglip/siglip_encoder.py, multimodal_projector/builder.py):

Bunny checkpoint                               native LLaVA
---------------------------------------------  --------------------------------------------
model.vision_tower.vision_tower.vision_model.  model.vision_tower.
  {embeddings,encoder,post_layernorm}.*          {embeddings,encoder,post_layernorm}.*
model.vision_tower.vision_tower.vision_model.  dropped (pooling head; the features never
  head.*                                         pass through it)
model.mm_projector.0.* (.1 is the GELU)        model.multi_modal_projector.linear_1.*
model.mm_projector.2.*                         model.multi_modal_projector.linear_2.*
model.embed_tokens.weight                      model.language_model.embed_tokens.weight
model.layers.N.{self_attn.{q,k,v}_proj,        model.language_model.layers.N.(same names)
  self_attn.dense,mlp.fc1,mlp.fc2,
  input_layernorm}.*
model.layers.N.self_attn.query_key_value.*     split into self_attn.{q,k,v}_proj.*
  (Bunny's Phi before Feb 2024)
model.final_layernorm.*                        model.language_model.final_layernorm.*
lm_head.weight (Bunny's lm_head has no bias)   lm_head.weight
*.position_ids, *.rotary_emb.inv_freq          dropped (buffers, recomputed at load)

Vision features. Bunny v1.0 (the code behind Bunny-v1_0-3B) deletes the last
encoder layer of SigLIP, replaces the pooling head with Identity and uses
``hidden_states[-1]`` of the shortened stack: the output of layer L-1 of L before
``post_layernorm``, i.e. ``hidden_states[-2]`` of the full tower. Its checkpoint
holds L-1 layers and no head. We keep exactly the layers present and set
``vision_feature_layer=-1``: the same features, with no dead layer to compute.
Later Bunny code keeps all L layers (and the head) and selects layer -2; a
checkpoint with head weights is read that way and keeps ``vision_feature_layer=-2``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open

from harness.errors import HarnessError
from harness.io import atomic_dir

BUNNY_MODEL_TYPE = "bunny-phi"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
IMAGE_TOKEN = "<image>"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
)

VISION_SRC = "model.vision_tower.vision_tower.vision_model."
EMBED = "model.language_model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
# (Bunny prefix, native prefix); used both ways, so error messages can name Bunny's names.
PREFIXES = (
    (VISION_SRC, "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.final_layernorm.", "model.language_model.final_layernorm."),
    ("lm_head.", "lm_head."),
)
DROPPED_SUFFIXES = (".position_ids", ".rotary_emb.inv_freq")
FUSED_QKV = ".self_attn.query_key_value."

# SigLIP hyper-parameters that weights cannot reveal (heads, eps, activation) come from here.
KNOWN_VISION_TOWERS = {
    "siglip-so400m-patch14-384": {
        "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
        "num_attention_heads": 16, "patch_size": 14, "image_size": 384,
        "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh",
    },
}
VISION_DEFAULTS = {"layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh", "attention_dropout": 0.0}
VISION_SUBCONFIG_KEYS = ("vision_config", "mm_vision_config", "vision_tower_config", "vision_tower")
VISION_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
    "patch_size", "image_size", "layer_norm_eps", "hidden_act", "attention_dropout",
)
PHI_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
PHI_FIELDS = PHI_REQUIRED + (
    "num_key_value_heads", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_act",
    "max_position_embeddings", "initializer_range", "layer_norm_eps", "use_cache", "rope_theta",
    "rope_scaling", "partial_rotary_factor", "rope_parameters", "qk_layernorm", "bos_token_id",
    "eos_token_id", "pad_token_id",
)


class ConversionError(HarnessError):
    """A checkpoint that cannot be converted faithfully; the message is one line naming the cause."""


def _few(names, limit: int = 5) -> str:
    """Name a handful of offenders: enough to act on, short enough for one line."""
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---------------------------------------------------------------- reading the source


def read_bunny_config(src: Path) -> dict:
    """Refuse early anything that is not a SigLIP + mlp2x_gelu Bunny Phi: native LLaVA cannot express it."""
    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(f"{src}: no config.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc.msg})") from exc
    if not isinstance(cfg, dict) or cfg.get("model_type") != BUNNY_MODEL_TYPE:
        found = cfg.get("model_type") if isinstance(cfg, dict) else None
        raise ConversionError(f"{path}: model_type is {found!r}, not {BUNNY_MODEL_TYPE!r}: not a Bunny Phi config")
    _check_bunny_options(path, cfg)
    return cfg


def _check_bunny_options(path: Path, cfg: dict) -> None:
    """Bunny variants whose forward pass native LLaVA does not reproduce are refused, not approximated."""
    tower = cfg.get("mm_vision_tower")
    if not isinstance(tower, str) or "sig" not in tower.lower():
        raise ConversionError(f"{path}: mm_vision_tower {tower!r} is not a SigLIP tower")
    projector = cfg.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise ConversionError(f"{path}: mm_projector_type {projector!r} unsupported (only mlp2x_gelu)")
    if cfg.get("use_s2"):
        raise ConversionError(f"{path}: use_s2 (multi-scale features) has no native LLaVA equivalent")
    if cfg.get("tie_word_embeddings"):
        raise ConversionError(f"{path}: tie_word_embeddings is true; Bunny Phi keeps lm_head separate")
    missing = [key for key in PHI_REQUIRED if key not in cfg]
    if missing:
        raise ConversionError(f"{path}: Phi fields missing: {_few(missing)}")


def _weight_files(src: Path) -> list[Path]:
    """Only safetensors: pickled .bin weights can run arbitrary code when loaded."""
    single, index = src / WEIGHTS_FILE, src / INDEX_FILE
    if single.is_file():
        return [single]
    if not index.is_file():
        raise ConversionError(f"{src}: no weights: expected {WEIGHTS_FILE} or {INDEX_FILE} (.bin is not read)")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConversionError(f"{index}: no readable weight_map") from exc
    files = [src / name for name in sorted(set(weight_map.values()))]
    absent = [f.name for f in files if not f.is_file()]
    if absent or not files:
        raise ConversionError(f"{index}: shard files missing: {_few(absent) or 'none listed'}")
    return files


def read_bunny_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint by Bunny name."""
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(src):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


# ---------------------------------------------------------------- renaming


def split_fused_qkv(weights: dict, num_heads: int) -> dict:
    """Early Bunny Phi fused q/k/v per head as [q, k, v] blocks (view(heads, 3, head_dim)); native Phi keeps three."""
    out = {}
    for name, tensor in weights.items():
        if FUSED_QKV not in name:
            out[name] = tensor
            continue
        prefix, kind = name.split(FUSED_QKV)
        parts = tensor.reshape(num_heads, 3, -1, *tensor.shape[1:])
        for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{prefix}.self_attn.{proj}.{kind}"] = parts[:, i].reshape(-1, *tensor.shape[1:]).clone()
    return out


def _swap_prefix(name: str, pairs) -> str | None:
    for old, new in pairs:
        if name.startswith(old):
            return new + name[len(old):]
    return None


def native_name(bunny: str) -> str | None:
    """The native name of one Bunny tensor, or None when no rule covers it."""
    return _swap_prefix(bunny, PREFIXES)


def bunny_name(native: str) -> str:
    """Inverse of native_name, so 'missing' errors name what the user would look for in the checkpoint."""
    return _swap_prefix(native, [(new, old) for old, new in PREFIXES]) or native


def _is_dropped(name: str) -> bool:
    """Buffers are recomputed at load, and the pooling head never feeds the LLaVA features."""
    return name.startswith(VISION_SRC + "head.") or name.endswith(DROPPED_SUFFIXES)


def rename_weights(weights: dict) -> dict:
    """Native-named tensors; any name without a rule is an error, never silently lost."""
    native, unmapped = {}, []
    for name, tensor in weights.items():
        if _is_dropped(name):
            continue
        new = native_name(name)
        if new is None:
            unmapped.append(name)
        else:
            native[new] = tensor
    if unmapped:
        raise ConversionError(f"unexpected parameter names in the Bunny checkpoint: {_few(unmapped)}")
    return native


# ---------------------------------------------------------------- configs


def _declared_vision(cfg: dict) -> dict:
    """What the config says about the tower: a vision sub-config over the known-name table."""
    name = cfg["mm_vision_tower"].rstrip("/").rsplit("/", 1)[-1]
    declared = dict(KNOWN_VISION_TOWERS.get(name, {}))
    sub = next((cfg[key] for key in VISION_SUBCONFIG_KEYS if isinstance(cfg.get(key), dict)), {})
    declared.update({key: value for key, value in sub.items() if key in VISION_FIELDS})
    return declared


def _vision_shapes(weights: dict) -> dict:
    """Widths, patch, image size and depth read off the tensors, so scaled-down towers need no table entry."""
    names = ("embeddings.patch_embedding.weight", "embeddings.position_embedding.weight",
             "encoder.layers.0.mlp.fc1.weight")
    absent = [VISION_SRC + n for n in names if VISION_SRC + n not in weights]
    if absent:
        raise ConversionError(f"vision tower weights missing: {_few(absent)}")
    patch, pos, fc1 = (weights[VISION_SRC + n] for n in names)
    side = math.isqrt(pos.shape[0])
    if side * side != pos.shape[0]:
        raise ConversionError(f"vision position embedding has {pos.shape[0]} rows, not a square grid")
    layer_prefix = VISION_SRC + "encoder.layers."
    layers = {int(n[len(layer_prefix):].split(".")[0]) for n in weights if n.startswith(layer_prefix)}
    if layers != set(range(len(layers))):
        raise ConversionError(f"vision encoder layers are not numbered 0..n-1: {sorted(layers)}")
    return {
        "hidden_size": patch.shape[0], "num_channels": patch.shape[1], "patch_size": patch.shape[-1],
        "image_size": side * patch.shape[-1], "intermediate_size": fc1.shape[0], "num_hidden_layers": len(layers),
    }


def vision_config(cfg: dict, weights: dict) -> tuple[dict, int]:
    """SigLIP config kwargs and the vision_feature_layer that reproduce Bunny's features (see module doc)."""
    declared, shapes = _declared_vision(cfg), _vision_shapes(weights)
    image = declared.get("image_size")
    if image is not None and image // shapes["patch_size"] == shapes["image_size"] // shapes["patch_size"]:
        shapes["image_size"] = image  # 384 px / 14 px patches -> 27x27 grid; the conv drops the 6 px remainder
    full_stack = any(name.startswith(VISION_SRC + "head.") for name in weights)
    depth = declared.get("num_hidden_layers")
    if depth is not None and shapes["num_hidden_layers"] != depth - (0 if full_stack else 1):
        kind = "with" if full_stack else "without"
        raise ConversionError(f"vision tower has {shapes['num_hidden_layers']} layers {kind} a pooling head; "
                              f"{cfg['mm_vision_tower']} has {depth}: cannot tell which features Bunny used")
    heads = declared.get("num_attention_heads")
    if heads is None or shapes["hidden_size"] % heads:
        raise ConversionError(f"vision num_attention_heads unknown or not dividing {shapes['hidden_size']}: "
                              f"give a vision_config sub-config for {cfg['mm_vision_tower']!r}")
    mm_hidden = cfg.get("mm_hidden_size")
    if mm_hidden is not None and mm_hidden != shapes["hidden_size"]:
        raise ConversionError(f"mm_hidden_size {mm_hidden} != vision width {shapes['hidden_size']} in the weights")
    merged = {**VISION_DEFAULTS, **declared, **shapes, "vision_use_head": False}
    return merged, (-2 if full_stack else -1)


def text_config(cfg: dict) -> dict:
    """Phi fields only: Bunny's mm_* and training keys mean nothing to the native text model."""
    return {"model_type": "phi", **{key: cfg[key] for key in PHI_FIELDS if key in cfg}}


# ---------------------------------------------------------------- image token


def _grow_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """New vocabulary rows start at the mean row: a neutral embedding and an unremarkable logit."""
    extra = rows - tensor.shape[0]
    if extra <= 0:
        return tensor
    mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
    return torch.cat([tensor, mean.expand(extra, -1)], dim=0)


def add_image_token(tokenizer, weights: dict, vocab_size: int) -> tuple[int, int]:
    """Give `<image>` a real id (Bunny used -200, spliced out before embedding); returns (id, new vocab size).

    The id is whatever the tokenizer assigns. If it falls inside the existing matrix
    (Phi-2: 50295 tokens, 51200 rows) that unused row is reused and the logits keep
    their shape; otherwise embedding and lm_head grow to hold it. Without a tokenizer
    the id is one appended row.
    """
    if tokenizer is None:
        token_id = vocab_size
    else:
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rows = max(vocab_size, token_id + 1)
    for name in (EMBED, LM_HEAD):
        if name in weights:
            weights[name] = _grow_rows(weights[name], rows)
    return token_id, rows


# ---------------------------------------------------------------- tokenizer and processor


def load_tokenizer(src: Path):
    """The tokenizer, or None with the reason; loaded from a copy of its files only.

    AutoTokenizer on `src` itself could fall back to Bunny's config.json, whose model
    type needs remote code; remote code is never enabled.
    """
    files = [src / name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not files:
        return None, "no tokenizer files"
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for file in files:
            shutil.copy2(file, tmp)
        try:
            tokenizer = AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - any failure means: copy the files, skip the processor
            return None, f"tokenizer did not load ({type(exc).__name__}); files copied unchanged"
    return tokenizer, "tokenizer and processor saved"


def build_processor(tokenizer, vision: dict):
    """A LlavaProcessor that expands `<image>` to one token per SigLIP patch (no CLS: strategy 'full')."""
    from transformers import LlavaProcessor, SiglipImageProcessor

    side = vision["image_size"]
    image_processor = SiglipImageProcessor(size={"height": side, "width": side})
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision["patch_size"],
        vision_feature_select_strategy="full", image_token=IMAGE_TOKEN, num_additional_image_tokens=0,
    )


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


# ---------------------------------------------------------------- model


def resolve_dtype(dtype, weights: dict) -> torch.dtype:
    """Default to the checkpoint's own float dtype, so conversion neither loses nor invents precision."""
    if dtype is None:
        counts = Counter(t.dtype for t in weights.values() if t.is_floating_point())
        return counts.most_common(1)[0][0] if counts else torch.float32
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ConversionError(f"dtype {dtype!r} is not a torch floating dtype")
    return resolved


def _check_against(model, weights: dict) -> None:
    """Strict loading with messages in Bunny's names instead of torch's multi-line report."""
    expected = model.state_dict()
    unexpected = [bunny_name(k) for k in weights if k not in expected]
    if unexpected:
        raise ConversionError(f"unexpected parameter names in the Bunny checkpoint: {_few(unexpected)}")
    missing = [bunny_name(k) for k in expected if k not in weights]
    if missing:
        raise ConversionError(f"parameters missing from the Bunny checkpoint: {_few(missing)}")
    wrong = [f"{bunny_name(k)} {tuple(weights[k].shape)} vs {tuple(v.shape)}"
             for k, v in expected.items() if weights[k].shape != v.shape]
    if wrong:
        raise ConversionError(f"shapes disagree with config.json: {_few(wrong, 3)}")


def build_model(config, weights: dict, dtype: torch.dtype):
    """Instantiate without random init (every tensor is overwritten) and load strictly."""
    from transformers import LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    _check_against(model, weights)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def build_llava_config(cfg: dict, vision: dict, feature_layer: int, token_id: int, vocab: int):
    """Native config; `bunny_conversion` records what the conversion decided, for later readers."""
    from transformers import LlavaConfig

    grid = vision["image_size"] // vision["patch_size"]
    record = {
        "source_model_type": BUNNY_MODEL_TYPE, "mm_vision_tower": cfg["mm_vision_tower"],
        "image_token": IMAGE_TOKEN, "image_token_index": token_id, "vocab_rows_added": vocab - cfg["vocab_size"],
        "vision_layers_in_checkpoint": vision["num_hidden_layers"],
        "vision_feature_layer_reason": "Bunny v1.0 dropped the last SigLIP layer; -1 of the rest = -2 of the full tower"
        if feature_layer == -1 else "full tower with head; Bunny selects hidden_states[-2]",
    }
    return LlavaConfig(
        vision_config={"model_type": "siglip_vision_model", **vision},
        text_config={**text_config(cfg), "vocab_size": vocab},
        image_token_index=token_id, image_seq_length=grid * grid, projector_hidden_act="gelu",
        vision_feature_layer=feature_layer, vision_feature_select_strategy="full",
        multimodal_projector_bias=True, tie_word_embeddings=False, bunny_conversion=record,
    )


# ---------------------------------------------------------------- entry points


def _check_dst(dst: Path) -> None:
    """Never overwrite: a non-empty DST may be someone's finished model."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConversionError(f"{dst}: exists and is not an empty directory")


def convert_bunny(src: str | Path, dst: str | Path, *, dtype=None) -> Path:
    """Convert the Bunny checkpoint in `src` into a native LLaVA folder `dst`; returns `dst`.

    Everything is built and checked in memory first, then written to a temporary
    sibling of `dst` that is renamed into place, so a failure leaves no `dst`.
    """
    src, dst = Path(src), Path(dst)
    _check_dst(dst)
    cfg = read_bunny_config(src)
    raw = split_fused_qkv(read_bunny_weights(src), int(cfg["num_attention_heads"]))
    vision, feature_layer = vision_config(cfg, raw)
    weights = rename_weights(raw)
    target = resolve_dtype(dtype, weights)
    weights = {k: (t.to(target) if t.is_floating_point() else t) for k, t in weights.items()}
    tokenizer, tokenizer_note = load_tokenizer(src)
    token_id, vocab = add_image_token(tokenizer, weights, int(cfg["vocab_size"]))
    config = build_llava_config(cfg, vision, feature_layer, token_id, vocab)
    config.bunny_conversion["tokenizer"] = tokenizer_note
    model = build_model(config, weights, target)
    with atomic_dir(dst) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is None:
            _copy_tokenizer_files(src, tmp)
        else:
            build_processor(tokenizer, vision).save_pretrained(tmp)
    return dst


def main_convert_bunny(args_list=None) -> int:
    """CLI hook: `SRC DST [--dtype D]`; one line out on success, `error: ...` and status 2 on failure."""
    parser = argparse.ArgumentParser(prog="convert-bunny", description="Bunny Phi checkpoint -> native LLaVA")
    parser.add_argument("src", metavar="SRC", help="folder with Bunny's config.json and safetensors weights")
    parser.add_argument("dst", metavar="DST", help="new or empty folder for the native model")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as in SRC)")
    args = parser.parse_args(args_list)
    try:
        out = convert_bunny(args.src, args.dst, dtype=args.dtype)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    record = json.loads((out / "config.json").read_text())["bunny_conversion"]
    print(f"converted {args.src} -> {out}: native llava, {record['vision_layers_in_checkpoint']} vision layers, "
          f"image_token_index={record['image_token_index']}, {record['tokenizer']}")
    return 0


# --- the converted config of the published checkpoint, without its weights -----------------------

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


def bunny_native_config(bunny_config: dict | None = None, vision_layers: int = BUNNY_VISION_LAYERS,
                        image_token_id: int = BUNNY_IMAGE_TOKEN_ID):
    """The native `LlavaConfig` `harness convert bunny` writes for Bunny-v1_0-3B, from its config and tower shape.

    The converter reads the tower's depth, widths and patch size off the weights; meta tensors
    of the published shapes stand in for them here.
    """
    import torch

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
