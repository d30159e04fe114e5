"""lmms-eval hooks for the synthetic benchmarks (loaded by lmms-eval as `!function utils.<name>`).

Scoring reuses lmms-eval's own functions for the real benchmarks, so a synthetic score
means what the real one means; only the document shapes are adapted:
- POPE: `lmms_eval.tasks.pope.utils` unchanged (exact "yes"/"no" after lower-casing).
- MME: `lmms_eval.tasks.mme.utils`; MME pairs two questions by `question_id` (the image
  file in real MME), ours pair by `image_id`. An `--limit` that splits a pair would trip
  lmms-eval's pair assertion, so incomplete pairs are dropped before aggregating.
- ScienceQA: `lmms_eval.tasks.scienceqa.utils.sqa_process_results` on a document that
  carries our JSON `options` as its `choices` and the letter as an index.
- GQA, counting (exact_match) and DocVQA (anls) use lmms-eval's registered metrics
  directly from the YAML files.
"""

from __future__ import annotations

import json
from collections import Counter

from lmms_eval.tasks.mme.utils import mme_aggregate_results, mme_process_results
from lmms_eval.tasks.pope.utils import (  # noqa: F401  (aggregations are named in synth_pope.yaml)
    pope_aggregate_accuracy,
    pope_aggregate_f1_score,
    pope_aggregate_precision,
    pope_aggregate_recall,
    pope_process_results,
)
from lmms_eval.tasks.scienceqa.utils import sqa_process_results

from harness.synthetic.world import with_suffix


def synth_doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def synth_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The question with the answer-format suffix the models were trained with ("... one word.")."""
    kwargs = lmms_eval_specific_kwargs or {}
    question = with_suffix(kwargs["family"], doc["question"].strip())
    return f"{kwargs.get('pre_prompt', '')}{question}{kwargs.get('post_prompt', '')}"


def synth_pope_process_results(doc, results):
    """lmms-eval's POPE scoring; the four metrics all receive the per-sample record."""
    record = pope_process_results(doc, results)
    return {k: v for k, v in record.items() if k != "pope_yes_ratio"}


def synth_mme_process_results(doc, results):
    """lmms-eval's MME scoring, with the image id as the pair key."""
    return mme_process_results(dict(doc, question_id=doc["image_id"]), results)


def complete_pairs(results: list[dict]) -> list[dict]:
    """Keep only images whose two questions were both answered (limits can cut a pair)."""
    counts = Counter((r["category"], r["question_id"]) for r in results)
    return [r for r in results if counts[(r["category"], r["question_id"])] == 2]


def synth_mme_aggregate(results):
    """MME perception score (sum over categories of acc + acc+, in percent)."""
    kept = complete_pairs(results)
    return mme_aggregate_results(kept) if kept else 0.0


def sqa_letter_doc(doc) -> dict:
    """Our row -> the ScienceQA document shape lmms-eval's scorer reads (choices + answer index)."""
    choices = json.loads(doc["options"])
    return {"choices": choices, "answer": "ABCDEFGH".index(doc["answer"].strip().upper())}


def synth_sqa_process_results(doc, results):
    return sqa_process_results(sqa_letter_doc(doc), results)
