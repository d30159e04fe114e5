"""W&B runs a researcher can use: a tiny grid's offline runs, read back with the SDK's datastore reader.

One grid (one width method and ratio, no recovery and one recovery) runs in-process through
`harness grid run`, then `harness report --wandb` logs the analysis run a second time. Every
run must carry the grid axes of the cells it serves, a readable name, filterable tags, the
metrics of its stage and no absolute path; the experiment keeps exactly one analysis run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.test_grid import FAST_RECOVERY, write_spec

TEACHER = "tiny-llava"  # given to the grid as an absolute folder; runs must call it by its name
CELL = f"{TEACHER}/width-magnitude@0.3"


def read_offline_runs(wandb_dir: Path) -> list[dict]:
    """Every offline run under `wandb_dir`: name, group, job type, tags, config, summary, history, folder."""
    import wandb
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal.datastore import DataStore

    wandb.teardown()  # the W&B service writes run files behind `finish()`; stopping it flushes them
    runs = []
    for f in sorted(wandb_dir.rglob("offline-run-*/run-*.wandb")):
        run = {"dir": f.parent.name, "config": {}, "summary": {}, "history": [], "environment": []}
        store = DataStore()
        store.open_for_scan(str(f))
        while (data := store.scan_data()) is not None:
            record = pb.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                r = record.run
                run.update(name=r.display_name, group=r.run_group, job_type=r.job_type, tags=list(r.tags), id=r.run_id)
                run["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                run["history"].append({})
                for item in record.history.item:
                    _put(run["history"][-1], item)
            elif kind == "summary":
                for item in record.summary.update:
                    _put(run["summary"], item)
            elif kind == "environment":  # W&B's own metadata of the run: OS, Python, program, executable, ...
                run["environment"].append(str(record.environment))
        runs.append(run)
    return runs


def _put(target: dict, item) -> None:
    """A summary or history item: by `key`, or nested (media such as tables and histograms) by `nested_key`."""
    *path, last = [item.key] if item.key else list(item.nested_key)
    for key in path:
        target = target.setdefault(key, {})
    target[last] = json.loads(item.value_json)


def _strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


@pytest.fixture(scope="module")
def grid_runs(tmp_path_factory, tiny_world):
    from harness.cli import main
    from harness.paths import TEACHERS_DIR

    base = tmp_path_factory.mktemp("wandb-grid")
    # the committed teacher (1.7M parameters): it scores above zero, so retained % and AVG-% exist
    spec = write_spec(base / "s.yaml", (TEACHERS_DIR / TEACHER).absolute(), tiny_world,
                      prune={"methods": ["width-magnitude"], "ratios": [0.3]},
                      recover={"recipes": ["none", "sft+kd-hidden"], "fractions": [0.5], "settings": FAST_RECOVERY},
                      eval={"limit": 4, "batch_size": 8, "efficiency": False})
    env = {"HARNESS_GRID_ROOT": str(base / "grid"), "HARNESS_ARTIFACTS": str(base / "artifacts"),
           "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(base / "wandb-config"),
           "WANDB_CACHE_DIR": str(base / "wandb-cache"), "WANDB_DATA_DIR": str(base / "wandb-data")}
    (base / "cwd").mkdir()
    import wandb

    wandb.teardown()  # a W&B service an earlier test started (with its own environment) must not serve these runs
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("WANDB_DIR", raising=False)
        mp.chdir(base / "cwd")
        assert main(["grid", "run", str(spec)]) == 0  # stage runs, then the report and the analysis run
        first = analysis_dirs(base)
        time.sleep(1.0)  # run folders are named to the second: the next one must be a new folder
        assert main(["report", "--wandb", "results/tiny"]) == 0  # the analysis run again: replaced, not added
        runs = read_offline_runs(base / "artifacts" / "wandb")
    return {"runs": runs, "results": base / "cwd" / "results" / "tiny", "base": base, "first_analysis": first}


def analysis_dirs(base: Path) -> list[str]:
    return sorted(d.name for d in (base / "artifacts" / "wandb" / "wandb").glob("offline-run-*-analysis-tiny"))


def _by_name(grid_runs) -> dict[str, dict]:
    names = [r["name"] for r in grid_runs["runs"]]
    assert len(names) == len(set(names)), names
    return {r["name"]: r for r in grid_runs["runs"]}


def test_every_run_has_a_readable_name_group_and_job_type(grid_runs):
    runs = _by_name(grid_runs)
    assert set(runs) == {
        f"{TEACHER}: teacher-eval (2 cells)",
        f"{CELL}: prune (2 cells)",
        f"{CELL}/sft+kd-hidden/50%/s0: recover",
        f"{CELL}/sft+kd-hidden/50%/s0: eval",
        f"{CELL}/none/s0: eval",
        "tiny: analysis",
    }
    assert {r["group"] for r in runs.values()} == {"tiny"}
    assert {name.split(": ")[1].split(" ")[0]: r["job_type"] for name, r in runs.items()} == {
        "teacher-eval": "teacher-eval", "prune": "prune", "recover": "recover", "eval": "eval",
        "analysis": "analysis"}


def test_stage_runs_carry_the_grid_axes_and_filterable_tags(grid_runs):
    import pandas as pd

    runs = _by_name(grid_runs)
    cells = pd.read_csv(grid_runs["results"] / "cells.csv")
    achieved = float(cells["ratio_achieved"].iloc[0])
    axes = {"experiment": "tiny", "teacher": TEACHER, "method": "width-magnitude", "family": "width", "ratio": 0.3,
            "ratio_achieved": achieved, "seed": 0}
    for name, recovery, fraction in ((f"{CELL}/sft+kd-hidden/50%/s0: eval", "sft+kd-hidden", 0.5),
                                     (f"{CELL}/sft+kd-hidden/50%/s0: recover", "sft+kd-hidden", 0.5),
                                     (f"{CELL}/none/s0: eval", "none", 0.0)):
        config = runs[name]["config"]
        assert {k: config[k] for k in axes} == axes, name
        assert (config["recovery"], config["data_fraction"], config["shared_by"]) == (recovery, fraction, 1), name
        assert config["cells"] == [f"{CELL}/{recovery}{'' if recovery == 'none' else '@0.5'}/s0"], name
        assert {"experiment:tiny", "method:width-magnitude", "ratio:0.3", f"recovery:{recovery}", "seed:0",
                f"teacher:{TEACHER}"} <= set(runs[name]["tags"]), name
    recover = runs[f"{CELL}/sft+kd-hidden/50%/s0: recover"]["config"]
    assert recover["student"].startswith("pruned/") and recover["recipe"]["max_steps"] == 2
    prune = runs[f"{CELL}: prune (2 cells)"]["config"]  # shared: it says so, and lists what differs
    assert prune["shared_by"] == 2 and prune["recovery"] == ["none", "sft+kd-hidden"] and "shared" in \
        runs[f"{CELL}: prune (2 cells)"]["tags"]
    assert {k: prune[k] for k in axes} == axes
    assert runs[f"{TEACHER}: teacher-eval (2 cells)"]["config"]["cells"] == [f"{CELL}/none/s0",
                                                                            f"{CELL}/sft+kd-hidden@0.5/s0"]


def test_stage_runs_hold_their_metrics(grid_runs):
    import pandas as pd

    from analysis import load_results
    from analysis.tables import seed_scores
    from harness.paths import TEACHERS_DIR

    runs = _by_name(grid_runs)
    avg = seed_scores(load_results(grid_runs["results"])).set_index("recovery")["AVG-%"]
    cells = pd.read_csv(grid_runs["results"] / "cells.csv")
    for recovery, name in (("none", f"{CELL}/none/s0: eval"), ("sft+kd-hidden", f"{CELL}/sft+kd-hidden/50%/s0: eval")):
        summary = runs[name]["summary"]
        assert summary["AVG-%"] == pytest.approx(avg[recovery])
        for row in cells[(cells["recovery"] == recovery) & cells["primary"]].itertuples():
            assert summary[f"score/{row.benchmark}"] == pytest.approx(row.score)
            assert summary[f"retained/{row.benchmark}"] == pytest.approx(row.retained)
    teacher = runs[f"{TEACHER}: teacher-eval (2 cells)"]["summary"]
    assert {"score/synth_gqa", "score/synth_pope"} <= set(teacher)
    prune = runs[f"{CELL}: prune (2 cells)"]["summary"]
    assert prune["ratio_achieved"] == pytest.approx(cells["ratio_achieved"].iloc[0])
    histograms = [k for k, v in prune.items() if k.startswith("importance/mlp/layer_")
                  and isinstance(v, dict) and v.get("_type") == "histogram"]
    layers = json.loads((TEACHERS_DIR / TEACHER / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert len(histograms) == layers  # one per layer
    recover = runs[f"{CELL}/sft+kd-hidden/50%/s0: recover"]
    assert recover["summary"]["steps"] == 2 and recover["summary"]["num_samples"] > 0
    # curves: a training point every step, a validation point at every check (val_checks over 2 steps: both)
    steps = [(h["trainer/global_step"], k) for h in recover["history"] for k in h if k.startswith(("train/", "val/"))]
    assert {s for s, k in steps if k == "train/loss"} == {0, 1}
    assert sorted(s for s, k in steps if k == "val/loss") == [0, 1]  # logged at global steps 1 and 2, as 0-based
    assert {k for _, k in steps if k.startswith("val/")} == {"val/ce", "val/hidden", "val/loss"}


def test_no_run_carries_an_absolute_path(grid_runs):
    from harness.tracking import portable

    assert portable({"a": [str(grid_runs["base"] / "x" / "model")]}) == {"a": ["model"]}
    tables = list(grid_runs["base"].glob("artifacts/wandb/wandb/offline-run-*/files/media/table/*.table.json"))
    assert len(tables) == 5
    for table in tables:  # the analysis run's cells, tables and findings name teachers, not their folders
        assert str(grid_runs["base"]) not in table.read_text(), table.name
    for run in grid_runs["runs"]:
        carried = [run["name"], *run["tags"], *_strings(run["config"]), *_strings(run["summary"])]
        found = [s for s in carried if os.path.isabs(s) or str(grid_runs["base"]) in s or str(Path.home()) + "/" in s]
        environment = "".join(run["environment"])
        assert "executable" in environment and "python" in environment, run["name"]
        found += [line for line in environment.splitlines()  # W&B's metadata: no path of this machine either
                  if str(Path.cwd()) in line or str(grid_runs["base"]) in line or str(Path(sys.executable).parent) in line]
        assert found == [], (run["name"], found)


def test_one_analysis_run_per_experiment_with_tables_figures_and_verdicts(grid_runs):
    import pandas as pd

    analysis = [r for r in grid_runs["runs"] if r["job_type"] == "analysis"]
    assert len(analysis) == 1, [r["dir"] for r in analysis]  # logged twice, replaced once
    run = analysis[0]
    assert len(grid_runs["first_analysis"]) == 1 and run["dir"] not in grid_runs["first_analysis"]
    assert run["id"] == "analysis-tiny" and run["config"]["recovery"] == ["none", "sft+kd-hidden"]
    assert run["config"]["teacher"] == [TEACHER] and run["config"]["cells"] == 2
    summary = run["summary"]
    for table in ("cells", "configurations", "table_a", "table_b", "findings"):
        assert summary[table]["_type"] == "table-file", table
    report = (grid_runs["results"] / "report.md").read_text()
    figures = [k for k, v in summary.items() if k.startswith("figures/") and v["_type"] == "image-file"]
    assert figures and all(f"({k}.png)" in report for k in figures)
    findings = pd.read_csv(grid_runs["results"] / "findings.csv")
    verdicts = {k: v for k, v in summary.items() if k.startswith("verdict/")}
    assert sorted(verdicts.values()) == sorted(findings["verdict"]) and len(verdicts) == len(findings)
