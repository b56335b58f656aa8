"""Contender (b): a plain PyTorch PGD-7 L2 adversarial training step, written the obvious way.

fp32, NCHW, default allocator (it runs in its own process so that it does not inherit the
malloc tuning our engine applies process-wide), CIFAR ResNet-18 built from torchvision's
``BasicBlock`` (same architecture and state-dict names as ``robust_transfer``'s
``cifar_resnet18``), normalisation in front. Per step: the attack in eval mode, as Madry et al.
and the robustness library do (random start on the eps-sphere, 7 steps of
``step_size * grad / ||grad||``, projection onto the ball with ``renorm`` and into [0, 1]),
then ``model.train()``, cross-entropy on the adversarial batch, SGD step.

``--precision bf16`` gives the optional contender "plain loop + channels_last + bf16 autocast"
(what a user gets from the two well-known switches, without our engine).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _worker_protocol import load_init, protocol_stream, serve  # noqa: E402


class CifarResNet18(ResNet):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.maxpool = nn.Identity()


class Normalized(nn.Module):
    def __init__(self, net: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1))
        self.register_buffer("std", std.reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def l2_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def pgd_l2(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int
) -> torch.Tensor:
    delta = torch.randn_like(x)
    x_adv = (x + eps * delta / l2_norm(delta)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv).float(), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv = x_adv + step_size * grad / (l2_norm(grad) + 1e-12)
            delta = (x_adv - x).renorm(p=2, dim=0, maxnorm=eps)
            x_adv = (x + delta).clamp(0, 1)
    return x_adv.detach()


def build(init: dict, precision: str):
    net = CifarResNet18(int(init["num_classes"]))
    net.load_state_dict(init["state"])
    model = Normalized(net, init["mean"].float(), init["std"].float())
    x, y = init["x"], init["y"]
    if precision == "bf16":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        amp = contextlib.nullcontext
    optimizer = torch.optim.SGD(
        model.parameters(), lr=init["lr"], momentum=init["momentum"], weight_decay=init["weight_decay"]
    )
    eps, step_size, steps = init["eps"], init["step_size"], int(init["attack_steps"])

    def step() -> tuple[float, torch.Tensor]:
        model.eval()
        with amp():
            x_adv = pgd_l2(model, x, y, eps, step_size, steps)
        model.train()
        with amp():
            loss = F.cross_entropy(model(x_adv).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item(), x_adv

    return model, step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", required=True, help="initial state written by the driver (torch.save)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    proto = protocol_stream()
    init = load_init(args.init)
    model, step = build(init, args.precision)
    model.eval()
    with torch.no_grad():
        logits = model(init["x"])
    max_diff = (logits - init["clean_logits"]).abs().max().item()
    serve(
        step,
        proto,
        {"torch": torch.__version__, "threads": torch.get_num_threads(), "logits_max_abs_diff": max_diff},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
