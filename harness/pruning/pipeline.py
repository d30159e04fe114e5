"""`harness prune MODEL --method METHOD --ratio R [R ...] --out DIR`: load, score (or reuse scores), prune, save.

Every check that can fail on bad input (method, ratios, settings, layer ranges,
granularity, model family, output directories) runs before any forward pass and before
anything is written. Several ratios in one call load the model, hash it and score it once.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from harness.errors import HarnessError
from harness.paths import DEFAULT_DATA, DEFAULT_IMPORTANCE_DIR
from harness.pruning.apply import apply_pruning
from harness.pruning.calibration import calibration_set
from harness.pruning.checkpoint import check_output_dir, save_pruned
from harness.pruning.memory import importance_estimate_line
from harness.pruning.methods import METHODS, get_method
from harness.pruning.plan import attention_layers, check_ratio, lm_shape, parse_layers, plan_layers, plan_width
from harness.pruning.scores import cached_importance, lookup_fingerprint
from harness.pruning.settings import PruneSettings
from harness.settings import add_arguments, from_args, from_mapping

RATIO_FIELD = "{ratio}"


def prune(model, method: str, ratio: float | Sequence[float], out: str | Path, settings: PruneSettings | None = None,
          *, processor=None, data: str | Path = DEFAULT_DATA, importance_dir: str | Path = DEFAULT_IMPORTANCE_DIR,
          **overrides) -> dict | list[dict]:
    """Prune `model` (a `harness.models.load` spec, or a loaded model with its `processor`) and save it to `out`.

    `settings` (a `PruneSettings`; keyword overrides of its fields are merged in) hold the
    calibration and width options. Scores come from `importance_dir` when this model, method
    and calibration set were scored before. With one ratio, returns its `pruning.json` record;
    with a list of ratios, one record per ratio: the model is then loaded, hashed and scored
    once, and `out` must hold `{ratio}` (`out/llava-{ratio}` -> `out/llava-0.3`). Every ratio
    and output folder is checked before anything is computed; one pruned model is held in
    memory at a time.
    """
    several = not isinstance(ratio, (int, float))
    ratios = list(ratio) if several else [ratio]
    scorer = get_method(method)
    settings = from_mapping(PruneSettings, overrides, "prune settings", base=settings or PruneSettings())
    settings.for_method(method)
    for r in ratios:
        check_ratio(r)
    outputs = ratio_outputs(ratios, out)
    source = _source(model)
    model, processor = _load(model, processor)
    settings = _check_plan(model, method, ratios, settings)  # every ratio must be possible; ranges parsed
    fingerprint, remember_fingerprint = lookup_fingerprint(model, source, importance_dir)
    for r, path in outputs.items():
        check_output_dir(path, {"source_fingerprint": fingerprint, "method": method, "ratio_requested": r,
                                **settings.width()})
    calib = estimate = None
    if scorer.needs_calibration:
        calib = calibration_set(data, settings.calibration_size(method), settings.calib_seed, settings.batch_size,
                                settings.max_length, settings.calib_max_text_tokens, settings.calib_require_image,
                                getattr(processor, "tokenizer", processor))

        def estimate():
            print(importance_estimate_line(model, method, settings.batch_size, settings.max_length), flush=True)

    importance = cached_importance(model, processor, method, calib, importance_dir, fingerprint, on_compute=estimate)
    remember_fingerprint()  # only now: a run refused on bad input writes nothing
    infos = []
    for r, path in outputs.items():
        pruned, info = apply_pruning(model, importance, r, settings)
        save_pruned(pruned, processor, info, path)
        del pruned  # before the next ratio builds its model
        infos.append(info)
    return infos if several else infos[0]


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


def _check_plan(model, method: str, ratios: Sequence[float], settings: PruneSettings) -> PruneSettings:
    """Plan every ratio on the model's shape so impossible requests fail early; returns settings with parsed ranges."""
    shape = lm_shape(model, settings.attn_unit)  # (layer methods keep the default unit: `for_method`)
    if get_method(method).family == "layer":
        for ratio in ratios:
            plan_layers(shape, ratio)
        return settings
    attn = list(attention_layers(shape, settings.attn_layers))
    mlp = list(parse_layers(settings.mlp_layers, shape.num_layers, "mlp_layers"))
    for ratio in ratios:
        plan_width(shape, ratio, tuple(attn), tuple(mlp), settings.per_layer_ratio, settings.round_to,
                   settings.prune_hidden)
    return dataclasses.replace(settings, attn_layers=attn, mlp_layers=mlp)


def add_prune_parser(subparsers) -> argparse.ArgumentParser:
    """Register `harness prune`; its setting flags come from `PruneSettings`."""
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
    p.add_argument("--importance-dir", type=Path, default=DEFAULT_IMPORTANCE_DIR,
                   help="where importance scores are stored and reused")
    add_arguments(p, PruneSettings)
    p.set_defaults(func=run_prune)
    return p


def run_prune(args: argparse.Namespace) -> dict | list[dict]:
    """The record of the one ratio asked for, or one record per ratio."""
    ratios = args.ratio if isinstance(args.ratio, list) else [args.ratio]
    infos = prune(args.model, args.method, ratios, args.out, from_args(PruneSettings, args), data=args.data,
                  importance_dir=args.importance_dir)
    for info, path in zip(infos, ratio_outputs(ratios, args.out).values(), strict=True):
        print(f"pruned {args.model} with {info['method']}: removed {info['ratio_achieved']:.4f} of LM parameters "
              f"(requested {info['ratio_requested']}), {info['lm_params_before']:,} -> {info['lm_params_after']:,}; "
              f"saved to {path}")
    return infos[0] if len(infos) == 1 else infos
