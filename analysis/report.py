"""The per-experiment report (report.md with tables, figures and findings) and its W&B upload.

Layout written next to the results (or in ``out_dir``)::

    report.md  findings.csv  tables/table_{a,b}.{md,tex,csv}  figures/<name>.{png,pdf}
"""

import os
from pathlib import Path

import pandas as pd

from analysis import find_results_file, load_items, load_results
from analysis.figures import make_figures
from analysis.findings import FINDINGS, check_findings
from analysis.findings import __doc__ as FINDINGS_DOC
from analysis.tables import AVG_DEFINITION, benchmarks, to_markdown, write_tables
from analysis.uncertainty import __doc__ as UNCERTAINTY_DOC

REPORT_NAME = "report.md"
WANDB_DIR = Path(__file__).resolve().parents[1] / "artifacts" / "wandb"
FIGURE_CAPTIONS = {
    "zero_shot": "AVG-% vs achieved pruning ratio (share of LM parameters removed) without "
                 "recovery, per pruning method; labels give the requested ratio.",
    "recovery_bars": "Recovery methods compared at each requested ratio, achieved ratio in brackets "
                     "(best method of the family, largest data fraction).",
    "data_fraction": "AVG-% vs fraction of the recovery data, per recovery; dotted: no recovery. "
                     "Titles give requested and achieved ratio.",
    "radar": "Retained % per benchmark at each requested ratio (largest data fraction per recovery); "
             "titles give each method's achieved ratio.",
    "decision": "Best (method, recovery) per requested ratio and data budget, with the achieved "
                "ratio of the chosen method; a budget admits every cell using at most that much data.",
}


def experiment_dir(results_path) -> Path:
    """The experiment folder of a results folder or of a cells file inside it."""
    path = Path(results_path)
    return path if path.is_dir() else path.parent


def write_report(results_dir, out_dir=None) -> Path:
    """Write report.md (plus tables, figures, findings.csv) and return its path.

    ``out_dir`` defaults to the experiment folder, so the report sits beside its cells.
    """
    df = load_results(results_dir)
    source = find_results_file(results_dir)
    items = load_items(source)
    out = Path(out_dir) if out_dir is not None else experiment_dir(results_dir)
    tables = write_tables(df, out / "tables")
    figures = make_figures(df, out / "figures")
    findings = check_findings(df, items)
    findings.to_csv(out / "findings.csv", index=False)
    path = out / REPORT_NAME
    path.write_text(_render(df, source, tables, figures, findings, out))
    return path


def _render(df, source: Path, tables, figures, findings, out: Path) -> str:
    experiment = ", ".join(map(str, pd.unique(df["experiment"])))
    lines = [
        f"# Analysis of experiment {experiment}",
        "",
        f"Source: `{source}`, {df['cell'].nunique()} cells, teachers "
        f"{', '.join(sorted(map(str, df['teacher'].unique())))}, benchmarks "
        f"{', '.join(benchmarks(df))}.",
        "",
        "## AVG-%",
        "",
        AVG_DEFINITION,
        "",
        "## Table A: zero-shot (no recovery)",
        "",
        _table_text(tables["table_a"], "No cells without recovery."),
        "",
        "## Table B: best recovery per method and ratio",
        "",
        _table_text(tables["table_b"], "No recovered cells."),
        "",
        "LaTeX versions: `tables/table_a.tex`, `tables/table_b.tex`.",
        "",
        "## Figures",
        "",
    ]
    for name, png in figures.items():
        rel = png.relative_to(out).as_posix()
        lines += [f"![{name}]({rel})", "", f"*{FIGURE_CAPTIONS[name]}* PDF: `{rel[:-4]}.pdf`", ""]
    missing = sorted(set(FIGURE_CAPTIONS) - set(figures))
    if missing:
        lines += [f"Not drawn for lack of data: {', '.join(missing)}.", ""]
    lines += ["## Findings", "", _verdict_table(findings), "", "Rules used:", ""]
    lines += [f"- {f.name}: {f.rule}." for f in FINDINGS]
    lines += ["", "How comparisons and verdicts are decided (`analysis/findings.py`, "
              "`analysis/uncertainty.py`):", "", _docstring_body(FINDINGS_DOC), "",
              _docstring_body(UNCERTAINTY_DOC), "", f"Intervals here: {findings['intervals'].iloc[0]}.",
              "", "### Evidence", ""]
    lines += [f"- **{row.finding}** ({row.verdict}): {row.evidence}" for row in findings.itertuples()]
    return "\n".join(lines) + "\n"


def _verdict_table(findings: pd.DataFrame) -> str:
    """Verdicts with the counts behind them; the long evidence follows as a list."""
    return to_markdown(findings[["finding", "verdict", "counts"]])


def _docstring_body(doc: str) -> str:
    """A module docstring without its title line, for the report."""
    return "\n".join(doc.strip().splitlines()[2:])


def _table_text(table: pd.DataFrame, empty: str) -> str:
    return empty if table.empty else to_markdown(table)


def log_to_wandb(results_dir, out_dir=None, wandb_dir=None) -> str:
    """Log the report's tables and figures as a W&B artifact in the experiment's group.

    The mode comes from WANDB_MODE (default 'offline', as runs have no network);
    the report (in ``out_dir``, as for write_report) is written first if it does
    not exist yet. Returns the artifact name.
    """
    import wandb  # imported lazily: slow, and only needed when logging

    experiment = experiment_dir(results_dir).name
    out = Path(out_dir) if out_dir is not None else experiment_dir(results_dir)
    if not (out / REPORT_NAME).exists():
        write_report(results_dir, out)
    wandb_dir = Path(wandb_dir) if wandb_dir is not None else WANDB_DIR
    wandb_dir.mkdir(parents=True, exist_ok=True)
    from harness.tracking import start_run  # offline unless online is asked for and usable

    run = start_run(
        project=os.environ.get("WANDB_PROJECT", "mllm-compression"),  # the project the stages log to
        group=experiment, job_type="analysis", name=f"{experiment}-analysis", dir=str(wandb_dir),
    )
    with run:
        for name in ("table_a", "table_b"):
            table = pd.read_csv(out / "tables" / f"{name}.csv")
            run.log({name: wandb.Table(dataframe=table.astype(str))})
        run.log({"findings": wandb.Table(dataframe=pd.read_csv(out / "findings.csv"))})
        artifact = wandb.Artifact(f"{experiment}-analysis", type="analysis")
        artifact.add_file(str(out / REPORT_NAME))
        artifact.add_file(str(out / "findings.csv"))
        for folder in ("tables", "figures"):
            if (out / folder).is_dir():
                artifact.add_dir(str(out / folder), name=folder)
        run.log_artifact(artifact)
    return artifact.name
