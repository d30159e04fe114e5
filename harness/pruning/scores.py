"""Importance scores, computed once per (model weights, method, calibration set) and reused for every ratio.

Scores are stored as safetensors + JSON under `<importance_dir>/<method>-<key>/`, the key
hashing the model's fingerprint (every weight and the architecture-relevant config), the
method and the calibration set's digest; pruning the same model to another ratio then needs
no forward or backward pass. Fingerprinting a 7B model costs about a minute, so the
fingerprint of a checkpoint folder is remembered against the folder's state
(`cached_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from harness.errors import HarnessError
from harness.io import atomic_dir, read_json, write_json
from harness.models.adapter import LMAdapter
from harness.pruning.calibration import Calibration
from harness.pruning.methods import get_method

# Bump when `model_fingerprint` changes: cached fingerprints (`cached_fingerprint`) are then recomputed.
_FINGERPRINT_VERSION = 1
# Under an importance folder, where `cached_fingerprint` keeps them (a dot name: not a score folder).
FINGERPRINT_CACHE = ".fingerprints"
_VOLATILE_CONFIG_KEYS = {"transformers_version", "architectures", "dtype", "name_or_path", "use_cache",
                         "output_hidden_states", "output_attentions", "return_dict"}


@dataclass
class Importance:
    """Scores of one method for one model: `layer` [L], `block_distance` [L, L] (row n-1: blocks of n
    layers by start; +inf where no block fits), or `attn` [L, KV groups], `mlp` [L, channels],
    `hidden` [hidden channels] and `projector` [projector inner channels]."""

    method: str
    scores: dict[str, torch.Tensor]
    calibration_ids: list[str] = field(default_factory=list)
    model_fingerprint: str = ""

    @property
    def kind(self) -> str:
        return get_method(self.method).family

    def to_lists(self) -> dict:
        """JSON-friendly scores; block distances keep only the blocks that fit."""
        out = {}
        for key, tensor in self.scores.items():
            if key == "block_distance":
                n_layers = tensor.shape[1]
                out[key] = [tensor[n - 1, : n_layers - n + 1].tolist() for n in range(1, n_layers + 1)]
            else:
                out[key] = tensor.tolist()
        return out


def model_fingerprint(model: nn.Module) -> str:
    """A hash of every weight (names, shapes, dtypes, bytes) and of the architecture-relevant config."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(_stable(model.config.to_dict()), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _stable(obj):
    """Config without run-time flags and bookkeeping that differ between a built and a reloaded model."""
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    return obj


def importance_key(fingerprint: str, method: str, calib: Calibration | None) -> str:
    payload = [fingerprint, method, calib.digest() if calib is not None else None]
    return hashlib.blake2b(json.dumps(payload).encode(), digest_size=16).hexdigest()


def save_importance(importance: Importance, importance_dir: str | Path, key: str) -> Path:
    """Write `<importance_dir>/<method>-<key>/` (scores.safetensors + importance.json) atomically."""
    from safetensors.torch import save_file

    final = Path(importance_dir) / f"{importance.method}-{key}"
    with atomic_dir(final) as tmp:
        save_file({k: v.contiguous() for k, v in importance.scores.items()}, str(tmp / "scores.safetensors"))
        write_json(tmp / "importance.json", {"method": importance.method, "key": key,
                                             "model_fingerprint": importance.model_fingerprint,
                                             "calibration_ids": importance.calibration_ids})
    return final


def load_importance(importance_dir: str | Path, method: str, key: str) -> Importance | None:
    """The stored scores for this key, or None when they were never computed."""
    from safetensors.torch import load_file

    folder = Path(importance_dir) / f"{method}-{key}"
    if not (folder / "importance.json").exists():
        return None
    meta = read_json(folder / "importance.json")
    if meta.get("key") != key:
        raise HarnessError(f"{folder} holds scores for another key; delete it and rerun")
    return Importance(meta["method"], load_file(str(folder / "scores.safetensors")), meta["calibration_ids"],
                      meta["model_fingerprint"])


def cached_importance(model: nn.Module, processor, method: str, calib: Calibration | None,
                      importance_dir: str | Path, fingerprint: str | None = None,
                      on_compute: Callable[[], None] | None = None) -> Importance:
    """Load the scores for (model, method, calibration) from `importance_dir`, computing and storing them once.

    `on_compute` is called just before scores are computed (not when stored ones are reused).
    """
    fingerprint = fingerprint or model_fingerprint(model)
    key = importance_key(fingerprint, method, calib)
    stored = load_importance(importance_dir, method, key)
    if stored is not None and set(get_method(method).score_keys) <= set(stored.scores):
        return stored  # (scores stored by a version that scored fewer units lack some: recomputed)
    if on_compute is not None:
        on_compute()
    importance = compute_importance(model, processor, method, calib, fingerprint=fingerprint)
    save_importance(importance, importance_dir, key)
    return importance


def cached_fingerprint(model: nn.Module, source: str | Path | None, importance_dir: str | Path) -> str:
    """`model_fingerprint` of `model` as just loaded from the checkpoint folder `source`, hashed once per folder state.

    Hashing every weight costs about a minute for a 7B model in float32, on every ratio.
    The fingerprint is remembered under `importance_dir/.fingerprints/` against the folder's
    file names, sizes, modification times and inodes, the loaded dtypes and the
    transformers version (which shapes `config.to_dict()`); any change rehashes. Without
    a folder (a model built in memory, a hub id) it is computed every time.
    """
    fingerprint, remember = lookup_fingerprint(model, source, importance_dir)
    remember()
    return fingerprint


def lookup_fingerprint(model: nn.Module, source: str | Path | None, importance_dir: str | Path):
    """(fingerprint, remember): like `cached_fingerprint`, but the cache entry is written only by `remember()`.

    `prune` calls `remember()` once the run has succeeded, so a run refused on bad input writes nothing.
    """
    if source is None or not Path(source).is_dir():
        return model_fingerprint(model), lambda: None
    source = Path(source).resolve()
    stamp = _folder_stamp(source, model)
    name = hashlib.blake2b(str(source).encode(), digest_size=16).hexdigest()
    entry = Path(importance_dir) / FINGERPRINT_CACHE / f"{name}.json"
    try:
        cached = read_json(entry)
        if isinstance(cached, dict) and cached.get("stamp") == stamp and isinstance(cached.get("fingerprint"), str):
            return cached["fingerprint"], lambda: None
    except (OSError, ValueError):
        pass
    fingerprint = model_fingerprint(model)

    def remember() -> None:
        try:
            write_json(entry, {"source": str(source), "stamp": stamp, "fingerprint": fingerprint})
        except OSError:
            pass  # a read-only importance folder only costs the rehash next time

    return fingerprint, remember


def _folder_stamp(folder: Path, model: nn.Module) -> list:
    import transformers

    files = []
    for path in sorted(folder.iterdir()):
        if path.is_file():
            st = path.stat()
            files.append([path.name, st.st_size, st.st_mtime_ns, st.st_ino])
    dtypes = sorted({str(t.dtype) for t in model.state_dict().values()})
    return [_FINGERPRINT_VERSION, transformers.__version__, dtypes, files]


def compute_importance(model: nn.Module, processor, method: str, calib: Calibration | None,
                       fingerprint: str | None = None) -> Importance:
    """Score the model's layers or widths with `method` on the calibration set (unused by magnitude)."""
    scorer = get_method(method)
    adapter = LMAdapter(model)
    if scorer.family == "width":
        _check_uniform(adapter)
    if scorer.needs_calibration and calib is None:
        raise HarnessError(f"method {method} needs calibration samples")
    batches = calib.batches(processor, model) if scorer.needs_calibration else []
    was_training = model.training
    model.eval()
    try:
        scores = scorer.score(model, adapter, batches)
    finally:
        model.train(was_training)
    ids = calib.ids if scorer.needs_calibration else []
    return Importance(method, scores, ids, fingerprint or model_fingerprint(model))


def _check_uniform(adapter: LMAdapter) -> None:
    widths = {(adapter.attn_linears(layer)[1].in_features, adapter.mlp_linears(layer)[1].in_features)
              for layer in adapter.layers}
    if len(widths) > 1:
        raise HarnessError("width importance needs uniform layer widths; this model was already pruned unevenly")
