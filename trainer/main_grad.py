"""fp32 `main_grad` buffers for layers that accumulate their weight gradients themselves, kept correct under DDP.

Transformer Engine's `te.Linear(fuse_wgrad_accumulation=True)` adds each micro-batch's weight gradient straight
into `weight.main_grad` (fp32) inside the wgrad GEMM and hands autograd no gradient for the weight (None, as
long as the weight has no `grad_added_to_main_grad` attribute, Megatron's convention for its own DDP). So
torch's DDP never sees those weights: its reducer hooks fire on `.grad` accumulation only. The reference
system stopped there and every rank stepped on its own local gradient; the ranks drifted apart.

`MainGrads` closes that gap for plain torch DDP:

1. `__init__` allocates one flat fp32 buffer and gives every such weight a `main_grad` view into it;
2. `exclude_from_ddp` tells DDP to ignore exactly those weights (their biases still have `.grad` and stay
   with DDP), so DDP neither waits for a gradient that never comes nor broadcasts them; `broadcast` then
   makes rank 0's initial values everyone's, which DDP would have done for them;
3. `reduce` all-reduces the flat buffer in one call and divides by the world size (DDP's mean), once per
   optimiser step, after the last micro-batch: earlier micro-batches only accumulate locally, as `no_sync`
   does for DDP's own parameters;
4. `to_grad` points `.grad` at `main_grad`, so gradient clipping and the optimizer see every gradient;
5. `zero` clears the buffer after the step (the optimizer's `zero_grad(set_to_none=True)` drops the `.grad`
   aliases).

The loop calls them in that order (trainer/loop.py); tests/main_grad_worker.py checks it on CPU with a
stand-in layer that keeps TE's contract.
"""

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)


def fused_wgrad_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of every module that accumulates its own weight gradient: its `fuse_wgrad_accumulation`
    attribute is True (te.Linear's constructor argument, kept as an attribute)."""
    return [
        (f"{name}.weight" if name else "weight", module.weight)
        for name, module in model.named_modules()
        if getattr(module, "fuse_wgrad_accumulation", False) and module.weight.requires_grad
    ]


class MainGrads:
    """The fp32 main_grad buffers of `model`'s fused-wgrad weights; see the module docstring."""

    def __init__(self, model: nn.Module, world_size: int = 1):
        self.world_size = world_size
        named = fused_wgrad_weights(model)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        first = self.params[0] if self.params else torch.empty(0)
        if any(p.dtype != first.dtype or p.device != first.device for p in self.params):
            raise ValueError("fused-wgrad weights of different dtypes or devices: one flat main_grad cannot hold them")
        # fp32 for bf16/fp32 master weights (what TE's fused GEMM accumulates into); wider weights keep theirs.
        dtype = torch.promote_types(first.dtype, torch.float32)
        self.flat = torch.zeros(sum(p.numel() for p in self.params), dtype=dtype, device=first.device)
        offset = 0
        for p in self.params:
            p.main_grad = self.flat[offset:offset + p.numel()].view_as(p)  # a view: one all-reduce for all
            offset += p.numel()
        if self.params:
            log.info("fused wgrad accumulation: %d weights (%.1fM values) reduced through fp32 main_grad",
                     len(self.params), self.flat.numel() / 1e6)

    def __bool__(self) -> bool:
        return bool(self.params)

    def exclude_from_ddp(self, module: nn.Module) -> None:
        """Call before wrapping `module` in DDP. Names are looked up in `module` itself, so a torch.compile
        wrapper's `_orig_mod.` prefix is accounted for."""
        ours = {id(p) for p in self.params}
        names = [n for n, p in module.named_parameters() if id(p) in ours]
        if len(names) != len(self.params):
            raise RuntimeError(f"{len(self.params) - len(names)} fused-wgrad weights are not parameters of the "
                               "module handed to DDP")
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)

    @torch.no_grad()
    def broadcast(self) -> None:
        """Rank 0's weights everywhere (DDP broadcasts only the parameters it manages)."""
        if self.world_size > 1 and self.params:
            flat = torch.cat([p.detach().reshape(-1) for p in self.params])
            dist.broadcast(flat, src=0)
            offset = 0
            for p in self.params:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    @torch.no_grad()
    def reduce(self) -> None:
        """Mean over ranks of the accumulated main_grad: one coalesced all-reduce, after the last micro-batch."""
        if self.world_size > 1 and self.params:
            dist.all_reduce(self.flat, op=dist.ReduceOp.SUM)  # gloo has no AVG; divide as DDP does
            self.flat.div_(self.world_size)

    def to_grad(self) -> None:
        """`.grad` aliases `main_grad`: clipping scales both, the optimizer reads it."""
        for p in self.params:
            if p.grad is not None:
                raise RuntimeError("a fused-wgrad weight also has a .grad: the layer did not hand its weight "
                                   "gradient to main_grad only, so it would be counted twice")
            p.grad = p.main_grad

    @torch.no_grad()
    def zero(self) -> None:
        self.flat.zero_()
