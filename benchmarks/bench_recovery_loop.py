"""Recovery steps per second through Lightning against a bare PyTorch loop (same model, batch, loss).

Prints the ratio Lightning / bare (goal: >= 0.95). Both run in this process, interleaved
twice, on the same tiny student and teacher with the sft+kd-hidden recipe.

    .venv/bin/python benchmarks/bench_recovery_loop.py [--json results/bench/recovery_loop.json]
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
from _common import write_result  # noqa: E402

STEPS, BATCH = 30, 16


def bare_loop(student, teacher, processor, world, recipe) -> float:
    module = RecoveryModule(student, recipe, teacher)
    module.total_steps = STEPS
    opt = module.configure_optimizers()
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    loader = MixDataModule(world, processor, student.config, 1.0, BATCH, recipe.seed).train_dataloader()
    it = iter(loader)
    start = time.perf_counter()
    for _ in range(STEPS):
        loss = module.compute_losses(next(it))["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), recipe.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return STEPS / (time.perf_counter() - start)


def lightning(student, teacher, processor, world, recipe) -> float:
    module = RecoveryModule(student, recipe, teacher)
    dm = MixDataModule(world, processor, student.config, 1.0, BATCH, recipe.seed)
    start = time.perf_counter()
    train(module, dm, recipe, run_name="bench", progress=False)
    return STEPS / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        world = make_world(Path(tmp) / "w", WorldSpec(mix_size=STEPS * BATCH * 2, benchmark_size=2))
        teacher, processor = build_embedded("tiny-llava")
        recipe = get_recipe("sft+kd-hidden", max_steps=STEPS, batch_size=BATCH)
        rates = {"bare": [], "lightning": []}
        for _ in range(2):
            rates["bare"].append(bare_loop(copy.deepcopy(teacher), teacher, processor, world, recipe))
            rates["lightning"].append(lightning(copy.deepcopy(teacher), teacher, processor, world, recipe))
    result = {k: max(v) for k, v in rates.items()}
    result["ratio_lightning_over_bare"] = result["lightning"] / result["bare"]
    print(json.dumps(result, indent=1))
    write_result(args.json, "recovery_loop", {"lightning_over_bare_steps_per_s": round(result["ratio_lightning_over_bare"], 4)},
                 {"lightning_over_bare_steps_per_s": ">= 0.95"},
                 {"steps_per_s": {k: v for k, v in rates.items()}, "best": result, "steps": STEPS, "batch": BATCH,
                  "recipe": "sft+kd-hidden", "model": "tiny-llava (random init)"})
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ratio_lightning_over_bare"] > 0 else 1)
