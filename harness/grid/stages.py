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
from harness.paths import grid_root


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


def output_path(kind: str, key: str) -> Path:
    """Where the stage of this kind and key puts its artifact."""
    sub = {"teacher-eval": "evals", "eval": "evals", "prune": "pruned", "recover": "recovered"}[kind]
    suffix = ".json" if kind in ("eval", "teacher-eval") else ""
    return grid_root() / sub / f"{key}{suffix}"


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
        return output_path(self.kind, self.key)

    @property
    def failure_file(self) -> Path:
        return grid_root() / "failed" / f"{self.key}.json"

    def done(self) -> bool:
        return self.output.exists()

    def failure(self) -> dict | None:
        return read_json(self.failure_file) if self.failure_file.exists() else None


def run_stage(stage: Stage, group: str, cells: dict | None = None) -> float:
    """Compute one stage's artifact; return its compute seconds. Idempotent.

    `group` is the experiment; `cells` ({Cell: its stage keys}, from the plan) are the cells
    this stage serves. Both only shape the stage's W&B run (`wandb_context`), never its artifact.
    """
    t0 = time.perf_counter()
    p = stage.payload
    if stage.kind == "prune":
        from harness.pruning.pipeline import prune

        prune(p["teacher"], method=p["method"], ratio=p["ratio"], out=stage.output, data=p["data"],
              importance_dir=grid_root() / "importance", **p["settings"])
        record = read_json(stage.output / "pruning.json")
        _log_wandb(group, "prune", p, record, stage.key, wandb_context(stage, group, cells),
                   media=_importance_media(record.get("importance", {})))
    elif stage.kind == "recover":
        from harness.recovery.train import recover

        context = wandb_context(stage, group, cells)
        if context:
            context["config"]["student"] = f"pruned/{p['student']}"
        recover(p["teacher"], grid_root() / "pruned" / p["student"], p["recipe"], p["data"], p["data_fraction"],
                stage.output, overrides=p["settings"], group=group, progress=False, wandb_run=context)
    else:
        from harness.evaluation.evaluate import evaluate

        model = p["teacher"] if stage.kind == "teacher-eval" else str(grid_root() / p["model_dir"])
        result = evaluate(model, p["tasks"], stage.output, data_dir=Path(p["data"]) / "benchmarks",
                          **p["settings"])
        teacher = None
        if stage.kind == "eval" and cells:
            t_out = output_path("teacher-eval", next(iter(cells.values()))["teacher-eval"])
            teacher = read_json(t_out) if t_out.exists() else None
        summary = {"scores": result["scores"], "efficiency": result.get("efficiency", {}),
                   **benchmark_summary(result, teacher)}
        _log_wandb(group, stage.kind, p, summary, stage.key, wandb_context(stage, group, cells))
    return time.perf_counter() - t0


AXES = ("teacher", "method", "ratio", "recovery", "data_fraction", "seed")
# How many of AXES identify what a stage of each kind computes: they make its run name.
_NAME_AXES = {"teacher-eval": 1, "prune": 3, "recover": 6, "eval": 6}


def _one_or_all(values: list):
    """The axis value all served cells share, else the sorted list of their values."""
    unique = sorted(set(values), key=lambda v: (str(type(v)), v))
    return unique[0] if len(unique) == 1 else unique


def wandb_context(stage: Stage, experiment: str, cells: dict | None) -> dict | None:
    """Name, config and tags of a stage's W&B run: the grid axes of the cells it serves.

    Each axis (teacher, method, ratio, recovery, data_fraction, seed) is one value when every
    served cell has it, else the sorted list of values (a pruned model shared by the recoveries
    and seeds of its method and ratio; the teacher evaluation, shared by all its cells);
    `shared_by` counts the cells and `cells` lists them. `ratio_achieved` is read from the
    pruned model's `pruning.json` once it exists. No absolute path of this machine appears.
    None without cells (a stage run outside a plan).
    """
    if not cells:
        return None
    from dataclasses import asdict, replace

    from harness.pruning.methods import family_of
    from harness.tracking import model_name

    shown = [replace(c, teacher=model_name(c.teacher)) for c in cells]
    config = {"experiment": experiment, "stage": stage.kind, "stage_key": stage.key}
    for axis in AXES:
        config[axis] = _one_or_all([asdict(c)[axis] for c in shown])
    config["family"] = _one_or_all([family_of(c.method) for c in shown])
    records = {key: output_path("prune", key) / "pruning.json" for key in {ids["prune"] for ids in cells.values()}}
    achieved = [read_json(f).get("ratio_achieved") if f.exists() else None for f in records.values()]
    if achieved and None not in achieved:
        config["ratio_achieved"] = _one_or_all(achieved)
    config["shared_by"] = len(shown)
    config["cells"] = sorted(c.label for c in shown)
    tags = [f"experiment:{experiment}", f"stage:{stage.kind}"]
    for axis in (*AXES, "family"):
        for v in config[axis] if isinstance(config[axis], list) else [config[axis]]:
            tags.append(f"{axis}:{v:g}" if isinstance(v, float) else f"{axis}:{v}")
    if len(shown) > 1:
        tags.append("shared")
    return {"name": _run_name(stage.kind, config), "config": config, "tags": [t[:64] for t in dict.fromkeys(tags)]}


def _run_name(kind: str, config: dict) -> str:
    """`tiny-llava/width-taylor@0.3/sft+kd-hidden/5%/s0: eval`; several values of an axis joined by commas."""
    def part(axis, fmt=str):
        values = config[axis] if isinstance(config[axis], list) else [config[axis]]
        return ",".join(fmt(v) for v in values)

    name = part("teacher")
    if _NAME_AXES[kind] >= 3:
        name += f"/{part('method')}@{part('ratio', lambda r: f'{r:g}')}"
    if _NAME_AXES[kind] >= 6:
        name += f"/{part('recovery')}"
        if config["recovery"] != "none":
            name += f"/{part('data_fraction', lambda f: f'{100 * f:g}%')}"
        name += f"/s{part('seed')}"
    name += f": {kind}"
    return name + (f" ({config['shared_by']} cells)" if config["shared_by"] > 1 else "")


def benchmark_summary(result: dict, teacher: dict | None) -> dict:
    """Per benchmark (primary metric): `score/B`, and with the teacher's result `retained/B` and `AVG-%`.

    Retained and AVG-% are computed as in `cells.csv` and `analysis.tables` (100 * score /
    teacher score; AVG-% the plain mean over benchmarks of one seed).
    """
    out, retained = {}, []
    for bench, (task, metric) in result.get("benchmarks", {}).items():
        score = result["scores"].get(task, {}).get(metric)
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            continue
        out[f"score/{bench}"] = float(score)
        t_score = (teacher or {}).get("scores", {}).get(task, {}).get(metric)
        if isinstance(t_score, (int, float)) and t_score:
            out[f"retained/{bench}"] = 100.0 * score / t_score
            retained.append(out[f"retained/{bench}"])
    if retained:
        out["AVG-%"] = sum(retained) / len(retained)
    return out


def _importance_media(importance: dict) -> dict:
    """Importance scores for W&B: a table per layer-level score, a histogram per layer of width scores."""
    import math

    import wandb

    def finite(values):
        return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]

    media = {}
    for key, values in importance.items():
        if not values:
            continue
        if key == "layer":
            media["importance/layer"] = wandb.Table(columns=["layer", "score"],
                                                    data=[[i, float(v)] for i, v in enumerate(values)])
        elif key == "block_distance":  # row n-1: blocks of n layers by start
            media["importance/block_distance"] = wandb.Table(
                columns=["block_layers", "start", "distance"],
                data=[[n + 1, start, float(d)] for n, row in enumerate(values) for start, d in enumerate(row)
                      if math.isfinite(d)])
        elif isinstance(values[0], list):  # [layers, units]: attn, mlp
            for layer, row in enumerate(values):
                if finite(row):
                    media[f"importance/{key}/layer_{layer:02d}"] = wandb.Histogram(finite(row))
        elif finite(values):  # hidden, projector channels
            media[f"importance/{key}"] = wandb.Histogram(finite(values))
    return media


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


def _log_wandb(group: str, job_type: str, config: dict, summary: dict, key: str, context: dict | None = None,
               media: dict | None = None) -> None:
    """One W&B run per stage, grouped by experiment (offline unless configured online).

    `context` (`wandb_context`) gives the run its readable name, grid axes and tags; without it
    the run is named `{job_type}-{key}`. Numbers of `summary` (nested dicts flattened with `/`)
    go into the run summary, `media` (tables, histograms) is logged once.
    """
    from harness.tracking import portable, start_run, wandb_dir, wandb_mode

    if wandb_mode() == "disabled":
        return
    context = context or {}
    run = start_run(project=os.environ.get("WANDB_PROJECT", "mllm-compression"), group=group, job_type=job_type,
                    name=context.get("name", f"{job_type}-{key}"), tags=context.get("tags"),
                    config=portable({**config, **context.get("config", {})}), dir=wandb_dir(),
                    reinit="finish_previous")
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
    if media:
        run.log(media)
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
