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
    (["teacher", "train", "tiny-gpt", "--out", "{tmp}/o"], "unknown embedded model"),
    (["prune", "no-such-model", "--method", "layer-bi", "--ratio", "0.3", "--out", "{tmp}/o"], "unknown model"),
    (["eval", "no-such-model", "--tasks", "synth", "--out", "{tmp}/o/e.json"], "unknown model"),
])
def test_bad_input_is_one_line_and_exit_2(argv, match, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "o").exists()
