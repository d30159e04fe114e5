"""The real models' configs, shipped with the harness so they can be sized without a download.

`harness/models/configs/` holds one `config.json` per real target, as a native
transformers class sees it:

- `llava-1.5-7b-hf.json`: llava-hf/llava-1.5-7b-hf (CLIP ViT-L/14-336 + Vicuna-7B-v1.5);
- `bunny-v1_0-3b-native.json`: BAAI/Bunny-v1_0-3B after `harness convert bunny`
  (SigLIP-so400m without its last layer + Phi-2);
- `llava-onevision-qwen2-7b-ov-hf.json`: llava-hf/llava-onevision-qwen2-7b-ov-hf (SigLIP + Qwen2-7B);
- `qwen2.5-vl-7b-instruct.json`: Qwen/Qwen2.5-VL-7B-Instruct (its own ViT + Qwen2.5-7B).

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
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": "llava-onevision-qwen2-7b-ov-hf",
    "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2.5-vl-7b-instruct",
}

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
    """The config of a shipped real model (`llava-hf/llava-1.5-7b-hf`, `BAAI/Bunny-v1_0-3B` native, converted) or file."""
    from harness.models.adapter import mllm_config

    return mllm_config(read_real_config(name))


def source_note(name: str | Path) -> dict:
    """Where the shipped config's values come from (its `_source` field)."""
    path = find_real_config(name)
    if path is None:
        raise HarnessError(f"no shipped config for {str(name)!r}; known: {', '.join(known_names())}")
    return json.loads(path.read_text()).get("_source", {})
