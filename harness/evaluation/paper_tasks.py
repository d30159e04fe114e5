"""The paper's benchmark set, as lmms-eval 0.7.3 names it, for evaluating real models (online data).

The journal version's table columns are MMMU, ScienceQA, MathVista, AI2D, MME-Cognition,
MME-Perception, POPE, DocVQA, GQA. lmms-eval scores MME-C and MME-P in one task (`mme`,
two metrics), so there are nine benchmarks over eight tasks. Choices where lmms-eval
offers several variants:
- MMMU: `mmmu_val` (the split LLaVA-1.5 reports; the test split has no public answers).
- ScienceQA: `scienceqa_img` (the image subset, "SQA-IMG" in LLaVA-1.5).
- MathVista: `mathvista_testmini_format` (testmini with the "format-prompt" shot type, the
  setting of LLaVA-style short answers; its metric needs an LLM judge, i.e. an API key).
- DocVQA: `docvqa_val` (ANLS; the test split is scored by a submission server).
- POPE: `pope` (all three negative-sampling splits together; primary metric F1, as the
  LLaVA-1.5 paper reports POPE. The paper's teacher values are also close to lmms-eval's
  accuracy for LLaVA-1.5-7B, so compare the `pope_accuracy` column too before trusting
  a reproduction of the absolute numbers).
"""

from __future__ import annotations

from harness.evaluation import PAPER_PRIMARY

# (table column, lmms-eval task, metric), in the journal table's order.
PAPER_BENCHMARKS: list[tuple[str, str, str]] = [
    ("MMMU", "mmmu_val", "mmmu_acc"),
    ("SQA", "scienceqa_img", "exact_match"),
    ("MathVista", "mathvista_testmini_format", "llm_as_judge_eval"),
    ("AI2D", "ai2d", "exact_match"),
    ("MME-C", "mme", "mme_cognition_score"),
    ("MME-P", "mme", "mme_perception_score"),
    ("POPE", "pope", "pope_f1_score"),
    ("DocVQA", "docvqa_val", "anls"),
    ("GQA", "gqa", "exact_match"),
]

PAPER_TASKS: list[str] = list(dict.fromkeys(task for _, task, _ in PAPER_BENCHMARKS))

# The name `harness eval --tasks paper` expands.
PAPER_GROUP = "paper"

assert set(PAPER_TASKS) == set(PAPER_PRIMARY), "PAPER_PRIMARY and PAPER_BENCHMARKS disagree"


# Tasks that hold more than one of the paper's benchmarks: benchmark name -> metric.
# Everywhere else a benchmark is a task, compared on PRIMARY_METRIC[task].
MULTI_BENCHMARK_TASKS: dict[str, dict[str, str]] = {
    "mme": {"mme_cognition": "mme_cognition_score", "mme_perception": "mme_perception_score"},
}
