"""W&B: offline by default; online only when asked for, reachable and accepting the key, else offline.

`wandb_mode()` is what every run uses. With WANDB_MODE=online it first makes one short,
cached check per process (a key is configured, the server at WANDB_BASE_URL answers, and
accepts the key); when any of that fails it says why in one line on stderr and returns
`offline`, so nothing logged is lost: the offline run holds every metric and
`make wandb-sync` uploads it later. `start_run()` wraps `wandb.init` the same way for
failures the check cannot foresee: an online init that fails is retried offline.

The API key is only ever read here to authenticate that check; it is never logged,
printed or stored (W&B keeps it out of run files itself).

What runs carry is machine-independent: `portable()` turns absolute paths into paths relative
to the working directory (or a bare name), `run_settings()` does the same for the Python
executable W&B records in every run's metadata, `model_name()` names a teacher given as a folder,
and `remove_earlier_offline_runs()` lets a run with a fixed id (an experiment's analysis run)
replace its earlier offline copies instead of adding to them.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

DEFAULT_BASE_URL = "https://api.wandb.ai"
_verdicts: dict[tuple, str | None] = {}  # (base url, key digest) -> why online is unusable, or None


def wandb_mode() -> str:
    """`online` only when WANDB_MODE=online and the server is usable; `disabled` stays; anything else is `offline`."""
    mode = os.environ.get("WANDB_MODE", "offline")
    if mode in ("offline", "disabled"):
        return mode
    if mode != "online":
        return "offline"
    problem = online_problem()
    if problem:
        return "offline"
    return "online"


def online_problem() -> str | None:
    """Why online logging cannot work right now (None when it can); checked once per process and setting."""
    base = os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL).rstrip("/")
    key = _api_key(base)
    cache_key = (base, hash(key))
    if cache_key not in _verdicts:
        _verdicts[cache_key] = _check_server(base, key)
        if _verdicts[cache_key]:
            _warn(f"W&B online mode is unusable ({_verdicts[cache_key]}); logging offline instead "
                  f"(upload later with `make wandb-sync`)")
    return _verdicts[cache_key]


def start_run(**init_kwargs):
    """`wandb.init` in `wandb_mode()`; an online init that fails anyway falls back to an offline run."""
    import wandb

    mode = wandb_mode()
    init_kwargs.setdefault("settings", run_settings())
    if mode == "online":
        try:
            return wandb.init(mode="online", **init_kwargs)
        except Exception as e:  # noqa: BLE001  (any failure: keep the metrics offline)
            base = os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL).rstrip("/")
            _verdicts[(base, hash(_api_key(base)))] = reason = f"init failed: {type(e).__name__}"
            _warn(f"W&B online mode is unusable ({reason}); logging offline instead")
            wandb.teardown()  # the service may still be retrying the online run; start a fresh one
        mode = "offline"
    return wandb.init(mode=mode, **init_kwargs)


def wandb_dir(path: str | Path | None = None) -> str:
    """Where runs are written (default `$HARNESS_ARTIFACTS/wandb`), created, as a path relative to the working
    directory: W&B records it in every run's metadata (`root`), where an absolute path would name this machine."""
    from harness.paths import artifacts_dir

    path = Path(path) if path is not None else artifacts_dir() / "wandb"
    path.mkdir(parents=True, exist_ok=True)
    return os.path.relpath(path)


def run_settings():
    """W&B settings for every run: its metadata names the Python executable as `portable()` does.

    W&B records `sys.executable` (an absolute path of this machine) in each run's metadata;
    the rest of that metadata (OS, Python version, CPU, GPU, memory) is kept: it is what a
    reader comparing runs across machines wants."""
    import wandb

    return wandb.Settings(x_executable=portable(sys.executable))


def portable(value):
    """`value` (nested dicts and lists too) with every absolute path made machine-independent.

    A path under the working directory becomes relative to it; any other absolute path keeps
    only its last component (a teacher folder's name, a data folder's name).
    """
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str) and len(value) > 1 and os.path.isabs(value):
        path = Path(value)
        try:
            return path.relative_to(Path.cwd()).as_posix()
        except ValueError:
            return path.name
    return value


def model_name(model: str) -> str:
    """A model as a person names it: a checkpoint folder by its name, an embedded name or hub id as given."""
    model = str(model)
    if os.path.isabs(model) or Path(model).is_dir():
        return Path(model).name or model
    return model


def remove_earlier_offline_runs(run) -> list[Path]:
    """Delete the other local copies (offline runs) of `run`'s id, so its latest copy is the only one synced."""
    here = Path(run.dir).parent if getattr(run, "dir", None) else None
    if here is None or not here.parent.is_dir():
        return []
    pattern = re.compile(r"offline-run-\d{8}_\d{6}-" + re.escape(run.id) + "$")
    removed = [d for d in here.parent.iterdir() if d != here and d.is_dir() and pattern.match(d.name)]
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


def _check_server(base: str, key: str | None) -> str | None:
    if not key:
        return "no API key: set WANDB_API_KEY or run `wandb login`"
    timeout = min(float(os.environ.get("WANDB_INIT_TIMEOUT", 10)), 10.0)
    request = urllib.request.Request(
        f"{base}/graphql", data=json.dumps({"query": "query { viewer { id } }"}).encode(),
        headers={"Content-Type": "application/json",
                 "Authorization": "Basic " + base64.b64encode(f"api:{key}".encode()).decode()})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        return f"{base} rejected the API key (HTTP {e.code})" if e.code in (401, 403) else f"{base} answered HTTP {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return f"cannot reach {base}: {reason}"
    if not (isinstance(body, dict) and (body.get("data") or {}).get("viewer")):
        return f"{base} did not accept the API key"
    return None


def _api_key(base: str) -> str | None:
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    import netrc

    host = urllib.parse.urlparse(base).hostname or ""
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        auth = netrc.netrc(str(path)).authenticators(host) if path.exists() else None
    except (netrc.NetrcParseError, OSError):
        return None
    return auth[2] if auth else None


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
