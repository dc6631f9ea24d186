"""A CPU stand-in for Transformer Engine's te.Linear that keeps the contract the repo relies on.

* the same parameters as nn.Linear (`weight` [out, in], `bias` [out]), so state dicts move between the two;
* a `<layer>._extra_state` entry in the state dict (TE: its FP8 scaling state, serialized into a uint8 tensor),
  restored by load_state_dict; here it carries a count of the layer's forward calls, so a test can see that the
  scaling state survived a checkpoint;
* TE's shape rule: both feature sizes divisible by 16, and the product of the input's leading dimensions (the
  GEMM's rows) divisible by 16, or the forward fails as TE's does;
* fuse_wgrad_accumulation=True: the weight gradient is added into `weight.main_grad` and autograd gets none for
  the weight (trainer/main_grad.py's contract).

`install(monkeypatch)` makes the trainer convert to it as if TE and an FP8 GPU were there.
"""

import json
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

ROWS = 16


class ShapeRuleError(RuntimeError):
    pass


class _FusedWgrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        weight.main_grad.add_(g.t() @ x.reshape(-1, x.shape[-1]))
        return grad_out @ weight, None, g.sum(0)


class StandInTELinear(nn.Linear):
    instances: list["StandInTELinear"] = []

    def __init__(self, in_features, out_features, bias=True, params_dtype=torch.float32,
                 fuse_wgrad_accumulation=False):
        if in_features % ROWS or out_features % ROWS:
            raise ShapeRuleError(f"FP8 GEMM needs feature sizes divisible by {ROWS}, got {in_features}->{out_features}")
        super().__init__(in_features, out_features, bias=bias, dtype=params_dtype)
        self.fuse_wgrad_accumulation = fuse_wgrad_accumulation
        self.calls = 0
        StandInTELinear.instances.append(self)

    def forward(self, x):
        rows = x.shape[:-1].numel()
        if rows % ROWS:
            raise ShapeRuleError(f"FP8 GEMM rows {rows} (input {tuple(x.shape)}) not divisible by {ROWS}")
        self.calls += 1
        if self.fuse_wgrad_accumulation and torch.is_grad_enabled() and self.weight.requires_grad:
            return _FusedWgrad.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(list(json.dumps({"calls": self.calls}).encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if isinstance(state, torch.Tensor) and state.numel():
            self.calls = json.loads(bytes(state.tolist()).decode())["calls"]


def install(monkeypatch) -> None:
    import models.linear as linear
    import trainer.precision as precision

    real = linear.make_linear

    def make_linear(in_features, out_features, bias=True, backend="torch", fuse_wgrad_accumulation=False):
        if backend == "te":
            return StandInTELinear(in_features, out_features, bias, fuse_wgrad_accumulation=fuse_wgrad_accumulation)
        return real(in_features, out_features, bias, backend, fuse_wgrad_accumulation)

    monkeypatch.setattr(linear, "te_unavailable_reason", lambda device=None: None)
    monkeypatch.setattr(linear, "make_linear", make_linear)
    monkeypatch.setattr(precision, "fp8_recipe", lambda name, device: "stand-in recipe")
    monkeypatch.setattr(precision, "fp8_context", lambda recipe: nullcontext())
    StandInTELinear.instances = []
