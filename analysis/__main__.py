"""Command line: ``python -m analysis [RESULTS_DIR ...] [--wandb]``.

Writes report.md (with tables, figures, findings) for each experiment folder,
by default every folder under ``results/`` holding a cells file, and prints the
findings. Every input is validated before anything is written, so bad input
leaves no half-written reports: one line on stderr and exit code 2.
"""

import argparse
import logging
import sys
from pathlib import Path

from analysis import RESULT_FILES, AnalysisError, load_items, load_results


def default_dirs(root: Path = Path("results")) -> list[Path]:
    """Experiment folders under ``root`` that hold a cells file."""
    dirs = sorted(d for d in root.glob("*") if any((d / f).is_file() for f in RESULT_FILES))
    if not dirs:
        raise AnalysisError(f"no experiment folder with {' or '.join(RESULT_FILES)} under {root}/")
    return dirs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.splitlines()[0])
    parser.add_argument("results_dirs", nargs="*", type=Path, metavar="RESULTS_DIR",
                        help="experiment folders (default: every one under results/)")
    parser.add_argument("--wandb", action="store_true",
                        help="also log tables and figures as a W&B artifact (WANDB_MODE, "
                             "default offline)")
    args = parser.parse_args(argv)
    try:
        dirs = args.results_dirs or default_dirs()
        frames = [(load_results(d), load_items(d)) for d in dirs]
    except AnalysisError as err:
        print(f"analysis: error: {err}", file=sys.stderr)
        return 2

    from analysis.findings import check_findings  # heavy imports only once input is valid
    from analysis.report import log_to_wandb, write_report
    from analysis.tables import to_markdown

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for results_dir, (df, items) in zip(dirs, frames, strict=True):
        print(f"== {results_dir}: {write_report(results_dir)}")
        print(to_markdown(check_findings(df, items)[["finding", "verdict", "counts", "intervals"]]))
        if args.wandb:
            print(f"logged W&B artifact {log_to_wandb(results_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
