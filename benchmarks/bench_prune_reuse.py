"""How much do extra ratios cost once importance scores exist? Prints total(5 ratios) / time(1 ratio).

Each ratio runs `harness.pruning.prune` from the checkpoint path, as the CLI does (model
loading, calibration selection, scoring or score reuse, surgery, saving). With a fresh
importance folder the first ratio pays for scoring and the other four reuse the scores;
the goal is total <= 1.3x the first. Timings on a shared machine are noisy, so the run is
repeated and the median ratio reported.

    .venv/bin/python benchmarks/bench_prune_reuse.py [--model tiny-llava] [--method width-taylor]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from harness.data.make import WorldSpec, make_world
from harness.models.embedded import build_embedded
from harness.pruning import prune

RATIOS = (0.15, 0.3, 0.45, 0.6, 0.5)


def timed_ratios(checkpoint: Path, data: Path, method: str, work: Path) -> list[float]:
    """Seconds for each ratio, in order, starting from an empty importance folder."""
    times = []
    for ratio in RATIOS:
        start = time.perf_counter()
        prune(str(checkpoint), method, ratio, work / f"out-{ratio}", data=data, importance_dir=work / "importance")
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llava", help="embedded model shape (random weights)")
    parser.add_argument("--method", default="width-taylor")
    parser.add_argument("--data", type=Path, default=Path("artifacts/data/synth"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, processor = build_embedded(args.model)
        model.save_pretrained(root / "model")
        processor.save_pretrained(root / "model")
        data = args.data if (args.data / "mix.json").exists() else make_world(root / "world", WorldSpec(mix_size=200))
        timed_ratios(root / "model", data, args.method, root / "warmup")  # imports, dataset cache
        ratios = []
        for k in range(args.repeats):
            times = timed_ratios(root / "model", data, args.method, root / f"run{k}")
            ratios.append(sum(times) / times[0])
            print(f"run {k}: first ratio {times[0]:.2f}s, reuse {', '.join(f'{t:.2f}' for t in times[1:])}s, "
                  f"total/one = {ratios[-1]:.2f}x")
    print(f"{args.model} {args.method}, {len(RATIOS)} ratios: median total/one = {statistics.median(ratios):.2f}x "
          f"(goal <= 1.3x)")


if __name__ == "__main__":
    main()
