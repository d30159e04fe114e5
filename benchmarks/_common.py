"""Shared bits of the benchmark scripts: the machine description and the JSON each script writes.

Every `bench_*.py` accepts `--json PATH` and writes one object there:
`{"benchmark": NAME, "status": "ok" | "skipped", "reason": ..., "ratios": {KEY: VALUE},
"goals": {KEY: "description"}, "machine": {...}, "details": {...}}`; `run_all.py` reads
`ratios` and `goals` into its summary table.
"""

from __future__ import annotations

import json
import os
import platform
import time
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
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def write_result(path: str | Path | None, name: str, ratios: dict, goals: dict | None = None,
                 details: dict | None = None, status: str = "ok", reason: str = "") -> dict:
    """The benchmark's result object, written to `path` (atomically) when given."""
    payload = {"benchmark": name, "status": status, "reason": reason, "ratios": ratios, "goals": goals or {},
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
