"""`harness prune MODEL --method METHOD --ratio R [R ...] --out DIR`: load, score (or reuse scores), prune, save.

Every check that can fail on bad input (method, ratios, layer ranges, granularity, model
family, output directories) runs before any forward pass and before anything is written.
Several ratios in one call load the model, hash it and score it once (`prune_ratios`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from harness.errors import HarnessError
from harness.models.flops import DEFAULT_CONTEXT
from harness.models.memory import importance_estimate_line
from harness.pruning.apply import apply_pruning, check_layer_settings
from harness.pruning.checkpoint import check_output_dir, save_pruned
from harness.pruning.importance import (
    DEFAULT_CALIB_SAMPLES,
    DEFAULT_SEED,
    LAYER_METHODS,
    METHODS,
    cached_importance,
    calibration_set,
    check_method,
    lookup_fingerprint,
    needs_calibration,
)
from harness.pruning.plan import check_ratio, lm_shape, parse_layers, plan_layers, plan_width

DEFAULT_DATA = Path("artifacts/data/synth")
DEFAULT_IMPORTANCE_DIR = Path("artifacts/importance")
RATIO_FIELD = "{ratio}"


def prune(model, method: str, ratio: float, out: str | Path, *, processor=None, data: str | Path = DEFAULT_DATA,
          calib_samples: int | None = None, calib_seed: int = DEFAULT_SEED, batch_size: int = 1,
          max_length: int = 512, per_layer_ratio: bool = False, attn_layers: str | None = None,
          mlp_layers: str | None = None, round_to: int = 1, importance_dir: str | Path = DEFAULT_IMPORTANCE_DIR,
          prune_hidden: bool = False, context: int = DEFAULT_CONTEXT) -> dict:
    """Prune `model` (a `harness.models.load` spec, or a loaded model with its `processor`) and save it to `out`.

    Returns the `pruning.json` record. Scores come from `importance_dir` when this model,
    method and calibration set were scored before. `prune_hidden` (width methods) also
    removes hidden channels: embeddings, norms, every projection, the LM head and the projector.
    """
    return prune_ratios(model, method, [ratio], out, processor=processor, data=data, calib_samples=calib_samples,
                        calib_seed=calib_seed, batch_size=batch_size, max_length=max_length,
                        per_layer_ratio=per_layer_ratio, attn_layers=attn_layers, mlp_layers=mlp_layers,
                        round_to=round_to, importance_dir=importance_dir, prune_hidden=prune_hidden,
                        context=context)[0]


def prune_ratios(model, method: str, ratios: Sequence[float], out: str | Path, *, processor=None,
                 data: str | Path = DEFAULT_DATA, calib_samples: int | None = None, calib_seed: int = DEFAULT_SEED,
                 batch_size: int = 1, max_length: int = 512, per_layer_ratio: bool = False,
                 attn_layers: str | None = None, mlp_layers: str | None = None, round_to: int = 1,
                 importance_dir: str | Path = DEFAULT_IMPORTANCE_DIR, prune_hidden: bool = False,
                 context: int = DEFAULT_CONTEXT) -> list[dict]:
    """`prune` to each of `ratios`, loading, hashing and scoring the model once; one record per ratio.

    `out` names the output folder; with several ratios it must hold `{ratio}`, replaced by
    each ratio (`out/llava-{ratio}` -> `out/llava-0.3`). Every ratio and output folder is
    checked before anything is computed; only one pruned model is held in memory at a time.
    """
    check_method(method)
    for ratio in ratios:
        check_ratio(ratio)
    outputs = ratio_outputs(ratios, out)
    settings = _settings(method, per_layer_ratio, attn_layers, mlp_layers, round_to, prune_hidden)
    source = _source(model)
    model, processor = _load(model, processor)
    checked = [_check_plan(model, method, ratio, settings) for ratio in outputs]  # every ratio must be possible
    settings = checked[0]  # (the same for every ratio: parsed layer ranges)
    fingerprint, remember_fingerprint = lookup_fingerprint(model, source, importance_dir)
    for ratio, path in outputs.items():
        check_output_dir(path, {"source_fingerprint": fingerprint, "method": method, "ratio_requested": ratio,
                                **settings})
    calib = estimate = None
    if needs_calibration(method):
        n = calib_samples if calib_samples is not None else DEFAULT_CALIB_SAMPLES[method]
        calib = calibration_set(data, n, calib_seed, batch_size, max_length)

        def estimate():
            print(importance_estimate_line(model, method, batch_size, max_length), flush=True)

    importance = cached_importance(model, processor, method, calib, importance_dir, fingerprint, on_compute=estimate)
    remember_fingerprint()  # only now: a run refused on bad input writes nothing
    infos = []
    for ratio, path in outputs.items():
        pruned, info = apply_pruning(model, importance, ratio, context=context, **settings)
        save_pruned(pruned, processor, info, path)
        del pruned  # before the next ratio builds its model
        infos.append(info)
    return infos


def ratio_outputs(ratios: Sequence[float], out: str | Path) -> dict[float, Path]:
    """Each ratio's output folder: `out` with `{ratio}` replaced (required when there are several ratios)."""
    ratios = list(ratios)
    if not ratios:
        raise HarnessError("give at least one ratio")
    if len(set(ratios)) != len(ratios):
        raise HarnessError(f"ratios repeat: {ratios}")
    if len(ratios) > 1 and RATIO_FIELD not in str(out):
        raise HarnessError(f"several ratios need an output template holding {RATIO_FIELD}, e.g. "
                           f"{Path(out) / 'pruned-{ratio}'}; got {out}")
    if RATIO_FIELD not in str(out):
        return {ratios[0]: Path(out)}
    return {r: Path(str(out).replace(RATIO_FIELD, f"{r:g}")) for r in ratios}


def _settings(method: str, per_layer_ratio: bool, attn_layers, mlp_layers, round_to: int,
              prune_hidden: bool) -> dict:
    settings = {"per_layer_ratio": per_layer_ratio, "attn_layers": attn_layers, "mlp_layers": mlp_layers,
                "round_to": round_to, "prune_hidden": bool(prune_hidden)}
    if method in LAYER_METHODS:
        check_layer_settings(settings)
    if round_to < 1:
        raise HarnessError(f"round_to must be >= 1, got {round_to}")
    return settings


def _source(model) -> Path | None:
    """The checkpoint folder a model spec loads from (its fingerprint can then be cached), else None."""
    if not isinstance(model, (str, Path)):
        return None
    from harness.models.loading import resolve

    where = resolve(model)
    return where if isinstance(where, Path) else None


def _load(model, processor):
    if isinstance(model, (str, Path)):
        from harness.models import load

        return load(model)
    if processor is None:
        raise HarnessError("a loaded model needs its processor")
    return model, processor


def _check_plan(model, method: str, ratio: float, settings: dict) -> dict:
    """Plan once on the model's shape so impossible requests fail early; returns settings with parsed ranges."""
    shape = lm_shape(model)
    if method in LAYER_METHODS:
        plan_layers(shape, ratio)
        return settings
    attn = list(parse_layers(settings["attn_layers"], shape.num_layers, "attn_layers"))
    mlp = list(parse_layers(settings["mlp_layers"], shape.num_layers, "mlp_layers"))
    plan_width(shape, ratio, tuple(attn), tuple(mlp), settings["per_layer_ratio"], settings["round_to"],
               settings["prune_hidden"])
    return {**settings, "attn_layers": attn, "mlp_layers": mlp}


def add_prune_parser(subparsers) -> argparse.ArgumentParser:
    """Register `harness prune`; the CLI calls `args.func(args)`."""
    p = subparsers.add_parser("prune", help="structurally prune the language model of an MLLM",
                              description=__doc__.splitlines()[0])
    p.add_argument("model", help="embedded model name, checkpoint directory or hub id")
    p.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--ratio", required=True, type=float, nargs="+",
                   help="share of LM parameters to remove, in (0, 1); with --per-layer-ratio, per layer. Several "
                        "ratios load and score the model once")
    p.add_argument("--out", required=True, type=Path,
                   help="output checkpoint directory; with several ratios a template holding {ratio}, "
                        "e.g. out/llava-bi-{ratio}")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="instruction mix dir (mix.json + images/)")
    p.add_argument("--calib-samples", type=int, default=None,
                   help="calibration samples (default: 50 for layer methods, 10 for taylor/activation)")
    p.add_argument("--calib-seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-length", type=int, default=512, help="calibration sequence length (tokens)")
    p.add_argument("--per-layer-ratio", action="store_true",
                   help="ratio is the fraction of heads and channels removed in each layer of the ranges")
    p.add_argument("--attn-layers", default=None, help="attention layers to prune, START:END (end exclusive)")
    p.add_argument("--mlp-layers", default=None, help="MLP layers to prune, START:END (end exclusive)")
    p.add_argument("--round-to", type=int, default=1,
                   help="keep MLP widths (and with --prune-hidden the hidden width) multiples of N")
    p.add_argument("--importance-dir", type=Path, default=DEFAULT_IMPORTANCE_DIR,
                   help="where importance scores are stored and reused")
    p.add_argument("--prune-hidden", action="store_true",
                   help="width methods: also prune the hidden size (embeddings, norms, every projection, LM head, "
                        "projector), the same fraction as heads and channels")
    p.set_defaults(func=run_prune)
    return p


def run_prune(args: argparse.Namespace) -> dict | list[dict]:
    """The record of the one ratio asked for, or one record per ratio."""
    ratios = args.ratio if isinstance(args.ratio, list) else [args.ratio]
    infos = prune_ratios(args.model, args.method, ratios, args.out, data=args.data, calib_samples=args.calib_samples,
                         calib_seed=args.calib_seed, batch_size=args.batch_size, max_length=args.max_length,
                         per_layer_ratio=args.per_layer_ratio, attn_layers=args.attn_layers,
                         mlp_layers=args.mlp_layers, round_to=args.round_to, importance_dir=args.importance_dir,
                         prune_hidden=args.prune_hidden)
    for info, path in zip(infos, ratio_outputs(ratios, args.out).values(), strict=True):
        print(f"pruned {args.model} with {info['method']}: removed {info['ratio_achieved']:.4f} of LM parameters "
              f"(requested {info['ratio_requested']}), {info['lm_params_before']:,} -> {info['lm_params_after']:,}; "
              f"saved to {path}")
    return infos[0] if len(infos) == 1 else infos
