"""The one training loop behind every train_stageN.py: a `Trainer` that owns the run's state, and its `fit()`.

    for each step: micro-batches (forward and loss under autocast, backward; DDP syncs on the last only)
                   -> clip -> guarded optimizer step -> EMA;  log, preview and checkpoint on cadence

It runs as one plain process or under torchrun (trainer/distributed.py), with DDP, FSDP2 or HSDP
(train.parallel: trainer/parallel.py). What differs between stages is config: the data (labels or captions), the
model family, the weights a stage starts from (train.init_from).

Determinism. Every random draw of a step (label or caption dropout, then the objective's noise and times:
flow/rectified_flow.py) comes from a generator seeded by (seed, step, virtual rank), virtual rank = rank *
grad_accum + micro-batch. So the draws do not depend on anything a run carries in memory: a resumed run replays
exactly the draws the uninterrupted run made, and 2 ranks x 1 micro-batch see the same draws as 1 rank x 2
micro-batches (with the loader's matching split: data/loader.py gives slot s = rank * workers + worker).

Host syncs. A step's decisions are taken without reading a value back from the device where that is safe:
the skip of a non-finite step follows the global gradient norm (after the DDP all-reduce it is the same number on
every rank, so no collective is needed), taken on the device by the fused AdamW kernel (`found_inf`) and the EMA;
the batch is copied without blocking (the loader pins it on CUDA) and the dropout draws stay on the device.
Losses, gradient norms and the stop flags (signals, the time limit) are reduced and read once per sync point
(`sync`: train.sync_every steps, and every log, preview and checkpoint step). The un-fused optimizer (the CPU
default) has no device-side skip, so there the step reads its gradient norm back (on a CPU that costs nothing).
tests/test_host_syncs.py fails on any other read-back in `train_step`.

State. What a run has learnt and where it is lives in `self.state`, a dict of stateful parts (trainer/state.py:
model, ema, optimizer, scheduler, loader, rng, run), which a checkpoint of either form saves and restores:
one file (train.checkpoint_format=file, rank 0) or a sharded folder (sharded, every rank: trainer/checkpoint.py);
either resumes under any train.parallel and world size. Resume keeps all of it and takes the schedule from the
config it is resumed with: learning rate, warmup, decay and max_steps, betas, eps and weight decay, cadences, and
everything outside optim and train. It refuses a checkpoint of another stage or another model, and a max_steps
below the checkpoint's step. The run position is read first (the loader is built from it); weights, EMA, optimizer
and schedule once the model is wrapped and sharded and the optimizer built over its final parameters; the RNG
states last. On another world size the data continues from the same global sample count.
"""

import json
import logging
import math
import random
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from core import checkpoint
from core.vae import autoencoder_for
from data.loader import build_loader, mix_seed
from flow.rectified_flow import RectifiedFlow
from models.registry import build_model
from trainer import builders, distributed
from trainer import lora as lora_training
from trainer.builders import resolve_resume
from trainer.cadence import CadenceEvaluation
from trainer.checkpoint import checkpoint_writer, metadata_record
from trainer.ema import EMA
from trainer.errors import ConfigError, RunStoppedError  # noqa: F401 (ConfigError: callers catch it here)
from trainer.fast_path import apply_compile, checkpoint_blocks
from trainer.held_loss import HeldLoss
from trainer.logger import Progress, RunLogger, memory_gb
from trainer.main_grad import MainGrads
from trainer.optim import build_optimizer, lr_factor
from trainer.parallel import Parallel
from trainer.plots import save_loss_plot
from trainer.precision import Precision
from trainer.preemption import PreemptionFlag
from trainer.preview import Previewer
from trainer.run_lock import RunLock
from trainer.state import LoaderState, RngState, RunState, TrainingState, follow_config_schedule, with_own_rng
from trainer.threads import ThreadGovernor

log = logging.getLogger(__name__)


def step_generator(seed: int, step: int | str, virtual_rank: int, device: torch.device) -> torch.Generator:
    """The generator of one micro-batch's draws; see the module docstring."""
    gen = torch.Generator(device=device)
    gen.manual_seed(mix_seed(seed, "step", step, virtual_rank))
    return gen


class Trainer:
    """A stage's run: built from the config (and the checkpoint it resumes or starts from), then `fit()`."""

    def __init__(self, cfg: DictConfig, env: distributed.Ranks):
        self.cfg, self.env, t = cfg, env, cfg.train
        self.threads = ThreadGovernor(t.num_threads)
        self.device, self.out_dir = env.device, Path(t.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.micro = builders.micro_batch_size(t.batch_size, env.world_size, t.grad_accum)
        self.precision = Precision(cfg.precision, self.device)
        if self.device.type == "cuda":  # before anything large is allocated: a run that cannot fit stops here
            from planner.plan import check_memory

            check_memory(cfg, env.world_size, self.device)
        self.spec = builders.read_data_spec(cfg)
        builders.check_vae(cfg, self.spec, cfg.data.path)
        self.conditioning = builders.build_conditioning(cfg, self.spec, self.device, self.precision.model_dtype)
        self.resume_from = resolve_resume(t.resume, self.ckpt_dir)
        self.lora = lora_training.LoraSettings.from_config(t.get("lora"))
        lora_training.require_base(self.lora, cfg)
        resumed = builders.read_resume_checkpoint(self.resume_from, cfg)
        # A LoRA run needs its base on a resume too: its checkpoints hold the adapters only.
        init = builders.read_init_checkpoint(cfg) if resumed is None or self.lora.enabled else None
        base = (resumed or (init[1] if init else {})).get("metadata", {}).get("model")
        self.model_config = builders.build_model_config(cfg, self.spec, self.conditioning, base)
        if resumed is not None:
            builders.check_resumable(self.resume_from, resumed, cfg, self.model_config)
        self._build_model(init)
        if resumed is not None:
            lora_training.check_resumable(self.resume_from, resumed["metadata"], self.lora_record)
        self.run = RunState()
        self.state = TrainingState(dict(run=self.run, rng=RngState(self.device), loader=LoaderState(
            self.run, env.world_size, cfg.data.num_workers, self.micro, t.grad_accum)), self._describe, env.is_main)
        self.pending_state = self._restore(resumed)
        del resumed, init  # a several-GB checkpoint need not stay in memory
        self._build_data()
        self._wrap_for_training()  # and then the checkpoint's tensors, into the model as wrapped and sharded
        self._build_outputs()
        log.info("stage %s: %s (%.2fM parameters), batch %d = %d ranks x %d micro-batches x %d samples, data %s "
                 "(%d records), %s", cfg.stage, self.model_config.name, self.n_params / 1e6, t.batch_size,
                 env.world_size, t.grad_accum, self.micro, cfg.data.path, self.loader.dataset.num_records, self.device)
        if self.pending_state is not None:
            # After everything that draws from the global RNGs on the way here (iter(loader) takes a base seed from
            # torch's), so the loop continues with the states the uninterrupted run had at that step.
            self.state.load(self.pending_state, TrainingState.RNG)
            self.pending_state = None

    # ---- building ---------------------------------------------------------------------------------------------

    def _build_model(self, init) -> None:
        """Model (fresh, or init weights), EMA, objective and held batches (the optimizer comes after sharding)."""
        cfg, t = self.cfg, self.cfg.train
        # All three global RNGs from the seed (checkpoints carry them): two runs of one config start alike.
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
        self.model = build_model(self.model_config)
        if init is not None:
            builders.apply_initial_weights(self.model, init[0], init[1], t.init_weights)
        self.lora_record = None
        if self.lora.enabled:  # the base loaded: adapters in, base frozen (trainer/lora.py)
            self.lora_record = lora_training.attach(self.model, self.lora, self.model_config, init[0], init[1],
                                                    t.init_weights)
        self.model.to(self.device)
        # The network's own parameters (a LoRA's are counted apart, as trainable: only they are trained then).
        self.n_params = sum(p.numel() for n, p in self.model.named_parameters()
                            if not lora_training.core_lora.is_adapter_parameter(n))
        self.n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        # Every latent size a batch can have (each bucket's): TE's shape rule must hold at all of them.
        sizes = [(h, w) for _, h, w in self.spec.latent_shapes()]
        self.converted = self.precision.convert(self.model, self.model_config, sizes,
                                                lora_training.adapter_aware if self.lora.enabled else None)
        if self.lora.enabled:
            lora_training.freeze_base(self.model)  # te.Linear's new parameters require grad
            if self.precision.bf16:
                lora_training.store_frozen(self.model, torch.bfloat16)
        self.ema = EMA(self.model, decay=t.ema.decay, every=t.ema.every, warmup_steps=t.ema.warmup_steps,
                       start_decay=t.ema.start_decay)
        mc = self.model_config
        self.objective = RectifiedFlow.from_config(OmegaConf.to_container(t.timesteps, resolve=True), t.prediction,
                                                   mc.base_grid, mc.patch)
        self.held = HeldLoss(cfg, self.micro, self.conditioning, self.objective, self.device, self.precision) \
            if self.env.is_main else None

    def _adapt_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        """What a fresh copy of the model needs to take this run's weights: its LoRA layers, in a LoRA run."""
        if self.lora.enabled:
            lora_training.core_lora.inject(model, self.lora.peft_config(self.model_config))
        return model

    def _restore(self, resumed: dict | None) -> dict | None:
        """A checkpoint's run position now (the loader is built from it); its tensors later, once the model is
        wrapped and the optimizer built (_wrap_for_training), and its RNG states last (this rank's own). A fresh
        run measures its held loss at the start instead."""
        if resumed is None:
            if self.held is not None:
                self.run.extra["held_loss_start"] = self.held(self.model)
            return None
        self.state.load(resumed, TrainingState.POSITION)
        log.info("resumed from %s at step %d", self.resume_from, self.run.step)
        return with_own_rng(resumed, self.env.rank, self.env.world_size)

    def _build_data(self) -> None:
        cfg = self.cfg
        d = cfg.data
        self.loader = build_loader(
            d.path, self.micro, self.env.rank, self.env.world_size, seed=cfg.seed, num_workers=d.num_workers,
            state=self.state.parts["loader"].resume, short_caption_prob=d.short_caption_prob, mix_shards=d.mix_shards,
            verify_checksum=d.verify_checksum, skip_bad_shards=d.skip_bad_shards,
            **builders.loader_options(cfg, self.conditioning),  # stored text features, data.buckets
        )
        builders.warn_if_batch_exceeds_data(cfg, self.loader.dataset, self.env.world_size)
        self.state.parts["loader"].dataset = self.loader.dataset
        self.batches = iter(self.loader)

    def _wrap_for_training(self) -> None:
        """After the EMA copy: the fast path, then DDP or FSDP2 / HSDP, in trainer/parallel.py's order
        (checkpointing -> compile per block -> shard), and the EMA sharded alike; they change how the trained model
        runs and where its tensors live, never a parameter's name or value. Then the optimizer over the
        parameters as they now are, and a resumed checkpoint's tensors."""
        t, env = self.cfg.train, self.env
        # te.Linear(fuse_wgrad_accumulation) leaves .grad empty: its weights are reduced through main_grad instead.
        fused_wgrad = self.converted and self.precision.fuse_wgrad_accumulation
        self.parallel = Parallel(t.parallel, env, self.precision.bf16, t.hsdp_shard_size)
        self.parallel.check(t.compile, bool(fused_wgrad))
        if t.activation_checkpointing:
            checkpoint_blocks(self.model)
        self.forward_model = apply_compile(self.model, t.compile)
        self.main_grads = MainGrads(self.model, env.world_size) if fused_wgrad else None
        self.forward_model = self.parallel.wrap(self.forward_model, self.main_grads)
        self.parallel.shard_ema(self.ema.model)
        self._build_optimizer()
        self.state.attach(self.model, self.ema.model, self.opt, self.sched, self.parallel.sharded,
                          lora_training.kept if self.lora.enabled else None)
        self.writer = checkpoint_writer(self.cfg.train, self.parallel.sharded, self.env, self.ckpt_dir)
        if self.pending_state is not None:
            try:
                self.state.load(self.pending_state, TrainingState.TENSORS)
            except checkpoint.CheckpointError as err:  # a sharded folder damaged where its sizes do not show it
                raise builders.unreadable_resume(self.resume_from, self.cfg, err) from None
            follow_config_schedule(self.opt, self.sched, self.cfg.optim, self.cfg.train.max_steps)

    def _build_optimizer(self) -> None:
        """AdamW and its schedule, over the parameters as wrapped (FSDP2 replaces them by sharded DTensors)."""
        t, o = self.cfg.train, self.cfg.optim
        fused = o.fused if o.fused is not None else self.device.type == "cuda"
        self.opt = build_optimizer(self.model, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps,
                                   fused=fused)
        self.fused = bool(fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, o.warmup_steps, t.max_steps, o.decay_fraction)
        )

    def _build_outputs(self) -> None:
        cfg, env = self.cfg, self.env
        vae = autoencoder_for(self.spec.vae, cfg.vae.name_or_path, cfg.vae.subfolder, self.device) \
            if env.is_main or cfg.train.eval.fid_samples else None
        self.previewer = Previewer(cfg, self.conditioning, vae, self.model_config, self.precision, self.device) \
            if env.is_main else None
        self.logger = RunLogger(cfg, env.is_main, self.out_dir, self.run.step if self.resume_from else None)
        self.metadata = metadata_record(cfg, self.spec, self.model_config, self.conditioning, self.n_params,
                                        self.converted, self.lora_record)
        self.evaluation = CadenceEvaluation.build(cfg, env, self.spec, self.conditioning, self.objective,
                                                  self.precision, vae)

    def _describe(self) -> dict[str, Any]:
        """What a checkpoint records beside the run's state and never loads back: the resolved config, the metadata."""
        return dict(config=OmegaConf.to_container(self.cfg, resolve=True), metadata=self.metadata.to_dict())

    # ---- one step ---------------------------------------------------------------------------------------------

    def train_step(self, step: int) -> None:
        """Micro-batches under no_sync, clip, the guarded optimizer step and the EMA; results stay on the device
        until the next sync point."""
        t, env = self.cfg.train, self.env
        loss_sum = torch.zeros((), device=self.device)
        for m in range(t.grad_accum):
            batch = next(self.batches)
            gen = step_generator(self.cfg.seed, step, env.rank * t.grad_accum + m, self.device)
            with self.parallel.micro_batch(self.forward_model, last=m == t.grad_accum - 1):
                x1 = batch["latents"].to(self.device, non_blocking=True).float()  # pinned: the host goes on
                cond = self.conditioning.from_batch(batch, gen, self.device)  # dropout draws come first from gen
                with self.precision.forward():
                    loss = self.objective.loss(self.forward_model, x1, cond, gen)
                (loss / t.grad_accum).backward()
            loss_sum += loss.detach() / t.grad_accum
        if self.main_grads:
            self.main_grads.reduce()  # the all-reduce DDP does not do for them, once per step
            self.main_grads.to_grad()
        grad_norm = self.parallel.clip(self.model.parameters(), self.cfg.optim.grad_clip)  # global, every rank
        finite = torch.isfinite(grad_norm)
        done = step + 1
        if self.fused:  # decided on the device: the fused kernel skips the update (and its step count) on found_inf
            self.opt.found_inf = (~finite).float()
            self.opt.step()
            self.ema.update(self.model, done, applied=finite)
        elif finite.item():
            self.opt.step()
            self.ema.update(self.model, done)
        self.opt.zero_grad(set_to_none=True)
        if self.main_grads:
            self.main_grads.zero()
        self.sched.step()
        self.pending.append((done, loss_sum, grad_norm))

    def sync(self, preempted: PreemptionFlag) -> bool:
        """Reduce the pending steps' losses and the stop flags over ranks (one collective, one read); extend the
        history, count bad steps, and return whether to stop (a signal, or the time limit on every rank's clock)."""
        steps, self.pending = self.pending, []
        out_of_time = self.deadline is not None and time.perf_counter() >= self.deadline
        flags = torch.tensor([float(preempted.set), float(out_of_time)], dtype=torch.float64, device=self.device)
        if steps:
            losses = torch.stack([loss for _, loss, _ in steps]).double()
            norms = torch.stack([norm for _, _, norm in steps]).double()
            stats = self.env.all_reduce_sum(torch.cat([losses, flags]))
            values, norms = stats.tolist(), norms.tolist()
        else:
            values, norms = self.env.all_reduce_sum(flags).tolist(), []
        for (done, _, _), loss_sum, norm in zip(steps, values[: len(steps)], norms, strict=True):
            self._record(done, loss_sum / self.env.world_size, norm)
        self.stopped_by_signal, self.out_of_time = values[-2] > 0, values[-1] > 0
        return self.stopped_by_signal or self.out_of_time

    def _record(self, done: int, mean_loss: float, grad_norm: float) -> None:
        run = self.run
        run.history.append(mean_loss)
        self.last_grad_norm = grad_norm
        if math.isfinite(grad_norm):
            run.bad_in_row = 0
            return
        run.bad_in_row += 1
        log.warning("step %d: non-finite loss %.4g or gradient norm %.4g; step skipped (%d in a row)", done,
                    mean_loss, grad_norm, run.bad_in_row)
        if run.bad_in_row >= self.cfg.train.max_bad_steps:
            raise RunStoppedError(
                f"{run.bad_in_row} consecutive steps (to step {done}) had a non-finite loss or gradient; stopping "
                f"(train.max_bad_steps={self.cfg.train.max_bad_steps}). Last good checkpoint: "
                f"{checkpoint.newest(self.ckpt_dir) or 'none yet'}. Lower optim.lr or check the data "
                "(python -m data.validate)"
            )

    # ---- on cadence -------------------------------------------------------------------------------------------

    def log_metrics(self, done: int) -> None:
        t = self.cfg.train
        elapsed = time.perf_counter() - self.tic
        recent = [x for x in self.run.history[-t.log_every:] if math.isfinite(x)]
        values = {
            "train/loss": sum(recent) / max(1, len(recent)), "train/grad_norm": self.last_grad_norm,
            "train/lr": self.sched.get_last_lr()[0], "train/img_per_s": self.seen / max(elapsed, 1e-9),
            "train/threads": torch.get_num_threads(),
        }
        values |= memory_gb(self.device)
        self.progress.report(done, values)
        self.logger.log(values, done)
        self.tic, self.seen = time.perf_counter(), 0
        self.threads.adjust()

    def preview(self, done: int) -> None:
        """Rank 0's preview grids; sharded, every rank takes part in gathering the weights it samples with."""
        if self.previewer is None and not self.parallel.sharded:
            return
        self.model.eval()
        for name, weights in (("ema", self.ema.model), ("raw", self.model)):
            with self.parallel.full_copy(weights, self.model_config, self._adapt_copy) as module:
                if self.previewer is not None:
                    path = self.previewer(module, self.out_dir / "samples" / f"step_{done:08d}_{name}.png")
                    self.logger.log_image(f"samples/{name}", path, done, caption=" | ".join(self.previewer.captions))
        self.model.train()

    def evaluate(self, done: int, final: bool) -> None:
        """On cadence, every rank (trainer/cadence.py); its time is left out of the step-time figures."""
        if self.evaluation is None:
            return
        self.model.eval()
        values = self.evaluation(self.ema.model, self.model, done, final)
        self.model.train()
        if values:
            self.tic += values["val/seconds"]
            self.logger.log(values, done)
            self.run.extra["validation"] = dict(values, step=done)

    def save(self, done: int) -> Path:
        """One checkpoint: a file by rank 0, or a sharded folder by every rank (written in the background with
        train.async_checkpoint; a half-written one never has its final name)."""
        if self.writer is not None:
            path = self.writer.save(done, *self.state.sharded_state(self.env.world_size, self.parallel.mode))
        else:
            path = checkpoint.checkpoint_path(self.ckpt_dir, done)
            state = self.state.file_state() if self.env.is_main or self.parallel.sharded else None
            if self.env.is_main:
                checkpoint.save_atomic(state, path)
                checkpoint.prune(self.ckpt_dir, self.cfg.train.keep_checkpoints)
        if self.lora.enabled:
            self._write_adapters(done)
        self.env.barrier()
        return path

    def _write_adapters(self, done: int) -> None:
        """A LoRA run's adapters in peft's format (out_dir/adapter, out_dir/adapter_raw) beside each checkpoint;
        sharded, every rank helps gather them."""
        tensors = dict(ema=lora_training.adapter_tensors(self.ema.model),
                       raw=lora_training.adapter_tensors(self.model))
        if self.env.is_main:
            lora_training.write_adapters(self.out_dir, self.lora, self.model_config, self.metadata.to_dict(), done,
                                         tensors)

    # ---- the loop ---------------------------------------------------------------------------------------------

    def fit(self) -> dict:
        t = self.cfg.train
        self.start_clock()
        with PreemptionFlag() as preempted:
            for step in range(self.run.step, t.max_steps):
                self.train_step(step)
                self.run.step = done = step + 1
                self.seen += t.batch_size
                self.progress.step()
                final = done == t.max_steps
                due = [done % every == 0 for every in (t.log_every, t.sample_every, t.ckpt_every)]
                stop = self.sync(preempted) if final or any(due) or done % t.sync_every == 0 else False
                self.evaluate(done, final or self.out_of_time)
                if due[0] or final:
                    self.log_metrics(done)
                if due[1] or final or self.out_of_time:
                    self.preview(done)
                if due[2] or final or stop:
                    self.save(done)
                if stop:
                    break
        self.progress.close()
        return self.finish()

    def start_clock(self) -> None:
        t = self.cfg.train
        self.model.train()
        self.pending, self.last_grad_norm, self.stopped_by_signal, self.out_of_time = [], float("nan"), False, False
        self.progress = Progress(f"stage {self.cfg.stage}", self.run.step, t.max_steps, self.env.is_main)
        self.tic, self.seen = time.perf_counter(), 0
        self.deadline = None if t.max_minutes is None else time.perf_counter() + 60 * float(t.max_minutes)
        if self.run.extra.get("held_loss_start") is not None and self.run.step == 0:
            self.logger.log({"held/loss_start": self.run.extra["held_loss_start"]}, 0)

    def close(self) -> None:
        """Free the loader iterator by refcount, so its workers get their `None` now: in a later cyclic GC pass the
        index queues' finalizers may stop their feeders first, and torch then waits 5 s per worker to kill it."""
        self.batches = self.loader = None

    def finish(self) -> dict:
        """The stage's summary (also out_dir/summary.json): steps, losses, held losses, where things are."""
        t, mc = self.cfg.train, self.model_config
        if self.stopped_by_signal:
            log.warning("stopped by signal after step %d; checkpoint saved", self.run.step)
        elif self.out_of_time:
            log.info("train.max_minutes=%s reached after step %d; checkpoint saved", t.max_minutes, self.run.step)
        if self.writer is not None:
            self.writer.wait()  # an asynchronous save still writing: the summary names it complete
        summary = dict(stage=self.cfg.stage, steps=len(self.run.history), max_steps=t.max_steps,
                       preempted=self.stopped_by_signal, time_limit_reached=self.out_of_time)
        held = self._held_end()
        if self.env.is_main:
            summary |= self._main_summary(held)
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            title = f"stage {self.cfg.stage}: {mc.name}, {self.n_params / 1e6:.1f}M parameters"
            history = self.run.history
            save_loss_plot(list(range(1, len(history) + 1)), history, self.out_dir / "loss.png", title)
        self.logger.finish()
        return summary

    def _held_end(self) -> dict[str, float | None]:
        """The held losses at the end (rank 0's; sharded, every rank helps gather the weights). None when not
        measured: no held batches, or a preempted run, which has seconds left."""
        measure = self.cfg.train.eval_batches > 0 and not self.stopped_by_signal
        held: dict[str, float | None] = dict.fromkeys(
            ("held_loss_end_ema", "held_loss_end_raw", "held_loss_end_ema_unconditional"))
        if not measure or (self.held is None and not self.parallel.sharded):
            return held
        for name, weights in (("ema", self.ema.model), ("raw", self.model)):
            with self.parallel.full_copy(weights, self.model_config, self._adapt_copy) as module:
                if self.held is not None:
                    held[f"held_loss_end_{name}"] = self.held(module)
                    if name == "ema":  # the null condition: what reparameterize.py carries over exactly (at t*)
                        held["held_loss_end_ema_unconditional"] = self.held(module, unconditional=True)
        return held

    def _main_summary(self, held_end: dict[str, float | None]) -> dict:
        final = checkpoint.newest(self.ckpt_dir)
        finite = [x for x in self.run.history if math.isfinite(x)]
        tail = finite[-50:]
        measure = self.held is not None and not self.stopped_by_signal
        held = dict(held_loss_start=self.run.extra.get("held_loss_start"), **held_end)
        if measure:
            ends = {f"held/{k.removeprefix('held_')}": v for k, v in held.items() if v is not None and "end" in k}
            self.logger.log(ends, self.run.step)
        return dict(
            model=self.model_config.name, parameters=self.n_params, trainable_parameters=self.n_trainable,
            checkpoint=str(final) if final else None,
            first_loss=finite[0] if finite else None, final_loss=sum(tail) / len(tail) if tail else None, **held,
            validation=self.run.extra.get("validation"),
            samples=str(self.out_dir / "samples"), loss_plot=str(self.out_dir / "loss.png"),
        )


def train(cfg: DictConfig) -> dict:
    """Run one stage; returns its summary (also written to out_dir/summary.json)."""
    env = distributed.setup(cfg.device, need_group=cfg.train.parallel != "ddp")
    try:
        distributed.quiet_other_ranks(env, cfg.train.log_all_ranks)
        with RunLock.for_run(Path(cfg.train.out_dir), env), closing(Trainer(cfg, env)) as trainer:
            return trainer.fit()
    finally:
        distributed.teardown()

