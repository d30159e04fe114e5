"""Instruction mixes in the LLaVA-v1.5 JSON format: loading, nested fractions, and batching.

The collator renders each conversation with the model's own chat template and puts
the loss only on assistant tokens, so the same code serves our tiny models and
llava-hf/Bunny checkpoints.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness.errors import HarnessError

IGNORE_INDEX = -100


def load_mix(path: str | Path):
    """Read a LLaVA-style JSON list with `datasets`; the image root is the file's folder."""
    from datasets import load_dataset

    path = Path(path)
    if path.is_dir():
        path = path / "mix.json"
    if not path.exists():
        raise HarnessError(f"instruction mix not found: {path}")
    if path.stat().st_size < 64 and path.read_text().replace(" ", "").replace("\n", "") in ("", "[]"):
        raise HarnessError(f"instruction mix {path} is empty")
    try:
        ds = load_dataset("json", data_files=str(path), split="train")
    except Exception as e:  # datasets raises several types for bad JSON
        raise HarnessError(f"cannot read instruction mix {path}: {str(e).splitlines()[0]}") from None
    if len(ds) == 0:
        raise HarnessError(f"instruction mix {path} is empty")
    if "conversations" not in ds.column_names:
        raise HarnessError(f"instruction mix {path} has no 'conversations' field (LLaVA JSON format expected)")
    turns = ds[0]["conversations"]
    if not (isinstance(turns, list) and turns and all(isinstance(t, dict) and {"from", "value"} <= set(t) for t in turns)):
        raise HarnessError(f"instruction mix {path}: the first record's conversations are not a list of "
                           f"{{from, value}} turns (LLaVA JSON format expected), got {str(turns)[:80]}")
    return ds


def check_images(ds, indices: list[int], image_root: str | Path) -> None:
    """Before training: every selected record's image exists and its header parses (PIL reads only the header)."""
    if "image" not in ds.column_names:
        return
    root = Path(image_root)
    for name in ds.select(indices)["image"]:
        if not name:
            continue
        try:
            with Image.open(root / name) as img:
                img.size  # noqa: B018  (the header is parsed by open)
        except (OSError, ValueError) as e:
            raise HarnessError(f"cannot decode image {root / name}: {e}") from None


def fraction_indices(n: int, fraction: float, seed: int = 0) -> list[int]:
    """A seeded uniform subset; nested, because every fraction is a prefix of one permutation."""
    if not 0 < fraction <= 1:
        raise HarnessError(f"data fraction must be in (0, 1], got {fraction}")
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[: max(1, math.ceil(fraction * n))].tolist())


def to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA `{from, value}` turns -> chat-template messages with image items."""
    messages = []
    for turn in conversations:
        role = "user" if turn["from"] in ("human", "user") else "assistant"
        parts = turn["value"].split("<image>")
        content: list[dict] = []
        for k, part in enumerate(parts):
            if k > 0:
                content.append({"type": "image"})
            text = part.strip("\n") if len(parts) > 1 else part
            if text:
                content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    return messages


def num_image_tokens(config) -> int:
    """Image tokens the LM sees per image, from the vision config and feature strategy."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    if config.vision_feature_select_strategy == "full" and vc.model_type == "clip_vision_model":
        n += 1
    return n


class Collator:
    """Turn mix records into padded model inputs with assistant-only labels."""

    def __init__(self, processor, model_config, image_root: str | Path, max_length: int = 512):
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.template = processor.chat_template
        self.image_token_id = model_config.image_token_index
        self.n_image_tokens = num_image_tokens(model_config)
        self.image_root = Path(image_root)
        self.max_length = max_length

    def render(self, messages, **kw) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False, **kw)

    def encode(self, conversations: list[dict]) -> tuple[list[int], list[int]]:
        messages = to_messages(conversations)
        text = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                start = len(self.render(messages[:i], add_generation_prompt=True))
                spans.append((start, len(self.render(messages[: i + 1]))))
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, labels = [], []
        for tok, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
            in_answer = any(s < b and e > a for a, b in spans)
            if tok == self.image_token_id:
                ids += [tok] * self.n_image_tokens
                labels += [IGNORE_INDEX] * self.n_image_tokens
            else:
                ids.append(tok)
                labels.append(tok if in_answer else IGNORE_INDEX)
        return ids[: self.max_length], labels[: self.max_length]

    def load_image(self, name: str) -> Image.Image:
        try:
            with Image.open(self.image_root / name) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as e:
            raise HarnessError(f"cannot decode image {self.image_root / name}: {e}") from None

    def __call__(self, records: list[dict]) -> dict:
        encoded = [self.encode(r["conversations"]) for r in records]
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        images = [self.load_image(r["image"]) for r in records if r.get("image")]
        if images:
            batch["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
        return batch
