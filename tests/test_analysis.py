"""Tests of the analysis package on a small hand-built grid whose answers are worked out by hand."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis import AnalysisError, load_results
from analysis.__main__ import main
from analysis.figures import make_figures
from analysis.findings import check_findings
from analysis.report import log_to_wandb, write_report
from analysis.tables import AVG, decision_table, table_a, table_b, to_latex, to_markdown

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("zero_shot", "recovery_bars", "data_fraction", "radar", "decision")
TEACHER_SCORES = {
    "tiny-llava": {"synth_gqa": 50.0, "synth_pope": 80.0, "synth_mme": 1000.0},
    "tiny-bunny": {"synth_gqa": 40.0, "synth_pope": 60.0, "synth_mme": 800.0},
}
LLAVA, BUNNY, LAYER, WIDTH = "tiny-llava", "tiny-bunny", "layer-bi", "width-taylor"

# (teacher, method, ratio, recovery, data_fraction, seed) -> retained % of gqa, pope, mme.
# A single number means the same retained % on all three benchmarks.
GRID = {
    # zero-shot: width >= layer in 3 of 4 (teacher, ratio) pairs
    (LLAVA, LAYER, 0.15, "none", 0.0, 0): (70, 80, 90),        # AVG 80
    (LLAVA, LAYER, 0.15, "none", 0.0, 1): (72, 82, 92),        # AVG 82 -> mean 81
    (LLAVA, WIDTH, 0.15, "none", 0.0, 0): 90,
    (LLAVA, LAYER, 0.45, "none", 0.0, 0): (50, 60, 70),        # AVG 60
    (LLAVA, WIDTH, 0.45, "none", 0.0, 0): (60, 70, 80),        # AVG 70
    (BUNNY, LAYER, 0.15, "none", 0.0, 0): 85,
    (BUNNY, WIDTH, 0.15, "none", 0.0, 0): 80,
    (BUNNY, LAYER, 0.45, "none", 0.0, 0): (40, 50, 60),        # AVG 50
    (BUNNY, WIDTH, 0.45, "none", 0.0, 0): 55,
    # recovered
    (LLAVA, LAYER, 0.15, "proj-sft", 0.05, 0): 93,
    (LLAVA, LAYER, 0.15, "proj-sft", 1.0, 0): 95,
    (LLAVA, LAYER, 0.15, "sft+kd-hidden", 0.05, 0): 96,
    (LLAVA, LAYER, 0.15, "sft+kd-hidden", 0.05, 1): 98,        # mean 97
    (LLAVA, LAYER, 0.15, "sft+kd-hidden", 1.0, 0): 99,
    (LLAVA, LAYER, 0.15, "kd-logit", 1.0, 0): 98,
    (LLAVA, WIDTH, 0.15, "proj-sft", 1.0, 0): 90,
    (LLAVA, WIDTH, 0.15, "sft+kd-hidden", 0.05, 0): 94,
    (LLAVA, WIDTH, 0.15, "sft+kd-hidden", 1.0, 0): 96,
    (LLAVA, WIDTH, 0.15, "kd-logit", 1.0, 0): 97,
    (LLAVA, LAYER, 0.45, "sft+kd-hidden", 0.05, 0): 80,
    (LLAVA, LAYER, 0.45, "sft+kd-hidden", 1.0, 0): 85,
    (LLAVA, LAYER, 0.45, "kd-logit", 1.0, 0): 88,
    (LLAVA, WIDTH, 0.45, "sft+kd-hidden", 0.05, 0): 86,
    (LLAVA, WIDTH, 0.45, "sft+kd-hidden", 1.0, 0): 90,
    (BUNNY, LAYER, 0.15, "sft+kd-hidden", 1.0, 0): 96,
    (BUNNY, WIDTH, 0.15, "sft+kd-hidden", 1.0, 0): 92,
    (BUNNY, LAYER, 0.45, "sft+kd-hidden", 1.0, 0): 75,
    (BUNNY, WIDTH, 0.45, "sft+kd-hidden", 1.0, 0): 82,
}


def _rows(key, retained):
    teacher, method, ratio, recovery, fraction, seed = key
    values = retained if isinstance(retained, tuple) else (retained,) * 3
    cell = f"{teacher}-{method}-{ratio}-{recovery}-{fraction}-s{seed}"
    base = dict(experiment="fixture", cell=cell, teacher=teacher, method=method, ratio=ratio,
                ratio_achieved=ratio - 0.01, recovery=recovery, data_fraction=fraction, seed=seed)
    for (bench, teacher_score), kept in zip(TEACHER_SCORES[teacher].items(), values, strict=True):
        score = kept * teacher_score / 100
        yield dict(base, benchmark=bench, metric="main", primary=True, score=score,
                   teacher_score=teacher_score, retained=kept)
    # a non-primary metric with a wild value must not enter AVG-%
    yield dict(base, benchmark="synth_pope", metric="acc", primary=False, score=1.0,
               teacher_score=100.0, retained=1.0)


@pytest.fixture(scope="module")
def grid() -> pd.DataFrame:
    return pd.DataFrame([row for key, kept in GRID.items() for row in _rows(key, kept)])


@pytest.fixture
def results_dir(tmp_path, grid) -> Path:
    folder = tmp_path / "results" / "fixture"
    folder.mkdir(parents=True)
    grid.to_csv(folder / "cells.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def report(tmp_path_factory, grid) -> Path:
    """One full report shared by the tests that read it: drawing figures is the slow part."""
    folder = tmp_path_factory.mktemp("results") / "fixture"
    folder.mkdir()
    grid.to_csv(folder / "cells.csv", index=False)
    return write_report(folder)


def _avg(table, teacher, method, ratio):
    row = table[(table["teacher"] == teacher) & (table["method"] == method)
                & (table["ratio"] == ratio)]
    assert len(row) == 1
    return row.iloc[0]


def test_table_a_matches_hand_computed_avg(grid):
    table = table_a(grid)
    assert list(table.columns[-5:]) == ["synth_gqa", "synth_pope", "synth_mme", AVG, "seeds"]
    assert len(table) == 2 + 8  # a teacher row per teacher plus 8 zero-shot cells
    row = _avg(table, LLAVA, LAYER, 0.15)
    assert row[AVG] == pytest.approx(81.0)
    assert row["seeds"] == 2
    assert row["synth_gqa"] == pytest.approx((35.0 + 36.0) / 2)
    assert _avg(table, BUNNY, LAYER, 0.45)[AVG] == pytest.approx(50.0)
    teacher = _avg(table, BUNNY, "teacher (unpruned)", 0.0)
    assert teacher[AVG] == 100.0
    assert teacher["synth_mme"] == 800.0
    assert table.iloc[0]["method"] == "teacher (unpruned)"


def test_table_b_picks_best_recovery_and_fraction(grid):
    table = table_b(grid)
    best = _avg(table, LLAVA, LAYER, 0.15)
    assert (best["recovery"], best["data_fraction"], best[AVG]) == ("sft+kd-hidden", 1.0, 99.0)
    best = _avg(table, LLAVA, LAYER, 0.45)
    assert (best["recovery"], best[AVG]) == ("kd-logit", 88.0)
    assert _avg(table, LLAVA, WIDTH, 0.15)["recovery"] == "kd-logit"
    assert _avg(table, BUNNY, WIDTH, 0.45)[AVG] == pytest.approx(82.0)


def test_table_writers_escape_and_format(grid):
    markdown = to_markdown(table_a(grid)).splitlines()
    assert markdown[0].startswith("| teacher") and "AVG-%" in markdown[0]
    assert any("layer-bi" in line and "81.00" in line for line in markdown)
    latex = to_latex(table_a(grid))
    assert r"synth\_gqa" in latex and "81.00" in latex


def test_decision_table_uses_budgets(grid):
    decisions = decision_table(grid).set_index(["teacher", "ratio", "budget"])
    assert decisions.loc[(LLAVA, 0.15, 0.0), "method"] == WIDTH  # zero-shot: width 90 > 81
    assert decisions.loc[(LLAVA, 0.15, 0.05), AVG] == pytest.approx(97.0)
    assert decisions.loc[(LLAVA, 0.15, 1.0), "recovery"] == "sft+kd-hidden"
    assert decisions.loc[(BUNNY, 0.45, 0.05), "recovery"] == "none"  # bunny has no 5% cells


def test_findings_verdicts(grid):
    findings = check_findings(grid)
    findings.index = findings["finding"].str[0]
    verdicts = findings["verdict"].to_dict()
    # 1: width >= layer in 3/4 pairs. 2: proj-sft 95/99 ok, 90/97 not -> 1/2.
    # 3: at fraction 1.0 sft+kd-hidden best (99), within 1 of 97, 3 behind 88 -> 2/3.
    # 4: best at 5%: 97, 94, 80, 86 -> 1/4.  5: layer 99>97, 96>92; width 90>88, 82>75.
    assert verdicts == {"1": "holds", "2": "fails", "3": "holds", "4": "fails", "5": "holds"}
    assert "3/4" in findings.loc["1", "evidence"]
    # two seeds (80, 82): mean 81, sd sqrt(2), t(1) = 12.706 -> half-width 12.706
    assert "81.0 ± 12.7 (95% CI, n=2)" in findings.loc["1", "evidence"]
    assert "1/2" in findings.loc["2", "evidence"] and "2/3" in findings.loc["3", "evidence"]
    assert "97.0 ± 12.7 (95% CI, n=2)" in findings.loc["4", "evidence"]


def test_findings_untestable_without_recovery(grid):
    findings = check_findings(grid[grid["recovery"] == "none"])
    assert list(findings["verdict"]) == ["holds"] + ["untestable"] * 4
    assert all(findings["evidence"].str.len() > 20)


def test_every_figure_written(report):
    for name in FIGURES:
        for ext in ("png", "pdf"):
            assert (report.parent / "figures" / f"{name}.{ext}").stat().st_size > 0


def test_figures_skip_absent_data(grid, tmp_path, caplog):
    caplog.set_level("INFO", logger="analysis.figures")
    two_benchmarks = grid[(grid["recovery"] == "none") & (grid["benchmark"] != "synth_mme")]
    figures = make_figures(two_benchmarks, tmp_path)
    assert set(figures) == {"zero_shot", "decision"}
    assert "skipping figure radar" in caplog.text


def test_missing_column_raises(grid, tmp_path):
    path = tmp_path / "cells.csv"
    grid.drop(columns=["teacher_score"]).to_csv(path, index=False)
    with pytest.raises(AnalysisError, match=r"cells\.csv lacks required column\(s\): teacher_score"):
        load_results(tmp_path)


def test_no_primary_metric_raises(grid, tmp_path):
    grid.assign(primary=False).to_csv(tmp_path / "cells.csv", index=False)
    with pytest.raises(AnalysisError, match="no primary metric rows"):
        load_results(tmp_path / "cells.csv")


def test_load_prefers_parquet_and_parses_csv_booleans(grid, results_dir):
    df = load_results(results_dir)
    assert df["primary"].dtype == bool and len(df) == len(grid)
    grid.head(4).to_parquet(results_dir / "cells.parquet")
    assert len(load_results(results_dir)) == 4


def test_write_report_links_everything(report):
    text = report.read_text()
    assert report.name == "report.md" and report.parent.name == "fixture"
    for name in FIGURES:
        assert f"(figures/{name}.png)" in text
    assert "## Table A" in text and "## Table B" in text and "AVG-% is our definition" in text
    assert (report.parent / "tables" / "table_b.tex").stat().st_size > 0
    assert (report.parent / "findings.csv").stat().st_size > 0
    assert "fails" in text and "untestable" not in text


def test_log_to_wandb_disabled_mode(report, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert log_to_wandb(report.parent, wandb_dir=tmp_path / "wandb") == "fixture-analysis"


def test_cli_writes_reports_for_default_dirs(grid, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "results" / "zero-shot"
    folder.mkdir(parents=True)
    grid[(grid["recovery"] == "none") & (grid["benchmark"] != "synth_mme")].to_csv(
        folder / "cells.csv", index=False)  # few figures, to stay fast
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    assert (folder / "report.md").is_file() and (folder / "figures" / "zero_shot.png").is_file()
    assert "holds" in capsys.readouterr().out


def test_cli_bad_dir_exits_2(tmp_path):
    missing = tmp_path / "nope"
    done = subprocess.run([sys.executable, "-m", "analysis", str(missing)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and str(missing) in done.stderr
    assert not missing.exists()
