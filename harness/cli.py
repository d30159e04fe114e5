"""`harness` command line: each subcommand maps to one plain function.

Every user-facing failure is a `HarnessError`; it is printed as one line on stderr
and the process exits with status 2, having written nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from harness.errors import HarnessError
from harness.paths import DEFAULT_DATA
from harness.settings import parse_overrides


def _offline_defaults() -> None:
    """No hub is reachable on the machines this runs on by default; never try."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_progress_bars()


def _quiet_progress_bars() -> None:
    """Library progress bars ("Loading weights", "Generating train split") go to stderr, which holds errors only.

    Set HF_HUB_DISABLE_PROGRESS_BARS=0 / HF_DATASETS_DISABLE_PROGRESS_BARS=0 to see them again.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and "transformers" in sys.modules:  # imported already
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1" and "datasets" in sys.modules:
        from datasets.utils import disable_progress_bars

        disable_progress_bars()


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line too (`error: ...`, exit status 2); `--help` still prints the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _parse_weights(text: str) -> dict[str, int]:
    """`sqa=4,pope=1` -> {"sqa": 4, "pope": 1}."""
    weights = {}
    for item in text.split(","):
        family, _, value = item.partition("=")
        try:
            weights[family.strip()] = int(value)
        except ValueError:
            raise HarnessError(f"--family-weights: {item!r} must be FAMILY=INT, e.g. sqa=4") from None
    return weights


def cmd_data_make(args) -> None:
    from harness.synthetic.make import WorldSpec, make_world

    given = {"mix_size": args.mix_size, "benchmark_size": args.benchmark_size, "val_size": args.val_size,
             "records_per_image": args.records_per_image}
    if args.family_weights:
        given["family_weights"] = {**WorldSpec().family_weights, **_parse_weights(args.family_weights)}
    spec = WorldSpec(seed=args.seed, **{k: v for k, v in given.items() if v is not None})
    out = make_world(args.out, spec, overwrite=args.overwrite)
    n_images = -(-spec.mix_size // spec.records_per_image)
    print(f"world written to {out} ({spec.mix_size} training records on {n_images} images, "
          f"{spec.val_size} validation records, {spec.benchmark_size} items per benchmark)")


def cmd_teacher_build(args) -> None:
    from harness.paths import TEACHERS_DIR
    from harness.synthetic.teachers import PLANS, build_teacher, plan_of

    names = list(args.names)
    if args.experiment:  # the embedded teachers a grid spec names (others are checkpoints or hub ids)
        from harness.grid.spec import load_spec

        names += [t for t in load_spec(args.experiment).teachers if t in PLANS and t not in names]
    if not names:
        raise HarnessError("name at least one teacher, or --experiment SPEC")
    for name in names:
        plan_of(name)  # every name is checked before anything is built
    for name in names:
        t0 = time.perf_counter()
        done = build_teacher(name, TEACHERS_DIR / name, force=args.force)
        if done == "missing":
            print(f"teacher {name}: neither committed nor in parts; training it (`harness teacher train {name}`)")
            cmd_teacher_train(argparse.Namespace(name=name, data=args.data, out=None, seed=0, overwrite=False,
                                                 skip_eval=False, set=None, continue_from=None))
            continue
        print(f"teacher {name}: {done}" + (f" in {time.perf_counter() - t0:.0f} s" if done != "present" else ""))


def cmd_teacher_train(args) -> None:
    from harness.paths import TEACHERS_DIR
    from harness.synthetic.teachers import stage_settings, train_teacher

    out = Path(args.out) if args.out else TEACHERS_DIR / args.name
    if out.exists() and not args.overwrite:
        raise HarnessError(f"{out} exists; pass --overwrite to retrain")
    stages = stage_settings(parse_overrides(args.set), args.name)
    summary = train_teacher(args.name, args.data, out, seed=args.seed, stages=stages,
                            continue_from=args.continue_from)
    print(f"teacher {args.name} written to {out} in {summary['train_time_s']:.0f} s")
    if not args.skip_eval:
        from harness.evaluation.evaluate import evaluate

        result = evaluate(str(out), "synth", out / "eval.json", data_dir=Path(args.data) / "benchmarks")
        if (out / "parts").is_dir():  # a teacher committed as parts keeps its evaluation beside them
            (out / "parts" / "eval.json").write_text((out / "eval.json").read_text())
        print(json.dumps(result["scores"], indent=1))


def cmd_recover(args) -> None:
    from harness.recovery.train import recover

    record = recover(args.teacher, args.student, args.recipe, args.data, args.data_fraction, args.out,
                     overrides=parse_overrides(args.set))
    print(f"recovered student written to {args.out}: {record['steps']} steps, "
          f"{record['num_samples']} samples, {record['wall_time_s']:.0f} s")


def cmd_grid(args) -> None:
    """`harness grid ...`; after `run`, the report (tables, figures, findings) of what finished and,
    unless WANDB_MODE=disabled, the experiment's W&B analysis run (replacing an earlier one)."""
    from harness.grid import commands, runner

    try:
        results = commands.run_command(args)
    except runner.GridFailed as failed:
        _report_after_grid(args, failed.results)
        raise SystemExit(1) from None
    _report_after_grid(args, results)


def _report_after_grid(args, results) -> None:
    if results is not None and args.action == "run" and not args.no_figures:
        from analysis.report import analysis_run_id, log_to_wandb, write_report
        from harness.tracking import wandb_mode

        print(f"report written to {write_report(results)}")
        if wandb_mode() != "disabled":
            log_to_wandb(results)
            print(f"W&B analysis run {analysis_run_id(results.name)} logged (job type analysis)")


def cmd_convert_bunny(args) -> None:
    from harness.convert.bunny import convert_bunny

    dst = convert_bunny(args.src, args.dst)
    print(f"converted Bunny checkpoint written to {dst}")


def cmd_report(args) -> None:
    from analysis import AnalysisError, load_results
    from analysis.__main__ import default_dirs
    from analysis.__main__ import main as report_main

    try:  # the same checks analysis makes, so bad input reads like every other `error: ...`
        for folder in [Path(e) for e in args.experiments] or default_dirs():
            load_results(folder)
    except AnalysisError as e:
        raise HarnessError(str(e)) from None
    code = report_main([*args.experiments] + (["--wandb"] if args.wandb else []))
    if code:
        raise SystemExit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="harness", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="the synthetic multimodal world").add_subparsers(dest="action", required=True)
    make = data.add_parser("make", help="generate the training mix and benchmark splits")
    make.add_argument("--out", default=DEFAULT_DATA)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--mix-size", type=int, help="training records (default 40000)")
    make.add_argument("--records-per-image", type=int, help="consecutive records sharing one image (default 2)")
    make.add_argument("--val-size", type=int, help="held-out validation records (default 256)")
    make.add_argument("--benchmark-size", type=int, help="items per benchmark (default 400)")
    make.add_argument("--family-weights", help="question families' relative shares in the mix, e.g. sqa=4,pope=1; "
                      "families not named keep their default (harness.synthetic.world.FAMILY_WEIGHTS)")
    make.add_argument("--overwrite", action="store_true")
    make.set_defaults(func=cmd_data_make)

    teacher = sub.add_parser("teacher", help="embedded teachers").add_subparsers(dest="action", required=True)
    tt = teacher.add_parser("train", help="train an embedded teacher (two LLaVA stages)")
    tt.add_argument("name")
    tt.add_argument("--data", default=DEFAULT_DATA)
    tt.add_argument("--out", default=None, help="default: artifacts/teachers/NAME")
    tt.add_argument("--seed", type=int, default=0)
    tt.add_argument("--overwrite", action="store_true")
    tt.add_argument("--skip-eval", action="store_true")
    tt.add_argument("--continue-from", metavar="DIR",
                    help="a teacher trained with this plan's first stages: only the later stages run")
    tt.add_argument("--set", action="append", metavar="STAGE.KEY=VALUE",
                    help="override a stage setting: vision.steps=1000, full.epochs=6, full.lr=5e-4, align.max_steps=200")
    tt.set_defaults(func=cmd_teacher_train)
    tb = teacher.add_parser("build", help="make teachers present: committed ones as they are, teachers on a "
                                          "pretrained LM assembled from their committed parts (byte-exact), "
                                          "missing ones trained")
    tb.add_argument("names", nargs="*", metavar="NAME")
    tb.add_argument("--experiment", metavar="SPEC", help="also every embedded teacher this grid spec names")
    tb.add_argument("--force", action="store_true", help="assemble again even if present")
    tb.add_argument("--data", default=DEFAULT_DATA, help="the world to train a missing teacher on")
    tb.set_defaults(func=cmd_teacher_build)

    from harness.pruning.pipeline import add_prune_parser

    add_prune_parser(sub)

    rec = sub.add_parser("recover", help="recovery training of a pruned student")
    rec.add_argument("--teacher", required=True)
    rec.add_argument("--student", required=True)
    rec.add_argument("--recipe", required=True)
    rec.add_argument("--data-fraction", type=float, default=1.0)
    rec.add_argument("--data", default=DEFAULT_DATA)
    rec.add_argument("--out", required=True)
    rec.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe setting")
    rec.set_defaults(func=cmd_recover)

    from harness.evaluation.evaluate import add_eval_parser

    add_eval_parser(sub)

    grid = sub.add_parser("grid", help="experiment grids").add_subparsers(dest="action", required=True)
    for action, help_ in (("plan", "print the cells and what is done"), ("run", "run what is missing"),
                          ("status", "summarise progress")):
        g = grid.add_parser(action, help=help_)
        g.add_argument("spec")
        if action == "plan":
            g.add_argument("--dry-run", action="store_true", help="build real configs on the meta device")
        if action == "run":
            g.add_argument("--backend", choices=["local", "slurm", "submitit-local"], default="local")
            g.add_argument("--retry-failed", action="store_true")
            g.add_argument("--no-figures", action="store_true")
            g.add_argument("--slurm", action="append", metavar="KEY=VALUE",
                           help="a submitit executor parameter for --backend slurm|submitit-local, e.g. "
                                "slurm_partition=gpu, timeout_min=1440, gpus_per_node=1 (GPUs per task)")
        g.set_defaults(func=cmd_grid)

    conv = sub.add_parser("convert", help="convert checkpoints").add_subparsers(dest="action", required=True)
    cb = conv.add_parser("bunny", help="Bunny-v1.0 (remote code) -> native LlavaForConditionalGeneration")
    cb.add_argument("src")
    cb.add_argument("dst")
    cb.set_defaults(func=cmd_convert_bunny)

    rep = sub.add_parser("report", help="tables, figures and findings from results/")
    rep.add_argument("experiments", nargs="*")
    rep.add_argument("--wandb", action="store_true")
    rep.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    _offline_defaults()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # usage errors (one line, status 2) and --help (status 0)
        return e.code if isinstance(e.code, int) else 2
    try:
        args.func(args)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
