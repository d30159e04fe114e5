"""Figures of the study, each saved as PNG (linked from the report) and PDF (for papers).

Figures are drawn with matplotlib's object-oriented API on an Agg canvas, so
no display and no pyplot global state are involved. Each plot function returns
the PNG path it wrote, or None after logging one line on why it was skipped:
partial grids are normal while experiments are still running.
"""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.tables import AVG, CONFIG, best_rows, cell_summary, decision_table, largest_fraction

log = logging.getLogger(__name__)
RECOVERY_ORDER = (
    "none", "proj-sft", "lora-sft", "full-sft", "kd-logit", "kd-hidden",
    "sft+kd-logit", "sft+kd-hidden", "sft+kd-logit+hidden",
)


def _figure(nrows: int, ncols: int, panel=(4.0, 3.2), **subplot_kw):
    """A Figure on an Agg canvas with a grid of panels."""
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, subplot_kw=subplot_kw or None)
    return fig, axes


def _save(fig: Figure, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf"):
        fig.savefig(out_dir / f"{name}.{ext}", dpi=150)
    return out_dir / f"{name}.png"


def _skip(name: str, reason: str) -> None:
    log.info("skipping figure %s: %s", name, reason)


def _recoveries(values) -> list[str]:
    """Recoveries in a fixed, meaningful order, unknown names last."""
    known = [r for r in RECOVERY_ORDER if r in set(values)]
    return known + sorted(set(values) - set(known))


def _figure_legend(fig: Figure, axes) -> None:
    """One legend for the whole figure, so panels stay uncluttered."""
    handles = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside lower center",
                   ncol=min(4, len(handles)), fontsize="small")


ACHIEVED_LABEL = "achieved ratio (share of LM params removed)"


def _achieved(cells: pd.DataFrame) -> pd.Series:
    """Achieved ratio of each row; the requested one where none was recorded."""
    return cells["ratio_achieved"].fillna(cells["ratio"])


def _achieved_text(cells: pd.DataFrame) -> str:
    """'0.164' or '0.149/0.164' when the rows removed different shares."""
    return "/".join(f"{a:.3f}" for a in sorted(set(_achieved(cells).round(3))))


def plot_zero_shot(summary: pd.DataFrame, out_dir: Path) -> Path | None:
    """(a) AVG-% vs achieved ratio per pruning method without recovery, one panel per teacher.

    The x axis is what was removed, not what was asked for: layer and width methods
    remove different shares at one requested ratio. Points are labelled with the request.
    """
    cells = summary[summary["recovery"] == "none"]
    if cells.empty:
        return _skip("zero_shot", "no cells without recovery")
    teachers = sorted(cells["teacher"].unique())
    colors = _colors(sorted(cells["method"].unique()))
    fig, axes = _figure(1, len(teachers))
    for ax, teacher in zip(axes[0], teachers, strict=True):
        for method, g in cells[cells["teacher"] == teacher].groupby("method"):
            g = g.assign(x=_achieved(g)).sort_values("x")
            ax.errorbar(g["x"], g[AVG], yerr=g["ci95"].fillna(0).to_numpy(),
                        marker="o", capsize=3, color=colors[method], label=method)
            for x, y, requested in zip(g["x"], g[AVG], g["ratio"], strict=True):
                ax.annotate(f"{requested:g}", (x, y), textcoords="offset points", xytext=(3, 3),
                            fontsize="x-small", color=colors[method])
        ax.axhline(100, color="grey", ls="--", lw=0.8)
        ax.set(title=teacher, xlabel=ACHIEVED_LABEL, ylabel=AVG)
    _figure_legend(fig, axes)
    return _save(fig, out_dir, "zero_shot")


def plot_recovery_bars(summary: pd.DataFrame, out_dir: Path) -> Path | None:
    """(b) Recoveries side by side at each ratio, one panel per teacher and method family.

    Each bar is the family's best method at that recovery's largest data fraction.
    """
    if (summary["recovery"] == "none").all():
        return _skip("recovery_bars", "no recovered cells")
    cells = best_rows(largest_fraction(summary), ["teacher", "family", "ratio", "recovery"])
    teachers, families = sorted(cells["teacher"].unique()), sorted(cells["family"].unique())
    colors = _colors(_recoveries(cells["recovery"]))
    fig, axes = _figure(len(teachers), len(families), panel=(5.0, 3.2))
    for row, teacher in enumerate(teachers):
        for col, fam in enumerate(families):
            panel = cells[(cells["teacher"] == teacher) & (cells["family"] == fam)]
            _recovery_panel(axes[row][col], panel, colors)
            axes[row][col].set_title(f"{teacher}, {fam}-wise")
    _figure_legend(fig, axes)
    return _save(fig, out_dir, "recovery_bars")


def _recovery_panel(ax, cells: pd.DataFrame, colors: dict) -> None:
    if cells.empty:
        ax.set_axis_off()
        return
    table = cells.pivot(index="ratio", columns="recovery", values=AVG)
    recoveries = _recoveries(table.columns)
    x, width = np.arange(len(table)), 0.8 / len(recoveries)
    for i, recovery in enumerate(recoveries):
        ax.bar(x + (i - (len(recoveries) - 1) / 2) * width, table[recovery], width,
               color=colors[recovery], label=recovery)
    achieved = [_achieved_text(cells[np.isclose(cells["ratio"], r)]) for r in table.index]
    ax.set_xticks(x, [f"{r:g}\n({a})" for r, a in zip(table.index, achieved, strict=True)])
    ax.axhline(100, color="grey", ls="--", lw=0.8)
    ax.set(xlabel="requested pruning ratio (achieved)", ylabel=AVG)


def plot_data_fraction(summary: pd.DataFrame, out_dir: Path) -> Path | None:
    """(c) AVG-% vs data fraction per recovery; rows teacher x method, columns ratio."""
    recovered = summary[summary["recovery"] != "none"]
    if recovered.empty:
        return _skip("data_fraction", "no recovered cells")
    rows = sorted(recovered[["teacher", "method"]].drop_duplicates().itertuples(index=False))
    ratios = sorted(recovered["ratio"].unique())
    colors = _colors(_recoveries(recovered["recovery"]))
    fig, axes = _figure(len(rows), len(ratios))
    for i, (teacher, method) in enumerate(rows):
        for j, ratio in enumerate(ratios):
            key = (summary["teacher"] == teacher) & (summary["method"] == method) \
                & np.isclose(summary["ratio"], ratio)
            _fraction_panel(axes[i][j], summary[key], colors)
            achieved = f" (achieved {_achieved_text(summary[key])})" if key.any() else ""
            axes[i][j].set_title(f"{teacher}, {method} @ {ratio:g}{achieved}", fontsize="medium")
    _figure_legend(fig, axes)
    return _save(fig, out_dir, "data_fraction")


def _fraction_panel(ax, cells: pd.DataFrame, colors: dict) -> None:
    recovered = cells[cells["recovery"] != "none"]
    if recovered.empty:
        ax.set_axis_off()
        return
    for recovery in _recoveries(recovered["recovery"]):
        g = recovered[recovered["recovery"] == recovery].sort_values("data_fraction")
        ax.errorbar(g["data_fraction"], g[AVG], yerr=g["ci95"].fillna(0).to_numpy(),
                    marker="o", capsize=3, color=colors[recovery], label=recovery)
    for avg in cells.loc[cells["recovery"] == "none", AVG]:
        ax.axhline(avg, color="black", ls=":", lw=1, label="none")
    fractions = sorted(recovered["data_fraction"].unique())
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(fractions, [f"{100 * f:g}%" for f in fractions])
    ax.set(xlabel="data fraction", ylabel=AVG)


def plot_radar(df: pd.DataFrame, summary: pd.DataFrame, out_dir: Path) -> Path | None:
    """(d) Radar per teacher and ratio, like the paper's Figure 1: retained % per benchmark,
    one polygon per method/recovery at its largest data fraction."""
    primary = df[df["primary"]]
    names = list(pd.unique(primary["benchmark"]))
    if len(names) < 3:
        return _skip("radar", f"a radar needs >= 3 benchmarks, have {len(names)}")
    retained = primary.pivot_table(index=CONFIG, columns="benchmark", values="retained",
                                   aggfunc="mean")
    cells = largest_fraction(summary)[CONFIG].merge(retained, left_on=CONFIG, right_index=True)
    teachers, ratios = sorted(cells["teacher"].unique()), sorted(cells["ratio"].unique())
    labels = sorted({f"{m} / {r}" for m, r in zip(cells["method"], cells["recovery"], strict=True)})
    colors = _colors(labels)
    angles = np.linspace(0, 2 * np.pi, len(names), endpoint=False)
    closed = np.append(angles, angles[0])
    fig, axes = _figure(len(teachers), len(ratios), panel=(3.6, 3.6), projection="polar")
    top = max(100.0, float(np.nanmax(cells[names].to_numpy())))
    for i, teacher in enumerate(teachers):
        for j, ratio in enumerate(ratios):
            ax = axes[i][j]
            panel = cells[(cells["teacher"] == teacher) & np.isclose(cells["ratio"], ratio)]
            for _, row in panel.iterrows():
                label = f"{row['method']} / {row['recovery']}"
                values = np.append(row[names].to_numpy(float), row[names].iloc[0])
                ax.plot(closed, values, color=colors[label], lw=1.2, label=label)
                ax.fill(closed, values, color=colors[label], alpha=0.05)
            ax.set_xticks(angles, names, fontsize="x-small")
            ax.set_ylim(0, top)
            ax.set_rlabel_position(90 / len(names))
            ax.tick_params(axis="y", labelsize="x-small")
            achieved = ", ".join(f"{m} {_achieved_text(g)}" for m, g in
                                 summary[(summary["teacher"] == teacher)
                                         & np.isclose(summary["ratio"], ratio)].groupby("method"))
            ax.set_title(f"{teacher}, ratio {ratio:g}\nachieved: {achieved}", fontsize="small")
    _figure_legend(fig, axes)
    return _save(fig, out_dir, "radar")


def _colors(labels) -> dict:
    """One fixed colour per label for the whole figure (distinct for up to 20 labels),
    so a method or recovery looks the same in every panel."""
    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def budget_label(budget: float) -> str:
    return "no recovery" if budget == 0 else f"{100 * budget:g}% data"


def plot_decision(df: pd.DataFrame, out_dir: Path) -> Path | None:
    """(e) Decision chart: per ratio (x) and data budget (y), the best (method, recovery),
    annotated with its AVG-%, one panel per teacher (see tables.decision_table)."""
    decisions = decision_table(df)
    if decisions.empty:
        return _skip("decision", "no cells with an AVG-%")
    teachers = sorted(decisions["teacher"].unique())
    ratios, budgets = sorted(decisions["ratio"].unique()), sorted(decisions["budget"].unique())
    low = float(decisions[AVG].min())
    fig, axes = _figure(1, len(teachers), panel=(1.9 * len(ratios) + 1.5, 1.0 * len(budgets) + 1.2))
    for ax, teacher in zip(axes[0], teachers, strict=True):
        grid = decisions[decisions["teacher"] == teacher].pivot(
            index="budget", columns="ratio", values=AVG).reindex(index=budgets, columns=ratios)
        image = ax.imshow(grid.to_numpy(float), cmap="RdYlGn", vmin=min(low, 99.0), vmax=100,
                          origin="lower", aspect="auto")
        for _, d in decisions[decisions["teacher"] == teacher].iterrows():
            ax.text(ratios.index(d["ratio"]), budgets.index(d["budget"]), _decision_text(d),
                    ha="center", va="center", fontsize=6.5)
        ax.set_xticks(range(len(ratios)), [f"{r:g}" for r in ratios])
        ax.set_yticks(range(len(budgets)), [budget_label(b) for b in budgets])
        ax.set(title=teacher, xlabel="requested pruning ratio (achieved one beside each method)")
    fig.colorbar(image, ax=axes[0].tolist(), label=AVG, shrink=0.8)
    return _save(fig, out_dir, "decision")


def _decision_text(d) -> str:
    """Method (with its achieved ratio), recovery (with its fraction when below the budget) and AVG-%."""
    recovery = d["recovery"]
    if recovery != "none" and not np.isclose(d["data_fraction"], d["budget"]):
        recovery += f" ({100 * d['data_fraction']:g}%)"
    achieved = "" if pd.isna(d["ratio_achieved"]) else f" ({d['ratio_achieved']:.3f})"
    return f"{d['method']}{achieved}\n{recovery}\n{d[AVG]:.1f}"


def make_figures(df: pd.DataFrame, out_dir) -> dict[str, Path]:
    """Draw every figure the data allows; returns figure name -> PNG path (PDF beside it)."""
    out_dir = Path(out_dir)
    summary = cell_summary(df).dropna(subset=[AVG])
    drawn = {
        "zero_shot": plot_zero_shot(summary, out_dir),
        "recovery_bars": plot_recovery_bars(summary, out_dir),
        "data_fraction": plot_data_fraction(summary, out_dir),
        "radar": plot_radar(df, summary, out_dir),
        "decision": plot_decision(df, out_dir),
    }
    return {name: path for name, path in drawn.items() if path is not None}
