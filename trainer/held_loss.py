"""The loss on fixed held batches with fixed noise and times and no dropout.

Comparable within a stage (start against end) and across a stage boundary (the previous stage's EMA at its end
against the next stage's weights at its start): summary.json's held_loss_start / held_loss_end_*. With aspect-ratio
buckets each held batch is of one bucket, drawn like the training batches (data/loader.py).
"""

import torch
from omegaconf import DictConfig

from data.loader import ShardDataset, mix_seed
from flow.rectified_flow import RectifiedFlow
from trainer.builders import loader_options


def held_generator(seed: int, batch: int, device: torch.device) -> torch.Generator:
    """The generator of held batch `batch`'s noise and times: the same for every evaluation of a run."""
    gen = torch.Generator(device=device)
    gen.manual_seed(mix_seed(seed, "step", "held", batch))
    return gen


class HeldLoss:
    """`cfg.train.eval_batches` micro-batches read once from the data (their own seeded order)."""

    def __init__(self, cfg: DictConfig, micro: int, conditioning, objective: RectifiedFlow, device, precision):
        self.batches: list[dict[str, torch.Tensor]] = []
        if cfg.train.eval_batches > 0:
            data = ShardDataset(cfg.data.path, seed=mix_seed(cfg.seed, "held"), batch_size=micro,
                                verify_checksum=False, **loader_options(cfg, conditioning))
            stream = iter(data)
            self.batches = [next(stream) for _ in range(cfg.train.eval_batches)]
        self.seed, self.conditioning, self.objective = cfg.seed, conditioning, objective
        self.device, self.precision = device, precision

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, unconditional: bool = False) -> float | None:
        """Mean loss over the held batches; `unconditional` replaces every condition by the null one."""
        if not self.batches:
            return None
        losses = []
        for i, batch in enumerate(self.batches):
            gen = held_generator(self.seed, i, self.device)
            x1 = batch["latents"].to(self.device, torch.float32)
            if unconditional:
                cond = self.conditioning.null(len(x1), self.device)
            else:
                cond = self.conditioning.from_batch(batch, None, self.device)
            with self.precision.forward():
                losses.append(self.objective.loss(model, x1, cond, gen).item())
        return sum(losses) / len(losses)
