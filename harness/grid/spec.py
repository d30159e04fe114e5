"""Experiment specs: a YAML file naming the axes of a grid, validated before anything runs.

    name: default
    data: artifacts/data/synth          # instruction mix dir (mix.json + images/) with benchmarks/
    teachers: [tiny-llava, tiny-bunny]
    tasks: [synth]                      # lmms-eval task or group names
    seeds: [0]
    prune:
      methods: [layer-bi, width-taylor]
      ratios: [0.15, 0.30, 0.45]
      settings: {}                      # passed to the pruner (calib_samples, per_layer_ratio, ...)
      method_settings: {width-taylor: {calib_samples: 10}}
    recover:
      recipes: [none, proj-sft, sft+kd-hidden]
      fractions: [0.05, 1.0]
      settings: {}                      # recipe overrides for every recipe
      recipe_settings: {proj-sft: {lr: 2e-3}}
    eval: {limit: null, batch_size: 64}
    excludes:                           # drop cells matching every key of an entry
      - {recovery: proj-sft, data_fraction: 1.0}
    only:                               # optional: keep only cells matching one entry
      - {teacher: tiny-llava}
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from harness.errors import HarnessError
from harness.io import load_yaml
from harness.paths import DEFAULT_DATA

TOP_KEYS = {"name", "description", "data", "teachers", "tasks", "seeds", "prune", "recover", "eval", "excludes",
            "only", "models"}
PRUNE_KEYS = {"methods", "ratios", "settings", "method_settings"}
RECOVER_KEYS = {"recipes", "fractions", "settings", "recipe_settings"}
CELL_FIELDS = ("teacher", "method", "ratio", "recovery", "data_fraction", "seed")


@dataclass(frozen=True)
class Cell:
    teacher: str
    method: str
    ratio: float
    recovery: str
    data_fraction: float
    seed: int

    @property
    def label(self) -> str:
        frac = "" if self.recovery == "none" else f"@{self.data_fraction:g}"
        return f"{self.teacher}/{self.method}@{self.ratio:g}/{self.recovery}{frac}/s{self.seed}"


@dataclass
class Spec:
    name: str
    path: Path
    data: str
    teachers: list[str]
    tasks: list[str]
    seeds: list[int]
    methods: list[str]
    ratios: list[float]
    prune_settings: dict
    method_settings: dict
    recipes: list[str]
    fractions: list[float]
    recover_settings: dict
    recipe_settings: dict
    eval_settings: dict
    excludes: list[dict]
    only: list[dict]
    models: dict

    def prune_overrides(self, method: str) -> dict:
        """The `prune.settings` a method's pruning stage receives (`method_settings` win)."""
        return {**self.prune_settings, **self.method_settings.get(method, {})}

    def prune_settings_for(self, method: str):
        """The checked `PruneSettings` of one method's pruning stages."""
        from harness.pruning.settings import PruneSettings
        from harness.settings import from_mapping

        return from_mapping(PruneSettings, self.prune_overrides(method), "prune settings").for_method(method)

    def cells(self) -> list[Cell]:
        cells: list[Cell] = []
        for teacher, method, ratio, recipe, seed in itertools.product(
            self.teachers, self.methods, self.ratios, self.recipes, self.seeds
        ):
            fractions = [0.0] if recipe == "none" else self.fractions
            for frac in fractions:
                cell = Cell(teacher, method, float(ratio), recipe, float(frac), int(seed))
                if any(_matches(cell, e) for e in self.excludes):
                    continue
                if self.only and not any(_matches(cell, o) for o in self.only):
                    continue
                cells.append(cell)
        if len(set(cells)) != len(cells):
            dup = next(c for c in cells if cells.count(c) > 1)
            raise HarnessError(f"{self.path}: duplicate cell {dup.label} (repeated axis values?)")
        if not cells:
            raise HarnessError(f"{self.path}: the spec selects no cells")
        return cells


def _matches(cell: Cell, pattern: dict) -> bool:
    values = asdict(cell)
    for key, want in pattern.items():
        have = values[key]
        if isinstance(have, float):
            if abs(have - float(want)) > 1e-9:
                return False
        elif have != want:
            return False
    return True


def _require_list(where: str, value, kind, allow_empty=False) -> list:
    if not isinstance(value, list) or (not value and not allow_empty):
        raise HarnessError(f"{where} must be a non-empty list")
    for v in value:
        if kind is float and isinstance(v, bool) or not isinstance(v, kind if kind is not float else (int, float)):
            raise HarnessError(f"{where} has {v!r}: expected {getattr(kind, '__name__', kind)}")
    if len(set(map(str, value))) != len(value):
        raise HarnessError(f"{where} repeats a value: {value}")
    return value


def _check_keys(where: str, got: dict, allowed: set) -> None:
    if not isinstance(got, dict):
        raise HarnessError(f"{where} must be a mapping")
    unknown = sorted(set(got) - allowed)
    if unknown:
        import difflib

        hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, allowed, 1)) else u
                 for u in unknown]
        raise HarnessError(f"{where}: unknown key(s) {', '.join(hints)}")


def load_spec(path: str | Path) -> Spec:
    """Parse and validate a spec; every problem is one HarnessError naming the key."""
    from harness.pruning.methods import get_method
    from harness.recovery.recipes import PRESETS

    path = Path(path)
    if not path.exists():
        raise HarnessError(f"spec file not found: {path}")
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise HarnessError(f"{path} does not parse as YAML: {str(e).splitlines()[0]}") from None
    _check_keys(str(path), raw, TOP_KEYS)
    for key in ("name", "teachers", "prune", "recover"):
        if key not in raw:
            raise HarnessError(f"{path}: missing required key {key!r}")
    prune, recover, ev = raw["prune"], raw["recover"], raw.get("eval") or {}
    _check_keys(f"{path}: prune", prune, PRUNE_KEYS)
    _check_keys(f"{path}: recover", recover, RECOVER_KEYS)
    if not isinstance(ev, dict):
        raise HarnessError(f"{path}: eval must be a mapping")
    if not isinstance(raw["name"], str) or not raw["name"].replace("-", "").replace("_", "").isalnum():
        raise HarnessError(f"{path}: name must be a plain identifier, got {raw['name']!r}")
    methods = _require_list(f"{path}: prune.methods", prune.get("methods"), str)
    for m in methods:
        try:
            get_method(m)
        except HarnessError as e:
            raise HarnessError(f"{path}: {e}") from None
    ratios = _require_list(f"{path}: prune.ratios", prune.get("ratios"), float)
    for r in ratios:
        if not 0 < r < 1:
            raise HarnessError(f"{path}: ratio {r} is outside (0, 1)")
    recipes = _require_list(f"{path}: recover.recipes", recover.get("recipes"), str)
    for r in recipes:
        if r != "none" and r not in PRESETS:
            raise HarnessError(f"{path}: unknown recovery {r!r}; known: none, {', '.join(PRESETS)}")
    fractions = _require_list(f"{path}: recover.fractions", recover.get("fractions", [1.0]), float)
    for f in fractions:
        if not 0 < f <= 1:
            raise HarnessError(f"{path}: data fraction {f} is outside (0, 1]")
    teachers = _require_list(f"{path}: teachers", raw["teachers"], str)
    tasks = raw.get("tasks", ["synth"])
    tasks = _require_list(f"{path}: tasks", [tasks] if isinstance(tasks, str) else tasks, str)
    seeds = _require_list(f"{path}: seeds", raw.get("seeds", [0]), int)
    for key in ("data", "description"):
        if key in raw and not isinstance(raw[key], str):
            raise HarnessError(f"{path}: {key} must be a string, got {raw[key]!r}")
    for where, value in (("prune.settings", prune.get("settings")), ("prune.method_settings", prune.get("method_settings")),
                         ("recover.settings", recover.get("settings")),
                         ("recover.recipe_settings", recover.get("recipe_settings")), ("models", raw.get("models"))):
        if value is not None and not isinstance(value, dict):
            raise HarnessError(f"{path}: {where} must be a mapping, got {value!r}")
        if where.endswith("_settings") and value:
            for name, inner in value.items():
                if not isinstance(inner, dict):
                    raise HarnessError(f"{path}: {where}.{name} must be a mapping, got {inner!r}")
    for where, d in (("excludes", raw.get("excludes") or []), ("only", raw.get("only") or [])):
        if not isinstance(d, list):
            raise HarnessError(f"{path}: {where} must be a list of mappings")
        for entry in d:
            _check_keys(f"{path}: {where} entry", entry, set(CELL_FIELDS))
    spec = Spec(
        name=raw["name"], path=path, data=str(raw.get("data", DEFAULT_DATA)), teachers=teachers,
        tasks=tasks, seeds=seeds, methods=methods, ratios=[float(r) for r in ratios],
        prune_settings=prune.get("settings") or {}, method_settings=prune.get("method_settings") or {},
        recipes=recipes, fractions=[float(f) for f in fractions], recover_settings=recover.get("settings") or {},
        recipe_settings=recover.get("recipe_settings") or {}, eval_settings=ev,
        excludes=raw.get("excludes") or [], only=raw.get("only") or [], models=raw.get("models") or {},
    )
    for name in spec.recipe_settings:
        if name not in recipes:
            raise HarnessError(f"{path}: recipe_settings names {name!r}, which is not in recover.recipes")
    for name in spec.method_settings:
        if name not in methods:
            raise HarnessError(f"{path}: method_settings names {name!r}, which is not in prune.methods")
    _check_prune_settings(spec)
    _check_recipe_overrides(spec)
    _check_eval(spec)
    spec.cells()  # duplicates / empty selection fail now, before anything runs
    return spec


def _check_prune_settings(spec: Spec) -> None:
    """Prune settings are `PruneSettings` fields of the right types; width settings only for width methods."""
    from harness.pruning.settings import PruneSettings
    from harness.settings import check_mapping

    check_mapping(PruneSettings, spec.prune_settings, f"{spec.path}: prune.settings")
    for method, settings in spec.method_settings.items():
        check_mapping(PruneSettings, settings, f"{spec.path}: prune.method_settings.{method}")
    for method in spec.methods:
        try:
            spec.prune_settings_for(method)
        except HarnessError as e:
            raise HarnessError(f"{spec.path}: prune settings for {method}: {e}") from None


def _check_eval(spec: Spec) -> None:
    """Evaluation settings and task names fail here, not in the first evaluation stage."""
    from harness.evaluation.evaluate import check_tasks, split_tasks
    from harness.evaluation.settings import EvalSettings
    from harness.settings import from_mapping

    try:
        from_mapping(EvalSettings, {k: v for k, v in spec.eval_settings.items() if v is not None}, "eval")
        check_tasks(split_tasks(spec.tasks))
    except HarnessError as e:
        raise HarnessError(f"{spec.path}: {e}") from None


def _check_recipe_overrides(spec: Spec) -> None:
    from harness.recovery.recipes import get_recipe

    for r in spec.recipes:
        if r != "none":
            try:
                get_recipe(r, **{**spec.recover_settings, **spec.recipe_settings.get(r, {})})
            except HarnessError as e:
                raise HarnessError(f"{spec.path}: {e}") from None
