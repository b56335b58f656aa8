"""Execute one planned run with the library's own functions; no store access, so any executor can call it."""

from __future__ import annotations

import traceback
from typing import Any

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
    raise RobustTransferError(f"unknown run kind {run.kind!r}")


def describe_error(error: BaseException) -> str:
    """The stored error: one line for a user error, the traceback for anything else (it is a bug or a fault)."""
    if isinstance(error, RobustTransferError):
        return f"{type(error).__name__}: {error}"
    return "".join(traceback.format_exception(error)).strip()


def _pretrain(config: dict[str, Any]) -> dict[str, Any]:
    from ..train import PretrainConfig, pretrain

    result = pretrain(PretrainConfig.from_dict(config["pretrain"]))
    return {"model_path": str(result.model_path), "run_dir": str(result.run_dir), "test": result.test,
            "epochs": len(result.history), "train_seconds": result.seconds}


def _evaluate(config: dict[str, Any]) -> dict[str, Any]:
    from ..data import load_dataset, sample_examples
    from ..evaluation import evaluate
    from ..models import load_model
    from ..threat import ThreatModel

    model = load_model(config["model"])
    data = load_dataset(config["dataset"], config["data_root"], seed=config["seed"],
                        image_size=model.metadata.get("input_size"), in_channels=model.spec.in_channels)
    test = sample_examples(data.test, config["examples"], config["seed"])
    result = evaluate(model, test, ThreatModel(config["norm"], config["eps"]), steps=config["steps"],
                      precision="auto", seed=config["seed"])
    return result.to_dict()


def _transfer(config: dict[str, Any]) -> dict[str, Any]:
    from ..transfer import TransferConfig, transfer

    # resume: an interrupted fine-tuning continues from its per-epoch checkpoints.
    result = transfer(TransferConfig(**{**config["transfer"], "resume": True}))
    return {**result.record, "model_path": str(result.model_path)}
