"""`make bench`: run every benchmark, write results/bench/<name>.json, print one summary table.

Each benchmark runs as its own subprocess with `--json results/bench/<name>.json` (its ratios,
goals, machine description and details); its full output goes to artifacts/bench/<name>.log.
The table at the end lists every ratio with its goal; `results/bench/summary.json` holds the
same rows. A benchmark that cannot run here (a missing optional dependency, no grid run yet)
reports itself as skipped, with its reason, and does not fail the run; one that crashes does.
Every benchmark runs with one thread (OMP_NUM_THREADS=MKL_NUM_THREADS=1 unless already set; the
scripts also call torch.set_num_threads themselves): on a small machine shared with other jobs,
that is the reproducible setting.

    .venv/bin/python benchmarks/run_all.py [--only inference,prune_reuse] [--timeout 900]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = REPO / "results" / "bench"
LOGS = REPO / "artifacts" / "bench"

# (name, script, extra arguments), cheapest first
BENCHMARKS = [
    ("grid_overhead", "bench_grid_overhead.py", []),
    ("eval_plugin", "bench_eval_plugin.py", []),
    ("prune_reuse", "bench_prune_reuse.py", []),
    ("recovery_loop", "bench_recovery_loop.py", []),
    ("importance_memory", "bench_importance_memory.py", []),
    ("inference", "bench_inference.py", []),
]

_GOAL = re.compile(r"^\s*(>=|<=|>|<)\s*([0-9.]+)")


def verdict(value: float, goal: str) -> str:
    """'meets' / 'MISSES' for goals that start with a comparison, else 'info'."""
    m = _GOAL.match(goal or "")
    if not m:
        return "info"
    op, bound = m.group(1), float(m.group(2))
    ok = {">=": value >= bound, "<=": value <= bound, ">": value > bound, "<": value < bound}[op]
    return "meets" if ok else "MISSES"


def run_one(name: str, script: str, extra: list[str], timeout: int) -> dict:
    out = OUT / f"{name}.json"
    log = LOGS / f"{name}.log"
    cmd = [sys.executable, str(HERE / script), "--json", str(out), *extra]
    start = time.perf_counter()
    stale = out.stat().st_mtime if out.exists() else None
    try:
        env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **os.environ}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        partial = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, stdout, stderr = "timeout", partial, f"timed out after {timeout} s"
    seconds = time.perf_counter() - start
    log.write_text(f"$ {' '.join(cmd)}\n(exit {rc}, {seconds:.0f} s)\n{stdout}\n--- stderr ---\n{stderr}")
    fresh = out.exists() and (stale is None or out.stat().st_mtime > stale)
    if rc != 0 or not fresh:
        tail = (stderr or stdout).strip().splitlines()[-3:]
        return {"benchmark": name, "status": "failed", "reason": f"exit {rc}: " + " | ".join(tail), "ratios": {},
                "goals": {}, "seconds": seconds}
    result = json.loads(out.read_text())
    result["seconds"] = seconds
    return result


def table(results: list[dict]) -> tuple[str, list[dict]]:
    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append({"benchmark": r["benchmark"], "measure": r["status"].upper(), "value": None, "goal": "",
                         "verdict": r["status"], "note": r.get("reason", "")})
            continue
        for key, value in r["ratios"].items():
            goal = r.get("goals", {}).get(key, "")
            rows.append({"benchmark": r["benchmark"], "measure": key, "value": value, "goal": goal,
                         "verdict": verdict(value, goal), "note": ""})
    lines = [f"{'benchmark':18s} {'measure':52s} {'value':>8s}  {'verdict':7s} goal"]
    for row in rows:
        value = f"{row['value']:8.3f}" if row["value"] is not None else " " * 8
        text = row["goal"] if row["value"] is not None else row["note"]
        lines.append(f"{row['benchmark']:18s} {row['measure']:52s} {value}  {row['verdict']:7s} {text}")
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma list of benchmark names")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per benchmark")
    args = parser.parse_args(argv)
    chosen = args.only.split(",") if args.only else [name for name, _, _ in BENCHMARKS]
    unknown = set(chosen) - {name for name, _, _ in BENCHMARKS}
    if unknown:
        print(f"unknown benchmark(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    results = []
    start = time.perf_counter()
    for name, script, extra in BENCHMARKS:
        if name not in chosen:
            continue
        print(f"== {name} ({script})", flush=True)
        result = run_one(name, script, extra, args.timeout)
        results.append(result)
        print(f"   {result['status']} in {result['seconds']:.0f} s" +
              (f": {result['reason']}" if result.get("reason") else ""), flush=True)
    text, rows = table(results)
    total = time.perf_counter() - start
    machine = next((r.get("machine") for r in results if r.get("machine")), {})
    summary = {"rows": rows, "seconds": {r["benchmark"]: round(r["seconds"], 1) for r in results},
               "total_s": round(total, 1), "machine": machine,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if set(chosen) == {name for name, _, _ in BENCHMARKS}:
        (OUT / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    load = machine.get("load_average_1_5_15", "?")
    print(f"\nmachine: {machine.get('cpu_model', '?')}, {machine.get('cpu_cores', '?')} cores, load average {load} "
          f"(1/5/15 min, at the first benchmark's end); total {total / 60:.1f} min; logs in {LOGS.relative_to(REPO)}/")
    print(text)
    return 1 if any(r["status"] == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
