"""Samples per second of the `harness` lmms-eval plugin against lmms-eval's built-in `llava_hf`.

Both run the same saved checkpoint on the same synthetic tasks through `simple_evaluate`
in one process, timed end to end (request building, generation, scoring), after one
small warm-up run each (a fresh model instance per run: lmms-eval's `clean()` deletes
the built-in model's weights after each evaluation). `llava_hf` resolves to its chat
class by default (what `lmms-eval --model llava_hf` runs); its simple class is timed too.
It only supports batch size 1, so the plugin is timed at batch 1 (same work) and at
its batched setting (what `harness eval` does).

    python benchmarks/bench_eval_plugin.py [--model DIR] [--data DIR] [--tasks T1,T2] [--limit N]

Without --model, a tiny-llava is used: the trained teacher if artifacts/teachers/tiny-llava
exists, else a random-init one saved to a temporary folder (random weights never emit
EOS, so every answer runs the full max_new_tokens: a worst case for both). Without
--data, artifacts/data/synth/benchmarks, else a small world generated in a temporary folder.
`llava_hf` imports `decord`; where it is missing, the benchmark is skipped with that reason
(status "skipped" in its --json output, exit status 0); `pip install decord` (a wheel on PyPI)
enables it.
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
from _common import write_result  # noqa: E402


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


def default_data(tmp: Path) -> Path:
    data = REPO / "artifacts" / "data" / "synth" / "benchmarks"
    if data.exists():
        return data
    from harness.synthetic.make import WorldSpec, make_world

    return make_world(tmp / "world", WorldSpec(mix_size=4, benchmark_size=64)) / "benchmarks"


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


# (label, lmms-eval model name, force the simple class, batch size); None = the --batch-size option
CONTENDERS = [
    ("llava_hf chat (b1)", "llava_hf", False, 1),
    ("llava_hf simple (b1)", "llava_hf", True, 1),
    ("harness (b1)", "harness", False, 1),
    ("harness (batched)", "harness", False, None),
]


def _slug(label: str) -> str:
    return label.replace("(", "").replace(")", "").replace(" ", "_")


def missing_requirement() -> str | None:
    """Why lmms-eval's built-in llava_hf cannot run here, or None."""
    if importlib.util.find_spec("decord") is None:
        return ("lmms-eval's llava_hf imports decord, which is not installed (pip install decord); "
                "the comparison needs both contenders, so it is skipped")
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", default=None)
    parser.add_argument("--tasks", default="synth_gqa,synth_pope")
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="the plugin's batched setting")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny models)")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args(argv)
    reason = missing_requirement()
    if reason:
        print(f"SKIPPED: {reason}")
        return write_result(args.json, "eval_plugin", {}, {}, status="skipped", reason=reason)

    import torch

    from harness.evaluation.evaluate import render_tasks

    torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        tmp = Path(tmp)
        model_dir = Path(args.model) if args.model else default_model(tmp)
        include = render_tasks(Path(args.data) if args.data else default_data(tmp), tmp / "tasks",
                               cache_dir=tmp / "cache")
        n = args.limit * len(tasks)
        print(f"model {model_dir}, tasks {tasks}, {n} samples, {args.threads} thread(s)")
        rates, answers = {}, {}
        for label, name, simple, bs in CONTENDERS:
            bs = bs or args.batch_size
            run(make(name, model_dir, bs, simple), tasks, include, limit=2)  # warm-up: dataset cache, kernels
            wall, scores, answers[label] = run(make(name, model_dir, bs, simple), tasks, include, args.limit)
            rates[label] = n / wall
            print(f"{label:22s} batch {bs:3d} {rates[label]:8.2f} samples/s  ({wall:6.2f} s)  scores {scores}")
        base_answers = answers[CONTENDERS[0][0]]
        for label, got in answers.items():
            same = sum(a.strip() == b.strip() for a, b in zip(got, base_answers, strict=True))
            print(f"answers of {label} equal to llava_hf chat's: {same}/{len(got)}")
        ratios = {}
        for base in ("llava_hf chat (b1)", "llava_hf simple (b1)"):
            for label in ("harness (b1)", "harness (batched)"):
                print(f"ratio {label} / {base}: {rates[label] / rates[base]:.2f}x")
                key = f"{_slug(label)}_over_{_slug(base)}"
                ratios[key] = round(rates[label] / rates[base], 4)
        same = {label: sum(a.strip() == b.strip() for a, b in zip(got, base_answers, strict=True))
                for label, got in answers.items()}
    return write_result(args.json, "eval_plugin", ratios, {k: ">= 1 (samples/s)" for k in ratios},
                        {"samples_per_s": rates, "answers_equal_to_llava_hf_chat": same, "samples": n,
                         "tasks": tasks, "threads": args.threads, "batch_size": args.batch_size})


if __name__ == "__main__":
    main()
