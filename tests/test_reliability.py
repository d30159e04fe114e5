"""Faults during a run: kill -9 at random moments, leftover locks and temporaries, NaN losses,
an unusable W&B server, determinism, and safety (no pickles, no remote code, no API key on disk).

The slow tests (`make test-slow`) run the tiny grid of tests/test_grid.py as real
subprocesses; the rest run in-process on the same tiny fixtures.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.grid import runner
from harness.grid import stages as st
from harness.grid.spec import load_spec
from harness.io import atomic_dir, read_json
from tests.test_grid import write_spec

REPO = Path(__file__).resolve().parents[1]
CELL_FIELDS = ["teacher", "method", "ratio", "recovery", "data_fraction", "seed", "benchmark", "metric"]


@pytest.fixture
def grid_root(tmp_path, monkeypatch):
    root = tmp_path / "grid"
    monkeypatch.setenv("HARNESS_GRID_ROOT", str(root))
    return root


# ----------------------------------------------------------------------------- artifacts and grid runs
def broken_artifacts(root: Path) -> list[str]:
    """Stage outputs under a grid root that exist but are incomplete (must always be empty)."""
    from safetensors import safe_open

    problems = []
    for kind, needed in (("pruned", ("config.json", "pruning.json")), ("recovered", ("config.json", "recovery.json")),
                         ("importance", ("importance.json", "scores.safetensors"))):
        for d in (root / kind).glob("[!.]*"):
            missing = [n for n in needed if not (d / n).is_file()]
            if missing:
                problems.append(f"{d}: missing {missing}")
            for f in d.glob("*.safetensors"):
                try:
                    with safe_open(str(f), "pt") as sf:
                        list(sf.keys())
                except Exception as e:  # noqa: BLE001
                    problems.append(f"{f}: {e}")
            for f in d.glob("*.json"):
                try:
                    json.loads(f.read_text())
                except ValueError as e:
                    problems.append(f"{f}: {e}")
    for f in (root / "evals").glob("[!.]*.json"):
        try:
            assert "scores" in json.loads(f.read_text())
        except (ValueError, AssertionError):
            problems.append(f"{f}: not a finished evaluation")
    return problems


def leftovers(root: Path) -> list[Path]:
    return [p for kind in ("pruned", "recovered", "evals") for p in (root / kind).glob(".*") if ".tmp-" in p.name
            or ".old-" in p.name]


class GridProcess:
    """`harness grid run SPEC` in its own process group, stdout lines timestamped as they arrive."""

    def __init__(self, spec: Path, root: Path, cwd: Path, extra_env: dict | None = None):
        env = {**os.environ, "HARNESS_GRID_ROOT": str(root / "grid"), "HARNESS_ARTIFACTS": str(root / "artifacts"),
               "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(root / "wandb"),
               "WANDB_CONFIG_DIR": str(root / "wandb-config"), "WANDB_CACHE_DIR": str(root / "wandb-cache"),
               "WANDB_DATA_DIR": str(root / "wandb-data"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               **(extra_env or {})}
        cwd.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "grid", "run", str(spec), "--no-figures"],
                                     cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.perf_counter() - self.started, line.rstrip()))

    def planned_at(self, timeout: float = 300) -> float | None:
        """Seconds from start until the plan was printed (imports and input checks are done), None if it ended first."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            hit = next((t for t, line in self.lines if line.startswith("experiment ")), None)
            if hit is not None:
                return hit
            if self.proc.poll() is not None:
                return None
            time.sleep(0.05)
        raise AssertionError("the grid never printed its plan")

    def kill(self) -> int:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the whole group: W&B's service process too
        except ProcessLookupError:
            pass
        return self.wait()

    def wait(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)


def results(cwd: Path):
    import pandas as pd

    return pd.read_csv(cwd / "results" / "tiny" / "cells.csv")


# ----------------------------------------------------------------------------- 1. kill -9
STAGE_START = re.compile(r"^\s+(\S+) ([0-9a-f]{16}) \.\.\.$")  # "  prune 1a2b... ..." as the runner logs it


def stage_starts(proc: GridProcess) -> list[tuple[float, str, str]]:
    """(seconds since start, kind, key) of every stage the process started."""
    return [(t, m[1], m[2]) for t, line in proc.lines if (m := STAGE_START.match(line))]


def kill_points(ref: GridProcess, moments: list[float]) -> list[tuple[int, float]]:
    """Moments of the reference run as (index of the stage running then, seconds into it).

    Rerun after a kill, the grid skips what is done and redoes the interrupted stage, so
    "the same moment" is the same stage and offset, not the same wall-clock time.
    """
    starts = stage_starts(ref)
    points = []
    for m in moments:
        i = max([k for k, (t, _, _) in enumerate(starts) if t <= m], default=0)
        points.append((i, max(0.0, m - starts[i][0])))
    return points


def wait_for_stage(proc: GridProcess, order: list[str], index: int, timeout: float = 300) -> bool:
    """Wait until the process starts the stage at `index` of the reference order or a later one; False if it ended."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if any(order.index(key) >= index for _, _, key in stage_starts(proc)):
            return True
        if proc.proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError(f"stage {index} never started:\n{proc.output}")


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun_gives_the_uninterrupted_results(tmp_path, saved_tiny_llava, tiny_world):
    import pandas as pd

    spec = write_spec(tmp_path / "s.yaml", saved_tiny_llava, tiny_world)
    ref = GridProcess(spec, tmp_path / "ref", tmp_path / "ref" / "cwd")
    assert ref.wait() == 0, ref.output
    starts, end = stage_starts(ref), ref.lines[-1][0]
    order = [key for _, _, key in starts]
    assert len(order) >= 8, ref.output

    # 10 seeded moments spread over the work (first stage start to the end), one inside a random stage of each
    # kind (prune stages are short: uniform moments may miss them), and one in startup (imports, input checks; early
    # in it: a rerun on a less loaded machine reaches its first stage sooner than the reference did)
    rng = random.Random(10)
    moments = [rng.uniform(starts[0][0], end) for _ in range(10)]
    for kind in ("teacher-eval", "prune", "recover", "eval"):
        i = rng.choice([i for i, (_, k, _) in enumerate(starts) if k == kind])
        stage_end = starts[i + 1][0] if i + 1 < len(starts) else end
        moments.append(rng.uniform(starts[i][0], (starts[i][0] + stage_end) / 2))  # its first half: a rerun's may be quicker
    moments.sort()
    cut, cwd = tmp_path / "cut", tmp_path / "cut" / "cwd"
    hits = []  # where each kill landed: the stage that was running
    for n, (index, offset) in enumerate([(None, rng.uniform(0.1, 0.4) * starts[0][0])] + kill_points(ref, moments)):
        proc = GridProcess(spec, cut, cwd)
        if index is not None and not wait_for_stage(proc, order, index):
            assert proc.wait() == 0, proc.output  # it finished before its kill moment: a complete rerun
            continue
        time.sleep(offset)
        code = proc.kill()
        assert code in (-signal.SIGKILL, 0), f"kill {n}: exit {code}, not from our kill:\n{proc.output}"
        if code == -signal.SIGKILL:
            hits.append(stage_starts(proc)[-1][1] if stage_starts(proc) else "startup")
        assert broken_artifacts(cut / "grid") == [], f"kill {n}: a half-written artifact is visible"
    print("kills landed in:", hits)
    assert len(hits) >= 10, f"only {len(hits)} kills landed while the grid was running: {hits}"
    assert {"startup", "teacher-eval", "prune", "recover", "eval"} <= set(hits), f"the kills missed a stage kind: {hits}"

    final = GridProcess(spec, cut, cwd)
    assert final.wait() == 0, final.output
    a, b = results(tmp_path / "ref" / "cwd"), results(cwd)
    pd.testing.assert_frame_equal(a, b)  # same cells, same scores
    assert not b.duplicated(subset=CELL_FIELDS).any()
    runs = [json.loads(line)["key"] for line in (cut / "grid" / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == len(set(runs)), "a finished stage was computed again"
    assert broken_artifacts(cut / "grid") == [] and leftovers(cut / "grid") == []


def test_a_lock_left_by_a_killed_runner_does_not_block(tmp_path, saved_tiny_llava, tiny_world, grid_root):
    plan = runner.build_plan(load_spec(write_spec(tmp_path / "s.yaml", saved_tiny_llava, tiny_world)))
    stage = next(iter(plan.stages.values()))
    lock = grid_root / "locks" / f"{stage.key}.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               "lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(600)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    waited = []
    blocked = threading.Thread(target=lambda: runner.stage_lock(stage, log=waited.append).__enter__(), daemon=True)
    blocked.start()
    blocked.join(1.0)
    assert blocked.is_alive() and waited, "a live holder must make the other runner wait"
    holder.kill()
    holder.wait()
    blocked.join(10.0)
    assert not blocked.is_alive(), "the lock of a killed runner still blocks"
    assert lock.exists()  # the stale file is there, and harmless


def test_atomic_dir_leaves_a_whole_artifact_or_none(tmp_path, monkeypatch):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "a.json").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:  # a failing writer leaves the old one intact
        (tmp / "a.json").write_text("2")
        raise RuntimeError("crash while writing")
    assert (final / "a.json").read_text() == "1"

    real_replace, calls = os.replace, []

    def dies_after_moving_the_old_one_aside(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies between the two renames
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_after_moving_the_old_one_aside)
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as tmp:
        (tmp / "a.json").write_text("3")
    monkeypatch.undo()
    assert not final.exists(), "a half-replaced artifact must not look finished"
    with atomic_dir(final) as tmp:
        (tmp / "a.json").write_text("4")
    assert (final / "a.json").read_text() == "4" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_leftovers_of_a_killed_stage_are_removed_before_it_runs_again(tmp_path, saved_tiny_llava, tiny_world,
                                                                     grid_root):
    plan = runner.build_plan(load_spec(write_spec(tmp_path / "s.yaml", saved_tiny_llava, tiny_world)))
    prune = next(s for s in plan.stages.values() if s.kind == "prune")
    teval = next(s for s in plan.stages.values() if s.kind == "teacher-eval")
    debris = [prune.output.parent / f".{prune.key}.tmp-x1", prune.output.parent / f".{prune.key}.old-x2",
              teval.output.parent / f".{teval.key}.json.tmp-x3"]
    keep = prune.output.parent / f".{prune.key}.ckpt"  # a resume checkpoint is not debris
    for d in debris[:2] + [keep]:
        (d / "half").mkdir(parents=True)
    debris[2].parent.mkdir(parents=True)
    debris[2].write_text("{")
    assert sorted(st.remove_leftovers(prune) + st.remove_leftovers(teval)) == sorted(debris)
    assert not any(d.exists() for d in debris) and keep.exists()


def test_a_resume_checkpoint_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    import torch

    from harness.recovery.train import AtomicCheckpointIO

    path, io = tmp_path / "ckpt" / "last.ckpt", AtomicCheckpointIO()
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    real_save = torch.save

    def killed_halfway(obj, f):
        real_save(obj, f)
        Path(f).write_bytes(Path(f).read_bytes()[:20])  # a partial file, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous checkpoint, intact
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


# ----------------------------------------------------------------------------- 3. numerics
def test_nan_loss_fails_its_cell_with_the_reason_and_the_grid_goes_on(tmp_path, saved_tiny_llava, tiny_world,
                                                                      grid_root, capsys):
    from harness.cli import main

    spec = write_spec(tmp_path / "s.yaml", saved_tiny_llava, tiny_world, tasks=["synth_gqa"],
                      prune={"methods": ["width-magnitude"], "ratios": [0.3]},
                      recover={"recipes": ["proj-sft", "lora-sft"], "fractions": [0.5],
                               "settings": {"max_steps": 3, "batch_size": 4},
                               "recipe_settings": {"proj-sft": {"lr": 1e30}}},  # diverges: NaN loss at step 2
                      eval={"limit": 2, "batch_size": 8})
    plan = runner.build_plan(load_spec(spec))
    summary = runner.run_local(plan, log=lambda *_: None)
    rec = {plan.stages[ids["recover"]].payload["recipe"]: plan.stages[ids["recover"]]
           for ids in plan.cell_stages.values() if "recover" in ids}
    assert rec["proj-sft"].key in summary["failed"] and rec["lora-sft"].done()
    assert "NonFiniteLoss: non-finite loss nan" in rec["proj-sft"].failure()["reason"]
    out = runner.write_results(plan, tmp_path / "results")
    import pandas as pd

    done, failed = pd.read_csv(out / "cells.csv"), pd.read_csv(out / "failed.csv")
    assert set(done["recovery"]) == {"lora-sft"}  # the grid went on with the other cell
    assert failed[["recovery", "stage"]].values.tolist() == [["proj-sft", "recover"]]
    assert "non-finite loss" in failed["reason"][0]
    capsys.readouterr()
    assert main(["grid", "status", str(spec)]) == 0
    status = capsys.readouterr().out
    failed_line = next(line for line in status.splitlines() if "failed cell" in line)
    assert "cells done 1/2" in status and "/proj-sft@0.5/" in failed_line and "non-finite loss" in failed_line


# ----------------------------------------------------------------------------- 4. tracking
class _RejectingServer(BaseHTTPRequestHandler):
    """A W&B server that refuses every key."""

    def _refuse(self):
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"errors": ["invalid api key"]}')

    do_GET = do_POST = _refuse

    def log_message(self, *args):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _offline_records(wandb_dir: Path) -> dict[str, dict]:
    """{run name: {"config": {...}, "history": [...], "summary": {...}}} read from offline run files."""
    import wandb
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal.datastore import DataStore

    wandb.teardown()  # W&B's service writes the run files behind `finish()`; stopping it flushes them, as at exit

    runs = {}
    for f in wandb_dir.rglob("offline-run-*/run-*.wandb"):
        store, run = DataStore(), {"config": {}, "history": [], "summary": {}, "name": None}
        store.open_for_scan(str(f))
        while (data := store.scan_data()) is not None:
            record = pb.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["name"] = record.run.display_name
                run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "history":
                run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
            elif kind == "summary":
                run["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        runs[run["name"]] = run
    return runs


@pytest.fixture(params=["nothing-listening", "key-rejected"])
def unusable_wandb(request, tmp_path, monkeypatch):
    """WANDB_MODE=online pointed at a local address where W&B cannot work."""
    from harness import tracking

    if request.param == "key-rejected":
        server = HTTPServer(("127.0.0.1", 0), _RejectingServer)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        request.addfinalizer(server.shutdown)
        port = server.server_port
    else:
        port = _free_port()
    env = {"WANDB_MODE": "online", "WANDB_BASE_URL": f"http://127.0.0.1:{port}", "WANDB_API_KEY": "k" * 40,
           "WANDB_INIT_TIMEOUT": "5", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "wandb"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
           "WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "HARNESS_ARTIFACTS": str(tmp_path / "artifacts")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(tracking, "_verdicts", {})
    return request.param


def test_unusable_online_wandb_falls_back_offline_and_keeps_every_metric(unusable_wandb, tmp_path, monkeypatch,
                                                                         capsys):
    from harness import tracking
    from harness.recovery import train

    started = time.perf_counter()
    assert tracking.wandb_mode() == "offline"
    assert tracking.wandb_mode() == "offline"  # checked once per process
    assert capsys.readouterr().err.count("W&B online mode is unusable") == 1
    monkeypatch.setenv("HARNESS_ARTIFACTS", str(tmp_path / "artifacts"))
    logger = train.make_logger("recover-x", {"recipe": {"lr": 1e-3}}, group="g")  # what a recovery logs through
    for step, loss in enumerate([2.5, 1.25, 0.625]):
        logger.log_metrics({"train/loss": loss}, step=step)
    logger.experiment.finish()
    st._log_wandb("g", "eval", {"tasks": ["synth_gqa"]}, {"scores": {"synth_gqa": {"exact_match": 0.75}}}, "abc")
    assert time.perf_counter() - started < 60
    runs = _offline_records(tmp_path / "artifacts" / "wandb")
    assert [h["train/loss"] for h in runs["recover-x"]["history"] if "train/loss" in h] == [2.5, 1.25, 0.625]
    assert runs["recover-x"]["config"]["recipe"] == {"lr": 1e-3}
    assert runs["eval-abc"]["summary"]["scores/synth_gqa/exact_match"] == 0.75


def test_an_online_init_that_fails_anyway_is_retried_offline(tmp_path, monkeypatch):
    import wandb

    from harness import tracking

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(tracking, "wandb_mode", lambda: "online")  # the server check passed, then init fails
    real_init, modes = wandb.init, []

    def init(**kwargs):
        modes.append(kwargs["mode"])
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("Run initialization has timed out")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    run = tracking.start_run(project="p", name="r", dir=str(tmp_path))
    run.log({"m": 1.0})
    run.finish()
    assert modes == ["online", "offline"]
    runs = _offline_records(tmp_path)
    assert runs["r"]["history"][0]["m"] == 1.0, runs


# ----------------------------------------------------------------------------- 5. determinism, 6. the API key
SENTINEL = "sentinel0123456789abcdef0123456789abcdef"  # 40 characters, like a W&B key


@pytest.fixture(scope="module")
def one_cell_twice(tmp_path_factory, saved_tiny_llava, tiny_world):
    """One pruned + recovered + evaluated cell, run twice in fresh grid roots, W&B offline with a sentinel key."""
    base = tmp_path_factory.mktemp("cell")
    spec = write_spec(base / "s.yaml", saved_tiny_llava, tiny_world, tasks=["synth_gqa", "synth_pope"],
                      prune={"methods": ["width-magnitude"], "ratios": [0.3]},
                      recover={"recipes": ["sft+kd-hidden"], "fractions": [0.5], "settings": {"max_steps": 2, "batch_size": 4}},
                      eval={"limit": 4, "batch_size": 8})
    outs = []
    for name in ("first", "second"):
        root = base / name
        proc = GridProcess(spec, root, root / "cwd", {"WANDB_API_KEY": SENTINEL})
        assert proc.wait() == 0, proc.output
        outs.append(root)
    return outs


@pytest.mark.slow
def test_the_same_cell_twice_gives_identical_scores(one_cell_twice):
    first, second = one_cell_twice
    a, b = results(first / "cwd"), results(second / "cwd")
    assert len(a) > 0
    assert a.equals(b)
    evals = [{p.name: read_json(p)["scores"] for p in (r / "grid" / "evals").glob("*.json")} for r in one_cell_twice]
    assert evals[0] == evals[1]  # same stage keys, same scores, teacher included


@pytest.mark.slow
def test_the_wandb_api_key_is_never_written(one_cell_twice):
    written = [p for root in one_cell_twice for p in root.rglob("*") if p.is_file()]
    assert any("offline-run-" in str(p) for p in written), "W&B wrote no run: the check would prove nothing"
    leaks = [str(p) for p in written if SENTINEL.encode() in p.read_bytes()]
    assert leaks == []


# ----------------------------------------------------------------------------- 6. no pickles, no remote code
def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            yield node, owner, name, {k.arg: k.value for k in node.keywords}


def _unsafe(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "cloudpickle") for n in names):
                found.append(f"{path}:{node.lineno} imports a pickle module")
    for node, owner, name, kw in _calls(tree):
        const = {k: v.value for k, v in kw.items() if isinstance(v, ast.Constant)}
        if owner == "torch" and name == "load" and const.get("weights_only") is not True:
            found.append(f"{path}:{node.lineno} torch.load without weights_only=True")
        if "weights_only" in kw and const.get("weights_only") is not True:
            found.append(f"{path}:{node.lineno} weights_only is not True")
        if "trust_remote_code" in kw and const.get("trust_remote_code") is not False:
            found.append(f"{path}:{node.lineno} trust_remote_code is not literally False")
        if "use_safetensors" in kw and const.get("use_safetensors") is not True:
            found.append(f"{path}:{node.lineno} use_safetensors is not True")
    return found


def test_no_pickle_loading_and_no_remote_code_anywhere():
    files = [p for d in ("harness", "analysis", "benchmarks") for p in (REPO / d).rglob("*.py")]
    assert len(files) > 20
    assert [f for p in files for f in _unsafe(p)] == []
    # Lightning's resume checkpoints are read with torch.load(weights_only=None), which is weights-only since torch 2.6.
    import torch

    assert tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 6)
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") in (None, "", "0")


@pytest.mark.parametrize("source, problem", [
    ("import pickle\n", "imports a pickle module"),
    ("import torch\ntorch.load('x')\n", "torch.load without weights_only=True"),
    ("from transformers import AutoModel\nAutoModel.from_pretrained('x', trust_remote_code=True)\n", "trust_remote_code"),
    ("from transformers import AutoModel\nAutoModel.from_pretrained('x', trust_remote_code=flag)\n", "trust_remote_code"),
    ("import torch\ntorch.load('x', weights_only=True)\n", None),
])
def test_the_safety_scan_catches_what_it_should(tmp_path, source, problem):
    path = tmp_path / "m.py"
    path.write_text(source)
    found = _unsafe(path)
    assert (problem in found[0]) if problem else found == []


def test_spec_errors_never_half_run(tmp_path, saved_tiny_llava, tiny_world, grid_root):
    """A bad setting deep in a spec fails at load, before the first stage."""
    spec = write_spec(tmp_path / "s.yaml", saved_tiny_llava, tiny_world,
                      prune={"methods": ["width-magnitude"], "ratios": [0.3], "settings": {"calib_sample": 3}})
    with pytest.raises(HarnessError, match="did you mean calib_samples"):
        load_spec(spec)
    assert not grid_root.exists()
