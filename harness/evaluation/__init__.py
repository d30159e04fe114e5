"""Evaluation through lmms-eval: the `harness` model plugin, the synthetic tasks and `harness eval`.

This module stays import-light (no torch, no lmms-eval): lmms-eval imports
`harness.evaluation.lmms_model` through its entry point while building its model
registry, and the grid reads `PRIMARY_METRIC` without paying for either import.

Public API
    evaluate(...)                      harness.evaluation.evaluate
    HarnessMLLM                        harness.evaluation.lmms_model (lmms-eval name: "harness")
    SYNTH_TASKS, SYNTH_GROUP           the synthetic suite (YAMLs in harness/synthetic/tasks)
    PAPER_TASKS, PAPER_BENCHMARKS      harness.evaluation.paper_tasks
    PRIMARY_METRIC                     {task: metric}: the metric each task is compared on
"""

from __future__ import annotations

from pathlib import Path

from harness.paths import DEFAULT_BENCHMARKS

# The synthetic suite's lmms-eval task YAMLs and hooks live with the rest of the sandbox.
TASKS_DIR = Path(__file__).resolve().parents[1] / "synthetic" / "tasks"

# The default data folder, relative to the repository root (the shipped YAMLs use it as is).
DEFAULT_DATA_DIR = str(DEFAULT_BENCHMARKS)

SYNTH_GROUP = "synth"
SYNTH_TASKS = ("synth_gqa", "synth_pope", "synth_mme", "synth_sqa", "synth_count", "synth_docvqa")

# Each synthetic task is scored like its real counterpart in lmms-eval:
#   GQA / counting: exact match (case- and punctuation-insensitive), POPE: F1 of "yes",
#   MME: perception score (acc + acc+ per category, summed), ScienceQA: letter accuracy,
#   DocVQA: ANLS.
SYNTH_PRIMARY = {
    "synth_gqa": "exact_match",
    "synth_pope": "pope_f1_score",
    "synth_mme": "mme_perception_score",
    "synth_sqa": "exact_match",
    "synth_count": "exact_match",
    "synth_docvqa": "anls",
}

# The paper's benchmarks as named in lmms-eval 0.7.3 (see paper_tasks.py for the column names).
PAPER_PRIMARY = {
    "mmmu_val": "mmmu_acc",
    "scienceqa_img": "exact_match",
    "mathvista_testmini_format": "llm_as_judge_eval",
    "ai2d": "exact_match",
    "mme": "mme_perception_score",
    "pope": "pope_f1_score",
    "docvqa_val": "anls",
    "gqa": "exact_match",
}

PRIMARY_METRIC: dict[str, str] = {**SYNTH_PRIMARY, **PAPER_PRIMARY}

__all__ = [
    "DEFAULT_DATA_DIR", "PAPER_PRIMARY", "PRIMARY_METRIC", "SYNTH_GROUP", "SYNTH_PRIMARY", "SYNTH_TASKS", "TASKS_DIR",
]
