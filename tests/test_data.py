"""The synthetic world: determinism, vocabulary coverage, LLaVA format, labels, fractions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from harness.data.instruct import IGNORE_INDEX, Collator, fraction_indices, load_mix
from harness.errors import HarnessError
from harness.synthetic.make import BENCHMARKS, WorldSpec, make_world


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    spec = WorldSpec(seed=3, mix_size=20, benchmark_size=6)
    a, b = make_world(tmp_path / "a", spec), make_world(tmp_path / "b", spec)
    assert _digest(a) == _digest(b)
    c = make_world(tmp_path / "c", WorldSpec(seed=4, mix_size=20, benchmark_size=6))
    assert _digest(a)["mix.json"] != _digest(c)["mix.json"]


def test_llava_json_format_and_benchmarks(tiny_world):
    records = json.loads((tiny_world / "mix.json").read_text())
    assert len(records) == 48
    for r in records:
        assert set(r) == {"id", "image", "conversations"}
        assert (tiny_world / r["image"]).exists()
        turns = r["conversations"]
        assert turns[0]["value"].startswith("<image>\n")
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    for task in BENCHMARKS:
        assert (tiny_world / "benchmarks" / f"{task}.parquet").exists()


def test_records_share_images_in_runs(tmp_path):
    """Consecutive records ask about one image; the alignment captions have one record per image."""
    world = make_world(tmp_path / "w", WorldSpec(mix_size=10, benchmark_size=2, records_per_image=4, max_turns=2,
                                                 val_size=0))
    records = json.loads((world / "mix.json").read_text())
    assert [r["image"] for r in records] == [f"images/{i // 4:06d}.png" for i in range(10)]
    assert sorted(p.name for p in (world / "images").iterdir()) == [f"{i:06d}.png" for i in range(3)]
    assert [r["image"] for r in json.loads((world / "align.json").read_text())] == [f"images/{i:06d}.png" for i in range(3)]
    assert {len(r["conversations"]) for r in records} <= {2, 4}


def test_validation_split_is_held_out_and_old_worlds_get_one(tmp_path):
    """val.json: records like the mix's on images of their own; a world made before it existed gains it in place."""
    spec = WorldSpec(mix_size=8, benchmark_size=2, val_size=6)
    world = make_world(tmp_path / "w", spec)
    val = json.loads((world / "val.json").read_text())
    mix = json.loads((world / "mix.json").read_text())
    assert len(val) == 6 and {r["image"] for r in val} == {f"images/val-{i:06d}.png" for i in range(3)}
    assert not {r["image"] for r in val} & {r["image"] for r in mix}
    assert all((world / r["image"]).exists() for r in val)
    assert {r["id"] for r in val}.isdisjoint(r["id"] for r in mix)
    # A world of the previous version: no val.json, no val images, no val_size in its manifest.
    before = {p.name: p.read_bytes() for p in (world / "images").iterdir() if not p.name.startswith("val-")}
    (world / "val.json").unlink()
    for p in (world / "images").glob("val-*"):
        p.unlink()
    manifest = json.loads((world / "manifest.json").read_text())
    del manifest["spec"]["val_size"], manifest["val_size"]
    (world / "manifest.json").write_text(json.dumps(manifest))
    make_world(world, spec)
    assert json.loads((world / "val.json").read_text()) == val
    assert json.loads((world / "manifest.json").read_text())["spec"]["val_size"] == 6
    assert {p.name: p.read_bytes() for p in (world / "images").iterdir() if not p.name.startswith("val-")} == before
    assert json.loads((world / "mix.json").read_text()) == mix
    with pytest.raises(HarnessError, match="different world"):  # another size is another world
        make_world(world, WorldSpec(mix_size=8, benchmark_size=2, val_size=4))


def test_family_weights_set_the_mix(tmp_path):
    """Only weighted families are asked; the weights are part of the world's identity."""
    weights = {"gqa": 0, "pope": 0, "mme": 0, "sqa": 1, "count": 1, "text": 0}
    world = make_world(tmp_path / "w", WorldSpec(mix_size=60, benchmark_size=2, family_weights=weights))
    asked = [r["conversations"][0]["value"].rsplit(" ", 1)[1] for r in json.loads((world / "mix.json").read_text())]
    assert set(asked) == {"letter.", "number."}  # the suffixes of lettered choice and counting
    assert json.loads((world / "manifest.json").read_text())["spec"]["family_weights"] == weights
    with pytest.raises(HarnessError, match="different world"):
        make_world(world, WorldSpec(mix_size=60, benchmark_size=2))


def test_pope_and_mme_are_balanced(tmp_path):
    from datasets import load_dataset

    world = make_world(tmp_path / "w", WorldSpec(mix_size=2, benchmark_size=60))
    pope = load_dataset("parquet", data_files=str(world / "benchmarks/synth_pope.parquet"), split="train")
    assert sorted(set(pope["category"])) == ["adversarial", "popular", "random"]
    assert pope["answer"].count("yes") == 30
    mme = load_dataset("parquet", data_files=str(world / "benchmarks/synth_mme.parquet"), split="train")
    by_image: dict = {}
    for img, ans in zip(mme["image_id"], mme["answer"]):
        by_image.setdefault(img, []).append(ans)
    assert all(sorted(a) == ["no", "yes"] for a in by_image.values())


def test_tokenizer_covers_the_world(tiny_world, tiny_llava):
    _, processor = tiny_llava
    tok = processor.tokenizer
    for r in json.loads((tiny_world / "mix.json").read_text()):
        for t in r["conversations"]:
            assert tok.unk_token_id not in tok(t["value"]).input_ids, t["value"]
    text = "what number is written in the image? one word."
    assert tok.decode(tok(text).input_ids) == text


def test_labels_cover_exactly_the_answers(tiny_world, tiny_llava):
    model, processor = tiny_llava
    collator = Collator(processor, model.config, tiny_world)
    convo = [{"from": "human", "value": "<image>\nhow many objects are there? number."},
             {"from": "gpt", "value": "3"},
             {"from": "human", "value": "is there a red circle in the image? yes or no."},
             {"from": "gpt", "value": "no"}]
    batch = collator([{"conversations": convo, "image": json.loads((tiny_world / "mix.json").read_text())[0]["image"]}])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    tok = processor.tokenizer
    supervised = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert supervised.replace(" ", "") == "3</s>no</s>"
    assert ids.count(model.config.image_token_index) == model.config.image_seq_length == 9
    assert batch["pixel_values"].shape[0] == 1


def test_a_max_length_that_cuts_an_image_is_one_clear_error(tiny_world, tiny_llava):
    """Cutting a record inside its image tokens would leave the model more image features than tokens."""
    model, processor = tiny_llava
    record = json.loads((tiny_world / "mix.json").read_text())[0]
    assert Collator(processor, model.config, tiny_world, 64)([record])["input_ids"].shape[1] <= 64
    with pytest.raises(HarnessError, match="max_length 5 cuts into a record's image tokens"):
        Collator(processor, model.config, tiny_world, 5)([record])


def test_chat_template_matches_processor(tiny_llava):
    from harness.data.instruct import to_messages

    _, processor = tiny_llava
    msgs = to_messages([{"from": "human", "value": "<image>\nwhat shape is at the top? one word."}])
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "USER: <image>\nwhat shape is at the top? one word. ASSISTANT:"


def test_fractions_are_nested_and_seeded():
    sets = [set(fraction_indices(1000, f, seed=7)) for f in (0.01, 0.05, 0.1, 0.25, 1.0)]
    assert [len(s) for s in sets] == [10, 50, 100, 250, 1000]
    assert all(a <= b for a, b in zip(sets, sets[1:]))
    assert fraction_indices(1000, 0.05, seed=7) == fraction_indices(1000, 0.05, seed=7)
    assert fraction_indices(1000, 0.05, seed=7) != fraction_indices(1000, 0.05, seed=8)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_bad_fraction(bad):
    with pytest.raises(HarnessError, match="fraction"):
        fraction_indices(10, bad)


def test_bad_mix_inputs(tmp_path):
    with pytest.raises(HarnessError, match="not found"):
        load_mix(tmp_path / "missing.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(HarnessError):
        load_mix(tmp_path / "empty.json")
    (tmp_path / "wrong.json").write_text(json.dumps([{"id": 1, "text": "hi"}]))
    with pytest.raises(HarnessError, match="conversations"):
        load_mix(tmp_path / "wrong.json")


def test_bad_world_spec_writes_nothing(tmp_path):
    with pytest.raises(HarnessError, match="mix_size"):
        make_world(tmp_path / "w", WorldSpec(mix_size=0))
    with pytest.raises(HarnessError, match="records_per_image"):
        make_world(tmp_path / "w", WorldSpec(records_per_image=0))
    with pytest.raises(HarnessError, match="unknown families"):
        make_world(tmp_path / "w", WorldSpec(family_weights={"vqa": 1}))
    with pytest.raises(HarnessError, match="not all zero"):
        make_world(tmp_path / "w", WorldSpec(family_weights={"sqa": 0}))
    with pytest.raises(HarnessError, match="ask nothing"):  # scenes without digits cannot be read
        make_world(tmp_path / "w", WorldSpec(mix_size=20, family_weights={"text": 1}))
    assert not (tmp_path / "w").exists()


def test_undecodable_image_is_one_clear_error(tiny_world, tiny_llava, tmp_path):
    model, processor = tiny_llava
    (tmp_path / "bad.png").write_bytes(b"not a png")
    collator = Collator(processor, model.config, tmp_path)
    record = {"image": "bad.png", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                    {"from": "gpt", "value": "yes"}]}
    with pytest.raises(HarnessError, match="cannot decode image"):
        collator([record])


def test_length_grouped_batches_pad_less_and_keep_the_epoch():
    """Grouped batching is still a seeded permutation of the epoch, with whole batches of similar length."""
    import random

    from harness.data.datamodule import ResumableLoader

    rng = random.Random(0)
    lengths = [rng.randint(10, 200) for _ in range(1000)]

    def epoch(grouped, world=1, rank=0):
        loader = ResumableLoader(list(range(1000)), 16 // world, list, seed=5, rank=rank, world_size=world,
                                 lengths=lengths if grouped else None)
        return list(loader)

    def efficiency(batches):
        return sum(lengths[i] for b in batches for i in b) / sum(max(lengths[i] for i in b) * len(b) for b in batches)

    plain, grouped = epoch(False), epoch(True)
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert grouped == epoch(True)  # seeded
    assert efficiency(grouped) > 0.9 > 0.7 > efficiency(plain)
    # Under DDP the ranks still split each grouped global batch.
    halves = [epoch(True, world=2, rank=r) for r in range(2)]
    assert [a + b for a, b in zip(*halves)] == grouped
