"""Atomic writes: a half-written artifact must never look finished."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary sibling folder; rename it to `final` only if the block succeeds.

    An existing `final` is first renamed aside (atomic) and deleted only after the new one
    is in place, so a process killed at any moment leaves either a complete `final` or
    none, never a half-deleted one. Leftover `.NAME.tmp-*` / `.NAME.old-*` siblings of a
    killed process are never read; `remove_leftovers` deletes them.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    old = None
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def remove_leftovers(final: str | Path) -> list[Path]:
    """Delete the temporary siblings a killed writer of `final` left behind; call it only while no one writes `final`."""
    final = Path(final)
    found = [p for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*") for p in final.parent.glob(pattern)]
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


@functools.cache
def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string; read it as the float everyone means."""

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader


def load_yaml(text: str):
    """`yaml.safe_load`, except that `1e-4` is a float (YAML 1.2), as in specs and `--set lr=1e-4`."""
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506  (a SafeLoader subclass)
