"""A study spec expanded into runs: pretraining first where asked, an evaluation of each pretrained source,
then one transfer run per source x target x mode x grid point x seed (again at each low resolution the spec
asks for), one detection run per source x detection target x dense task x seed, and one picture run per
source x picture kind.

Each run is keyed by a hash of what it computes (never of where it writes), so the same run planned
twice, by two processes or after a spec edit that leaves it unchanged, is the same row in the store.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.detection import TASKS
from ..data.scenes import SCENES_NAME
from ..detect.config import DetectConfig
from ..errors import RobustTransferError
from ..models.model_file import sha256_file, weights_path
from ..train import PretrainConfig
from ..train.loop import MODEL_NAME
from ..transfer import TransferConfig
from .spec import Source, StudySpec, Target, detect_settings, grid_points, transfer_settings


@dataclass(frozen=True)
class Run:
    """One unit of work: ``config`` holds everything a worker needs, ``depends_on`` the run it waits for."""

    key: str
    kind: str
    label: str
    config: dict[str, Any]
    depends_on: str | None = None


def run_key(identity: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of what a run computes (24 hex digits)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]


def setting_text(point: dict[str, Any]) -> str:
    """A grid point as ``k=v, ...`` (empty for the single point of an empty grid)."""
    return ", ".join(f"{k}={v}" for k, v in sorted(point.items()))


def plan_runs(spec: StudySpec) -> list[Run]:
    """All runs of ``spec``, dependencies before the runs that need them."""
    out = Path(spec.out_dir)
    runs: list[Run] = []
    source_refs: dict[str, tuple[dict[str, Any], str, str | None]] = {}
    for source in spec.sources:
        if source.pretrain is not None:
            pretrain_run = _pretrain_run(source, out)
            runs.append(pretrain_run)
            model = str(Path(pretrain_run.config["pretrain"]["out_dir"]) / MODEL_NAME)
            source_refs[source.label] = ({"pretrain": pretrain_run.key}, model, pretrain_run.key)
            if spec.threat.attack is not None:
                runs.append(_evaluate_run(spec, source, pretrain_run, model))
        elif source.zoo is not None:
            source_refs[source.label] = ({"zoo": source.zoo}, source.zoo, None)
        else:
            source_refs[source.label] = ({"file_sha256": _file_digest(source, spec)}, str(source.file), None)

    for source in spec.sources:
        identity, model, dependency = source_refs[source.label]
        if spec.pictures is not None:
            runs += [_pictures_run(spec, source, identity, model, dependency, kind, out)
                     for kind in spec.pictures.kinds]
        for target in spec.targets:
            for mode in spec.modes:
                if target not in spec.targets_for(mode):
                    continue
                if mode in TASKS:
                    runs += [_detect_run(spec, source, identity, model, dependency, target, mode, seed, out)
                             for seed in spec.seeds]
                    continue
                for resolution in (None, *spec.resolutions):
                    for point in grid_points(spec.grid):
                        for seed in spec.seeds:
                            runs.append(_transfer_run(spec, source, identity, model, dependency, target, mode,
                                                      point, seed, out, resolution))
    return runs


def resolution_label(target: str, resolution: int | None) -> str:
    """A target's name in the report: ``digits``, or ``digits at 8 px`` for its low-resolution copy."""
    return target if resolution is None else f"{target} at {resolution} px"


def _pretrain_run(source: Source, out: Path) -> Run:
    config = PretrainConfig(**source.pretrain)
    key = run_key({"kind": "pretrain", "recipe": config.recipe(), "data_root": config.data_root})
    values = {**config.to_dict(), "out_dir": str(out / "pretrain" / f"{source.label}-{key[:8]}"), "resume": True,
              "progress": False}
    return Run(key, "pretrain", f"pretrain {source.label}", {"source_label": source.label, "pretrain": values})


def _evaluate_run(spec: StudySpec, source: Source, pretrain_run: Run, model: str) -> Run:
    attack, examples = spec.threat.attack, spec.threat.examples
    recipe = pretrain_run.config["pretrain"]
    identity = {"kind": "evaluate", "model": pretrain_run.key, "dataset": recipe["dataset"],
                "data_root": recipe["data_root"], "attack": attack.to_dict(), "examples": examples}
    config = {"source_label": source.label, "model": model, "dataset": recipe["dataset"],
              "data_root": recipe["data_root"], "seed": recipe["seed"], "attack": attack.to_dict(),
              "examples": examples}
    return Run(run_key(identity), "evaluate", f"evaluate {source.label} under {attack.describe()}",
               config, depends_on=pretrain_run.key)


def _file_digest(source: Source, spec: StudySpec) -> str:
    path = weights_path(source.file)
    if not path.is_file():
        raise RobustTransferError(f"{spec.origin}: sources {source.label!r}: no model file at {source.file}")
    return sha256_file(path)


def _transfer_run(spec, source, identity, model, dependency, target, mode, point, seed, out,
                  resolution: int | None = None) -> Run:
    settings = transfer_settings(spec, mode, point)
    transfer_config = TransferConfig(source=model, dataset=target.dataset, data_root=target.data_root, seed=seed,
                                     resolution=resolution, **settings)
    config = transfer_config.to_dict()
    computed = {k: v for k, v in transfer_config.recipe().items() if k != "source"}  # the source is keyed by content
    key = run_key({"kind": "transfer", "source": identity, "config": computed})
    base_label = target.label or target.dataset
    target_label = resolution_label(base_label, resolution)
    folder = f"{source.label}-{base_label}" + (f"-{resolution}px" if resolution else "") + f"-{key[:8]}"
    config.update(out_dir=str(out / "transfer" / folder), cache_dir=str(out / "features"), progress=False)
    setting = setting_text(point)
    label = f"{source.label} -> {target_label} {mode}" + (f" [{setting}]" if setting else "") + f" seed {seed}"
    return Run(key, "transfer", label,
               {"source_label": source.label, "target_label": target_label, "target": base_label,
                "resolution": resolution, "setting": setting, "transfer": config},
               depends_on=dependency)


def _pictures_run(spec: StudySpec, source: Source, identity: dict[str, Any], model: str, dependency: str | None,
                  kind: str, out: Path) -> Run:
    pictures = spec.pictures
    dataset = pictures.dataset or source.pretrain["dataset"]
    data_root = pictures.data_root if pictures.dataset else source.pretrain.get("data_root")
    computed = {"kind": kind, "dataset": dataset, "data_root": data_root, "images": pictures.images,
                "attack": pictures.attack.to_dict(), "seed": spec.seeds[0]}
    key = run_key({"kind": "pictures", "source": identity, "config": computed})
    config = {"source_label": source.label, "model": model, **computed,
              "out_file": str(out / "pictures" / f"{source.label}-{kind}-{key[:8]}.safetensors")}
    return Run(key, "pictures", f"{kind} pictures of {source.label} on {dataset}", config, depends_on=dependency)


def _detect_run(spec: StudySpec, source: Source, identity: dict[str, Any], model: str, dependency: str | None,
                target: Target, task: str, seed: int, out: Path) -> Run:
    data, layout = (SCENES_NAME, "auto") if target.dataset == SCENES_NAME else (target.data_root, target.dataset)
    detect_config = DetectConfig(source=model, data=data, layout=layout, seed=seed, **detect_settings(spec, task))
    computed = {k: v for k, v in detect_config.recipe().items() if k != "source"}  # the source is keyed by content
    key = run_key({"kind": "detect", "source": identity, "config": computed})
    target_label = target.label or target.dataset
    config = {**detect_config.to_dict(), "out_dir": str(out / "detect" / f"{source.label}-{target_label}-{key[:8]}"),
              "progress": False}
    return Run(key, "detect", f"{source.label} -> {target_label} {task} seed {seed}",
               {"source_label": source.label, "target_label": target_label, "setting": "", "detect": config},
               depends_on=dependency)
