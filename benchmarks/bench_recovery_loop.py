"""Recovery steps per second through Lightning against a bare PyTorch loop (same model, batch, loss).

Prints the ratio Lightning / bare (goal: >= 0.95). Both run in this process on the same tiny
student and teacher with the sft+kd-hidden recipe, interleaved: every repeat runs the bare loop
and then Lightning (A B A B), and the ratio is formed within the repeat (paired); the figure is
the median of the per-repeat ratios with its spread (`_common.figure`).

    .venv/bin/python benchmarks/bench_recovery_loop.py [--repeats 5] [--json results/bench/recovery_loop.json] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from harness.data.datamodule import MixDataModule
from harness.recovery.module import RecoveryModule
from harness.recovery.recipes import get_recipe
from harness.recovery.train import train
from harness.synthetic.make import WorldSpec, make_world
from harness.synthetic.models import build_embedded

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, paired_ratios, write_result  # noqa: E402

STEPS, BATCH = 30, 16


def bare_loop(student, teacher, processor, world, recipe, steps: int = STEPS, batch: int = BATCH) -> float:
    module = RecoveryModule(student, recipe, teacher)
    module.total_steps = steps
    opt = module.configure_optimizers()
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    loader = MixDataModule(world, processor, student.config, 1.0, batch, recipe.seed).train_dataloader()
    it = iter(loader)
    start = time.perf_counter()
    for _ in range(steps):
        loss = module.compute_losses(next(it))["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), recipe.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return steps / (time.perf_counter() - start)


def lightning(student, teacher, processor, world, recipe, steps: int = STEPS, batch: int = BATCH) -> float:
    module = RecoveryModule(student, recipe, teacher)
    dm = MixDataModule(world, processor, student.config, 1.0, batch, recipe.seed)
    start = time.perf_counter()
    train(module, dm, recipe, run_name="bench", progress=False)
    return steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (bare, then Lightning)")
    parser.add_argument("--quick", action="store_true", help="2 steps of batch 2, 1 repeat: a smoke run")
    args = parser.parse_args(argv)
    steps, batch, repeats = (2, 2, 1) if args.quick else (STEPS, BATCH, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        world = make_world(Path(tmp) / "w", WorldSpec(mix_size=steps * batch * 2, benchmark_size=2))
        teacher, processor = build_embedded("tiny-llava")
        recipe = get_recipe("sft+kd-hidden", max_steps=steps, batch_size=batch)
        rates = {"bare": [], "lightning": []}
        for _ in range(repeats):
            rates["bare"].append(bare_loop(copy.deepcopy(teacher), teacher, processor, world, recipe, steps, batch))
            rates["lightning"].append(lightning(copy.deepcopy(teacher), teacher, processor, world, recipe, steps, batch))
    key = "lightning_over_bare_steps_per_s"
    fig = figure(paired_ratios(rates["lightning"], rates["bare"]), ">= 0.95")
    print(json.dumps({"steps_per_s": rates, key: fig}, indent=1))
    write_result(args.json, "recovery_loop", {key: fig},
                 details={"steps_per_s": rates, "steps": steps, "batch": batch, "repeats": repeats,
                          "recipe": "sft+kd-hidden", "model": "tiny-llava (random init)"})
    return fig


if __name__ == "__main__":
    sys.exit(0 if main()["value"] > 0 else 1)
