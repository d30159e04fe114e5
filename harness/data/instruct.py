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


def image_token_id(config) -> int:
    """The token that stands for one image in the chat template's text (before the processor expands it)."""
    token = getattr(config, "image_token_id", None)
    return token if token is not None else config.image_token_index


def carry_labels(ids: list[int], labels: list[int], expanded: list[int], placeholder: int) -> list[int]:
    """`labels` of `ids` (one `placeholder` token per image) moved onto `expanded`, the processor's ids.

    Each family's processor expands an image its own way (LLaVA: N copies of the token; InternVL: start and end
    tokens around them; Idefics3: row and column markers; Qwen2.5-VL: a count that follows the resolution), but
    leaves the text between images as it was. So each text segment between placeholders is found again, in order
    (the last one at the end), and takes its labels along; tokens the processor added are not supervised.
    """
    segments, start = [], 0
    for i, token in enumerate([*ids, placeholder]):
        if token == placeholder:
            segments.append((start, i))
            start = i + 1
    out, pos = [IGNORE_INDEX] * len(expanded), 0
    for k, (a, b) in enumerate(segments):
        if a == b:
            continue
        seg = ids[a:b]
        if k == len(segments) - 1:
            at = len(expanded) - len(seg) if expanded[len(expanded) - len(seg):] == seg else -1
        else:
            at = next((j for j in range(pos, len(expanded) - len(seg) + 1) if expanded[j:j + len(seg)] == seg), -1)
        if at < pos:
            raise HarnessError("the processor changed the text around an image, so the answer tokens cannot be "
                               "found in its output")
        out[at:at + len(seg)] = labels[a:b]
        pos = at + len(seg)
    return out


class Collator:
    """Turn mix records into padded model inputs with assistant-only labels, for any family's processor.

    The chat template renders each conversation with one placeholder per image; labels are set on that text's
    tokens; the family's processor then expands the images and makes the pixel inputs its model takes
    (`pixel_values`, and `image_sizes` or `image_grid_thw` where the family needs them); `carry_labels` moves
    the labels onto its ids. Sequences are right-padded and cut at `max_length` tokens, image tokens included.
    """

    def __init__(self, processor, model_config, image_root: str | Path, max_length: int = 512):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = processor.chat_template
        self.image_token_id = image_token_id(model_config)
        self.image_root = Path(image_root)
        self.max_length = max_length

    def render(self, messages, **kw) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False, **kw)

    def encode(self, conversations: list[dict]) -> tuple[str, list[int], list[int]]:
        """(rendered text, its token ids, labels): one placeholder token per image, labels on answers only."""
        messages = to_messages(conversations)
        text = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                start = len(self.render(messages[:i], add_generation_prompt=True))
                spans.append((start, len(self.render(messages[: i + 1]))))
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        labels = [tok if any(s < b and e > a for a, b in spans) and tok != self.image_token_id else IGNORE_INDEX
                  for tok, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]
        return text, enc["input_ids"], labels

    def load_image(self, name: str) -> Image.Image:
        try:
            with Image.open(self.image_root / name) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as e:
            raise HarnessError(f"cannot decode image {self.image_root / name}: {e}") from None

    def __call__(self, records: list[dict]) -> dict:
        encoded = [self.encode(r["conversations"]) for r in records]
        images = [self.load_image(r["image"]) for r in records if r.get("image")]
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "right"
        try:
            batch = dict(self.processor(text=[text for text, _, _ in encoded], images=images or None,
                                        return_tensors="pt", padding=True, add_special_tokens=False))
        finally:
            self.tokenizer.padding_side = side  # the processor is shared (generation pads on the left)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, (_, plain, plain_labels) in enumerate(encoded):
            n = int(mask[i].sum())
            labels[i, :n] = torch.tensor(carry_labels(plain, plain_labels, ids[i, :n].tolist(), self.image_token_id))
        batch["labels"] = labels
        if (ids[:, self.max_length:] == self.image_token_id).any():  # right padding: only real tokens are cut
            n = int((ids == self.image_token_id).sum(1).max())
            raise HarnessError(f"max_length {self.max_length} cuts into a record's image tokens ({n} in its "
                               f"longest record): raise max_length above the image tokens plus the text")
        per_token = {k for k in batch if k in ("input_ids", "attention_mask", "labels") or k.endswith("token_type_ids")}
        return {k: v[:, :self.max_length] if k in per_token else v for k, v in batch.items()}
