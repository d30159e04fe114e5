"""Samples per second of the `harness` lmms-eval plugin against lmms-eval's built-in `llava_hf`.

Both run the same saved checkpoint on the same synthetic tasks and items through
`simple_evaluate` in one process, timed end to end (request building, generation, scoring),
after one small warm-up run each (a fresh model instance per run, built outside the timing:
lmms-eval's `clean()` deletes the built-in model's weights after each evaluation). `llava_hf`
resolves to its chat class by default (what `lmms-eval --model llava_hf` runs); its simple
class is timed too. `llava_hf` supports batch size 1 only (it asserts so), so it runs at batch 1
and the plugin at batch 1 (the same work) and 8 (`--batch-sizes`; what `harness eval` does).

Method: `--repeats` rounds; every round runs each contender once, in an order rotated every
round, and the samples/s ratio plugin / llava_hf is formed within the round (paired). Each
figure is the median of the per-round ratios with its spread (`_common.figure`); goal >= 1.
Answers are compared item by item with llava_hf chat's (greedy decoding: identical answers
mean identical scores); the share of identical answers is an exact figure, goal 1.

    python benchmarks/bench_eval_plugin.py [--model DIR] [--data DIR] [--tasks T1,T2] [--limit N]
        [--batch-sizes 1,8] [--repeats 5] [--json PATH] [--quick]

Without --model, a tiny-llava is used: the trained teacher if artifacts/teachers/tiny-llava
exists, else a random-init one saved to a temporary folder (random weights never emit
EOS, so every answer runs the full max_new_tokens: a worst case for both). Without
--data, artifacts/data/synth/benchmarks, else a small world generated in a temporary folder.
`llava_hf` imports `decord` (a video reader; unused for images, but imported at module load),
installed by `make bench` (`pip install -e .[bench]`); where it is missing, the benchmark is
skipped with that reason (status "skipped" in its --json output, exit status 0).
`--quick`: 2 items per task, one round, no warm-up (a smoke run).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, paired_ratios, write_result  # noqa: E402


def default_model(tmp: Path) -> Path:
    teacher = REPO / "artifacts" / "teachers" / "tiny-llava"
    if (teacher / "config.json").exists():
        return teacher
    from harness.synthetic.models import build_embedded

    model, processor = build_embedded("tiny-llava", seed=0)
    out = tmp / "tiny-llava-random"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def default_data(tmp: Path, items: int = 64) -> Path:
    data = REPO / "artifacts" / "data" / "synth" / "benchmarks"
    if data.exists():
        return data
    from harness.synthetic.make import WorldSpec, make_world

    return make_world(tmp / "world", WorldSpec(mix_size=4, benchmark_size=max(items, 2))) / "benchmarks"


def run(lm, tasks: list[str], include: Path, limit: int) -> tuple[float, dict, list[str]]:
    """Wall seconds of one simple_evaluate call, its primary scores and its answers in order."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from harness.evaluation import PRIMARY_METRIC

    manager = TaskManager(verbosity="ERROR", include_path=str(include), include_defaults=False)
    start = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, bootstrap_iters=0,
                          log_samples=True, verbosity="ERROR", datetime_str=time.strftime("%Y%m%d_%H%M%S"))
    wall = time.perf_counter() - start
    scores = {t: float(out["results"][t][f"{PRIMARY_METRIC[t]},none"]) for t in tasks}
    answers = [str(r["filtered_resps"][0]) for t in tasks for r in sorted(out["samples"][t], key=lambda r: r["doc_id"])]
    return wall, scores, answers


def make(name: str, model_dir: Path, batch_size: int, force_simple: bool = False):
    import lmms_eval.models as registry

    args = f"pretrained={model_dir}"
    if name == "llava_hf":
        args += ",device_map=cpu,dtype=float32"
    cls = registry.get_model(name, force_simple=force_simple)
    return cls.create_from_arg_string(args, {"batch_size": batch_size, "device": "cpu"})


ANCHORS = [("llava_hf chat (b1)", "llava_hf", False, 1), ("llava_hf simple (b1)", "llava_hf", True, 1)]


def contenders(batch_sizes: list[int]) -> list[tuple[str, str, bool, int]]:
    """(label, lmms-eval model name, force the simple class, batch size): llava_hf (batch 1 only), then the plugin."""
    return ANCHORS + [(f"harness (b{bs})", "harness", False, bs) for bs in batch_sizes]


def _slug(label: str) -> str:
    return label.replace("(", "").replace(")", "").replace(" ", "_")


def missing_requirement() -> str | None:
    """Why lmms-eval's built-in llava_hf cannot run here, or None."""
    if importlib.util.find_spec("decord") is None:
        return ("lmms-eval's llava_hf imports decord, which is not installed (`make bench` installs it: "
                "pip install -e .[bench]); the comparison needs both contenders, so it is skipped")
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", default=None)
    parser.add_argument("--tasks", default="synth_gqa,synth_pope")
    parser.add_argument("--limit", type=int, default=32, help="items per task")
    parser.add_argument("--batch-sizes", default="1,8", help="the plugin's batch sizes (llava_hf runs batch 1)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (each contender once per round)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny models)")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument("--quick", action="store_true", help="2 items per task, 1 round, no warm-up: a smoke run")
    args = parser.parse_args(argv)
    reason = missing_requirement()
    if reason:
        print(f"SKIPPED: {reason}")
        return write_result(args.json, "eval_plugin", {}, status="skipped", reason=reason)

    import torch

    from harness.evaluation.evaluate import render_tasks

    torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",")
    limit, repeats = (2, 1) if args.quick else (args.limit, args.repeats)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    runs = contenders(batch_sizes)
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        tmp = Path(tmp)
        model_dir = Path(args.model) if args.model else default_model(tmp)
        include = render_tasks(Path(args.data) if args.data else default_data(tmp, 8 if args.quick else 64),
                               tmp / "tasks", cache_dir=tmp / "cache")
        n = limit * len(tasks)
        print(f"model {model_dir}, tasks {tasks}, {n} samples, {repeats} rounds, {args.threads} thread(s)")
        if not args.quick:
            for _label, name, simple, bs in runs:  # warm-up: dataset cache, kernels
                run(make(name, model_dir, bs, simple), tasks, include, limit=2)
        rates = {label: [] for label, *_ in runs}
        answers, scores, unstable = {}, {}, []
        for r in range(repeats):
            for label, name, simple, bs in runs[r % len(runs):] + runs[:r % len(runs)]:
                lm = make(name, model_dir, bs, simple)
                wall, scores[label], got = run(lm, tasks, include, limit)
                del lm
                answers.setdefault(label, got)
                if got != answers[label]:
                    unstable.append(f"{label} round {r}")
                rates[label].append(n / wall)
                print(f"round {r} {label:22s} batch {bs:2d} {n / wall:8.2f} samples/s ({wall:6.2f} s) scores {scores[label]}")
    anchor = ANCHORS[0][0]
    figures, same = {}, {}
    for label, *_ in runs:
        same[label] = sum(a.strip() == b.strip() for a, b in zip(answers[label], answers[anchor], strict=True))
    for label, _, _, bs in runs[len(ANCHORS):]:
        for base, *_ in ANCHORS:
            key = f"harness_b{bs}_over_{_slug(base)}"
            figures[key] = figure(paired_ratios(rates[label], rates[base]), f">= 1 (samples/s, plugin at batch {bs} / "
                                  f"{base.removesuffix(' (b1)')} at batch 1, its only batch size)")
        diff = {t: scores[label][t] - scores[anchor][t] for t in tasks}
        note = "" if not any(diff.values()) else f"score differences vs llava_hf: {diff}"
        if unstable:
            note += f" answers changed between rounds: {unstable}"
        figures[f"harness_b{bs}_identical_answers"] = figure(
            [same[label] / n], ">= 1 (share of answers identical to llava_hf chat's: then every score is)",
            exact=True, note=note)
    for key, f in figures.items():
        print(f"{key:45s} {f['value']:6.3f} [{f['lo']:.3f}, {f['hi']:.3f}] n={f['n']} {f['verdict']}")
    return write_result(args.json, "eval_plugin", figures,
                        details={"samples_per_s": rates, "answers_equal_to_llava_hf_chat": same, "scores": scores,
                                 "answers_changed_between_rounds": unstable, "samples": n, "tasks": tasks,
                                 "threads": args.threads, "batch_sizes": batch_sizes,
                                 "repeats": repeats, "model": str(model_dir) if args.model else "tiny-llava"})


if __name__ == "__main__":
    main()
