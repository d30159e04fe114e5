"""One 2-process CPU DDP recovery run for tests/test_ddp.py: `MODEL WORLD CKPT OUT [CRASH_STEP]`.

Lightning's `ddp` launcher re-runs this file for rank 1, so it is a script rather than a test. With
CRASH_STEP every rank raises at the end of that step (a checkpoint is written after each step); without
it the run starts or resumes from CKPT/last.ckpt and rank 0 writes the student's weights to OUT.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from safetensors.torch import save_file

from harness.data.datamodule import MixDataModule
from harness.models import load
from harness.recovery.module import RecoveryModule
from harness.recovery.recipes import get_recipe
from harness.recovery.train import train

SETTINGS = dict(max_steps=4, batch_size=8, lr=1e-3, warmup_ratio=0.0, precision="32-true", seed=0,
                strategy="ddp", devices=2, val_checks=0)


class CrashAt(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise SystemExit(3)


def main(model_dir: str, world: str, ckpt: str, out: str, crash: str | None = None) -> None:
    recipe = get_recipe("full-sft", **SETTINGS)
    student, processor = load(model_dir)
    dm = MixDataModule(Path(world), processor, student.config, 1.0, recipe.batch_size, recipe.seed,
                       recipe.max_length)
    module = RecoveryModule(student, recipe)
    callbacks = [CrashAt(int(crash))] if crash else []
    summary = train(module, dm, recipe, run_name="ddp-resume", progress=False, accelerator="cpu",
                    ckpt_dir=Path(ckpt), ckpt_every=1, callbacks=callbacks)
    if module.global_rank == 0:
        state = {k: v.detach().clone().contiguous() for k, v in module.student.state_dict().items()}
        save_file(state, out, metadata={"steps": str(summary["steps"]), "resumed": str(summary.get("resumed", False))})
    torch.distributed.barrier() if torch.distributed.is_initialized() else None


if __name__ == "__main__":
    main(*sys.argv[1:])
