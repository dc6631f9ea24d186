"""LoRA fine-tuning through the trainer (train.lora, trainer/lora.py): only the adapters train, the base stays bit for
bit what train.init_from holds, checkpoints and adapters hold the adapters alone, a run killed with SIGKILL resumes
to the uninterrupted run's adapters bit for bit, FSDP2 (gloo, 2 ranks) reaches DDP's adapters with no state for the
frozen base, and the memory plan counts the frozen base once.

References: the base checkpoint's own tensors, an uninterrupted run, a DDP run, and hand counts of the adapter
shapes (r x (in + out) per adapted layer)."""

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from core import checkpoint, sharded_checkpoint
from core import lora as core_lora
from tests.stages import stage_config
from tests.test_fsdp import newest, run_ok, stage1_args, torchrun
from tests.test_resume import assert_same_run, checkpoint_step, start, wait_for_checkpoint
from trainer import distributed
from trainer.errors import ConfigError
from trainer.loop import Trainer, train

LORA = ("device=cpu", "train.lora.rank=4", "train.lora.alpha=8")


def lora_config(data: Path, out: Path, base: Path, *extra: str, stage: int = 2):
    return stage_config(stage, data, out, *LORA, f"train.init_from={base}", *extra)


def test_only_the_adapters_train_and_the_base_is_unchanged_bit_for_bit(embedded_data, stage2_checkpoint, tmp_path):
    base = checkpoint.model_weights(checkpoint.load(stage2_checkpoint), "ema")
    cfg = lora_config(embedded_data, tmp_path / "run", stage2_checkpoint, "train.max_steps=4", "train.ckpt_every=4",
                      "optim.warmup_steps=0")
    trainer = Trainer(cfg, distributed.setup("cpu"))
    adapters = core_lora.adapter_parameters(trainer.model)
    in_optimizer = [p for group in trainer.opt.param_groups for p in group["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for p in adapters.values()}  # nothing of the base
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == set(adapters)
    assert trainer.ema.names == list(adapters)
    shared = [n for n, p in trainer.model.named_parameters() if not p.requires_grad]
    ema = dict(trainer.ema.model.named_parameters())
    assert all(ema[n] is p for n, p in trainer.model.named_parameters() if n in shared)  # no second base copy
    summary = trainer.fit()
    assert summary["trainable_parameters"] == sum(p.numel() for p in adapters.values())

    for name, p in trainer.model.named_parameters():
        if not core_lora.is_adapter_parameter(name):
            assert torch.equal(p, base[name.replace(".base_layer", "")]), name
    assert any(torch.count_nonzero(p) for n, p in adapters.items() if ".lora_B." in n)  # the adapters moved
    assert len(trainer.opt.state) == len(adapters)

    ckpt = checkpoint.load(summary["checkpoint"])
    assert set(ckpt["model"]) == set(ckpt["ema"]) == set(adapters)
    assert len(ckpt["optimizer"]["state"]) == len(adapters)
    record = ckpt["metadata"]["lora"]
    assert record["rank"] == 4 and record["alpha"] == 8 and record["base"]["path"] == str(stage2_checkpoint)
    assert record["base"]["fingerprint"] == core_lora.weights_fingerprint(base)
    for which, folder in (("ema", "adapter"), ("raw", "adapter_raw")):
        adapter = core_lora.read_adapter(tmp_path / "run" / folder)
        assert adapter.record.weights == which and adapter.record.step == 4
        source = trainer.ema.model if which == "ema" else trainer.model
        expected = core_lora.to_file_names(core_lora.adapter_parameters(source))
        assert adapter.state.keys() == expected.keys()
        assert all(torch.equal(adapter.state[k], expected[k]) for k in expected)
    with pytest.raises(checkpoint.CheckpointError, match="LoRA training checkpoint.*--lora"):
        checkpoint.load_model(Path(summary["checkpoint"]))


def test_a_resume_needs_the_same_base_and_adapter(embedded_data, stage1_checkpoint, stage2_checkpoint, tmp_path):
    out = tmp_path / "run"
    train(lora_config(embedded_data, out, stage2_checkpoint, "train.max_steps=2"))
    with pytest.raises(ConfigError, match="train.lora.rank > 0 adapts a trained model: set train.init_from"):
        Trainer(stage_config(2, embedded_data, out, *LORA, "train.init_from=null"), distributed.setup("cpu"))
    with pytest.raises(ConfigError, match="trained a LoRA with rank=4, this run has 8"):
        Trainer(lora_config(embedded_data, out, stage2_checkpoint, "train.max_steps=4", "train.lora.rank=8"),
                distributed.setup("cpu"))
    with pytest.raises(ConfigError, match="a LoRA checkpoint and this run is not"):
        Trainer(stage_config(2, embedded_data, out, "device=cpu", f"train.init_from={stage2_checkpoint}",
                             "train.max_steps=4"), distributed.setup("cpu"))
    other = tmp_path / "other-base.pt"  # the same network with other weights
    state = checkpoint.load(stage2_checkpoint)
    state["ema"] = {k: v + 1 for k, v in state["ema"].items()}
    checkpoint.save_atomic(state, other)
    with pytest.raises(ConfigError, match="holds other weights: resume with that base"):
        Trainer(lora_config(embedded_data, out, other, "train.max_steps=4"), distributed.setup("cpu"))
    with pytest.raises(ConfigError, match="is a LoRA training checkpoint"):  # a LoRA run is no base
        Trainer(lora_config(embedded_data, tmp_path / "stacked", out, "train.max_steps=2"), distributed.setup("cpu"))


@pytest.mark.slow
def test_sigkill_then_resume_equals_the_uninterrupted_lora_run(embedded_data, stage1_checkpoint, tmp_path):
    """Stage 1 (a ccDiT, adaLN adapted too) through train_stage1.py: killed just after a checkpoint, resumed (the
    base rebuilt from train.init_from) to the end; checkpoints and adapters equal the uninterrupted run's."""
    import sys

    from tests.stages import ROOT, TINY

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "train_stage1.py", "experiment=embedded", f"embedded_data={embedded_data}",
                f"train.out_dir={out}", *TINY, *LORA, f"train.init_from={stage1_checkpoint}", "train.max_steps=30",
                "train.ckpt_every=3"]

    full, killed = tmp_path / "full", tmp_path / "killed"
    run_ok(cmd(full))
    proc = start(cmd(killed), tmp_path / "killed.log")
    wait_for_checkpoint(proc, killed / "checkpoints", newer_than=3)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    last = checkpoint_step(newest(killed))
    assert last < 30, "the run finished before it was killed"
    proc = subprocess.run(cmd(killed), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"at step {last}" in (killed / "train_stage1.log").read_text()
    a, b = checkpoint.load(newest(full)), checkpoint.load(newest(killed))
    assert a["step"] == b["step"] == 30
    assert_same_run(a, b)  # adapters, EMA, optimizer, history, loader, RNG: all bit for bit
    for folder in ("adapter", "adapter_raw"):
        x, y = core_lora.read_adapter(full / folder).state, core_lora.read_adapter(killed / folder).state
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture
def one_rank():
    env = distributed.setup("cpu", need_group=True)
    yield env
    distributed.teardown()


def test_fsdp_shards_the_frozen_base_with_no_gradient_or_optimizer_state(embedded_data, stage1_checkpoint, tmp_path,
                                                                         one_rank):
    """One rank of FSDP2 with a LoRA: after a step the frozen base's DTensors have no gradient and no optimizer state,
    the adapters both; its sharded checkpoint holds the adapters alone and resumes into a DDP run."""
    cfg = lora_config(embedded_data, tmp_path / "fsdp", stage1_checkpoint, "train.max_steps=2", "train.ckpt_every=2",
                      "train.parallel=fsdp", stage=1)
    trainer = Trainer(cfg, one_rank)
    trainer.start_clock()
    trainer.opt.zero_grad = lambda set_to_none=True: None  # keep the step's gradients to look at them
    trainer.train_step(0)
    for name, p in trainer.model.named_parameters():
        assert type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor", name
        if core_lora.is_adapter_parameter(name):
            assert p.grad is not None and p in trainer.opt.state, name
        else:
            assert p.grad is None and p not in trainer.opt.state, name
    del trainer.opt.zero_grad
    summary = trainer.fit()
    dcp = Path(summary["checkpoint"])
    assert checkpoint.is_sharded(dcp)
    stored = {k for k in sharded_checkpoint.sharded_keys(dcp) if k.startswith(("model.", "ema."))}
    assert stored and all(core_lora.is_adapter_parameter(k) for k in stored), sorted(stored)[:3]
    plain = Trainer(lora_config(embedded_data, tmp_path / "ddp", stage1_checkpoint, "train.max_steps=3",
                                f"train.resume={dcp}", stage=1), one_rank)
    for name, p in core_lora.adapter_parameters(plain.model).items():
        assert torch.equal(p, core_lora.adapter_parameters(trainer.model)[name].full_tensor()), name


@pytest.mark.slow
def test_fsdp_lora_reaches_the_adapters_ddp_reaches(embedded_data, stage1_checkpoint, tmp_path):
    """2 ranks x 2 micro-batches, 3 steps: FSDP2's adapters equal DDP's to 1e-6 (another order of fp32 sums, as
    tests/test_fsdp.py measures for full training); the base is the checkpoint's in both."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    common = (*LORA, f"train.init_from={stage1_checkpoint}", "train.max_steps=3", "train.ckpt_every=3",
              "train.grad_accum=2", "optim.warmup_steps=0")
    run_ok(torchrun(2, "train_stage1.py", *stage1_args(embedded_data, ddp, *common)))
    run_ok(torchrun(2, "train_stage1.py", *stage1_args(embedded_data, fsdp, *common, "train.parallel=fsdp")))
    for folder in ("adapter", "adapter_raw"):
        x, y = core_lora.read_adapter(ddp / folder).state, core_lora.read_adapter(fsdp / folder).state
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(y[k], x[k], rtol=0, atol=1e-6, msg=k)
        assert any(torch.count_nonzero(v) for k, v in x.items() if ".lora_B." in k)


def test_the_memory_plan_counts_the_frozen_base_once(embedded_data):
    """Hand counts: a rank-r adapter on a linear of in x out adds r (in + out) parameters; gradients, AdamW and the
    EMA are the adapters' alone, the base is weights only (2 bytes with bf16 compute)."""
    from models import build_model
    from planner.plan import data_shape, make_plan, plan_model_config

    cfg = stage_config(2, embedded_data, Path("unused"), "train.lora.rank=4", "precision.compute=bf16")
    mcfg = plan_model_config(cfg, data_shape(cfg))
    with torch.device("meta"):
        model = build_model(mcfg)
    targets = core_lora.default_targets(mcfg)
    layers = [m for n, m in model.named_modules() if any(n.endswith("." + t) for t in targets)]
    trainable = sum(4 * (m.in_features + m.out_features) for m in layers)
    frozen = sum(p.numel() for p in model.parameters())
    for gpus, parallel in ((1, "ddp"), (4, "fsdp")):
        cfg.train.parallel = parallel
        rows = {r.name.split(" (")[0]: r.bytes for r in make_plan(cfg, gpus).state_rows}
        share = -(-trainable // (1 if parallel == "ddp" else gpus))
        base = 2 * -(-frozen // (1 if parallel == "ddp" else gpus))
        assert rows["parameters"] == 4 * share + base
        assert rows["gradients"] == 4 * share and rows["optimizer"] == 8 * share
        assert rows["EMA"] == 4 * share + (base if parallel == "fsdp" else 0)
