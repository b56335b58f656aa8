"""The study spec: a TOML file naming sources, targets, modes, grids and seeds, checked field by field.

A spec looks like this (every table but ``[[sources]]`` is optional)::

    name = "robust-vs-standard"
    out_dir = "runs/robust-vs-standard"   # run folders, shared features and study.sqlite
    targets = ["animal-mnist", "mnist-5k"]  # or [[targets]] tables: dataset, data_root, label
    modes = ["fixed", "full"]              # fixed, full, partial:K; detection, instance-segmentation
    seeds = [0, 1]

    [threat]            # robust accuracy of each source, and after transfer
    norm = "l2"
    eps = 1.0
    steps = 20
    examples = 500

    resolution = 14     # also transfer every classification target at 14 px (down and back up)

    [[sources]]         # one of: zoo = NAME, file = PATH, or a [sources.pretrain] recipe
    label = "fmnist"
    eps = [0, 0.5, 1]   # pretraining sources: one model per eps (method pgd; eps 0 = standard)
    [sources.pretrain]  # any `robust-transfer pretrain` setting
    dataset = "fashion-mnist"
    arch = "small_resnet"

    [[sources]]         # Gaussian-noise augmentation, the paper's other notion of robustness
    label = "noise"
    sigma = [0.1, 0.25] # one model per noise std, in [0, 1] pixel units
    [sources.pretrain]
    method = "noise"

    [pictures]          # perceptual-alignment grids in the report, one row per source
    kinds = ["inversion"]   # inversion, synthesis, saliency
    images = 8

    [transfer]          # any `robust-transfer transfer` setting, for every run
    epochs = 5
    [transfer.full]     # settings for one mode only
    lrs = [0.01]

    [grid]              # every combination of these lists is its own run
    batch_size = [32, 64]

Dense tasks: the modes ``detection`` and ``instance-segmentation`` run on detection targets, the embedded
``"scenes"`` or a table ``{dataset = "coco" | "voc" | "coco-folder", data_root = DIR}``; classification modes
run on the classification targets. ``[detect]`` holds any `robust-transfer detect` setting for them (and
``[detect.instance-segmentation]`` for one task only); ``[grid]`` and ``[threat]`` apply to classification.

Errors name the file, the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..attack import APGD_STEPS, Attack
from ..data import list_datasets
from ..data.detection import TASKS
from ..data.scenes import SCENES_NAME
from ..detect.config import DetectConfig
from ..errors import RobustTransferError
from ..parsing import parse_eps
from ..train import PretrainConfig
from ..train.config import EXECUTION_FIELDS as PRETRAIN_EXECUTION_FIELDS
from ..transfer import TransferConfig
from ..visualize.pictures import DEFAULT_ATTACK, KINDS, picture_attack

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOP_LEVEL = ("name", "out_dir", "targets", "modes", "seeds", "threat", "sources", "transfer", "detect", "grid",
             "resolution", "pictures")
SOURCE_KEYS = ("label", "zoo", "file", "pretrain", "eps", "sigma")
PICTURE_KEYS = ("kinds", "dataset", "data_root", "images", "eps", "steps", "step_size")
TARGET_KEYS = ("dataset", "data_root", "label")
THREAT_KEYS = ("attack", "norm", "eps", "steps", "step_size", "restarts", "examples")
# Transfer settings a study decides itself: the source, where the run writes, what is shared.
STUDY_OWNED = ("source", "out_dir", "cache_dir", "progress", "dataset", "data_root", "mode", "seed", "resume",
               "eval_attack", "eval_examples", "resolution")
DETECT_OWNED = ("source", "data", "layout", "task", "out_dir", "progress", "seed", "resume")
# Detection targets: the embedded scenes, or a folder in one of detect's layouts (the dataset names the layout).
DETECTION_TARGETS = (SCENES_NAME, "coco", "voc", "coco-folder")


@dataclass(frozen=True)
class Threat:
    """How a study measures robustness, of each source and after each transfer: ``attack`` (None: not at all)
    on ``examples`` test examples."""

    attack: Attack | None = None
    examples: int = 500


@dataclass(frozen=True)
class Pictures:
    """Perceptual-alignment grids the study draws for its report: each ``kinds`` entry, one row per source, on
    ``images`` test images of ``dataset`` (None: each pretraining source's own), searched by ``attack``."""

    kinds: tuple[str, ...]
    dataset: str | None = None
    data_root: str | None = None
    images: int = 8
    attack: Attack = DEFAULT_ATTACK


@dataclass(frozen=True)
class Source:
    """One source model: exactly one of ``zoo``, ``file`` or ``pretrain`` (a recipe the study runs first)."""

    label: str
    zoo: str | None = None
    file: str | None = None
    pretrain: dict[str, Any] | None = None


@dataclass(frozen=True)
class Target:
    dataset: str
    data_root: str | None = None
    label: str | None = None

    @property
    def dense(self) -> bool:
        """A detection target (the scenes, COCO, VOC, a COCO-format folder), not a classification dataset."""
        return self.dataset in DETECTION_TARGETS


@dataclass(frozen=True)
class StudySpec:
    """A parsed and checked study: :func:`robust_transfer.study.plan.plan_runs` expands it into runs."""

    name: str
    out_dir: str
    sources: tuple[Source, ...]
    targets: tuple[Target, ...]
    modes: tuple[str, ...] = ("fixed",)
    seeds: tuple[int, ...] = (0,)
    threat: Threat = Threat()
    transfer: dict[str, Any] = field(default_factory=dict)
    mode_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    detect: dict[str, Any] = field(default_factory=dict)
    task_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    resolutions: tuple[int, ...] = ()   # low resolutions every classification target also runs at
    pictures: Pictures | None = None
    origin: str = "<spec>"

    def targets_for(self, mode: str) -> tuple[Target, ...]:
        """The targets a mode runs on: detection targets for the dense tasks, classification ones otherwise."""
        return tuple(t for t in self.targets if t.dense == (mode in TASKS))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Checker:
    """Raises errors that name the spec file and the field at fault."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def fail(self, where: str, message: str) -> RobustTransferError:
        return RobustTransferError(f"{self.origin}: {where}: {message}")

    def only(self, table: dict, allowed: tuple[str, ...], where: str) -> None:
        if not isinstance(table, dict):
            raise self.fail(where, f"expected a table, got {type(table).__name__}")
        unknown = sorted(set(table) - set(allowed))
        if unknown:
            raise self.fail(where, f"unknown field {unknown[0]!r}; allowed: {', '.join(allowed)}")

    def list_of(self, value: Any, kind: type | tuple[type, ...], where: str) -> list:
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(where, f"expected a non-empty list of {names}, got {value!r}")
        return values


def load_spec(path: str | Path) -> StudySpec:
    """Read and check a study spec file (TOML)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RobustTransferError(f"no study spec at {path}") from None
    except OSError as error:
        raise RobustTransferError(f"cannot read the study spec {path}: {error.strerror}") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RobustTransferError(f"{path}: not valid TOML: {error}") from None
    return parse_spec(document, origin=str(path), base=path.parent)


def parse_spec(document: dict[str, Any], origin: str = "<spec>", base: Path | None = None) -> StudySpec:
    """Check a spec given as a dict (the parsed TOML). Relative file paths resolve against ``base``."""
    check = _Checker(origin)
    check.only(document, TOP_LEVEL, "top level")
    name = document.get("name", Path(origin).stem if origin != "<spec>" else "study")
    if not isinstance(name, str) or not name:
        raise check.fail("name", "expected a non-empty string")
    out_dir = document.get("out_dir", f"runs/{name}")
    if not isinstance(out_dir, str):
        raise check.fail("out_dir", "expected a folder path as a string")
    base = base or Path(".")

    sources = _sources(document.get("sources"), check, base)
    targets = _targets(document.get("targets"), check)
    modes = tuple(check.list_of(document.get("modes", ["fixed"]), str, "modes"))
    for mode in modes:
        try:
            if mode not in TASKS:
                TransferConfig(source="-", mode=mode)
        except RobustTransferError as error:
            raise check.fail("modes", f"{error}, or a dense task ({', '.join(TASKS)})") from None
    _check_pairing(targets, modes, check)
    seeds = tuple(check.list_of(document.get("seeds", [0]), int, "seeds"))
    threat = _threat(document.get("threat", {}), check)
    classify = tuple(m for m in modes if m not in TASKS)
    transfer, mode_settings = _settings(document.get("transfer", {}), classify, _transfer_fields(), "transfer", check)
    detect, task_settings = _settings(document.get("detect", {}), tuple(m for m in modes if m in TASKS),
                                      _detect_fields(), "detect", check)
    grid = _grid(document.get("grid", {}), check)
    resolutions = tuple(check.list_of(document["resolution"], int, "resolution")) if "resolution" in document else ()
    if any(r < 1 for r in resolutions):
        raise check.fail("resolution", f"expected positive numbers of pixels, got {list(resolutions)}")
    if resolutions and not classify:
        raise check.fail("resolution", "applies to classification targets, and the study has no classification mode")
    pictures = _pictures(document["pictures"], sources, check) if "pictures" in document else None
    spec = StudySpec(name=name, out_dir=str(out_dir), sources=sources, targets=targets, modes=modes, seeds=seeds,
                     threat=threat, transfer=transfer, mode_settings=mode_settings, grid=grid, detect=detect,
                     task_settings=task_settings, resolutions=tuple(sorted(set(resolutions), reverse=True)),
                     pictures=pictures, origin=origin)
    # Build every configuration once so a bad value fails now, not in the middle of a study.
    for mode in modes:
        if mode in TASKS:
            try:
                detect_settings(spec, mode)
            except RobustTransferError as error:
                where = f"[detect.{mode}]" if task_settings.get(mode) else "[detect]"
                raise check.fail(where, str(error)) from None
            continue
        for point in grid_points(grid):
            try:
                transfer_settings(spec, mode, point)
            except RobustTransferError as error:
                where = f"[transfer.{mode}]" if mode_settings.get(mode) else "[transfer]"
                raise check.fail(f"{where} / [grid] {point}" if point else where, str(error)) from None
    return spec


def _sources(raw: Any, check: _Checker, base: Path) -> tuple[Source, ...]:
    if not raw or not isinstance(raw, list):
        raise check.fail("sources", "give at least one [[sources]] table with zoo = NAME, file = PATH or "
                                    "a [sources.pretrain] recipe")
    sources: list[Source] = []
    for index, table in enumerate(raw):
        where = f"sources[{index}]"
        check.only(table, SOURCE_KEYS, where)
        kinds = [k for k in ("zoo", "file", "pretrain") if k in table]
        if len(kinds) != 1:
            raise check.fail(where, "give exactly one of zoo = NAME, file = PATH or a [sources.pretrain] table")
        label = table.get("label") or Path(str(table.get("zoo") or table.get("file") or "pretrain")).stem
        for key in ("eps", "sigma"):
            if key in table and kinds[0] != "pretrain":
                raise check.fail(f"{where}.{key}", f"{key} lists apply to pretraining sources; a zoo model or file "
                                                   f"already has its {key}")
        if kinds[0] == "zoo":
            sources.append(Source(label=label, zoo=str(table["zoo"])))
        elif kinds[0] == "file":
            path = Path(str(table["file"])).expanduser()
            sources.append(Source(label=label, file=str(path if path.is_absolute() else (base / path).resolve())))
        else:
            sources.extend(_pretrain_sources(table, label, check, where))
    labels = [s.label for s in sources]
    duplicate = next((label for label in labels if labels.count(label) > 1), None)
    if duplicate:
        raise check.fail("sources", f"two sources are labelled {duplicate!r}: give each a distinct label")
    return tuple(sources)


def _pretrain_sources(table: dict, label: str, check: _Checker, where: str) -> list[Source]:
    """One source per eps (adversarial training) or per sigma (method noise) the table lists."""
    recipe = table["pretrain"]
    check.only(recipe, tuple(f.name for f in dataclasses.fields(PretrainConfig)
                             if f.name not in PRETRAIN_EXECUTION_FIELDS or f.name == "data_root"),
               f"{where}.pretrain")
    noise = recipe.get("method") == "noise"
    key, field_name, default = ("sigma", "noise_sigma", None) if noise else ("eps", "eps", 1.0)
    other = "eps" if noise else "sigma"
    if other in table:
        raise check.fail(f"{where}.{other}", f"does not apply to method {recipe.get('method', 'pgd')}: eps lists "
                                             "adversarial training's radii, sigma method noise's stds")
    raw = table.get(key, recipe.get(field_name, default))
    if raw is None:
        raise check.fail(f"{where}.sigma", "method noise needs sigma = [noise stds in [0, 1] pixel units]")
    values_list = check.list_of(raw, (int, float, str), f"{where}.{key}")
    sources = []
    for raw_value in values_list:
        try:
            value = parse_eps(raw_value)
            values = {**recipe, field_name: value}
            if value == 0:
                values.update(method="standard", noise_sigma=0.0)
            PretrainConfig(**values)
        except (RobustTransferError, TypeError) as error:
            raise check.fail(f"{where}.pretrain", str(error)) from None
        name = f"{label}-{key}{value:g}" if len(values_list) > 1 or key in table else label
        sources.append(Source(label=name, pretrain=values))
    return sources


def _pictures(raw: Any, sources: tuple[Source, ...], check: _Checker) -> Pictures:
    check.only(raw, PICTURE_KEYS, "[pictures]")
    kinds = tuple(check.list_of(raw.get("kinds", ["inversion"]), str, "[pictures].kinds"))
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise check.fail("[pictures].kinds", f"unknown kind {unknown[0]!r}; use {', '.join(KINDS)}")
    dataset = raw.get("dataset")
    if dataset is not None and dataset not in list_datasets():
        raise check.fail("[pictures].dataset", f"unknown dataset {dataset!r}; known: {', '.join(list_datasets())}")
    if dataset is None and any(source.pretrain is None for source in sources):
        raise check.fail("[pictures].dataset", "give the dataset to draw from: a zoo or file source has no "
                                               "pretraining dataset of the study's to default to")
    images = raw.get("images", 8)
    if not isinstance(images, int) or isinstance(images, bool) or images < 1:
        raise check.fail("[pictures].images", f"expected a number of images >= 1, got {images!r}")
    try:
        attack = picture_attack(raw.get("eps"), raw.get("steps"), raw.get("step_size"))
    except (RobustTransferError, TypeError, ValueError) as error:
        raise check.fail("[pictures]", str(error)) from None
    return Pictures(tuple(dict.fromkeys(kinds)), dataset, raw.get("data_root"), images, attack)


def _targets(raw: Any, check: _Checker) -> tuple[Target, ...]:
    if not raw or not isinstance(raw, list):
        raise check.fail("targets", 'give a list of dataset names, e.g. targets = ["animal-mnist", "digits"]')
    known = [*list_datasets(), *DETECTION_TARGETS]
    targets = []
    for index, item in enumerate(raw):
        where = f"targets[{index}]"
        table = {"dataset": item} if isinstance(item, str) else item
        check.only(table, TARGET_KEYS, where)
        dataset = table.get("dataset")
        if dataset not in known:
            raise check.fail(where, f"unknown dataset {dataset!r}; known: {', '.join(known)}")
        if dataset in DETECTION_TARGETS and dataset != SCENES_NAME and not table.get("data_root"):
            raise check.fail(where, f"a {dataset} target needs data_root = the folder holding it")
        targets.append(Target(dataset=dataset, data_root=table.get("data_root"), label=table.get("label")))
    return tuple(targets)


def _check_pairing(targets: tuple[Target, ...], modes: tuple[str, ...], check: _Checker) -> None:
    """Every mode has a target of its kind and every target a mode: nothing in the spec is silently unused."""
    kinds = ((False, "classification", '"fixed"'), (True, "detection", '"detection"'))
    for dense, kind, _ in kinds:
        kinds_modes = [m for m in modes if (m in TASKS) == dense]
        if kinds_modes and not any(t.dense == dense for t in targets):
            raise check.fail("targets", f"the modes {', '.join(kinds_modes)} need a {kind} target, and none is "
                                        "listed" + ('; the embedded one is "scenes"' if dense else ""))
    for dense, kind, example in kinds:
        kinds_targets = [t.dataset for t in targets if t.dense == dense]
        if kinds_targets and not any((m in TASKS) == dense for m in modes):
            raise check.fail("modes", f"the {kind} targets {', '.join(kinds_targets)} need a {kind} mode, "
                                      f"e.g. {example}")


def _threat(raw: Any, check: _Checker) -> Threat:
    check.only(raw, THREAT_KEYS, "threat")
    settings = {("kind" if k == "attack" else k): v for k, v in raw.items() if k != "examples"}
    try:
        default_steps = 20 if settings.get("kind", "pgd") == "pgd" else APGD_STEPS
        attack = Attack.from_dict({"steps": default_steps, **settings})
        examples = int(raw.get("examples", 500))
    except (RobustTransferError, ValueError, TypeError) as error:
        raise check.fail("threat", str(error)) from None
    if attack.steps < 1 or examples < 1:
        raise check.fail("threat", "steps and examples must be >= 1")
    return Threat(attack if attack.threat.eps > 0 else None, examples)


def _transfer_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TransferConfig) if f.name not in STUDY_OWNED)


def _detect_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(DetectConfig) if f.name not in DETECT_OWNED)


def _settings(raw: Any, modes: tuple[str, ...], allowed: tuple[str, ...], table_name: str,
              check: _Checker) -> tuple[dict, dict]:
    """A ``[transfer]`` or ``[detect]`` table: shared settings, and sub-tables for one mode each."""
    if not isinstance(raw, dict):
        raise check.fail(table_name, "expected a table")
    shared = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    per_mode = {k: v for k, v in raw.items() if isinstance(v, dict)}
    check.only(shared, allowed, f"[{table_name}]")
    for mode, table in per_mode.items():
        if mode not in modes:
            listed = ", ".join(modes) or "none"
            raise check.fail(f"[{table_name}.{mode}]", f"{mode!r} is not one of the study's modes it applies to "
                                                      f"({listed})")
        check.only(table, allowed, f"[{table_name}.{mode}]")
    return shared, per_mode


def _grid(raw: Any, check: _Checker) -> dict[str, list[Any]]:
    check.only(raw, _transfer_fields(), "[grid]")
    grid = {}
    for key, values in raw.items():
        if not isinstance(values, list) or not values:
            raise check.fail(f"[grid].{key}", f"expected a non-empty list of values to try, got {values!r}")
        grid[key] = values
    return grid


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in a stable order ([{}] for an empty grid)."""
    keys = sorted(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def detect_settings(spec: StudySpec, task: str) -> dict[str, Any]:
    """The detect settings of one dense task's runs (before the study fills in source, target and seed), checked."""
    settings = {**spec.detect, **spec.task_settings.get(task, {}), "task": task}
    try:
        DetectConfig(source="-", **settings)
    except TypeError as error:
        raise RobustTransferError(str(error)) from None
    return settings


def transfer_settings(spec: StudySpec, mode: str, point: dict[str, Any]) -> dict[str, Any]:
    """The transfer settings of one run (before the study fills in source, target and seed), checked."""
    settings = {**spec.transfer, **spec.mode_settings.get(mode, {}), **point, "mode": mode}
    if spec.threat.attack is not None:
        settings.update(eval_attack=spec.threat.attack, eval_examples=spec.threat.examples)
    try:
        TransferConfig(source="-", **settings)
    except TypeError as error:
        raise RobustTransferError(str(error)) from None
    return settings
