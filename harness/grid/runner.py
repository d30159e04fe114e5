"""Turn a spec into a DAG of shared stages, run what is missing, and write tidy results.

Safety: every stage writes atomically and is done exactly when its artifact exists;
a file lock per stage stops two runners (or SLURM array tasks) from computing the
same stage; a failing stage is recorded with its reason and its cells are skipped
until `--retry-failed` (the failed cells and their reasons are in `failed.csv` beside
the results). A runner killed at any moment (kill -9 included) leaves no lock that
blocks and no half-written artifact; a rerun removes its temporaries and finishes
with the results an uninterrupted run gives (tests/test_reliability.py).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from harness.errors import HarnessError
from harness.grid import stages as st
from harness.grid.spec import Cell, Spec
from harness.io import read_json
from harness.paths import grid_root


class GridFailed(Exception):
    """Some stages failed; `results` holds the cells that finished (or None)."""

    def __init__(self, results, failed: int):
        super().__init__(f"{failed} stage(s) failed")
        self.results = results


@dataclass
class Plan:
    spec: Spec
    cells: list[Cell]
    stages: dict[str, st.Stage] = field(default_factory=dict)  # key -> stage, in dependency order
    cell_stages: dict[Cell, dict[str, str]] = field(default_factory=dict)  # cell -> {teacher-eval, final-eval, ...}

    def add(self, stage: st.Stage) -> str:
        self.stages.setdefault(stage.key, stage)
        return stage.key


def build_plan(spec: Spec) -> Plan:
    plan = Plan(spec, spec.cells())
    data = str(Path(spec.data))
    ev = {k: v for k, v in spec.eval_settings.items() if v is not None}
    fps = {t: st.fingerprint(t) for t in spec.teachers}
    for cell in plan.cells:
        base = {"data": data, "tasks": spec.tasks}
        t_eval = plan.add(st.Stage("teacher-eval", {**base, "teacher": cell.teacher, "teacher_fp": fps[cell.teacher],
                                                    "settings": ev}))
        prune_settings = spec.prune_overrides(cell.method)
        prune = plan.add(st.Stage("prune", {"teacher": cell.teacher, "teacher_fp": fps[cell.teacher], "data": data,
                                            "method": cell.method, "ratio": cell.ratio, "settings": prune_settings}))
        final_model, deps = f"pruned/{prune}", [prune]
        ids = {"teacher-eval": t_eval, "prune": prune}
        if cell.recovery != "none":
            settings = {**spec.recover_settings, **spec.recipe_settings.get(cell.recovery, {}), "seed": cell.seed}
            rec = plan.add(st.Stage("recover", {"teacher": cell.teacher, "teacher_fp": fps[cell.teacher],
                                                "student": prune, "recipe": cell.recovery, "data": data,
                                                "data_fraction": cell.data_fraction, "settings": settings},
                                    deps=[prune]))
            final_model, deps = f"recovered/{rec}", [rec]
            ids["recover"] = rec
        ids["eval"] = plan.add(st.Stage("eval", {**base, "model_dir": final_model, "settings": ev}, deps=deps))
        plan.cell_stages[cell] = ids
    return plan


def stage_cells(plan: Plan, key: str) -> dict[Cell, dict[str, str]]:
    """The cells a stage serves, each with its stage keys (what the stage's W&B run describes)."""
    return {cell: ids for cell, ids in plan.cell_stages.items() if key in ids.values()}


def stage_state(stage: st.Stage) -> str:
    if stage.done():
        return "done"
    return "failed" if stage.failure() else "todo"


def _blocked(plan: Plan, stage: st.Stage, retry_failed: bool) -> str | None:
    for dep in stage.deps:
        d = plan.stages[dep]
        if not d.done():
            return f"depends on {d.kind} {dep}, which is not done"
    if stage.failure() and not retry_failed:
        return f"failed before: {stage.failure()['reason']} (rerun with --retry-failed)"
    return None


def ensure(plan: Plan, stage: st.Stage, retry_failed: bool = False, log=print) -> float:
    """Run `stage` unless done; return compute seconds spent (0 if skipped)."""
    if stage.done():
        return 0.0
    reason = _blocked(plan, stage, retry_failed)
    if reason:
        raise HarnessError(reason)
    with stage_lock(stage, log):
        if stage.done():  # finished by the other runner while we waited
            return 0.0
        st.remove_leftovers(stage)  # debris of a killed run of this stage (we hold its lock: no one else writes it)
        st.clear_failure(stage)
        log(f"  {stage.kind} {stage.key} ...")
        try:
            seconds = st.run_stage(stage, plan.spec.name, stage_cells(plan, stage.key))
        except Exception as e:
            st.record_failure(stage, e)
            raise
        log(f"  {stage.kind} {stage.key} done in {seconds:.1f} s")
        _append_run_log(stage, seconds)
        return seconds


@contextlib.contextmanager
def stage_lock(stage: st.Stage, log=print):
    """Hold the stage's lock. It is an OS lock (flock): a runner killed with -9 releases it with its
    process, so the lock file it leaves behind never blocks a rerun."""
    lock_path = grid_root() / "locks" / f"{stage.key}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"  {stage.kind} {stage.key}: another runner holds it; waiting")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _append_run_log(stage: st.Stage, seconds: float) -> None:
    """One line per computed stage: which process ran it and how long it took (audit and overhead).

    One `write` of a short line in append mode: a kill leaves the line whole or absent.
    """
    import json

    line = json.dumps({"key": stage.key, "kind": stage.kind, "pid": os.getpid(), "seconds": round(seconds, 3),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    with open(grid_root() / "runs.jsonl", "a") as f:
        f.write(line + "\n")


def run_local(plan: Plan, retry_failed: bool = False, log=print) -> dict:
    """Run every missing stage in this process (torch and lmms-eval are imported once)."""
    t0 = time.perf_counter()
    compute, failed = 0.0, {}
    for key, stage in plan.stages.items():
        try:
            compute += ensure(plan, stage, retry_failed, log)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # recorded on disk; the other cells go on
            failed[key] = str(e).splitlines()[0] if str(e) else type(e).__name__
            log(f"  {stage.kind} {key} FAILED: {failed[key]}")
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "compute_s": compute, "failed": failed}


class StageJob:
    """A submitit job that runs one stage; requeued on preemption (stages are idempotent).

    A stage that trains on several processes (`stage_tasks`) is one job of that many tasks, one per GPU:
    every task runs the stage's recovery as one DDP rank (Lightning reads the ranks from SLURM, or from
    the torch.distributed variables exported here); rank 0 alone takes the stage's lock, checks and
    records it, and writes its output.
    """

    def __init__(self, spec_path: str, key: str, retry_failed: bool):
        self.spec_path, self.key, self.retry_failed = spec_path, key, retry_failed

    def __call__(self) -> float:
        import submitit

        from harness.grid.spec import load_spec

        plan = build_plan(load_spec(self.spec_path))
        stage, env = plan.stages[self.key], submitit.JobEnvironment()
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            os.environ["GROUP_RANK"] = str(env.node)  # with the exported RANK etc., what Lightning reads
        if env.global_rank > 0:
            if not stage.done():
                st.run_stage(stage, plan.spec.name, stage_cells(plan, stage.key))
            return 0.0
        return ensure(plan, stage, self.retry_failed)

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(StageJob(self.spec_path, self.key, self.retry_failed))


def stage_tasks(stage: st.Stage) -> int:
    """Processes (one per GPU) a stage runs on: a recovery's `devices` setting; 1 for the others."""
    if stage.kind != "recover":
        return 1
    from harness.recovery.recipes import get_recipe

    return get_recipe(stage.payload["recipe"], **stage.payload["settings"]).devices


def waves(plan: Plan) -> list[list[str]]:
    """Stages grouped by dependency depth: each wave is one job array."""
    depth: dict[str, int] = {}
    for key, stage in plan.stages.items():
        depth[key] = 1 + max((depth[d] for d in stage.deps), default=-1)
    out: list[list[str]] = [[] for _ in range(max(depth.values()) + 1)]
    for key, d in depth.items():
        if not plan.stages[key].done():
            out[d].append(key)
    return [w for w in out if w]


def run_submitit(plan: Plan, backend: str, retry_failed: bool = False, log=print, executor_params=None) -> dict:
    """SLURM job arrays through submitit (`submitit-local` runs the same on this machine).

    Each dependency wave is one job array per task count (`stage_tasks`); `executor_params` are submitit's
    (`slurm_partition`, `timeout_min`, ...; default timeout 600 min). On SLURM each task gets `gpus_per_node`
    GPUs (default 1): a 4-process full-SFT recovery is one job of 4 tasks and 4 GPUs.
    """
    import submitit

    t0 = time.perf_counter()
    folder = grid_root() / "submitit" / plan.spec.name
    if backend == "slurm":
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    else:
        executor = submitit.LocalExecutor(folder=folder)
    params = {"timeout_min": 600, **(executor_params or {})}
    gpus_per_task = params.pop("gpus_per_node", 1 if backend == "slurm" else 0)
    compute, failed = 0.0, {}
    for wave in waves(plan):
        by_tasks: dict[int, list[str]] = {}
        for key in wave:
            by_tasks.setdefault(stage_tasks(plan.stages[key]), []).append(key)
        submitted = []
        for tasks, keys in sorted(by_tasks.items()):
            executor.update_parameters(**params, tasks_per_node=tasks, gpus_per_node=gpus_per_task * tasks)
            submitted += zip(keys, executor.submit_array([StageJob(str(plan.spec.path), k, retry_failed)
                                                          for k in keys]))
        for key, job in submitted:
            try:
                compute += job.results()[0]  # rank 0's seconds; raises if any task failed
            except Exception as e:
                failed[key] = str(e).strip().splitlines()[-1] if str(e) else type(e).__name__
                log(f"  {plan.stages[key].kind} {key} FAILED: {failed[key]}")
    return {"wall_s": time.perf_counter() - t0, "compute_s": compute, "failed": failed}


def collect_rows(plan: Plan) -> list[dict]:
    """One row per (cell, benchmark, metric) for every cell whose evaluation is done."""
    rows = []
    for cell, ids in plan.cell_stages.items():
        final, teacher = plan.stages[ids["eval"]], plan.stages[ids["teacher-eval"]]
        if not (final.done() and teacher.done()):
            continue
        res, t_res = read_json(final.output), read_json(teacher.output)
        pruning = read_json(plan.stages[ids["prune"]].output / "pruning.json")
        primaries = {tuple(v): name for name, v in res.get("benchmarks", {}).items()}
        for task, metrics in res["scores"].items():
            for metric, score in metrics.items():
                if not isinstance(score, (int, float)):
                    continue
                bench = primaries.get((task, metric), task)
                t_score = t_res["scores"].get(task, {}).get(metric)
                retained = 100.0 * score / t_score if t_score else float("nan")
                rows.append({
                    "experiment": plan.spec.name, "cell": cell.label, **asdict(cell),
                    "ratio_achieved": pruning.get("ratio_achieved"), "benchmark": bench, "metric": metric,
                    "primary": (task, metric) in primaries, "score": float(score),
                    "teacher_score": t_score, "retained": retained,
                })
    return rows


def collect_items(plan: Plan) -> list[dict]:
    """Per-item scores on each benchmark's primary metric, for `items.parquet` (item-level bootstrap).

    Read from the lmms-eval sample log beside each evaluation (`<key>.samples.jsonl`, named by the
    eval JSON's `samples_file`). One row per (evaluation, benchmark, item): the identifier columns of
    cells.csv, `role` ('student', or 'teacher' once per teacher for its own evaluation, with empty
    pruning columns), `benchmark`, `item`, `stratum`, `score`, `pred`, `gold`. The benchmark's
    score is recomputed from the rows exactly as lmms-eval aggregates it:
    - mean metrics (exact_match, anls, ...): `score` is the item's value (item = lmms-eval doc_id),
      the benchmark score is their mean;
    - MME (`mme_*_score`): an item is one image's question pair (incomplete pairs dropped, as the
      aggregate does), `score` its acc + acc+ in percent (0, 50 or 200), `stratum` its category;
      the benchmark score is the sum over categories of the mean;
    - POPE F1 is not a per-item quantity: `score` is correctness (0/1) and `pred`/`gold` ('yes',
      'no' or 'other') let a bootstrap recompute precision, recall and F1 on every resample.
    A benchmark whose per-sample values are none of these (e.g. an LLM-judge record) gets no rows.
    """
    import json

    rows, teachers_seen = [], set()
    for cell, ids in plan.cell_stages.items():
        final, teacher = plan.stages[ids["eval"]], plan.stages[ids["teacher-eval"]]
        if not (final.done() and teacher.done()):
            continue
        evals = [("student", final, {"cell": cell.label, **asdict(cell)})]
        if cell.teacher not in teachers_seen:
            teachers_seen.add(cell.teacher)
            evals.append(("teacher", teacher, {"cell": f"{cell.teacher}/teacher", "teacher": cell.teacher}))
        for role, stage, ident in evals:
            res = read_json(stage.output)
            log = stage.output.with_name(res.get("samples_file") or f"{stage.key}.samples.jsonl")
            if not log.is_file():
                continue
            records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            base = {"experiment": plan.spec.name, **ident, "role": role}
            for bench, (task, metric) in res.get("benchmarks", {}).items():
                found, pairs, known = [], {}, True
                for rec in (r for r in records if r.get("task") == task and metric in r):
                    value, item = rec[metric], {**base, "benchmark": bench, "item": str(rec["doc_id"]),
                                                "stratum": None, "pred": None, "gold": None}
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        found.append({**item, "score": float(value)})
                    elif isinstance(value, dict) and {"prediction", "ground_truth", "score"} <= value.keys():
                        pred = value["prediction"] if value["prediction"] in ("yes", "no") else "other"
                        found.append({**item, "score": float(value["score"]), "pred": pred,
                                      "gold": value["ground_truth"]})
                    elif isinstance(value, dict) and {"category", "question_id", "score"} <= value.keys():
                        pairs.setdefault((value["category"], str(value["question_id"])), []).append(value["score"])
                    else:
                        known = False
                for (category, question), scores in pairs.items():
                    if len(scores) == 2:
                        found.append({**base, "benchmark": bench, "item": f"{category}/{question}",
                                      "stratum": category, "score": 50.0 * sum(scores) + 100.0 * (sum(scores) == 2),
                                      "pred": None, "gold": None})
                if known:
                    rows.extend(found)
    return rows


def cell_failures(plan: Plan) -> list[dict]:
    """One row per cell that cannot finish because one of its stages failed: which stage, and why."""
    rows = []
    for cell, ids in plan.cell_stages.items():
        for kind, key in ids.items():
            stage = plan.stages[key]
            if not stage.done() and (failure := stage.failure()):
                rows.append({"experiment": plan.spec.name, "cell": cell.label, **asdict(cell), "stage": kind,
                             "key": key, "reason": failure["reason"]})
                break
    return rows


def write_results(plan: Plan, results_root: Path = Path("results")) -> Path | None:
    """`cells.csv`/`.parquet`: the finished cells; `items.parquet`: their per-item primary scores (see
    collect_items; absent when no sample log exists); `failed.csv`: the failed cells with their reason (only if any)."""
    import pandas as pd

    from harness.io import atomic_write_text

    rows, failures = collect_rows(plan), cell_failures(plan)
    out = results_root / plan.spec.name
    if failures:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "failed.csv", pd.DataFrame(failures).to_csv(index=False))
    elif (out / "failed.csv").exists():
        (out / "failed.csv").unlink()  # retried successfully
    if not rows:
        return out if failures else None
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows).sort_values(["teacher", "method", "ratio", "recovery", "data_fraction", "seed",
                                         "benchmark", "metric"]).reset_index(drop=True)
    atomic_write_text(out / "cells.csv", df.to_csv(index=False))
    tables = {"cells.parquet": df}
    items = collect_items(plan)
    if items:
        tables["items.parquet"] = (pd.DataFrame(items).astype({"seed": "Int64"})  # teacher rows have no seed
                                   .sort_values(["role", "teacher", "cell", "benchmark", "item"])
                                   .reset_index(drop=True))
    elif (out / "items.parquet").exists():
        (out / "items.parquet").unlink()  # stale: its evaluations are gone
    for name, table in tables.items():
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=out)  # unique: two runners may finish together
        os.close(fd)
        try:
            table.to_parquet(tmp, index=False)
            os.replace(tmp, out / name)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return out
