"""The `harness` model for lmms-eval: any LLaVA-style checkpoint of this project, or a model in memory.

Registered through the `lmms_eval.models` entry point (pyproject.toml), so both work:

    lmms-eval --model harness --model_args pretrained=DIR --tasks synth --include_path TASKS_DIR
    simple_evaluate(model=HarnessMLLM(model=model, processor=processor), ...)

Generation is greedy and batched through `generate_answers`, the same chat-template path
the models were trained and sanity-checked with; sampling arguments in a task's
`generation_kwargs` are ignored on purpose, so a score is a deterministic function of
the weights.
"""

from __future__ import annotations

import gc
import json
import sys
import time

import torch
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from harness.errors import HarnessError
from harness.evaluation.generate import build_prompt, generate_answers, image_count, model_inputs

MANIFESTS = [ModelManifest(model_id="harness", simple_class_path="harness.evaluation.lmms_model.HarnessMLLM")]


def _register_if_missed() -> None:
    """Register by hand when this module was imported before lmms-eval's registry existed.

    Importing `lmms_eval.models` loads the entry point, which imports this module; if
    this module was being imported first, the entry point saw it half-initialised (no
    MANIFESTS yet) and was skipped. During a normal entry-point load the registry is not
    built yet (the attribute is missing) and the entry point registers us itself.
    """
    registry = getattr(sys.modules.get("lmms_eval.models"), "MODEL_REGISTRY_V2", None)
    if registry is not None and "harness" not in registry.list_model_names():
        for manifest in MANIFESTS:
            registry.register_manifest(manifest, overwrite=True)


_register_if_missed()

DEFAULT_MAX_NEW_TOKENS = 16


def _dtype(value):
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name == "auto":
        return None
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise HarnessError(f"unknown dtype {value!r}: use float32, bfloat16 or float16")
    return getattr(torch, name)


def _default_device(device) -> str:
    if device:
        return str(device)
    return "cuda" if torch.cuda.is_available() else "cpu"


class HarnessMLLM(lmms):
    """A simple lmms-eval model around a `LlavaForConditionalGeneration` and its processor.

    Pass `pretrained` (anything `harness.models.load` accepts: a checkpoint folder, an
    embedded teacher name, a hub id) or `model` and `processor` objects. lmms-eval passes
    `batch_size`, `device` and other CLI settings as keyword arguments; unknown ones are
    ignored so new lmms-eval options do not break the plugin.
    """

    is_simple = True

    def __init__(self, pretrained: str | None = None, model=None, processor=None, device: str | None = None,
                 dtype=None, batch_size: int | str = 16, max_new_tokens: int | None = None, **kwargs) -> None:
        super().__init__()
        if model is None:
            if pretrained is None:
                raise HarnessError("the harness lmms-eval model needs pretrained=DIR or model= and processor=")
            from harness.models.loading import load

            model, processor = load(pretrained, dtype=_dtype(dtype), device=_default_device(device))
        elif processor is None:
            raise HarnessError("an in-memory model needs its processor too (processor=...)")
        elif device:
            model.to(device)
        self.model = model.eval()
        self.processor = processor
        self.batch_size = max(1, int(batch_size) if str(batch_size).isdigit() else 16)
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens else None
        self.pretrained = pretrained
        # Time spent inside the model and samples answered: `evaluate` turns them into samples/s.
        self.model_seconds = 0.0
        self.samples_done = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def clean(self) -> None:
        """Free caches but keep the model: lmms-eval's default deletes it, and the caller may own it."""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ helpers
    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual, doc) -> list:
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        return [v for v in (visuals or []) if v is not None]

    def _max_new_tokens(self, gen_kwargs: dict) -> int:
        return self.max_new_tokens or int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)

    @staticmethod
    def _stops(gen_kwargs: dict) -> list[str]:
        until = gen_kwargs.get("until") or []
        return [until] if isinstance(until, str) else list(until)

    def _answer(self, contexts: list[str], visuals: list[list], gen_kwargs: dict) -> list[str]:
        """One generate_answers call for samples that share generation settings and image count."""
        images = None if not visuals[0] else [v[0] if len(v) == 1 else v for v in visuals]
        start = time.perf_counter()
        answers = generate_answers(self.model, self.processor, contexts, images,
                                   max_new_tokens=self._max_new_tokens(gen_kwargs), batch_size=self.batch_size,
                                   stop=self._stops(gen_kwargs))
        self.model_seconds += time.perf_counter() - start
        self.samples_done += len(contexts)
        return answers

    # ------------------------------------------------------------------ lmms-eval API
    def generate_until(self, requests) -> list[str]:
        """Greedy answers; requests are grouped by (generation settings, image count) and batched in order."""
        groups: dict[tuple, list[int]] = {}
        prepared = []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            visuals = self._visuals(doc_to_visual, self._doc(task, split, doc_id))
            prepared.append((context, visuals, gen_kwargs))
            key = (json.dumps(gen_kwargs, sort_keys=True, default=str), len(visuals))
            groups.setdefault(key, []).append(i)
        out: list[str] = [""] * len(requests)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                answers = self._answer([prepared[i][0] for i in chunk], [prepared[i][1] for i in chunk],
                                       prepared[chunk[0]][2])
                for i, answer in zip(chunk, answers, strict=True):
                    out[i] = answer
                    self.cache_hook.add_partial("generate_until", (prepared[i][0], prepared[i][2]), answer)
        return out

    def generate_until_multi_round(self, requests) -> list:
        """Multi-round tasks: each round's prompt comes from the task's doc_to_text, answered greedily."""
        results = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            visuals = self._visuals(doc_to_visual, doc)
            outputs = self._answer([context], [visuals], gen_kwargs)
            info, round_idx = None, 1
            while True:
                visuals, context, terminal, round_res, info = doc_to_text(
                    doc, previous_output=outputs, round_idx=round_idx, previous_round_info=info)
                outputs = list(round_res)
                if terminal:
                    break
                outputs += self._answer([context], [[v for v in visuals or [] if v is not None]], gen_kwargs)
                round_idx += 1
            results.append(tuple(outputs))
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(negative log-likelihood of the continuation, whether greedy decoding would produce it).

        The value is the summed token log-probability of the continuation given context
        and images, negated: lmms-eval's multiple-choice scoring takes the argmin of this
        value (its own models return a loss), so the natural log-probability would invert it.
        """
        results = []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            start = time.perf_counter()
            logprob, greedy = continuation_logprob(self.model, self.processor, context, continuation,
                                                   self._visuals(doc_to_visual, doc))
            self.model_seconds += time.perf_counter() - start
            self.samples_done += 1
            results.append((-logprob, greedy))
        return results


@torch.no_grad()
def continuation_logprob(model, processor, context: str, continuation: str, images: list) -> tuple[float, bool]:
    """Sum of log p(continuation tokens | chat prompt with `context` and images), and greedy agreement.

    The continuation is appended to the generation prompt as text (lmms-eval puts any
    leading space in the continuation), then tokenised together with the prompt, so
    the token boundary is the one the model sees at generation time.
    """
    prompt = build_prompt(processor, context, image_count(images))
    imgs = [images] if images else None
    prompt_ids = model_inputs(model, processor, [prompt], imgs)["input_ids"][0]
    inputs = model_inputs(model, processor, [prompt + continuation], imgs)
    ids = inputs["input_ids"][0]
    n_ctx = len(prompt_ids)
    if len(ids) <= n_ctx or not torch.equal(ids[:n_ctx], prompt_ids):
        # The concatenation re-tokenised across the boundary: score the continuation's own tokens instead.
        cont = processor.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        ids = torch.cat([prompt_ids, cont.to(prompt_ids.device)])
        inputs["input_ids"] = ids[None]
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if len(ids) <= n_ctx:
        return 0.0, True
    logits = model(**inputs).logits[0, n_ctx - 1:-1].float()
    target = ids[n_ctx:]
    logprobs = torch.log_softmax(logits, dim=-1)
    total = logprobs.gather(1, target[:, None]).sum().item()
    return float(total), bool(torch.equal(logits.argmax(-1), target))
