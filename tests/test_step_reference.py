"""The trainer's arithmetic against a training step written out by hand.

The real Trainer (trainer/loop.py) runs five steps of a tiny Stage-1 ccDiT on the embedded data and saves a
checkpoint after each. Beside it, this file replays the same steps with nothing of the trainer's: the same batches
(recorded as the trainer drew them), the draws made from the documented per-(seed, step, virtual rank) generator in
the documented order (dropout, noise, times: flow/rectified_flow.py), a float64 copy of the initial weights, the
x-prediction loss, gradient accumulation as the mean of the micro-batches' gradients, the global-norm clip, AdamW
from its update rule (decoupled weight decay) with weight decay on the layers' matrices only, the warmup-and-decay
schedule, the EMA after the optimizer step on its own cadence and ramp, and a step whose gradient is not finite
skipped whole (weights, moments, Adam's step count and the EMA untouched; the schedule still advances). Weights,
EMA and optimizer state must agree after every step, with one micro-batch per step and with two.

The model's forward is the only code shared with the trainer: it is what produces gradients, not what this file
checks. It runs in float64 here and in float32 there, so the two agree to float32 rounding (the tolerances below).
"""

import copy
import math

import pytest
import torch
from torch import nn

from core import checkpoint
from data.loader import mix_seed
from tests.helpers import randomize_zero_inits
from tests.stages import stage_config
from trainer import distributed
from trainer.loop import Trainer

STEPS = 5
POISONED_STEP = 4  # 1-based: its last micro-batch's gradient is infinite, so the step must be skipped whole
SETTINGS = dict(
    seed=3, lr=1e-2, warmup=2, decay_fraction=0.5, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1,
    label_dropout=0.5, t_mean=0.3, t_std=0.8, shift=2.0, ema_decay=0.9, ema_every=2, ema_warmup=3, ema_start=0.5,
)
"""Every knob away from its default and from 0 or 1, so that dropping one from the arithmetic shows."""
X_PRED_EPS = 0.05  # the clamp of 1 - t in x-prediction (flow/objective.py)
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_ divides by norm + 1e-6


class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


# ---- the step by hand ----------------------------------------------------------------------------------------


def lr_factor(k: int) -> float:
    """Optimizer step k (0-based): linear warmup over `warmup` steps, then constant, then linear decay to 0 over
    the last `decay_fraction` of the run."""
    s = SETTINGS
    if k < s["warmup"]:
        return (k + 1) / s["warmup"]
    decay_start = math.floor(STEPS * (1 - s["decay_fraction"]))
    return (STEPS - k) / (STEPS - decay_start) if k >= decay_start else 1.0


def ema_decay(done: int) -> float:
    s = SETTINGS
    return s["ema_start"] + (s["ema_decay"] - s["ema_start"]) * min(done / s["ema_warmup"], 1.0)


def decayed_names(model: nn.Module) -> set[str]:
    """The parameters AdamW decays: the weight matrices of the linear layers outside the embedders (patch, time
    and class embedding). Biases, norm gains and embeddings are not decayed (README; the reference's rule)."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "embed" not in module_name.split(".")[0]:
            names.add(f"{module_name}.weight")
    return names


def draws(batch: dict, step: int, micro: int, null_label: int) -> tuple[torch.Tensor, ...]:
    """Labels after dropout, x1, x0 and t of one micro-batch, in float64, from the generator the trainer's
    docstring names: seeded by (seed, "step", step, virtual rank), virtual rank = micro-batch on one rank."""
    s = SETTINGS
    gen = torch.Generator().manual_seed(mix_seed(s["seed"], "step", step, micro))
    labels = batch["labels"].long().clone()
    labels[torch.rand(len(labels), generator=gen) < s["label_dropout"]] = null_label
    x1 = batch["latents"].double()
    x0 = torch.randn(x1.shape, generator=gen).double()
    t = torch.sigmoid(torch.randn(len(labels), generator=gen).double() * s["t_std"] + s["t_mean"])
    t = t / (t + s["shift"] * (1 - t))  # SD3's shift sigma' = s sigma / (1 + (s - 1) sigma), sigma = 1 - t
    return labels, x1, x0, t


def loss_of(model: nn.Module, labels, x1, x0, t) -> torch.Tensor:
    """x-prediction: the network's clean-image guess turned into a velocity, MSE against x1 - x0."""
    tb = t[:, None, None, None]
    x_t = tb * x1 + (1 - tb) * x0
    v_hat = (model(x_t, t, labels=labels) - x_t) / (1 - tb).clamp(min=X_PRED_EPS)
    return ((v_hat - (x1 - x0)) ** 2).mean()


def reference_run(model64: nn.Module, batches: list[dict], grad_accum: int, clip: float, null_label: int) -> list[dict]:
    """The five steps by hand; returns the state after each: weights, EMA, moments, Adam's step count, lr, the
    gradient's norm and each micro-batch's share of it alone."""
    s = SETTINGS
    names = [n for n, _ in model64.named_parameters()]
    params = dict(model64.named_parameters())
    decayed = decayed_names(model64)
    ema = {n: p.detach().clone() for n, p in params.items()}
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    adam_steps, states = 0, []
    b1, b2 = s["betas"]
    for k in range(STEPS):
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        micro_norms = []
        for micro in range(grad_accum):
            loss = loss_of(model64, *draws(batches[k * grad_accum + micro], k, micro, null_label))
            if k + 1 == POISONED_STEP and micro == grad_accum - 1:
                loss = _InfGrad.apply(loss)
            shares = [g / grad_accum for g in torch.autograd.grad(loss, list(params.values()))]
            micro_norms.append(math.sqrt(sum(float((g**2).sum()) for g in shares)))
            for n, g in zip(names, shares, strict=True):
                grads[n] += g  # the step's gradient is the mean of its micro-batches'
        norm = math.sqrt(sum(float((g**2).sum()) for g in grads.values()))
        lr = s["lr"] * lr_factor(k)
        if math.isfinite(norm):
            scale = min(1.0, clip / (norm + CLIP_EPS))
            adam_steps += 1
            with torch.no_grad():
                for n, p in params.items():
                    g = grads[n] * scale
                    if n in decayed:
                        p.mul_(1 - lr * s["weight_decay"])  # decoupled weight decay
                    m[n] = b1 * m[n] + (1 - b1) * g
                    v[n] = b2 * v[n] + (1 - b2) * g * g
                    m_hat, v_hat = m[n] / (1 - b1**adam_steps), v[n] / (1 - b2**adam_steps)
                    p.sub_(lr * m_hat / (v_hat.sqrt() + s["eps"]))
                done = k + 1
                if done % s["ema_every"] == 0:
                    d = ema_decay(done)
                    for n, p in params.items():
                        ema[n] = d * ema[n] + (1 - d) * p.detach()
        states.append(dict(model={n: p.detach().clone() for n, p in params.items()}, ema=dict(ema), m=dict(m),
                           v=dict(v), adam_steps=adam_steps, lr=lr, norm=norm, micro_norms=micro_norms,
                           decayed=decayed, names=names))
    return states


# ---- the trainer -------------------------------------------------------------------------------------------


def run_trainer(embedded_data, out_dir, grad_accum: int, clip: float) -> tuple[Trainer, list[dict], dict]:
    """Five steps of the real Trainer.fit(), a checkpoint after each. Returns the trainer, the batches it drew
    and its initial weights (randomized so that every gate, bias and output carries a gradient from step 1)."""
    s = SETTINGS
    cfg = stage_config(
        1, embedded_data, out_dir, "device=cpu", f"seed={s['seed']}", f"train.max_steps={STEPS}",
        f"train.grad_accum={grad_accum}", "train.ckpt_every=1", f"train.keep_checkpoints={STEPS}",
        "train.eval_batches=0", f"train.label_dropout={s['label_dropout']}", "train.prediction=x",
        f"train.timesteps.mean={s['t_mean']}", f"train.timesteps.std={s['t_std']}",
        f"train.timesteps.shift={s['shift']}", f"train.ema.decay={s['ema_decay']}",
        f"train.ema.every={s['ema_every']}", f"train.ema.warmup_steps={s['ema_warmup']}",
        f"train.ema.start_decay={s['ema_start']}", f"optim.lr={s['lr']}", f"optim.warmup_steps={s['warmup']}",
        f"optim.decay_fraction={s['decay_fraction']}", f"optim.betas=[{s['betas'][0]},{s['betas'][1]}]",
        f"optim.eps={s['eps']}", f"optim.weight_decay={s['weight_decay']}", f"optim.grad_clip={clip}",
        "optim.fused=false",
    )
    env = distributed.setup("cpu")
    trainer = Trainer(cfg, env)
    randomize_zero_inits(trainer.model, std=0.05, seed=1)
    trainer.ema.model.load_state_dict(trainer.model.state_dict())
    initial = copy.deepcopy(trainer.model.state_dict())

    seen, source = [], trainer.batches

    def recorded():
        for batch in source:
            seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
            yield batch

    trainer.batches = recorded()
    real_loss, calls = trainer.objective.loss, []

    def loss(*args, **kwargs):
        value = real_loss(*args, **kwargs)
        if not torch.is_grad_enabled():  # a held-out or validation loss, not a training micro-batch
            return value
        calls.append(1)
        return _InfGrad.apply(value) if len(calls) == POISONED_STEP * grad_accum else value

    trainer.objective.loss = loss
    trainer.fit()
    return trainer, seen, initial


WEIGHT_ATOL = 2e-5
"""Weights and EMA, float32 against float64. The float32 gradient differs from the float64 one by up to ~3e-7 here
(the x-prediction's 1 / (1 - t) amplifies the forward's rounding), and Adam's update moves by at most lr x that / eps
per step: with eps = 1e-3 that is ~2e-6 per step (a realistic eps of 1e-8 would turn a gradient element's rounding
into a sign flip of a whole step). The deliberate breaks move weights by 5e-5 and more."""
MOMENT_RTOL = 1e-3
"""Adam's moments, against the largest element of each: the gradients' relative rounding (~1e-4 at most here)."""


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = 0.0, rtol: float = 0.0) -> None:
    bound = atol + rtol * float(expected.abs().max())
    err = float((actual.double() - expected).abs().max())
    assert err <= bound, f"{what}: max error {err:.3g}, allowed {bound:.3g}"


CASES = {
    "one-micro-batch": (1, 1.5),  # the clip active on some steps and not on others
    "two-micro-batches-clipped": (2, 1.0),  # a micro-batch alone exceeds the clip: clipping it early would show
    "two-micro-batches-unclipped": (2, 20.0),  # no step clipped: the accumulation's scale reaches the moments
}


@pytest.mark.slow
@pytest.mark.parametrize(("grad_accum", "clip"), list(CASES.values()), ids=list(CASES))
def test_steps_equal_the_hand_written_step(embedded_data, tmp_path, grad_accum, clip):
    trainer, batches, initial = run_trainer(embedded_data, tmp_path, grad_accum, clip)
    assert len(batches) == STEPS * grad_accum and all(len(b["labels"]) == 8 // grad_accum for b in batches)

    model64 = copy.deepcopy(trainer.model).double().train()
    model64.load_state_dict({k: v.double() for k, v in initial.items()})
    null_label = trainer.model_config.num_classes
    expected = reference_run(model64, batches, grad_accum, clip, null_label)

    # The case reaches what it is for: labels dropped and kept, the poisoned step non-finite, the clip as named.
    dropped = [draws(b, i // grad_accum, i % grad_accum, null_label)[0] for i, b in enumerate(batches)]
    assert any((d == null_label).any() for d in dropped) and any((d != null_label).any() for d in dropped)
    norms = [e["norm"] for e in expected]
    assert not math.isfinite(norms.pop(POISONED_STEP - 1))
    clipped = [n > clip for n in norms]
    if clip == 20.0:
        assert not any(clipped), norms
    else:
        assert any(clipped) and (grad_accum == 2 or not all(clipped)), norms
    if grad_accum == 2 and clip == 1.0:
        alone = [n for i, e in enumerate(expected) if i != POISONED_STEP - 1 for n in e["micro_norms"]]
        assert any(n > clip for n in alone), alone

    ckpts = {checkpoint.step_of(p): checkpoint.load(p) for p in checkpoint.list_checkpoints(tmp_path / "checkpoints")}
    assert sorted(ckpts) == list(range(1, STEPS + 1))
    for step, want in enumerate(expected, start=1):
        got = ckpts[step]
        # The optimizer numbers parameters group by group: the decayed ones, then the rest, each in model order.
        order = [n for n in want["names"] if n in want["decayed"]] + [n for n in want["names"]
                                                                      if n not in want["decayed"]]
        groups = got["optimizer"]["param_groups"]
        assert [g["weight_decay"] for g in groups] == [SETTINGS["weight_decay"], 0.0]
        assert [len(g["params"]) for g in groups] == [len(want["decayed"]), len(order) - len(want["decayed"])]
        # After step `step` the schedule has advanced `step` times (skipped steps included).
        assert all(g["lr"] == pytest.approx(SETTINGS["lr"] * lr_factor(step), rel=1e-12) for g in groups), step
        for name in want["names"]:
            close(got["model"][name], want["model"][name], f"step {step} weight {name}", atol=WEIGHT_ATOL)
            close(got["ema"][name], want["ema"][name], f"step {step} EMA {name}", atol=WEIGHT_ATOL)
        for index, name in enumerate(order):
            moments = got["optimizer"]["state"][index]
            assert float(moments["step"]) == want["adam_steps"], (step, name)
            close(moments["exp_avg"], want["m"][name], f"step {step} first moment {name}", rtol=MOMENT_RTOL)
            close(moments["exp_avg_sq"], want["v"][name], f"step {step} second moment {name}", rtol=MOMENT_RTOL)
    # The skipped step changed nothing that training updates, to the bit.
    before, skipped = ckpts[POISONED_STEP - 1], ckpts[POISONED_STEP]
    assert all(torch.equal(before["model"][n], skipped["model"][n]) for n in before["model"])
    assert all(torch.equal(before["ema"][n], skipped["ema"][n]) for n in before["ema"])
