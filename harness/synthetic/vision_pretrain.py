"""Stage 0 of embedded-teacher training: pretrain the vision tower on the world's cells.

LLaVA and Bunny start from a pretrained CLIP / SigLIP, which cannot be downloaded
here. This stage is the stand-in: linear heads read each cell's content (shape or
digit, colour, size) and the cell itself (which of the nine it is) from the patch
features of the layer the projector uses (`vision_feature_layer`), so the features
become linearly decodable, as CLIP's are, position included: without the cell head the
tower dropped its position embeddings (a linear probe on the projector's output found
the cell at chance, 0.12-0.13; with it, 0.80-0.87), leaving the language model only its
own rotary positions to tell the nine image tokens apart.
The heads are discarded afterwards; only the vision tower keeps what it learned.
"""

from __future__ import annotations

import random

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from harness.synthetic import world

N_KIND = 1 + len(world.SHAPES) + 10  # empty, shapes, digits 0-9
N_COLOR = 1 + len(world.COLORS)
N_SIZE = 1 + len(world.SIZES)
HEADS = {"kind": N_KIND, "color": N_COLOR, "size": N_SIZE}
N_CELL = world.GRID * world.GRID  # the position head's classes: the cell, row-major


def cell_labels(scene: world.Scene) -> torch.Tensor:
    """(cells, 3) targets: kind, colour, size; row-major like the vision patches."""
    labels = torch.zeros(world.GRID * world.GRID, len(HEADS), dtype=torch.long)
    colors, shapes = list(world.COLORS), world.SHAPES
    for t in scene.things:
        i = t.row * world.GRID + t.col
        kind = 1 + len(shapes) + t.digit if t.digit >= 0 else 1 + shapes.index(t.shape)
        size = 0 if t.digit >= 0 else 1 + world.SIZES.index(t.size)
        labels[i] = torch.tensor([kind, 1 + colors.index(t.color), size])
    return labels


def projector_inputs(vision_tower, cfg, pixels: torch.Tensor) -> torch.Tensor:
    """The vision features the projector reads (`cfg`: the LLaVA config): layer `vision_feature_layer`,
    CLS dropped where LLaVA drops it."""
    states = vision_tower(pixels, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
    if cfg.vision_config.model_type == "clip_vision_model" and cfg.vision_feature_select_strategy == "default":
        states = states[:, 1:]
    return states


class SceneStream(IterableDataset):
    """An endless seeded stream of freshly rendered scenes with their cell labels."""

    def __init__(self, image_processor, seed: int):
        self.image_processor, self.seed = image_processor, seed

    def __iter__(self):
        rng = random.Random(f"vision-{self.seed}")
        while True:
            scene = world.random_scene(rng)
            image = world.render(scene, rng.getrandbits(32))
            pixels = self.image_processor(image, return_tensors="pt")["pixel_values"][0]
            yield pixels, cell_labels(scene)


class VisionPretrainModule(pl.LightningModule):
    def __init__(self, model, lr: float = 2e-3, total_steps: int = 400):
        super().__init__()
        cfg = model.config
        self.vision = model.model.vision_tower
        self.cfg = cfg
        hidden = cfg.vision_config.hidden_size
        self.heads = nn.ModuleList([nn.Linear(hidden, n) for n in HEADS.values()])
        self.cell_head = nn.Linear(hidden, N_CELL)
        self.lr, self.total_steps = lr, total_steps

    def losses(self, pixels, labels):
        states = projector_inputs(self.vision, self.cfg, pixels)
        out, correct = {}, []
        for k, (name, head) in enumerate(zip(HEADS, self.heads)):
            logits = head(states)
            out[name] = F.cross_entropy(logits.flatten(0, 1), labels[..., k].flatten())
            correct.append(logits.argmax(-1) == labels[..., k])
            out[f"{name}_acc"] = correct[-1].float().mean()
        # Most cells are empty: what matters downstream is reading the occupied ones whole.
        occupied = labels[..., 0] > 0
        out["occupied_acc"] = torch.stack(correct).all(0)[occupied].float().mean()
        logits = self.cell_head(states)  # every patch, empty or not, knows where it is
        cells = torch.arange(N_CELL).expand(logits.shape[:2])
        out["cell"] = F.cross_entropy(logits.flatten(0, 1), cells.flatten())
        out["cell_acc"] = (logits.argmax(-1) == cells).float().mean()
        return out

    def training_step(self, batch, batch_idx):
        out = self.losses(*batch)
        loss = sum(out[name] for name in [*HEADS, "cell"])
        self.log_dict({f"vision/{k}": v.detach() for k, v in out.items()}, on_step=True)
        return loss

    def configure_optimizers(self):
        from transformers import get_cosine_schedule_with_warmup

        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        sched = get_cosine_schedule_with_warmup(opt, int(0.05 * self.total_steps), self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def pretrain_vision(model, processor, steps: int = 400, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                    logger=None, progress: bool = True) -> dict:
    """Train the vision tower in place; return the final per-head accuracies."""
    pl.seed_everything(seed, verbose=False)
    module = VisionPretrainModule(model, lr, steps)
    model.model.vision_tower.requires_grad_(True)
    loader = DataLoader(SceneStream(processor.image_processor, seed), batch_size=batch_size)
    trainer = pl.Trainer(max_steps=steps, accelerator="auto", devices=1, logger=logger or False,
                         enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
                         log_every_n_steps=20, deterministic=True)
    trainer.fit(module, loader)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("vision/")}


@torch.no_grad()
def standardize_projector_input(model, processor, n_images: int = 256, seed: int = 0) -> None:
    """Data-dependent init: fold the per-dimension mean and std of the vision features into linear_1.

    After pretraining, every patch feature shares a large common component (position
    embeddings, biases); the language model then sees nearly identical image tokens
    and learns to ignore them. Standardising the projector's input (a re-parametrisation
    of the randomly initialised projector, no new module) makes image tokens differ.
    """
    stream = iter(SceneStream(processor.image_processor, seed + 1))
    pixels = torch.stack([next(stream)[0] for _ in range(n_images)])
    states = projector_inputs(model.model.vision_tower, model.config, pixels)
    flat = states.flatten(0, 1)
    mean, std = flat.mean(0), flat.std(0).clamp(min=1e-4)
    linear = model.model.multi_modal_projector.linear_1
    linear.bias -= linear.weight @ (mean / std)
    linear.weight /= std


def cell_phrase(kind: int, color: int) -> str:
    """The content words of a cell's kind and colour labels (`cell_labels`): "blue square", "red 7" or "empty".

    Only the words that tell cells apart: a mean over a whole caption phrase ("a large blue square
    at the top left") is dominated by the words every cell shares. Where a cell is comes from
    the image token's place in the sequence, as in LLaVA."""
    if kind == 0:
        return "empty"
    colour = list(world.COLORS)[color - 1]
    if kind > len(world.SHAPES):
        return f"{colour} {kind - 1 - len(world.SHAPES)}"
    return f"{colour} {world.SHAPES[kind - 1]}"


class WordAlignModule(pl.LightningModule):
    """Train the projector alone so each image token lands on its cell's words in the LM's embedding space.

    The target of a cell is the mean input embedding of its phrase (`cell_phrase`), scaled to the
    embeddings' mean norm. A pretrained language model then reads image tokens as (a bag of) the
    words that describe them from the first step of instruction tuning; LLaVA gets the same from
    558k captions, which 2 CPU cores cannot afford on a 30-layer model. No language-model pass.
    """

    def __init__(self, model, tokenizer, lr: float = 1e-3, total_steps: int = 300):
        super().__init__()
        self.vision, self.projector, self.cfg = model.model.vision_tower, model.model.multi_modal_projector, model.config
        self.embed = model.get_input_embeddings().weight.detach()
        self.norm = float(self.embed.norm(dim=-1).mean())
        self.tokenizer, self.lr, self.total_steps = tokenizer, lr, total_steps
        self.targets: dict[tuple, torch.Tensor] = {}

    def target(self, kind: int, color: int) -> torch.Tensor:
        if (kind, color) not in self.targets:
            ids = self.tokenizer(cell_phrase(kind, color), add_special_tokens=False)["input_ids"]
            mean = self.embed[ids].mean(0)
            self.targets[kind, color] = mean * (self.norm / mean.norm())
        return self.targets[kind, color]

    def training_step(self, batch, batch_idx):
        pixels, labels = batch
        with torch.no_grad():
            states = projector_inputs(self.vision, self.cfg, pixels)
        target = torch.stack([torch.stack([self.target(int(kind), int(color)) for kind, color, _ in cells])
                              for cells in labels])
        out = self.projector(states)
        loss = F.mse_loss(out, target)
        cos = F.cosine_similarity(out, target, dim=-1).mean()
        self.log_dict({"words/mse": loss.detach(), "words/cos": cos.detach()}, on_step=True)
        return loss

    def configure_optimizers(self):
        from transformers import get_cosine_schedule_with_warmup

        opt = torch.optim.AdamW(self.projector.parameters(), lr=self.lr, weight_decay=0.0)
        sched = get_cosine_schedule_with_warmup(opt, int(0.05 * self.total_steps), self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def align_projector_to_words(model, processor, steps: int = 300, batch_size: int = 64, lr: float = 1e-3,
                             seed: int = 0, progress: bool = True) -> dict:
    """`WordAlignModule` on a fresh seeded scene stream; returns the final MSE and cosine to the targets."""
    pl.seed_everything(seed, verbose=False)
    module = WordAlignModule(model, processor.tokenizer, lr, steps)
    model.model.vision_tower.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    loader = DataLoader(SceneStream(processor.image_processor, seed + 2), batch_size=batch_size)
    trainer = pl.Trainer(max_steps=steps, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=20,
                         deterministic=True)
    trainer.fit(module, loader)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("words/")}
