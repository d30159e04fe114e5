"""Importance scores for layers, attention head groups and MLP channels, and their reuse.

Scores are computed once per (model weights, method, calibration set) and stored as
safetensors + JSON under a key made of those three, so pruning the same model to
another ratio needs no forward or backward pass.

Layer methods score the language model's decoder layers from the multimodal forward
pass (image tokens included, padding excluded):
- `layer-bi`: ShortGPT Block Influence, sum over tokens of 1 - cos(h_in, h_out). The
  states are each layer's own input and output, read by hooks. (transformers'
  `output_hidden_states` gives the same states except the last, which it returns after
  the final norm; the norm is not part of the layer, so its raw output is used.)
- `layer-angular`: mean over tokens of arccos(cos(h_l, h_{l+n}))/pi for every block of
  n contiguous layers (Gromov et al.), stored for every n so any ratio can be served.
- `layer-loss`: increase of the calibration loss when one layer is skipped.
Width methods score KV groups (a KV head with its query heads), MLP channels, hidden
channels and the projector's inner channels (`harness.pruning.hidden` says which weights
belong to a hidden channel; the scores are always computed, `--prune-hidden` decides use):
- `width-taylor`: LLM-Pruner's first-order |W * dL/dW| summed over each unit's weights.
- `width-activation`: Minitron's activation norms, from forward hooks only; a hidden
  channel scores its norm outputs (every layer's norms and the final one, summed).
- `width-magnitude`: L2 norm of each unit's weights; needs no calibration data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.data.instruct import IGNORE_INDEX, Collator, load_mix
from harness.errors import HarnessError
from harness.io import atomic_dir, read_json, write_json
from harness.models.adapter import LMAdapter
from harness.pruning.hidden import ChannelSlice, hidden_slices, norm_modules, projector_linears, projector_slices

LAYER_METHODS = ("layer-bi", "layer-angular", "layer-loss")
WIDTH_METHODS = ("width-taylor", "width-activation", "width-magnitude")
METHODS = LAYER_METHODS + WIDTH_METHODS
# The paper's calibration sizes: 50 samples for ShortGPT, 10 for LLM-Pruner.
DEFAULT_CALIB_SAMPLES = {"layer-bi": 50, "layer-angular": 50, "layer-loss": 50,
                         "width-taylor": 10, "width-activation": 10, "width-magnitude": 0}
DEFAULT_SEED = 42
SCORE_KEYS = {"width": ("attn", "mlp", "hidden", "projector"), "layer": ()}
# Bump when `model_fingerprint` changes: cached fingerprints (`cached_fingerprint`) are then recomputed.
_FINGERPRINT_VERSION = 1
# Under an importance folder, where `cached_fingerprint` keeps them (a dot name: not a score folder).
FINGERPRINT_CACHE = ".fingerprints"
_VOLATILE_CONFIG_KEYS = {"transformers_version", "architectures", "dtype", "name_or_path", "use_cache",
                         "output_hidden_states", "output_attentions", "return_dict"}


def check_method(method: str) -> None:
    if method not in METHODS:
        raise HarnessError(f"unknown pruning method {method!r}; known: {', '.join(METHODS)}")


def needs_calibration(method: str) -> bool:
    return DEFAULT_CALIB_SAMPLES[method] > 0


# --- calibration data ----------------------------------------------------------------------------


@dataclass
class Calibration:
    """Seeded samples of the instruction mix, with their images, collated lazily."""

    records: list[dict]
    ids: list[str]
    image_root: Path
    batch_size: int = 1
    max_length: int = 512

    def digest(self) -> str:
        """Identifies the samples' content (text and image bytes) and the batching."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([self.records, self.batch_size, self.max_length], sort_keys=True, default=str).encode())
        for record in self.records:
            if record.get("image"):
                try:
                    h.update((self.image_root / record["image"]).read_bytes())
                except OSError as e:
                    raise HarnessError(f"cannot read image {self.image_root / record['image']}: {e.strerror or e}") from None
        return h.hexdigest()

    def batches(self, processor, model: nn.Module) -> list[dict]:
        """Collated batches on the model's device, pixel values in the model's dtype."""
        collator = Collator(processor, model.config, self.image_root, self.max_length)
        param = next(model.parameters())
        batches = []
        for start in range(0, len(self.records), self.batch_size):
            batch = collator(self.records[start:start + self.batch_size])
            batch = {k: v.to(param.device) for k, v in batch.items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(param.dtype)
            batches.append(batch)
        return batches


def calibration_set(data: str | Path, n: int, seed: int = DEFAULT_SEED, batch_size: int = 1,
                    max_length: int = 512) -> Calibration:
    """`n` samples drawn without replacement with a seeded generator from the mix at `data`."""
    if n < 1 or batch_size < 1:
        raise HarnessError(f"calibration needs samples >= 1 and batch size >= 1, got {n} and {batch_size}")
    ds = load_mix(data)
    if n > len(ds):
        raise HarnessError(f"asked for {n} calibration samples but the mix at {data} has only {len(ds)}")
    indices = np.random.default_rng(seed).choice(len(ds), size=n, replace=False).tolist()
    records = [ds[i] for i in indices]
    ids = [str(r.get("id") if r.get("id") is not None else i) for r, i in zip(records, indices, strict=True)]
    root = Path(data) if Path(data).is_dir() else Path(data).parent
    return Calibration(records, ids, root, batch_size, max_length)


# --- scores and their storage --------------------------------------------------------------------


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
        return "layer" if self.method in LAYER_METHODS else "width"

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
    if stored is not None and set(SCORE_KEYS[stored.kind]) <= set(stored.scores):
        return stored  # (width scores stored before hidden channels were scored lack some: recomputed)
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


# --- computing scores ----------------------------------------------------------------------------


def compute_importance(model: nn.Module, processor, method: str, calib: Calibration | None,
                       fingerprint: str | None = None) -> Importance:
    """Score the model's layers or widths with `method` on the calibration set (unused by magnitude)."""
    check_method(method)
    adapter = LMAdapter(model)
    if method in WIDTH_METHODS:
        _check_uniform(adapter)
    if needs_calibration(method) and calib is None:
        raise HarnessError(f"method {method} needs calibration samples")
    batches = calib.batches(processor, model) if needs_calibration(method) else []
    was_training = model.training
    model.eval()
    try:
        scores = _SCORERS[method](model, adapter, batches)
    finally:
        model.train(was_training)
    ids = calib.ids if needs_calibration(method) else []
    return Importance(method, scores, ids, fingerprint or model_fingerprint(model))


def _check_uniform(adapter: LMAdapter) -> None:
    widths = {(adapter.attn_linears(layer)[1].in_features, adapter.mlp_linears(layer)[1].in_features)
              for layer in adapter.layers}
    if len(widths) > 1:
        raise HarnessError("width importance needs uniform layer widths; this model was already pruned unevenly")


def _inputs(batch: dict, with_labels: bool = False) -> dict:
    return {k: v for k, v in batch.items() if with_labels or k != "labels"}


@contextlib.contextmanager
def _hooks(handles: list):
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def boundary_states(model: nn.Module, adapter: LMAdapter, batch: dict) -> list[torch.Tensor]:
    """h_0..h_L for one batch: every layer's input plus the last layer's raw output, [valid tokens, hidden]."""
    io: dict[int, tuple] = {}

    def recorder(i):
        def hook(module, args, kwargs, output):
            io[i] = (_layer_input(args, kwargs), _layer_output(output))
        return hook

    layers = adapter.layers
    with _hooks([layer.register_forward_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]):
        with torch.no_grad():
            model(**_inputs(batch), use_cache=False)
    mask = batch["attention_mask"].bool()
    states = [io[i][0] for i in range(len(layers))] + [io[len(layers) - 1][1]]
    return [s[mask].float() for s in states]


def _block_influence(model, adapter, batches) -> dict[str, torch.Tensor]:
    total = torch.zeros(len(adapter.layers), dtype=torch.float64)
    for batch in batches:
        states = boundary_states(model, adapter, batch)
        for i in range(len(states) - 1):
            total[i] += (1 - F.cosine_similarity(states[i], states[i + 1], dim=-1)).sum().item()
    return {"layer": total.float()}


def _angular_distance(model, adapter, batches) -> dict[str, torch.Tensor]:
    n_layers = len(adapter.layers)
    sums = torch.zeros(n_layers + 1, n_layers + 1, dtype=torch.float64)
    tokens = 0
    for batch in batches:
        unit = F.normalize(torch.stack(boundary_states(model, adapter, batch)), dim=-1)  # [L+1, N, H]
        cos = torch.einsum("inh,jnh->ijn", unit, unit).clamp(-1, 1)
        sums += (torch.arccos(cos) / math.pi).sum(-1).double().cpu()
        tokens += unit.shape[1]
    distance = torch.full((n_layers, n_layers), math.inf)
    for n in range(1, n_layers + 1):
        for start in range(n_layers - n + 1):
            distance[n - 1, start] = sums[start, start + n] / max(tokens, 1)
    return {"block_distance": distance}


def _answer_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _calibration_loss(model, batches) -> float:
    """Next-token loss on answer tokens, averaged over all of them (independent of batching)."""
    total = sum(_answer_tokens(b) for b in batches)
    if total == 0:
        raise HarnessError("calibration samples have no answer tokens to compute a loss on")
    loss = 0.0
    with torch.no_grad():
        for batch in batches:
            if _answer_tokens(batch):
                loss += model(**_inputs(batch, True), use_cache=False).loss.item() * _answer_tokens(batch) / total
    return loss


def _layer_loss(model, adapter, batches) -> dict[str, torch.Tensor]:
    base = _calibration_loss(model, batches)
    scores = []
    for layer in adapter.layers:
        skip = layer.register_forward_hook(lambda m, args, kwargs, out: _layer_input(args, kwargs), with_kwargs=True)
        with _hooks([skip]):
            scores.append(_calibration_loss(model, batches) - base)
    return {"layer": torch.tensor(scores)}


def _scored_params(adapter: LMAdapter) -> list[nn.Parameter]:
    """Every parameter a width score reads: the decoder linears and each hidden or projector channel's slices."""
    params = {}
    for layer in adapter.layers:
        (attn_in, attn_out), (mlp_in, mlp_out) = adapter.attn_linears(layer), adapter.mlp_linears(layer)
        for lin in [*attn_in, attn_out, *mlp_in, mlp_out]:
            params.update((id(p), p) for p in lin.parameters())
    params.update((id(s.param), s.param) for s in hidden_slices(adapter) + projector_slices(adapter))
    return list(params.values())


def _taylor(model, adapter, batches) -> dict[str, torch.Tensor]:
    """One backward of the answer-token loss (token-weighted over batches), then |W * grad| per group."""
    total = sum(_answer_tokens(b) for b in batches)
    if total == 0:
        raise HarnessError("calibration samples have no answer tokens to compute a loss on")
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    params = _scored_params(adapter)
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    try:
        for batch in batches:
            if _answer_tokens(batch):
                loss = model(**_inputs(batch, True), use_cache=False).loss
                (loss * _answer_tokens(batch) / total).backward()
        return _width_scores(adapter, _weight_times_grad)
    finally:
        for p in params:
            p.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _weight_times_grad(p: nn.Parameter) -> torch.Tensor:
    if p.grad is None:  # a projection the loss does not reach
        return torch.zeros_like(p, dtype=torch.float32)
    return (p.float() * p.grad.float()).abs()


def _magnitude(model, adapter, batches) -> dict[str, torch.Tensor]:
    scores = _width_scores(adapter, lambda p: p.float() ** 2)
    return {k: v.sqrt() for k, v in scores.items()}


def _width_scores(adapter: LMAdapter, element: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum an element-wise score over each unit's weights: groups, MLP channels, hidden and projector channels."""
    return {**_group_scores(adapter, element), "hidden": _slice_sums(hidden_slices(adapter), element),
            "projector": _slice_sums(projector_slices(adapter), element)}


def _slice_sums(slices: list[ChannelSlice], element) -> torch.Tensor:
    """Per channel, the element-wise score summed over every slice (over all dimensions but the channel's)."""
    total = 0
    with torch.no_grad():
        for s in slices:
            values = element(s.param).float()
            others = [d for d in range(values.dim()) if d != s.dim]
            total = total + (values.sum(dim=others) if others else values)  # (sum over dim=[] would sum all)
    return total.cpu()


def _group_scores(adapter: LMAdapter, element: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum an element-wise score over each KV group's and each MLP channel's weights and biases."""
    attn, mlp = [], []
    with torch.no_grad():
        for layer in adapter.layers:
            (q, k, v), o = adapter.attn_linears(layer)
            groups = k.out_features // adapter.head_dim
            per_group = sum(_row_sums(lin, element).view(groups, -1).sum(1) for lin in (q, k, v))
            attn.append(per_group + element(o.weight).float().sum(0).view(groups, -1).sum(1))
            ins, out = adapter.mlp_linears(layer)
            mlp.append(sum(_row_sums(lin, element) for lin in ins) + element(out.weight).float().sum(0))
    return {"attn": torch.stack(attn).cpu(), "mlp": torch.stack(mlp).cpu()}


def _row_sums(lin: nn.Linear, element) -> torch.Tensor:
    rows = element(lin.weight).float().sum(1)
    return rows + element(lin.bias).float() if lin.bias is not None else rows


def _activation(model, adapter, batches) -> dict[str, torch.Tensor]:
    """Minitron: per sample, the mean over its tokens of each head's output norm / each channel's |activation|;
    then the L2 norm over samples. A KV group scores the sum of its query heads; a hidden channel
    the sum over the decoder's norms of its |norm output|; a projector channel its |activation|
    entering the projector's last linear (there a sample is one image, its tokens the image's)."""
    layers = list(adapter.layers)
    norms = norm_modules(adapter)
    sq_attn = [None] * len(layers)
    sq_mlp = [None] * len(layers)
    sq_norm = [None] * len(norms)
    sq_projector = [torch.zeros(projector_linears(adapter)[1].in_features, dtype=torch.float64)]
    mask = {}

    def accumulate(store, i, per_token, valid=None):  # per_token: [samples, tokens, units]
        m = (mask["valid"] if valid is None else valid)[..., None]
        per_sample = (per_token * m).sum(1) / m.sum(1).clamp(min=1)
        squares = (per_sample.double() ** 2).sum(0).cpu()
        store[i] = squares if store[i] is None else store[i] + squares

    def attn_hook(i):
        def hook(module, args):
            x = args[0]
            accumulate(sq_attn, i, x.float().reshape(*x.shape[:2], -1, adapter.head_dim).norm(dim=-1))
        return hook

    def mlp_hook(i):
        def hook(module, args):
            accumulate(sq_mlp, i, args[0].float().abs())
        return hook

    def norm_hook(i):
        def hook(module, args, output):
            accumulate(sq_norm, i, output.float().abs())
        return hook

    def projector_hook(module, args):
        x = args[0].float().abs().reshape(-1, *args[0].shape[-2:])  # [images, image tokens, channels]
        accumulate(sq_projector, 0, x, valid=x.new_ones(x.shape[:2]))

    handles = [projector_linears(adapter)[1].register_forward_pre_hook(projector_hook)]
    handles += [norm.register_forward_hook(norm_hook(i)) for i, norm in enumerate(norms)]
    for i, layer in enumerate(layers):
        handles.append(adapter.attn_linears(layer)[1].register_forward_pre_hook(attn_hook(i)))
        handles.append(adapter.mlp_linears(layer)[1].register_forward_pre_hook(mlp_hook(i)))
    with _hooks(handles), torch.no_grad():
        for batch in batches:
            mask["valid"] = batch["attention_mask"].float()
            model(**_inputs(batch), use_cache=False)
    groups = [adapter.attn_linears(layer)[0][1].out_features // adapter.head_dim for layer in layers]
    attn = [s.sqrt().view(g, -1).sum(1) for s, g in zip(sq_attn, groups, strict=True)]
    return {"attn": torch.stack(attn).float(), "mlp": torch.stack(sq_mlp).sqrt().float(),
            "hidden": torch.stack(sq_norm).sqrt().sum(0).float(), "projector": sq_projector[0].sqrt().float()}


_SCORERS = {
    "layer-bi": _block_influence,
    "layer-angular": _angular_distance,
    "layer-loss": _layer_loss,
    "width-taylor": _taylor,
    "width-activation": _activation,
    "width-magnitude": _magnitude,
}
