"""`harness data make`: write the synthetic world to disk.

Layout (the training mix uses the LLaVA-v1.5 JSON format, so the same loader reads
LLaVA-665k or Bunny-695k):

    OUT/mix.json                 [{id, image, conversations: [{from, value}, ...]}, ...]
    OUT/align.json               one caption per image, for the alignment stage
    OUT/val.json                 held-out records of the mix's distribution (recovery's validation curves)
    OUT/images/000123.png
    OUT/benchmarks/<task>.parquet  held-out splits with embedded images
    OUT/manifest.json            the generating config and the file list
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.errors import HarnessError
from harness.io import atomic_dir, write_json
from harness.synthetic import world

BENCHMARKS = ("synth_gqa", "synth_pope", "synth_mme", "synth_sqa", "synth_count", "synth_docvqa")


@dataclass(frozen=True)
class WorldSpec:
    seed: int = 0
    mix_size: int = 40000  # conversations (records) in the training mix
    val_size: int = 256  # held-out records like the mix's, on images of their own (val.json)
    benchmark_size: int = 400
    min_turns: int = 1
    max_turns: int = 1
    # Consecutive records share one image, as LLaVA-665k's VQA subsets share COCO images.
    # One question per record and many images per batch teach a from-scratch teacher far
    # faster than multi-turn records at the same compute (docs/teachers.md).
    records_per_image: int = 2
    # Relative frequency of each question family in the mix (world.FAMILY_WEIGHTS).
    family_weights: dict[str, int] = field(default_factory=lambda: dict(world.FAMILY_WEIGHTS))

    def validate(self) -> None:
        if self.mix_size < 1:
            raise HarnessError(f"mix_size must be >= 1, got {self.mix_size}")
        if self.val_size < 0:
            raise HarnessError(f"val_size must be >= 0, got {self.val_size}")
        if self.benchmark_size < 2:
            raise HarnessError(f"benchmark_size must be >= 2, got {self.benchmark_size}")
        if not 1 <= self.min_turns <= self.max_turns:
            raise HarnessError(f"need 1 <= min_turns <= max_turns, got {self.min_turns}, {self.max_turns}")
        if self.records_per_image < 1:
            raise HarnessError(f"records_per_image must be >= 1, got {self.records_per_image}")
        unknown = sorted(set(self.family_weights) - set(world.SUFFIX))
        if unknown:
            raise HarnessError(f"family_weights: unknown families {unknown}; known: {', '.join(world.SUFFIX)}")
        weights = self.family_weights.values()
        if any(not isinstance(w, int) or isinstance(w, bool) or w < 0 for w in weights) or not any(weights):
            raise HarnessError(f"family_weights must be non-negative ints, not all zero, got {self.family_weights}")


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_mix(spec: WorldSpec, out: Path) -> int:
    records, captions = _records(spec, out, spec.mix_size, random.Random(f"mix-{spec.seed}"), "")
    (out / "mix.json").write_text(json.dumps(records, indent=0, sort_keys=True))
    # Like LLaVA's 558k caption set: the alignment stage's data, over the same images.
    (out / "align.json").write_text(json.dumps(captions, indent=0, sort_keys=True))
    return len(records)


def make_val(spec: WorldSpec, out: Path) -> int:
    """The validation split: records drawn like the mix's from a seed stream of their own, so on other images."""
    records, _ = _records(spec, out, spec.val_size, random.Random(f"val-{spec.seed}"), "val-")
    (out / "val.json").write_text(json.dumps(records, indent=0, sort_keys=True))
    return len(records)


def _records(spec: WorldSpec, out: Path, n: int, rng: random.Random, prefix: str) -> tuple[list, list]:
    """`n` LLaVA-format records (and one caption per image), images written under `out/images/`."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    records, captions = [], []
    for i in range(n):
        image_index, position = divmod(i, spec.records_per_image)  # position among its image's records
        if position == 0:
            scene = world.random_scene(rng)
            name = f"images/{prefix}{image_index:06d}.png"
            (out / name).write_bytes(_png_bytes(world.render(scene, noise_seed=rng.getrandbits(32))))
            captions.append({"id": f"synth-{prefix}cap-{image_index:06d}", "image": name, "conversations": [
                {"from": "human", "value": "<image>\ndescribe the image."},
                {"from": "gpt", "value": world.caption(scene)}]})
        turns = world.training_turns(scene, rng, rng.randint(spec.min_turns, spec.max_turns), spec.family_weights)
        if not turns:
            raise HarnessError(f"family_weights {spec.family_weights} ask nothing about {name}; "
                               "give weight to a family every scene answers (gqa, pope, count)")
        conversations = []
        for k, (q, a) in enumerate(turns):
            conversations.append({"from": "human", "value": ("<image>\n" + q) if k == 0 else q})
            conversations.append({"from": "gpt", "value": a})
        records.append({"id": f"synth-{prefix}{i:06d}", "image": name, "conversations": conversations})
    return records, captions


def _benchmark_rows(task: str, spec: WorldSpec) -> list[dict]:
    """Held-out items: a seed stream of their own, so no benchmark image is in the mix."""
    rng = random.Random(f"{task}-{spec.seed}")
    rows: list[dict] = []
    n = spec.benchmark_size
    while len(rows) < n:
        scene = world.random_scene(rng, text_prob=1.0 if task == "synth_docvqa" else 0.25)
        image = {"bytes": _png_bytes(world.render(scene, rng.getrandbits(32))), "path": None}
        qid = f"{task}-{len(rows):05d}"
        if task == "synth_mme":
            pair = world.ask_mme_pair(scene, rng)
            for k, q in enumerate(pair or []):
                rows.append(dict(q, question_id=f"{qid}-{k}", image_id=qid, image=image))
            continue
        if task == "synth_pope":
            negative = ["random", "popular", "adversarial"][len(rows) % 3]
            q = world.ask_pope(scene, rng, negative, positive=(len(rows) // 3) % 2 == 0)
        else:
            ask = {"synth_gqa": world.ask_gqa, "synth_sqa": world.ask_sqa,
                   "synth_count": world.ask_count, "synth_docvqa": world.ask_text}[task]
            q = ask(scene, rng)
        if q is not None:
            rows.append(dict(q, question_id=qid, image=image))
    return rows[:n]


def make_benchmarks(spec: WorldSpec, out: Path) -> dict[str, int]:
    from datasets import Dataset, Features, Image, Value

    out.mkdir(parents=True)
    sizes = {}
    for task in BENCHMARKS:
        rows = _benchmark_rows(task, spec)
        columns = sorted({k for r in rows for k in r})
        data = {c: [r.get(c) for r in rows] for c in columns}
        if "options" in data:
            data["options"] = [json.dumps(o) for o in data["options"]]
        features = Features({c: Image() if c == "image" else Value("string") for c in columns})
        Dataset.from_dict(data, features=features).to_parquet(str(out / f"{task}.parquet"))
        sizes[task] = len(rows)
    return sizes


def make_world(out: str | Path, spec: WorldSpec = WorldSpec(), overwrite: bool = False) -> Path:
    """Write the whole world atomically; the same spec always gives the same bytes."""
    spec.validate()
    out = Path(out)
    if out.exists():
        manifest = out / "manifest.json"
        made = json.loads(manifest.read_text()) if manifest.exists() else None
        if made and made["spec"] == asdict(spec) and not overwrite:
            return out
        if made and "val_size" not in made["spec"] and {**made["spec"], "val_size": spec.val_size} == asdict(spec) \
                and not overwrite:
            return _add_val(out, spec, made)  # a world made before validation splits existed
        if not overwrite:
            raise HarnessError(f"{out} exists and holds a different world; pass --overwrite to replace it")
        shutil.rmtree(out)
    with atomic_dir(out) as tmp:
        n_mix = make_mix(spec, tmp)
        n_val = make_val(spec, tmp)
        sizes = make_benchmarks(spec, tmp / "benchmarks")
        manifest = {"spec": asdict(spec), "mix_size": n_mix, "val_size": n_val, "benchmarks": sizes}
        write_json(tmp / "manifest.json", manifest)
    return out


def _add_val(out: Path, spec: WorldSpec, manifest: dict) -> Path:
    """Give a world of an earlier version its validation split; every other file stays as it was.

    The split's images go in first and the manifest last, so an interrupted upgrade is redone."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=out) as tmp:
        n_val = make_val(spec, Path(tmp))
        for image in sorted((Path(tmp) / "images").iterdir()):
            os.replace(image, out / "images" / image.name)
        os.replace(Path(tmp) / "val.json", out / "val.json")
    manifest = {**manifest, "spec": asdict(spec), "val_size": n_val}
    write_json(out / "manifest.json", manifest)
    return out
