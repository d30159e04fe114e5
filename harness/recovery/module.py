"""The Lightning module that wraps a student and (optionally) its frozen teacher.

Teacher training, SFT recovery and distillation are all this one module with a
different `Recipe`: which components train, and how CE, KL and hidden-state MSE
are weighted.
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from harness.models.adapter import LMAdapter
from harness.recovery.recipes import Recipe


def kl_loss(student_logits, teacher_logits, mask, temperature: float, direction: str, reduction: str, count=None):
    """KL at temperature T, scaled by T^2, over the positions in `mask` (token_mean: divided by `count` if given)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if direction == "forward":  # KL(teacher || student)
        per_token = (t.exp() * (t - s)).sum(-1)
    else:  # KL(student || teacher)
        per_token = (s.exp() * (s - t)).sum(-1)
    per_token = per_token * mask
    if reduction == "batch_sum":
        total = per_token.sum() / student_logits.shape[0]
    else:
        total = per_token.sum() / (mask.sum().clamp(min=1) if count is None else count)
    return total * temperature**2


def hidden_mse(student_h, teacher_h, mask, count=None):
    """Mean squared error over the valid (non-padding) positions (divided by `count` if given)."""
    diff = (student_h.float() - teacher_h.float()).pow(2).mean(-1) * mask
    return diff.sum() / (mask.sum().clamp(min=1) if count is None else count)


def resolve_hidden_pairs(pairs, removed_layers: list[int], n_teacher_layers: int) -> list[tuple[int, int]]:
    """`kept` pairs each kept student layer with the same original layer of the teacher."""
    if pairs != "kept":
        return [tuple(p) for p in pairs]
    kept = [i for i in range(n_teacher_layers) if i not in set(removed_layers)]
    return [(j + 1, i + 1) for j, i in enumerate(kept)] + [(-1, -1)]


def set_trainable(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Freeze everything, add LoRA with peft if asked, then open up what the recipe trains."""
    adapter = LMAdapter(model)
    model.requires_grad_(False)
    if recipe.language_model == "lora":  # peft freezes non-adapter weights, so it goes first
        from peft import LoraConfig, inject_adapter_in_model

        names = "|".join(adapter.linear_names)
        config = LoraConfig(
            r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
            target_modules=rf".*language_model\.layers\.\d+\..*\.({names})$",
        )
        inject_adapter_in_model(config, model)
    elif recipe.language_model == "full":
        adapter.decoder.requires_grad_(True)
        adapter.lm_head.requires_grad_(True)
    if recipe.vision == "full":
        adapter.vision_tower.requires_grad_(True)
    if recipe.projector == "full":
        adapter.projector.requires_grad_(True)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA weights into the base linears and drop the adapter modules."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name), leaf, module.get_base_layer())
    return model


class RecoveryModule(pl.LightningModule):
    def __init__(self, student: nn.Module, recipe: Recipe, teacher: nn.Module | None = None,
                 removed_layers: list[int] | None = None, total_steps: int = 1):
        super().__init__()
        self.recipe = recipe
        self.student = set_trainable(student, recipe)
        if recipe.gradient_checkpointing:  # activations recomputed: the 7B fits one 80 GB GPU
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.total_steps = total_steps
        # The teacher is deliberately not a registered submodule: it is never trained,
        # never saved in checkpoints, and only moved to the student's device.
        object.__setattr__(self, "teacher", teacher)
        self.pairs: list[tuple[int, int]] = []
        self.hidden_proj = nn.ModuleDict()
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            n_t = teacher.config.text_config.num_hidden_layers
            self.pairs = resolve_hidden_pairs(recipe.hidden_pairs, removed_layers or [], n_t)
            hs, ht = student.config.text_config.hidden_size, teacher.config.text_config.hidden_size
            if recipe.hidden > 0 and hs != ht:  # a learned projection when widths differ
                self.hidden_proj = nn.ModuleDict({str(k): nn.Linear(hs, ht, bias=False) for k in range(len(self.pairs))})
        self._t0 = None
        self._tokens = 0

    def on_fit_start(self):
        # Loaded checkpoints come in eval mode and Lightning keeps module modes: the
        # student must train (LoRA dropout), the teacher must not.
        self.student.train()
        if self.teacher is not None:
            self.teacher.to(self.device).eval()

    def forward(self, batch):
        return self.student(**batch)

    def _global_counts(self, batch) -> torch.Tensor | None:
        """Under DDP: (label, attention) token counts summed over processes / world size; None on one process.

        DDP averages the processes' gradients, so per-token means divided by these counts
        (not by the local ones) give the mean over every token of the global batch: N
        processes then train exactly like one process on the same global batch.
        """
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return None
        local = torch.stack([(batch["labels"][:, 1:] != -100).sum(), batch["attention_mask"].sum()]).float()
        return trainer.strategy.reduce(local, reduce_op="sum").clamp(min=1) / trainer.world_size

    def compute_losses(self, batch) -> dict[str, torch.Tensor]:
        r = self.recipe
        need_hidden = r.hidden > 0
        counts = self._global_counts(batch)
        # HF's CE is sum / num_items_in_batch when given (else the local token mean).
        extra = {"num_items_in_batch": counts[0]} if counts is not None and r.ce > 0 else {}
        out = self.student(**batch, output_hidden_states=need_hidden, **extra)
        losses: dict[str, torch.Tensor] = {}
        if r.ce > 0:
            losses["ce"] = out.loss
        if self.teacher is not None and (r.kl > 0 or r.hidden > 0):
            with torch.no_grad():
                self.teacher.eval()
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                t_out = self.teacher(**inputs, output_hidden_states=need_hidden)
            if r.kl > 0:
                mask = (batch["labels"][:, 1:] != -100).float()
                losses["kl"] = kl_loss(out.logits[:, :-1], t_out.logits[:, :-1], mask,
                                       r.temperature, r.kl_direction, r.kl_reduction,
                                       None if counts is None else counts[0])
            if r.hidden > 0:
                mask = batch["attention_mask"].float()
                terms = []
                for k, (si, ti) in enumerate(self.pairs):
                    sh = out.hidden_states[si]
                    if self.hidden_proj:
                        sh = self.hidden_proj[str(k)](sh)
                    terms.append(hidden_mse(sh, t_out.hidden_states[ti], mask, None if counts is None else counts[1]))
                losses["hidden"] = torch.stack(terms).mean()
        weights = {"ce": r.ce, "kl": r.kl, "hidden": r.hidden}
        losses["loss"] = sum(weights[k] * v for k, v in losses.items())
        return losses

    def training_step(self, batch, batch_idx):
        losses = self.compute_losses(batch)
        if self._t0 is None:
            self._t0 = time.perf_counter()
        self._tokens += int(batch["attention_mask"].sum())
        elapsed = max(time.perf_counter() - self._t0, 1e-6)
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, prog_bar=True, on_step=True)
        self.log("train/tokens_per_s", self._tokens / elapsed, on_step=True)
        return losses["loss"]

    def configure_optimizers(self):
        from transformers import get_cosine_schedule_with_warmup

        r = self.recipe
        proj = {id(p) for p in LMAdapter(self.student).projector.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trainable if id(p) not in proj], "lr": r.lr},
            {"params": [p for p in trainable if id(p) in proj], "lr": r.projector_lr or r.lr},
        ]
        groups = [g for g in groups if g["params"]]
        opt = torch.optim.AdamW(groups, weight_decay=r.weight_decay, betas=(0.9, r.adam_beta2))
        warmup = int(r.warmup_ratio * self.total_steps)
        sched = get_cosine_schedule_with_warmup(opt, warmup, max(self.total_steps, 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
