"""Exponential moving average of the model weights, with its own state for checkpoints.

Two schedules: the reference's (update every `every` steps, decay rising linearly from
`start_decay` to `decay` over `warmup_steps`) and plain per-step EMA (every=1, warmup_steps=0).

Under train.parallel=fsdp/hsdp the EMA copy is sharded like the model (trainer/parallel.py), so both hold
DTensors with the same placements: the blend runs on each rank's local shards, which is the unsharded update
restricted to the elements that rank holds, so the EMA stays exact and needs no communication.

Only the parameters that require grad when the EMA is made are averaged (all of them, except in a LoRA run: the
adapters, trainer/lora.py). The frozen ones are the model's own tensors in the copy, shared rather than copied, so a
frozen base costs no second copy (sharded, the EMA's shards of it are its own: FSDP2 shards each module separately).
"""

import copy

import torch
from torch import nn


class EMA:
    def __init__(
        self, model: nn.Module, decay: float = 0.999, every: int = 1, warmup_steps: int = 0, start_decay: float = 0.0
    ):
        self.decay, self.every, self.warmup_steps, self.start_decay = decay, every, warmup_steps, start_decay
        # A copy of the unwrapped model: no DDP, no compile wrapper, so its keys match the model's.
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.model = copy.deepcopy(model, memo=frozen).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return self.decay
        ramp = min(step / self.warmup_steps, 1.0)
        return self.start_decay + (self.decay - self.start_decay) * ramp

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, applied: torch.Tensor | None = None) -> None:
        """Call after optimiser step `step` (1-based); only every `every`-th step blends. `applied`: a 0-d device
        tensor, 1 when the optimiser step was taken and 0 when it was skipped, for a loop that decides on the
        device (trainer/loop.py); the blend weight is multiplied by it, so a skipped step leaves the EMA as it was."""
        if step % self.every or not self.names:
            return
        d = self.decay_at(step)
        own, source = dict(self.model.named_parameters()), dict(model.named_parameters())
        ema_params = [_local(own[n]) for n in self.names]
        params = [_local(source[n].detach()).to(e.dtype) for n, e in zip(self.names, ema_params, strict=True)]
        if applied is None:
            torch._foreach_lerp_(ema_params, params, 1 - d)  # e <- d e + (1 - d) p
        else:
            # The weight stays on the device: as a tensor where _foreach_lerp_ takes a Scalar it would be read
            # back (.item(), a host sync); its list-of-weights overload broadcasts a 0-d tensor to each pair.
            weight = applied.to(ema_params[0].dtype) * (1 - d)
            torch._foreach_lerp_(ema_params, params, [weight] * len(ema_params))
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)

    def state_dict(self) -> dict:
        """The EMA weights (sharded: DTensors; trainer/loop.py saves them through torch.distributed.checkpoint)."""
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded parameter's local shard (DTensor.to_local); a plain tensor as it is."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor
