"""The command line: bad input is one line on stderr, exit status 2, nothing written."""

from __future__ import annotations

import pytest

from harness.cli import main


@pytest.mark.parametrize("argv, match", [
    (["recover", "--teacher", "t", "--student", "/nonexistent", "--recipe", "nope", "--out", "{tmp}/o"], "unknown recipe"),
    (["recover", "--teacher", "t", "--student", "/nonexistent", "--recipe", "proj-sft", "--data-fraction", "1.5",
      "--out", "{tmp}/o"], "fraction"),
    (["recover", "--teacher", "t", "--student", "s", "--recipe", "proj-sft", "--set", "lr", "--out", "{tmp}/o"],
     "KEY=VALUE"),
    (["grid", "plan", "{tmp}/missing.yaml"], "spec file not found"),
    (["data", "make", "--out", "{tmp}/o", "--mix-size", "0"], "mix_size"),
    (["data", "make", "--out", "{tmp}/o", "--family-weights", "sqa=four"], "FAMILY=INT"),
    (["data", "make", "--out", "{tmp}/o", "--family-weights", "vqa=1"], "unknown families"),
    (["teacher", "train", "tiny-gpt", "--out", "{tmp}/o"], "unknown embedded model"),
    (["teacher", "build", "tiny-llava", "tiny-gpt"], "unknown embedded model 'tiny-gpt'"),
    (["teacher", "build"], "name at least one teacher, or --experiment SPEC"),
    (["prune", "no-such-model", "--method", "layer-bi", "--ratio", "0.3", "--out", "{tmp}/o"], "unknown model"),
    (["eval", "no-such-model", "--tasks", "synth", "--data", "{tmp}/nodata", "--out", "{tmp}/o/e.json"],
     "benchmark data missing"),
    (["eval", "no-such-model", "--tasks", "synth_gqq", "--out", "{tmp}/o/e.json"], "synth_gqa"),
])
def test_bad_input_is_one_line_and_exit_2(argv, match, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "o").exists()


def test_eval_of_an_unknown_model(tiny_world, tmp_path, capsys):
    argv = ["eval", "no-such-model", "--tasks", "synth", "--data", str(tiny_world), "--out", str(tmp_path / "o/e.json")]
    assert main(argv) == 2
    assert "unknown model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_teacher_build_leaves_committed_teachers_alone(capsys):
    """What `make teachers` runs: the embedded teachers of the experiment, here the default one's."""
    from harness.paths import REPO_ROOT

    assert main(["teacher", "build", "--experiment", str(REPO_ROOT / "experiments" / "default.yaml")]) == 0
    assert capsys.readouterr().out.splitlines() == ["teacher tiny-llava: present", "teacher tiny-bunny: present"]


def test_a_teacher_committed_as_parts_says_how_to_assemble_it(tmp_path, monkeypatch):
    from harness.errors import HarnessError
    from harness.models import loading

    (tmp_path / "smol-llava" / "parts").mkdir(parents=True)
    monkeypatch.setattr(loading, "TEACHERS_DIR", tmp_path)
    with pytest.raises(HarnessError, match=r"teacher smol-llava is committed as parts and not assembled yet: `make "
                                           r"teachers` \(or `harness teacher build smol-llava`\) assembles it"):
        loading.resolve("smol-llava")
