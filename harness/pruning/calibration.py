"""Calibration data for importance scores: seeded samples of the instruction mix, with their images.

The same (mix, number of samples, seed, batching) always gives the same samples, and
`Calibration.digest` identifies their content, so stored scores are reused only for the
very same calibration set.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from harness.data.instruct import Collator, load_mix
from harness.errors import HarnessError

DEFAULT_SEED = 42


@dataclass
class Calibration:
    """Seeded samples of the instruction mix, with their images, collated lazily."""

    records: list[dict]
    ids: list[str]
    image_root: Path
    batch_size: int = 1
    max_length: int = 512

    def digest(self) -> str:
        """Identifies the samples' content (text and image bytes) and the batching."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([self.records, self.batch_size, self.max_length], sort_keys=True, default=str).encode())
        for record in self.records:
            if record.get("image"):
                try:
                    h.update((self.image_root / record["image"]).read_bytes())
                except OSError as e:
                    raise HarnessError(f"cannot read image {self.image_root / record['image']}: {e.strerror or e}") from None
        return h.hexdigest()

    def batches(self, processor, model: nn.Module) -> list[dict]:
        """Collated batches on the model's device, pixel values in the model's dtype."""
        collator = Collator(processor, model.config, self.image_root, self.max_length)
        param = next(model.parameters())
        batches = []
        for start in range(0, len(self.records), self.batch_size):
            batch = collator(self.records[start:start + self.batch_size])
            batch = {k: v.to(param.device) for k, v in batch.items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(param.dtype)
            batches.append(batch)
        return batches


def calibration_set(data: str | Path, n: int, seed: int = DEFAULT_SEED, batch_size: int = 1,
                    max_length: int = 512, max_text_tokens: int | None = None, require_image: bool = False,
                    tokenizer=None) -> Calibration:
    """`n` samples drawn without replacement with a seeded generator from the mix at `data`.

    The official code of the paper calibrates Taylor importance on samples that carry an
    image and whose text is short (at most 128 tokens for LLaVA, 64 for Bunny):
    `require_image` and `max_text_tokens` (counted with `tokenizer`, image placeholders
    excluded) ask for the same. Eligible samples are then taken in a seeded random order;
    without either filter the draw is the plain seeded choice.
    """
    if n < 1 or batch_size < 1:
        raise HarnessError(f"calibration needs samples >= 1 and batch size >= 1, got {n} and {batch_size}")
    ds = load_mix(data)
    if n > len(ds):
        raise HarnessError(f"asked for {n} calibration samples but the mix at {data} has only {len(ds)}")
    rng = np.random.default_rng(seed)
    if max_text_tokens is None and not require_image:
        indices = rng.choice(len(ds), size=n, replace=False).tolist()
    else:
        if max_text_tokens is not None and tokenizer is None:
            raise HarnessError("max_text_tokens needs the model's tokenizer to count text tokens")
        indices = []
        for i in rng.permutation(len(ds)).tolist():
            record = ds[i]
            if _eligible(record, max_text_tokens, require_image, tokenizer):
                indices.append(i)
                if len(indices) == n:
                    break
        if len(indices) < n:
            what = " and ".join(filter(None, ["an image" if require_image else "",
                                              f"at most {max_text_tokens} text tokens" if max_text_tokens else ""]))
            raise HarnessError(f"asked for {n} calibration samples with {what}, but the mix at {data} has only "
                               f"{len(indices)}")
    records = [ds[i] for i in indices]
    ids = [str(r.get("id") if r.get("id") is not None else i) for r, i in zip(records, indices, strict=True)]
    root = Path(data) if Path(data).is_dir() else Path(data).parent
    return Calibration(records, ids, root, batch_size, max_length)


def text_tokens(record: dict, tokenizer) -> int:
    """Tokens of a record's text (every turn), the image placeholder excluded."""
    text = "\n".join(turn["value"].replace("<image>", "") for turn in record["conversations"])
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _eligible(record: dict, max_text_tokens: int | None, require_image: bool, tokenizer) -> bool:
    if require_image and not record.get("image"):
        return False
    return max_text_tokens is None or text_tokens(record, tokenizer) <= max_text_tokens
