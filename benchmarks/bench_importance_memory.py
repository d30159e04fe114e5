"""Peak memory of Taylor importance on the mid-size model, measured, against `harness.models.memory`'s estimate.

Each setting runs in a fresh subprocess: build the mid-size LLaVA of bench_inference
(113M LM parameters, random weights) in the setting's dtype, draw the calibration set as
`harness prune` does (10 samples of the instruction mix, seed 42), then reset the kernel's
peak-RSS counter (/proc/self/clear_refs) and run `compute_importance(..., "width-taylor")`:
one forward + backward per sample, then |W * grad| per head group and channel.

measured = (peak RSS during scoring (VmHWM) - RSS just before scoring) + the weights' bytes:
what scoring adds on top of the loaded model, plus the model. To make RSS follow live tensor
memory (the quantity the estimate describes, like `torch.cuda.max_memory_allocated` on a GPU),
the child runs with MALLOC_MMAP_THRESHOLD_=131072 (glibc then returns every freed tensor
buffer to the OS instead of keeping it for reuse), after one warm-up scoring of a single
batch (it loads the backward kernels' code pages, which are runtime, not scoring memory).
Where the counter cannot be reset, `ru_maxrss` of the child stands in (an upper bound).
tracemalloc is not used: it does not see torch's allocations. For comparison, one more run
takes the naive figure a process monitor shows for a plain CPU `harness prune` (fp32, batch 1,
default malloc, no warm-up): peak RSS - RSS of the bare runtime (torch and transformers
imported); it also holds lazily loaded library code and buffers glibc keeps after freeing.

estimate = `estimate_importance_memory(model, "width-taylor", batch, T, dtype, device="cpu")`
(weights + gradients of every scored weight + every layer's saved activations + logits/loss +
|W*grad| temporaries + 5 % fragmentation; no CUDA context on a CPU), at T = the longest
calibration sample actually drawn. `harness prune` prints the same estimate at T =
--max-length (512), an upper bound, before scoring; that line is recorded too.

Each setting is measured once: a peak of live memory is a count of bytes, not a timing, and
repeats of it differ by at most a few pages, so its figures are `exact` (no spread) and
information (no goal). `--quick`: the fp32 batch-1 setting only, on a 2-layer copy of the
model, 2 calibration samples (a smoke run).

    .venv/bin/python benchmarks/bench_importance_memory.py [--json results/bench/importance_memory.json] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, write_result  # noqa: E402

from harness.evaluation.efficiency import reset_cpu_peak  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "artifacts" / "data" / "synth"
# (label, dtype, calibration batch size): the harness's default (batch 1) in the estimate's own dtype (bf16)
# and in the dtype CPU runs use (fp32), and a batch of 8 where activations, not weights, dominate.
# The batch-8 run: 10 samples make a batch of 8 and one of 2, and the big one comes first, before any gradient
# exists, so its peak is weights + activations + the gradients allocated so far in its backward, not all of them.
SETTINGS = (("bf16 batch 1", "bfloat16", 1, True), ("fp32 batch 1", "float32", 1, True),
            ("fp32 batch 8", "float32", 8, True), ("fp32 batch 1, naive process RSS", "float32", 1, False))
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(dtype_name: str, batch_size: int, data: Path, samples: int, threads: int, live: bool = True,
          quick: bool = False) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    torch.set_num_threads(threads)
    from bench_inference import build_base

    from harness.pruning import calibration_set, compute_importance
    from harness.pruning.memory import estimate_importance_memory, importance_estimate_line

    gc.collect()
    runtime_kb = _status_kb("VmRSS")
    dtype = getattr(torch, dtype_name)
    model, processor = build_base({"num_hidden_layers": 2} if quick else None)
    model.to(dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    calib = calibration_set(data, samples, 42, batch_size, 512)
    lengths = [int(b["input_ids"].shape[1]) for b in calib.batches(processor, model)]
    printed = importance_estimate_line(model, "width-taylor", batch_size, 512)
    # warm-up on one batch: loads the backward kernels' code pages and the autograd engine, which are
    # runtime, not scoring memory (they stay resident and would otherwise count in the peak)
    if live:
        warm = calibration_set(data, batch_size, 7, batch_size, 512)
        compute_importance(model, processor, "width-taylor", warm)
        del warm
    gc.collect()
    before_kb = _status_kb("VmRSS")
    reset = reset_cpu_peak()
    start = time.perf_counter()
    compute_importance(model, processor, "width-taylor", calib)
    seconds = time.perf_counter() - start
    peak_kb = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    measured = (peak_kb - before_kb) * 1024 + weights if live else (peak_kb - runtime_kb) * 1024
    est = estimate_importance_memory(model, "width-taylor", batch_size, max(lengths), dtype, "cpu")
    est_512 = estimate_importance_memory(model, "width-taylor", batch_size, 512, dtype, "cpu")
    return {
        "dtype": dtype_name, "batch_size": batch_size, "live_memory_mode": live, "samples": samples,
        "longest_sample_tokens": max(lengths),
        "sample_tokens": lengths, "seconds": seconds, "peak_kind": "VmHWM after reset" if reset else "ru_maxrss",
        "runtime_rss_bytes": runtime_kb * 1024, "rss_before_scoring_bytes": before_kb * 1024,
        "peak_rss_bytes": peak_kb * 1024, "weights_bytes": weights, "measured_bytes": measured,
        "estimate_bytes": est.total, "estimate_breakdown": est.breakdown,
        "measured_over_estimate": measured / est.total,
        "estimate_at_max_length_bytes": est_512.total, "measured_over_estimate_at_max_length": measured / est_512.total,
        "printed_by_harness_prune": printed,
    }


def default_data(tmp: Path, mix_size: int = 64) -> Path:
    if (DEFAULT_DATA / "mix.json").exists():
        return DEFAULT_DATA
    from harness.synthetic.make import WorldSpec, make_world

    return make_world(tmp / "world", WorldSpec(mix_size=mix_size, benchmark_size=4))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=None, help="instruction mix (default: artifacts/data/synth)")
    parser.add_argument("--samples", type=int, default=10, help="calibration samples (the harness's Taylor default)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=3, metavar=("DTYPE", "BATCH", "LIVE"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fp32 batch 1 only, 2-layer model, 2 samples: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples = 2
    if args.child:
        out = child(args.child[0], int(args.child[1]), args.data, args.samples, args.threads, args.child[2] == "1",
                    args.quick)
        args.child_out.write_text(json.dumps(out))
        return out

    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        tmp = Path(tmp)
        data = args.data or default_data(tmp, 8 if args.quick else 64)
        for label, dtype, batch, live in SETTINGS:
            if args.quick and label != "fp32 batch 1":
                continue
            out = tmp / f"{dtype}-{batch}-{live}.json"
            cmd = [sys.executable, __file__, "--child", dtype, str(batch), str(int(live)), "--child-out", str(out),
                   "--data", str(data), "--samples", str(args.samples), "--threads", str(args.threads),
                   *(["--quick"] if args.quick else [])]
            env = {**os.environ, **(LIVE_MEMORY_ENV if live else {})}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{label}: child failed\n{proc.stderr[-3000:]}")
            runs[label] = r = json.loads(out.read_text())
            print(f"{label}: longest sample {r['longest_sample_tokens']} tokens, scoring {r['seconds']:.1f} s; "
                  f"measured {r['measured_bytes'] / 1e6:.0f} MB (weights {r['weights_bytes'] / 1e6:.0f}), "
                  f"estimate {r['estimate_bytes'] / 1e6:.0f} MB -> measured/estimate {r['measured_over_estimate']:.2f}; "
                  f"at T=512 the estimate is {r['estimate_at_max_length_bytes'] / 1e6:.0f} MB "
                  f"({r['measured_over_estimate_at_max_length']:.2f})")
            print(f"   harness prune prints: {r['printed_by_harness_prune']}")
    goal = "information: 1 = the estimate is exact, > 1 it under-estimates, < 1 it over-estimates"
    figures = {f"taylor_{label.replace(' ', '_')}_measured_over_estimate":
               figure([r["measured_over_estimate"]], goal, exact=True, digits=3)
               for label, r in runs.items() if r["live_memory_mode"]}
    naive = [r for r in runs.values() if not r["live_memory_mode"]]
    if naive:
        figures["taylor_fp32_batch_1_naive_process_rss_over_estimate"] = figure(
            [naive[0]["measured_over_estimate"]], "information only (includes runtime memory)", exact=True, digits=3)
    return write_result(args.json, "importance_memory", figures,
                        details={"runs": runs, "model": "bench_inference MID_SIZE" + (", 2 layers" if args.quick else "")})


if __name__ == "__main__":
    main()
