"""Execute one planned run with the library's own functions; no store access, so any executor can call it."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

from safetensors.torch import save

from ..errors import RobustTransferError
from .plan import Run


def execute_run(run: Run) -> dict[str, Any]:
    """Run ``run`` and return its result record (JSON-serialisable). Raises on failure."""
    if run.kind == "pretrain":
        return _pretrain(run.config)
    if run.kind == "evaluate":
        return _evaluate(run.config)
    if run.kind == "transfer":
        return _transfer(run.config)
    if run.kind == "detect":
        return _detect(run.config)
    if run.kind == "pictures":
        return _pictures(run.config)
    raise RobustTransferError(f"unknown run kind {run.kind!r}")


def describe_error(error: BaseException) -> str:
    """The stored error: one line for a user error, the traceback for anything else (it is a bug or a fault)."""
    if isinstance(error, RobustTransferError):
        return f"{type(error).__name__}: {error}"
    return "".join(traceback.format_exception(error)).strip()


def _pretrain(config: dict[str, Any]) -> dict[str, Any]:
    from ..train import PretrainConfig, pretrain

    return pretrain(PretrainConfig.from_dict(config["pretrain"])).summary()


def _evaluate(config: dict[str, Any]) -> dict[str, Any]:
    from ..attack import Attack
    from ..evaluation import evaluate_file

    return evaluate_file(config["model"], config["dataset"], Attack.from_dict(config["attack"]),
                         data_root=config["data_root"], max_examples=config["examples"], precision="auto",
                         seed=config["seed"]).to_dict()


def _transfer(config: dict[str, Any]) -> dict[str, Any]:
    from ..transfer import TransferConfig, transfer

    # resume: an interrupted fine-tuning continues from its per-epoch checkpoints.
    result = transfer(TransferConfig(**{**config["transfer"], "resume": True}))
    return {**result.record.to_dict(), "model_path": str(result.model_path)}


def _detect(config: dict[str, Any]) -> dict[str, Any]:
    from ..detect import DetectConfig, detect

    # resume: an interrupted detection run continues from its per-epoch checkpoints.
    result = detect(DetectConfig(**{**config["detect"], "resume": True}))
    return {**result.record.to_dict(), "detector_path": str(result.detector_path)}


def _pictures(config: dict[str, Any]) -> dict[str, Any]:
    from ..atomic import atomic_write
    from ..attack import Attack
    from ..models import load_model
    from ..visualize.pictures import picture_inputs, picture_row

    model = load_model(config["model"]).eval()
    inputs = picture_inputs(config["kind"], config["dataset"], config["data_root"], config["images"], config["seed"],
                            model.spec.in_channels)
    row = picture_row(model, inputs, Attack.from_dict(config["attack"]))
    reference_name, reference = inputs.reference
    path = Path(config["out_file"])
    path.parent.mkdir(parents=True, exist_ok=True)
    data = save({"reference": reference.float().contiguous(), "row": row.detach().float().cpu().contiguous()})
    atomic_write(path, lambda handle: handle.write(data))
    return {"kind": config["kind"], "dataset": config["dataset"], "reference": reference_name, "file": str(path)}
