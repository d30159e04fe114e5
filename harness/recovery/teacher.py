"""`harness teacher train`: train an embedded teacher in LLaVA's two stages.

Stage 1 aligns the projector alone; stage 2 trains vision tower, projector and
language model together (no pretrained vision tower exists offline). Both stages
run through the same Lightning module and Trainer as recovery.
"""

from __future__ import annotations

import time
from pathlib import Path

from harness.data.datamodule import MixDataModule
from harness.errors import HarnessError
from harness.models.embedded import EMBEDDED, build_embedded
from harness.recovery.module import RecoveryModule
from harness.recovery.recipes import get_recipe
from harness.recovery.train import make_logger, save_model, train

# Tuned on these 2 CPU cores (README: teacher quality table).
STAGES = {"align": dict(max_steps=150), "full": dict(epochs=4.0)}


def train_teacher(name: str, data: str | Path, out: str | Path, seed: int = 0, stages: dict | None = None,
                  progress: bool = True) -> dict:
    if name not in EMBEDDED:
        raise HarnessError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    stages = stages or STAGES
    model, processor = build_embedded(name, seed=seed)
    summary = {"model": name, "seed": seed, "stages": {}}
    t0 = time.perf_counter()
    for stage, recipe_name in (("align", "teacher-align"), ("full", "teacher-full")):
        recipe = get_recipe(recipe_name, seed=seed, **stages[stage])
        dm = MixDataModule(data, processor, model.config, 1.0, recipe.batch_size, seed, recipe.max_length)
        module = RecoveryModule(model, recipe)
        logger = make_logger(f"teacher-{name}-{stage}", {"recipe": recipe.__dict__, "model": name},
                             group="teachers", job_type="teacher")
        summary["stages"][stage] = train(module, dm, recipe, run_name=f"{name}-{stage}", logger=logger,
                                         progress=progress)
        logger.experiment.finish()
        model = module.student
    summary["train_time_s"] = time.perf_counter() - t0
    save_model(model, processor, Path(out), {"teacher.json": summary})
    return summary
