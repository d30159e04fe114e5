"""The Lightning module that wraps a student and (optionally) its frozen teacher.

Teacher training, SFT recovery and distillation are all this one module with a
different `Recipe`: which components train, and how CE, KL and hidden-state MSE
are weighted.
"""

from __future__ import annotations

import contextlib
import hashlib
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from harness.data.instruct import IGNORE_INDEX
from harness.errors import HarnessError
from harness.models.adapter import LMAdapter
from harness.recovery.recipes import Recipe


def kl_loss(student_logits, teacher_logits, mask, temperature: float, direction: str, reduction: str, count=None,
            batch_size: int | None = None):
    """KL at temperature T, scaled by T^2, over the positions in `mask` (token_mean: divided by `count` if given).

    `batch_sum` divides the sum over positions and vocabulary by the batch size (the paper's code):
    `batch_size`, or the logits' first dimension when they are [batch, positions, vocabulary].
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if direction == "forward":  # KL(teacher || student)
        per_token = (t.exp() * (t - s)).sum(-1)
    else:  # KL(student || teacher)
        per_token = (s.exp() * (s - t)).sum(-1)
    per_token = per_token * mask
    if reduction == "batch_sum":
        total = per_token.sum() / (batch_size or student_logits.shape[0])
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


def derived_seed(*parts: int | str) -> int:
    """A 64-bit seed for one purpose (`parts`: the recipe seed, then what the draws are for)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch.manual_seed takes < 2**63 on every backend


@contextlib.contextmanager
def seeded_rng(seed: int):
    """Run the block on the global torch RNGs seeded with `seed`, and give the caller its own states back after.

    For parameter initialisation (LoRA, projections) that must depend on the recipe's seed only: a
    fresh process starts from a random default seed, and earlier work in one process has used up
    random numbers, so the unseeded global state differs between two otherwise identical runs.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def set_trainable(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Freeze everything, add LoRA with peft if asked, then open up what the recipe trains.

    The adapters' initial weights depend on `recipe.seed` only (not on the global RNG state)."""
    adapter = LMAdapter(model)
    model.requires_grad_(False)
    if recipe.language_model == "lora":  # peft freezes non-adapter weights, so it goes first
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        present = [m for m in model.modules() if isinstance(m, LoraLayer)]
        if present:  # a later stage (a teacher's polish) goes on training the adapters an earlier one added
            shape = (present[0].r.get("default"), present[0].lora_alpha.get("default"))
            if shape != (recipe.lora_r, recipe.lora_alpha):
                raise HarnessError(f"the model already carries LoRA adapters of rank {shape[0]} and alpha {shape[1]}; "
                                   f"the recipe asks for rank {recipe.lora_r} and alpha {recipe.lora_alpha}")
            for name, param in model.named_parameters():
                param.requires_grad_(".lora_" in name)
        else:
            config = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                                target_modules=adapter.lora_target)
            with seeded_rng(derived_seed(recipe.seed, "lora")):
                inject_adapter_in_model(config, model)
    elif recipe.language_model == "full":
        adapter.decoder.requires_grad_(True)
        adapter.lm_head.requires_grad_(True)
    if recipe.vision == "full":
        adapter.vision_tower.requires_grad_(True)
    # after the tower: where the projector is inside it (Qwen2.5-VL) the projector's own setting wins
    adapter.projector.requires_grad_(recipe.projector == "full")
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
        if recipe.resolved_precision.endswith("-mixed"):  # fp32 master weights for what trains; autocast computes
            for param in self.student.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
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
                with seeded_rng(derived_seed(recipe.seed, "hidden_proj")):
                    self.hidden_proj = nn.ModuleDict({str(k): nn.Linear(hs, ht, bias=False)
                                                      for k in range(len(self.pairs))})
        self._t0 = None
        self._tokens = 0
        self._rng_step, self._micro = None, 0

    def on_fit_start(self):
        # Loaded checkpoints come in eval mode and Lightning keeps module modes: the
        # student must train (LoRA dropout), the teacher must not.
        self.student.train()
        if self.teacher is not None:
            self.teacher.to(self.device).eval()

    def on_train_batch_start(self, batch, batch_idx):
        """Seed the global torch RNGs (LoRA dropout) from (seed, step, micro-batch, process) before every batch.

        The random numbers of a batch then depend on where it is in training, not on what ran before:
        a run resumed from a checkpoint draws the same dropout masks as the uninterrupted run (Lightning
        stores no RNG state; re-seeding once at the start would replay step 0's masks after a restart),
        and nothing else drawing from the global RNG between steps (loaders, loggers) can shift them.
        Checkpoints are written after optimizer steps, so the micro-batch count restarts at 0 on resume.
        """
        step = self.trainer.global_step
        self._micro = self._micro + 1 if step == self._rng_step else 0
        self._rng_step = step
        torch.manual_seed(derived_seed(self.recipe.seed, "batch", step, self._micro, self.global_rank))

    def forward(self, batch):
        return self.student(**batch)

    def _global_counts(self, batch, kl_positions) -> torch.Tensor | None:
        """Under DDP: (answer, KL-position, attention) token counts summed over processes / world size; None on one.

        DDP averages the processes' gradients, so per-token means divided by these counts
        (not by the local ones) give the mean over every token of the global batch: N
        processes then train exactly like one process on the same global batch.
        """
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return None
        local = torch.stack([(batch["labels"][:, 1:] != IGNORE_INDEX).sum(), kl_positions.sum(),
                             batch["attention_mask"].sum()]).float()
        return trainer.strategy.reduce(local, reduce_op="sum").clamp(min=1) / trainer.world_size

    def compute_losses(self, batch) -> dict[str, torch.Tensor]:
        """The recipe's weighted CE, KL and hidden-state MSE for one batch.

        The LM head runs only where a loss reads its logits (answer tokens for CE; for KL the
        recipe's `kd_positions`): over a 49k vocabulary that is most of a small model's step, and
        the numbers are those of full logits restricted to the same positions.
        """
        r = self.recipe
        need_hidden = r.hidden > 0
        use_kl = self.teacher is not None and r.kl > 0
        answer = batch["labels"][:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
        kl_positions = batch["attention_mask"][:, :-1].bool() if r.kd_positions == "all" else answer
        positions = kl_positions if use_kl else answer
        counts = self._global_counts(batch, kl_positions)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = self.student.model(**inputs, output_hidden_states=need_hidden)
        logits = self.student.lm_head(out.last_hidden_state[:, :-1][positions])
        losses: dict[str, torch.Tensor] = {}
        if r.ce > 0:
            targets = batch["labels"][:, 1:][positions]
            n = counts[0] if counts is not None else answer.sum().clamp(min=1)
            losses["ce"] = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum") / n
        if self.teacher is not None and (r.kl > 0 or r.hidden > 0):
            with torch.no_grad():
                self.teacher.eval()
                t_out = self.teacher.model(**inputs, output_hidden_states=need_hidden)
                t_logits = self.teacher.lm_head(t_out.last_hidden_state[:, :-1][positions]) if use_kl else None
            if use_kl:
                losses["kl"] = kl_loss(logits, t_logits, torch.ones(len(logits), device=logits.device),
                                       r.temperature, r.kl_direction, r.kl_reduction,
                                       None if counts is None else counts[1], batch_size=len(batch["labels"]))
            if r.hidden > 0:
                mask = batch["attention_mask"].float()
                terms = []
                for k, (si, ti) in enumerate(self.pairs):
                    sh = out.hidden_states[si]
                    if self.hidden_proj:
                        sh = self.hidden_proj[str(k)](sh)
                    terms.append(hidden_mse(sh, t_out.hidden_states[ti], mask, None if counts is None else counts[2]))
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

    def validation_step(self, batch, batch_idx):
        """The recipe's losses on held-out records (eval mode: no dropout), averaged over the split."""
        losses = self.compute_losses(batch)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, on_step=False, on_epoch=True,
                      batch_size=len(batch["labels"]), sync_dist=True)

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
