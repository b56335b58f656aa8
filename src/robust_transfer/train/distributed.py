"""Multi-process data parallel training under torchrun: gloo on CPU, NCCL on GPU."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..runtime import resolve_device


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among ``world_size`` and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(device=resolve_device(device))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    return DistributedContext(rank=rank, world_size=world_size, device=resolved)


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward sums the gradients too (each process's loss uses the total).

    torch.distributed.nn.functional.all_reduce does the same but is deprecated (a FutureWarning on
    every run), and the functional collectives that replace it are not differentiable on gloo.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        return total, None


def _all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceSum.apply(tensor, group)


class CrossProcessBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics span the whole global batch, on any device.

    torch's SyncBatchNorm runs only on GPUs; this does the same on CPU with two autograd-aware
    all-reduces per layer (sum and count, then the sum of squared deviations), so a 2-process run
    normalises as a 1-process run of the same global batch would.
    """

    group = None  # set by convert_batchnorm: a process group of its own (see there)
    folds_in_eval_mode = True  # eval mode is BatchNorm2d's affine map: attacks fold it (robust_transfer.folding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        group = self.group or dist.group.WORLD
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in fp32 at least, fp64 stays fp64
        count = torch.tensor([x.numel() / channels], dtype=xf.dtype, device=x.device)
        sums = _all_reduce_sum(torch.cat([xf.sum((0, 2, 3)), count]), group)
        total = sums[-1]
        mean = sums[:channels] / total
        # Variance from centred values, not E[x^2] - mean^2: near-constant channels (a stem
        # convolution over flat background) would lose most of their digits to cancellation.
        centred = xf - mean.view(1, channels, 1, 1)
        var = _all_reduce_sum((centred * centred).sum((0, 2, 3)), group) / total
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            unbiased = var * total / (total - 1).clamp_min(1)
            self.running_mean.mul_(1 - momentum).add_(momentum * mean)
            self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
        shape = (1, channels, 1, 1)
        out = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace BatchNorm2d layers by their cross-process versions (SyncBatchNorm on GPU)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if CrossProcessBatchNorm2d.group is None and dist.is_initialized():
        # DDP all-reduces gradient buckets from its own thread while the backward pass
        # all-reduces BatchNorm statistics; on one gloo group the two could pair up wrongly.
        CrossProcessBatchNorm2d.group = dist.new_group(backend="gloo")
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = CrossProcessBatchNorm2d(child.num_features, child.eps, child.momentum,
                                                  child.affine, child.track_running_stats)
            # Keep the very same parameter and buffer objects: an optimiser may already hold them.
            replacement.weight, replacement.bias = child.weight, child.bias
            replacement.running_mean, replacement.running_var = child.running_mean, child.running_var
            replacement.num_batches_tracked = child.num_batches_tracked
            replacement.train(child.training)
            setattr(module, name, replacement)
        else:
            convert_batchnorm(child, device)
    return module


def wrap_for_training(model: nn.Module, context: DistributedContext, find_unused_parameters: bool = False) -> nn.Module:
    """Return the module to train: the model itself, or a DDP wrapper around it (``find_unused_parameters`` for a
    model whose forward may skip trainable layers, as Mask R-CNN's mask head on a batch without positives)."""
    if not context.active:
        return model
    convert_batchnorm(model, context.device)
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    # No buffer broadcast before each forward: every process already updates the running statistics
    # from the global batch. torch 2.14 renamed the switch (and syncs once at init, which is harmless).
    parameters = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in parameters
                      else {"broadcast_buffers": False})
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               find_unused_parameters=find_unused_parameters, **no_buffer_sync)


def gather_to_all(value: Any, context: DistributedContext) -> list[Any]:
    """Every process's ``value`` (picklable, on the CPU), in rank order; ``[value]`` when running alone."""
    if not context.active:
        return [value]
    values: list[Any] = [None] * context.world_size
    dist.all_gather_object(values, value)
    return values


def seed_process(seed: int, context: DistributedContext) -> None:
    """Give each process its own random stream (attack random starts), rank 0 the 1-process one.

    With one seed everywhere, the random start of row i of rank 0's share would equal that of row i
    of every other rank's share.
    """
    if context.rank:
        torch.manual_seed(seed * 1_000_003 + context.rank)


def all_reduce_sum(values: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sum a tensor over all processes (identity when running alone)."""
    if context.active:
        values = values.clone()
        dist.all_reduce(values)
    return values
