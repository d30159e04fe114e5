"""How much do extra ratios cost once importance scores exist? Prints total(5 ratios) / time(1 ratio).

Each ratio runs `harness.pruning.prune` from the checkpoint path, as the CLI does (model
loading, calibration selection, scoring or score reuse, surgery, saving). With a fresh
importance folder the first ratio pays for scoring and the other four reuse the scores;
the goal is total <= 1.3x the first. Timings on a shared machine are noisy, so the run is
repeated and the median ratio reported.

    .venv/bin/python benchmarks/bench_prune_reuse.py [--model tiny-llava] [--method width-taylor] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness.data.make import WorldSpec, make_world
from harness.models.embedded import build_embedded
from harness.pruning import prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

RATIOS = (0.15, 0.3, 0.45, 0.6, 0.5)


def timed_ratios(checkpoint: Path, data: Path, method: str, work: Path) -> list[float]:
    """Seconds for each ratio, in order, starting from an empty importance folder."""
    times = []
    for ratio in RATIOS:
        start = time.perf_counter()
        prune(str(checkpoint), method, ratio, work / f"out-{ratio}", data=data, importance_dir=work / "importance")
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llava", help="embedded model shape (random weights)")
    parser.add_argument("--method", default="width-taylor")
    parser.add_argument("--data", type=Path, default=Path("artifacts/data/synth"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, processor = build_embedded(args.model)
        model.save_pretrained(root / "model")
        processor.save_pretrained(root / "model")
        data = args.data if (args.data / "mix.json").exists() else make_world(root / "world", WorldSpec(mix_size=200))
        timed_ratios(root / "model", data, args.method, root / "warmup")  # imports, dataset cache
        ratios, runs = [], []
        for k in range(args.repeats):
            times = timed_ratios(root / "model", data, args.method, root / f"run{k}")
            ratios.append(sum(times) / times[0])
            runs.append(times)
            print(f"run {k}: first ratio {times[0]:.2f}s, reuse {', '.join(f'{t:.2f}' for t in times[1:])}s, "
                  f"total/one = {ratios[-1]:.2f}x")
    median = statistics.median(ratios)
    print(f"{args.model} {args.method}, {len(RATIOS)} ratios: median total/one = {median:.2f}x (goal <= 1.3x)")
    first = statistics.median(t[0] for t in runs)
    reuse = statistics.median(x for t in runs for x in t[1:])
    print(f"median seconds: first ratio (scoring) {first:.2f}, each reusing ratio {reuse:.2f} "
          f"(load + surgery + save: the fixed cost that scoring reuse cannot remove)")
    return write_result(args.json, "prune_reuse", {"five_ratios_over_one": round(median, 4)},
                        {"five_ratios_over_one": "<= 1.3"},
                        {"model": args.model, "method": args.method, "ratios": list(RATIOS), "seconds_per_run": runs,
                         "median_first_s": first, "median_reuse_s": reuse})


if __name__ == "__main__":
    main()
