"""The trainer's bf16 path, run on a CPU (precision=bf16 with precision.bf16_on_cpu=true): the forward computes in
bf16 under autocast, while the master weights, their gradients, the optimizer state, the EMA, the loss and the
checkpoint stay fp32; the loss and the gradients equal the fp32 run's to bf16's precision.

The same Stage-1 and Stage-2 configs are trained twice, in fp32 and in bf16, by the real Trainer.fit(). Both start
from the same weights and draw the same batches, noise, times and dropout (seeded per step), so their first step
sees the same inputs and only the arithmetic's precision differs."""

import pytest
import torch
from torch import nn

from core import checkpoint
from tests.helpers import randomize_zero_inits
from tests.stages import stage_config
from trainer import distributed
from trainer.loop import Trainer
from trainer.precision import Precision

BF16_EPS = 2.0**-8
"""bf16's unit roundoff (8 significant bits): one rounding moves a value by up to this much, relatively."""
LOSS_RTOL = BF16_EPS
"""The loss, a mean over the batch: its roundings average out (1e-4 relative here)."""
GRAD_RTOL = 4 * BF16_EPS
"""The whole gradient, in the relative L2 norm (3e-3 here). A bf16 forward and backward round at every matmul, and
the x-prediction's 1 / (1 - t) (up to 20) amplifies the output's rounding; what this bound must tell apart is a
gradient of other weights, inputs or draws, which is off by O(1)."""


def run(embedded_data, out_dir, stage: int, precision: str) -> dict:
    """Two steps of `stage` in `precision` (bf16: on this CPU), with one checkpoint. Returns what the trainer's own
    path saw: the linear layers' output dtypes, the loss and its dtype, and the first step's gradients."""
    args = [f"precision={precision}", "precision.bf16_on_cpu=true", "device=cpu", "train.max_steps=2",
            "train.ckpt_every=2", "train.eval_batches=0", "train.label_dropout=0.25", "train.caption_dropout=0.25"]
    if stage == 2:
        args.append("train.init_from=null")
    trainer = Trainer(stage_config(stage, embedded_data, out_dir, *args), distributed.setup("cpu"))
    randomize_zero_inits(trainer.model, std=0.05, seed=1)  # gates open: every weight gets a gradient at step 1
    trainer.ema.model.load_state_dict(trainer.model.state_dict())

    seen = dict(linear_dtypes=set(), losses=[], grads=[])
    hooks = [m.register_forward_hook(lambda m, args, out: seen["linear_dtypes"].add(out.dtype))
             for m in trainer.model.modules() if isinstance(m, nn.Linear)]
    real_loss, real_clip = trainer.objective.loss, trainer.parallel.clip

    def loss(*args, **kwargs):
        value = real_loss(*args, **kwargs)
        seen["losses"].append(value.detach())
        return value

    def clip(parameters, max_norm):  # between the backward and the optimizer step: the step's gradients
        parameters = list(parameters)
        seen["grads"].append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
        return real_clip(parameters, max_norm)

    trainer.objective.loss, trainer.parallel.clip = loss, clip
    try:
        trainer.fit()
    finally:
        for hook in hooks:
            hook.remove()
    seen["trainer"] = trainer
    seen["checkpoint"] = checkpoint.load(checkpoint.newest(out_dir))
    return seen


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.double().flatten() for g in grads.values()])


# torch's CPU rms_norm warns that a bf16 input with an fp32 weight takes its unfused kernel: autocast leaves the
# q/k norms' weights fp32 (the master weights), which is the point here.
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning")
@pytest.mark.parametrize("stage", [1, 2], ids=["class-ccdit", "text-mmdit"])
def test_bf16_on_cpu_computes_in_bf16_over_fp32_weights(embedded_data, tmp_path, stage):
    fp32 = run(embedded_data, tmp_path / "fp32", stage, "fp32")
    bf16 = run(embedded_data, tmp_path / "bf16", stage, "bf16")
    assert fp32["trainer"].precision.bf16 is False and bf16["trainer"].precision.bf16 is True

    # The forward ran in bf16 (every linear layer's output), and in fp32 without the flag.
    assert bf16["linear_dtypes"] == {torch.bfloat16}
    assert fp32["linear_dtypes"] == {torch.float32}
    # The loss is fp32 (flow/objective.py computes it from an upcast output) and equal to bf16's precision.
    assert {v.dtype for v in bf16["losses"]} == {torch.float32}
    first32, first16 = float(fp32["losses"][0]), float(bf16["losses"][0])
    assert first16 == pytest.approx(first32, rel=LOSS_RTOL)
    # The first step's gradients (same weights, same inputs): fp32 on fp32 master weights, equal to bf16's precision.
    g32, g16 = fp32["grads"][0], bf16["grads"][0]
    assert g16.keys() == g32.keys() and all(g.dtype == torch.float32 for g in g16.values())
    assert all(g.abs().sum() > 0 for g in g32.values())
    diff = float((_flat(g16) - _flat(g32)).norm() / _flat(g32).norm())
    assert diff < GRAD_RTOL, diff
    assert diff > 0  # it did compute in another precision

    # Master weights, optimizer moments and EMA stay fp32 in memory and in the checkpoint.
    trainer = bf16["trainer"]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert all(p.dtype == torch.float32 for p in trainer.ema.model.parameters())
    moments = [v for s in trainer.opt.state.values() for v in s.values() if v.is_floating_point() and v.ndim]
    assert moments and all(v.dtype == torch.float32 for v in moments)
    saved = bf16["checkpoint"]
    for key in ("model", "ema"):
        assert all(v.dtype == torch.float32 for v in saved[key].values() if v.is_floating_point()), key
    assert all(v.dtype == torch.float32 for s in saved["optimizer"]["state"].values() for k, v in s.items()
               if k != "step")
    assert saved["config"]["precision"]["compute"] == "bf16" and saved["config"]["precision"]["bf16_on_cpu"]


def test_bf16_stays_fp32_on_a_cpu_unless_asked(caplog):
    from omegaconf import OmegaConf

    from trainer.config import PrecisionSection

    cfg = OmegaConf.structured(PrecisionSection(compute="bf16", fp8=False))
    with caplog.at_level("INFO", logger="trainer.precision"):
        default = Precision(cfg, torch.device("cpu"))
    assert not default.bf16 and default.model_dtype == torch.float32
    assert "precision.bf16_on_cpu=true" in caplog.text
    with default.forward():
        assert not torch.is_autocast_enabled("cpu")
    asked = Precision(OmegaConf.merge(cfg, dict(bf16_on_cpu=True)), torch.device("cpu"))
    assert asked.bf16 and asked.model_dtype == torch.bfloat16
    with asked.forward():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    fp32 = Precision(OmegaConf.merge(cfg, dict(compute="fp32", bf16_on_cpu=True)), torch.device("cpu"))
    assert not fp32.bf16  # the flag turns nothing on by itself
