"""How much do extra ratios cost once importance scores exist? Prints total(5 ratios) / time(1 ratio).

For each method (default: the paper's layer method `layer-bi`, 50 calibration samples, and
`width-taylor`, 10 samples; both at their default calibration sizes) two ways of pruning
one model to 5 ratios are timed, each from an empty importance folder, against the time
of pruning it to one ratio (load, calibration selection, scoring, surgery, saving):
- separate calls: `harness.pruning.prune` once per ratio from the checkpoint path, as 5
  `harness prune` runs do; the first scores, the other four load the model again and
  reuse the stored scores.
- one call: `harness.pruning.prune` with a list of ratios (`harness prune --ratio R1 ... R5 --out
  DIR-{ratio}`), which loads, hashes and scores once, then slices and saves each ratio.
Every call saves its checkpoints: saving is part of pruning and is timed. The goal is
total <= 1.3x one ratio. Timings on a shared machine are noisy, so each repeat times the
one-ratio call and the five-ratio runs side by side (A B A B over repeats) and forms its ratio;
the figure is the median of the per-repeat ratios with its spread (`_common.figure`), next to
the median time of each component (model loading, fingerprint, calibration selection, scoring
or score loading, surgery, saving). Before every timed call the files of earlier calls are
flushed to disk (`os.sync`, untimed) and each repeat's outputs are deleted after it, so a call
never pays for the write-back of another's checkpoints. `--quick`: one repeat, no warm-up, 4 calibration samples.

    .venv/bin/python benchmarks/bench_prune_reuse.py [--model tiny-llava] [--method layer-bi width-taylor]
        [--repeats 5] [--one-call-only] [--json PATH] [--quick]

`make bench` runs it twice: on tiny-llava (1.7M parameters, where the fixed cost of writing a
checkpoint is large next to scoring) and on smol-llava (SmolLM2-135M's real weights, where
scoring dominates, as on the paper's models), the latter with `--one-call-only`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, write_result  # noqa: E402  (sets the offline environment before transformers is imported)

from harness.pruning import METHODS, prune  # noqa: E402
from harness.synthetic.make import WorldSpec, make_world  # noqa: E402
from harness.synthetic.models import EMBEDDED, build_embedded  # noqa: E402

prune_module = importlib.import_module("harness.pruning.pipeline")
RATIOS = (0.15, 0.3, 0.45, 0.6, 0.5)
# --quick on a pretrained LM keeps 4 of its layers, whose embedding then holds most parameters: two small ratios.
QUICK_PRETRAINED = ({"num_hidden_layers": 4}, (0.1, 0.2))
GOAL = 1.3
# The steps of `prune`, as named in harness.pruning.pipeline; the rest of a call is "other".
COMPONENTS = {"_load": "load model + processor", "lookup_fingerprint": "fingerprint",
              "calibration_set": "calibration selection", "cached_importance": "scoring (or loading scores)",
              "apply_pruning": "surgery", "save_pruned": "save checkpoint"}


class Clock:
    """Wraps the steps of `prune` to sum the seconds spent in each during one call."""

    def __init__(self):
        self.spent: dict[str, float] = defaultdict(float)
        for name in COMPONENTS:
            setattr(prune_module, name, self._timed(name, getattr(prune_module, name)))

    def _timed(self, name, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[name] += time.perf_counter() - start
        return timed

    def call(self, fn, *args, **kwargs) -> dict[str, float]:
        """Run one call; its total seconds and those of each component (`other`: the rest).

        The files earlier calls wrote are flushed to disk first (`os.sync`, untimed), so no call pays for another
        call's write-back: each costs what one `harness prune` run costs on its own."""
        os.sync()
        self.spent.clear()
        start = time.perf_counter()
        fn(*args, **kwargs)
        total = time.perf_counter() - start
        parts = {name: self.spent.get(name, 0.0) for name in COMPONENTS}
        return {"total": total, **parts, "other": total - sum(parts.values())}


def one_repeat(clock: Clock, checkpoint: Path, data: Path, method: str, work: Path, separate: bool = True,
               **overrides) -> dict:
    """Separate calls (the first of which is the one-ratio time) and one call, each from empty importance folders.

    Without `separate`, only the first of the separate calls runs: the one-ratio time the goal is about."""
    ratios = RATIOS if separate else RATIOS[:1]
    calls = [clock.call(prune, str(checkpoint), method, ratio, work / "separate" / f"out-{ratio}", data=data,
                        importance_dir=work / "separate" / "importance", **overrides) for ratio in ratios]
    together = clock.call(prune, str(checkpoint), method, list(RATIOS), work / "one-call" / "out-{ratio}", data=data,
                          importance_dir=work / "one-call" / "importance", **overrides)
    one = calls[0]["total"]
    return {"separate": calls, "one_call": together,
            "separate_over_one": sum(c["total"] for c in calls) / one, "one_call_over_one": together["total"] / one}


def median_parts(calls: list[dict]) -> dict[str, float]:
    return {key: statistics.median(c[key] for c in calls) for key in calls[0]}


def line(parts: dict[str, float]) -> str:
    shown = ", ".join(f"{COMPONENTS.get(k, k)} {v * 1000:.0f}" for k, v in parts.items() if k != "total")
    return f"{parts['total'] * 1000:.0f} ms ({shown})"


def bench_method(checkpoint: Path, data: Path, method: str, root: Path, repeats: int, clock: Clock,
                 params: int, warmup: bool = True, separate: bool = True, **overrides) -> dict:
    if warmup:  # imports, dataset cache, first-call costs: one call of one ratio pays them all
        clock.call(prune, str(checkpoint), method, RATIOS[0], root / f"{method}-warmup" / "out", data=data,
                   importance_dir=root / f"{method}-warmup" / "importance", **overrides)
    runs = []
    for k in range(repeats):
        work = root / f"{method}-run{k}"
        runs.append(one_repeat(clock, checkpoint, data, method, work, separate=separate, **overrides))
        shutil.rmtree(work)  # a repeat's checkpoints are not needed again (on smol-llava, 2 GB per repeat)
    for k, run in enumerate(runs):
        times = [c["total"] for c in run["separate"]]
        print(f"{method} run {k}: one ratio {times[0]:.3f}s; " +
              (f"separate calls: reuse {', '.join(f'{t:.3f}' for t in times[1:])}s -> "
               f"{run['separate_over_one']:.2f}x; " if separate else "") +
              f"one call for 5 ratios {run['one_call']['total']:.3f}s -> {run['one_call_over_one']:.2f}x")
    first = median_parts([r["separate"][0] for r in runs])
    reuse = median_parts([c for r in runs for c in r["separate"][1:]]) if separate else None
    together = median_parts([r["one_call"] for r in runs])
    # Median of the per-repeat (paired) ratios, with its spread.
    separate_fig = figure([r["separate_over_one"] for r in runs], "information: 5 prune calls, each loading "
                          "the model (the goal is for one call)") \
        if separate else None
    one_call_fig = figure([r["one_call_over_one"] for r in runs], f"<= {GOAL} (prune with several ratios: load and "
                          "score once)")
    separate_ratio, one_call_ratio = separate_fig["value"] if separate else None, one_call_fig["value"]
    scoring = first["cached_importance"]
    # What one more ratio costs inside one call: surgery + save, measured in the one-call runs.
    per_ratio = (together["apply_pruning"] + together["save_pruned"]) / len(RATIOS)
    bound = 1 + (len(RATIOS) - 1) * per_ratio / first["total"]
    print(f"  median one ratio (scores computed): {line(first)}")
    if separate:
        print(f"  median separate reusing call:       {line(reuse)}")
    print(f"  median one call for {len(RATIOS)} ratios:        {line(together)}")
    print(f"  {method}: " + (f"separate calls {separate_ratio:.2f}x, " if separate else "") +
          f"one call {one_call_ratio:.2f}x (goal <= {GOAL}x); "
          f"scoring {scoring * 1000:.0f} ms, surgery + save {per_ratio * 1000:.0f} ms per ratio")
    note = ""
    samples = overrides.get("calib_samples") or METHODS[method].calib_samples
    if one_call_ratio > GOAL:
        note = (f"misses {GOAL}x even in one call, with the fixed costs cut: on this {params / 1e6:.1f}M-parameter "
                f"model, scoring {samples} calibration samples ({scoring * 1000:.0f} ms) costs "
                f"only {scoring / per_ratio:.0f}x what each ratio must spend on surgery + writing its checkpoint "
                f"({per_ratio * 1000:.0f} ms, which no score reuse removes), so one call is at best "
                f"1 + {len(RATIOS) - 1} x {per_ratio * 1000:.0f} / {first['total'] * 1000:.0f} = {bound:.2f}x")
        print(f"  NOTE: {note}")
    if separate and separate_ratio > GOAL:
        print(f"  separate calls pay model loading ({reuse['_load'] * 1000:.0f} ms) on every ratio: use one call "
              f"(`harness prune --ratio R1 R2 ... --out DIR-{{ratio}}`)")
    one_call_fig["note"] = note
    return {"separate_over_one": separate_fig, "one_call_over_one": one_call_fig,
            "details": {"calib_samples": samples,
                        "median_seconds": {"one_ratio": first, "separate_reusing_call": reuse,
                                           "one_call_five_ratios": together},
                        "scoring_s": scoring, "surgery_plus_save_per_ratio_s": per_ratio,
                        "one_call_best_possible_over_one": round(bound, 4), "note": note,
                        "runs": [{"separate_s": [c["total"] for c in r["separate"]],
                                  "one_call_s": r["one_call"]["total"],
                                  "separate_over_one": round(r["separate_over_one"], 4),
                                  "one_call_over_one": round(r["one_call_over_one"], 4)} for r in runs]}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llava", help="embedded model shape (random weights)")
    parser.add_argument("--method", nargs="+", default=["layer-bi", "width-taylor"])
    parser.add_argument("--data", type=Path, default=Path("artifacts/data/synth"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument("--one-call-only", action="store_true",
                        help="time only one ratio against one call for five (skip the five separate calls): for a "
                             "model whose scoring takes seconds")
    parser.add_argument("--quick", action="store_true",
                        help="1 repeat, no warm-up, 4 calibration samples (a pretrained LM: 4 decoder layers, "
                             "2 ratios): a smoke run")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    overrides = {"calib_samples": 4} if args.quick else {}
    clock = Clock()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        scale = None
        if args.quick and EMBEDDED[args.model].base_lm:
            global RATIOS
            scale, RATIOS = QUICK_PRETRAINED
        model, processor = build_embedded(args.model, scale=scale)
        model.save_pretrained(root / "model")
        processor.save_pretrained(root / "model")
        data = args.data if (args.data / "mix.json").exists() else make_world(
            root / "world", WorldSpec(mix_size=16, benchmark_size=2) if args.quick else WorldSpec(mix_size=200))
        for method in args.method:
            results[method] = bench_method(root / "model", data, method, root, repeats, clock,
                                           model.num_parameters(), warmup=not args.quick,
                                           separate=not args.one_call_only, **overrides)
    figures = {}
    for method, r in results.items():
        key = method.replace("-", "_")
        figures[f"{key}_one_call_five_over_one"] = r["one_call_over_one"]
        if r["separate_over_one"] is not None:
            figures[f"{key}_separate_calls_five_over_one"] = r["separate_over_one"]
    return write_result(args.json, "prune_reuse", figures,
                        details={"model": args.model, "scale": scale, "parameters": model.num_parameters(),
                                 "ratios": list(RATIOS),
                         "repeats": repeats, "calibration_overrides": overrides,
                         "components": COMPONENTS, **{m: r["details"] for m, r in results.items()}})


if __name__ == "__main__":
    main()
