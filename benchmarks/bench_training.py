"""Recovery throughput on smol-llava (SmolLM2-135M's real weights): what a training step costs, and why.

The contenders train the same student (smol-llava on the pretrained SmolLM2-135M-Instruct, LoRA
r16 on every language-model linear plus the projector: `lora-sft`, as the grid's recoveries do)
on the same batches; each round runs every contender once, in a rotated order, and ratios are
formed within the round (`_common.figure`):

- `lightning`: `harness.recovery.train.train` (the Trainer, as `harness recover` runs) against
  `bare`: the same module's `compute_losses` in a plain loop (goal: >= 0.95);
- `full_logits`: the LM head over every position, as `model(**batch).loss` computes it, against
  `bare`'s answer-only head (the LM head only where labels are set): the saving of answer-only logits;
- `no_dropout`: `lora_dropout=0` (the teacher recipe's setting) against `bare`'s 0.05 (the paper's):
  on CPU LoRA dropout's Bernoulli masks are a large part of a step (not in the default
  `--contenders`: measured once, docs/performance.md).

It also states tokens/s of `bare` (real, unpadded tokens) and the process's peak resident memory.

    .venv/bin/python benchmarks/bench_training.py [--rounds 5] [--steps 3] [--batch 8]
        [--contenders bare,lightning,full_logits,no_dropout] [--quick]
        [--json results/bench/training.json]

`--quick`: a 2-layer copy of the model, batch 2, 1 step, 1 round (a smoke run: figures mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, paired_ratios, write_result  # noqa: E402, I001  (the offline environment first)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness.data.datamodule import MixDataModule  # noqa: E402
from harness.data.instruct import IGNORE_INDEX  # noqa: E402
from harness.recovery.module import RecoveryModule  # noqa: E402
from harness.recovery.recipes import get_recipe  # noqa: E402
from harness.recovery.train import train  # noqa: E402
from harness.synthetic.make import WorldSpec, make_world  # noqa: E402

CONTENDERS = ("bare", "lightning", "full_logits", "no_dropout")


class FullLogits(RecoveryModule):
    """CE from the LM head over every position: what the answer-only head saves."""

    def compute_losses(self, batch):
        logits = self.student(**batch).logits[:, :-1]
        ce = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        return {"ce": ce, "loss": ce}


def build(layers: int | None):
    from harness.synthetic.models import build_smol_llava

    return build_smol_llava(seed=0, layers=layers)  # loaded once; every run trains a copy


def bare_loop(module: RecoveryModule, loader, steps: int) -> tuple[float, int]:
    """Steps/s and real tokens of `steps` optimizer steps in a plain loop."""
    module.total_steps = steps
    opt = module.configure_optimizers()
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    module.student.train()
    batches = [b for b, _ in zip(loader, range(steps))]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    start = time.perf_counter()
    for batch in batches:
        loss = module.compute_losses(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], module.recipe.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return steps / (time.perf_counter() - start), tokens


def run(name: str, built, world: Path, steps: int, batch: int) -> tuple[float, int]:
    model, processor = copy.deepcopy(built[0]), built[1]
    recipe = get_recipe("lora-sft", max_steps=steps, batch_size=batch, val_checks=0,
                        **({"lora_dropout": 0.0} if name == "no_dropout" else {}))
    dm = MixDataModule(world, processor, model.config, 1.0, batch, recipe.seed)
    if name == "lightning":
        module = RecoveryModule(model, recipe)
        start = time.perf_counter()
        train(module, dm, recipe, run_name="bench", progress=False)
        return steps / (time.perf_counter() - start), 0
    module = (FullLogits if name == "full_logits" else RecoveryModule)(model, recipe)
    return bare_loop(module, dm.train_dataloader(), steps)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each runs every contender once")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per contender and round")
    parser.add_argument("--contenders", default="bare,lightning,full_logits",
                        help=f"comma list of {', '.join(CONTENDERS)} (bare is always run: every ratio is against it)")
    parser.add_argument("--batch", type=int, default=8, help="records per step")
    parser.add_argument("--quick", action="store_true", help="2 decoder layers, batch 2, 1 step, 1 round")
    args = parser.parse_args(argv)
    layers, steps, batch, rounds = (2, 1, 2, 1) if args.quick else (None, args.steps, args.batch, args.rounds)
    torch.manual_seed(0)
    chosen = ["bare", *(c for c in args.contenders.split(",") if c.strip() and c != "bare")]
    unknown = sorted(set(chosen) - set(CONTENDERS))
    if unknown:
        parser.error(f"unknown contender(s): {', '.join(unknown)}; known: {', '.join(CONTENDERS)}")
    rates: dict[str, list[float]] = {c: [] for c in chosen}
    tokens = 0
    built = build(layers)
    with tempfile.TemporaryDirectory() as tmp:
        world = make_world(Path(tmp) / "w", WorldSpec(mix_size=max(steps * batch, 8), benchmark_size=2, val_size=0))
        for r in range(rounds):
            for k in range(len(chosen)):
                name = chosen[(r + k) % len(chosen)]
                rate, n = run(name, built, world, steps, batch)
                rates[name].append(rate)
                tokens = n or tokens
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    against_bare = {"lightning": ("lightning_over_bare_steps_per_s", ">= 0.95"),
                    "full_logits": ("answer_only_over_full_logits_steps_per_s",
                                    "information: > 1, answer-only logits are faster"),
                    "no_dropout": ("no_dropout_over_dropout_steps_per_s", "information: > 1, LoRA dropout costs that much")}
    figures = {key: figure(paired_ratios(*((rates["bare"], rates[c]) if c == "full_logits" else (rates[c], rates["bare"]))),
                           goal) for c, (key, goal) in against_bare.items() if c in rates}
    figures |= {
        "bare_tokens_per_s": figure([tokens / steps * r for r in rates["bare"]], "information: real tokens per second"),
        "peak_rss_gb": figure(peak_gb, "information: the process's peak resident memory", exact=True),
    }
    print(json.dumps({"steps_per_s": rates, **{k: f["value"] for k, f in figures.items()}}, indent=1))
    return write_result(args.json, "training", figures,
                        details={"steps_per_s": rates, "steps": steps, "batch": batch, "rounds": rounds,
                                 "tokens_per_step": tokens / steps, "recipe": "lora-sft (r16, every LM linear)",
                                 "model": f"smol-llava, SmolLM2-135M-Instruct ({layers or 30} layers), untrained projector",
                                 "threads": torch.get_num_threads()})


if __name__ == "__main__":
    sys.exit(0 if main()["status"] == "ok" else 1)
