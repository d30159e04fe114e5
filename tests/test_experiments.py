"""Every experiment spec shipped under experiments/ loads and plans on the meta device without problems.

As LitGPT validates every config of its hub, a spec that a user would run is checked here:
its keys and settings against the typed settings, its methods against the registry, its
recipes against the presets, and its plan against the model's real shape.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "experiments").glob("*.yaml"))


def test_specs_exist():
    assert {p.stem for p in SPECS} >= {"default", "smoke", "paper_llava15_7b", "paper_bunny_3b",
                                       "paper_llava15_7b_public_ranges", "paper_bunny_3b_public_ranges",
                                       "qwen25vl_7b", "llava_ov_7b"}


@pytest.mark.parametrize("name", ["qwen25vl_7b", "llava_ov_7b"])
def test_newer_family_specs_size_every_cell_onto_one_gpu(name):
    """The 7B specs of two newer families plan at their real size; Qwen2.5-VL's width cells remove MLP channels
    only (its attention fixes the head count), LLaVA-OneVision's remove query heads inside its 4 KV groups."""
    from harness.grid.dryrun import dry_run
    from harness.grid.spec import load_spec

    report = dry_run(load_spec(ROOT / "experiments" / f"{name}.yaml"))
    assert "all fit 80 GB: yes" in report and "fits 80 GB: no" not in report
    widths = [line for line in report.splitlines() if "per layer: heads" in line]
    assert len(widths) == 3
    if name == "qwen25vl_7b":
        assert all("heads 28/28 (KV heads 4/4, 0.0% removed) in layers none" in line for line in widths)
    else:
        assert all("KV heads 4/4" in line and "heads 28/28" not in line for line in widths)


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_spec_loads_and_dry_runs(path):
    from harness.grid.dryrun import dry_run
    from harness.grid.spec import load_spec

    spec = load_spec(path)
    report = dry_run(spec)
    assert f"experiment {spec.name}:" in report
    assert report.rstrip().endswith("problems: none"), report[-2000:]


@pytest.mark.parametrize("name", ["paper_llava15_7b_public_ranges", "paper_bunny_3b_public_ranges"])
def test_public_ranges_sensitivity_specs(name):
    from harness.grid.spec import load_spec

    spec = load_spec(ROOT / "experiments" / f"{name}.yaml")
    primary = load_spec(ROOT / "experiments" / f"{name.removesuffix('_public_ranges')}.yaml")
    taylor = spec.method_settings["width-taylor"]
    assert (taylor["attn_layers"], taylor["mlp_layers"]) == ("3:21", "3:20") and spec.ratios == [0.15, 0.3]
    assert primary.method_settings["width-taylor"]["attn_layers"] == "3:31"
    assert spec.recover_settings == primary.recover_settings and spec.teachers == primary.teachers
    same = {k: v for k, v in taylor.items() if k not in ("attn_layers", "mlp_layers")}
    assert same == {k: v for k, v in primary.method_settings["width-taylor"].items() if k in same}
