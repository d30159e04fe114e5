"""Verdicts on the five findings of the paper, computed from a results table.

Each check turns one finding of /work/shared/paper/REFERENCE.md into an
operational rule (stated in RULES, shown in the report) and answers 'holds',
'fails' or 'untestable' with a sentence of evidence. A claim holds when it is
true in more than half of the comparisons the data allows. Comparisons use the
seed-mean AVG-% of tables.cell_summary; a configuration run with several seeds
is quoted with its 95% t-interval.
"""

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pandas as pd

from analysis.tables import AVG, GROUP, best_rows, cell_summary

HOLDS, FAILS, UNTESTABLE = "holds", "fails", "untestable"
EPS = 1e-9
PROJECTOR_ENOUGH = 0.95   # finding 2: share of the best recovery's AVG-% that counts as enough
NEAR_BEST = 1.0           # finding 3: AVG-% points from the best that still count as best
HEADLINE_FRACTION = 0.05  # finding 4
KEEPS = 95.0              # finding 4: AVG-% to exceed


class Verdict(NamedTuple):
    verdict: str
    evidence: str


def _fmt(row) -> str:
    """AVG-% of a configuration, with its 95% CI when several seeds exist."""
    if row["seeds"] > 1:
        return f"{row[AVG]:.1f} ± {row['ci95']:.1f} (95% CI, n={int(row['seeds'])})"
    return f"{row[AVG]:.1f}"


def _where(row, keys=GROUP) -> str:
    """Short label such as 'tiny-llava/layer-bi@0.15' for evidence sentences."""
    parts = [str(row[k]) for k in keys if k != "ratio"]
    return f"{'/'.join(parts)}@{row['ratio']:g}"


def _tally(ok: list[bool], claim: str, unit: str, details: list[str]) -> Verdict:
    """Majority verdict with the count and per-comparison numbers as evidence."""
    verdict = HOLDS if 2 * sum(ok) > len(ok) else FAILS
    return Verdict(verdict, f"{claim} in {sum(ok)}/{len(ok)} {unit}: {'; '.join(details)}.")


def _family_pairs(cells: pd.DataFrame) -> list[tuple]:
    """(teacher, ratio, best layer row, best width row) wherever both families exist."""
    best = best_rows(cells[cells["family"].isin(["layer", "width"])], ["teacher", "ratio", "family"])
    pairs = []
    for (teacher, ratio), rows in best.groupby(["teacher", "ratio"]):
        by_family = rows.set_index("family")
        if {"layer", "width"} <= set(by_family.index):
            pairs.append((teacher, ratio, by_family.loc["layer"], by_family.loc["width"]))
    return pairs


def width_beats_layer_zero_shot(summary: pd.DataFrame) -> Verdict:
    """Finding 1: without recovery, width keeps at least the AVG-% of layer at equal ratio."""
    pairs = _family_pairs(summary[summary["recovery"] == "none"])
    if not pairs:
        return Verdict(UNTESTABLE, "no (teacher, ratio) has both a layer- and a width- method "
                                   "without recovery")
    ok = [width[AVG] >= layer[AVG] for _, _, layer, width in pairs]
    details = [f"{t}@{r:g} width {_fmt(w)} vs layer {_fmt(ly)}" for t, r, ly, w in pairs]
    return _tally(ok, "width >= layer", "(teacher, ratio) pairs", details)


def projector_enough_small_ratio(summary: pd.DataFrame) -> Verdict:
    """Finding 2: at ratio < 0.20, proj-sft reaches >= 95% of the best recovery's AVG-%."""
    small = summary[(summary["ratio"] < 0.20) & (summary["recovery"] != "none")]
    ok, details = [], []
    for _, cells in small.groupby(GROUP):
        is_proj = cells["recovery"] == "proj-sft"
        if not is_proj.any() or is_proj.all():
            continue
        proj = cells.loc[cells.loc[is_proj, AVG].idxmax()]
        best = cells.loc[cells[AVG].idxmax()]
        share = proj[AVG] / best[AVG]
        ok.append(share >= PROJECTOR_ENOUGH)
        details.append(f"{_where(best)} proj-sft {_fmt(proj)} vs best {best['recovery']} "
                       f"{_fmt(best)} ({100 * share:.1f}%)")
    if not ok:
        return Verdict(UNTESTABLE, "no (teacher, method, ratio < 0.20) has proj-sft beside "
                                   "another recovery")
    return _tally(ok, "proj-sft reaches >= 95% of the best recovery's AVG-%",
                  "(teacher, method, ratio < 0.20) groups", details)


def sft_kd_hidden_best(summary: pd.DataFrame) -> Verdict:
    """Finding 3: at each group's largest data fraction, sft+kd-hidden is within 1 point of the best."""
    recovered = summary[summary["recovery"] != "none"]
    ok, details = [], []
    for _, cells in recovered.groupby(GROUP):
        top = cells[cells["data_fraction"] == cells["data_fraction"].max()]
        target = top[top["recovery"] == "sft+kd-hidden"]
        if target.empty or len(top) < 2:
            continue
        best = top.loc[top[AVG].idxmax()]
        gap = best[AVG] - target[AVG].iloc[0]
        ok.append(gap <= NEAR_BEST + EPS)
        details.append(f"{_where(best)} at fraction {best['data_fraction']:g} sft+kd-hidden "
                       f"{_fmt(target.iloc[0])} vs best {best['recovery']} {_fmt(best)}")
    if not ok:
        return Verdict(UNTESTABLE, "no (teacher, method, ratio) has sft+kd-hidden beside another "
                                   "recovery at its largest data fraction")
    return _tally(ok, "sft+kd-hidden is best or within 1 point of the best",
                  "(teacher, method, ratio) groups", details)


def five_percent_keeps_95(summary: pd.DataFrame) -> Verdict:
    """Finding 4: with 5% of the data, the best recovery keeps > 95% AVG-%."""
    at5 = summary[np.isclose(summary["data_fraction"], HEADLINE_FRACTION)
                  & (summary["recovery"] != "none")]
    if at5.empty:
        return Verdict(UNTESTABLE, "no recovered cell uses data_fraction 0.05")
    best = best_rows(at5, GROUP)
    ok = [avg > KEEPS for avg in best[AVG]]
    details = [f"{_where(row)} {row['recovery']} {_fmt(row)}" for _, row in best.iterrows()]
    return _tally(ok, "the best recovery with 5% data keeps > 95% AVG-%",
                  "(teacher, method, ratio) groups", details)


def layer_low_width_high(summary: pd.DataFrame) -> Verdict:
    """Finding 5: with recovery, layer beats width at ratio <= 0.30 and width wins at >= 0.45."""
    pairs = _family_pairs(summary[summary["recovery"] != "none"])
    low = [p for p in pairs if p[1] <= 0.30 + EPS]
    high = [p for p in pairs if p[1] >= 0.45 - EPS]
    if not low or not high:
        have = sorted({float(p[1]) for p in pairs})
        return Verdict(UNTESTABLE, "needs recovered layer- and width- cells at ratios <= 0.30 "
                                   f"and >= 0.45; paired ratios present: {have}")
    low_ok = [layer[AVG] > width[AVG] for _, _, layer, width in low]
    high_ok = [width[AVG] > layer[AVG] for _, _, layer, width in high]
    holds = 2 * sum(low_ok) > len(low_ok) and 2 * sum(high_ok) > len(high_ok)
    details = [f"{t}@{r:g} layer {_fmt(ly)} vs width {_fmt(w)}" for t, r, ly, w in low + high]
    return Verdict(HOLDS if holds else FAILS,
                   f"layer wins in {sum(low_ok)}/{len(low_ok)} pairs at ratio <= 0.30 and width "
                   f"in {sum(high_ok)}/{len(high_ok)} at ratio >= 0.45 (best recovery per "
                   f"family): {'; '.join(details)}.")


class Finding(NamedTuple):
    name: str
    rule: str
    check: Callable[[pd.DataFrame], Verdict]


FINDINGS = (
    Finding("1. Without recovery, widthwise keeps more than layerwise",
            "per teacher and ratio, the best width- method's zero-shot AVG-% >= the best "
            "layer- method's, in more than half of the pairs", width_beats_layer_zero_shot),
    Finding("2. Projector-only SFT is enough below 20% pruning",
            "at ratio < 0.20, proj-sft (best fraction) reaches >= 95% of the best recovery's "
            "AVG-% in the same (teacher, method, ratio), in more than half of the groups",
            projector_enough_small_ratio),
    Finding("3. SFT + hidden-state KD recovers best across ratios",
            "at each (teacher, method, ratio)'s largest data fraction, sft+kd-hidden is the best "
            "recovery or within 1 AVG-% point of it, in more than half of the groups",
            sft_kd_hidden_best),
    Finding("4. With 5% of the data, recovery keeps > 95%",
            "at data_fraction 0.05, the best recovery of a (teacher, method, ratio) has "
            "AVG-% > 95, in more than half of the groups", five_percent_keeps_95),
    Finding("5. With recovery, layer wins at <= 30%, width at >= 45%",
            "per teacher and ratio, best recovered layer- vs width- AVG-%: layer ahead in more "
            "than half of the pairs at ratio <= 0.30 and width ahead in more than half at "
            ">= 0.45", layer_low_width_high),
)


def check_findings(df: pd.DataFrame) -> pd.DataFrame:
    """Verdict and evidence for each finding; columns finding, verdict, evidence."""
    summary = cell_summary(df).dropna(subset=[AVG])
    rows = [{"finding": f.name, **f.check(summary)._asdict()} for f in FINDINGS]
    return pd.DataFrame(rows, columns=["finding", "verdict", "evidence"])
