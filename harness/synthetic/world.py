"""The synthetic multimodal world: seeded scenes, their pictures, and questions about them.

A scene is a 3x3 grid of cells. Each cell is empty, holds one coloured shape (small
or large, slightly jittered), or one seven-segment digit. Cells line up with the
vision tower's patches, so a tiny model can learn the world in minutes; everything
the benchmarks ask (attributes, relations, existence, counting, reading) is still
a genuine visual question that a pruned language model can forget.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

GRID = 3
CELL = 16
IMAGE_SIZE = GRID * CELL

SHAPES = ["circle", "square", "triangle", "cross", "diamond"]
PLURALS = {s: s + ("es" if s == "cross" else "s") for s in SHAPES}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 100, 240),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "white": (240, 240, 240),
}
# Non-uniform object frequencies give POPE's "popular" negatives a meaning.
SHAPE_WEIGHTS = [5, 4, 3, 2, 1]
COLOR_WEIGHTS = [5, 4, 4, 3, 2, 1]
SIZES = ["small", "large"]
POSITIONS = [
    ["top left", "top", "top right"],
    ["left", "center", "right"],
    ["bottom left", "bottom", "bottom right"],
]
BACKGROUND = (28, 28, 32)
LETTERS = "ABCD"

# Seven-segment layout: segment -> (x0, y0, x1, y1) in a 6x10 box.
_SEGMENTS = {
    "a": (0, 0, 6, 1), "b": (5, 0, 6, 5), "c": (5, 5, 6, 10), "d": (0, 9, 6, 10),
    "e": (0, 5, 1, 10), "f": (0, 0, 1, 5), "g": (0, 4, 6, 6),
}
_DIGIT_SEGMENTS = ["abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg"]


@dataclass(frozen=True)
class Thing:
    """One occupied cell: a shape or a digit."""

    row: int
    col: int
    color: str
    shape: str = ""  # empty for digits
    size: str = "large"
    digit: int = -1  # -1 for shapes
    dx: int = 0
    dy: int = 0

    @property
    def position(self) -> str:
        return POSITIONS[self.row][self.col]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    things: list[Thing] = field(default_factory=list)

    @property
    def objects(self) -> list[Thing]:
        return [t for t in self.things if t.digit < 0]

    @property
    def digits(self) -> list[Thing]:
        return [t for t in self.things if t.digit >= 0]

    @property
    def number(self) -> str:
        """The digits read left to right, top to bottom."""
        return "".join(str(t.digit) for t in sorted(self.digits, key=lambda t: (t.row, t.col)))

    def at(self, row: int, col: int) -> Thing | None:
        return next((t for t in self.things if t.row == row and t.col == col), None)


def random_object(rng: random.Random) -> tuple[str, str]:
    shape = rng.choices(SHAPES, SHAPE_WEIGHTS)[0]
    color = rng.choices(list(COLORS), COLOR_WEIGHTS)[0]
    return color, shape


def random_scene(rng: random.Random, text_prob: float = 0.25) -> Scene:
    """Two to five objects; sometimes a row of two or three digits as well."""
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    things: list[Thing] = []
    if rng.random() < text_prob:
        row = rng.randrange(GRID)
        n_digits = rng.choice([2, 3])
        start = rng.randrange(GRID - n_digits + 1)
        color = rng.choice(list(COLORS))
        for col in range(start, start + n_digits):
            things.append(Thing(row, col, color, digit=rng.randrange(10)))
            cells.remove((row, col))
    n_objects = rng.randint(1, 3) if things else rng.randint(2, 5)
    for r, c in rng.sample(cells, n_objects):
        color, shape = random_object(rng)
        things.append(
            Thing(r, c, color, shape, rng.choice(SIZES), dx=rng.randint(-2, 2), dy=rng.randint(-2, 2))
        )
    return Scene(things)


def render(scene: Scene, noise_seed: int) -> Image.Image:
    """Draw the scene as an RGB image with a little pixel noise."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for t in scene.things:
        cx, cy = t.col * CELL + CELL // 2 + t.dx, t.row * CELL + CELL // 2 + t.dy
        fill = COLORS[t.color]
        if t.digit >= 0:
            _draw_digit(draw, t.col * CELL + 5, t.row * CELL + 3, t.digit, fill)
            continue
        r = 3 if t.size == "small" else 6
        if t.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif t.shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif t.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        elif t.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        elif t.shape == "cross":
            w = max(1, r // 3)
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    pixels = np.asarray(img, dtype=np.int16)
    noise = np.random.default_rng(noise_seed).integers(-8, 9, size=pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def _draw_digit(draw: ImageDraw.ImageDraw, x: int, y: int, digit: int, fill) -> None:
    for seg in _DIGIT_SEGMENTS[digit]:
        x0, y0, x1, y1 = _SEGMENTS[seg]
        draw.rectangle([x + x0, y + y0, x + x1 - 1, y + y1 - 1], fill=fill)


# ----------------------------------------------------------------------------- questions
# Each generator returns a question dict or None when the scene does not support it.
# Every dict has "question" and "answer"; benchmark-specific fields ride along.

PROMPT_WORD = "one word."
PROMPT_YESNO = "yes or no."
PROMPT_LETTER = "letter."
PROMPT_NUMBER = "number."


def _unique(items, key):
    counts: dict = {}
    for it in items:
        counts[key(it)] = counts.get(key(it), 0) + 1
    return [it for it in items if counts[key(it)] == 1]


def ask_gqa(scene: Scene, rng: random.Random) -> dict | None:
    """Compositional attribute and relation questions, answered with one word."""
    objs = scene.objects
    kinds = ["color_of_shape", "shape_of_color", "color_at", "shape_at", "left_of", "above"]
    rng.shuffle(kinds)
    for kind in kinds:
        if kind == "color_of_shape" and (u := _unique(objs, lambda t: t.shape)):
            t = rng.choice(u)
            return {"question": f"what color is the {t.shape}?", "answer": t.color, "kind": kind}
        if kind == "shape_of_color" and (u := _unique(objs, lambda t: t.color)):
            t = rng.choice(u)
            return {"question": f"what shape is the {t.color} object?", "answer": t.shape, "kind": kind}
        if kind == "color_at" and objs:
            t = rng.choice(objs)
            return {"question": f"what color is the object at the {t.position}?", "answer": t.color, "kind": kind}
        if kind == "shape_at" and objs:
            t = rng.choice(objs)
            return {"question": f"what shape is at the {t.position}?", "answer": t.shape, "kind": kind}
        if kind == "left_of":
            pairs = [(a, b) for a in objs for b in objs if a.row == b.row and a.col == b.col - 1]
            pairs = [(a, b) for a, b in pairs if b in _unique(objs, lambda t: t.name)]
            if pairs:
                a, b = rng.choice(pairs)
                q = f"what color is the object left of the {b.name}?"
                return {"question": q, "answer": a.color, "kind": kind}
        if kind == "above":
            u = _unique(objs, lambda t: t.name)
            pairs = [(a, b) for a in u for b in u if a is not b and a.row != b.row]
            if pairs:
                a, b = rng.choice(pairs)
                ans = "yes" if a.row < b.row else "no"
                return {"question": f"is the {a.name} above the {b.name}?", "answer": ans, "kind": kind}
    return None


def ask_pope(scene: Scene, rng: random.Random, negative: str, positive: bool) -> dict | None:
    """Object existence; negatives are random, popular, or adversarial (share shape or colour)."""
    present = {t.name for t in scene.objects}
    if positive:
        name = rng.choice(sorted(present))
    else:
        everything = [f"{c} {s}" for c in COLORS for s in SHAPES]
        absent = [n for n in everything if n not in present]
        if negative == "popular":
            weights = {f"{c} {s}": cw * sw for c, cw in zip(COLORS, COLOR_WEIGHTS) for s, sw in zip(SHAPES, SHAPE_WEIGHTS)}
            absent.sort(key=lambda n: (-weights[n], n))
            name = rng.choice(absent[:6])
        elif negative == "adversarial":
            close = [n for n in absent if any(n.split()[0] == p.split()[0] or n.split()[1] == p.split()[1] for p in present)]
            name = rng.choice(close or absent)
        else:
            name = rng.choice(absent)
    answer = "yes" if positive else "no"
    return {"question": f"is there a {name} in the image?", "answer": answer, "category": negative}


def ask_mme_pair(scene: Scene, rng: random.Random) -> list[dict] | None:
    """Two yes/no questions on one image, one true and one false (MME's acc+ needs both right)."""
    objs = scene.objects
    category = rng.choice(["existence", "count", "position", "color"])
    if category == "existence":
        present = sorted({t.shape for t in objs})
        absent = [s for s in SHAPES if s not in present]
        if not absent:
            return None
        yes, no = rng.choice(present), rng.choice(absent)
        qs = [f"is there a {yes} in the image?", f"is there a {no} in the image?"]
    elif category == "count":
        n = len(objs)
        wrong = rng.choice([k for k in range(1, 6) if k != n])
        qs = [f"are there {n} objects in the image?", f"are there {wrong} objects in the image?"]
    elif category == "position":
        u = _unique(objs, lambda t: t.name)
        if not u:
            return None
        t = rng.choice(u)
        other = rng.choice([p for row in POSITIONS for p in row if p != t.position])
        qs = [f"is the {t.name} at the {t.position}?", f"is the {t.name} at the {other}?"]
    else:
        u = _unique(objs, lambda t: t.shape)
        if not u:
            return None
        t = rng.choice(u)
        other = rng.choice([c for c in COLORS if c != t.color])
        qs = [f"is the {t.shape} {t.color}?", f"is the {t.shape} {other}?"]
    pair = [{"question": qs[0], "answer": "yes"}, {"question": qs[1], "answer": "no"}]
    rng.shuffle(pair)
    return [dict(p, category=category) for p in pair]


def ask_sqa(scene: Scene, rng: random.Random) -> dict | None:
    """Multiple choice with four lettered options, answered with the letter."""
    objs = scene.objects
    if rng.random() < 0.5:
        t = rng.choice(objs)
        stem, correct, pool = f"which shape is at the {t.position}?", t.shape, SHAPES
    else:
        u = _unique(objs, lambda t: t.shape)
        if not u:
            return None
        t = rng.choice(u)
        stem, correct, pool = f"what color is the {t.shape}?", t.color, list(COLORS)
    options = [correct] + rng.sample([p for p in pool if p != correct], 3)
    rng.shuffle(options)
    letter = LETTERS[options.index(correct)]
    text = stem + " " + " ".join(f"{L}. {o}" for L, o in zip(LETTERS, options))
    return {"question": text, "answer": letter, "options": options}


def ask_count(scene: Scene, rng: random.Random) -> dict | None:
    objs = scene.objects
    kind = rng.choice(["all", "shape", "color"])
    if kind == "all":
        return {"question": "how many objects are there?", "answer": str(len(objs))}
    if kind == "shape":
        s = rng.choice(objs).shape
        return {"question": f"how many {PLURALS[s]} are there?", "answer": str(sum(t.shape == s for t in objs))}
    c = rng.choice(objs).color
    return {"question": f"how many {c} objects are there?", "answer": str(sum(t.color == c for t in objs))}


def ask_text(scene: Scene, rng: random.Random) -> dict | None:
    """Reading the digits, like DocVQA/TextVQA."""
    if not scene.digits:
        return None
    if rng.random() < 0.7:
        return {"question": "what number is written in the image?", "answer": scene.number}
    first = sorted(scene.digits, key=lambda t: t.col)[0]
    return {"question": "what color is the number?", "answer": first.color}


def caption(scene: Scene) -> str:
    parts = [f"a {t.size} {t.name} at the {t.position}" for t in sorted(scene.objects, key=lambda t: (t.row, t.col))]
    if scene.digits:
        parts.append(f"the number {scene.number}")
    return ", ".join(parts) + "."


# The instruction suffix each family carries, as the LLaVA-665k mix does.
SUFFIX = {
    "gqa": PROMPT_WORD, "pope": PROMPT_YESNO, "mme": PROMPT_YESNO,
    "sqa": PROMPT_LETTER, "count": PROMPT_NUMBER, "text": PROMPT_WORD,
}


def with_suffix(family: str, question: str) -> str:
    return f"{question} {SUFFIX[family]}"


def ask(family: str, scene: Scene, rng: random.Random) -> dict | None:
    """One training question of a family (POPE: a random negative kind; MME: one question of a pair)."""
    if family == "pope":
        return ask_pope(scene, rng, rng.choice(["random", "popular", "adversarial"]), rng.random() < 0.5)
    if family == "mme":
        pair = ask_mme_pair(scene, rng)
        return rng.choice(pair) if pair else None
    return {"gqa": ask_gqa, "sqa": ask_sqa, "count": ask_count, "text": ask_text}[family](scene, rng)


# How often each family is asked in the training mix (`WorldSpec.family_weights`).
# GQA, the broadest family, gets the most. (Asking lettered choice and counting most,
# sqa=4 and count=3, helped one teacher's lettered choice and hurt the other teacher
# everywhere: docs/teachers.md.)
FAMILY_WEIGHTS = {"gqa": 3, "pope": 2, "mme": 2, "sqa": 2, "count": 2, "text": 2}


def training_turns(scene: Scene, rng: random.Random, n_turns: int,
                   weights: dict[str, int] | None = None) -> list[tuple[str, str]]:
    """A conversation of `n_turns` questions, each of a family drawn by `weights`.

    No captions: they are the alignment stage's data (`align.json`), and in a token-mean
    loss one 30-token caption outweighs a dozen one-word answers.
    """
    turns: list[tuple[str, str]] = []
    families = [f for f, w in (weights or FAMILY_WEIGHTS).items() for _ in range(w)]
    attempts = 0
    while len(turns) < n_turns and attempts < 40:
        attempts += 1
        fam = rng.choice(families)
        q = ask(fam, scene, rng)
        if q is not None and all(q["question"] not in t[0] for t in turns):
            turns.append((with_suffix(fam, q["question"]), q["answer"]))
    return turns


def vocabulary_texts() -> list[str]:
    """Every word the world can say, for building the tokenizer's vocabulary."""
    words = [
        *SHAPES, *PLURALS.values(), *COLORS, *SIZES, *LETTERS, *map(str, range(10)),
        *(p for row in POSITIONS for p in row), "yes", "no", "nothing",
        *SUFFIX.values(), "describe the image.", "the number",
        "what color is the object at the ?", "what shape is at the ?", "what shape is the object?",
        "what color is the object left of the ?", "is the above the ?", "is there a in the image?",
        "are there objects in the image?", "is the at the ?", "which shape is at the ?",
        "how many objects are there?", "how many are there?", "what number is written in the image?",
        "what color is the number?", "a at the , .", "A. B. C. D.", "USER: ASSISTANT:",
    ]
    return words
