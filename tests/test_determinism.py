"""Recovery is a function of its inputs and seed: twice the same run gives bit-identical weights, and a run
killed and resumed from its checkpoint ends bit-identical to one that was never interrupted.

Each run starts from a deliberately different global torch RNG state: a fresh process draws a random default
seed, and whatever ran before in the same process has used up random numbers, so nothing may depend on it.
Both properties failed before issue #20 item 11, for three reasons: the LoRA adapters (and the width
projections of hidden-state KD) were initialised from that unseeded state (max |diff| 0.012 between two
identical `harness recover` runs); a resumed run replayed the dropout masks of steps 0, 1, ... after the
restart instead of continuing them; and the loader's epoch never advanced under Lightning (which stops at
the loader's length instead of exhausting it), so every epoch repeated epoch 0's order and a resumed run
skipped the resumed epoch's consumed batches again in every later epoch."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from harness.data.datamodule import MixDataModule, ResumableLoader
from harness.models import LMAdapter
from harness.recovery.module import RecoveryModule, merge_lora
from harness.recovery.recipes import get_recipe
from harness.recovery.train import recover, train
from tests.test_recovery import _Crash, _CrashAt

# LoRA + hidden-state KD with a large dropout, so every dropout mask shows in the weights.
KD = dict(max_steps=24, batch_size=4, lr=3e-3, warmup_ratio=0.1, lora_r=4, lora_alpha=8, lora_dropout=0.3,
          hidden_pairs="kept")


def _scramble_rng(k: int) -> None:
    """Leave the global RNGs as a different fresh process, or earlier work in this one, would."""
    torch.manual_seed(1000 + k)
    torch.rand(97 * k + 1)


def _pruned_student(teacher, processor, tmp_path):
    """A depth-pruned student (the teacher's layer 1 removed) and a folder as `harness prune` leaves it."""
    student = copy.deepcopy(teacher)
    layers = LMAdapter(student).layers
    del layers[1]
    for i, layer in enumerate(layers):
        layer.self_attn.layer_idx = i
    student.config.text_config.num_hidden_layers = len(layers)
    out = tmp_path / "student"
    student.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "pruning.json").write_text(json.dumps({"removed_layers": [1]}))
    return student, out


def _weights(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    diff = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"{len(diff)} tensors differ, max |diff| {max(diff.values()):.3g}: {sorted(diff)[:4]}"


def test_recover_twice_gives_bit_identical_weights(tiny_llava, tiny_world, tmp_path):
    """`recover` (LoRA + hidden KD, 20 steps of 3 records: over an epoch) run twice: the same weights, bit for bit."""
    teacher, processor = tiny_llava
    student, student_dir = _pruned_student(teacher, processor, tmp_path)
    settings = {**KD, "max_steps": 20, "batch_size": 3}
    outs = []
    for k in range(2):
        _scramble_rng(k)
        out = tmp_path / f"rec{k}"
        record = recover("teacher", student_dir, "sft+kd-hidden", tiny_world, 1.0, out, overrides=settings,
                         progress=False, teacher_model=teacher, student_model=copy.deepcopy(student))
        assert record["steps"] == 20 > record["num_samples"] / 3
        outs.append(_weights(out))
    _assert_identical(*outs)


def test_adapter_and_projection_init_do_not_depend_on_the_global_rng(tiny_llava):
    """LoRA adapters and the learned hidden-state projections (student narrower than the teacher) start seeded."""
    from transformers import LlavaForConditionalGeneration

    teacher, _ = tiny_llava
    config = copy.deepcopy(teacher.config)
    config.text_config.hidden_size //= 2
    config.text_config.intermediate_size //= 2
    torch.manual_seed(0)
    narrow = LlavaForConditionalGeneration(config)
    recipe = get_recipe("sft+kd-hidden", hidden_pairs="kept")
    inits = []
    for k in range(2):
        _scramble_rng(k)
        module = RecoveryModule(copy.deepcopy(narrow), recipe, teacher, [])
        inits.append({n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad})
        after = torch.rand(3)
    assert any("lora_A" in n for n in inits[0]) and any("hidden_proj" in n for n in inits[0])
    _assert_identical(*inits)
    _scramble_rng(1)
    assert torch.equal(after, torch.rand(3)), "initialising a module must not reset the caller's RNG stream"


def test_the_loader_starts_the_next_epoch_when_lightning_stops_at_its_length():
    """Lightning takes exactly len(loader) batches and never exhausts the iterator: the epoch must still advance."""
    from itertools import islice

    def loader(state=None):
        made = ResumableLoader(list(range(10)), 4, list, seed=3)  # 3 batches an epoch, the last one short
        if state:
            made.load_state_dict(state)
        return made

    def take(made, k):
        return list(islice(iter(made), k))

    one = loader()
    epochs = [take(one, 3) for _ in range(3)]
    assert one.state_dict() == {"epoch": 3, "consumed": 0}
    assert all(sorted(i for b in e for i in b) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2], "every epoch must have its own order"
    # Resumed after batch 1 of epoch 1: the rest of epoch 1, then all of epoch 2.
    resumed = loader({"epoch": 1, "consumed": 1})
    assert take(resumed, 2) == epochs[1][1:] and resumed.state_dict() == {"epoch": 2, "consumed": 0}
    assert take(resumed, 3) == epochs[2]
    # A state saved after an epoch's last batch by the old loader (consumed == its length) starts the next epoch.
    assert take(loader({"epoch": 1, "consumed": 3}), 3) == epochs[2]


def _fit(model, teacher, processor, world, recipe, **kw):
    dm = MixDataModule(world, processor, model.config, 1.0, recipe.batch_size, recipe.seed,
                       group_by_length=recipe.group_by_length)
    module = RecoveryModule(model, recipe, teacher, [])
    summary = train(module, dm, recipe, run_name="test", progress=False, **kw)
    return merge_lora(module.student).state_dict(), summary


# (settings, checkpoint every, kill at): the tiny world's 48 records are 12 batches of 4 an epoch.
RESUMES = {
    # killed after step 7 (resumes from step 4, mid epoch 0), then after step 13 (resumes from step 12, the
    # end of epoch 0): the same run killed twice, as in a grid that is killed and rerun
    "mid-and-end-of-epoch": (dict(), 4, (7, 13)),
    # 5 micro-batches a step: 3 steps an epoch, the last of 2 micro-batches; killed after step 5, resumed
    # from step 4, in the middle of epoch 1
    "accumulated-grouped": (dict(accumulate=5, group_by_length=True, max_steps=8), 2, (5,)),
}


@pytest.mark.parametrize("case", list(RESUMES))
def test_killed_and_resumed_recovery_equals_the_uninterrupted_run(case, tiny_llava, tiny_world, tmp_path):
    settings, every, kills = RESUMES[case]
    model, processor = tiny_llava
    teacher = copy.deepcopy(model)
    student = copy.deepcopy(model)
    with torch.no_grad():  # a student that differs from its teacher, so KD has something to do
        for p in LMAdapter(student).decoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    recipe = get_recipe("sft+kd-logit+hidden", **{**KD, "hidden_pairs": ((-1, -1),), **settings})

    _scramble_rng(0)
    straight, _ = _fit(copy.deepcopy(student), teacher, processor, tiny_world, recipe)
    ckpt = tmp_path / "ckpt"
    for k, step in enumerate(kills, 1):  # every rerun is a new process
        _scramble_rng(k)
        with pytest.raises(_Crash):
            _fit(copy.deepcopy(student), teacher, processor, tiny_world, recipe, ckpt_dir=ckpt, ckpt_every=every,
                 callbacks=[_CrashAt(step)])
    _scramble_rng(len(kills) + 1)
    resumed, summary = _fit(copy.deepcopy(student), teacher, processor, tiny_world, recipe, ckpt_dir=ckpt,
                            ckpt_every=every)
    assert summary["steps"] == recipe.max_steps
    _assert_identical(straight, resumed)
