"""`harness grid plan SPEC --dry-run`: size every (teacher, method, ratio) of a spec on the meta device.

Nothing is downloaded, no weight or data file is read, and no teacher is resolved: each
teacher is built from its config on the meta device (an embedded name from its spec, a
local checkpoint from its config.json, a real model from the config shipped in
`harness/models/configs/`), then planned and pruned there by the same code `harness prune`
runs (`plan_layers` / `plan_width`, `remove_layers` / `slice_widths`). Which layers, heads
and channels go depends on importance scores and is decided at run time; how many does not.

For every cell the report gives parameter counts before and after, the kept layers or
per-layer widths, the achieved ratio, and peak-memory estimates (`harness.models.memory`)
for importance estimation and for each recovery recipe, each with "fits 80 GB: yes/no".
Problems (an infeasible ratio, an unknown setting, a calibration length that would cut the
image tokens) are listed at the end instead of stopping the report.
"""

from __future__ import annotations

import json
from pathlib import Path

from harness.errors import HarnessError
from harness.pruning.methods import get_method

GB = 10**9


def teacher_config(teacher: str):
    """(multimodal config, where it came from) without touching the hub or any weights."""
    from harness.models.adapter import mllm_config
    from harness.models.real import find_real_config, known_names, real_config
    from harness.synthetic.models import EMBEDDED

    if teacher in EMBEDDED:
        from harness.synthetic.models import build_embedded

        return build_embedded(teacher)[0].config, "embedded spec (harness.synthetic.models)"
    local = Path(teacher) / "config.json"
    if local.is_file():
        try:
            return mllm_config(json.loads(local.read_text())), f"{local}"
        except (OSError, ValueError, TypeError) as e:
            raise HarnessError(f"{local}: not a readable multimodal config: {str(e).splitlines()[0]}") from None
    shipped = find_real_config(teacher)
    if shipped is not None:
        return real_config(teacher), f"shipped config harness/models/configs/{shipped.name}"
    raise HarnessError(f"dry run cannot size teacher {teacher!r}: not an embedded name, not a local checkpoint "
                       f"with config.json, and no shipped config (known: {', '.join(known_names())})")


def dry_run(spec) -> str:
    """The dry-run report of a loaded `Spec` (see the module docstring)."""
    cells = spec.cells()
    out = [f"experiment {spec.name}: {len(cells)} cells; dry run on the meta device (no weights, data or hub read)",
           f"data: {spec.data}   tasks: {', '.join(spec.tasks)}   seeds: {', '.join(map(str, spec.seeds))}",
           "memory: bf16 mixed precision (frozen weights bf16; trainable ones as fp32 masters with fp32 grads "
           "+ Adam), gradient checkpointing, teacher in bf16 without gradients (formulas: harness/models/memory.py, "
           "harness/pruning/memory.py, harness/recovery/memory.py); 80 GB = 80e9 bytes"]
    problems: list[str] = []
    worst: list[tuple[float, str, bool]] = []
    for teacher in spec.teachers:
        t_cells = [c for c in cells if c.teacher == teacher]
        if t_cells:
            out += _teacher_report(spec, teacher, t_cells, problems, worst)
    out.append("")
    if worst:
        imp = [w for w in worst if w[1].startswith("importance")]
        rec = [w for w in worst if not w[1].startswith("importance")]
        for label, group in (("importance estimation", imp), ("recovery", rec)):
            if group:
                peak = max(group)
                fits = all(w[2] for w in group)
                out.append(f"{label}: largest estimate {peak[0]:.1f} GB ({peak[1]}); "
                           f"all fit 80 GB: {'yes' if fits else 'no'}")
        misfits = [w[1] for w in worst if not w[2]]
        if misfits:
            out.append(f"do not fit one 80 GB GPU ({len(misfits)}): " + "; ".join(misfits[:12])
                       + (" ..." if len(misfits) > 12 else ""))
    out.append("problems: " + ("none" if not problems else f"{len(problems)}"))
    out += [f"  - {p}" for p in problems]
    return "\n".join(out)


# --- one teacher ---------------------------------------------------------------------------------


def _teacher_report(spec, teacher: str, cells, problems: list, worst: list) -> list[str]:
    import torch

    from harness.models.adapter import LMAdapter
    from harness.models.build import build_model
    from harness.models.memory import model_shape
    from harness.pruning.plan import lm_shape

    try:
        config, source = teacher_config(teacher)
        model = build_model(config, torch.bfloat16, "meta")
        adapter = LMAdapter(model)
    except HarnessError as e:
        problems.append(f"{teacher}: {e}")
        return ["", f"teacher {teacher}: cannot be sized ({e})"]
    shape, mshape = lm_shape(model), model_shape(model)
    tc = adapter.config
    out = ["", f"teacher {teacher}   [{source}]",
           f"  {adapter.family_name} LM: {shape.num_layers} layers, {adapter.num_heads} heads "
           f"({adapter.num_kv_heads} KV heads, head_dim {adapter.head_dim}), MLP {shape.channels[0]}, "
           f"hidden {tc.hidden_size}, vocab {tc.vocab_size}; image tokens {mshape.image_tokens}",
           f"  parameters: total {_b(mshape.total_params)} = vision {_b(mshape.vision_params)} + projector "
           f"{_b(mshape.projector_params)} + LM {_b(mshape.lm_params)} (embeddings and LM head included)"]
    methods = [m for m in spec.methods if any(c.method == m for c in cells)]
    out.append("  importance estimation memory:")
    settings = {m: _prune_settings(spec, m, mshape.image_tokens, problems, teacher) for m in methods}
    for method in methods:
        out.append("    " + _importance_line(config, method, settings[method], teacher, worst))
    for method in methods:
        for ratio in [r for r in spec.ratios if any(c.method == method and c.ratio == r for c in cells)]:
            recipes = [r for r in spec.recipes if r != "none"
                       and any(c.method == method and c.ratio == ratio and c.recovery == r for c in cells)]
            out += _cell_report(spec, teacher, model, shape, method, ratio, settings[method], recipes,
                                problems, worst)
    return out


def _prune_settings(spec, method: str, image_tokens: int, problems: list, teacher: str):
    """The `PruneSettings` `harness prune` receives for this method (load_spec has checked them)."""
    settings = spec.prune_settings_for(method)
    if get_method(method).needs_calibration and image_tokens and settings.max_length <= image_tokens:
        problems.append(f"{teacher} {method}: max_length {settings.max_length} counts the {image_tokens} image "
                        f"tokens too; it would cut the image and the forward pass would fail (use image tokens + "
                        f"text tokens)")
    return settings


def _importance_line(config, method: str, settings, teacher: str, worst: list) -> str:
    from harness.pruning.memory import estimate_importance_memory

    b, t = settings.batch_size, settings.max_length
    est = estimate_importance_memory(config, method, b, t)
    worst.append((est.total / GB, f"importance {teacher} {method}", est.fits()))
    n = settings.calibration_size(method)
    calib = f"{n} samples, batches of {b} x <= {t} tokens" if n else "no calibration data"
    return f"{method} ({calib}): {est.describe()}  fits 80 GB: {_yes(est.fits())}"


def _cell_report(spec, teacher, model, shape, method, ratio, settings, recipes, problems, worst) -> list[str]:
    head = f"  {method} @ {ratio:g}:"
    whole_layers = get_method(method).family == "layer"
    try:
        if whole_layers:
            student, lines = _layer_student(model, shape, ratio)
        else:
            student, lines = _width_student(model, shape, ratio, settings)
    except HarnessError as e:
        problems.append(f"{teacher} {method} @ {ratio:g}: {e}")
        return [f"{head} INFEASIBLE: {e}"]
    return [head, *lines, *_sizes(model, student, ratio, whole_layers, problems, teacher, method),
            *_recovery_lines(spec, teacher, model, student, method, ratio, recipes, problems, worst)]


def _layer_student(model, shape, ratio):
    from harness.pruning.plan import plan_layers
    from harness.pruning.surgery import remove_layers

    n = plan_layers(shape, ratio)
    student = remove_layers(model, list(range(n)))  # which n does not change the counts: layers are uniform
    return student, [f"    layers: remove {n} of {shape.num_layers} (the lowest-BI {n} layers, chosen at run time), "
                     f"keep {shape.num_layers - n}"]


def _width_student(model, shape, ratio, settings):
    from harness.models.adapter import LMAdapter
    from harness.pruning.plan import attention_layers, lm_shape, parse_layers, plan_width
    from harness.pruning.surgery import slice_widths

    shape = lm_shape(model, settings.attn_unit)
    attn = attention_layers(shape, settings.attn_layers)
    mlp = parse_layers(settings.mlp_layers, shape.num_layers, "mlp_layers")
    per_layer = settings.per_layer_ratio
    counts = plan_width(shape, ratio, attn, mlp, per_layer, settings.round_to, settings.prune_hidden)
    adapter = LMAdapter(model)
    kv, channels = adapter.num_kv_heads, shape.channels[0]
    per_group = adapter.num_heads // kv
    kept = []
    for i in range(shape.num_layers):
        removed = counts.groups_removed if i in counts.attn_layers else 0
        groups, heads = (kv, per_group - removed) if settings.attn_unit == "query" else (kv - removed, per_group)
        c = channels - (counts.channels_removed if i in counts.mlp_layers else 0)
        kept.append({"heads": [g * per_group + j for g in range(groups) for j in range(heads)],
                     "kv_heads": list(range(groups)), "mlp": list(range(c))})
    hidden = shape.hidden - counts.hidden_removed
    kept_hidden = list(range(hidden)) if settings.prune_hidden else None
    student = slice_widths(model, kept, kept_hidden, kept_hidden)  # the projector's inner width follows the hidden size
    pruned = next((k for i, k in enumerate(kept) if i in counts.attn_layers), kept[0])
    c_kept = channels - counts.channels_removed
    mode = "per-layer fraction" if per_layer else "share of LM parameters"
    removed_share = 1 - len(pruned["heads"]) / adapter.num_heads
    lines = [f"    ratio = {mode}; per layer: heads {len(pruned['heads'])}/{adapter.num_heads} "
             f"(KV heads {len(pruned['kv_heads'])}/{kv}, {removed_share:.1%} removed) in layers "
             f"{_ranges(counts.attn_layers)}; MLP channels {c_kept}/{channels} "
             f"({counts.channels_removed / channels:.1%} removed) in layers {_ranges(counts.mlp_layers)}; "
             f"other layers unchanged; hidden size {hidden}/{shape.hidden} "
             f"({counts.hidden_removed / shape.hidden:.1%} removed) (which heads/channels: highest scores kept, "
             f"at run time)"]
    return student, lines


def _sizes(model, student, ratio, whole_layers: bool, problems, teacher, method) -> list[str]:
    from harness.models.adapter import LMAdapter
    from harness.models.flops import count_params
    from harness.pruning.plan import TOLERANCE

    lm0, lm1 = LMAdapter(model).lm_parameters(), LMAdapter(student).lm_parameters()
    achieved = 1 - lm1 / lm0
    if whole_layers:
        rule = "layers are whole: the +/-0.01 rule does not apply"
    else:
        ok = abs(achieved - ratio) <= TOLERANCE
        rule = f"within +/-{TOLERANCE}: {_yes(ok)}"
        if not ok:
            problems.append(f"{teacher} {method} @ {ratio:g}: achieved {achieved:.4f}, not within {TOLERANCE}")
    return [f"    achieved ratio {achieved:.4f} of LM parameters (requested {ratio:g}; {rule})",
            f"    parameters: total {_b(count_params(model))} -> {_b(count_params(student))}, "
            f"LM {_b(lm0)} -> {_b(lm1)}"]


def _recovery_lines(spec, teacher, model, student, method, ratio, recipes, problems, worst) -> list[str]:
    from harness.recovery.memory import estimate_recovery_memory
    from harness.recovery.recipes import get_recipe

    if not recipes:
        return []
    lines = []
    for name in recipes:
        try:
            recipe = get_recipe(name, **{**spec.recover_settings, **spec.recipe_settings.get(name, {})})
        except HarnessError as e:
            problems.append(f"{name}: {e}")
            continue
        est = estimate_recovery_memory(student, model, recipe)
        worst.append((est.total / GB, f"{teacher} {method}@{ratio:g} {name}", est.fits()))
        if not lines:
            lines.append(f"    recovery memory (micro-batch {recipe.batch_size} x {recipe.max_length} tokens):")
        lines.append(f"      {name:22s} {est.describe()}  fits 80 GB: {_yes(est.fits())}{_sharded(student, model, recipe, est)}")
    return lines


def _sharded(student, teacher, recipe, est) -> str:
    """For a step that does not fit: how many GPUs sharding gradients and optimizer states would do."""
    from harness.recovery.memory import estimate_recovery_memory

    if est.fits():
        return ""
    for n in range(2, 9):
        if estimate_recovery_memory(student, teacher, recipe, optimizer_shards=n).fits():
            return f" (fits with gradients, Adam states and fp32 masters sharded over {n} GPUs, ZeRO-2/FSDP)"
    return " (not even with gradients, Adam states and fp32 masters sharded over 8 GPUs)"


# --- formatting ----------------------------------------------------------------------------------


def _b(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _ranges(indices) -> str:
    """(3, 4, 5, 9) -> '3-5, 9'; empty -> 'none'."""
    indices = sorted(indices)
    if not indices:
        return "none"
    spans, start, prev = [], indices[0], indices[0]
    for i in indices[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        spans.append(f"{start}-{prev}" if prev > start else f"{start}")
        if i is not None:
            start = prev = i
    return ", ".join(spans)
