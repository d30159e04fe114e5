"""`harness grid plan|run|status`: the plain functions behind the subcommands."""

from __future__ import annotations

import json
import time
from collections import Counter

from harness.errors import HarnessError
from harness.grid import runner
from harness.grid.spec import load_spec
from harness.grid.stages import check_inputs


def plan_text(plan: runner.Plan) -> str:
    lines = [f"experiment {plan.spec.name}: {len(plan.cells)} cells, {len(plan.stages)} distinct stages"]
    for cell, ids in plan.cell_stages.items():
        states = " ".join(f"{kind}={runner.stage_state(plan.stages[k])}" for kind, k in ids.items())
        lines.append(f"  {cell.label:60s} {states}")
    counts = Counter((s.kind, runner.stage_state(s)) for s in plan.stages.values())
    lines.append("stages: " + ", ".join(f"{k} {state}: {n}" for (k, state), n in sorted(counts.items())))
    return "\n".join(lines)


def run_command(args):
    """Run `harness grid ACTION`; `run` returns the results folder (the CLI then writes the report) or None."""
    started = time.perf_counter()  # grid overhead counts spec loading, planning and bookkeeping too
    if getattr(args, "slurm", None) and args.backend == "local":
        raise HarnessError("--slurm sets submitit parameters: it needs --backend slurm or submitit-local")
    spec = load_spec(args.spec)
    if args.action == "plan" and getattr(args, "dry_run", False):
        from harness.grid.dryrun import dry_run

        print(dry_run(spec))
        return
    check_inputs(spec)
    plan = runner.build_plan(spec)
    if args.action == "plan":
        print(plan_text(plan))
        return
    if args.action == "status":
        counts = Counter(runner.stage_state(s) for s in plan.stages.values())
        done = sum(plan.stages[ids["eval"]].done() for ids in plan.cell_stages.values())
        print(f"experiment {spec.name}: cells done {done}/{len(plan.cells)}; stages " +
              ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
        for s in plan.stages.values():
            if (f := s.failure()) and not s.done():
                print(f"  failed {s.kind} {s.key}: {f['reason']}")
        for f in runner.cell_failures(plan):
            print(f"  failed cell {f['cell']} (at {f['stage']} {f['key']}): {f['reason']}")
        return
    print(plan_text(plan))
    if args.backend == "local":
        summary = runner.run_local(plan, args.retry_failed)
    else:
        from harness.settings import parse_overrides

        params = parse_overrides(args.slurm, "--slurm")
        summary = runner.run_submitit(plan, args.backend, args.retry_failed, executor_params=params)
    out = runner.write_results(plan)
    summary["wall_s"] = time.perf_counter() - started
    overhead = (summary["wall_s"] - summary["compute_s"]) / max(summary["wall_s"], 1e-9)
    failed_cells = {f["cell"]: f"{f['stage']}: {f['reason']}" for f in runner.cell_failures(plan)}
    print(json.dumps({"wall_s": round(summary["wall_s"], 1), "compute_s": round(summary["compute_s"], 1),
                      "grid_overhead": round(overhead, 4), "failed": summary["failed"], "failed_cells": failed_cells},
                     indent=1))
    if failed_cells:
        print(f"{len(failed_cells)} failed cell(s) listed in {out}/failed.csv")
    if out is not None and (out / "cells.csv").exists():
        print(f"results written to {out}/cells.csv")
    else:
        out = None
    if summary["failed"]:
        raise runner.GridFailed(out, summary["failed"])
    return out
