"""`make bench`: run every benchmark, write results/bench/<name>.json, print one summary table.

Each benchmark runs as its own subprocess with `--json results/bench/<name>.json` (its figures,
goals, machine description and details); its full output goes to artifacts/bench/<name>.log.
The table at the end lists every figure: the median of its interleaved repeats, the spread
(the order-statistic interval of the median, see `_common.py`), the number of repeats, the
verdict (meets / MISSES / inconclusive when the spread straddles the goal or the repeats are too
few / info) and the goal; `results/bench/summary.json` holds the same rows (`--only` re-runs some
benchmarks and replaces their rows there). A benchmark that cannot
run here (a missing optional dependency, no grid run yet) reports itself as skipped, with its
reason, and does not fail the run; one that crashes does.
Every benchmark runs with one thread (OMP_NUM_THREADS=MKL_NUM_THREADS=1 unless already set; the
scripts also call torch.set_num_threads themselves): on a small machine shared with other jobs,
that is the reproducible setting.

    .venv/bin/python benchmarks/run_all.py [--all | --only inference,prune_reuse] [--timeout 1800]
    .venv/bin/python benchmarks/run_all.py --quick [--out DIR] [--in-process]

`--all` adds the extra benchmarks (`EXTRA`: `make bench-all`). `--quick` passes `--quick` to
every script, extras included (tiny sizes, one repeat: seconds each; the figures mean nothing,
every verdict is inconclusive) and writes to a temporary folder unless `--out` is given: a
smoke test that every benchmark still runs (tests/test_benchmarks.py). `--in-process` runs
each script's `main()` inside this process instead of a subprocess (torch is imported once:
what keeps the quick test short; no per-benchmark timeout then).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = REPO / "results" / "bench"
LOGS = REPO / "artifacts" / "bench"
sys.path.insert(0, str(HERE))

from _common import figure  # noqa: E402

# (name, script, extra arguments), cheapest first. `make bench`: the performance goals, measured on the
# real weights of SmolLM2-135M where a model is timed (about 15 min on 2 cores).
BENCHMARKS = [
    ("grid_overhead", "bench_grid_overhead.py", []),
    ("eval_plugin", "bench_eval_plugin.py", []),
    ("prune_reuse", "bench_prune_reuse.py", []),
    ("prune_reuse_smol", "bench_prune_reuse.py", ["--model", "smol-llava", "--one-call-only",
                                                   "--method", "width-taylor"]),
    ("training", "bench_training.py", []),
    ("inference_smol", "bench_inference.py", ["--model", "smol", "--compare-round-to", "", "--compare-attn-unit", ""]),
]
# `make bench-all` adds these (about 25 min more): layer-bi's ratio reuse on smol, the same goals on a random-weight
# mid-size model and on tiny-llava, the memory estimate's accuracy, and smol's comparison variants (no rounding,
# query-head units).
EXTRA = [
    ("prune_reuse_smol_layer", "bench_prune_reuse.py", ["--model", "smol-llava", "--one-call-only",
                                                         "--method", "layer-bi"]),
    ("recovery_loop", "bench_recovery_loop.py", []),
    ("importance_memory", "bench_importance_memory.py", []),
    ("inference", "bench_inference.py", ["--model", "mid"]),
    ("inference_smol_variants", "bench_inference.py", ["--model", "smol", "--modes", "prefill:8,decode:1",
                                                       "--ratios", "0.3", "--no-sweep"]),
]
ALL = BENCHMARKS + EXTRA
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _subprocess(script: str, argv: list[str], timeout: int) -> tuple[object, str, str]:
    cmd = [sys.executable, str(HERE / script), *argv]
    try:
        env = {**THREAD_ENV, **os.environ}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
        return proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        partial = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return "timeout", partial, f"timed out after {timeout} s"


def _in_process(script: str, argv: list[str]) -> tuple[object, str, str]:
    """Run the script's `main(argv)` here, its output captured; an exception is a failure."""
    stdout, stderr = io.StringIO(), io.StringIO()
    rc: object = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            importlib.import_module(Path(script).stem).main(argv)
        except SystemExit as e:
            rc = e.code or 0
        except BaseException:  # noqa: BLE001 (a crashing benchmark is reported, not raised)
            traceback.print_exc()
            rc = "exception"
    return rc, stdout.getvalue(), stderr.getvalue()


def run_one(name: str, script: str, extra: list[str], timeout: int, out_dir: Path = OUT, log_dir: Path = LOGS,
            quick: bool = False, in_process: bool = False) -> dict:
    out = out_dir / f"{name}.json"
    log = log_dir / f"{name}.log"
    argv = ["--json", str(out), *extra, *(["--quick"] if quick else [])]
    start = time.perf_counter()
    stale = out.stat().st_mtime if out.exists() else None
    rc, stdout, stderr = _in_process(script, argv) if in_process else _subprocess(script, argv, timeout)
    seconds = time.perf_counter() - start
    how = "in process" if in_process else "subprocess"
    log.write_text(f"$ {script} {' '.join(argv)} ({how})\n(exit {rc}, {seconds:.0f} s)\n{stdout}\n"
                   f"--- stderr ---\n{stderr}")
    fresh = out.exists() and (stale is None or out.stat().st_mtime > stale)
    if rc != 0 or not fresh:
        tail = (stderr or stdout).strip().splitlines()[-3:]
        return {"benchmark": name, "status": "failed", "reason": f"exit {rc}: " + " | ".join(tail), "figures": {},
                "seconds": seconds}
    result = json.loads(out.read_text())
    result["benchmark"] = name
    result["seconds"] = seconds
    return result


def figures_of(result: dict) -> dict:
    """A result's figures; results written before figures existed: their ratios as single measurements."""
    if "figures" in result:
        return result["figures"]
    return {key: figure([value], result.get("goals", {}).get(key, "")) for key, value in result.get("ratios", {}).items()}


def _spread(row: dict) -> str:
    if row["value"] is None:
        return ""
    if row.get("exact"):
        return "exact"
    return f"{row['lo']:.3f}..{row['hi']:.3f} ({row['n']})"


def table(results: list[dict]) -> tuple[str, list[dict]]:
    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append({"benchmark": r["benchmark"], "measure": r["status"].upper(), "value": None, "lo": None,
                         "hi": None, "n": 0, "coverage": None, "exact": False, "goal": "", "verdict": r["status"],
                         "note": r.get("reason", "")})
            continue
        for key, f in figures_of(r).items():
            rows.append({"benchmark": r["benchmark"], "measure": key, "value": f["value"], "lo": f["lo"], "hi": f["hi"],
                         "n": f["n"], "coverage": f["coverage"], "exact": f.get("exact", False), "goal": f["goal"],
                         "verdict": f["verdict"], "note": f.get("note", "")})
    lines = [f"{'benchmark':17s} {'measure':44s} {'value':>8s}  {'spread (n)':20s} {'verdict':12s} goal"]
    notes = []
    for row in rows:
        value = f"{row['value']:8.3f}" if row["value"] is not None else " " * 8
        text = row["goal"] if row["value"] is not None else row["note"]
        mark = ""
        if row["value"] is not None and row["note"]:
            notes.append(row)
            mark = f" [{len(notes)}]"
        lines.append(f"{row['benchmark']:17s} {row['measure']:44s} {value}  {_spread(row):20s} "
                     f"{row['verdict']:12s} {text}{mark}")
    lines += [f"[{i}] {row['benchmark']} {row['measure']}: {row['note']}" for i, row in enumerate(notes, 1)]
    lines.append("value = median of n interleaved repeats; spread = the interval that holds the median with >= 90 % "
                 "confidence (min..max for n = 5-7); a verdict needs the whole spread on one side of the goal "
                 "and n >= 5 (else 'inconclusive'); 'exact' = not a timing")
    return "\n".join(lines), rows


def agreement(previous: list[dict], current: list[dict]) -> dict:
    """How the timing figures of two runs agree: run to run, each figure's spread should hold the other run.

    Two figures agree when their spreads overlap (the difference is within the stated spreads); `strict`
    also asks each median to lie inside the other run's spread. Exact figures and failed rows are left out."""
    def timed(rows):
        return {(r["benchmark"], r["measure"]): r for r in rows
                if r.get("value") is not None and not r.get("exact") and r.get("lo") is not None}

    old, new = timed(previous), timed(current)
    shared = sorted(set(old) & set(new))
    rows = []
    for key in shared:
        a, b = old[key], new[key]
        overlap = a["lo"] <= b["hi"] and b["lo"] <= a["hi"]
        strict = a["lo"] <= b["value"] <= a["hi"] and b["lo"] <= a["value"] <= b["hi"]
        rows.append({"benchmark": key[0], "measure": key[1], "previous": [a["value"], a["lo"], a["hi"]],
                     "current": [b["value"], b["lo"], b["hi"]], "overlap": overlap, "strict": strict,
                     "verdicts": [a["verdict"], b["verdict"]]})
    flipped = [r for r in rows if {"meets", "MISSES"} == set(r["verdicts"])]
    return {"shared": len(rows), "overlap": sum(r["overlap"] for r in rows), "strict": sum(r["strict"] for r in rows),
            "verdicts_flipped": len(flipped), "rows": rows}


def agreement_text(agree: dict, previous_finished: str) -> str:
    lines = [f"against the previous run ({previous_finished}): {agree['overlap']} of {agree['shared']} timing figures "
             f"agree within their spreads ({agree['strict']} with each median inside the other's spread); "
             f"{agree['verdicts_flipped']} verdicts flipped between meets and MISSES"]
    for r in agree["rows"]:
        if not r["overlap"]:
            (v0, lo0, hi0), (v1, lo1, hi1) = r["previous"], r["current"]
            lines.append(f"  disagrees: {r['benchmark']} {r['measure']}: {v0:.3f} ({lo0:.3f}..{hi0:.3f}) then "
                         f"{v1:.3f} ({lo1:.3f}..{hi1:.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma list of benchmark names")
    parser.add_argument("--all", action="store_true", help="also the extra benchmarks (`make bench-all`)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per benchmark (subprocesses)")
    parser.add_argument("--quick", action="store_true", help="every benchmark in its seconds-long smoke mode")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of the JSON results (default results/bench; with --quick a temporary folder)")
    parser.add_argument("--in-process", action="store_true", help="run each script's main() in this process")
    args = parser.parse_args(argv)
    listed = ALL if args.all or args.quick or args.only else BENCHMARKS
    chosen = args.only.split(",") if args.only else [name for name, _, _ in listed]
    unknown = set(chosen) - {name for name, _, _ in ALL}
    if unknown:
        print(f"unknown benchmark(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="bench-quick-")) if args.quick else OUT)
    log_dir = LOGS if out_dir == OUT else out_dir / "logs"
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    if args.in_process:
        for var, value in THREAD_ENV.items():
            os.environ.setdefault(var, value)
    results = []
    start = time.perf_counter()
    for name, script, extra in ALL:
        if name not in chosen:
            continue
        print(f"== {name} ({script}{' ' + ' '.join(extra) if extra else ''}{' --quick' if args.quick else ''})",
              flush=True)
        result = run_one(name, script, extra, args.timeout, out_dir, log_dir, args.quick, args.in_process)
        results.append(result)
        print(f"   {result['status']} in {result['seconds']:.0f} s" +
              (f": {result['reason']}" if result.get("reason") else ""), flush=True)
    text, rows = table(results)
    total = time.perf_counter() - start
    machine = next((r.get("machine") for r in results if r.get("machine")), {})
    summary = {"rows": rows, "seconds": {r["benchmark"]: round(r["seconds"], 1) for r in results},
               "total_s": round(total, 1), "machine": machine, "quick": args.quick,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    summary_file = out_dir / "summary.json"
    compared = ""
    if set(chosen) >= {name for name, _, _ in BENCHMARKS}:  # the default set (or more): the summary
        if summary_file.exists() and not args.quick:  # run to run: does this run agree with the one it replaces?
            previous = json.loads(summary_file.read_text())
            summary["previous_run"] = {"finished": previous.get("finished", "?"),
                                       "cpu_model": previous.get("machine", {}).get("cpu_model", "?"),
                                       **agreement(previous.get("rows", []), rows)}
            compared = agreement_text(summary["previous_run"], summary["previous_run"]["finished"])
            if summary["previous_run"]["cpu_model"] != machine.get("cpu_model", "?"):  # another machine kind
                compared += (f"\n  (the previous run was on another CPU, {summary['previous_run']['cpu_model']}: "
                             "a comparison across machines, not a test of run-to-run agreement)")
        summary_file.write_text(json.dumps(summary, indent=1) + "\n")
    elif summary_file.exists() and not args.quick:  # a re-run of some: their rows and times replace the old ones
        old = json.loads(summary_file.read_text())
        rerun = {r["benchmark"] for r in results}
        order = {name: i for i, (name, _, _) in enumerate(ALL)}
        old["rows"] = sorted([r for r in old["rows"] if r["benchmark"] not in rerun] + rows,
                             key=lambda r: order.get(r["benchmark"], len(order)))  # stable: a benchmark's rows stay in order
        old["seconds"] = {**old["seconds"], **summary["seconds"]}
        old["total_s"] = round(sum(old["seconds"].values()), 1)
        old["rerun"] = {**old.get("rerun", {}), **{name: summary["finished"] for name in sorted(rerun)}}
        summary_file.write_text(json.dumps(old, indent=1) + "\n")
    load = machine.get("load_average_1_5_15", "?")
    print(f"\nmachine: {machine.get('cpu_model', '?')}, {machine.get('cpu_cores', '?')} cores, load average {load} "
          f"(1/5/15 min, at the first benchmark's end); total {total / 60:.1f} min; results in {out_dir}, "
          f"logs in {log_dir}")
    print(text)
    if compared:
        print(compared)
    return 1 if any(r["status"] == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
