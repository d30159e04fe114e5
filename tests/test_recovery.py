"""Recovery: recipes train exactly their parts, losses are right, LoRA merges, runs resume exactly."""

from __future__ import annotations

import copy
import json

import pytest
import pytorch_lightning as pl
import torch

from harness.data.datamodule import MixDataModule
from harness.errors import HarnessError
from harness.models import LMAdapter
from harness.recovery.module import RecoveryModule, kl_loss, merge_lora, resolve_hidden_pairs, set_trainable
from harness.recovery.recipes import PRESETS, get_recipe
from harness.recovery.train import recover, train

PAPER_PRESETS = ["proj-sft", "lora-sft", "full-sft", "kd-logit", "kd-hidden", "sft+kd-logit", "sft+kd-hidden",
                 "sft+kd-logit+hidden"]


def _fit(model, processor, world, recipe, teacher=None, removed=None, val=False, **kw):
    dm = MixDataModule(world, processor, model.config, 1.0, recipe.batch_size, recipe.seed,
                       val_path=world / "val.json" if val else None)
    module = RecoveryModule(model, recipe, teacher, removed)
    summary = train(module, dm, recipe, run_name="test", progress=False, **kw)
    return module, summary


def _perturbed_student(teacher):
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in LMAdapter(student).decoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return student


def _component(name: str) -> str:
    if "vision_tower" in name:
        return "vision"
    if "multi_modal_projector" in name:
        return "projector"
    return "language_model"


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_preset_changes_exactly_its_parameters(preset, tiny_llava, tiny_world):
    teacher, processor = tiny_llava
    student = _perturbed_student(teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    recipe = get_recipe(preset, max_steps=2, batch_size=4, lr=1e-2)
    module, _ = _fit(student, processor, tiny_world, recipe, teacher if recipe.needs_teacher else None)
    after = merge_lora(module.student).state_dict()
    assert set(after) == set(before), "LoRA merge must leave the original parameter names"
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expect_lm = recipe.language_model != "frozen"
    for name in before:
        part = _component(name)
        trained = {"vision": False, "projector": True, "language_model": expect_lm}[part]
        if recipe.language_model == "lora" and part == "language_model":
            trained = name.endswith(".weight") and any(f".{n}." in name for n in LMAdapter(student).linear_names)
            trained = trained and ".layers." in name
        if trained:
            assert name in changed, f"{preset}: {name} should have trained"
        else:
            assert name not in changed, f"{preset}: {name} must stay bit-identical"


def test_kl_is_zero_for_identical_models_and_matches_torch(tiny_llava, tiny_world):
    model, processor = tiny_llava
    teacher = copy.deepcopy(model)
    dm = MixDataModule(tiny_world, processor, model.config, 1.0, 4, 0)
    batch = next(iter(dm.train_dataloader()))
    module = RecoveryModule(model, get_recipe("sft+kd-logit+hidden"), teacher)
    losses = module.compute_losses(batch)
    assert losses["kl"].abs().item() < 1e-6 and losses["hidden"].abs().item() < 1e-10

    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.ones(2, 5)
    T = 2.0
    expected = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1),
                                          log_target=True, reduction="sum") / 10 * T**2
    assert torch.allclose(kl_loss(s, t, mask, T, "forward", "token_mean"), expected, atol=1e-6)
    reverse = torch.nn.functional.kl_div(torch.log_softmax(t / T, -1), torch.log_softmax(s / T, -1),
                                         log_target=True, reduction="sum") / 2 * T**2
    assert torch.allclose(kl_loss(s, t, mask, T, "reverse", "batch_sum"), reverse, atol=1e-6)


def test_hidden_pairs_for_a_depth_pruned_student(tiny_world):
    from harness.synthetic.models import build_embedded

    assert resolve_hidden_pairs("kept", [1], 4) == [(1, 1), (2, 3), (3, 4), (-1, -1)]
    teacher, processor = build_embedded("tiny-llava", scale={"num_hidden_layers": 4})
    student = copy.deepcopy(teacher)
    layers = LMAdapter(student).layers
    del layers[1]
    for i, layer in enumerate(layers):
        layer.self_attn.layer_idx = i
    student.config.text_config.num_hidden_layers = 3
    recipe = get_recipe("sft+kd-hidden", hidden_pairs="kept", max_steps=1, batch_size=4)
    dm = MixDataModule(tiny_world, processor, student.config, 1.0, 4, 0)
    module = RecoveryModule(student, recipe, teacher, removed_layers=[1])
    assert module.pairs == [(1, 1), (2, 3), (3, 4), (-1, -1)]
    losses = module.compute_losses(next(iter(dm.train_dataloader())))
    # Layer 0 is shared, so its pair matches exactly; the others differ after the removed layer.
    assert torch.isfinite(losses["hidden"]) and losses["hidden"] > 0


def test_merged_lora_equals_unmerged(tiny_llava, tiny_world):
    model, processor = tiny_llava
    set_trainable(model, get_recipe("lora-sft"))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    model.eval()
    dm = MixDataModule(tiny_world, processor, model.config, 1.0, 4, 0)
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        unmerged = model(**batch).logits
        merged = merge_lora(model)(**batch).logits
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert torch.allclose(unmerged, merged, atol=1e-5)


class _Crash(Exception):
    pass


class _CrashAt(pl.Callback):
    """Kills the run at the end of optimizer step `step`, before that step's checkpoint (the last is older)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise _Crash()


def test_resume_after_interruption_is_exact(tiny_llava, tiny_world, tmp_path):
    """A run killed at step 3 and resumed ends with the uninterrupted run's weights, validation passes included."""
    model, processor = tiny_llava
    recipe = get_recipe("full-sft", max_steps=6, batch_size=4, lr=3e-3, seed=5, val_checks=3)
    straight, _ = _fit(copy.deepcopy(model), processor, tiny_world, recipe)

    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Crash):
        _fit(copy.deepcopy(model), processor, tiny_world, recipe, val=True, ckpt_dir=ckpt, ckpt_every=1,
             callbacks=[_CrashAt(3)])
    assert (ckpt / "last.ckpt").exists()
    resumed, summary = _fit(copy.deepcopy(model), processor, tiny_world, recipe, val=True, ckpt_dir=ckpt, ckpt_every=1)
    assert summary["steps"] == 6 and set(summary["val_losses"]) == {"val/ce", "val/loss"}
    for (name, a), b in zip(straight.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(a, b), name


def test_validation_curves_leave_training_unchanged(saved_tiny_llava, tiny_world):
    """Validation passes (eval mode, no gradient) change no trained weight, and training stays in train mode."""
    from harness.models import load

    class Count(pl.Callback):
        checks, modes = [], []

        def on_validation_end(self, trainer, module):
            self.checks.append(trainer.global_step)

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.modes.append(module.student.training)

    teacher = load(saved_tiny_llava, processor=False)
    runs = []
    for val in (False, True):  # sft+kd-hidden: LoRA dropout draws random numbers, a teacher runs in validation
        student, processor = load(saved_tiny_llava)
        recipe = get_recipe("sft+kd-hidden", max_steps=6, batch_size=4, lr=3e-3, val_checks=3)
        runs.append(_fit(student, processor, tiny_world, recipe, teacher, val=val, callbacks=[Count()]))
    assert Count.checks == [2, 4, 6] and all(Count.modes) and len(Count.modes) == 12
    (plain, s0), (validated, s1) = runs
    assert "val_losses" not in s0 and set(s1["val_losses"]) == {"val/ce", "val/hidden", "val/loss"}
    for (name, a), b in zip(plain.student.state_dict().items(), validated.student.state_dict().values()):
        assert torch.equal(a, b), name


def test_short_training_lowers_the_loss(tiny_llava, tiny_world):
    model, processor = tiny_llava
    dm = MixDataModule(tiny_world, processor, model.config, 1.0, 16, 0)
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        before = model(**batch).loss.item()
    recipe = get_recipe("teacher-full", max_steps=12, batch_size=16, lr=3e-3, warmup_ratio=0.0)
    module, _ = _fit(model, processor, tiny_world, recipe)
    with torch.no_grad():
        after = module.student.eval()(**batch).loss.item()
    assert after < before - 0.5, (before, after)


def test_recipe_validation():
    with pytest.raises(HarnessError, match="unknown recipe 'lora-stf'.*lora-sft"):
        get_recipe("lora-stf")
    with pytest.raises(HarnessError, match="unknown recipe setting"):
        get_recipe("proj-sft", learning_rate=1)
    with pytest.raises(HarnessError, match="LoRA is supported for the language model only"):
        get_recipe("proj-sft", projector="lora")
    with pytest.raises(HarnessError, match="nothing is trainable"):
        get_recipe("proj-sft", projector="frozen")
    assert set(PAPER_PRESETS) <= set(PRESETS)


def test_recover_bad_inputs(saved_tiny_llava, tiny_world, tmp_path):
    with pytest.raises(HarnessError, match="fraction"):
        recover("x", saved_tiny_llava, "proj-sft", tiny_world, 0.0, tmp_path / "a")
    with pytest.raises(HarnessError, match="unknown recipe"):
        recover("x", saved_tiny_llava, "nope", tiny_world, 0.5, tmp_path / "b")
    with pytest.raises(HarnessError, match="no pruning.json"):
        recover(str(saved_tiny_llava), saved_tiny_llava, "kd-hidden", tiny_world, 0.5, tmp_path / "c")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_logit_loss_needs_the_same_vocabulary(saved_tiny_llava, tiny_world, tmp_path):
    import shutil

    from harness.synthetic.models import build_embedded

    student = tmp_path / "student"
    shutil.copytree(saved_tiny_llava, student)
    (student / "pruning.json").write_text(json.dumps({"removed_layers": []}))
    other, proc = build_embedded("tiny-llava", scale={"num_hidden_layers": 2, "vocab_size": 300})
    other.save_pretrained(tmp_path / "teacher")
    proc.save_pretrained(tmp_path / "teacher")
    with pytest.raises(HarnessError, match="vocabularies differ"):
        recover(str(tmp_path / "teacher"), student, "kd-logit", tiny_world, 0.5, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_recover_end_to_end_writes_an_hf_student(saved_tiny_llava, tiny_world, tmp_path):
    from transformers import LlavaForConditionalGeneration

    out = tmp_path / "rec"
    record = recover(str(saved_tiny_llava), saved_tiny_llava, "lora-sft", tiny_world, 0.5, out,
                     overrides={"max_steps": 2, "batch_size": 4}, progress=False)
    assert record["num_samples"] == 24 and record["steps"] == 2
    assert record["val_losses"]["val/ce"] > 0  # the world's val.json is found beside its mix
    saved = json.loads((out / "recovery.json").read_text())
    assert saved["recipe"] == "lora-sft" and saved["data_fraction"] == 0.5
    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_student_trains_in_train_mode_and_teacher_stays_in_eval(saved_tiny_llava, tiny_world):
    from harness.models import load

    student, processor = load(saved_tiny_llava)  # loaded checkpoints come in eval mode
    teacher = load(saved_tiny_llava, processor=False)
    seen = {}

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen["student"], seen["teacher"] = module.student.training, module.teacher.training

    recipe = get_recipe("sft+kd-hidden", max_steps=1, batch_size=4)
    _fit(student, processor, tiny_world, recipe, teacher, callbacks=[Probe()])
    assert seen == {"student": True, "teacher": False}


# --- training as the paper trains (issue #20: fp32 masters, KD positions, answer-only logits) ----------


def test_answer_only_logits_give_the_full_logit_losses(tiny_llava, tiny_world):
    """The LM head runs only where a loss reads it; CE and KL equal those of full logits at the same positions."""
    model, processor = tiny_llava
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    dm = MixDataModule(tiny_world, processor, model.config, 1.0, 4, 0)
    batch = next(iter(dm.train_dataloader()))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        full_s, full_t = model(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1]
        hf_loss = model(**batch).loss
    answer = (batch["labels"][:, 1:] != -100).float()
    valid = batch["attention_mask"][:, :-1].float()
    for positions, mask in (("answer", answer), ("all", valid)):
        module = RecoveryModule(model, get_recipe("sft+kd-logit", kd_positions=positions,
                                                  language_model="frozen"), teacher)
        with torch.no_grad():
            losses = module.compute_losses(batch)
        assert torch.allclose(losses["ce"], hf_loss, atol=1e-5)
        expected = kl_loss(full_s, full_t, mask, 2.0, "forward", "token_mean")
        assert torch.allclose(losses["kl"], expected, atol=1e-5), positions
    assert valid.sum() > answer.sum()  # "all" really reads more positions
    batch_sum = RecoveryModule(model, get_recipe("kd-logit", kd_positions="all", kl_reduction="batch_sum",
                                                 language_model="frozen", projector="full"), teacher)
    with torch.no_grad():
        got = batch_sum.compute_losses(batch)["kl"]
    assert torch.allclose(got, kl_loss(full_s, full_t, valid, 2.0, "forward", "batch_sum"), atol=1e-4)


def test_mixed_precision_keeps_fp32_masters_of_what_trains(tiny_llava, tiny_world, monkeypatch):
    """`auto` is bf16 mixed precision on GPUs; trainable weights are fp32 masters, frozen ones stay bf16."""
    assert get_recipe("lora-sft").resolved_precision == "32-true"  # this CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_recipe("lora-sft").resolved_precision == "bf16-mixed"
    monkeypatch.undo()
    model, processor = tiny_llava
    model = model.to(torch.bfloat16)
    module = RecoveryModule(model, get_recipe("lora-sft", precision="bf16-mixed"))
    trainable = {n: p for n, p in module.student.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in module.student.named_parameters() if not p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert all(p.dtype == torch.bfloat16 for p in frozen.values())
    # small steps survive in fp32 masters; in bf16 weights most of them round away
    dm = MixDataModule(tiny_world, processor, module.student.config, 1.0, 4, 0)
    batch = next(iter(dm.train_dataloader()))
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    changed = {}
    for precision in ("bf16-mixed", "bf16-true"):
        student = copy.deepcopy(tiny_llava[0]).to(torch.bfloat16)
        m = RecoveryModule(student, get_recipe("proj-sft", precision=precision, lr=2e-5))
        params = [p for p in m.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=2e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m.compute_losses(batch)["loss"]
        loss.backward()
        opt.step()
        changed[precision] = sum(int((p.detach() != b).sum()) for p, b in zip(params, before)) / sum(
            p.numel() for p in params)
    assert changed["bf16-mixed"] > 0.9 and changed["bf16-true"] < changed["bf16-mixed"] / 2, changed
