"""`harness teacher train`: train an embedded teacher like LLaVA, from scratch.

Stage 0 pretrains the vision tower (`vision_pretrain.py`: the stand-in for CLIP or
SigLIP pretraining, which cannot be downloaded here). Then LLaVA's two stages:
stage 1 aligns the projector alone, stage 2 trains vision tower, projector and
language model together. Stages 1 and 2 run through the same Lightning module and
Trainer as recovery.
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
from harness.recovery.vision_pretrain import pretrain_vision, standardize_projector_input

# Tuned on these 2 CPU cores (README: teacher quality table).
STAGES = {"vision": dict(steps=600), "align": dict(max_steps=100), "full": dict(epochs=2.0)}
VISION_SETTINGS = ("steps", "batch_size", "lr")  # pretrain_vision's knobs; align and full take any recipe field


def stage_settings(overrides: dict | None = None) -> dict:
    """STAGES with `{"full.epochs": 6, "vision.steps": 1000}`-style overrides applied and checked."""
    stages = {stage: dict(settings) for stage, settings in STAGES.items()}
    for key, value in (overrides or {}).items():
        stage, _, field = key.partition(".")
        if stage not in stages or not field:
            raise HarnessError(f"teacher setting {key!r} must be STAGE.FIELD with STAGE one of {', '.join(STAGES)}")
        if stage == "vision" and field not in VISION_SETTINGS:
            raise HarnessError(f"teacher setting {key!r}: the vision stage takes {', '.join(VISION_SETTINGS)}")
        kind = float if field == "lr" else int
        if stage == "vision" and (isinstance(value, bool) or not isinstance(value, kind if kind is int else int | float)
                                  or value <= 0):
            raise HarnessError(f"teacher setting {key!r} must be a positive {kind.__name__}, got {value!r}")
        stages[stage][field] = value
    for stage, recipe_name in (("align", "teacher-align"), ("full", "teacher-full")):
        try:  # unknown or mistyped recipe fields fail here, before any training
            get_recipe(recipe_name, **stages[stage])
        except HarnessError as e:
            raise HarnessError(f"teacher stage {stage}: {e}") from None
    return stages


def train_teacher(name: str, data: str | Path, out: str | Path, seed: int = 0, stages: dict | None = None,
                  progress: bool = True) -> dict:
    if name not in EMBEDDED:
        raise HarnessError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    stages = stages or STAGES
    model, processor = build_embedded(name, seed=seed)
    summary = {"model": name, "seed": seed, "settings": stages, "stages": {}}
    t0 = time.perf_counter()
    summary["stages"]["vision"] = pretrain_vision(model, processor, seed=seed, progress=progress, **stages["vision"])
    standardize_projector_input(model, processor, seed=seed)
    captions = Path(data) / "align.json"
    for stage, recipe_name in (("align", "teacher-align"), ("full", "teacher-full")):
        recipe = get_recipe(recipe_name, seed=seed, **stages[stage])
        source = captions if stage == "align" and captions.exists() else data
        dm = MixDataModule(source, processor, model.config, 1.0, recipe.batch_size, seed, recipe.max_length,
                           group_by_length=recipe.group_by_length)
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
