"""A few optimiser steps of a small model whose first layer accumulates its weight gradient into main_grad,
the way te.Linear(fuse_wgrad_accumulation=True) does; run under torchrun (DDP) or as one process.

    python -m torch.distributed.run --nproc_per_node=2 tests/main_grad_worker.py --out DIR [--no-reduce] [--te]
    python tests/main_grad_worker.py --out DIR [--plain]  # one process, the same global batch

Each rank writes rank{R}.pt with its final weights. The step order is trainer/loop.py's: micro-batches
(DDP no_sync on all but the last) -> MainGrads.reduce -> to_grad -> clip -> AdamW step -> zero.
--no-reduce skips MainGrads.reduce: the reference's bug, kept as the test's negative control.
--plain keeps an ordinary nn.Linear (autograd's .grad): what the fused layer must reproduce exactly.
--te uses real te.Linear layers on CUDA (tests/test_gpu_fp8.py) instead of the CPU stand-in.
"""

import argparse
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.main_grad import MainGrads  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402

STEPS, GRAD_ACCUM, GLOBAL_BATCH, DIM = 3, 2, 8, 16


class _FusedWgradLinearFn(torch.autograd.Function):
    """y = x W^T + b; backward adds dL/dW into weight.main_grad and returns no gradient for W (TE's contract)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return x @ weight.t() + bias

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        weight.main_grad.add_(grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1]))
        return grad_out @ weight, None, grad_out.reshape(-1, grad_out.shape[-1]).sum(0)


class FusedWgradLinear(nn.Linear):
    """A CPU stand-in for te.Linear(fuse_wgrad_accumulation=True): same parameters, same gradient contract."""

    fuse_wgrad_accumulation = True

    def forward(self, x):
        return _FusedWgradLinearFn.apply(x, self.weight, self.bias)


def build(use_te: bool, device: torch.device, plain: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, DIM), nn.SiLU(), nn.Linear(DIM, DIM), nn.SiLU(), nn.Linear(DIM, 1))
    if plain:
        return model.to(device=device, dtype=torch.float64)
    if use_te:
        import transformer_engine.pytorch as te

        fused = te.Linear(DIM, DIM, params_dtype=torch.float32, fuse_wgrad_accumulation=True)
    else:
        fused = FusedWgradLinear(DIM, DIM)
    with torch.no_grad():
        fused.weight.copy_(model[2].weight)
        fused.bias.copy_(model[2].bias)
    model[2] = fused
    return model.to(device=device, dtype=torch.float32 if use_te else torch.float64)


def data(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of every step: [STEPS, GLOBAL_BATCH, DIM] inputs and targets."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, GLOBAL_BATCH, DIM, generator=gen, dtype=torch.float64)
    y = torch.randn(STEPS, GLOBAL_BATCH, 1, generator=gen, dtype=torch.float64)
    return x.to(device, dtype), y.to(device, dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--no-reduce", action="store_true")
    ap.add_argument("--te", action="store_true")
    ap.add_argument("--plain", action="store_true")
    args = ap.parse_args()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.te:
        # NCCL with a GPU per rank; two ranks on one GPU need gloo (NCCL refuses a shared device).
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl" if torch.cuda.device_count() >= world else "gloo"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if world > 1:
        dist.init_process_group(backend)
    model = build(args.te, device, args.plain)
    grads = MainGrads(model, world)
    assert bool(grads) != args.plain, "the fused-wgrad layer was not found (or found in --plain)"
    forward = model
    if world > 1:
        grads.exclude_from_ddp(model)
        grads.broadcast()
        forward = DistributedDataParallel(model)
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
    x, y = data(device, next(model.parameters()).dtype)
    micro = GLOBAL_BATCH // (world * GRAD_ACCUM)
    for step in range(STEPS):
        for m in range(GRAD_ACCUM):
            lo = (rank * GRAD_ACCUM + m) * micro
            last = m == GRAD_ACCUM - 1
            with nullcontext() if last or world == 1 else forward.no_sync():
                loss = nn.functional.mse_loss(forward(x[step, lo:lo + micro]), y[step, lo:lo + micro])
                (loss / GRAD_ACCUM).backward()
        if not args.no_reduce:
            grads.reduce()
        grads.to_grad()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        grads.zero()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items() if not k.endswith("_extra_state")},
               args.out / f"rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
