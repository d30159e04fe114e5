"""How sure a comparison of AVG-% is: a paired item bootstrap and seed intervals.

With one seed and a few hundred items per benchmark, which items were drawn moves an
AVG-% by the better part of a point (issue #20 puts it at about ±0.7 at 200 items),
so a comparison decided by point estimates alone can be noise.

Item bootstrap (needs ``items.parquet``, written by the grid runner): each resample
draws, within every benchmark (and within every MME category, whose score is a sum
of category means), as many item ids as it has, with replacement. The same draw
serves every cell and every teacher, so both sides of a comparison, and the teacher
scores that divide them, see the same items (paired). Each resample recomputes every
benchmark's aggregate from its items the way lmms-eval does (mean; MME's sum of
category means; POPE's F1 from its yes/no counts, since F1 is not a per-item mean),
then retained % and AVG-% as tables.seed_scores does, and the seed mean of a
configuration. N_RESAMPLES resamples from BOOTSTRAP_SEED, 95% percentile intervals.

Seed interval: where a configuration has several seeds, the 95% t half-width of
tables.cell_summary; the half-widths of a contrast's terms add in quadrature.

A comparison is conclusive only when every interval available for it lies on one
side of its threshold; without items and with one seed there is no interval and the
point estimate decides (``Uncertainty.source`` says which applies).
"""

import logging
from typing import NamedTuple

import numpy as np
import pandas as pd

from analysis.tables import AVG, CONFIG

log = logging.getLogger(__name__)
N_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
LEVEL = 0.95
EPS = 1e-9
MATCH_TOLERANCE = 1e-6  # relative: items must reproduce the score in cells.csv to be used


class Contrast(NamedTuple):
    """A linear combination of configurations' AVG-% (plus a constant), with its intervals."""

    value: float    # point estimate, from the seed-mean AVG-% of cell_summary
    lo: float       # item-bootstrap percentile interval; NaN without items
    hi: float
    seed_hw: float  # seed t half-width; NaN unless a term has several seeds

    def sign(self) -> int:
        """+1 / -1 when every available interval (or, with none, the point) is above / below 0; else 0."""
        intervals = []
        if not np.isnan(self.lo):
            intervals.append((self.lo, self.hi))
        if not np.isnan(self.seed_hw):
            intervals.append((self.value - self.seed_hw, self.value + self.seed_hw))
        if not intervals:
            intervals = [(self.value, self.value)]
        if all(lo > EPS for lo, _ in intervals):
            return 1
        if all(hi < -EPS for _, hi in intervals):
            return -1
        return 0

    def describe(self) -> str:
        """'+1.2 [+0.3, +2.0]' (item bootstrap) and '± 0.8 seeds' where those exist."""
        text = f"{self.value:+.1f}"
        if not np.isnan(self.lo):
            text += f" [{self.lo:+.1f}, {self.hi:+.1f}]"
        if not np.isnan(self.seed_hw):
            text += f" ± {self.seed_hw:.1f} seeds"
        return text


class Uncertainty:
    """Contrasts of configurations (CONFIG tuples) with the intervals the data allow."""

    def __init__(self, summary: pd.DataFrame, df: pd.DataFrame, items: pd.DataFrame | None = None):
        self.summary = summary.set_index(CONFIG)
        self.has_items = items is not None
        self.draws, self.left_out = bootstrap_avg(df, items) if self.has_items else ({}, [])

    def contrast(self, terms: dict, offset: float = 0.0) -> Contrast:
        """sum(weight * AVG-%) + offset over ``terms`` ({config tuple: weight})."""
        rows = self.summary.loc[list(terms)]
        weights = np.array(list(terms.values()), dtype=float)
        value = float(weights @ rows[AVG].to_numpy(float)) + offset
        lo = hi = float("nan")
        if all(key in self.draws for key in terms):
            draws = sum(w * self.draws[key] for key, w in terms.items()) + offset
            lo, hi = np.nanpercentile(draws, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
        several = rows["seeds"].to_numpy() > 1
        seed_hw = float("nan")
        if several.any():
            seed_hw = float(np.sqrt(np.nansum((weights * rows["ci95"].to_numpy(float))[several] ** 2)))
        return Contrast(value, float(lo), float(hi), seed_hw)

    @property
    def source(self) -> str:
        """One line on which intervals decide comparisons, for the verdict table."""
        seeds = "seed t-intervals where a configuration has several seeds"
        if not self.has_items:
            return f"no item bootstrap (no items.parquet): point estimates decide, {seeds}"
        text = (f"paired item bootstrap ({N_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}, "
                f"{100 * LEVEL:g}% percentile) and {seeds}")
        if self.left_out:
            text += f"; {len(self.left_out)} cell(s) without usable items decided by point estimates"
        return text


def metric_kind(metric: str) -> str:
    """How a benchmark's score aggregates its items: 'f1' (POPE), 'category_sum' (MME) or 'mean'."""
    if metric == "pope_f1_score":
        return "f1"
    return "category_sum" if metric.startswith("mme_") else "mean"


def aggregate(kind: str, weights: np.ndarray, rows: pd.DataFrame) -> np.ndarray:
    """The benchmark score under each row of ``weights`` (resample x item counts).

    ``rows`` are one evaluation's items in the column order of ``weights``. With
    all-one weights this is lmms-eval's own aggregate, which bootstrap_avg compares
    with the score in cells.csv.
    """
    score = rows["score"].to_numpy(float)
    if kind == "mean":
        return weights @ score / weights.sum(axis=1)
    if kind == "category_sum":
        strata = rows["stratum"].to_numpy()
        return sum(weights[:, strata == s] @ score[strata == s] / weights[:, strata == s].sum(axis=1)
                   for s in pd.unique(strata))
    said, gold = rows["pred"].to_numpy(), rows["gold"].to_numpy()
    tp = weights @ ((said == "yes") & (gold == "yes")).astype(float)
    fp = weights @ ((said == "yes") & (gold == "no")).astype(float)
    fn = weights @ ((said == "no") & (gold == "yes")).astype(float)  # lmms-eval: only an explicit "no" misses
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        return np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)


def resample_weights(strata: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, items) counts: each resample redraws every stratum's items with replacement, keeping its size."""
    weights = np.zeros((n, len(strata)))
    for stratum in pd.unique(strata):
        where = np.flatnonzero(strata == stratum)
        weights[:, where] = rng.multinomial(len(where), np.full(len(where), 1 / len(where)), size=n)
    return weights


def _draws(evaluation: pd.DataFrame, order: pd.DataFrame, kind: str, weights: np.ndarray,
           expected: float) -> np.ndarray | None:
    """One evaluation's resampled benchmark scores, or None when an item is missing or its
    items do not aggregate to ``expected`` (its score in cells.csv)."""
    aligned = evaluation.drop_duplicates("item").set_index("item").reindex(order["item"])
    if aligned["score"].isna().any():
        return None
    aligned = aligned.assign(stratum=order["stratum"].to_numpy())
    full = aggregate(kind, np.ones((1, len(order))), aligned)[0]
    if abs(full - expected) > MATCH_TOLERANCE * max(1.0, abs(expected)):
        return None
    return aggregate(kind, weights, aligned)


def bootstrap_avg(df: pd.DataFrame, items: pd.DataFrame, n: int = N_RESAMPLES,
                  seed: int = BOOTSTRAP_SEED) -> tuple[dict, list[str]]:
    """({config tuple: AVG-% per resample, seed-mean}, cells left out) from the per-item scores.

    A cell is left out (and its configuration gets no item interval) when an item is
    missing for one of its benchmarks or when its items do not reproduce the score
    in cells.csv, so intervals never describe numbers other than the reported ones.
    """
    rng = np.random.default_rng(seed)
    primary = df[df["primary"]]
    items = items.assign(stratum=items["stratum"].fillna(""))
    retained: dict[str, dict[str, np.ndarray]] = {}
    bad: set[str] = set()
    for bench in sorted(primary["benchmark"].unique()):  # fixed order: the same seed gives the same draws
        rows = primary[primary["benchmark"] == bench]
        pool = items[items["benchmark"] == bench]
        if pool.empty:
            bad.update(rows["cell"])
            continue
        order = pool.drop_duplicates("item").sort_values(["stratum", "item"])
        weights = resample_weights(order["stratum"].to_numpy(), n, rng)
        kind = metric_kind(rows["metric"].iloc[0])
        teacher_pool = pool[pool["role"] == "teacher"]
        teachers = {}
        for teacher, t_rows in rows.groupby("teacher"):
            teachers[teacher] = _draws(teacher_pool[teacher_pool["teacher"] == teacher], order, kind, weights,
                                       t_rows["teacher_score"].iloc[0])
        students = pool[pool["role"] == "student"]
        for _, row in rows.drop_duplicates("cell").iterrows():
            draws = _draws(students[students["cell"] == row["cell"]], order, kind, weights, row["score"])
            if draws is None or teachers[row["teacher"]] is None:
                bad.add(row["cell"])
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                retained.setdefault(row["cell"], {})[bench] = 100.0 * draws / teachers[row["teacher"]]
    per_cell = {}
    for cell, cell_rows in primary.groupby("cell"):
        if cell not in bad and set(cell_rows["benchmark"]) <= set(retained.get(cell, {})):
            per_cell[cell] = np.mean([retained[cell][b] for b in pd.unique(cell_rows["benchmark"])], axis=0)
    configs = {}
    for key, cfg_rows in primary.groupby(CONFIG):
        cells = pd.unique(cfg_rows["cell"])
        if all(c in per_cell for c in cells):
            configs[key] = np.mean([per_cell[c] for c in cells], axis=0)
    left_out = sorted(bad | (set(primary["cell"]) - set(per_cell)))
    if left_out:
        log.info("item bootstrap: %d cell(s) without usable items: %s", len(left_out), ", ".join(left_out))
    return configs, left_out
