"""Recipes: what is trained (per component) x which losses x their weights x optimisation.

Presets are compositions, not code paths: every recipe runs through the same
Lightning module. Loss = ce * CE + kl * KL(T) + hidden * MSE, so the paper's
`alpha*KD + (1-alpha)*CE` is `ce=1-alpha, kl=alpha` (and so on).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from harness.errors import HarnessError

TUNE_TYPES = ("frozen", "full", "lora")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp")


@dataclass(frozen=True)
class Recipe:
    name: str = "custom"
    # Per-component tune types, as in TinyLLaVA_Factory.
    vision: str = "frozen"
    projector: str = "full"
    language_model: str = "frozen"
    # Loss weights.
    ce: float = 1.0
    kl: float = 0.0
    hidden: float = 0.0
    temperature: float = 2.0
    kl_direction: str = "forward"  # forward: KL(teacher || student); reverse: KL(student || teacher)
    kl_reduction: str = "token_mean"  # or "batch_sum": summed over positions and vocab / batch (paper's code)
    # Where logit KD applies: "answer" tokens only (the embedded default: the synthetic world's prompts
    # are templated, so only answers carry information), or "all" valid positions, as the paper's
    # official code does (`get_kl_loss` with labels=None); the paper specs set "all".
    kd_positions: str = "answer"
    # (student hidden index, teacher hidden index) pairs; default: the final (normed) hidden state.
    # "kept" maps every kept layer of a depth-pruned student to its original teacher layer.
    hidden_pairs: tuple | str = ((-1, -1),)
    # LoRA (language model only).
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # Optimisation.
    lr: float = 1e-3
    projector_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 32
    accumulate: int = 1
    clip: float = 1.0
    adam_beta2: float = 0.999  # HF Trainer's default, as in the paper's code
    max_length: int = 512
    # Validation passes over the data's held-out split (val.json beside the mix), evenly spaced over
    # the run: the val/ curves. 0 turns them off; a mix with no val.json has none either way.
    val_checks: int = 4
    # Batches of similar length (LLaVA's group_by_modality_length): far less padding on long,
    # varied conversations (the paper specs turn it on). Off by default: on the synthetic world's
    # one-question records a length-sorted batch holds one question family, which stalls learning.
    group_by_length: bool = False
    # "auto": bf16 mixed precision on GPUs (fp32 master weights for what trains, bf16 frozen weights and
    # teacher, bf16 autocast compute: how LLaVA and Bunny train), fp32 on CPU. "bf16-true" steps bf16
    # weights directly: at lr 2e-5 most updates are below bf16's resolution.
    precision: str = "auto"
    gradient_checkpointing: bool = False
    # Processes (Lightning `devices`) and `strategy`; batch_size is the global batch, split over them.
    devices: int = 1
    strategy: str = "auto"
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def needs_teacher(self) -> bool:
        return self.kl > 0 or self.hidden > 0

    def validate(self) -> Recipe:
        for part in ("vision", "projector", "language_model"):
            if getattr(self, part) not in TUNE_TYPES:
                raise HarnessError(f"recipe {self.name}: {part} must be one of {TUNE_TYPES}, got {getattr(self, part)!r}")
        if self.vision == "lora" or self.projector == "lora":
            raise HarnessError(f"recipe {self.name}: LoRA is supported for the language model only")
        if min(self.ce, self.kl, self.hidden) < 0 or self.ce + self.kl + self.hidden == 0:
            raise HarnessError(f"recipe {self.name}: loss weights must be >= 0 and not all zero")
        if self.kl_direction not in ("forward", "reverse"):
            raise HarnessError(f"recipe {self.name}: kl_direction must be forward or reverse")
        if self.precision not in ("auto", "32-true", "bf16-true", "bf16-mixed", "16-mixed"):
            raise HarnessError(f"recipe {self.name}: precision must be auto, 32-true, bf16-true, bf16-mixed or 16-mixed")
        if self.kd_positions not in ("answer", "all"):
            raise HarnessError(f"recipe {self.name}: kd_positions must be answer or all, got {self.kd_positions!r}")
        if self.kl_reduction not in ("token_mean", "batch_sum"):
            raise HarnessError(f"recipe {self.name}: kl_reduction must be token_mean or batch_sum")
        if not isinstance(self.val_checks, int) or self.val_checks < 0:
            raise HarnessError(f"recipe {self.name}: val_checks must be a non-negative integer, got {self.val_checks!r}")
        if self.temperature <= 0 or self.lr <= 0 or self.batch_size < 1 or self.accumulate < 1:
            raise HarnessError(f"recipe {self.name}: temperature, lr, batch_size and accumulate must be positive")
        if self.strategy not in STRATEGIES:
            raise HarnessError(f"recipe {self.name}: strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not isinstance(self.devices, int) or self.devices < 1 or self.batch_size % self.devices:
            raise HarnessError(f"recipe {self.name}: devices must be a positive integer dividing batch_size (the global batch)")
        if all(getattr(self, p) == "frozen" for p in ("vision", "projector", "language_model")):
            raise HarnessError(f"recipe {self.name}: nothing is trainable")
        return self

    @property
    def resolved_precision(self) -> str:
        import torch

        if self.precision != "auto":
            return self.precision
        return "bf16-mixed" if torch.cuda.is_available() else "32-true"

    def with_overrides(self, **overrides) -> Recipe:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise HarnessError(f"unknown recipe setting(s): {', '.join(unknown)}")
        if isinstance(overrides.get("hidden_pairs"), list):
            overrides["hidden_pairs"] = tuple(tuple(p) for p in overrides["hidden_pairs"])
        import typing

        from harness.settings import fits

        hints = typing.get_type_hints(Recipe)
        for f in dataclasses.fields(self):
            if f.name in overrides and not fits(overrides[f.name], hints[f.name]):
                raise HarnessError(f"recipe {self.name}: {f.name} must be {f.type}, got {overrides[f.name]!r}")
        return dataclasses.replace(self, **overrides).validate()


ALPHA = 0.5
_LORA = dict(language_model="lora")

PRESETS: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe("proj-sft"),
        Recipe("lora-sft", **_LORA),
        Recipe("full-sft", language_model="full"),
        Recipe("kd-logit", **_LORA, ce=0.0, kl=1.0),
        Recipe("kd-hidden", **_LORA, ce=0.0, hidden=1.0),
        Recipe("sft+kd-logit", **_LORA, ce=1 - ALPHA, kl=ALPHA),
        Recipe("sft+kd-hidden", **_LORA, ce=1 - ALPHA, hidden=ALPHA),
        Recipe("sft+kd-logit+hidden", **_LORA, ce=1 - ALPHA, kl=ALPHA, hidden=ALPHA),
        # Training the embedded teachers in LLaVA's two stages (synthetic/teachers.py); batch 128
        # of one-question records, the setting measured best on these 2 cores (docs/teachers.md).
        Recipe("teacher-align", lr=1e-3, batch_size=64, warmup_ratio=0.05, adam_beta2=0.98),
        Recipe("teacher-full", language_model="full", lr=1e-3, batch_size=128, warmup_ratio=0.05, adam_beta2=0.98),
        # Instruction tuning on a pretrained language model (smol-llava): projector and LoRA adapters.
        # No LoRA dropout: on CPU its Bernoulli masks were half of a 30-layer forward pass (docs/teachers.md).
        Recipe("teacher-lora", language_model="lora", lr=1e-3, batch_size=16, warmup_ratio=0.05, adam_beta2=0.98,
               lora_dropout=0.0),
    ]
}

# The paper's settings for the real models (../shared/paper/REFERENCE.md).
PAPER_SETTINGS = {
    "llava": dict(lr=2e-5, projector_lr=2e-5, epochs=1.0, warmup_ratio=0.03, weight_decay=0.0,
                  lora_r=128, lora_alpha=256, lora_dropout=0.05, temperature=2.0, max_length=2048,
                  batch_size=16, kl_reduction="batch_sum", kd_positions="all", gradient_checkpointing=True),
    "bunny": dict(lr=2e-5, projector_lr=2e-5, epochs=1.0, warmup_ratio=0.03, weight_decay=0.0,
                  lora_r=64, lora_alpha=16, lora_dropout=0.05, temperature=2.0, max_length=2048,
                  batch_size=16, kl_reduction="batch_sum", kd_positions="all", gradient_checkpointing=True),
}


def get_recipe(name: str, **overrides) -> Recipe:
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise HarnessError(f"unknown recipe {name!r}{hint}; known: {', '.join(PRESETS)}")
    return PRESETS[name].with_overrides(**overrides)
