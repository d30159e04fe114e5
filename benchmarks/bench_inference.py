"""Inference speedup of pruned models against the unpruned one, next to the speedup their MACs promise.

Two models (`--model`), each its own run (`make bench` runs both: `inference`, `inference_smol`):
- `mid` (default): a mid-size LLaVA-shaped model built by the harness's own builder
  (`build_embedded("tiny-llava", scale=MID_SIZE)`: the small CLIP tower and projector of
  tiny-llava, a Llama language model with hidden 768, 12 layers, 12 heads, MLP 3072, 113M LM
  parameters; random weights).
- `smol`: smol-llava (`harness.synthetic.models.build_smol_llava`): the real pretrained weights
  of SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, hidden 576, MLP 1536) as
  the language model of a LLaVA wrapper (random CLIP tower and projector). The wrapper, not
  the plain causal LM, because it is what the harness prunes (`LMAdapter` and `apply_pruning`
  take a LLaVA model) and evaluates; the timed work is the same language-model forward either
  way, plus the wrapper's embedding lookup and image-token check, a per-call cost that is the
  same before and after pruning. Its vocabulary is SmolLM2's 49152 tokens plus `<image>`.
  Width pruning removes whole KV groups (the default `attn_unit group`: 3 of them, so one
  group is a third of the attention); `attn_unit query` (query heads inside the groups) is
  compared at `--compare-ratios`.
Pruned copies come from the normal pruning API, `apply_pruning`: layer pruning with random
layer scores (Block Influence needs data; which layers go does not change the speed) and
`width-magnitude` (needs no data; which channels go does not change the speed either) with
`round_to`, at 15/30/45 % of LM parameters (embeddings and LM head included; on SmolLM2 they are
35 % of the LM, so 45 % of the LM is 69 % of its decoder layers).

What is timed: the language model through the LLaVA wrapper (`model(input_ids=...)`,
embeddings, decoder, final norm, LM head; text tokens only: the vision tower runs once per
image and is never pruned), under `torch.inference_mode`, fp32, with a fixed number of
torch threads (1 by default: on a 2-core machine shared with other jobs, one thread is the
reproducible setting).
- prefill: one forward of a `--prompt`-token prompt with a fresh KV cache, batch 1 and 8;
- decode: `--steps` cached single-token forwards after a `--prompt`-token prompt (the cache
  is cropped back to the prompt before every repetition), batch 1 and 8.

Method: all models live in one process; after one warm-up round, each round times every model
once, in an order rotated every round and interleaved step by step (decode: step 1 of every
model, then step 2 of every model, ...; a prefill is one step), so slow phases of a contended
machine, even those shorter than one model's call, hit all models alike. Per round, speedup =
baseline time / pruned time of that round (paired), and efficiency = speedup / ideal speedup;
a point's figure is the median over rounds with its spread (the order-statistic interval of
the median, `_common.figure`: with the default 8 rounds, the second lowest..second highest
round; with the 5 of the costly prefill at batch 8, the lowest..highest), and a verdict only
where the spread lies on one side of the goal. Two clocks are read around every step: the
process's CPU time (the headline: with one thread all the work runs on the calling thread, so
it is what the work costs on a core, without the time the OS gives other jobs) and wall time
(in the JSON rows). The fastest-round figures of earlier versions are kept in the rows too.
Each row also records the page faults per call: glibc returns every large block to the OS
when it is freed, so a prefill at batch 8 faults its 201 MB of logits in anew on every call
(49152 faults), the same cost for every model and outside the MACs.

Ideal speedup = language-model MACs before / after for exactly the timed work
(`harness.models.flops.lm_macs_for_tokens`: linears + attention scores at the real context
lengths); the batch size cancels. `efficiency` = achieved speedup / ideal speedup; goals: >= 0.95
for layer pruning, >= 0.90 for width pruning, at every ratio, mode and batch.

Diagnostics, to explain what falls short (each point that does not meet its goal carries a
note built from them): width-pruned variants without rounding (`--compare-round-to 1`) and,
on grouped-query models, with `attn_unit query` (`--compare-attn-unit`), at `--compare-ratios`;
one layer's MLP GEMMs at the width each round_to gives (`round_to_sweep`); in the
`--decompose` modes (default: decode at batch 1 and 8, where per-call costs show) the LM's
linear layers alone, timed in the same rounds, which splits each model's time into the part
MACs describe and the rest; and a fit of time (and of MACs) against the number of layers over
the layer-pruned models (`layer_fit`).

    .venv/bin/python benchmarks/bench_inference.py [--model mid|smol] [--json results/bench/inference.json]
        [--threads 1] [--rounds 8] [--prompt 128] [--steps 16] [--round-to 64] [--ratios 0.15,0.3,0.45]
        [--modes prefill:1,prefill:8,decode:1,decode:8] [--layers N] [--quick]

`--quick`: a 4-layer copy of the model, one ratio, a 16-token prompt, 2 decode steps, one round
and no warm-up: a smoke run of seconds (figures meaningless, verdicts inconclusive).
"""

from __future__ import annotations

import argparse
import functools
import gc
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import figure, machine_info, median_interval, paired_ratios, write_result  # noqa: E402
from torch import nn  # noqa: E402

# Llama-7B-like proportions at 1/5.3 of the width: hidden 768 (12 heads of 64), MLP 4x hidden.
MID_SIZE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                num_key_value_heads=12, max_position_embeddings=1024)
GOALS = {"layer": 0.95, "width": 0.90}
MODES = (("prefill", 1), ("prefill", 8), ("decode", 1), ("decode", 8))
# The headline clock. With one torch thread all the work runs on the calling thread, so the process's CPU time
# is the time the work takes on a core, without the time the OS gives other jobs' processes (wall time on a
# contended machine mixes both). Wall-clock figures are kept beside it in every row.
PRIMARY_CLOCK = "cpu"
# Per model: what `--model` builds, and the defaults that differ between them.
MODELS = {
    "mid": {"name": "inference", "quick_ratios": "0.3", "compare_attn_unit": "",
            "builder": "harness.synthetic.models.build_embedded('tiny-llava', scale=MID_SIZE)"},
    "smol": {"name": "inference_smol", "quick_ratios": "0.1", "compare_attn_unit": "query",
             "builder": "harness.synthetic.models.build_smol_llava(seed=0, layers=LAYERS): SmolLM2-135M-Instruct "
                        "weights as the LM of a LLaVA wrapper"},
}


@dataclass
class Variant:
    """One model under test: the baseline or a pruned copy with its pruning record.

    `tag` marks the comparison variants ("r1": widths not rounded, "query": attn_unit query);
    the main variants (tag "") are the ones held to the goals."""

    name: str
    kind: str  # "base" | "layer" | "width"
    model: nn.Module
    ratio: float = 0.0
    info: dict = field(default_factory=dict)
    tag: str = ""


def build_base(scale: dict | None = None, seed: int = 0) -> tuple[nn.Module, object]:
    """The unpruned mid-size model (eval mode, fp32) and its processor."""
    from harness.synthetic.models import build_embedded

    model, processor = build_embedded("tiny-llava", seed=seed, scale=dict(MID_SIZE, **(scale or {})))
    return model.eval(), processor


def build_smol(layers: int | None = None, seed: int = 0) -> tuple[nn.Module, object]:
    """smol-llava on the pretrained SmolLM2-135M-Instruct (its first `layers` decoder layers if given), eval, fp32."""
    from harness.synthetic.models import build_smol_llava

    model, processor = build_smol_llava(seed=seed, layers=layers)
    return model.float().eval(), processor


def layer_variant(model: nn.Module, ratio: float, seed: int = 0) -> Variant:
    """Layer pruning through `apply_pruning`, from random Block-Influence-style layer scores."""
    from harness.models.adapter import LMAdapter
    from harness.pruning import Importance, apply_pruning

    n = len(LMAdapter(model).layers)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    pruned, info = apply_pruning(model, Importance("layer-bi", {"layer": scores}), ratio)
    return Variant(f"layer {ratio:.0%}", "layer", pruned.eval(), ratio, info)


def width_variant(model: nn.Module, ratio: float, round_to: int, importance=None, attn_unit: str = "group",
                  tag: str = "") -> Variant:
    """Width pruning with `width-magnitude` scores (no data needed), `round_to` and `attn_unit`."""
    from harness.pruning import apply_pruning, compute_importance

    importance = importance or compute_importance(model, None, "width-magnitude", None)
    pruned, info = apply_pruning(model, importance, ratio, round_to=round_to, attn_unit=attn_unit)
    suffix = f" r{round_to}" + (f" {attn_unit}" if attn_unit != "group" else "")
    return Variant(f"width {ratio:.0%}{suffix}", "width", pruned.eval(), ratio, info, tag)


def variants(base: nn.Module, ratios, round_to: int, extra_round_to: tuple[int, ...] = (),
             extra_ratios=(), extra_attn_units: tuple[str, ...] = ()) -> list[Variant]:
    """Baseline, layer-pruned and width-pruned models, plus width at other `round_to` values and other attention
    units (at the main `round_to`) at `extra_ratios`: comparisons, not held to the goals."""
    from harness.pruning import compute_importance

    out = [Variant("base", "base", base)]
    out += [layer_variant(base, r) for r in ratios]
    magnitude = compute_importance(base, None, "width-magnitude", None)
    out += [width_variant(base, r, round_to, magnitude) for r in ratios]
    for extra in extra_round_to:
        out += [width_variant(base, r, extra, magnitude, tag=f"r{extra}") for r in extra_ratios]
    for unit in extra_attn_units:
        out += [width_variant(base, r, round_to, magnitude, attn_unit=unit, tag=unit) for r in extra_ratios]
    return out


def widths(model: nn.Module) -> dict:
    """Layers, query and KV width and MLP width of the first layer (uniform pruning keeps them equal)."""
    from harness.models.adapter import LMAdapter

    a = LMAdapter(model)
    (q, k, _), _ = a.attn_linears(a.layers[0])
    return {"layers": len(a.layers), "q_width": q.out_features, "kv_width": k.out_features,
            "mlp_width": a.mlp_linears(a.layers[0])[1].in_features}


# --- ideal speedups ------------------------------------------------------------------------------


def work_macs(model: nn.Module, mode: str, prompt: int, steps: int) -> int:
    """LM MACs of the timed work at batch 1: a prefill of `prompt` tokens, or `steps` decode steps after it."""
    from harness.models.flops import lm_macs_for_tokens

    if mode == "prefill":
        return lm_macs_for_tokens(model, prompt)
    return lm_macs_for_tokens(model, steps, past=prompt)


def ideal_speedup(base: nn.Module, pruned: nn.Module, mode: str, prompt: int, steps: int) -> float:
    return work_macs(base, mode, prompt, steps) / work_macs(pruned, mode, prompt, steps)


# --- the timed work ------------------------------------------------------------------------------


def _tokens(model: nn.Module, batch: int, length: int, seed: int) -> torch.Tensor:
    """Random ordinary token ids (never the image token)."""
    vocab = model.config.text_config.vocab_size
    image = model.config.image_token_index
    ids = torch.randint(5, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    return torch.where(ids == image, torch.full_like(ids, 5), ids)


class Work:
    """One repetition of the timed work as slices that run in order (decode: one slice per step; the linear layers:
    one slice per pass). `interleaved_times` alternates the models slice by slice, so a slow phase of the machine
    shorter than a repetition still falls on every model alike. Calling it runs the whole repetition."""

    def __init__(self, slices: list):
        self.slices = slices

    def __call__(self):
        out = None
        for step in self.slices:
            out = step()
        return out


def prefill_runner(model: nn.Module, batch: int, prompt: int, seed: int = 0) -> Work:
    """One prefill forward (fresh KV cache), a single slice; returns the logits."""
    ids = _tokens(model, batch, prompt, seed)

    def run():
        return model(input_ids=ids, use_cache=True).logits

    return Work([run])


def decode_runner(model: nn.Module, batch: int, prompt: int, steps: int, seed: int = 0) -> Work:
    """`steps` cached single-token forwards after a (pre-computed) prompt, one slice each; returns the last logits.
    The first slice crops the cache back to the prompt, so every repetition decodes the same tokens."""
    ids = _tokens(model, batch, prompt, seed)
    step_ids = _tokens(model, batch, steps, seed + 1)
    with torch.inference_mode():
        cache = model(input_ids=ids, use_cache=True).cache

    def step(i: int):
        if i == 0:
            cache.crop(prompt - cache.get_seq_length())  # transformers 5: a negative count of tokens to drop
        return model(input_ids=step_ids[:, i:i + 1], cache=cache, use_cache=True).logits

    return Work([functools.partial(step, i) for i in range(steps)])


def runner(model: nn.Module, mode: str, batch: int, prompt: int, steps: int) -> Work:
    if mode == "prefill":
        return prefill_runner(model, batch, prompt)
    return decode_runner(model, batch, prompt, steps)


def linear_runner(model: nn.Module, batch: int, tokens: int, calls: int, seed: int = 0) -> Work:
    """Only the LM's linear layers (decoder linears + LM head) on [batch, tokens] inputs, `calls` passes (one slice
    each): the part of the work that MACs count, without attention, norms, cache updates or Python module overhead."""
    from harness.models.adapter import LMAdapter

    a = LMAdapter(model)
    linears = [m for m in a.decoder.modules() if isinstance(m, nn.Linear)] + [a.lm_head]
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(batch, tokens, lin.in_features, generator=g, dtype=lin.weight.dtype) for lin in linears]

    def run():
        for lin, x in zip(linears, inputs, strict=True):
            lin(x)

    return Work([run] * calls)


def interleaved_times(runs: dict, rounds: int, warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    """Per clock ("cpu": process CPU time, "wall"), seconds of each run (a `Work` or a plain callable) per round;
    under "faults", the page faults (minor) each run caused in the round.

    Every round runs each once, in an order rotated each round, interleaved slice by slice: slice 1 of every
    run, then slice 2 of every run, and so on; a run's time in the round is the sum of its slices.
    """
    names = list(runs)
    works = {name: run if isinstance(run, Work) else Work([run]) for name, run in runs.items()}
    times = {clock: {name: [] for name in names} for clock in ("cpu", "wall", "faults")}
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                works[name]()
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            cpu, wall, faults = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
            gc.collect()
            gc.disable()
            try:
                for i in range(max(len(w.slices) for w in works.values())):
                    for name in order:
                        if i < len(works[name].slices):
                            f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                            c, w = time.process_time(), time.perf_counter()
                            works[name].slices[i]()
                            wall[name] += time.perf_counter() - w
                            cpu[name] += time.process_time() - c
                            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f
            finally:
                gc.enable()
            for name in names:
                times["cpu"][name].append(cpu[name])
                times["wall"][name].append(wall[name])
                times["faults"][name].append(faults[name])
    return times


def summarise(base: Variant, variant: Variant, times: dict, mode: str, batch: int, prompt: int, steps: int) -> dict:
    """Per-round (paired) speedups and efficiencies on both clocks: their medians and spreads, the ideal speedup,
    and the fastest-round figures beside them."""
    ideal = ideal_speedup(base.model, variant.model, mode, prompt, steps)
    tokens = batch * (prompt if mode == "prefill" else steps)
    row = {"variant": variant.name, "kind": variant.kind, "tag": variant.tag, "mode": mode, "batch": batch,
           "ratio_requested": variant.ratio, "ratio_achieved": variant.info.get("ratio_achieved"),
           "ideal_speedup": ideal, "rounds": len(times["cpu"][variant.name])}
    for clock in ("cpu", "wall"):
        t_base, t_var = times[clock][base.name], times[clock][variant.name]
        speedups = paired_ratios(t_base, t_var)
        eff = median_interval([s / ideal for s in speedups])
        med_b, med_v = statistics.median(t_base), statistics.median(t_var)
        row[clock] = {"base_ms": 1000 * med_b, "pruned_ms": 1000 * med_v,
                      "base_ms_per_token": 1000 * med_b / tokens, "pruned_ms_per_token": 1000 * med_v / tokens,
                      "achieved_speedup": statistics.median(speedups), "efficiency": eff["value"],
                      "efficiency_lo": eff["lo"], "efficiency_hi": eff["hi"], "coverage": eff["coverage"],
                      "round_speedups": speedups,
                      "fastest_round_speedup": min(t_base) / min(t_var),
                      "fastest_round_efficiency": min(t_base) / min(t_var) / ideal,
                      "spread_base": max(t_base) / min(t_base), "spread_pruned": max(t_var) / min(t_var)}
    row["efficiency"] = row[PRIMARY_CLOCK]["efficiency"]
    if "faults" in times:
        row["page_faults_per_call"] = {"base": statistics.median(times["faults"][base.name]),
                                       "pruned": statistics.median(times["faults"][variant.name])}
    lin_base, lin_var = f"{base.name} [linears]", f"{variant.name} [linears]"
    if lin_var in times[PRIMARY_CLOCK]:
        from harness.models.flops import lm_linear_macs

        t = times[PRIMARY_CLOCK]
        total_b, total_v = statistics.median(t[base.name]), statistics.median(t[variant.name])
        linear_b, linear_v = statistics.median(t[lin_base]), statistics.median(t[lin_var])
        ideal_linear = lm_linear_macs(base.model) / lm_linear_macs(variant.model)
        row["decomposition"] = {
            "clock": PRIMARY_CLOCK, "statistic": "median over rounds",
            "base_linear_ms": 1000 * linear_b, "pruned_linear_ms": 1000 * linear_v,
            "base_rest_ms": 1000 * (total_b - linear_b), "pruned_rest_ms": 1000 * (total_v - linear_v),
            "rest_share_base": (total_b - linear_b) / total_b,
            "linear_speedup": linear_b / linear_v, "linear_ideal_speedup": ideal_linear,
            "linear_efficiency": linear_b / linear_v / ideal_linear,
            "rest_speedup": (total_b - linear_b) / max(total_v - linear_v, 1e-9),
        }
    return row


def bench(all_variants: list[Variant], modes=MODES, prompt: int = 128, steps: int = 32, rounds: int = 8,
          rounds_for=None, decompose=(("decode", 1), ("decode", 8)), warmup: int = 1, log=print) -> list[dict]:
    """Time every mode on every variant (interleaved) and summarise each pruned variant against the baseline.

    In the `decompose` modes the linear layers alone are timed too (same rounds), which splits each
    model's time into the part MACs describe and the rest.
    """
    base = all_variants[0]
    rows = []
    for mode, batch in modes:
        runs = {v.name: runner(v.model, mode, batch, prompt, steps) for v in all_variants}
        if (mode, batch) in decompose:
            tokens, calls = (prompt, 1) if mode == "prefill" else (1, steps)
            runs.update({f"{v.name} [linears]": linear_runner(v.model, batch, tokens, calls) for v in all_variants})
        n = rounds_for(mode, batch) if rounds_for else rounds
        start = time.perf_counter()
        times = interleaved_times(runs, n, warmup=warmup)
        log(f"-- {mode} batch {batch}: {n} rounds in {time.perf_counter() - start:.0f} s; baseline median "
            f"{1000 * statistics.median(times['cpu'][base.name]):.1f} ms CPU, "
            f"{1000 * statistics.median(times['wall'][base.name]):.1f} ms wall")
        for v in all_variants[1:]:
            row = summarise(base, v, times, mode, batch, prompt, steps)
            rows.append(row)
            c, w = row["cpu"], row["wall"]
            log(f"   {v.name:18s} ideal {row['ideal_speedup']:5.3f} | CPU {c['pruned_ms']:8.1f} ms speedup "
                f"{c['achieved_speedup']:5.3f} eff {c['efficiency']:5.3f} [{c['efficiency_lo']:5.3f}, "
                f"{c['efficiency_hi']:5.3f}] (fastest round {c['fastest_round_efficiency']:5.3f}) "
                f"| wall eff {w['efficiency']:5.3f} [{w['efficiency_lo']:5.3f}, {w['efficiency_hi']:5.3f}]")
            if "decomposition" in row:
                d = row["decomposition"]
                log(f"   {'':18s} linears {d['base_linear_ms']:.1f} -> {d['pruned_linear_ms']:.1f} ms (eff "
                    f"{d['linear_efficiency']:5.3f}), rest {d['base_rest_ms']:.1f} -> {d['pruned_rest_ms']:.1f} ms "
                    f"({d['rest_share_base']:.0%} of the baseline)")
        del runs
        gc.collect()
    return rows


def round_to_sweep(base: nn.Module, ratio: float = 0.3, round_tos=(1, 8, 32, 64), tokens=(1, 128, 1024),
                   rounds: int = 4) -> list[dict]:
    """Why `round_to`: one layer's MLP GEMMs (gate, up, down; random weights) at the width each `round_to` gives
    at `ratio`, against the unpruned width, per token count. efficiency = speedup / (width ratio), per round
    (paired), median and spread over rounds."""
    from harness.models.adapter import LMAdapter
    from harness.pruning.plan import lm_shape, parse_layers, plan_width

    shape = lm_shape(base)
    hidden = LMAdapter(base).config.hidden_size
    full = shape.channels[0]
    every = parse_layers(None, shape.num_layers, "layers")
    widths = {"base": full}
    for r in round_tos:
        widths[f"r{r}"] = full - plan_width(shape, ratio, every, every, False, r).channels_removed
    out = []
    for m in tokens:
        runs = {}
        for label, width in widths.items():
            g = torch.Generator().manual_seed(width)
            x, xi = torch.randn(m, hidden, generator=g), torch.randn(m, width, generator=g)
            w_in = [torch.randn(width, hidden, generator=g) for _ in range(2)]
            w_out = torch.randn(hidden, width, generator=g)

            def run(x=x, xi=xi, w_in=w_in, w_out=w_out):
                for w in w_in:
                    torch.nn.functional.linear(x, w)
                torch.nn.functional.linear(xi, w_out)

            runs[label] = run
        reps = max(1, rounds if m >= 1024 else 3 * rounds)
        t = interleaved_times(runs, reps)[PRIMARY_CLOCK]
        for label, width in widths.items():
            if label == "base":
                continue
            eff = [s * width / full for s in paired_ratios(t["base"], t[label])]
            stats = median_interval(eff)
            out.append({"tokens": m, "round_to": int(label[1:]), "mlp_width": width, "base_width": full,
                        "speedup": stats["value"] * full / width, "ideal_speedup": full / width,
                        "efficiency": stats["value"], "efficiency_lo": stats["lo"], "efficiency_hi": stats["hi"],
                        "rounds": reps, "round_efficiencies": eff})
    return out


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope and intercept of y against x."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else float("nan")
    return slope, my - slope * mx


def layer_fit(rows: list[dict], all_variants: list[Variant]) -> dict:
    """Per mode: least-squares fit of the median time per call against the number of decoder layers, over the
    baseline and the layer-pruned models. The intercept is the per-call cost that no layer carries (embeddings,
    LM head, final norm, masks, the wrapper's Python): what layer pruning cannot remove. The same fit of the MACs
    (from the ideal speedups) gives the share of the work's MACs that no layer carries (the LM head): when the
    time share is larger, that part runs slower per MAC than the layers, and layer pruning falls short of its
    MAC-ideal speedup by that much."""
    layers = {v.name: bi_layers(v.model) for v in all_variants}
    fits = {}
    for key in sorted({(r["mode"], r["batch"]) for r in rows}):
        mine = [r for r in rows if (r["mode"], r["batch"]) == key and r["kind"] == "layer" and not r.get("tag")]
        if not mine:
            continue
        points = [(layers["base"], mine[0][PRIMARY_CLOCK]["base_ms"])]
        points += [(layers[r["variant"]], r[PRIMARY_CLOCK]["pruned_ms"]) for r in mine]
        slope, intercept = _line(points)
        _, mac_intercept = _line([(layers["base"], 1.0)] + [(layers[r["variant"]], 1 / r["ideal_speedup"])
                                                              for r in mine])
        fits[f"{key[0]}_b{key[1]}"] = {"ms_per_layer": slope, "ms_fixed": intercept,
                                       "fixed_share_of_base": intercept / points[0][1],
                                       "fixed_mac_share_of_base": mac_intercept, "points": points}
    return fits


def bi_layers(model: nn.Module) -> int:
    return widths(model)["layers"]


def point_key(row: dict) -> str:
    """`layer_30pct_decode_b1_efficiency`; comparison variants carry their tag (`width_30pct_r1_...`)."""
    pct = round(100 * row["ratio_requested"])
    tag = f"_{row['tag']}" if row.get("tag") else ""
    return f"{row['kind']}_{pct}pct{tag}_{row['mode']}_b{row['batch']}_efficiency"


def explain(row: dict, fits: dict | None = None) -> str:
    """What the diagnostics measured about a point below its goal: the reason, stated with numbers."""
    parts = []
    d = row.get("decomposition")
    if d:
        parts.append(f"linear layers run at {d['linear_efficiency']:.2f} of their MAC-ideal speedup; the rest "
                     f"(norms, rotary, SDPA, KV cache, Python: {d['rest_share_base']:.0%} of the unpruned time) "
                     f"shrinks {d['rest_speedup']:.2f}x against the ideal {row['ideal_speedup']:.2f}x")
    fit = (fits or {}).get(f"{row['mode']}_b{row['batch']}")
    if fit and row["kind"] == "layer":
        parts.append(f"per-call cost no layer carries: {fit['ms_fixed']:.1f} ms, {fit['fixed_share_of_base']:.0%} "
                     f"of the unpruned time against {fit['fixed_mac_share_of_base']:.0%} of its MACs (layer fit)")
    faults = row.get("page_faults_per_call", {})
    if faults.get("base", 0) >= 1000:
        parts.append(f"{faults['base']:.0f} page faults per unpruned call ({faults['pruned']:.0f} pruned): memory "
                     "handed back to the OS and faulted in anew on every call, the same for every model")
    if not parts:
        parts.append(f"no decomposition in this mode (see --decompose); unpruned {row[PRIMARY_CLOCK]['base_ms']:.1f} ms")
    return "; ".join(parts)


def headline(rows: list[dict], round_to: int, sweep: list[dict] | None = None, fits: dict | None = None) -> dict:
    """One figure per point (kind, ratio, mode, batch) on the headline clock: the main variants are held to their
    goal, the comparison variants and the `round_to` sweep are information. Points that do not meet their goal
    carry the diagnostics' explanation as a note."""
    figures = {}
    for row in rows:
        c = row[PRIMARY_CLOCK]
        effs = [s / row["ideal_speedup"] for s in c["round_speedups"]]
        if row["tag"]:
            goal = (f"information: {row['variant']} (compare with the round_to={round_to}, attn_unit group variant "
                    "at the same ratio)")
        else:
            goal = (f">= {GOALS[row['kind']]} (measured / MAC-ideal speedup {row['ideal_speedup']:.3f}, "
                    f"{PRIMARY_CLOCK} time, median of paired rounds)")
        f = figure(effs, goal)
        if f["verdict"] in ("MISSES", "inconclusive") and f["n"] > 1:
            f["note"] = explain(row, fits)
        figures[point_key(row)] = f
    for row in sweep or []:
        if row["tokens"] == max(r["tokens"] for r in sweep) and row["round_to"] in (1, round_to):
            key = f"mlp_gemm_{row['tokens']}tok_r{row['round_to']}_efficiency"
            figures[key] = figure(row["round_efficiencies"],
                                  f"information: one layer's MLP GEMMs at width {row['mlp_width']} vs {row['base_width']}")
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mid", help="mid: random-weight mid-size LLaVA; "
                        "smol: smol-llava with SmolLM2-135M-Instruct's real weights")
    parser.add_argument("--layers", type=int, default=None, help="smol: keep only the first N decoder layers")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (fixed for the whole run)")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds per mode (5 for prefill batch 8)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill length, decode context)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per repetition")
    parser.add_argument("--ratios", default="0.15,0.3,0.45")
    parser.add_argument("--round-to", type=int, default=64, help="width pruning keeps MLP widths multiples of N")
    parser.add_argument("--compare-round-to", default="1",
                        help="also width-prune with these round_to values (comma list, '' for none) for comparison")
    parser.add_argument("--compare-attn-unit", default=None,
                        help="also width-prune with these attention units (comma list; default: query on smol)")
    parser.add_argument("--compare-ratios", default=None, help="ratios of the comparison variants (default 0.3)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the MLP GEMM sweep over round_to values")
    parser.add_argument("--modes", default="prefill:1,prefill:8,decode:1,decode:8", help="MODE:BATCH list")
    parser.add_argument("--decompose", default="decode:1,decode:8",
                        help="MODE:BATCH list where the linear layers are also timed alone ('' for none)")
    parser.add_argument("--quick", action="store_true", help="4-layer model, one ratio, one round: a smoke run")
    args = parser.parse_args(argv)

    spec = MODELS[args.model]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        args.ratios, args.prompt, args.steps = spec["quick_ratios"], 16, 2
    ratios = [float(r) for r in args.ratios.split(",")]
    extra = tuple(int(r) for r in args.compare_round_to.split(",") if r.strip() and int(r) != args.round_to)
    units = spec["compare_attn_unit"] if args.compare_attn_unit is None else args.compare_attn_unit
    extra_units = tuple(u for u in units.split(",") if u.strip() and u != "group")
    compare = args.compare_ratios or (spec["quick_ratios"] if args.quick else "0.3")
    compare_ratios = [float(r) for r in compare.split(",") if r.strip()]
    rounds = 1 if args.quick else args.rounds
    t0 = time.perf_counter()
    if args.model == "mid":
        scale = {"num_hidden_layers": 4} if args.quick else None
        base, _ = build_base(scale)
        model_info = {"scale": dict(MID_SIZE, **(scale or {}))}
    else:
        layers = 4 if args.quick and args.layers is None else args.layers
        base, _ = build_smol(layers)
        model_info = {"base_lm": "SmolLM2-135M-Instruct (harness.models.base.base_lm_dir)",
                      "layers_kept": layers or "all"}
    from harness.models.adapter import LMAdapter

    lm_params = LMAdapter(base).lm_parameters()
    all_variants = variants(base, ratios, args.round_to, extra, compare_ratios, extra_units)
    print(f"{args.model}: LM {lm_params / 1e6:.1f}M parameters, {widths(base)}; {len(all_variants) - 1} pruned "
          f"variants built in {time.perf_counter() - t0:.0f} s; {args.threads} thread(s), prompt {args.prompt}, "
          f"{args.steps} decode steps, {rounds} rounds")
    for v in all_variants[1:]:
        print(f"   {v.name:18s} removed {v.info['ratio_achieved']:.3f} of LM params "
              f"({v.info.get('ratio_achieved_decoder_layers', float('nan')):.3f} of decoder layers), {widths(v.model)}")

    def rounds_for(mode: str, batch: int) -> int:
        if args.quick:
            return rounds
        if (mode, batch) == ("prefill", 8):  # the expensive one: fewer rounds, still >= 5 for a verdict
            return min(rounds, 5)
        return rounds

    def pairs(text: str) -> list[tuple[str, int]]:
        return [(m.split(":")[0], int(m.split(":")[1])) for m in text.split(",") if m.strip()]

    rows = bench(all_variants, pairs(args.modes), args.prompt, args.steps, rounds, rounds_for,
                 decompose=pairs(args.decompose), warmup=0 if args.quick else 1)
    sweep = []
    if not args.no_sweep:
        start = time.perf_counter()
        at = compare_ratios[0] if compare_ratios else 0.3
        sweep = round_to_sweep(base, at, tuple(sorted({1, 8, 32, args.round_to})),
                               (1, 16) if args.quick else (1, 128, 1024), 1 if args.quick else 4)
        print(f"-- MLP GEMMs of one layer at {at:.0%} by round_to ({time.perf_counter() - start:.0f} s): "
              + "; ".join(f"{r['tokens']} tok r{r['round_to']} (width {r['mlp_width']}) eff {r['efficiency']:.3f}"
                          for r in sweep))
    fits = layer_fit(rows, all_variants)
    for key, fit in fits.items():
        print(f"-- {key}: time per call ~ {fit['ms_fixed']:.1f} ms + {fit['ms_per_layer']:.1f} ms x layers "
              f"(fixed part {fit['fixed_share_of_base']:.1%} of the baseline's time, "
              f"{fit['fixed_mac_share_of_base']:.1%} of its MACs)")
    figures = headline(rows, args.round_to, sweep, fits)
    details = {
        "model": {"which": args.model, "builder": spec["builder"], **model_info, "lm_params": lm_params,
                  **widths(base)},
        "timing": {"threads": args.threads, "rounds": rounds,
                   "prompt": args.prompt, "decode_steps": args.steps,
                   "dtype": "float32", "what": "LM forward through the LLaVA wrapper, text tokens only",
                   "statistic": "median over interleaved rounds of the per-round (paired) efficiency, with the "
                                "order-statistic interval of the median", "quick": args.quick},
        "round_to": args.round_to, "compared_round_to": list(extra), "compared_attn_units": list(extra_units),
        "compared_ratios": compare_ratios, "round_to_sweep": sweep, "layer_fit": fits,
        "variants": {v.name: {"ratio_achieved": v.info["ratio_achieved"],
                              "ratio_achieved_decoder_layers": v.info.get("ratio_achieved_decoder_layers"),
                              **widths(v.model)} for v in all_variants[1:]},
        "rows": rows, "wall_s": time.perf_counter() - t0,
    }
    result = write_result(args.json, spec["name"], figures, details=details)
    print(f"machine: {machine_info().get('cpu_model', '?')}, {args.threads} thread(s); total {details['wall_s']:.0f} s")
    for key, f in figures.items():
        print(f"{key:45s} {f['value']:6.3f} [{f['lo']:.3f}, {f['hi']:.3f}] n={f['n']} {f['verdict']:12s} {f['goal']}")
    return result


if __name__ == "__main__":
    main()
