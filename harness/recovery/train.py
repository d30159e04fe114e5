"""Run a recipe through the Lightning Trainer and save an HF-native student.

`train` is shared by teacher training and recovery; `recover` adds the teacher,
the pruned student's metadata and `recovery.json`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins import TorchCheckpointIO

from harness.errors import HarnessError
from harness.io import atomic_dir, write_json
from harness.recovery.module import RecoveryModule, merge_lora
from harness.recovery.recipes import Recipe, get_recipe


class NonFiniteLoss(HarnessError):
    """A NaN or inf loss: the run is marked failed, never saved as a model."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Resume checkpoints written beside their target and renamed into place.

    Lightning's own save goes through a temporary file in TMPDIR; where that is another
    filesystem (node-local scratch on clusters) the last step is a copy, and a kill during
    it leaves a partial `last.ckpt` that every rerun would then fail to resume from.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class _FiniteGuard(pl.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        finite = loss is None or bool(torch.isfinite(loss))
        # Every process must stop together (a lone failing rank would leave the others waiting in all-reduce).
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            shown = f"{loss.item()}" if not finite else "on another process"
            raise NonFiniteLoss(f"non-finite loss {shown} at step {trainer.global_step}")


def make_logger(run_name: str, config: dict, group: str | None = None, job_type: str = "recover",
                tags: list[str] | None = None):
    """W&B, offline unless the user configured online mode (WANDB_MODE / WANDB_API_KEY).

    Absolute paths in `config` are made machine-independent (`harness.tracking.portable`).
    """
    from pytorch_lightning.loggers import WandbLogger

    from harness.tracking import portable, run_settings, wandb_dir, wandb_mode

    return WandbLogger(name=run_name, project=os.environ.get("WANDB_PROJECT", "mllm-compression"),
                       save_dir=wandb_dir(), mode=wandb_mode(), group=group, job_type=job_type,
                       config=portable(config), tags=tags, settings=run_settings())


def train(module: RecoveryModule, datamodule, recipe: Recipe, *, run_name: str, ckpt_dir: Path | None = None,
          resume: bool = True, logger=None, devices: int | None = None, strategy: str | None = None,
          progress: bool = True, ckpt_every: int = 50, callbacks: list | None = None,
          accelerator: str = "auto", save_final: bool = False) -> dict:
    """Fit and return a summary (steps, final losses, wall time).

    `devices` and `strategy` default to the recipe's. The datamodule splits every
    global batch over the processes itself, hence `use_distributed_sampler=False`.
    With `ckpt_dir`, a checkpoint is written every `ckpt_every` steps (and at the end with
    `save_final`) and a run finds its `last.ckpt` there to resume from (`resume`).
    """
    devices = recipe.devices if devices is None else devices
    strategy = recipe.strategy if strategy is None else strategy
    pl.seed_everything(recipe.seed, workers=True, verbose=False)
    steps = recipe.max_steps
    if steps <= 0:
        steps = math.ceil(recipe.epochs * datamodule.steps_per_epoch() / recipe.accumulate)
    module.total_steps = steps
    callbacks = [_FiniteGuard(), *(callbacks or [])]
    if ckpt_dir is not None:
        from pytorch_lightning.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=ckpt_every,
                                         save_top_k=0, save_weights_only=False))
    # Validation (when the recipe asks and the data has a held-out split) every steps/val_checks batches.
    val_checks = recipe.val_checks if getattr(datamodule, "val_ds", None) is not None else 0
    every = max(1, steps * recipe.accumulate // val_checks) if val_checks else None
    trainer = pl.Trainer(
        max_steps=steps, val_check_interval=every, check_val_every_n_epoch=None if every else 1,
        limit_val_batches=1.0 if every else 0, max_epochs=-1, accelerator=accelerator, devices=devices, strategy=strategy,
        use_distributed_sampler=False,
        precision=recipe.resolved_precision,
        accumulate_grad_batches=recipe.accumulate, gradient_clip_val=recipe.clip or None,
        logger=logger if logger is not None else False, callbacks=callbacks,
        enable_checkpointing=ckpt_dir is not None, enable_progress_bar=progress,
        enable_model_summary=False, log_every_n_steps=1, deterministic=True,
        num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()],
    )
    last = ckpt_dir / "last.ckpt" if ckpt_dir is not None else None
    t0 = time.perf_counter()
    resumed = resume and last is not None and last.exists()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if resumed else None)
    if save_final and last is not None:
        trainer.save_checkpoint(last)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    summary = {"steps": trainer.global_step, "final_losses": metrics, "wall_time_s": time.perf_counter() - t0}
    if resumed:
        summary["resumed"] = True
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if val:
        summary["val_losses"] = val
    return summary


def save_model(model, processor, out: Path, extra_files: dict[str, dict] | None = None, after=None) -> None:
    """Merge LoRA, then write safetensors + config + processor (+ JSON side files) atomically.

    `after(folder)` may add to (or veto, by raising) the folder before it becomes `out`."""
    model = merge_lora(model)
    model.requires_grad_(False)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        for name, obj in (extra_files or {}).items():
            write_json(tmp / name, obj)
        if after is not None:
            after(tmp)


def recover(teacher: str, student_dir: str | Path, recipe_name: str, data: str | Path, fraction: float,
            out: str | Path, overrides: dict | None = None, group: str | None = None,
            progress: bool = True, teacher_model=None, student_model=None, wandb_run: dict | None = None) -> dict:
    """`harness recover`: train a pruned student with a recipe on a fraction of the mix.

    The W&B run (job type `recover`, named after `out`) holds the recipe, the data fraction, the
    teacher and the student's pruning method and ratios; `wandb_run` (`name`, `config`, `tags`:
    the grid's `wandb_context`) names it and adds the grid axes.
    """
    from harness.data.datamodule import MixDataModule, val_split_of
    from harness.data.instruct import check_images
    from harness.models import load

    recipe = get_recipe(recipe_name, **(overrides or {}))
    if not 0 < fraction <= 1:
        raise HarnessError(f"data fraction must be in (0, 1], got {fraction}")
    if recipe.strategy == "fsdp":  # refuse before the GPU hours, not at save time
        raise HarnessError("strategy fsdp: saving a sharded student as one safetensors model is not implemented yet; use ddp")
    out, student_dir = Path(out), Path(student_dir)
    if out.exists() and any(out.iterdir()):
        raise HarnessError(f"output directory {out} already exists and is not empty")
    pruning_file = student_dir / "pruning.json"
    if recipe.needs_teacher and not pruning_file.exists():
        raise HarnessError(f"{student_dir} has no pruning.json: recipe {recipe.name} needs a student pruned from the teacher")
    pruning = json.loads(pruning_file.read_text()) if pruning_file.exists() else {}
    # bf16 weights load in bf16; under bf16-mixed the module turns the trainable ones into fp32 masters
    dtype = torch.bfloat16 if recipe.resolved_precision in ("bf16-true", "bf16-mixed") else torch.float32
    student, processor = (student_model, None) if student_model is not None else load(student_dir, dtype=dtype)
    if processor is None:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(student_dir)
    t_model = None
    if recipe.needs_teacher:
        t_model = teacher_model if teacher_model is not None else load(teacher, dtype=dtype, processor=False)
        if recipe.kl > 0 and t_model.config.text_config.vocab_size != student.config.text_config.vocab_size:
            raise HarnessError("student and teacher vocabularies differ: a logit loss needs the same vocabulary")
    dm = MixDataModule(data, processor, student.config, fraction, recipe.batch_size, recipe.seed, recipe.max_length,
                      group_by_length=recipe.group_by_length, val_path=val_split_of(data) if recipe.val_checks else None)
    check_images(dm.ds, dm.indices, dm.collator.image_root)  # a bad image fails now, not halfway through training
    if dm.val_ds is not None:
        check_images(dm.val_ds, list(range(len(dm.val_ds))), dm.collator.image_root)
    module = RecoveryModule(student, recipe, t_model, pruning.get("removed_layers", []))
    run_name = (wandb_run or {}).get("name") or out.name
    pruned = {"method": pruning.get("method"), "ratio": pruning.get("ratio_requested"),
              "ratio_achieved": pruning.get("ratio_achieved")}
    config = {"recipe": recipe.__dict__, "data_fraction": fraction, "student": str(student_dir),
              "teacher": str(teacher), **{k: v for k, v in pruned.items() if v is not None},
              **(wandb_run or {}).get("config", {})}
    logger = make_logger(run_name, config, group=group, job_type="recover", tags=(wandb_run or {}).get("tags"))
    ckpt_dir = out.parent / f".{out.name}.ckpt"
    summary = train(module, dm, recipe, run_name=run_name, ckpt_dir=ckpt_dir, logger=logger, progress=progress)
    if module.trainer.is_global_zero:
        logger.experiment.summary.update({"steps": summary["steps"], "num_samples": len(dm.indices),
                                          "wall_time_s": summary["wall_time_s"]})
    logger.experiment.finish()
    if not module.trainer.is_global_zero:  # under DDP the other processes only trained
        return {**summary, "num_samples": len(dm.indices)}
    record = {"recipe": recipe.name, "settings": {k: v for k, v in recipe.__dict__.items() if k != "name"},
              "data_fraction": fraction, "num_samples": len(dm.indices), "teacher": str(teacher), **summary}
    extra = {"recovery.json": record}
    if pruning:
        extra["pruning.json"] = pruning
    save_model(module.student, processor, out, extra)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return record
