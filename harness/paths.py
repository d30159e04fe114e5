"""Where the harness reads and writes by default: one place for every default path.

Paths are relative to the working directory (the repository root for `make` targets),
except the committed teachers, which ship with the repository. `HARNESS_ARTIFACTS` and
`HARNESS_GRID_ROOT` move the writable trees; they are read when a path is asked for,
not at import, so a test or a driver may set them at any time.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Trained embedded teachers are committed here (HF-native, safetensors).
TEACHERS_DIR = REPO_ROOT / "artifacts" / "teachers"
# The synthetic world: instruction mix (mix.json, align.json, images/) and benchmarks/.
DEFAULT_DATA = Path("artifacts/data/synth")
DEFAULT_BENCHMARKS = DEFAULT_DATA / "benchmarks"
DEFAULT_IMPORTANCE_DIR = Path("artifacts/importance")


def artifacts_dir() -> Path:
    """The writable artifacts tree (`HARNESS_ARTIFACTS`, default `artifacts`)."""
    return Path(os.environ.get("HARNESS_ARTIFACTS", "artifacts"))


def grid_root() -> Path:
    """Where grid stages live (`HARNESS_GRID_ROOT`, default `artifacts/grid`), absolute."""
    return Path(os.environ.get("HARNESS_GRID_ROOT", "artifacts/grid")).absolute()
