"""Bad input across the whole pipeline: every case is one line on stderr, a non-zero exit, nothing written.

The corpus is a table of (id, argv, expected words). Placeholders in argv name prepared
inputs ({teacher}, {pruned}, {spec:NAME}, {world:NAME}, ...) and the case's output path
({out}). Each case runs the CLI in-process through `harness.cli.main`, inside a fresh
working directory with its own grid root, and checks:

- the exit status is non-zero (2 for every `HarnessError` and usage error),
- stderr is exactly one line, starting with `error:`, naming the problem,
- no file or folder appeared or changed anywhere under the case's folder or the shared inputs.

A few cases also run as real subprocesses, where library warnings printed at import or
load time would show up on stderr too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main

FAST_RECOVERY = {"max_steps": 2, "batch_size": 4}
TASKS = ["synth_gqa"]


# ----------------------------------------------------------------------------- prepared inputs
def _model_variants(root: Path, teacher: Path) -> None:
    """Broken copies of a good checkpoint."""
    for name in ("truncated", "more_layers", "wrong_width", "bad_config", "pickle_only"):
        shutil.copytree(teacher, root / name)
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for name, edit in (("more_layers", {"num_hidden_layers": 6}), ("wrong_width", {"intermediate_size": 200})):
        cfg = json.loads((root / name / "config.json").read_text())
        cfg["text_config"].update(edit)
        (root / name / "config.json").write_text(json.dumps(cfg))
    (root / "bad_config" / "config.json").write_text('{"model_type": "llava", "text_config": {')
    (root / "pickle_only" / "model.safetensors").rename(root / "pickle_only" / "pytorch_model.bin")


def _worlds(root: Path, world: Path) -> None:
    """Instruction mixes that are broken in one way each (images of the good world where needed)."""
    records = json.loads((world / "mix.json").read_text())[:8]
    bad_images = root / "bad_images"
    (bad_images / "images").mkdir(parents=True)
    for r in records:
        (bad_images / r["image"]).write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (bad_images / "mix.json").write_text(json.dumps(records))
    missing_image = root / "missing_image"
    missing_image.mkdir()
    (missing_image / "mix.json").write_text(json.dumps(records))  # no images/ folder at all
    for name, text in (("empty", "[]"), ("not_a_list", '{"conversations": []}'),
                       ("no_conversations", json.dumps([{"id": "a", "image": "x.png", "text": "hi"}])),
                       ("truncated_json", json.dumps(records)[:200]),
                       ("bad_turns", json.dumps([{"id": "a", "conversations": [{"speaker": "human", "text": "hi"}]}]))):
        (root / name).mkdir()
        (root / name / "mix.json").write_text(text)
    no_bench = root / "no_benchmarks"
    no_bench.mkdir()
    shutil.copy(world / "mix.json", no_bench / "mix.json")


def _specs(root: Path, teacher: Path, world: Path) -> None:
    """Grid specs, each wrong in one way; `good` is the valid base they are derived from."""
    def spec(**over):
        base = {"name": "tiny", "data": str(world), "teachers": [str(teacher)], "tasks": TASKS, "seeds": [0],
                "prune": {"methods": ["width-magnitude"], "ratios": [0.3]},
                "recover": {"recipes": ["none", "proj-sft"], "fractions": [0.5], "settings": FAST_RECOVERY},
                "eval": {"limit": 2, "batch_size": 8}}
        for key, value in over.items():
            if value is None:
                base.pop(key)
            elif isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        return json.dumps(base)

    texts = {
        "good": spec(),
        "unparsable": "name: tiny\nteachers: [a\nprune:\n",
        "a_list": "- name\n- teachers\n",
        "empty": "",
        "unknown_top_key": spec(teacher=["x"]),
        "missing_teachers": spec(teachers=None),
        "teachers_a_string": spec(teachers=str(teacher)),
        "ratio_a_string": spec(prune={"ratios": "0.3"}),
        "ratio_zero": spec(prune={"ratios": [0.0]}),
        "ratio_bool": spec(prune={"ratios": [True]}),
        "fraction_too_big": spec(recover={"fractions": [1.5]}),
        "seed_float": spec(seeds=[0.5]),
        "unknown_method": spec(prune={"methods": ["width-taylr"]}),
        "unknown_recipe": spec(recover={"recipes": ["sft+kd-hiden"]}),
        "recipe_setting_type": spec(recover={"settings": {"lr": "fast"}}),
        "recipe_setting_unknown": spec(recover={"settings": {"learning_rate": 1e-3}}),
        "prune_setting_unknown": spec(prune={"settings": {"calib_sample": 4}}),
        "prune_setting_type": spec(prune={"settings": {"calib_samples": "many"}}),
        "eval_limit_zero": spec(eval={"limit": 0}),
        "eval_batch_type": spec(eval={"batch_size": "eight"}),
        "unknown_task": spec(tasks=["synth_gqq"]),
        "bad_name": spec(name="../escape"),
        "missing_data": spec(data=str(root / "nowhere")),
        "data_without_benchmarks": spec(data=str(root.parent / "worlds" / "no_benchmarks")),
        "data_bad_schema": spec(data=str(root.parent / "worlds" / "not_a_list")),
        "missing_teacher": spec(teachers=[str(root / "no_teacher")]),
        "exclude_unknown_key": spec(excludes=[{"colour": "red"}]),
    }
    root.mkdir()
    for name, text in texts.items():
        (root / f"{name}.yaml").write_text(text)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, saved_tiny_llava, tiny_world):
    """Every prepared input, built once; the cases must leave it untouched."""
    from harness.pruning.pipeline import prune

    root = tmp_path_factory.mktemp("fault_inputs")
    teacher = root / "models" / "teacher"
    shutil.copytree(saved_tiny_llava, teacher)
    _model_variants(root / "models", teacher)
    prune(str(teacher), "width-magnitude", 0.3, root / "models" / "pruned", importance_dir=root / "importance")
    _worlds(root / "worlds", tiny_world)
    _specs(root / "specs", teacher, tiny_world)
    (root / "teacher_eval_wrong_schema.json").write_text(json.dumps({"synth_gqa": 0.5}))
    (root / "teacher_eval_not_json.json").write_text("{scores")
    return {"root": root, "world": Path(tiny_world)}


def _expand(arg: str, inputs: dict, out: Path) -> str:
    root = inputs["root"]
    if arg.startswith("{spec:"):
        return str(root / "specs" / f"{arg[6:-1]}.yaml")
    if arg.startswith("{world:"):
        return str(root / "worlds" / arg[7:-1])
    if arg.startswith("{model:"):
        return str(root / "models" / arg[7:-1])
    return (arg.replace("{teacher}", str(root / "models" / "teacher"))
               .replace("{pruned}", str(root / "models" / "pruned"))
               .replace("{good_world}", str(inputs["world"]))
               .replace("{inputs}", str(root))
               .replace("{out}", str(out)))


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `roots` with its size and modification time."""
    seen = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                s = p.lstat()
                seen[str(p)] = (s.st_size if name in filenames else 0, s.st_mtime_ns)
    return seen


# ----------------------------------------------------------------------------- the corpus
PRUNE = ["prune", "{teacher}", "--out", "{out}"]
RECOVER = ["recover", "--teacher", "{teacher}", "--student", "{pruned}", "--out", "{out}", "--data", "{good_world}"]
EVAL = ["eval", "{teacher}", "--data", "{good_world}", "--tasks", "synth_gqa", "--limit", "2", "--out", "{out}/e.json"]
GRID = ["grid", "run", "--no-figures"]

CASES = [
    # --- command line
    ("unknown-subcommand", ["frobnicate"], "invalid choice"),
    ("missing-required-option", ["recover", "--teacher", "{teacher}", "--student", "{pruned}", "--recipe", "proj-sft"],
     "--out"),
    ("ratio-not-a-number", [*PRUNE, "--method", "layer-bi", "--ratio", "abc"], "invalid float value"),
    ("set-without-equals", [*RECOVER, "--recipe", "proj-sft", "--set", "lr"], "KEY=VALUE"),
    # --- pruning
    ("ratio-one", [*PRUNE, "--method", "layer-bi", "--ratio", "1.0"], "ratio must be in (0, 1)"),
    ("ratio-negative", [*PRUNE, "--method", "width-magnitude", "--ratio", "-0.2"], "ratio must be in (0, 1)"),
    ("ratio-nan", [*PRUNE, "--method", "width-magnitude", "--ratio", "nan"], "ratio must be in (0, 1)"),
    ("unknown-method", [*PRUNE, "--method", "layer-bogus", "--ratio", "0.3"], "unknown pruning method"),
    ("unknown-model", ["prune", "tiny-gpt", "--method", "layer-bi", "--ratio", "0.3", "--out", "{out}"],
     "unknown model"),
    ("truncated-safetensors", ["prune", "{model:truncated}", "--method", "width-magnitude", "--ratio", "0.3",
                               "--out", "{out}"], "cannot load model"),
    ("config-more-layers-than-weights", ["prune", "{model:more_layers}", "--method", "width-magnitude",
                                         "--ratio", "0.3", "--out", "{out}"], "does not match its weights"),
    ("config-width-disagrees", ["prune", "{model:wrong_width}", "--method", "width-magnitude", "--ratio", "0.3",
                                "--out", "{out}"], "does not match its weights"),
    ("config-not-json", ["prune", "{model:bad_config}", "--method", "width-magnitude", "--ratio", "0.3",
                         "--out", "{out}"], "not valid JSON"),
    ("pickle-weights-only", ["prune", "{model:pickle_only}", "--method", "width-magnitude", "--ratio", "0.3",
                             "--out", "{out}"], "no safetensors weights"),
    ("bad-layer-range", [*PRUNE, "--method", "width-magnitude", "--ratio", "0.3", "--attn-layers", "3:1"],
     "attn_layers"),
    ("round-to-zero", [*PRUNE, "--method", "width-magnitude", "--ratio", "0.3", "--round-to", "0"], "--round-to must be >= 1"),
    ("calib-samples-zero", [*PRUNE, "--method", "layer-bi", "--ratio", "0.3", "--calib-samples", "0"],
     "--calib-samples must be >= 1, got 0"),
    ("calib-data-missing", [*PRUNE, "--method", "layer-bi", "--ratio", "0.3", "--data", "{inputs}/nowhere"],
     "instruction mix not found"),
    ("calib-images-undecodable", [*PRUNE, "--method", "layer-bi", "--ratio", "0.3", "--calib-samples", "2",
                                  "--data", "{world:bad_images}"], "cannot decode image"),
    ("calib-image-missing", [*PRUNE, "--method", "layer-bi", "--ratio", "0.3", "--calib-samples", "2",
                             "--data", "{world:missing_image}"], "cannot read image"),
    ("calib-mix-empty", [*PRUNE, "--method", "layer-bi", "--ratio", "0.3", "--data", "{world:empty}"], "is empty"),
    ("calib-mix-not-a-list", [*PRUNE, "--method", "layer-bi", "--ratio", "0.3", "--data", "{world:not_a_list}"],
     "LLaVA JSON format expected"),
    ("calib-mix-no-conversations", [*PRUNE, "--method", "layer-bi", "--ratio", "0.3",
                                    "--data", "{world:no_conversations}"], "'conversations'"),
    ("calib-mix-truncated-json", [*PRUNE, "--method", "layer-bi", "--ratio", "0.3",
                                  "--data", "{world:truncated_json}"], "cannot read instruction mix"),
    ("calib-mix-bad-turns", [*PRUNE, "--method", "layer-bi", "--ratio", "0.3", "--data", "{world:bad_turns}"],
     "turn"),
    # --- recovery
    ("unknown-recipe", [*RECOVER, "--recipe", "sft+kd-hiden"], "unknown recipe"),
    ("fraction-too-big", [*RECOVER, "--recipe", "proj-sft", "--data-fraction", "1.5"], "fraction"),
    ("fraction-nan", [*RECOVER, "--recipe", "proj-sft", "--data-fraction", "nan"], "fraction"),
    ("override-wrong-type", [*RECOVER, "--recipe", "proj-sft", "--set", "lr=fast"], "lr"),
    ("override-unknown", [*RECOVER, "--recipe", "proj-sft", "--set", "learning_rate=1e-3"], "unknown recipe setting"),
    ("override-bad-tune-type", [*RECOVER, "--recipe", "proj-sft", "--set", "language_model=half"], "language_model"),
    ("fsdp-not-saveable-yet", [*RECOVER, "--recipe", "proj-sft", "--set", "strategy=fsdp"], "strategy fsdp"),
    ("student-not-pruned", ["recover", "--teacher", "{teacher}", "--student", "{teacher}", "--recipe", "sft+kd-hidden",
                            "--out", "{out}", "--data", "{good_world}"], "no pruning.json"),
    ("student-missing", ["recover", "--teacher", "{teacher}", "--student", "{inputs}/nothing", "--recipe", "proj-sft",
                         "--out", "{out}", "--data", "{good_world}"], "unknown model"),
    ("teacher-missing", ["recover", "--teacher", "{inputs}/nothing", "--student", "{pruned}", "--recipe", "kd-logit",
                         "--out", "{out}", "--data", "{good_world}"], "unknown model"),
    ("recover-mix-empty", ["recover", "--teacher", "{teacher}", "--student", "{pruned}", "--recipe", "proj-sft",
                           "--out", "{out}", "--data", "{world:empty}"], "is empty"),
    ("recover-images-undecodable", ["recover", "--teacher", "{teacher}", "--student", "{pruned}", "--recipe",
                                    "proj-sft", "--out", "{out}", "--data", "{world:bad_images}"],
     "cannot decode image"),
    ("recover-out-not-empty", [*RECOVER, "--recipe", "proj-sft"], "not empty"),
    # --- evaluation
    ("unknown-task", ["eval", "{teacher}", "--data", "{good_world}", "--tasks", "synth_gqq", "--out", "{out}/e.json"],
     "unknown task"),
    ("limit-zero", ["eval", "{teacher}", "--data", "{good_world}", "--limit", "0", "--out", "{out}/e.json"],
     "limit must be a positive number"),
    ("eval-batch-size-zero", ["eval", "{teacher}", "--data", "{good_world}", "--batch-size", "0", "--out", "{out}/e.json"],
     "--batch-size must be >= 1"),
    ("limit-not-a-number", ["eval", "{teacher}", "--data", "{good_world}", "--limit", "all", "--out", "{out}/e.json"],
     "--limit: invalid number value"),
    ("benchmarks-missing", ["eval", "{teacher}", "--data", "{world:no_benchmarks}", "--out", "{out}/e.json"],
     "benchmark data missing"),
    ("teacher-eval-wrong-schema", [*EVAL, "--teacher", "{inputs}/teacher_eval_wrong_schema.json"], "no 'scores'"),
    ("teacher-eval-not-json", [*EVAL, "--teacher", "{inputs}/teacher_eval_not_json.json"], "not valid JSON"),
    ("eval-truncated-safetensors", ["eval", "{model:truncated}", "--data", "{good_world}", "--tasks", "synth_gqa",
                                    "--out", "{out}/e.json"], "cannot load model"),
    # --- data, teachers, conversion, reports
    ("mix-size-zero", ["data", "make", "--out", "{out}", "--mix-size", "0"], "mix_size"),
    ("benchmark-size-one", ["data", "make", "--out", "{out}", "--benchmark-size", "1"], "benchmark_size"),
    ("data-out-holds-something-else", ["data", "make", "--out", "{inputs}/models", "--mix-size", "4"],
     "holds a different world"),
    ("unknown-teacher-name", ["teacher", "train", "tiny-gpt", "--out", "{out}"], "unknown embedded model"),
    ("teacher-unknown-stage", ["teacher", "train", "tiny-llava", "--out", "{out}", "--set", "pretrain.steps=5"],
     "STAGE.FIELD"),
    ("teacher-unknown-recipe-field", ["teacher", "train", "tiny-llava", "--out", "{out}", "--set", "full.epochz=3"],
     "teacher stage full: unknown recipe setting"),
    ("teacher-vision-steps-fraction", ["teacher", "train", "tiny-llava", "--out", "{out}", "--set", "vision.steps=2.5"],
     "vision.steps must be int, got 2.5"),
    ("convert-missing-source", ["convert", "bunny", "{inputs}/nothing", "{out}"], "nothing"),
    ("report-missing-results", ["report", "{inputs}/no_results"], "no_results"),
    # --- grid specs
    ("spec-missing-file", [*GRID, "{inputs}/specs/nothing.yaml"], "spec file not found"),
    ("spec-unparsable", [*GRID, "{spec:unparsable}"], "does not parse as YAML"),
    ("spec-a-list", [*GRID, "{spec:a_list}"], "must be a mapping"),
    ("spec-empty", [*GRID, "{spec:empty}"], "must be a mapping"),
    ("spec-unknown-key", [*GRID, "{spec:unknown_top_key}"], "did you mean teachers"),
    ("spec-missing-key", [*GRID, "{spec:missing_teachers}"], "missing required key 'teachers'"),
    ("spec-teachers-a-string", [*GRID, "{spec:teachers_a_string}"], "teachers must be a non-empty list"),
    ("spec-ratio-a-string", [*GRID, "{spec:ratio_a_string}"], "prune.ratios must be a non-empty list"),
    ("spec-ratio-zero", [*GRID, "{spec:ratio_zero}"], "outside (0, 1)"),
    ("spec-ratio-bool", [*GRID, "{spec:ratio_bool}"], "expected float"),
    ("spec-fraction-too-big", [*GRID, "{spec:fraction_too_big}"], "outside (0, 1]"),
    ("spec-seed-float", [*GRID, "{spec:seed_float}"], "expected int"),
    ("spec-unknown-method", [*GRID, "{spec:unknown_method}"], "unknown pruning method"),
    ("spec-unknown-recipe", [*GRID, "{spec:unknown_recipe}"], "unknown recovery"),
    ("spec-recipe-setting-type", [*GRID, "{spec:recipe_setting_type}"], "lr"),
    ("spec-recipe-setting-unknown", [*GRID, "{spec:recipe_setting_unknown}"], "unknown recipe setting"),
    ("spec-prune-setting-unknown", [*GRID, "{spec:prune_setting_unknown}"], "calib_sample"),
    ("spec-prune-setting-type", [*GRID, "{spec:prune_setting_type}"], "calib_samples"),
    ("spec-eval-limit-zero", [*GRID, "{spec:eval_limit_zero}"], "limit"),
    ("spec-eval-batch-type", [*GRID, "{spec:eval_batch_type}"], "batch_size"),
    ("spec-unknown-task", [*GRID, "{spec:unknown_task}"], "unknown task"),
    ("spec-bad-name", [*GRID, "{spec:bad_name}"], "plain identifier"),
    ("spec-missing-data", [*GRID, "{spec:missing_data}"], "no mix.json"),
    ("spec-data-without-benchmarks", [*GRID, "{spec:data_without_benchmarks}"], "benchmarks"),
    ("spec-data-bad-schema", [*GRID, "{spec:data_bad_schema}"], "LLaVA JSON format expected"),
    ("spec-missing-teacher", [*GRID, "{spec:missing_teacher}"], "unknown model"),
    ("spec-exclude-unknown-key", [*GRID, "{spec:exclude_unknown_key}"], "unknown key"),
]
SETUP = {  # cases that need something in place first (it is part of the "before" snapshot)
    "recover-out-not-empty": lambda out: (out.mkdir(parents=True), (out / "keep.txt").write_text("mine")),
}


def test_the_corpus_is_large_and_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30


@pytest.mark.parametrize("case_id, argv, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case_id, argv, words, inputs, tmp_path, monkeypatch, capfd):
    work, out = tmp_path / "cwd", tmp_path / "out" / "x"
    work.mkdir()
    monkeypatch.chdir(work)  # relative defaults (artifacts/, results/) land here
    monkeypatch.setenv("HARNESS_GRID_ROOT", str(tmp_path / "grid"))
    if case_id in SETUP:
        SETUP[case_id](out)
    argv = [_expand(a, inputs, out) for a in argv]
    before = _snapshot(tmp_path, inputs["root"], inputs["world"])
    capfd.readouterr()
    code = main(argv)
    captured = capfd.readouterr()
    err = captured.err.strip()
    assert code == 2, f"exit {code}; stderr: {captured.err[-2000:]}"
    assert len(err.splitlines()) == 1, f"stderr is not one line:\n{captured.err[-3000:]}"
    assert err.startswith("error: ") and words in err, err
    assert _snapshot(tmp_path, inputs["root"], inputs["world"]) == before, "something was written"


SUBPROCESS_CASES = [pytest.param("spec-unparsable"),  # cheap: fails before torch is imported
                    pytest.param("truncated-safetensors", marks=pytest.mark.slow),
                    pytest.param("recover-images-undecodable", marks=pytest.mark.slow)]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_input_in_a_real_process(case_id, inputs, tmp_path):
    """Library warnings printed at import or load time would break the one-line promise here."""
    _, argv, words = next(c for c in CASES if c[0] == case_id)
    out = tmp_path / "out" / "x"
    argv = [_expand(a, inputs, out) for a in argv]
    env = {**os.environ, "HARNESS_GRID_ROOT": str(tmp_path / "grid"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    (tmp_path / "cwd").mkdir()
    before = _snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "harness.cli", *argv], cwd=tmp_path / "cwd", env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr, proc.stderr[-3000:]
    assert _snapshot(tmp_path) == before
