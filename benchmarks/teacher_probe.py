"""How fast can an embedded teacher's language model learn the world's questions? (the open part of issue #2)

A bare PyTorch loop on freshly generated world samples (multi-turn, like the mix), scored by
teacher-forced exact match on held-out samples per question family. Three views of the image
separate a slow language model from weak vision features:

    --image text    the scene's caption in place of the image: no vision at all
    --image oracle  nine learned cell embeddings (colour + shape or digit + position): perfect vision
    --image tower   the committed teacher's vision tower (frozen) and projector

The language model is built fresh from the teacher's text config, with --layers/--hidden overrides.
--grow-at S --grow-to L deepens it at step S as teacher training does (progressive stacking,
`pruning.apply.repeat_layers`, --grow-mode split or identity).
Prints one JSON line per evaluation:

    .venv/bin/python benchmarks/teacher_probe.py --image oracle --families pope --layers 2 --steps 1000
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

from harness.data.instruct import Collator
from harness.synthetic import world
from harness.synthetic.vision_pretrain import N_COLOR, N_KIND, cell_labels

FAMILIES = ["gqa", "pope", "mme", "sqa", "count", "text"]


def draw(rng: random.Random, families: list[str], turns: int) -> tuple[world.Scene, list[tuple[str, str, str]]]:
    """A scene and up to `turns` (question, answer, family) turns from `families`."""
    while True:
        scene = world.random_scene(rng)
        qa = []
        for _ in range(5 * turns):
            family = rng.choice(families)
            q = world.ask(family, scene, rng)
            if q is not None:
                qa.append((world.with_suffix(family, q["question"]), q["answer"], family))
            if len(qa) == turns:
                break
        if qa:
            return scene, qa


class Probe:
    def __init__(self, teacher: str, image: str, layers: int, hidden: int | None, seed: int, keep_lm: bool = False):
        from transformers import AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration

        torch.manual_seed(seed)
        self.image = image
        self.model = LlavaForConditionalGeneration.from_pretrained(teacher)
        self.processor = AutoProcessor.from_pretrained(teacher)
        text = self.model.config.text_config
        layers = text.num_hidden_layers if keep_lm else layers
        text.num_hidden_layers = layers
        if hidden and not keep_lm:
            text.hidden_size, text.intermediate_size = hidden, hidden * 8 // 3
            text.head_dim = hidden // text.num_attention_heads
            old = self.model.model.multi_modal_projector.linear_2
            self.model.model.multi_modal_projector.linear_2 = nn.Linear(old.in_features, hidden)
        if not keep_lm:  # a fresh language model
            lm = AutoModelForCausalLM.from_config(text)
            self.model.model.language_model, self.model.lm_head = lm.model, lm.lm_head
        self.model.model.vision_tower.requires_grad_(False)
        width = text.hidden_size
        self.oracle = nn.ModuleDict({"color": nn.Embedding(N_COLOR, width), "kind": nn.Embedding(N_KIND, width),
                                     "cell": nn.Embedding(9, width)})
        for emb in self.oracle.values():
            nn.init.normal_(emb.weight, std=0.5)
        self.collator = Collator(self.processor, self.model.config, ".")
        self.image_token = self.model.config.image_token_index

    def parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return params + list(self.oracle.parameters()) if self.image == "oracle" else params

    def conversation(self, scene, qa) -> list[dict]:
        head = world.caption(scene) + " " if self.image == "text" else "<image>\n"
        turns = []
        for i, (q, a, _) in enumerate(qa):
            turns += [{"from": "human", "value": (head if i == 0 else "") + q}, {"from": "gpt", "value": a}]
        return turns

    def expand(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """One image token -> the model's `image_seq_length` of them (what LlavaProcessor does), unsupervised."""
        n, x, y = self.model.config.image_seq_length, [], []
        for token, label in zip(ids, labels):
            x += [token] * (n if token == self.image_token else 1)
            y += [label] * (n if token == self.image_token else 1)
        return x, y

    def forward(self, samples, images) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels of a batch of (scene, qa) samples."""
        encoded = [self.expand(*self.collator.encode(self.conversation(*s))[1:]) for s in samples]
        width = max(len(ids) for ids, _ in encoded)
        ids = torch.full((len(encoded), width), self.collator.tokenizer.pad_token_id)
        labels = torch.full((len(encoded), width), -100)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, (x, y) in enumerate(encoded):
            ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        if self.image == "tower":
            pixels = self.collator.processor.image_processor(images, return_tensors="pt")["pixel_values"]
            return self.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, labels
        embeds = self.model.get_input_embeddings()(ids)
        if self.image == "oracle":
            for i, (scene, _) in enumerate(samples):
                kind, color, _ = cell_labels(scene).unbind(1)
                cells = self.oracle["color"](color) + self.oracle["kind"](kind) + self.oracle["cell"](torch.arange(9))
                embeds[i, ids[i] == self.image_token] = cells
        return self.model(inputs_embeds=embeds, attention_mask=mask).logits, labels


def grow(probe: Probe, depth: int, mode: str) -> None:
    """Deepen the language model to `depth` layers as teacher training does (`repeat_layers`)."""
    from harness.synthetic.grow import repeat_layers

    layers = probe.model.config.text_config.num_hidden_layers
    if depth % layers:
        raise SystemExit(f"--grow-to {depth} is not a multiple of --layers {layers}")
    probe.model = repeat_layers(probe.model, depth // layers, mode)
    probe.model.model.vision_tower.requires_grad_(False)


def batch(rng, probe, families, turns, size):
    samples = [draw(rng, families, turns) for _ in range(size)]
    images = [world.render(s, rng.getrandbits(32)) for s, _ in samples] if probe.image == "tower" else None
    return samples, images


@torch.no_grad()
def evaluate(probe: Probe, held_out, images) -> dict[str, float]:
    """Teacher-forced exact match of every answer (all its tokens), per family."""
    probe.model.eval()
    hits, totals = {}, {}
    for start in range(0, len(held_out), 64):
        chunk = held_out[start: start + 64]
        logits, labels = probe.forward(chunk, images[start: start + 64] if images else None)
        right = logits[:, :-1].argmax(-1) == labels[:, 1:]
        for i, (_, qa) in enumerate(chunk):
            answer = labels[i, 1:] != -100
            # Answer spans, in order: runs of labelled positions (the answer tokens, then </s>).
            starts = (answer & ~torch.cat([torch.tensor([False]), answer[:-1]])).nonzero().flatten().tolist()
            ends = (answer & ~torch.cat([answer[1:], torch.tensor([False])])).nonzero().flatten().tolist()
            assert len(starts) == len(qa), "every turn's answer must be one labelled span"
            for (s, e), (_, _, family) in zip(zip(starts, ends), qa):
                hits[family] = hits.get(family, 0) + bool(right[i, s: e + 1].all())
                totals[family] = totals.get(family, 0) + 1
    probe.model.train()
    scores = {f: round(hits[f] / totals[f], 3) for f in sorted(totals)}
    return {**scores, "mean": round(sum(scores.values()) / len(scores), 3)}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="artifacts/teachers/tiny-llava")
    ap.add_argument("--image", choices=["text", "oracle", "tower"], default="tower")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--keep-lm", action="store_true", help="keep the teacher's own language model (score or continue it)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--turns", type=int, default=1, help="questions per sample (the mix has one)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--held-out", type=int, default=256)
    ap.add_argument("--grow-at", type=int, default=0, help="step at which to deepen the language model")
    ap.add_argument("--grow-to", type=int, default=12)
    ap.add_argument("--grow-mode", choices=["split", "identity"], default="split")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    families = args.families.split(",")
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        ap.error(f"unknown families {unknown}; known: {FAMILIES}")
    probe = Probe(args.teacher, args.image, args.layers, args.hidden, args.seed, args.keep_lm)
    held_out, held_images = batch(random.Random(f"held-out-{args.seed}"), probe, families, args.turns, args.held_out)
    if args.steps == 0:
        line = {"step": 0, **evaluate(probe, held_out, held_images)}
        print(json.dumps(line), flush=True)
        return [line]
    warmup = max(1, args.steps // 20)

    def optimizer(done: int):
        """AdamW on what trains now, warmup then cosine to 0 at --steps, resumed at step `done`."""
        opt = torch.optim.AdamW(probe.parameters(), lr=args.lr, weight_decay=0.0)
        curve = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))  # noqa: E731
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: curve(s + done))

    opt, sched = optimizer(0)
    params = probe.parameters()
    rng, t0, smooth, lines = random.Random(f"train-{args.seed}"), time.perf_counter(), None, []
    for step in range(1, args.steps + 1):
        if step == args.grow_at + 1 and args.grow_at:
            grow(probe, args.grow_to, args.grow_mode)
            print(json.dumps({"grown_to": args.grow_to, **evaluate(probe, held_out, held_images)}), flush=True)
            opt, sched = optimizer(args.grow_at)
            params = probe.parameters()
        logits, labels = probe.forward(*batch(rng, probe, families, args.turns, args.batch))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % args.every == 0 or step == args.steps:
            line = {"step": step, **evaluate(probe, held_out, held_images), "loss": round(smooth, 4),
                    "seconds": round(time.perf_counter() - t0)}
            print(json.dumps(line), flush=True)
            lines.append(line)
    return lines


if __name__ == "__main__":
    main()
