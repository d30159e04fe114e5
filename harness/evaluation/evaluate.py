"""`harness eval`: score a model with lmms-eval and write one JSON (plus per-sample logs).

    harness eval MODEL --tasks synth --out results/eval.json [--teacher T] [--limit N] [--data DIR]

The JSON holds `model`, `tasks`, `scores` ({task: {metric: value}}), `primary`
({task: metric}), `benchmarks` ({name: [task, metric]}: one per task, two for lmms-eval's
`mme`), `n_samples`, `efficiency`, and with a teacher `retained` ({benchmark: percent})
and `avg_retained`. lmms-eval's per-sample records go to `<out minus .json>.samples.jsonl`.

Retention (ours; the paper's AVG-% formula is unpublished): for each benchmark,
retained = 100 * student / teacher on its primary metric; avg_retained is the plain
mean over benchmarks. A benchmark whose teacher score is 0 has no ratio: its retained
value is null and it is left out of the mean.

Where the synthetic benchmark data comes from: the shipped YAMLs name
`artifacts/data/synth/benchmarks/<task>.parquet` relative to the working directory.
`evaluate` renders them into a temporary include folder with the chosen data folder
(`data_dir`, default that same path) as an absolute path, and a private datasets cache
inside it, so nothing is written outside the temporary folder and the outputs.
`render_tasks(data_dir, dest)` does the same for a plain `lmms-eval --include_path dest` run.

Determinism: lmms-eval's seeds (python 0, numpy/torch 1234) are passed explicitly, the
plugin decodes greedily, and `datetime_str` is passed per call, so the same weights give
the same scores.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

from harness.errors import HarnessError
from harness.evaluation import DEFAULT_DATA_DIR, PRIMARY_METRIC, SYNTH_GROUP, SYNTH_TASKS, TASKS_DIR
from harness.evaluation.paper_tasks import MULTI_BENCHMARK_TASKS, PAPER_GROUP, PAPER_TASKS
from harness.evaluation.settings import EvalSettings
from harness.io import atomic_write_text, read_json, write_json
from harness.settings import add_arguments, from_args
from harness.tracking import portable

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED = 0


# ----------------------------------------------------------------------------- tasks
def split_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """'a,b' or ['a', 'b,c'] -> ['a', 'b', 'c'] (groups `synth` and `paper` expanded, order kept)."""
    raw = [tasks] if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for item in raw for n in str(item).split(",") if n.strip()]
    if not names:
        raise HarnessError("no tasks given")
    expanded = []
    for name in names:
        expanded += list(SYNTH_TASKS) if name == SYNTH_GROUP else PAPER_TASKS if name == PAPER_GROUP else [name]
    return list(dict.fromkeys(expanded))


@functools.lru_cache(maxsize=1)
def installed_tasks() -> frozenset[str]:
    """Every task, group and tag name the installed lmms-eval knows (indexing takes 5-8 s, once).

    lmms-eval logs through loguru at DEBUG while it scans its ~2,000 task YAMLs; those lines
    are about its own files, not the user's request, so they are silenced for the scan.
    """
    from lmms_eval.tasks import TaskManager
    from loguru import logger

    logger.disable("lmms_eval")
    try:
        return frozenset(TaskManager(verbosity="ERROR").all_tasks)
    finally:
        logger.enable("lmms_eval")


def check_tasks(names: list[str]) -> None:
    """Unknown names fail with close matches. `synth*` names are ours, so they skip lmms-eval's index."""
    ours = set(SYNTH_TASKS) | {SYNTH_GROUP, PAPER_GROUP}
    for name in names:
        if name in ours:
            continue
        candidates = ours if name.startswith("synth") else ours | installed_tasks()
        if name in candidates:
            continue
        close = difflib.get_close_matches(name, sorted(candidates), n=3, cutoff=0.75)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise HarnessError(f"unknown task {name!r}; {hint}the harness's suites are {SYNTH_GROUP} and {PAPER_GROUP}, "
                           f"its synthetic tasks {', '.join(SYNTH_TASKS)} (any installed lmms-eval task works too)")


def primary_metric(task: str, scores: dict[str, float]) -> str:
    """The declared primary metric, or for other lmms-eval tasks the first metric they report."""
    if task in PRIMARY_METRIC:
        return PRIMARY_METRIC[task]
    if not scores:
        raise HarnessError(f"task {task!r} reported no metrics")
    return next(iter(scores))


def benchmarks(tasks: list[str], primary: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Benchmark name -> (task, metric): one per task, except tasks that hold several (lmms-eval's mme)."""
    out: dict[str, tuple[str, str]] = {}
    for task in tasks:
        split = MULTI_BENCHMARK_TASKS.get(task)
        out.update({name: (task, m) for name, m in split.items()} if split else {task: (task, primary[task])})
    return out


# ----------------------------------------------------------------------------- data
def resolve_data_dir(data_dir: str | Path | None, tasks: list[str]) -> Path:
    """The folder of `<task>.parquet` files; a world folder (with benchmarks/) is accepted too."""
    path = Path(data_dir) if data_dir is not None else Path(DEFAULT_DATA_DIR)
    if data_dir is None and not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    if (path / "benchmarks").is_dir() and not any(path.glob("synth_*.parquet")):
        path = path / "benchmarks"
    missing = [t for t in tasks if t in SYNTH_TASKS and not (path / f"{t}.parquet").exists()]
    if missing:
        raise HarnessError(f"benchmark data missing in {path}: {', '.join(m + '.parquet' for m in missing)} "
                           "(write it with `harness data make`)")
    return path.resolve()


def render_tasks(data_dir: str | Path, dest: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Copy the synthetic task YAMLs and utils.py to `dest`, pointing them at `data_dir` (absolute).

    `data_dir` may be the benchmark folder or a world folder holding benchmarks/. With
    `cache_dir`, datasets keeps its Arrow cache there instead of the user's HF cache.
    """
    data_dir, dest = resolve_data_dir(data_dir, list(SYNTH_TASKS)), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for src in sorted(TASKS_DIR.iterdir()):
        if src.suffix not in (".yaml", ".py"):
            continue
        text = src.read_text()
        if src.name.startswith("synth_"):
            text = text.replace(f"{DEFAULT_DATA_DIR}/", f"{data_dir.as_posix()}/")
            if cache_dir is not None:
                text = text.replace("dataset_kwargs:\n", f"dataset_kwargs:\n  cache_dir: {Path(cache_dir).resolve()}\n")
        (dest / src.name).write_text(text)
    return dest


# ----------------------------------------------------------------------------- model
def make_lm(model_or_spec, device: str | None = None, batch_size: int = 32, dtype: str | None = None):
    """(plugin instance, name for the JSON) from a spec, a (model, processor) pair or a plugin."""
    import lmms_eval.models  # noqa: F401  (its registry loads our entry point; importing it first avoids a cycle)

    from harness.evaluation.lmms_model import HarnessMLLM

    if isinstance(model_or_spec, HarnessMLLM):
        model_or_spec.batch_size = batch_size
        return model_or_spec, str(model_or_spec.pretrained or _object_name(model_or_spec.model))
    if isinstance(model_or_spec, (tuple, list)) and len(model_or_spec) == 2:
        model, processor = model_or_spec
        return HarnessMLLM(model=model, processor=processor, device=device, batch_size=batch_size), _object_name(model)
    if isinstance(model_or_spec, (str, Path)):
        lm = HarnessMLLM(pretrained=str(model_or_spec), device=device, batch_size=batch_size, dtype=dtype)
        return lm, str(model_or_spec)
    raise HarnessError(f"cannot evaluate a {type(model_or_spec).__name__}: pass a model spec, "
                       "a (model, processor) pair or a HarnessMLLM")


def _object_name(model) -> str:
    return f"in-memory:{getattr(model.config, '_name_or_path', '') or type(model).__name__}"


# ----------------------------------------------------------------------------- lmms-eval
def run_lmms_eval(lm, tasks: list[str], include_dir: Path | None, limit=None) -> dict:
    """One seeded `simple_evaluate` call; only our include folder is indexed unless a task needs more."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    needs_defaults = any(t not in SYNTH_TASKS for t in tasks)
    manager = TaskManager(verbosity="ERROR", include_path=str(include_dir) if include_dir else None,
                          include_defaults=needs_defaults)
    return simple_evaluate(
        model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=True, bootstrap_iters=0,
        random_seed=SEED, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234,
        datetime_str=time.strftime("%Y%m%d_%H%M%S"), verbosity="ERROR",
    )


def parse_scores(results: dict, tasks: list[str]) -> dict[str, dict[str, float]]:
    """lmms-eval's {'task': {'metric,none': v, 'metric_stderr,none': ...}} -> {'task': {'metric': v}}."""
    scores = {}
    for task in tasks:
        row = results["results"].get(task)
        if row is None:
            raise HarnessError(f"lmms-eval returned no results for {task!r}")
        scores[task] = {key.split(",")[0]: float(value) for key, value in row.items() if _is_metric(key, value)}
    return scores


def _is_metric(key: str, value) -> bool:
    return key != "alias" and "_stderr" not in key and isinstance(value, (int, float)) and not isinstance(value, bool)


def write_samples(results: dict, path: Path) -> int:
    """lmms-eval's per-sample records, one JSON line each, with the task name added."""
    lines = []
    for task, records in sorted(results.get("samples", {}).items()):
        for record in records:
            lines.append(json.dumps({"task": task, **record}, sort_keys=True, default=str))
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    return len(lines)


# ----------------------------------------------------------------------------- teacher
def teacher_score_table(teacher, **eval_kwargs) -> tuple[dict, str]:
    """({task: {metric: v}}, description) from a dict, an eval JSON, or a model to evaluate now."""
    if isinstance(teacher, dict):
        return (teacher["scores"] if "scores" in teacher else teacher), "scores given"
    if isinstance(teacher, (str, Path)) and str(teacher).endswith(".json"):
        path = Path(teacher)
        if not path.is_file():
            raise HarnessError(f"teacher eval file not found: {path}")
        try:
            data = read_json(path)
        except json.JSONDecodeError as e:
            raise HarnessError(f"teacher eval file {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or "scores" not in data:
            raise HarnessError(f"teacher eval file {path} has no 'scores' (write it with `harness eval`)")
        return data["scores"], str(path)
    result = evaluate(teacher, **eval_kwargs)
    return result["scores"], result["model"]


def check_teacher(teacher: dict, bench: dict[str, tuple[str, str]]) -> None:
    """Every benchmark needs the teacher's score on the same task and metric."""
    for task, metric in bench.values():
        if task not in teacher:
            have = ", ".join(sorted(teacher)) or "none"
            raise HarnessError(f"teacher scores have no task {task!r} (they cover: {have})")
        if metric not in teacher[task]:
            raise HarnessError(f"teacher scores for {task!r} have no metric {metric!r} "
                               f"(they have: {', '.join(sorted(teacher[task]))})")


def retention(scores: dict, teacher: dict, bench: dict[str, tuple[str, str]]) -> tuple[dict, float | None]:
    """Per-benchmark retained % of the teacher's primary metric, and their plain mean."""
    check_teacher(teacher, bench)
    retained: dict[str, float | None] = {}
    for name, (task, metric) in bench.items():
        t_score, s_score = float(teacher[task][metric]), scores[task][metric]
        retained[name] = 100.0 * s_score / t_score if t_score else None
    defined = [v for v in retained.values() if v is not None]
    return retained, (statistics.fmean(defined) if defined else None)


# ----------------------------------------------------------------------------- evaluate
def evaluate(model_or_spec, tasks: str | list[str] = SYNTH_GROUP, out_file: str | Path | None = None,
             teacher_scores=None, limit: int | float | None = None, data_dir: str | Path | None = None,
             batch_size: int = 32, device: str | None = None, dtype: str | None = None,
             efficiency: bool = True) -> dict:
    """Evaluate one model on lmms-eval tasks; write `out_file` (JSON, atomically) if given; return the record.

    `model_or_spec`: a checkpoint folder, embedded name or hub id; a (model, processor)
    pair (evaluated in memory); or a HarnessMLLM. `teacher_scores`: a {task: {metric: v}}
    dict (or a whole eval record), a teacher eval JSON, or a teacher model (evaluated
    here with the same settings). `limit`: samples per task (lmms-eval's --limit).
    `device`/`dtype` apply to models loaded from a spec (default: cuda if available, float32).
    `efficiency` adds the probe of harness.evaluation.efficiency plus samples_per_s, the
    benchmark samples answered per second of model time inside the plugin.
    """
    names = split_tasks(tasks)
    check_tasks(names)
    if limit is not None and limit <= 0:
        raise HarnessError(f"limit must be positive, got {limit}")
    if batch_size < 1:
        raise HarnessError(f"batch size must be at least 1, got {batch_size}")
    synth = [t for t in names if t in SYNTH_TASKS]
    data = resolve_data_dir(data_dir, synth) if synth else None
    teacher, teacher_source = None, None
    if teacher_scores is not None:  # before the student: a bad teacher fails fast
        teacher, teacher_source = teacher_score_table(
            teacher_scores, tasks=names, limit=limit, data_dir=data, batch_size=batch_size, device=device,
            dtype=dtype, efficiency=False)
        declared = [t for t in names if t in PRIMARY_METRIC]
        check_teacher(teacher, benchmarks(declared, PRIMARY_METRIC))
    lm, model_name = make_lm(model_or_spec, device=device, batch_size=batch_size, dtype=dtype)
    lm.samples_done, lm.model_seconds = 0, 0.0  # a reused plugin instance counts this run only
    with tempfile.TemporaryDirectory(prefix="harness-eval-") as tmp:
        include = render_tasks(data, Path(tmp) / "tasks", cache_dir=Path(tmp) / "cache") if data else None
        start = time.perf_counter()
        results = run_lmms_eval(lm, names, include, limit=limit)
        wall = time.perf_counter() - start
    scores = parse_scores(results, names)
    primary = {t: primary_metric(t, scores[t]) for t in names}
    bench = benchmarks(names, primary)
    record = {
        "model": model_name, "tasks": names, "limit": limit, "data_dir": portable(str(data)) if data else None,
        "scores": scores, "primary": primary, "benchmarks": {k: list(v) for k, v in bench.items()},
        "n_samples": {t: int(results.get("n-samples", {}).get(t, {}).get("effective", 0)) for t in names},
        "seed": SEED, "eval_wall_s": wall,
    }
    if teacher is not None:
        record["retained"], record["avg_retained"] = retention(scores, teacher, bench)
        record["teacher"] = teacher_source
    if efficiency:
        from harness.evaluation.efficiency import measure

        record["efficiency"] = {
            **measure(lm.model, lm.processor),
            "samples_per_s": lm.samples_done / lm.model_seconds if lm.model_seconds else None,
        }
    if out_file is not None:
        out_file = Path(out_file)
        record["samples_file"] = samples_path(out_file).name
        write_samples(results, samples_path(out_file))
        write_json(out_file, record)
    return record


def samples_path(out_file: Path) -> Path:
    """results/x.json -> results/x.samples.jsonl (beside the JSON)."""
    stem = out_file.name[:-5] if out_file.name.endswith(".json") else out_file.name
    return out_file.with_name(stem + ".samples.jsonl")


# ----------------------------------------------------------------------------- CLI
def cmd_eval(args) -> None:
    """`harness eval`: evaluate, write the JSON, print the primary scores."""
    settings = dataclasses.replace(from_args(EvalSettings, args), efficiency=not args.no_efficiency)
    record = evaluate(args.model, args.tasks, args.out, teacher_scores=args.teacher, data_dir=args.data,
                      **dataclasses.asdict(settings))
    for name, (task, metric) in record["benchmarks"].items():
        line = f"{name:16s} {metric:22s} {record['scores'][task][metric]:10.4f}"
        if "retained" in record:
            kept = record["retained"][name]
            line += f"   retained {kept:6.2f}%" if kept is not None else "   retained   n/a"
        print(line)
    if record.get("avg_retained") is not None:
        print(f"{'AVG-%':16s} {'':22s} {record['avg_retained']:10.2f}")
    print(f"written to {args.out}")


def add_eval_parser(subparsers) -> None:
    """Register `harness eval` on the central CLI's subparsers."""
    p = subparsers.add_parser("eval", help="evaluate a model with lmms-eval (synthetic or paper tasks)")
    p.add_argument("model", help="checkpoint folder, embedded name (tiny-llava) or hub id")
    p.add_argument("--tasks", default=SYNTH_GROUP,
                   help=f"comma-separated lmms-eval tasks; groups: {SYNTH_GROUP} (synthetic suite), "
                        f"{PAPER_GROUP} (the paper's benchmarks, online data)")
    p.add_argument("--teacher", default=None, help="teacher eval JSON or teacher model, for retained %%")
    p.add_argument("--out", required=True, help="result JSON (per-sample log written beside it)")
    p.add_argument("--data", default=None, help=f"synthetic benchmark folder (default {DEFAULT_DATA_DIR})")
    add_arguments(p, EvalSettings)
    p.add_argument("--no-efficiency", action="store_true", help="skip the latency/memory probe")
    p.set_defaults(func=cmd_eval)
