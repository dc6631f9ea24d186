"""FSDP2 / HSDP and sharded checkpoints on the CPU (gloo), as torchrun runs them (trainer/parallel.py,
trainer/state.py, trainer/checkpoint.py, core/sharded_checkpoint.py, trainer/consolidate.py).

The references are independent of the code under test: DDP's weights (the reference setting), the single-file
checkpoint a DDP run writes, and checkpoints compared bit for bit. Runs on 2 ranks unless the test is about 4."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core import checkpoint, sharded_checkpoint
from tests.stages import ROOT, TINY, stage_config
from tests.test_resume import assert_identical
from trainer import distributed
from trainer.checkpoint import continue_loader
from trainer.consolidate import consolidate
from trainer.consolidate import main as consolidate_main
from trainer.errors import ConfigError
from trainer.loop import Trainer, train

ENV = dict(os.environ, HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
WORKER = str(ROOT / "tests" / "parallel_worker.py")


def torchrun(nproc: int, script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]


def stage1_args(data: Path, out: Path, *extra: str) -> list[str]:
    # device=cpu: gloo on the CPU even where CUDA is present (several ranks need not find several GPUs).
    return ["experiment=embedded", f"embedded_data={data}", *TINY, "device=cpu", "data.num_workers=0",
            f"train.out_dir={out}", *extra]


def run_ok(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV | env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def newest(out: Path) -> Path:
    found = checkpoint.newest(out)
    assert found is not None, f"no checkpoint in {out}"
    return found


def without_out_dir(state: dict) -> dict:
    config = dict(state["config"], train=dict(state["config"]["train"], out_dir=None))
    return dict(state, config=config)


@pytest.fixture
def one_rank():
    """A process group of one (what train.parallel=fsdp makes without torchrun), torn down after the test."""
    env = distributed.setup("cpu", need_group=True)
    yield env
    distributed.teardown()


# ---- FSDP against DDP ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fsdp_reaches_the_weights_ddp_reaches_with_accumulation_and_clipping(embedded_data, tmp_path):
    """2 ranks x 2 micro-batches, 4 steps, the global norm clipped at 1 (the norms are above it), FSDP with
    activation checkpointing. Not bit for bit: FSDP reduce-scatters each micro-batch's gradients and adds them up
    sharded, DDP adds them up locally and all-reduces once, so fp32 sums run in another order (measured 6e-8 on
    the weights after 4 steps); 1e-6 is an order above that and three below what training moves (asserted)."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    common = ("train.max_steps=4", "train.ckpt_every=4", "train.grad_accum=2")
    run_ok(torchrun(2, "train_stage1.py", *stage1_args(embedded_data, ddp, *common)))
    run_ok(torchrun(2, "train_stage1.py", *stage1_args(embedded_data, fsdp, *common, "train.parallel=fsdp",
                                                       "train.activation_checkpointing=true")))
    reference, dcp_dir = checkpoint.load(newest(ddp)), newest(fsdp)
    assert dcp_dir.name == "step_00000004.dcp" and checkpoint.is_sharded(dcp_dir)
    # Really sharded: every weight of more than one row was written as two chunks, one per rank.
    metadata = sharded_checkpoint._reader(dcp_dir).read_metadata()
    rows = {k: m for k, m in metadata.state_dict_metadata.items() if k.startswith("model.") and m.size[0] > 1}
    assert rows and all(len(m.chunks) == 2 for m in rows.values())
    sharded = consolidate(dcp_dir)

    for key in ("model", "ema"):
        assert sharded[key].keys() == reference[key].keys()
        for name, value in reference[key].items():
            torch.testing.assert_close(sharded[key][name], value, rtol=0, atol=1e-6, msg=f"{key}.{name}")
    ours, theirs = sharded["optimizer"], reference["optimizer"]
    assert ours["param_groups"] == theirs["param_groups"] and ours["state"].keys() == theirs["state"].keys()
    for i, moments in theirs["state"].items():
        assert torch.equal(ours["state"][i]["step"], moments["step"])
        for m in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours["state"][i][m], moments[m], rtol=0, atol=1e-6)
    assert sharded["history"] == pytest.approx(reference["history"], rel=1e-6, abs=0)
    assert sharded["scheduler"] == reference["scheduler"] and sharded["step"] == reference["step"] == 4

    norms = [json.loads(line).get("train/grad_norm") for line in (fsdp / "metrics.jsonl").read_text().splitlines()]
    assert max(n for n in norms if n is not None) > 1.0  # clipping acted on these steps
    init = build_initial_model(embedded_data, tmp_path)
    assert max((sharded["model"][k] - v).abs().max().item() for k, v in init.items()) > 1e-3


def build_initial_model(data: Path, tmp_path: Path) -> dict:
    """The weights both runs started from (the seed's initialisation), for the 'training moved them' check."""
    from models import build_model
    from trainer import builders

    cfg = stage_config(1, data, tmp_path / "init", "device=cpu")
    spec = builders.read_data_spec(cfg)
    conditioning = builders.build_conditioning(cfg, spec, torch.device("cpu"), torch.float32)
    torch.manual_seed(cfg.seed)
    return build_model(builders.build_model_config(cfg, spec, conditioning, None)).state_dict()


# ---- consolidation ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_rank_fsdp_consolidates_to_what_ddp_saves_bit_for_bit(embedded_data, tmp_path, capsys):
    """On one rank FSDP's collectives are copies, so its sharded checkpoint, consolidated, is the file a plain run
    writes, tensor for tensor and key for key (the config's train.parallel aside); the CLI writes it, a tool loads
    it, a DDP run resumes from it."""
    args = ("device=cpu", "train.max_steps=3", "train.ckpt_every=3")
    plain = train(stage_config(1, embedded_data, tmp_path / "plain", *args))
    sharded = train(stage_config(1, embedded_data, tmp_path / "fsdp", *args, "train.parallel=fsdp"))
    assert Path(sharded["checkpoint"]).name == "step_00000003.dcp"
    reference = checkpoint.load(plain["checkpoint"])

    out = tmp_path / "consolidated.pt"
    assert consolidate_main([str(tmp_path / "fsdp"), "--out", str(out)]) == 0
    state = checkpoint.load(out)
    assert state["config"]["train"]["parallel"] == "fsdp"
    state["config"]["train"]["parallel"] = "ddp"
    assert_identical(without_out_dir(state), without_out_dir(reference))

    model, meta = checkpoint.load_model(out)  # what app/sample.py, the evaluation and reparameterize.py call
    assert meta["name"] == "ccDiT-debug/4" and all(torch.equal(p, reference["ema"][n])
                                                   for n, p in model.state_dict().items())
    light = tmp_path / "weights.pt"
    assert consolidate_main([str(Path(sharded["checkpoint"])), "--out", str(light), "--weights-only"]) == 0
    assert "optimizer" not in checkpoint.load(light) and light.stat().st_size < 0.6 * out.stat().st_size
    assert consolidate_main([str(tmp_path / "fsdp"), "--out", str(out)]) == 2  # exists: --force needed
    assert consolidate_main([plain["checkpoint"], "--out", str(tmp_path / "x.pt")]) == 2  # already one file
    assert "exists" in capsys.readouterr().err

    resumed = train(stage_config(1, embedded_data, tmp_path / "fsdp", "device=cpu", "train.max_steps=4",
                                 "train.ckpt_every=4", "train.checkpoint_format=file", f"train.resume={out}"))
    assert checkpoint.load(resumed["checkpoint"])["history"][:3] == reference["history"]


@pytest.mark.slow
def test_a_sharded_run_starts_the_next_stage(embedded_data, tmp_path):
    """train.init_from reads a sharded run folder's newest checkpoint: the next stage starts from its EMA."""
    stage2 = train(stage_config(2, embedded_data, tmp_path / "s2", "device=cpu", "train.init_from=null",
                                "train.max_steps=2", "train.parallel=fsdp", "train.eval_batches=0"))
    ema = consolidate(Path(stage2["checkpoint"]), weights_only=True)["ema"]
    captured = {}
    real = Trainer._build_data

    def capture(self):  # the weights the stage starts from, before its first step
        captured.update({k: v.clone() for k, v in self.model.state_dict().items()})
        real(self)

    Trainer._build_data = capture
    try:
        train(stage_config(3, embedded_data, tmp_path / "s3", "device=cpu", f"train.init_from={tmp_path / 's2'}",
                           "train.max_steps=1", "train.eval_batches=0"))
    finally:
        Trainer._build_data = real
    assert captured.keys() == ema.keys() and all(torch.equal(captured[k], ema[k]) for k in ema)


@pytest.mark.slow
def test_fp8_scaling_state_goes_through_a_sharded_checkpoint(embedded_data, tmp_path, monkeypatch):
    """te.Linear (the CPU stand-in, tests/te_standin.py) under FSDP2 with delayed scaling, the one recipe with a
    scaling state: the sharded checkpoint keeps the weights in the plain layout and the scaling state beside them
    (meta.pt), a resume into FP8 that opted in to TE's unpickling continues each layer's state (its forward count goes
    on), and the consolidated file is what every consumer reads."""
    from tests import te_standin

    te_standin.install(monkeypatch)
    monkeypatch.setenv(te_standin.UNSAFE_PICKLE_ENV, "1")
    args = ("precision=fp8", "precision.fp8_recipe=delayed", "precision.fuse_wgrad_accumulation=false", "device=cpu",
            "train.batch_size=16", "train.parallel=fsdp", "train.eval_batches=0")
    first = train(stage_config(1, embedded_data, tmp_path, *args, "train.max_steps=2"))
    saved = consolidate(Path(first["checkpoint"]))
    assert not [k for k in saved["model"] if k.endswith("_extra_state")]
    calls = {k: te_standin.saved_forwards(v) for k, v in saved["te_extra_state"]["model"].items()}
    assert calls and all(c > 0 for c in calls.values())
    train(stage_config(1, embedded_data, tmp_path, *args, "train.max_steps=3"))
    resumed = consolidate(newest(tmp_path))["te_extra_state"]["model"]
    assert all(te_standin.saved_forwards(resumed[k]) > c for k, c in calls.items())
    monkeypatch.undo()
    model, _ = checkpoint.load_model(checkpoint.save_atomic(saved, tmp_path / "one.pt") or tmp_path / "one.pt")
    assert all(torch.equal(p, saved["ema"][n]) for n, p in model.state_dict().items())


# ---- evaluation on cadence ----------------------------------------------------------------------------------


def run_or_kill(cmd: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    """`cmd` to the end, or, past `timeout` seconds (a collective that never completes), every process it started
    killed and the test failed with what the ranks had printed."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV | env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in process_tree(proc.pid):
            os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"no end after {timeout} s (a collective some rank never joined?):\n{out[-2000:]}\n{err[-4000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-3000:]}\n{err[-6000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_evaluation_on_cadence_over_3_fsdp_ranks_with_batches_that_do_not_divide(embedded_data, tmp_path):
    """A sharded forward is a collective (FSDP2 all-gathers each block's weights), so every rank must run as many
    forwards as the others. 3 ranks, 4 held-out batches (8 records in batches of 2: 2, 1 and 1 per rank) and a FID
    of 7 samples in batches of 2 (ranks hold 3, 2 and 2 samples: 2, 1 and 1 batches): the ranks with fewer
    batches run a stand-in whose result is dropped. The run ends (it used to hang), and what it logs equals one
    process evaluating the consolidated checkpoint alone (the reference: no ranks, no stand-ins)."""
    import numpy as np

    from app.pipeline import load_pipeline
    from evaluation.embedded import real_scenes
    from evaluation.metrics import extract, fit_gaussian, frechet_distance
    from evaluation.sample_many import class_label
    from evaluation.scene_encoder import load_scene_encoder
    from evaluation.val_loss import ValidationLoss
    from flow.rectified_flow import RectifiedFlow

    real, _, _ = real_scenes(12, 32)
    np.savez(tmp_path / "ref.npz", arr_0=real)
    held, out = embedded_data / "synthetic-32" / "shards-labels", tmp_path / "run"
    run_or_kill(torchrun(3, "train_stage1.py", *stage1_args(
        embedded_data, out, "train.max_steps=2", "train.batch_size=6", "train.parallel=fsdp", "train.eval.every=2",
        f"train.eval.data={held}", "train.eval.samples=8", "train.eval.batch_size=2", "train.eval.bins=2",
        "train.eval.fid_samples=7", f"train.eval.fid_reference={tmp_path / 'ref.npz'}",
        "train.eval.fid_features=scene", "train.eval_batches=0")), timeout=240)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in rows if "val/loss" in r)

    single = tmp_path / "final.pt"
    assert consolidate_main([str(newest(out)), "--out", str(single)]) == 0
    state = checkpoint.load(single)
    pipe = load_pipeline(single, device="cpu")
    objective = RectifiedFlow.from_config(state["config"]["train"]["timesteps"], "x", pipe.model.config.base_grid,
                                          pipe.model.config.patch)
    alone = ValidationLoss.from_shards(held, pipe.conditioning, objective, 8, 2, bins=2, seed=state["config"]["seed"])
    assert len(alone.batches) == 4
    for key, value in alone(pipe.model).items():
        assert logged[key] == pytest.approx(value, rel=1e-5), key

    p = state["config"]["train"]["preview"]
    seed = state["config"]["seed"]
    images = pipe.generate(labels=[class_label(seed, i, 4, "uniform") for i in range(7)],
                           seeds=[seed + i for i in range(7)], steps=p["steps"], cfg_scale=p["cfg_scale"],
                           alpha=p["alpha"]).numpy()
    encoder = load_scene_encoder()
    expected = frechet_distance(fit_gaussian(extract(images, encoder)["pool"]),
                                fit_gaussian(extract(real, encoder)["pool"]))
    assert logged["fid/fid"] == pytest.approx(expected, rel=1e-4)


# ---- resharding ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_saved_on_4_ranks_resumes_on_2_and_on_1_with_equal_states(embedded_data, tmp_path):
    """HSDP on 4 ranks (2 replicas x 2 shards, 2 micro-batches: the all-reduce across replicas on the second only)
    saves at step 2, and reaches DDP's weights on 4 ranks (to 1e-6, as FSDP does). FSDP on 2 ranks and DDP in one
    process resume it: what each holds once resumed, gathered into the single-file form, is the checkpoint
    consolidated, bit for bit (weights, EMA, optimizer moments and groups, schedule, step and history), and each
    continues the data at the same global sample count (2 steps x batch 8 = 16)."""
    saved, ddp = tmp_path / "hsdp4", tmp_path / "ddp4"
    common = ("train.max_steps=2", "train.ckpt_every=2", "train.grad_accum=2")
    run_ok(torchrun(4, "train_stage1.py", *stage1_args(embedded_data, saved, *common, "train.parallel=hsdp",
                                                       "train.hsdp_shard_size=2")))
    run_ok(torchrun(4, "train_stage1.py", *stage1_args(embedded_data, ddp, *common)))
    dcp_dir = newest(saved)
    assert len(list(dcp_dir.glob("rank_*.pt"))) == 4
    expected, reference = consolidate(dcp_dir), checkpoint.load(newest(ddp))
    for key in ("model", "ema"):
        for name, value in reference[key].items():
            torch.testing.assert_close(expected[key][name], value, rtol=0, atol=1e-6, msg=f"{key}.{name}")
    tensors = ("model", "ema", "optimizer", "scheduler", "step", "history", "bad_in_row", "extra")

    dump = tmp_path / "fsdp2.pt"
    resume = (f"train.resume={dcp_dir}", "train.max_steps=2")  # the saved schedule: a resume takes this config's
    run_ok(torchrun(2, WORKER, "train_stage1.py", *stage1_args(embedded_data, tmp_path / "fsdp2", *resume,
                                                               "train.parallel=fsdp")),
           RFDIT_TEST_MODE="dump", RFDIT_TEST_OUT=str(dump))
    held = torch.load(dump, weights_only=True)
    assert_identical({k: held["state"][k] for k in tensors}, {k: expected[k] for k in tensors}, "fsdp on 2")
    assert (held["world_size"], held["start_sample"]) == (2, 8)

    cfg = stage_config(1, embedded_data, tmp_path / "ddp1", "device=cpu", *resume)
    alone = Trainer(cfg, distributed.setup("cpu"))
    state = alone.state.file_state()
    assert_identical({k: state[k] for k in tensors}, {k: expected[k] for k in tensors}, "ddp on 1")
    assert alone.loader.dataset.start_sample == 16


def test_the_data_continues_at_the_same_global_sample_count_on_another_world_size(embedded_data):
    from data.loader import ShardDataset

    shards = embedded_data / "synthetic-32" / "shards-labels"
    four = ShardDataset(shards, rank=1, world_size=4, batch_size=2, verify_checksum=False)
    saved = four.state_at(14)  # 7 steps of 2 samples on each of 4 ranks: 56 in all
    assert continue_loader(saved, 4, 0, 2) is saved
    for world in (2, 1):
        moved = continue_loader(saved, world, 0, 8 // world)
        data = ShardDataset(shards, rank=0, world_size=world, batch_size=8 // world, verify_checksum=False)
        data.load_state_dict(moved)
        assert data.start_sample * world == 56


# ---- kills --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_during_an_fsdp_run_then_resume_equals_the_uninterrupted_run(embedded_data, tmp_path):
    """kill -9 of every rank just after a checkpoint lands, then a resume to the end: the final sharded checkpoint
    is the uninterrupted run's, bit for bit (the DCP tensors, meta.pt and both rank files)."""
    run = ("train.max_steps=24", "train.ckpt_every=3", "train.parallel=fsdp", "train.eval_batches=0")
    full, killed = tmp_path / "full", tmp_path / "killed"
    with open(tmp_path / "full.log", "wb") as log:  # alongside, uninterrupted
        reference = subprocess.Popen(torchrun(2, "train_stage1.py", *stage1_args(embedded_data, full, *run)),
                                     cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(torchrun(2, "train_stage1.py", *stage1_args(embedded_data, killed, *run)), cwd=ROOT,
                                env=ENV, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not checkpoint.list_checkpoints(killed / "checkpoints"):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-4000:]
        time.sleep(0.01)
    for pid in process_tree(proc.pid):  # the ranks (torchrun starts them in sessions of their own) and torchrun
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    kill_step = checkpoint.step_of(newest(killed))
    assert kill_step < 24, "the run finished before it was killed"
    run_ok(torchrun(2, "train_stage1.py", *stage1_args(embedded_data, killed, *run)))
    assert reference.wait(timeout=300) == 0, (tmp_path / "full.log").read_text()[-4000:]
    assert re.findall(r"resumed from \S+ at step (\d+)", (killed / "train_stage1.log").read_text()) == [
        str(kill_step)]

    a, b = newest(full), newest(killed)
    assert a.name == b.name == "step_00000024.dcp"
    assert_identical(sharded_checkpoint.read_full(a), sharded_checkpoint.read_full(b), "dcp")
    assert_identical(without_out_dir(checkpoint.load(a / sharded_checkpoint.META)),
                     without_out_dir(checkpoint.load(b / sharded_checkpoint.META)), "meta.pt")
    for rank in (0, 1):
        name = sharded_checkpoint.rank_file(rank)
        assert_identical(checkpoint.load(a / name), checkpoint.load(b / name), name)


@pytest.mark.slow
def test_a_kill_during_a_sharded_save_leaves_the_previous_checkpoint(embedded_data, tmp_path, caplog):
    """Rank 1 dies half way through writing its shard of the second checkpoint: the first is still the newest
    complete one and loads; the half-written one is only a partial folder, which the resumed run removes."""
    out = tmp_path / "run"
    args = stage1_args(embedded_data, out, "train.max_steps=6", "train.ckpt_every=2", "train.parallel=fsdp")
    proc = subprocess.run(torchrun(2, WORKER, "train_stage1.py", *args), cwd=ROOT,
                          env=ENV | dict(RFDIT_TEST_MODE="die-in-save"), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stderr[-4000:]
    ckpt_dir = out / "checkpoints"
    assert [p.name for p in checkpoint.list_checkpoints(ckpt_dir)] == ["step_00000002.dcp"]
    partial = ckpt_dir / ".step_00000004.dcp.partial"
    assert partial.is_dir() and not (ckpt_dir / "step_00000004.dcp").exists()
    good = consolidate(ckpt_dir / "step_00000002.dcp")
    assert good["step"] == 2 and len(good["history"]) == 2

    with caplog.at_level("INFO", logger="trainer.loop"):  # in-process, one rank: resharded from 2
        summary = train(stage_config(1, embedded_data, out, "device=cpu", "train.max_steps=6", "train.ckpt_every=2",
                                     "train.parallel=fsdp"))
    assert re.findall(r"resumed from \S+ at step (\d+)", caplog.text) == ["2"]
    assert summary["steps"] == 6 and Path(summary["checkpoint"]).name == "step_00000006.dcp"
    assert consolidate(Path(summary["checkpoint"]))["history"][:2] == good["history"]
    assert not partial.exists()


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (read from /proc), deepest first: what this test started."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree[::-1]


# ---- asynchronous saves -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_asynchronous_save_holds_the_state_of_its_step(embedded_data, tmp_path):
    """dcp.async_save copies the tensors before the next step changes them: every checkpoint of an asynchronous
    run is the synchronous run's, bit for bit, and the last one is complete when the run returns."""
    args = ("device=cpu", "train.max_steps=4", "train.ckpt_every=1", "train.keep_checkpoints=4",
            "train.parallel=fsdp", "train.eval_batches=0")
    train(stage_config(1, embedded_data, tmp_path / "sync", *args))
    summary = train(stage_config(1, embedded_data, tmp_path / "async", *args, "train.async_checkpoint=true"))
    assert Path(summary["checkpoint"]).name == "step_00000004.dcp"
    a, b = checkpoint.list_checkpoints(tmp_path / "sync" / "checkpoints"), checkpoint.list_checkpoints(
        tmp_path / "async" / "checkpoints")
    assert [p.name for p in a] == [p.name for p in b] == [f"step_{s:08d}.dcp" for s in range(1, 5)]
    for pa, pb in zip(a, b, strict=True):
        assert_identical(sharded_checkpoint.read_full(pa), sharded_checkpoint.read_full(pb), pa.name)
        sa, sb = (without_out_dir(checkpoint.load(p / sharded_checkpoint.META)) for p in (pa, pb))
        sb["config"]["train"]["async_checkpoint"] = False
        assert_identical(sa, sb, f"{pa.name} meta")
    assert not list((tmp_path / "async" / "checkpoints").glob(".*"))  # nothing partial left behind


# ---- the fast path's order, refusals, safety ----------------------------------------------------------------


@pytest.mark.slow
def test_checkpointing_then_compile_then_shard_keeps_names_and_gradients(one_rank):
    """trainer/parallel.py's order on a model: every block checkpointed, compiled in place and then sharded (an
    FSDP module), names unchanged; with checkpointing under FSDP the gradients are the plain model's (float64)."""
    from torch.distributed.fsdp import FSDPModule

    from models import build_model
    from tests.helpers import randomize_zero_inits, text_inputs
    from trainer.fast_path import apply_compile, checkpoint_blocks
    from trainer.parallel import Parallel, local

    plain = build_model("mmDiT-debug/4").double()
    randomize_zero_inits(plain)
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64), torch.rand(2, generator=gen).double()
    text, mask = text_inputs(plain.config, 2, [4, 16])
    inputs = (x, t, text.double(), mask)
    plain(*inputs).square().mean().backward()
    reference = {n: p.grad.clone() for n, p in plain.named_parameters()}

    compiled, sharded = build_model("mmDiT-debug/4"), build_model("mmDiT-debug/4").double()
    sharded.load_state_dict(plain.state_dict())
    names = [n for n, _ in sharded.named_parameters()]
    parallel = Parallel("fsdp", one_rank, bf16=False)
    for model, compile_how in ((compiled, "block"), (sharded, False)):
        checkpoint_blocks(model)
        parallel.wrap(apply_compile(model, compile_how))
        for block in model.blocks:
            assert isinstance(block, FSDPModule) and block.forward.__func__.__name__ == "_checkpointed_forward"
        assert isinstance(model, FSDPModule) and [n for n, _ in model.named_parameters()] == names
    assert all(block._compiled_call_impl is not None for block in compiled.blocks)
    sharded(*inputs).square().mean().backward()
    for n, p in sharded.named_parameters():
        torch.testing.assert_close(local(p.grad), reference[n], rtol=1e-10, atol=1e-12, msg=n)


def test_what_sharding_refuses(one_rank, embedded_data, tmp_path):
    from trainer.parallel import Parallel

    fsdp = Parallel("fsdp", one_rank, bf16=False)
    with pytest.raises(ConfigError, match="train.compile=block"):
        fsdp.check(True, fused_wgrad=False)
    with pytest.raises(ConfigError, match="precision.fuse_wgrad_accumulation=false"):
        fsdp.check("block", fused_wgrad=True)
    with pytest.raises(ConfigError, match="train.parallel='zero3'"):
        Parallel("zero3", one_rank, bf16=False)
    with pytest.raises(ConfigError, match="train.hsdp_shard_size=2: must divide the world size 1"):
        Parallel("hsdp", one_rank, bf16=False, shard_size=2)
    cfg = stage_config(1, embedded_data, tmp_path, "device=cpu", "train.async_checkpoint=true")
    with pytest.raises(ConfigError, match="train.checkpoint_format=sharded"):
        Trainer(cfg, one_rank)


def test_a_sharded_checkpoint_never_unpickles_code(tmp_path, one_rank):
    """DCP's .metadata is a pickle: one that names anything but DCP's records is refused before it runs, and a
    checkpoint holding non-tensor DCP entries (which DCP would unpickle freely) is refused."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "step_00000001.dcp"
    dcp.save({"model": {"w": torch.ones(2)}, "note": "text"}, checkpoint_id=folder)
    with pytest.raises(checkpoint.CheckpointError, match="non-tensor entries"):
        sharded_checkpoint.read_full(folder)

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    (folder / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(checkpoint.CheckpointError, match="is not part of a checkpoint's metadata"):
        sharded_checkpoint.read_full(folder)
    assert not (tmp_path / "ran").exists()
