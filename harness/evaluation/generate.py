"""Batched greedy answering: the one inference path shared by the lmms-eval plugin and tools.

Prompts go through the model's own chat template (the one it was trained with), so
the plugin, the teachers' sanity checks and the efficiency probe all see the same text.
"""

from __future__ import annotations

import torch

from harness.data.instruct import to_messages


def image_count(images) -> int:
    """How many images one sample carries: None -> 0, a PIL image -> 1, a list -> its length."""
    if images is None:
        return 0
    return len(images) if isinstance(images, (list, tuple)) else 1


def build_prompt(processor, question: str, with_image: bool | int = True) -> str:
    """The chat-template prompt for one question; `with_image` may also be a number of images.

    A question that already places its `<image>` tokens (some lmms-eval tasks do) is left as is.
    """
    n = 0 if "<image>" in question else int(with_image)
    value = ("<image>\n" * n + question) if n else question
    messages = to_messages([{"from": "human", "value": value}])
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def model_inputs(model, processor, prompts: list[str], images: list | None):
    """Tokenise and preprocess a batch (left padding, so generation continues every row at the end)."""
    processor.tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True).to(device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """Truncate at the first stop string, as lmms-eval's `until` asks; EOS is handled by generate."""
    for s in stop or []:
        if s and s in text:
            text = text[: text.index(s)]
    return text


@torch.no_grad()
def generate_answers(model, processor, questions: list[str], images: list | None, max_new_tokens: int = 16,
                     batch_size: int = 32, stop: list[str] | None = None) -> list[str]:
    """Greedy answers for (question, images) pairs, in order, `batch_size` at a time.

    `images` is None (text only) or one entry per question: a PIL image or a list of them
    (all entries of one call should carry the same number of images).
    """
    tok = processor.tokenizer
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        qs = questions[start:start + batch_size]
        ims = images[start:start + batch_size] if images is not None else None
        prompts = [build_prompt(processor, q, image_count(ims[k]) if ims is not None else 0) for k, q in enumerate(qs)]
        inputs = model_inputs(model, processor, prompts, ims)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        answers += [cut_at_stop(a, stop).strip() for a in tok.batch_decode(new, skip_special_tokens=True)]
    return answers
