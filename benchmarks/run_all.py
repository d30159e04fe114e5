"""`make bench`: run every benchmark script and collect their printed ratios in results/bench/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "results" / "bench"


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    failed = 0
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"== {script.name}", flush=True)
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
        (OUT / f"{script.stem}.txt").write_text(proc.stdout + proc.stderr[-4000:])
        print(proc.stdout[-3000:], flush=True)
        failed += proc.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
