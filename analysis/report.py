"""The per-experiment report (report.md with tables, figures and findings) and its W&B upload.

Layout written next to the results (or in ``out_dir``)::

    report.md  findings.csv  tables/table_{a,b}.{md,tex,csv}  figures/<name>.{png,pdf}
"""

import os
import re
from pathlib import Path

import pandas as pd

from analysis import find_results_file, load_items, load_results
from analysis.figures import make_figures
from analysis.findings import FINDINGS, check_findings
from analysis.findings import __doc__ as FINDINGS_DOC
from analysis.tables import AVG_DEFINITION, benchmarks, to_markdown, write_tables
from analysis.uncertainty import __doc__ as UNCERTAINTY_DOC

REPORT_NAME = "report.md"
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


def analysis_run_id(experiment: str) -> str:
    """The fixed W&B run id of an experiment's analysis run: rerunning replaces that run."""
    return "analysis-" + re.sub(r"[^A-Za-z0-9_-]", "-", str(experiment))[:55]


def log_to_wandb(results_dir, out_dir=None, wandb_dir=None) -> str:
    """Log the experiment's analysis run (job type `analysis`) and the report as its artifact.

    The run, in the experiment's W&B group, holds the cells (`cells`, one row per cell,
    benchmark and metric as in cells.csv; `configurations`, one row per configuration with
    its AVG-%), Tables A and B, every figure of the report as an image (`figures/NAME`) and the
    findings (`findings`, and each verdict as `verdict/NAME` in the summary); its config
    lists the grid's axes. Its id is fixed per experiment (`analysis_run_id`) and earlier
    offline copies are removed, so rerunning replaces the run instead of adding one.
    The mode comes from WANDB_MODE (default 'offline'); runs go to ``wandb_dir`` (default
    ``$HARNESS_ARTIFACTS/wandb``, where the grid's stage runs are). The report (in
    ``out_dir``, as for write_report) is written first if it does not exist yet. Returns the
    artifact name.
    """
    import wandb  # imported lazily: slow, and only needed when logging

    from analysis.tables import cell_summary, table_a, table_b
    from harness.tracking import model_name, portable, remove_earlier_offline_runs, start_run
    from harness.tracking import wandb_dir as run_folder

    experiment = experiment_dir(results_dir).name
    out = Path(out_dir) if out_dir is not None else experiment_dir(results_dir)
    if not (out / REPORT_NAME).exists():
        write_report(results_dir, out)
    df = load_results(results_dir)
    names = {t: model_name(t) for t in pd.unique(df["teacher"])}
    renamed = {path: name for path, name in names.items() if path != name}
    run_dir = run_folder(wandb_dir)

    def table(frame: pd.DataFrame):
        frame = frame.astype(object).where(frame.notna(), None)
        for col in frame.columns:  # teachers by name, not by this machine's path
            for path, name in renamed.items():
                frame[col] = frame[col].map(lambda v, p=path, n=name: v.replace(p, n) if isinstance(v, str) else v)
        return wandb.Table(dataframe=frame)

    axes = {"teacher": sorted(names.values())}
    for axis in ("method", "ratio", "recovery", "data_fraction", "seed"):
        axes[axis] = sorted(pd.unique(df[axis]).tolist())
    config = {"experiment": experiment, "stage": "analysis", "cells": int(df["cell"].nunique()),
              "benchmarks": list(pd.unique(df.loc[df["primary"], "benchmark"])), **axes,
              "source": portable(str(find_results_file(results_dir).absolute()))}
    run = start_run(
        project=os.environ.get("WANDB_PROJECT", "mllm-compression"),  # the project the stages log to
        group=experiment, job_type="analysis", name=f"{experiment}: analysis", id=analysis_run_id(experiment),
        resume="allow", config=config, tags=[f"experiment:{experiment}", "stage:analysis"], dir=run_dir,
        reinit="finish_previous",
    )
    findings = pd.read_csv(out / "findings.csv")
    with run:
        logged = {"cells": table(df), "configurations": table(cell_summary(df)),
                  "findings": table(findings[["finding", "verdict", "counts", "evidence"]])}
        for name, frame in (("table_a", table_a(df)), ("table_b", table_b(df))):
            if not frame.empty:
                logged[name] = table(frame)
        drawn = re.findall(r"\]\(figures/([\w-]+)\.png\)", (out / REPORT_NAME).read_text())
        for name in drawn:
            if (out / "figures" / f"{name}.png").is_file():
                logged[f"figures/{name}"] = wandb.Image(str(out / "figures" / f"{name}.png"),
                                                        caption=FIGURE_CAPTIONS.get(name))
        run.log(logged)
        run.summary.update({f"verdict/{_slug(f)}": v for f, v in zip(findings["finding"], findings["verdict"])})
        artifact = wandb.Artifact(f"{experiment}-analysis", type="analysis")
        artifact.add_file(str(out / REPORT_NAME))
        artifact.add_file(str(out / "findings.csv"))
        for folder in ("tables", "figures"):
            if (out / folder).is_dir():
                artifact.add_dir(str(out / folder), name=folder)
        run.log_artifact(artifact)
    remove_earlier_offline_runs(run)
    return artifact.name


def _slug(text: str) -> str:
    """`1. Without recovery, widthwise ...` -> `1_Without_recovery_widthwise_...` (a W&B key filters well)."""
    return re.sub(r"[^0-9A-Za-z]+", "_", str(text)).strip("_")
