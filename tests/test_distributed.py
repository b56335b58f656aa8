"""Data-parallel pieces in two real gloo processes: cross-process BatchNorm and DDP gradients.

The end-to-end comparison of a torchrun pretraining against one process lives in test_pretrain.py;
it can only be loose, because ReLU networks' fp32 gradients move by about 1e-2 when the input moves
by 1e-7 (a ReLU input that sits that close to zero flips). These tests are sharp instead: one layer
at fp32 precision, and a whole model's gradients in float64, where rounding flips nothing.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from robust_transfer.models import create_model
from robust_transfer.train.distributed import CrossProcessBatchNorm2d, DistributedContext, wrap_for_training

WORLD = 2
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _batchnorm_inputs() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(16, 6, 9, 9, generator=generator) * 0.5 + 3  # an offset, as after a convolution
    upstream = torch.randn(16, 6, 9, 9, generator=generator)
    weight = torch.rand(6, generator=generator) + 0.5
    bias = torch.randn(6, generator=generator)
    return images, upstream, weight, bias


def _model_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.rand(8, 1, 28, 28, generator=generator, dtype=torch.float64),
            torch.randint(0, 10, (8,), generator=generator))


def _small_resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("small_resnet", num_classes=10, in_channels=1).double()


def _join(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def _batchnorm_worker(rank: int, port: int, out_dir: str) -> None:
    _join(rank, port)
    images, upstream, weight, bias = _batchnorm_inputs()
    part = slice(rank * len(images) // WORLD, (rank + 1) * len(images) // WORLD)
    layer = CrossProcessBatchNorm2d(6)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    x = images[part].clone().requires_grad_(True)
    output = layer(x)
    output.backward(upstream[part])
    grads = torch.stack([layer.weight.grad, layer.bias.grad])
    dist.all_reduce(grads)  # what DDP does with parameter gradients (before dividing by the world size)
    torch.save({"output": output.detach(), "input_grad": x.grad, "param_grads": grads,
                "running_mean": layer.running_mean, "running_var": layer.running_var}, f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()


def _model_worker(rank: int, port: int, out_dir: str) -> None:
    _join(rank, port)
    model = wrap_for_training(_small_resnet().train(), DistributedContext(rank, WORLD, torch.device("cpu")))
    images, labels = _model_inputs()
    part = slice(rank * len(images) // WORLD, (rank + 1) * len(images) // WORLD)
    F.cross_entropy(model(images[part]), labels[part]).backward()
    if rank == 0:
        torch.save({name.removeprefix("module."): p.grad for name, p in model.named_parameters()},
                   f"{out_dir}/grads.pt")
    dist.destroy_process_group()


def _spawn(worker, tmp_path) -> None:
    mp.start_processes(worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")


def test_cross_process_batchnorm_equals_batchnorm_over_the_global_batch(tmp_path):
    _spawn(_batchnorm_worker, tmp_path)
    parts = [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]
    images, upstream, weight, bias = _batchnorm_inputs()
    reference = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        reference.weight.copy_(weight)
        reference.bias.copy_(bias)
    x = images.clone().requires_grad_(True)
    output = reference(x)
    output.backward(upstream)
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([p["output"] for p in parts]), output.detach(), **close)
    torch.testing.assert_close(torch.cat([p["input_grad"] for p in parts]), x.grad, **close)
    torch.testing.assert_close(parts[0]["param_grads"], torch.stack([reference.weight.grad, reference.bias.grad]),
                               **close)
    for part in parts:  # every process keeps the running statistics of the global batch
        torch.testing.assert_close(part["running_mean"], reference.running_mean, **close)
        torch.testing.assert_close(part["running_var"], reference.running_var, **close)


def test_two_process_gradients_equal_one_process_gradients_in_float64(tmp_path):
    _spawn(_model_worker, tmp_path)
    distributed = torch.load(tmp_path / "grads.pt")
    model = _small_resnet().train()
    images, labels = _model_inputs()
    F.cross_entropy(model(images), labels).backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(distributed[name], parameter.grad, rtol=1e-9, atol=1e-12, msg=name)
