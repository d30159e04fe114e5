"""The benchmark scripts' bookkeeping on a tiny model: MAC ratios, shapes, summaries, tables (no timing goals),
figures with spreads and verdicts, and every benchmark run end to end in its quick mode."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from harness.models.flops import attention_score_macs, lm_linear_macs, lm_macs_for_tokens, lm_macs_per_token

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import bench_inference as bi  # noqa: E402
import run_all  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)


@pytest.fixture(scope="module")
def tiny():
    base, _ = bi.build_base(TINY)
    return base


@pytest.fixture(scope="module")
def tiny_variants(tiny):
    return bi.variants(tiny, [0.3], round_to=16, extra_round_to=(1,), extra_ratios=[0.3])


def test_macs_for_tokens_sums_per_token_macs(tiny):
    assert lm_macs_for_tokens(tiny, 5) == sum(lm_macs_per_token(tiny, context=t) for t in range(1, 6))
    assert lm_macs_for_tokens(tiny, 3, past=7) == sum(lm_macs_per_token(tiny, context=7 + t) for t in range(1, 4))
    assert lm_macs_for_tokens(tiny, 0) == 0


def test_variants_are_what_they_say(tiny, tiny_variants):
    names = [v.name for v in tiny_variants]
    assert names == ["base", "layer 30%", "width 30% r16", "width 30% r1"]
    layer, width16, width1 = tiny_variants[1:]
    assert bi.widths(layer.model)["layers"] < 4 and bi.widths(layer.model)["mlp_width"] == 192
    assert bi.widths(width16.model)["mlp_width"] % 16 == 0 and bi.widths(width16.model)["layers"] == 4
    for v in tiny_variants[1:]:
        assert abs(v.info["ratio_achieved"] - 0.3) < 0.15
        assert all(p.is_contiguous() for p in v.model.parameters())


def test_ideal_speedup_is_the_mac_ratio(tiny, tiny_variants):
    layer = tiny_variants[1]
    kept = bi.widths(layer.model)["layers"]
    head = tiny.lm_head.in_features * tiny.lm_head.out_features
    per_layer = (lm_linear_macs(tiny) - head) / 4
    # decode: linears per token, attention over past + t positions
    steps, past = 3, 10
    positions = steps * past + steps * (steps + 1) // 2
    expect = (steps * lm_linear_macs(tiny) + attention_score_macs(tiny, 1) * positions) / (
        steps * (kept * per_layer + head) + attention_score_macs(tiny, 1) * kept / 4 * positions)
    assert bi.ideal_speedup(tiny, layer.model, "decode", past, steps) == pytest.approx(expect)
    # prefill: the same ratio as the MACs of a T-token prompt; batch size never enters
    assert bi.ideal_speedup(tiny, layer.model, "prefill", 8, 0) == pytest.approx(
        lm_macs_for_tokens(tiny, 8) / lm_macs_for_tokens(layer.model, 8))
    for v in tiny_variants[1:]:
        assert bi.ideal_speedup(tiny, v.model, "prefill", 8, 0) > 1


def test_runners_shapes_and_repeatable_decode(tiny_variants):
    vocab = tiny_variants[0].model.config.text_config.vocab_size
    with torch.inference_mode():
        for v in tiny_variants:
            assert bi.prefill_runner(v.model, 2, 6)().shape == (2, 6, vocab)
            decode = bi.decode_runner(v.model, 2, 6, 3)
            first, second = decode(), decode()  # the cache is cropped back to the prompt every call
            assert first.shape == (2, 1, vocab)
            torch.testing.assert_close(first, second)
            bi.linear_runner(v.model, 2, 1, 2)()


def test_summary_and_headline_bookkeeping(tiny, tiny_variants):
    base, layer = tiny_variants[0], tiny_variants[1]
    times = {"cpu": {"base": [2.0, 2.2, 2.0], "layer 30%": [1.5, 1.0, 1.0], "base [linears]": [1.5, 1.6, 1.5],
                     "layer 30% [linears]": [0.75, 0.8, 0.75]},
             "wall": {"base": [3.0, 2.5, 3.0], "layer 30%": [2.0, 1.25, 1.5]}}
    row = bi.summarise(base, layer, times, "decode", 1, 6, 3)
    ideal = bi.ideal_speedup(tiny, layer.model, "decode", 6, 3)
    # per-round (paired) speedups 2/1.5, 2.2/1.0, 2/1.0: the median is 2.0, the interval min..max
    assert row["cpu"]["round_speedups"] == pytest.approx([2.0 / 1.5, 2.2, 2.0])
    assert row["cpu"]["achieved_speedup"] == pytest.approx(2.0) and row["wall"]["achieved_speedup"] == pytest.approx(2.0)
    assert row["efficiency"] == pytest.approx(2.0 / ideal)
    assert row["cpu"]["efficiency_lo"] == pytest.approx(2.0 / 1.5 / ideal)
    assert row["cpu"]["efficiency_hi"] == pytest.approx(2.2 / ideal)
    assert row["cpu"]["fastest_round_speedup"] == pytest.approx(2.0)
    d = row["decomposition"]  # medians: total 2.0 / 1.0, linears 1.5 / 0.75
    assert d["base_rest_ms"] == pytest.approx(500) and d["pruned_rest_ms"] == pytest.approx(250)
    assert d["rest_share_base"] == pytest.approx(0.25) and d["linear_speedup"] == pytest.approx(2.0)
    figures = bi.headline([row], round_to=16)
    f = figures["layer_30pct_decode_b1_efficiency"]
    assert f["value"] == pytest.approx(2.0 / ideal, abs=1e-4) and f["n"] == 3 and f["goal"].startswith(">= 0.95")
    assert f["verdict"] == "inconclusive"  # 3 rounds: too few for a verdict
    assert "linear layers" in f["note"]  # the diagnostics' explanation rides along
    unrounded = dict(row, tag="r1", variant="width 30% r1", kind="width")
    g = bi.headline([unrounded], round_to=16)["width_30pct_r1_decode_b1_efficiency"]
    assert g["verdict"] == "info" and g["goal"].startswith("information")


def test_median_interval_is_the_order_statistic_confidence_interval():
    one = _common.median_interval([3.0])
    assert (one["value"], one["lo"], one["hi"], one["coverage"]) == (3.0, 3.0, 3.0, 0.0)
    five = _common.median_interval([5, 1, 4, 2, 3])
    assert (five["value"], five["lo"], five["hi"]) == (3, 1, 5) and five["coverage"] == pytest.approx(0.9375)
    eight = _common.median_interval(range(8))  # [x(2), x(7)]: 1 - 2 * 9 / 256
    assert (eight["lo"], eight["hi"]) == (1, 6) and eight["coverage"] == pytest.approx(0.9297, abs=1e-4)
    eleven = _common.median_interval(range(11))
    assert (eleven["lo"], eleven["hi"]) == (2, 8)


def test_verdict_needs_the_whole_spread_on_one_side():
    assert _common.figure([0.96, 0.97, 0.98, 0.99, 1.0], ">= 0.95 (x)")["verdict"] == "meets"
    assert _common.figure([0.90, 0.91, 0.92, 0.93, 0.94], ">= 0.95")["verdict"] == "MISSES"
    assert _common.figure([0.93, 0.96, 0.97, 0.98, 0.99], ">= 0.95")["verdict"] == "inconclusive"
    assert _common.figure([1.1, 1.2, 1.2, 1.25, 1.29], "<= 1.3")["verdict"] == "meets"
    assert _common.figure([1.0, 1.0, 1.0, 1.0], ">= 0.95")["verdict"] == "inconclusive"  # n = 4: coverage 0.875
    assert _common.figure([1.2], "<= 1.3", exact=True)["verdict"] == "meets"  # a count or bytes: no spread
    assert _common.figure([1.0, 2.0], "information")["verdict"] == "info"
    assert _common.paired_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]


def test_round_to_sweep_widths(tiny):
    rows = bi.round_to_sweep(tiny, 0.3, (1, 16), (1,), rounds=1)
    assert {r["round_to"] for r in rows} == {1, 16}
    assert all(r["mlp_width"] < r["base_width"] == 192 for r in rows)
    assert next(r for r in rows if r["round_to"] == 16)["mlp_width"] % 16 == 0


def test_run_all_table_shows_value_spread_and_verdict():
    text, rows = run_all.table([
        {"benchmark": "a", "status": "ok", "figures": {
            "r": _common.figure([1.0, 1.1, 1.2, 1.3, 1.4], ">= 2"),
            "s": _common.figure([0.9, 1.0, 1.1, 1.2, 1.3], ">= 1", note="why"),
            "t": _common.figure([0.5], "information", exact=True)}},
        {"benchmark": "old", "status": "ok", "ratios": {"q": 1.0}, "goals": {"q": ">= 0.5"}},  # before figures
        {"benchmark": "b", "status": "skipped", "reason": "no decord", "ratios": {}},
    ])
    assert [r["verdict"] for r in rows] == ["MISSES", "inconclusive", "info", "inconclusive", "skipped"]
    assert rows[0]["value"] == 1.2 and (rows[0]["lo"], rows[0]["hi"], rows[0]["n"]) == (1.0, 1.4, 5)
    assert "1.000..1.400 (5)" in text and "exact" in text and "no decord" in text and "[1] a s: why" in text


def test_run_to_run_agreement_compares_spreads():
    def rows(figures):
        return run_all.table([{"benchmark": "a", "status": "ok", "figures": figures}])[1]

    previous = rows({"x": _common.figure([1.0, 1.1, 1.2, 1.3, 1.4], ">= 1.05"),
                     "y": _common.figure([0.9, 0.95, 1.0, 1.05, 1.1], ">= 0.5"),
                     "z": _common.figure([1.5, 1.6, 1.7, 1.8, 1.9], ">= 1.0"),
                     "n": _common.figure([3.0], "exact", exact=True)})
    current = rows({"x": _common.figure([1.35, 1.4, 1.5, 1.6, 1.7], ">= 1.05"),  # overlaps; median 1.5 > 1.4
                    "y": _common.figure([0.96, 0.98, 1.0, 1.02, 1.04], ">= 0.5"),  # inside each other
                    "z": _common.figure([0.1, 0.2, 0.3, 0.4, 0.5], ">= 1.0"),  # apart, and the verdict flips
                    "n": _common.figure([4.0], "exact", exact=True)})
    agree = run_all.agreement(previous, current)
    assert (agree["shared"], agree["overlap"], agree["strict"], agree["verdicts_flipped"]) == (3, 2, 1, 1)
    text = run_all.agreement_text(agree, "then")
    assert "2 of 3 timing figures agree" in text and "disagrees: a z: 1.700 (1.500..1.900) then 0.300" in text
    assert "a x" not in text


def test_every_bench_script_is_in_run_all():
    assert {script for _, script, _ in run_all.ALL} == {p.name for p in BENCH.glob("bench_*.py")}


def test_run_all_runs_a_benchmark_as_a_subprocess(tmp_path):
    """`make bench`'s path: the script in its own process, its JSON read back (grid_overhead needs no torch)."""
    log = tmp_path / "runs.jsonl"
    stages = [{"key": "a", "kind": "prune", "pid": 1, "seconds": 5.0, "time": "2026-01-01T00:00:05"},
              {"key": "b", "kind": "eval", "pid": 1, "seconds": 4.0, "time": "2026-01-01T00:00:10"}]
    log.write_text("".join(json.dumps(x) + "\n" for x in stages))
    result = run_all.run_one("grid_overhead", "bench_grid_overhead.py", ["--log", str(log)], 120, tmp_path, tmp_path,
                             quick=True)
    assert result["status"] == "ok", result
    f = result["figures"]["grid_between_stage_overhead"]
    assert f["exact"] and f["verdict"] == "MISSES" and f["value"] == pytest.approx(0.1)  # goal <= 0.05
    broken = run_all.run_one("grid_overhead", "bench_grid_overhead.py", ["--no-such-flag"], 120, tmp_path, tmp_path)
    assert broken["status"] == "failed" and "exit 2" in broken["reason"]
    # in process (the quick test's path): a crash is a failure with its traceback's last lines, not an exception here
    crashed = run_all.run_one("grid_overhead", "bench_grid_overhead.py", ["--log", str(tmp_path)], 120, tmp_path,
                              tmp_path, in_process=True)
    assert crashed["status"] == "failed" and "IsADirectoryError" in crashed["reason"]


def test_every_benchmark_runs_in_quick_mode(tmp_path):
    """`run_all.py --quick`: every benchmark script end to end at tiny sizes (about a minute), so a renamed
    function or argument breaks this test rather than `make bench`. In process: torch is imported once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--quick", "--in-process", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=BENCH.parent, timeout=900)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["quick"] and set(summary["seconds"]) == {name for name, _, _ in run_all.ALL}
    by_status = {}
    for name, _, _ in run_all.ALL:
        result = json.loads((tmp_path / f"{name}.json").read_text())
        by_status[name] = result["status"]
        if result["status"] == "ok":
            assert result["figures"], name
            for key, f in result["figures"].items():
                assert {"value", "lo", "hi", "n", "coverage", "goal", "verdict"} <= set(f), (name, key)
                assert f["lo"] <= f["value"] <= f["hi"], (name, key)
                assert f["verdict"] in ("info", "inconclusive") or f["exact"], (name, key)  # quick: 1 repeat
    allowed_skips = {"grid_overhead"}  # reads the log of a grid run, if there was one
    if importlib.util.find_spec("decord") is None:
        allowed_skips.add("eval_plugin")  # `make bench` installs the bench extra
    assert {name for name, status in by_status.items() if status != "ok"} <= allowed_skips, by_status
    assert "spread (n)" in proc.stdout and "inference_smol" in proc.stdout


def test_eval_plugin_skips_cleanly(tmp_path, monkeypatch):
    import bench_eval_plugin

    monkeypatch.setattr(bench_eval_plugin, "missing_requirement", lambda: "decord is not installed")
    out = tmp_path / "eval.json"
    bench_eval_plugin.main(["--json", str(out)])
    result = json.loads(out.read_text())
    assert result["status"] == "skipped" and "decord" in result["reason"] and result["ratios"] == {}


def test_grid_overhead_from_stage_log(tmp_path):
    import bench_grid_overhead

    log = tmp_path / "runs.jsonl"
    lines = [{"key": "a", "kind": "prune", "pid": 1, "seconds": 5.0, "time": "2026-01-01T00:00:05"},
             {"key": "b", "kind": "eval", "pid": 2, "seconds": 10.0, "time": "2026-01-01T01:00:10"},
             {"key": "c", "kind": "eval", "pid": 2, "seconds": 8.0, "time": "2026-01-01T01:00:20"}]
    log.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken")
    result = bench_grid_overhead.main(["--log", str(log), "--json", str(tmp_path / "g.json")])
    run = result["details"]["latest_run"]
    assert run["stages"] == 2 and run["span_s"] == 20.0 and run["compute_s"] == 18.0
    assert result["ratios"]["grid_between_stage_overhead"] == pytest.approx(0.1)
    skipped = bench_grid_overhead.main(["--log", str(tmp_path / "none.jsonl")])
    assert skipped["status"] == "skipped"


def test_importance_estimate_follows_dtype_and_device(tiny):
    from harness.models.memory import CUDA_CONTEXT
    from harness.pruning.memory import estimate_importance_memory, importance_estimate_line

    gpu = estimate_importance_memory(tiny.config, "width-taylor", 1, 64)
    assert gpu == estimate_importance_memory(tiny, "width-taylor", 1, 64, "bfloat16", "cuda")  # config or model
    cpu16 = estimate_importance_memory(tiny, "width-taylor", 1, 64, torch.bfloat16, "cpu")
    cpu32 = estimate_importance_memory(tiny, "width-taylor", 1, 64, torch.float32, "cpu")
    assert gpu.total - cpu16.total >= CUDA_CONTEXT
    assert cpu32.breakdown["weights (fp32)"] == 2 * cpu16.breakdown["weights (bf16)"]
    assert cpu32.total > cpu16.total
    line = importance_estimate_line(tiny, "width-taylor", 2, 64)
    assert "batch 2 x 64 tokens, float32 on cpu" in line and "MB" in line


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-bunny", "tiny-llava-gqa", "tiny-qwen2"])
def test_taylor_estimate_counts_a_gradient_for_every_scored_weight(name):
    """The estimate's gradient term is the bytes of exactly the parameters `_taylor` puts gradients on."""
    from harness.models.adapter import LMAdapter
    from harness.pruning.memory import estimate_importance_memory
    from harness.pruning.methods.width import scored_params as _scored_params
    from harness.synthetic.models import build_embedded

    model, _ = build_embedded(name)
    scored = sum(p.numel() for p in _scored_params(LMAdapter(model)))
    est = estimate_importance_memory(model, "width-taylor", 1, 16, torch.float32, "cpu")
    assert est.breakdown["gradients of the scored weights (fp32)"] == 4 * scored


def test_layer_fit_recovers_a_line(tiny_variants):
    base, layer = tiny_variants[0], tiny_variants[1]
    kept = bi.widths(layer.model)["layers"]
    # time 1 ms + 2 ms per layer; MACs (relative to the base's) 0.25 + 0.1875 per layer
    row = {"mode": "decode", "batch": 1, "kind": "layer", "variant": layer.name, "ideal_speedup": 1 / (0.25 + 0.1875 * kept),
           "cpu": {"base_ms": 1.0 + 2.0 * 4, "pruned_ms": 1.0 + 2.0 * kept}}
    fit = bi.layer_fit([row], [base, layer])["decode_b1"]
    assert fit["ms_per_layer"] == pytest.approx(2.0) and fit["ms_fixed"] == pytest.approx(1.0)
    assert fit["fixed_share_of_base"] == pytest.approx(1 / 9)
    assert fit["fixed_mac_share_of_base"] == pytest.approx(0.25)


def test_interleaved_times_alternate_models_step_by_step():
    """Within a round, step i of every model runs before step i + 1 of any (order rotated per round); a model's time
    in the round is the sum of its steps."""
    calls = []
    runs = {name: bi.Work([lambda name=name, i=i: calls.append((name, i)) for i in range(3)]) for name in "ab"}
    runs["c"] = lambda: calls.append(("c", 0))  # a plain callable is one step
    times = bi.interleaved_times(runs, rounds=2, warmup=1)
    warm = [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2), ("c", 0)]
    assert calls[:7] == warm
    assert calls[7:14] == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert calls[14:] == [("b", 0), ("c", 0), ("a", 0), ("b", 1), ("a", 1), ("b", 2), ("a", 2)]
    assert all(len(times[clock][name]) == 2 for clock in ("cpu", "wall") for name in "abc")


@pytest.mark.parametrize("image", ["text", "oracle", "tower"])
def test_teacher_probe_scores_every_family_and_repeats(image):
    """The learning-speed probe behind the README's teacher-quality numbers: per-family scores, deterministic."""
    import teacher_probe

    argv = ["--image", image, "--layers", "1", "--steps", "6", "--every", "3", "--batch", "4", "--turns", "4", "--held-out", "24",
            "--teacher", str(Path(__file__).resolve().parents[1] / "artifacts/teachers/tiny-llava")]
    first = teacher_probe.main(argv)
    assert [line["step"] for line in first] == [3, 6]
    assert set(teacher_probe.FAMILIES) <= set(first[-1]) and 0 <= first[-1]["mean"] <= 1
    assert first[-1]["loss"] < 4.3  # the smoothed loss starts near ln(vocab) = 4.33
    again = teacher_probe.main(argv)
    assert [{k: v for k, v in line.items() if k != "seconds"} for line in again] == \
        [{k: v for k, v in line.items() if k != "seconds"} for line in first]



def test_explain_states_page_faults_and_interleaved_times_count_them(monkeypatch):
    row = {"mode": "prefill", "batch": 8, "kind": "width", "cpu": {"base_ms": 10.0},
           "page_faults_per_call": {"base": 49152, "pruned": 49150}}
    assert "49152 page faults per unpruned call (49150 pruned)" in bi.explain(row)
    assert "page faults" not in bi.explain({**row, "page_faults_per_call": {"base": 0, "pruned": 0}})
    # A counter under the test's control, not the kernel's: how many faults fresh memory takes depends on the page
    # size (4 KiB, or 2 MiB with transparent huge pages), on what the allocator kept, and on whether the sandbox
    # reports minor faults at all (CI's did not count 16 MB of fresh memory).  What is under test is that each
    # run's slices are charged with the faults they caused, round by round.
    counter = {"minflt": 0}
    monkeypatch.setattr(bi.resource, "getrusage", lambda who: types.SimpleNamespace(ru_minflt=counter["minflt"]))

    def fault(n):
        def run():
            counter["minflt"] += n
        return run

    runs = {"grow": bi.Work([fault(100), fault(20)]), "idle": lambda: None, "small": fault(3)}
    times = bi.interleaved_times(runs, rounds=3, warmup=1)
    assert times["faults"] == {"grow": [120] * 3, "idle": [0] * 3, "small": [3] * 3}
    assert counter["minflt"] == 4 * 123  # the warm-up ran once too, and its faults were charged to no round
