"""Shared bits of the benchmark scripts: figures with spreads and verdicts, the machine, the JSON each script writes.

Every `bench_*.py` accepts `--json PATH` and `--quick` (tiny sizes, one repeat: a smoke run of
seconds whose figures mean nothing) and writes one object to PATH:
`{"benchmark": NAME, "status": "ok" | "skipped", "reason": ..., "figures": {KEY: FIGURE},
"ratios": {KEY: value}, "goals": {KEY: goal}, "machine": {...}, "details": {...}}`.
`run_all.py` reads `figures` into its summary table (`ratios`/`goals` repeat value and goal).

A FIGURE (`figure()`) is the median of n repeats with its spread and a verdict:
`{"value", "lo", "hi", "n", "coverage", "goal", "verdict", "values", "note"}`.
- Repeats are interleaved (A B A B: the baseline and the variant alternate, or every contender
  runs once per round in a rotated order), and a ratio is formed within each repeat (paired),
  so a slow phase of a shared machine hits both sides of a ratio alike.
- `lo`..`hi` is the distribution-free confidence interval of the median from order statistics:
  [x(k), x(n+1-k)] of the sorted repeats, with the largest k whose coverage
  1 - 2 P(Binomial(n, 1/2) <= k - 1) is at least `COVERAGE` (90 %): min..max for n = 5..7,
  the second lowest..second highest for n = 8..10, and so on. With n < 5 no interval reaches
  90 %: `lo`..`hi` is then min..max and its (lower) coverage is stated.
- verdict, for a goal ">= g" (mirrored for "<= g"): "meets" when lo >= g, "MISSES" when hi < g,
  "inconclusive" when the interval straddles g or holds fewer than 5 repeats (coverage < 90 %);
  "info" for goals that are not a comparison. A figure that is not a timing (`exact=True`: a
  count, a byte size, a log read back) has no spread: its one value decides.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def machine_info() -> dict:
    """CPU model, core count, load and library versions at the time of the run."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        info["load_average_1_5_15"] = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["memory_gb"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    for dist in ("torch", "transformers"):  # versions without importing them (seconds, for a benchmark that needs neither)
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if "torch" in sys.modules:
        info["torch"] = sys.modules["torch"].__version__  # with its build suffix (+cpu, +cu130)
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


COVERAGE = 0.90  # confidence the stated interval holds the median of the repeats' distribution
_GOAL = re.compile(r"^\s*(>=|<=|>|<)\s*([0-9.]+)")


def median_interval(values, coverage: float = COVERAGE) -> dict:
    """Median of `values` and the order-statistic interval [x(k), x(n+1-k)] that covers the true median with
    probability >= `coverage` (the largest such k; k = 1, min..max, when none reaches it), with that probability."""
    xs = sorted(float(v) for v in values)
    n = len(xs)
    if not n:
        raise ValueError("no values")

    def cover(k: int) -> float:  # P(x(k) <= median <= x(n+1-k)) for a continuous distribution
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n

    k = 1
    while k + 1 <= (n + 1) // 2 and cover(k + 1) >= coverage:
        k += 1
    return {"value": statistics.median(xs), "lo": xs[k - 1], "hi": xs[n - k], "n": n, "coverage": round(cover(k), 4)}


def verdict(lo: float, hi: float, goal: str, decisive: bool = True) -> str:
    """'meets' / 'MISSES' when the whole interval lies on one side of a comparison goal, else 'inconclusive';
    'info' for goals that are not a comparison. `decisive=False` (too few repeats) gives 'inconclusive'."""
    m = _GOAL.match(goal or "")
    if not m:
        return "info"
    op, bound = m.group(1), float(m.group(2))
    ok = {">=": lambda x: x >= bound, ">": lambda x: x > bound, "<=": lambda x: x <= bound, "<": lambda x: x < bound}[op]
    if not decisive:
        return "inconclusive"
    if ok(lo) and ok(hi):
        return "meets"
    if not ok(lo) and not ok(hi):
        return "MISSES"
    return "inconclusive"


def figure(values, goal: str, *, exact: bool = False, digits: int = 4, note: str = "") -> dict:
    """One reported figure: the median of `values` (repeats), its interval, n, and the verdict against `goal`.

    `exact`: not a timing (a count, bytes, answers compared, a log read back): no spread, the value decides."""
    values = [values] if isinstance(values, (int, float)) else list(values)
    stats = median_interval(values)
    if exact:
        stats.update(lo=stats["value"], hi=stats["value"], coverage=1.0)
    decisive = exact or stats["coverage"] >= COVERAGE
    out = {key: (round(v, digits) if isinstance(v, float) and key in ("value", "lo", "hi") else v)
           for key, v in stats.items()}
    out.update(goal=goal, verdict=verdict(out["lo"], out["hi"], goal, decisive), exact=exact,
               values=[round(float(v), 6) for v in values], note=note)
    return out


def paired_ratios(numerators, denominators) -> list[float]:
    """Per-repeat ratios of two interleaved series (the i-th of each was measured side by side)."""
    return [a / b for a, b in zip(numerators, denominators, strict=True)]


def write_result(path: str | Path | None, name: str, figures: dict, goals: dict | None = None,
                 details: dict | None = None, status: str = "ok", reason: str = "") -> dict:
    """The benchmark's result object, written to `path` (atomically) when given.

    `figures`: KEY -> `figure(...)`; a plain number stands for one measurement (n = 1) against `goals[KEY]`."""
    goals = goals or {}
    figures = {key: f if isinstance(f, dict) else figure([f], goals.get(key, "")) for key, f in figures.items()}
    payload = {"benchmark": name, "status": status, "reason": reason, "figures": figures,
               "ratios": {k: f["value"] for k, f in figures.items()}, "goals": {k: f["goal"] for k, f in figures.items()},
               "machine": machine_info(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "details": details or {}}
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=_plain) + "\n")
        tmp.replace(path)
    return payload


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
