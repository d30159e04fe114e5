"""Content-addressed stages: teacher evaluation, pruning, recovery, evaluation.

A stage's key is a hash of its normalised configuration (inputs' keys included) and
the harness version, so two cells that need the same pruned model share it, and a
changed setting never reuses a stale artifact. Artifacts appear atomically: a stage
is done exactly when its output exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import __version__
from harness.errors import HarnessError
from harness.io import read_json, write_json
from harness.paths import artifacts_dir, grid_root


def fingerprint(model: str) -> str:
    """Identify a model by content: config plus weight sizes and leading bytes (cheap even for 7B)."""
    from harness.models.loading import resolve

    where = resolve(model)
    if not isinstance(where, Path):
        return f"hub:{where}"
    h = hashlib.sha256((where / "config.json").read_bytes())
    for f in sorted(where.glob("*.safetensors")):
        h.update(f.name.encode() + str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def stage_key(kind: str, payload: dict) -> str:
    blob = json.dumps({"kind": kind, "version": __version__, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Stage:
    kind: str  # teacher-eval | prune | recover | eval
    payload: dict
    deps: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return stage_key(self.kind, self.payload)

    @property
    def output(self) -> Path:
        sub = {"teacher-eval": "evals", "eval": "evals", "prune": "pruned", "recover": "recovered"}[self.kind]
        suffix = ".json" if self.kind in ("eval", "teacher-eval") else ""
        return grid_root() / sub / f"{self.key}{suffix}"

    @property
    def failure_file(self) -> Path:
        return grid_root() / "failed" / f"{self.key}.json"

    def done(self) -> bool:
        return self.output.exists()

    def failure(self) -> dict | None:
        return read_json(self.failure_file) if self.failure_file.exists() else None


def run_stage(stage: Stage, group: str) -> float:
    """Compute one stage's artifact; return its compute seconds. Idempotent."""
    t0 = time.perf_counter()
    p = stage.payload
    if stage.kind == "prune":
        from harness.pruning.pipeline import prune

        prune(p["teacher"], method=p["method"], ratio=p["ratio"], out=stage.output, data=p["data"],
              importance_dir=grid_root() / "importance", **p["settings"])
        _log_wandb(group, "prune", p, read_json(stage.output / "pruning.json"), stage.key)
    elif stage.kind == "recover":
        from harness.recovery.train import recover

        recover(p["teacher"], grid_root() / "pruned" / p["student"], p["recipe"], p["data"], p["data_fraction"],
                stage.output, overrides=p["settings"], group=group, progress=False)
    else:
        from harness.evaluation.evaluate import evaluate

        model = p["teacher"] if stage.kind == "teacher-eval" else str(grid_root() / p["model_dir"])
        result = evaluate(model, p["tasks"], stage.output, data_dir=Path(p["data"]) / "benchmarks",
                          **p["settings"])
        summary = {"scores": result["scores"], "efficiency": result.get("efficiency", {})}
        _log_wandb(group, "eval", p, summary, stage.key)
    return time.perf_counter() - t0


def remove_leftovers(stage: Stage) -> list[Path]:
    """Temporary siblings a killed run of this stage left (never read as artifacts; they only take disk).

    The recovery's resume checkpoint (`.KEY.ckpt`) is not debris: it is kept so the rerun resumes.
    """
    from harness.io import remove_leftovers as remove

    found = remove(stage.output)
    if stage.kind in ("eval", "teacher-eval"):
        found += remove(stage.output.with_name(f"{stage.key}.samples.jsonl"))
    return found


def record_failure(stage: Stage, error: BaseException) -> None:
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    write_json(stage.failure_file, {"kind": stage.kind, "payload": stage.payload, "reason": reason,
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


def clear_failure(stage: Stage) -> None:
    stage.failure_file.unlink(missing_ok=True)


def _log_wandb(group: str, job_type: str, config: dict, summary: dict, key: str) -> None:
    """One W&B run per stage, grouped by experiment (offline unless configured online)."""
    from harness.tracking import start_run, wandb_mode

    if wandb_mode() == "disabled":
        return
    save_dir = artifacts_dir() / "wandb"
    save_dir.mkdir(parents=True, exist_ok=True)
    run = start_run(project=os.environ.get("WANDB_PROJECT", "mllm-compression"), group=group, job_type=job_type,
                    name=f"{job_type}-{key}", config=config, dir=str(save_dir), reinit="finish_previous")
    flat = {}
    for k, v in summary.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                if isinstance(v2, dict):
                    flat.update({f"{k}/{k2}/{k3}": v3 for k3, v3 in v2.items() if isinstance(v3, (int, float))})
                elif isinstance(v2, (int, float)):
                    flat[f"{k}/{k2}"] = v2
        elif isinstance(v, (int, float, str)):
            flat[k] = v
    run.summary.update(flat)
    run.finish()


def check_inputs(spec) -> None:
    """Fail before heavy work: data and teachers must exist."""
    from harness.data.instruct import load_mix
    from harness.models.loading import resolve

    data = Path(spec.data)
    if not (data / "mix.json").exists() and not data.is_file():
        raise HarnessError(f"{spec.path}: data path {data} has no mix.json (run `harness data make` or fix `data`)")
    try:
        load_mix(data)  # empty, unreadable or not LLaVA JSON: fail now, not in the first stage that reads it
    except HarnessError as e:
        raise HarnessError(f"{spec.path}: {e}") from None
    for t in spec.teachers:
        resolve(t)
    if not (data / "benchmarks").exists() and any(t.startswith("synth") for t in spec.tasks):
        raise HarnessError(f"{spec.path}: {data}/benchmarks is missing (the synthetic benchmark splits)")
