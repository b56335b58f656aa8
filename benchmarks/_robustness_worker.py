"""Contender (c): MadryLab ``robustness==1.2.1``, run in its own virtual environment on the CPU.

Started by benchmarks/pgd_training_step.py with the robustness venv's python; see
benchmarks/setup_robustness_env.sh. It builds ``robustness.cifar_models.resnet.ResNet18``
wrapped in ``robustness.attacker.AttackerModel`` and times what ``robustness.train.train_model``
does per batch (``_model_loop``): ``model(x, target=y, make_adv=True, **attack_kwargs)``, the
cross-entropy of the returned logits, ``zero_grad``, ``backward``, ``step``.

Two shims make the 2020 library run on current torch/torchvision without a GPU:
  * ``torchvision.models.utils`` (gone from torchvision) is aliased to ``torch.hub``'s
    ``load_state_dict_from_url`` before the import (only its ImageNet models use it);
  * ``Attacker.forward`` calls ``orig_input.cuda()`` unconditionally; in this process only,
    ``torch.Tensor.cuda`` is made the identity so everything stays on the CPU.

``python _robustness_worker.py --check`` only checks that the library imports and attacks.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _worker_protocol import load_init, protocol_stream, serve  # noqa: E402


def import_robustness():
    """Import robustness 1.2.1 with the two shims described in the module docstring."""
    import torch.hub

    if "torchvision.models.utils" not in sys.modules:
        shim = types.ModuleType("torchvision.models.utils")
        shim.load_state_dict_from_url = torch.hub.load_state_dict_from_url
        sys.modules["torchvision.models.utils"] = shim
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # keep the library on the CPU
    import robustness
    from robustness.attacker import AttackerModel
    from robustness.cifar_models.resnet import ResNet18

    return robustness, AttackerModel, ResNet18


def to_robustness_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision-style CIFAR ResNet names -> robustness.cifar_models names (same architecture)."""
    out = {}
    for key, value in state.items():
        key = key.replace(".downsample.", ".shortcut.")
        if key.startswith("fc."):
            key = "linear." + key[len("fc.") :]
        out[key] = value
    return out


class _Stats:
    """Stand-in for a robustness ``DataSet``: AttackerModel only reads ``mean`` and ``std``."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean, self.std = mean, std


def build(init: dict):
    robustness, AttackerModel, ResNet18 = import_robustness()
    net = ResNet18(num_classes=int(init["num_classes"]))
    if init.get("state") is not None:
        net.load_state_dict(to_robustness_names(init["state"]))
    model = AttackerModel(net, _Stats(init["mean"].float(), init["std"].float()))
    optimizer = torch.optim.SGD(
        model.parameters(), lr=init["lr"], momentum=init["momentum"], weight_decay=init["weight_decay"]
    )
    criterion = torch.nn.CrossEntropyLoss()
    attack_kwargs = {
        "constraint": "2",
        "eps": init["eps"],
        "step_size": init["step_size"],
        "iterations": int(init["attack_steps"]),
        "random_start": True,
        "random_restarts": 0,
        "use_best": bool(init.get("use_best", False)),
    }
    x, y = init["x"], init["y"]

    def step() -> tuple[float, torch.Tensor]:
        model.train()
        output, final_inp = model(x, target=y, make_adv=True, **attack_kwargs)
        loss = criterion(output, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item(), final_inp

    return robustness, model, step


def check() -> int:
    g = torch.Generator().manual_seed(0)
    init = {
        "num_classes": 10,
        "state": None,
        "mean": torch.full((3,), 0.5),
        "std": torch.full((3,), 0.5),
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "eps": 0.5,
        "step_size": 0.25,
        "attack_steps": 1,
        "x": torch.rand(2, 3, 32, 32, generator=g),
        "y": torch.tensor([0, 1]),
    }
    robustness, _model, step = build(init)
    loss, x_adv = step()
    norm = (x_adv - init["x"]).flatten(1).norm(dim=1).max().item()
    ok = torch.isfinite(torch.tensor(loss)) and norm <= 0.5 + 1e-4
    print(
        f"robustness {robustness.__version__} on torch {torch.__version__}: loss {loss:.3f}, "
        f"max perturbation L2 {norm:.4f} -> {'ok' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that robustness imports and runs")
    parser.add_argument("--init", help="initial state written by the driver (torch.save)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check:
        return check()
    proto = protocol_stream()
    init = load_init(args.init)
    robustness, model, step = build(init)
    # Same weights as the driver's model? Compare clean eval-mode logits on the batch.
    model.eval()
    with torch.no_grad():
        logits = model(init["x"])[0]
    max_diff = (logits - init["clean_logits"]).abs().max().item()
    serve(
        step,
        proto,
        {
            "version": robustness.__version__,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "logits_max_abs_diff": max_diff,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
