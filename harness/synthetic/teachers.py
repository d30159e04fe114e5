"""`harness teacher train`: train an embedded teacher like LLaVA, from scratch.

Stage 0 pretrains the vision tower (`vision_pretrain.py`: the stand-in for CLIP or
SigLIP pretraining, which cannot be downloaded here). Then LLaVA's two stages:
stage 1 aligns the projector alone, stage 2 trains projector and language model
(the vision tower stays frozen, as in LLaVA-1.5). Stage 2 grows the language model
(progressive stacking): it first trains a shallow language model (`grow.layers`
decoder layers), which learns the world's questions several times faster per step
and per second than the full depth does, then repeats every layer to the embedded
spec's depth (`grow.repeat_layers`) and trains all of it (`deep`).
Stages 1 and 2 run through the same Lightning module and Trainer as recovery.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from harness.data.datamodule import MixDataModule
from harness.errors import HarnessError
from harness.recovery.module import RecoveryModule
from harness.recovery.recipes import get_recipe
from harness.recovery.train import make_logger, save_model, train
from harness.settings import from_mapping, setting
from harness.synthetic.grow import REPEAT_MODES, repeat_layers
from harness.synthetic.models import EMBEDDED, build_embedded
from harness.synthetic.vision_pretrain import pretrain_vision, standardize_projector_input

# Tuned on these 2 CPU cores (docs/teachers.md: teacher quality). `full` trains the shallow
# language model of `grow.layers` layers; `deep` trains it after growing to the spec's depth.
STAGES = {"vision": dict(steps=1000), "align": dict(max_steps=100), "full": dict(epochs=10.0),
          "grow": dict(layers=2, mode="split"), "deep": dict(epochs=6.0, lr=5e-4)}
# Per-teacher departures from STAGES, as `--set` pairs (docs/teachers.md: teacher quality). tiny-bunny's
# Phi language model was still improving at six epochs at full depth.
TEACHER_SETTINGS = {"tiny-bunny": {"deep.epochs": 10.0}}
RECIPES = {"align": "teacher-align", "full": "teacher-full", "deep": "teacher-full"}  # any recipe field applies


@dataclass(frozen=True)
class VisionStage:
    """Stage 0, vision-tower pretraining (`pretrain_vision`); the defaults are that function's."""

    steps: int = setting(400, "optimizer steps", positive=True)
    batch_size: int = setting(128, "images per step", positive=True)
    lr: float = setting(2e-3, "learning rate")

    def validate(self) -> VisionStage:
        if self.lr <= 0:
            raise HarnessError(f"vision.lr must be positive, got {self.lr!r}")
        return self


@dataclass(frozen=True)
class GrowStage:
    """How the shallow language model of stage 2 is grown to the spec's depth (`grow.repeat_layers`)."""

    layers: int = setting(2, "decoder layers of the shallow model (must divide the spec's depth)", positive=True)
    mode: str = setting("split", f"how the copies start: {' or '.join(REPEAT_MODES)}")

    def validate(self) -> GrowStage:
        if self.mode not in REPEAT_MODES:
            raise HarnessError(f"grow.mode must be one of {', '.join(REPEAT_MODES)}, got {self.mode!r}")
        return self


# The stages that are not recipes; `align`, `full` and `deep` take any `Recipe` field.
OTHER_STAGES = {"vision": VisionStage, "grow": GrowStage}


def stage_settings(overrides: dict | None = None, name: str | None = None) -> dict:
    """STAGES, then teacher `name`'s TEACHER_SETTINGS, then `{"full.epochs": 6}`-style overrides, checked."""
    stages = {stage: dict(settings) for stage, settings in STAGES.items()}
    for key, value in {**TEACHER_SETTINGS.get(name, {}), **(overrides or {})}.items():
        stage, _, field = key.partition(".")
        if stage not in stages or not field:
            raise HarnessError(f"teacher setting {key!r} must be STAGE.FIELD with STAGE one of {', '.join(STAGES)}")
        stages[stage][field] = value
    for stage, cls in OTHER_STAGES.items():
        from_mapping(cls, stages[stage], f"teacher setting {stage}")
    for stage, recipe_name in RECIPES.items():
        try:  # unknown or mistyped recipe fields fail here, before any training
            get_recipe(recipe_name, **stages[stage])
        except HarnessError as e:
            raise HarnessError(f"teacher stage {stage}: {e}") from None
    return stages


def train_teacher(name: str, data: str | Path, out: str | Path, seed: int = 0, stages: dict | None = None,
                  progress: bool = True) -> dict:
    if name not in EMBEDDED:
        raise HarnessError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    stages = stages or stage_settings(name=name)
    depth = EMBEDDED[name].text.get("num_hidden_layers", 12)
    shallow = stages["grow"]["layers"]
    if depth % shallow:
        raise HarnessError(f"teacher setting grow.layers={shallow} must divide {name}'s {depth} decoder layers")
    model, processor = build_embedded(name, seed=seed, scale={"num_hidden_layers": shallow})
    summary = {"model": name, "seed": seed, "settings": stages, "stages": {}}
    t0 = time.perf_counter()
    summary["stages"]["vision"] = pretrain_vision(model, processor, seed=seed, progress=progress, **stages["vision"])
    standardize_projector_input(model, processor, seed=seed)
    captions = Path(data) / "align.json"
    for stage in ("align", "full", "deep"):
        if stage == "deep":
            if shallow == depth:
                break
            model = repeat_layers(model, depth // shallow, stages["grow"].get("mode", "split"))
        recipe = get_recipe(RECIPES[stage], seed=seed, **stages[stage])
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
