"""`harness teacher train` / `harness teacher build`: the embedded teachers, trained like LLaVA.

Every teacher starts with stage 0, vision-tower pretraining (`vision_pretrain.py`: the stand-in
for CLIP or SigLIP pretraining, which cannot be downloaded here), then follows LLaVA's two
stages: `align` trains the projector alone on captions, then instruction tuning on the mix
(the vision tower stays frozen, as in LLaVA-1.5). How the language model is tuned depends on
where it starts (`PLANS`):

- the tiny teachers' language models start random and are *grown* (progressive stacking):
  `full` trains a shallow language model of `grow.layers` layers, which learns the world's
  questions several times faster per step and per second than the full depth does, `grow`
  repeats every layer to the spec's depth (`grow.repeat_layers`) and `deep` trains all of it;
- smol-llava's starts pretrained (SmolLM2-135M-Instruct): `instruct` tunes projector and
  LoRA adapters on it, as one tunes a real LLM on a small budget.

Stages after 0 run through the same Lightning module and Trainer as recovery. A teacher on a
pretrained language model is committed as its *parts* (vision tower, projector, LoRA
adapters: tens of MB instead of the merged checkpoint's hundreds): `harness teacher build`
assembles the checkpoint from the base model and the parts, byte for byte what training wrote.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from harness.data.datamodule import MixDataModule
from harness.errors import HarnessError
from harness.io import read_json, write_json
from harness.recovery.module import RecoveryModule, set_trainable
from harness.recovery.recipes import get_recipe
from harness.recovery.train import make_logger, save_model, train
from harness.settings import from_mapping, setting
from harness.synthetic.grow import REPEAT_MODES, repeat_layers
from harness.synthetic.models import EMBEDDED, build_embedded
from harness.synthetic.vision_pretrain import align_projector_to_words, pretrain_vision, standardize_projector_input

# Tuned on these 2 CPU cores (docs/teachers.md: teacher quality). `full` trains the shallow
# language model of `grow.layers` layers; `deep` trains it after growing to the spec's depth;
# `instruct` tunes LoRA adapters on a pretrained language model.
STAGES = {"vision": dict(steps=1000), "align": dict(max_steps=100), "full": dict(epochs=10.0),
          "grow": dict(layers=2, mode="split"), "deep": dict(epochs=6.0, lr=5e-4),
          "words": dict(steps=300), "instruct": dict(max_steps=3200), "polish": dict(max_steps=600, lr=2e-4)}
GROWN = ("vision", "align", "full", "grow", "deep")
# Each teacher's stages, in order.
PLANS = {"tiny-llava": GROWN, "tiny-bunny": GROWN, "smol-llava": ("vision", "words", "align", "instruct", "polish")}
# Per-teacher departures from STAGES, as `--set` pairs (docs/teachers.md: teacher quality). tiny-bunny's
# Phi language model was still improving at six epochs at full depth; smol-llava's 30-layer language
# model costs ~5 s a step of 16 records on 2 cores, so its alignment takes fewer, smaller steps.
TEACHER_SETTINGS = {"tiny-bunny": {"deep.epochs": 10.0},
                    "smol-llava": {"align.batch_size": 16, "align.max_steps": 30}}
# `polish` goes on training instruct's adapters on the same mix, from a lower learning rate down
# (a second cosine): instruct's answer loss was still falling at its end (docs/teachers.md).
RECIPES = {"align": "teacher-align", "full": "teacher-full", "deep": "teacher-full",
           "instruct": "teacher-lora", "polish": "teacher-lora"}  # any recipe field applies
PARTS = "parts"  # subfolder of a teacher on a pretrained LM: what is committed


@dataclass(frozen=True)
class VisionStage:
    """Stage 0, vision-tower pretraining (`pretrain_vision`); the defaults are that function's."""

    steps: int = setting(400, "optimizer steps", positive=True)
    batch_size: int = setting(128, "images per step", positive=True)
    lr: float = setting(2e-3, "learning rate")

    def validate(self) -> VisionStage:
        if self.lr <= 0:
            raise HarnessError(f"vision.lr must be positive, got {self.lr!r}")
        return self


@dataclass(frozen=True)
class GrowStage:
    """How the shallow language model of stage 2 is grown to the spec's depth (`grow.repeat_layers`)."""

    layers: int = setting(2, "decoder layers of the shallow model (must divide the spec's depth)", positive=True)
    mode: str = setting("split", f"how the copies start: {' or '.join(REPEAT_MODES)}")

    def validate(self) -> GrowStage:
        if self.mode not in REPEAT_MODES:
            raise HarnessError(f"grow.mode must be one of {', '.join(REPEAT_MODES)}, got {self.mode!r}")
        return self


@dataclass(frozen=True)
class WordsStage:
    """Projector onto the words of each cell (`align_projector_to_words`), for a pretrained LM; no LM pass."""

    steps: int = setting(300, "optimizer steps", positive=True)
    batch_size: int = setting(64, "images per step", positive=True)
    lr: float = setting(1e-3, "learning rate")

    def validate(self) -> WordsStage:
        if self.lr <= 0:
            raise HarnessError(f"words.lr must be positive, got {self.lr!r}")
        return self


# The stages that are not recipes; the others take any `Recipe` field.
OTHER_STAGES = {"vision": VisionStage, "grow": GrowStage, "words": WordsStage}


def plan_of(name: str) -> tuple[str, ...]:
    if name not in PLANS:
        raise HarnessError(f"unknown embedded model {name!r}; known: {', '.join(PLANS)}")
    return PLANS[name]


def stage_settings(overrides: dict | None = None, name: str = "tiny-llava") -> dict:
    """Teacher `name`'s stages from STAGES, then its TEACHER_SETTINGS, then `{"full.epochs": 6}`-style overrides, checked."""
    plan = plan_of(name)
    stages = {stage: dict(STAGES[stage]) for stage in plan}
    for key, value in {**TEACHER_SETTINGS.get(name, {}), **(overrides or {})}.items():
        stage, _, field = key.partition(".")
        if stage not in stages or not field:
            raise HarnessError(f"teacher setting {key!r} must be STAGE.FIELD with STAGE one of {name}'s stages: "
                               f"{', '.join(plan)}")
        stages[stage][field] = value
    for stage, settings in stages.items():
        if stage in OTHER_STAGES:
            from_mapping(OTHER_STAGES[stage], settings, f"teacher setting {stage}")
            continue
        try:  # unknown or mistyped recipe fields fail here, before any training
            get_recipe(RECIPES[stage], **settings)
        except HarnessError as e:
            raise HarnessError(f"teacher stage {stage}: {e}") from None
    return stages


def train_teacher(name: str, data: str | Path, out: str | Path, seed: int = 0, stages: dict | None = None,
                  progress: bool = True, continue_from: str | Path | None = None) -> dict:
    """Train teacher `name` on the world at `data` and save it to `out`.

    `continue_from` names a teacher on a pretrained LM trained with the first stages of this plan
    and these settings (a shorter plan, or an earlier version of it): its parts stand in for those
    stages and only the later ones run, to the weights a run of the whole plan writes.

    Training stages checkpoint into `.{out}.ckpt/<stage>/` (every 50 steps and at the stage's
    end), so an interrupted run started again with the same settings resumes where it stopped,
    to the same weights: stage 0 and the word alignment are recomputed (deterministic, minutes),
    finished stages are restored from their final checkpoint and the interrupted one resumes
    mid-way. The folder is removed once the teacher is saved."""
    plan = plan_of(name)
    stages = stages or stage_settings(name=name)
    run = {"model": name, "seed": seed, "settings": stages, "data": str(Path(data))}
    earlier, done = _earlier_run(name, seed, stages, continue_from) if continue_from is not None else (None, ())
    if earlier:
        run["continue_from"] = earlier["model_sha256"]
    ckpt_root = _checkpoint_root(Path(out), run)
    scale = None
    if "grow" in plan:
        depth = EMBEDDED[name].text.get("num_hidden_layers", 12)
        shallow = stages["grow"]["layers"]
        if depth % shallow:
            raise HarnessError(f"teacher setting grow.layers={shallow} must divide {name}'s {depth} decoder layers")
        scale = {"num_hidden_layers": shallow}
    model, processor = build_embedded(name, seed=seed, scale=scale)
    summary = {"model": name, "seed": seed, "settings": stages, "stages": {}}
    if EMBEDDED[name].base_lm:
        summary["text_perplexity"] = {"base": text_perplexity(model, processor.tokenizer)}
    t0 = time.perf_counter()
    lora = None
    if earlier:
        lora = get_recipe("lora-sft", **earlier["lora"]) if earlier.get("lora") else None
        model = _load_parts(name, model, Path(continue_from))
        summary["stages"] = {stage: earlier["stages"][stage] for stage in done if stage in earlier["stages"]}
        summary["continued_from"] = {"model_sha256": earlier["model_sha256"], "stages": list(done),
                                     "train_time_s": earlier.get("train_time_s")}
    else:
        summary["stages"]["vision"] = pretrain_vision(model, processor, seed=seed, progress=progress,
                                                      **stages["vision"])
        standardize_projector_input(model, processor, seed=seed)
    captions = Path(data) / "align.json"
    for stage in plan[1:]:
        if stage in done:
            continue
        if stage == "words":
            summary["stages"]["words"] = align_projector_to_words(model, processor, seed=seed, progress=progress,
                                                                  **stages["words"])
            continue
        if stage == "grow":
            if shallow == depth:
                break  # nothing to grow, and `deep` would repeat `full`
            model = repeat_layers(model, depth // shallow, stages["grow"].get("mode", "split"))
            continue
        recipe = get_recipe(RECIPES[stage], seed=seed, **stages[stage])
        source = captions if stage == "align" and captions.exists() else data
        dm = MixDataModule(source, processor, model.config, 1.0, recipe.batch_size, seed, recipe.max_length,
                           group_by_length=recipe.group_by_length)
        module = RecoveryModule(model, recipe)
        logger = make_logger(f"teacher-{name}-{stage}", {"recipe": recipe.__dict__, "model": name},
                             group="teachers", job_type="teacher")
        summary["stages"][stage] = train(module, dm, recipe, run_name=f"{name}-{stage}", logger=logger,
                                         progress=progress, ckpt_dir=ckpt_root / stage, save_final=True)
        logger.experiment.finish()
        model = module.student
        if recipe.language_model == "lora":
            lora = recipe
    summary["train_time_s"] = time.perf_counter() - t0
    if EMBEDDED[name].base_lm:
        summary["text_perplexity"]["teacher"] = text_perplexity(model, processor.tokenizer)
        summary["lora"] = {k: getattr(lora, k) for k in ("lora_r", "lora_alpha", "lora_dropout", "seed")} if lora else None
        _save_with_parts(model, processor, Path(out), summary)
    else:
        save_model(model, processor, Path(out), {"teacher.json": summary})
    shutil.rmtree(ckpt_root, ignore_errors=True)
    return summary


def _earlier_run(name: str, seed: int, stages: dict, path: str | Path) -> tuple[dict, tuple[str, ...]]:
    """The record of the teacher at `path` and the stages it stands in for: the first stages of this
    run's plan, trained with the same settings (checked)."""
    record_file = Path(path) / PARTS / "teacher.json"
    if not record_file.exists():
        raise HarnessError(f"cannot continue from {path}: no {PARTS}/teacher.json there (only a teacher on a "
                           "pretrained language model, saved with its parts, can be continued)")
    record = read_json(record_file)
    plan = plan_of(name)
    done = plan[:len(record["settings"])]
    if record["model"] != name or record["seed"] != seed:
        raise HarnessError(f"cannot continue from {path}: it is {record['model']} seed {record['seed']}, "
                           f"this run is {name} seed {seed}")
    if set(done) != set(record["settings"]) or len(done) >= len(plan):  # the record's keys are sorted
        raise HarnessError(f"cannot continue from {path}: its stages {', '.join(record['settings'])} are not the first stages "
                           f"of {name}'s {', '.join(plan)} with at least one left to run")
    differ = [stage for stage in done if record["settings"][stage] != json.loads(json.dumps(stages[stage]))]
    if differ:
        raise HarnessError(f"cannot continue from {path}: it was trained with other {', '.join(differ)} settings "
                           f"({record['settings'][differ[0]]} against {stages[differ[0]]})")
    return record, done


def _load_parts(name: str, model, path: Path):
    """`model` (freshly built) with the parts at `path` loaded: vision tower, projector, LoRA adapters."""
    from safetensors.torch import load_file

    parts_file = path / PARTS / "parts.safetensors"
    record = read_json(path / PARTS / "teacher.json")
    parts = load_file(str(parts_file))
    if record.get("lora"):
        set_trainable(model, get_recipe("lora-sft", **record["lora"]))
    unexpected = model.load_state_dict(parts, strict=False).unexpected_keys
    if unexpected or len(parts) == 0:
        raise HarnessError(f"{parts_file} does not fit {name} (unexpected: {unexpected[:3]})")
    return model


def _checkpoint_root(out: Path, run: dict) -> Path:
    """`.{out}.ckpt` beside `out`, made for this run; one left by a run with other settings is an error."""
    root = out.parent / f".{out.name}.ckpt"
    record = root / "run.json"
    if record.exists() and read_json(record) != json.loads(json.dumps(run)):
        raise HarnessError(f"{root} holds checkpoints of a teacher run with other settings; remove it to start over")
    root.mkdir(parents=True, exist_ok=True)
    write_json(record, run)
    return root


HELDOUT_TEXT = Path(__file__).parent / "text" / "heldout.txt"


def text_perplexity(model, tokenizer, text: str | None = None) -> float:
    """Perplexity of the language model alone on plain English (`text/heldout.txt`, no image, no chat turns).

    For a teacher on a pretrained LM: compared with the base model's, it shows whether instruction
    tuning on the synthetic world left a language model or a world-specific parser."""
    import torch

    from harness.models.adapter import LMAdapter

    adapter = LMAdapter(model)
    ids = tokenizer(text if text is not None else HELDOUT_TEXT.read_text(), return_tensors="pt")["input_ids"]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        hidden = adapter.decoder(input_ids=ids).last_hidden_state
        logits = adapter.lm_head(hidden[:, :-1]).float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    model.train(was_training)
    return float(torch.exp(loss))


def _parts_of(model) -> dict:
    """What training changed in a teacher on a pretrained LM: vision tower, projector, LoRA adapters."""
    from harness.models.adapter import LMAdapter

    adapter = LMAdapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    owned = tuple(names[id(m)] + "." for m in (adapter.vision_tower, adapter.projector))
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
            if k.startswith(owned) or ".lora_" in k}


def _save_with_parts(model, processor, out: Path, record: dict, evaluation: dict | None = None) -> None:
    """The merged checkpoint, and under parts/ what it is assembled from (the committed part), at once.

    The record carries the merged weights' sha256, which `build_teacher` checks its assembly against.
    """
    from safetensors.torch import save_file

    parts = _parts_of(model)
    parts_record = dict(record)

    def write_parts(tmp: Path) -> None:
        digest = hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest()
        if parts_record.setdefault("model_sha256", digest) != digest:
            raise HarnessError(f"assembled {record['model']} differs from the trained one (model.safetensors sha256 "
                               f"{digest[:12]}, trained {parts_record['model_sha256'][:12]}): the base model or "
                               "torch's arithmetic is not the one it was trained with")
        (tmp / PARTS).mkdir()
        save_file(parts, str(tmp / PARTS / "parts.safetensors"))
        write_json(tmp / PARTS / "teacher.json", parts_record)
        write_json(tmp / "teacher.json", parts_record)
        if evaluation is not None:
            write_json(tmp / PARTS / "eval.json", evaluation)
            write_json(tmp / "eval.json", evaluation)

    save_model(model, processor, out, after=write_parts)


def build_teacher(name: str, out: str | Path, force: bool = False) -> str:
    """Make teacher `name` present at `out` if it can be without training: as it is, or assembled from its parts.

    Returns "present", "assembled", or "missing" (neither checkpoint nor parts: it must be trained).
    """
    plan_of(name)
    out = Path(out)
    if (out / "config.json").exists() and (out / "model.safetensors").exists() and not force:
        return "present"
    parts_dir = out / PARTS
    if not (parts_dir / "parts.safetensors").exists():
        return "missing"
    record = read_json(parts_dir / "teacher.json")
    model, processor = build_embedded(name, seed=record["seed"])
    model = _load_parts(name, model, out)
    eval_file = parts_dir / "eval.json"
    _save_with_parts(model, processor, out, record, read_json(eval_file) if eval_file.exists() else None)
    return "assembled"
