"""The evaluation module: the lmms-eval plugin, the synthetic tasks' scoring, `harness eval`, bad input.

Scores are checked against values worked out by hand: on fixed predictions for the
scoring functions, and end to end with a "yes-sayer" (a tiny model forced to answer
"yes"), whose expected score on every synthetic task follows from the gold answers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from harness.errors import HarnessError

LIMIT = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run ~100x faster on one thread when another job holds the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bench_dir(tiny_world) -> Path:
    return Path(tiny_world) / "benchmarks"


def gold(bench_dir: Path, task: str, n: int = LIMIT) -> pd.DataFrame:
    return pd.read_parquet(bench_dir / f"{task}.parquet", columns=None).head(n)


class Req:
    """The part of lmms-eval's Instance the plugin reads."""

    def __init__(self, *args):
        self.args = args


def docs_with_images(bench_dir: Path, task: str = "synth_gqa", n: int = 3) -> list[dict]:
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files={"test": str(bench_dir / f"{task}.parquet")}, split="test")
    return [ds[i] for i in range(n)]


# ----------------------------------------------------------------------------- plugin
def test_plugin_answers_in_memory_and_matches_generate_answers(tiny_llava, bench_dir):
    from harness.evaluation.generate import generate_answers
    from harness.evaluation.lmms_model import HarnessMLLM

    model, processor = tiny_llava
    lm = HarnessMLLM(model=model, processor=processor, batch_size=2)
    docs = docs_with_images(bench_dir)
    lm.task_dict = {"t": {"test": docs}}
    visual = lambda doc: [doc["image"].convert("RGB")]  # noqa: E731
    gen = {"max_new_tokens": 5, "until": ["\n\n"], "temperature": 0}
    reqs = [Req(d["question"] + " one word.", dict(gen), visual, i, "t", "test") for i, d in enumerate(docs)]
    answers = lm.generate_until(reqs)
    assert len(answers) == 3 and all(isinstance(a, str) and a for a in answers)
    assert answers == lm.generate_until(reqs)  # greedy: the same again
    direct = generate_answers(model, processor, [r.args[0] for r in reqs], [visual(d)[0] for d in docs],
                              max_new_tokens=5)
    assert answers == direct
    assert lm.samples_done == 6 and lm.model_seconds > 0


def test_loglikelihood_is_summed_logprob_with_greedy_flag(tiny_llava, bench_dir):
    from harness.evaluation.generate import build_prompt, generate_answers, model_inputs
    from harness.evaluation.lmms_model import HarnessMLLM

    model, processor = tiny_llava
    lm = HarnessMLLM(model=model, processor=processor)
    doc = docs_with_images(bench_dir, n=1)[0]
    image = doc["image"].convert("RGB")
    lm.task_dict = {"t": {"test": [doc]}}
    question = "what color is the circle? one word."
    greedy = generate_answers(model, processor, [question], [image], max_new_tokens=2)[0]
    other = "zzz-not-greedy" if greedy != "red red" else "blue blue"
    reqs = [Req(question, " " + text, lambda d: [d["image"].convert("RGB")], 0, "t", "test")
            for text in (greedy, other)]
    (nll_greedy, is_greedy), (nll_other, other_greedy) = lm.loglikelihood(reqs)
    assert is_greedy and not other_greedy
    assert nll_greedy < nll_other
    # By hand: the two continuation tokens' log-probabilities from one forward pass.
    prompt = build_prompt(processor, question, 1)
    full = model_inputs(model, processor, [prompt + " " + greedy], [[image]])
    n_ctx = model_inputs(model, processor, [prompt], [[image]])["input_ids"].shape[1]
    with torch.no_grad():
        logp = torch.log_softmax(model(**full).logits[0].float(), -1)
    ids = full["input_ids"][0]
    expected = sum(logp[k - 1, ids[k]].item() for k in range(n_ctx, len(ids)))
    assert len(ids) - n_ctx == 2
    assert nll_greedy == pytest.approx(-expected, rel=1e-5)


def test_multi_round_asks_doc_to_text_for_each_round(tiny_llava, bench_dir):
    from harness.evaluation.lmms_model import HarnessMLLM

    model, processor = tiny_llava
    lm = HarnessMLLM(model=model, processor=processor)
    doc = docs_with_images(bench_dir, n=1)[0]
    lm.task_dict = {"t": {"test": [doc]}}
    calls = []

    def doc_to_text(d, previous_output, round_idx, previous_round_info):
        calls.append((round_idx, list(previous_output)))
        visuals = [d["image"].convert("RGB")]
        return visuals, "how many objects are there? number.", round_idx >= 2, previous_output, {"r": round_idx}

    req = Req("what shape is at the top? one word.", {"max_new_tokens": 3}, lambda d: [d["image"].convert("RGB")],
              doc_to_text, 0, "t", "test")
    (result,) = lm.generate_until_multi_round([req])
    assert len(result) == 2 and [c[0] for c in calls] == [1, 2]


# ----------------------------------------------------------------------------- scoring
def test_pope_scores_equal_hand_computed():
    from harness.synthetic.tasks import utils

    preds = ["yes", "Yes", "no", "no", "yes"]
    golds = ["yes", "no", "no", "yes", "yes"]  # TP 2, FP 1, FN 1, TN 1
    recs = [utils.synth_pope_process_results({"question_id": str(i), "answer": g}, [p])
            for i, (p, g) in enumerate(zip(preds, golds, strict=True))]
    col = lambda m: [r[m] for r in recs]  # noqa: E731
    assert utils.pope_aggregate_accuracy(col("pope_accuracy")) == pytest.approx(3 / 5)
    assert utils.pope_aggregate_precision(col("pope_precision")) == pytest.approx(2 / 3)
    assert utils.pope_aggregate_recall(col("pope_recall")) == pytest.approx(2 / 3)
    assert utils.pope_aggregate_f1_score(col("pope_f1_score")) == pytest.approx(2 / 3)


def test_mme_score_counts_acc_plus_per_image_and_drops_cut_pairs():
    from harness.synthetic.tasks import utils

    def rec(image, category, answer, pred):
        doc = {"question_id": f"{image}-{answer}", "image_id": image, "category": category, "answer": answer}
        return utils.synth_mme_process_results(doc, [pred])["mme_perception_score"]

    results = [
        rec("a", "color", "yes", "yes"), rec("a", "color", "no", "No."),   # both right: 100 + 100
        rec("b", "color", "yes", "yes"), rec("b", "color", "no", "yes"),   # one right: 50 + 0
        rec("c", "count", "yes", "no"), rec("c", "count", "no", "yes"),    # none right: 0
        rec("d", "position", "yes", "yes"),                                # half a pair (cut by --limit)
    ]
    # color: (200 + 50) / 2 = 125; count: 0; position: dropped -> 125
    assert utils.synth_mme_aggregate(results) == pytest.approx(125.0)


def test_anls_and_exact_match_equal_hand_computed():
    from lmms_eval.api.metrics import anls, exact_match_hf_evaluate

    assert anls(references=["472"], predictions=["472"])["anls"] == 1.0
    assert anls(references=["472"], predictions=["47"])["anls"] == pytest.approx(1 - 1 / 3)
    assert anls(references=["12345"], predictions=["12"])["anls"] == 0  # similarity 0.4 < 0.5
    em = exact_match_hf_evaluate(predictions=["Red.", "3", "blue"], references=["red", "3", "green"],
                                 ignore_case=True, ignore_punctuation=True)
    assert em["exact_match"] == pytest.approx(2 / 3)


def test_multiple_choice_accepts_the_letter_only():
    from harness.synthetic.tasks import utils

    doc = {"options": json.dumps(["circle", "square", "triangle", "cross"]), "answer": "C"}
    score = lambda pred: utils.synth_sqa_process_results(doc, [pred])["exact_match"]  # noqa: E731
    assert [score("c"), score("C. triangle"), score("b"), score("triangle")] == [1.0, 1.0, 0.0, 0.0]


def test_prompt_is_the_training_prompt():
    from harness.synthetic.tasks import utils
    from harness.synthetic.world import with_suffix

    doc = {"question": "how many objects are there?"}
    assert utils.synth_doc_to_text(doc, {"family": "count"}) == with_suffix("count", doc["question"])


# ----------------------------------------------------------------------------- evaluate
def yes_sayer(model, tokenizer):
    """Force every answer to be exactly "yes" (first token "yes", then end of sequence)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    yes, eos = tokenizer.convert_tokens_to_ids("▁yes"), tokenizer.eos_token_id

    class Force(LogitsProcessor):
        def __init__(self, start):
            self.start = start

        def __call__(self, input_ids, scores):
            forced = torch.full_like(scores, float("-inf"))
            forced[:, yes if input_ids.shape[1] == self.start else eos] = 0
            return forced

    generate = model.generate

    def forced_generate(**kw):
        return generate(**kw, logits_processor=LogitsProcessorList([Force(kw["input_ids"].shape[1])]))

    model.generate = forced_generate
    return model


def expected_yes_scores(bench_dir: Path) -> dict:
    """What answering "yes" to everything scores on the first LIMIT items, by hand."""
    exact = lambda task: float((gold(bench_dir, task)["answer"].str.lower() == "yes").mean())  # noqa: E731
    pope = gold(bench_dir, "synth_pope")["answer"]
    tp = int((pope == "yes").sum())
    precision, recall = tp / len(pope), 1.0 if tp else 0.0
    mme = gold(bench_dir, "synth_mme")
    assert (mme.groupby("image_id").size() == 2).all()  # LIMIT even: whole pairs only
    return {
        "synth_gqa": {"exact_match": exact("synth_gqa")},
        "synth_count": {"exact_match": 0.0},
        "synth_sqa": {"exact_match": 0.0},
        "synth_pope": {"pope_accuracy": tp / len(pope), "pope_precision": precision, "pope_recall": recall,
                       "pope_f1_score": 2 * precision * recall / (precision + recall) if tp else 0.0},
        # every pair is one yes + one no: acc 50, acc+ 0 in each category
        "synth_mme": {"mme_perception_score": 50.0 * mme["category"].nunique()},
    }


def test_evaluate_in_memory_scores_json_samples_efficiency_and_retained(tiny_llava, bench_dir, tmp_path):
    from harness.evaluation import PRIMARY_METRIC
    from harness.evaluation.evaluate import evaluate

    model, processor = tiny_llava
    yes_sayer(model, processor.tokenizer)
    out = tmp_path / "student.json"
    record = evaluate((model, processor), "synth", out, limit=LIMIT, data_dir=bench_dir, batch_size=4)
    on_disk = json.loads(out.read_text())
    assert on_disk["scores"] == record["scores"]
    assert on_disk["primary"] == {t: PRIMARY_METRIC[t] for t in on_disk["tasks"]}
    for task, metrics in expected_yes_scores(bench_dir).items():
        for metric, value in metrics.items():
            assert on_disk["scores"][task][metric] == pytest.approx(value), (task, metric)
    assert on_disk["n_samples"] == {t: LIMIT for t in on_disk["tasks"]}
    lines = (tmp_path / "student.samples.jsonl").read_text().splitlines()
    assert len(lines) == 6 * LIMIT and all(json.loads(x)["filtered_resps"] == ["yes"] for x in lines)
    eff = on_disk["efficiency"]
    for key in ("total_params", "lm_params", "macs_per_token", "prefill_ms", "peak_memory_mb", "samples_per_s"):
        assert eff[key] > 0, key
    assert eff["decode_ms_per_token"] >= 0  # a difference of two timings: never negative by construction
    assert eff["total_params"] > eff["lm_params"]

    again = evaluate((model, processor), "synth", None, teacher_scores=out, limit=LIMIT, data_dir=bench_dir,
                     efficiency=False)
    defined = {k: v for k, v in again["retained"].items() if v is not None}
    assert {"synth_pope", "synth_mme"} <= set(defined)
    assert all(v == pytest.approx(100.0) for v in defined.values())
    assert again["avg_retained"] == pytest.approx(100.0)
    # a teacher score of 0 gives no ratio (the yes-sayer gets 0 on counting)
    assert again["retained"]["synth_count"] is None


def test_same_model_same_scores_through_cli_function_and_api(saved_tiny_llava, bench_dir, tmp_path):
    """Determinism, and `harness eval` as the central CLI will call it (args.func(args))."""
    from harness.evaluation.evaluate import add_eval_parser, evaluate

    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli.json"
    args = parser.parse_args(["eval", str(saved_tiny_llava), "--tasks", "synth_gqa,synth_pope", "--out", str(out),
                              "--limit", str(LIMIT), "--data", str(bench_dir), "--no-efficiency"])
    args.func(args)
    first = json.loads(out.read_text())
    second = evaluate(str(saved_tiny_llava), ["synth_gqa", "synth_pope"], tmp_path / "api.json", limit=LIMIT,
                      data_dir=bench_dir, efficiency=False)
    assert first["scores"] == second["scores"]
    resps = lambda p: [json.loads(x)["filtered_resps"] for x in p.read_text().splitlines()]  # noqa: E731
    assert resps(tmp_path / "cli.samples.jsonl") == resps(tmp_path / "api.samples.jsonl")


def test_lmms_eval_cli_runs_the_plugin_offline(saved_tiny_llava, tiny_world, tmp_path):
    from harness.evaluation.evaluate import render_tasks

    include = render_tasks(tiny_world, tmp_path / "tasks", cache_dir=tmp_path / "cache")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "harness", "--model_args", f"pretrained={saved_tiny_llava}",
           "--tasks", "synth", "--include_path", str(include), "--limit", str(LIMIT), "--batch_size", "4",
           "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("*_results.json")
    results = json.loads(results_file.read_text())["results"]
    assert {"synth_gqa", "synth_pope", "synth_mme", "synth_sqa", "synth_count", "synth_docvqa"} <= set(results)
    assert "pope_f1_score,none" in results["synth_pope"]


# ----------------------------------------------------------------------------- bad input
def test_unknown_synthetic_task_lists_close_matches(saved_tiny_llava):
    from harness.evaluation.evaluate import evaluate

    with pytest.raises(HarnessError, match="unknown task 'synth_gqaa'.*synth_gqa"):
        evaluate(saved_tiny_llava, "synth_gqaa", None)


def test_model_directory_without_processor_files(tiny_llava, bench_dir, tmp_path):
    from harness.evaluation.evaluate import evaluate

    model, _ = tiny_llava
    model.save_pretrained(tmp_path / "bare")
    with pytest.raises(HarnessError, match="no processor files"):
        evaluate(tmp_path / "bare", "synth_gqa", None, data_dir=bench_dir)


def test_teacher_missing_a_task_fails_before_evaluating(saved_tiny_llava, bench_dir, tmp_path):
    from harness.evaluation.evaluate import evaluate

    teacher = {"synth_gqa": {"exact_match": 0.5}}
    with pytest.raises(HarnessError, match="teacher scores have no task 'synth_pope'"):
        evaluate(saved_tiny_llava, "synth_gqa,synth_pope", tmp_path / "x.json", teacher_scores=teacher,
                 data_dir=bench_dir)
    with pytest.raises(HarnessError, match="no metric 'exact_match'"):
        evaluate(saved_tiny_llava, "synth_gqa", None, teacher_scores={"synth_gqa": {"anls": 1.0}}, data_dir=bench_dir)
    assert not (tmp_path / "x.json").exists()


def test_missing_benchmark_data(saved_tiny_llava, tmp_path):
    from harness.evaluation.evaluate import evaluate

    with pytest.raises(HarnessError, match="harness data make"):
        evaluate(saved_tiny_llava, "synth", None, data_dir=tmp_path)


# ----------------------------------------------------------------------------- paper tasks
def test_paper_task_names_exist_in_installed_lmms_eval(capfd):
    from harness.cli import main
    from harness.evaluation import PAPER_PRIMARY
    from harness.evaluation.evaluate import check_tasks, installed_tasks
    from harness.evaluation.paper_tasks import PAPER_BENCHMARKS, PAPER_TASKS

    installed_tasks.cache_clear()  # the index scan itself must print nothing (lmms-eval logs it at DEBUG)
    capfd.readouterr()
    assert main(["eval", "tiny-llava", "--tasks", "no_such_task", "--out", "unused.json"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown task 'no_such_task'" in err[0] and "synth_gqa" in err[0], err
    index = installed_tasks()
    assert set(PAPER_TASKS) <= index, set(PAPER_TASKS) - index
    assert [c for c, _, _ in PAPER_BENCHMARKS] == ["MMMU", "SQA", "MathVista", "AI2D", "MME-C", "MME-P", "POPE",
                                                  "DocVQA", "GQA"]
    assert set(PAPER_PRIMARY) == set(PAPER_TASKS)
    check_tasks(["paper", "synth", "mme"])
    with pytest.raises(HarnessError, match="did you mean.*pope"):
        check_tasks(["popee"])
