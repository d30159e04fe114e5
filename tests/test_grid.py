"""The grid: specs, plans, shared stages, an end-to-end tiny grid, locks and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.grid import runner
from harness.grid.spec import load_spec

FAST_RECOVERY = {"max_steps": 2, "batch_size": 4}


def write_spec(path: Path, teacher: Path, data: Path, **over) -> Path:
    spec = {
        "name": "tiny", "data": str(data), "teachers": [str(teacher)], "tasks": ["synth_gqa", "synth_pope"],
        "seeds": [0],
        "prune": {"methods": ["layer-bi", "width-magnitude"], "ratios": [0.3],
                  "method_settings": {"layer-bi": {"calib_samples": 4}}},
        "recover": {"recipes": ["none", "sft+kd-hidden"], "fractions": [0.5], "settings": FAST_RECOVERY},
        "eval": {"limit": 4, "batch_size": 8},
    }
    for key, value in over.items():
        spec[key] = value
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


@pytest.fixture
def grid_root(tmp_path, monkeypatch):
    root = tmp_path / "grid"
    monkeypatch.setenv("HARNESS_GRID_ROOT", str(root))
    return root


def test_plan_enumerates_cells_and_honours_excludes(tmp_path, saved_tiny_llava, tiny_world, grid_root):
    spec = load_spec(write_spec(tmp_path / "s.yaml", saved_tiny_llava, tiny_world,
                                excludes=[{"method": "width-magnitude", "recovery": "sft+kd-hidden"}]))
    labels = [c.label for c in spec.cells()]
    assert len(labels) == 3
    assert not any("width-magnitude" in c and "kd" in c for c in labels)
    plan = runner.build_plan(spec)
    kinds = sorted(s.kind for s in plan.stages.values())
    # one teacher eval and one pruned model per method are shared by the cells that need them
    assert kinds == ["eval", "eval", "eval", "prune", "prune", "recover", "teacher-eval"]


def test_stage_keys_change_with_settings_and_are_stable(tmp_path, saved_tiny_llava, tiny_world, grid_root):
    a = runner.build_plan(load_spec(write_spec(tmp_path / "a.yaml", saved_tiny_llava, tiny_world)))
    b = runner.build_plan(load_spec(write_spec(tmp_path / "b.yaml", saved_tiny_llava, tiny_world)))
    assert list(a.stages) == list(b.stages)
    c = runner.build_plan(load_spec(write_spec(
        tmp_path / "c.yaml", saved_tiny_llava, tiny_world,
        recover={"recipes": ["none", "sft+kd-hidden"], "fractions": [0.5], "settings": {**FAST_RECOVERY, "lr": 1e-4}})))
    rec = lambda p: {k for k, s in p.stages.items() if s.kind == "recover"}  # noqa: E731
    prune = lambda p: {k for k, s in p.stages.items() if s.kind == "prune"}  # noqa: E731
    assert rec(a) != rec(c) and prune(a) == prune(c)


@pytest.mark.parametrize("body, match", [
    ("name: x\nteachers: [a]\nprune: {methods: [layer-xx], ratios: [0.1]}\nrecover: {recipes: [none]}", "unknown pruning method"),
    ("name: x\nteachers: [a]\nprune: {methods: [layer-bi], ratios: [1.5]}\nrecover: {recipes: [none]}", "outside"),
    ("name: x\nteachers: [a]\nprune: {methods: [layer-bi], ratios: [0.1, 0.1]}\nrecover: {recipes: [none]}", "repeats"),
    ("name: x\nteachers: [a]\nprune: {methods: [layer-bi], ratios: [0.1]}\nrecover: {recipes: [sft+kd-hiden]}", "unknown recovery"),
    ("name: x\nteachers: [a]\nprune: {methods: [layer-bi], ratios: [0.1]}\nrecover: {recipes: [none], fractions: [0]}", "fraction"),
    ("name: x\nteachers: [a]\nprune: {methods: [layer-bi], ratio: [0.1]}\nrecover: {recipes: [none]}", "did you mean ratios"),
    ("name: x\nteachers: [a]\nprune: {methods: [layer-bi], ratios: [0.1]}\nrecover: {recipes: [none]}\nseeds: [one]", "expected int"),
    ("name: x\nteachers: [a]\nprune: {methods: [layer-bi], ratios: [0.1]}\nrecover: {recipes: [proj-sft], settings: {lr: -1}}", "positive"),
    ("name: x\nteachers: [a]\nprune: {methods: [layer-bi], ratios: [0.1]}\nrecover: {recipes: [none]}\nexcludes: [{teacher: a}]", "no cells"),
    ("name: x\nteachers: [a]\nprune: {methods: [layer-bi], ratios: [0.1]}\nrecover: {recipes: [none]}\nexcludes: [{colour: a}]", "unknown key"),
    ("name: x\nteachers: [a\nprune:", "does not parse"),
    ("name: x\nprune: {methods: [layer-bi], ratios: [0.1]}\nrecover: {recipes: [none]}", "missing required key 'teachers'"),
])
def test_bad_specs_fail_before_anything_runs(tmp_path, body, match):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(body))
    with pytest.raises(HarnessError, match=match):
        load_spec(path)


def _run_cli(args, env_root: Path, cwd: Path, **kw):
    env = {**os.environ, "HARNESS_GRID_ROOT": str(env_root), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _results(root: Path) -> list[dict]:
    import pandas as pd

    df = pd.read_csv(root / "tiny" / "cells.csv")
    return df.to_dict("records")


def test_tiny_grid_end_to_end_then_nothing_recomputed(tmp_path, saved_tiny_llava, tiny_world, grid_root):
    spec = load_spec(write_spec(tmp_path / "s.yaml", saved_tiny_llava, tiny_world))
    plan = runner.build_plan(spec)
    summary = runner.run_local(plan, log=lambda *_: None)
    assert summary["failed"] == {}
    out = runner.write_results(plan, tmp_path / "results")
    rows = _results(tmp_path / "results")
    assert {r["recovery"] for r in rows} == {"none", "sft+kd-hidden"}
    assert {r["benchmark"] for r in rows if r["primary"]} == {"synth_gqa", "synth_pope"}
    cols = {"experiment", "teacher", "method", "ratio", "ratio_achieved", "recovery", "data_fraction", "seed",
            "benchmark", "metric", "score", "teacher_score", "retained"}
    assert cols <= set(rows[0])
    assert (out / "cells.parquet").exists()
    again = runner.run_local(runner.build_plan(spec), log=lambda *_: None)
    assert again["compute_s"] == 0.0  # every stage was done and shared


def test_failed_stage_is_recorded_and_other_cells_go_on(tmp_path, saved_tiny_llava, tiny_world, grid_root,
                                                         monkeypatch):
    import torch

    from harness.recovery.module import RecoveryModule

    real = RecoveryModule.compute_losses

    def nan_losses(self, batch):  # a diverging run: the loss turns NaN
        losses = real(self, batch)
        losses["loss"] = losses["loss"] * torch.tensor(float("nan"))
        return losses

    monkeypatch.setattr(RecoveryModule, "compute_losses", nan_losses)
    spec = load_spec(write_spec(tmp_path / "s.yaml", saved_tiny_llava, tiny_world))
    plan = runner.build_plan(spec)
    summary = runner.run_local(plan, log=lambda *_: None)
    failed_kinds = {plan.stages[k].kind for k in summary["failed"]}
    assert "recover" in failed_kinds
    rec = next(s for s in plan.stages.values() if s.kind == "recover")
    assert "non-finite" in rec.failure()["reason"] or "NonFinite" in rec.failure()["reason"]
    rows = runner.collect_rows(plan)
    assert rows and {r["recovery"] for r in rows} == {"none"}  # the untouched cells finished
    with pytest.raises(HarnessError, match="retry-failed"):
        runner.ensure(plan, rec)


@pytest.mark.slow
def test_kill_then_rerun_gives_identical_results(tmp_path, saved_tiny_llava, tiny_world):
    spec = write_spec(tmp_path / "s.yaml", saved_tiny_llava, tiny_world)
    ref_root, cut_root = tmp_path / "ref", tmp_path / "cut"
    (tmp_path / "ref_cwd").mkdir()
    (tmp_path / "cut_cwd").mkdir()
    ref = _run_cli(["grid", "run", str(spec), "--no-figures"], ref_root / "grid", tmp_path / "ref_cwd")
    assert ref.wait(timeout=600) == 0, ref.stdout.read()
    proc = _run_cli(["grid", "run", str(spec), "--no-figures"], cut_root / "grid", tmp_path / "cut_cwd")
    deadline = time.time() + 300
    while not list((cut_root / "grid" / "pruned").glob("*")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.kill()
    proc.wait()
    rerun = _run_cli(["grid", "run", str(spec), "--no-figures"], cut_root / "grid", tmp_path / "cut_cwd")
    assert rerun.wait(timeout=600) == 0, rerun.stdout.read()
    import pandas as pd

    a = pd.read_csv(tmp_path / "ref_cwd" / "results" / "tiny" / "cells.csv")
    b = pd.read_csv(tmp_path / "cut_cwd" / "results" / "tiny" / "cells.csv")
    pd.testing.assert_frame_equal(a, b)
    assert not a.duplicated().any()


@pytest.mark.slow
def test_two_concurrent_runners_never_run_the_same_stage(tmp_path, saved_tiny_llava, tiny_world):
    spec = write_spec(tmp_path / "s.yaml", saved_tiny_llava, tiny_world)
    root = tmp_path / "grid"
    (tmp_path / "cwd").mkdir()
    procs = [_run_cli(["grid", "run", str(spec), "--no-figures"], root, tmp_path / "cwd") for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=900) == 0, p.stdout.read()
    runs = [json.loads(line) for line in (root / "runs.jsonl").read_text().splitlines()]
    keys = [r["key"] for r in runs]
    assert len(keys) == len(set(keys)), "a stage ran twice"


@pytest.mark.slow
def test_submitit_local_backend_runs_a_tiny_grid(tmp_path, saved_tiny_llava, tiny_world):
    spec = write_spec(tmp_path / "s.yaml", saved_tiny_llava, tiny_world,
                      prune={"methods": ["width-magnitude"], "ratios": [0.3]},
                      recover={"recipes": ["none"], "fractions": [1.0]})
    (tmp_path / "cwd").mkdir()
    p = _run_cli(["grid", "run", str(spec), "--backend", "submitit-local", "--no-figures"], tmp_path / "grid",
                 tmp_path / "cwd")
    assert p.wait(timeout=900) == 0, p.stdout.read()
    assert (tmp_path / "cwd" / "results" / "tiny" / "cells.csv").exists()


@pytest.mark.slow  # a 2-task recovery job and its evaluation, ~1.5 min
def test_submitit_runs_a_multi_process_recovery_as_one_job_of_two_tasks(tmp_path, saved_tiny_llava, tiny_world):
    """A recovery with `devices: 2` is one submitit job of 2 tasks (on SLURM: 2 tasks, 2 GPUs): each task is one
    DDP rank, rank 0 alone keeps the books and writes the recovered model."""
    spec = write_spec(tmp_path / "s.yaml", saved_tiny_llava, tiny_world,
                      prune={"methods": ["width-magnitude"], "ratios": [0.3]},
                      recover={"recipes": ["full-sft"], "fractions": [1.0],
                               "settings": {"devices": 2, "strategy": "ddp", "max_steps": 2, "batch_size": 4}})
    plan = runner.build_plan(load_spec(spec))
    assert {s.kind: runner.stage_tasks(s) for s in plan.stages.values()} == {
        "teacher-eval": 1, "prune": 1, "recover": 2, "eval": 1}
    (tmp_path / "cwd").mkdir()
    p = _run_cli(["grid", "run", str(spec), "--backend", "submitit-local", "--no-figures", "--slurm", "timeout_min=30"],
                 tmp_path / "grid", tmp_path / "cwd")
    assert p.wait(timeout=900) == 0, p.stdout.read()
    recovered = list((tmp_path / "grid" / "recovered").iterdir())
    assert len(recovered) == 1
    record = json.loads((recovered[0] / "recovery.json").read_text())
    assert (record["settings"]["devices"], record["settings"]["strategy"], record["steps"]) == (2, "ddp", 2)
    runs = [json.loads(line) for line in (tmp_path / "grid" / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["kind"] for r in runs).count("recover") == 1  # rank 1 computed alongside, logged nothing
    assert (tmp_path / "cwd" / "results" / "tiny" / "cells.csv").exists()


def test_slurm_parameters_need_a_submitit_backend(tmp_path, saved_tiny_llava, tiny_world, capsys):
    spec = write_spec(tmp_path / "s.yaml", saved_tiny_llava, tiny_world)
    from harness.cli import main

    assert main(["grid", "run", str(spec), "--slurm", "slurm_partition=gpu"]) == 2
    assert "--slurm sets submitit parameters" in capsys.readouterr().err
