"""The one training loop behind every train_stageN.py: a `Trainer` that owns the run's state, and its `fit()`.

    for each step: micro-batches (forward and loss under autocast, backward; DDP syncs on the last only)
                   -> clip -> guarded optimizer step -> EMA;  log, preview and checkpoint on cadence

It runs as one plain process or under torchrun (trainer/distributed.py). What differs between stages is config:
the data (labels or captions), the model family, the weights a stage starts from (train.init_from).

Determinism. Every random draw of a step (label or caption dropout, then the objective's noise and times:
flow/rectified_flow.py) comes from a generator seeded by (seed, step, virtual rank), virtual rank = rank *
grad_accum + micro-batch. So the draws do not depend on anything a run carries in memory: a resumed run replays
exactly the draws the uninterrupted run made, and 2 ranks x 1 micro-batch see the same draws as 1 rank x 2
micro-batches (with the loader's matching split: data/loader.py gives slot s = rank * workers + worker).

Host syncs. A step's decisions are taken without reading a value back from the device where that is safe:
the skip of a non-finite step follows the global gradient norm (after the DDP all-reduce it is the same number on
every rank, so no collective is needed), taken on the device by the fused AdamW kernel (`found_inf`) and the EMA;
losses, gradient norms and the stop flags (signals, the time limit) are reduced and read once per sync point
(train.sync_every steps, and every log, preview and checkpoint step). The un-fused optimizer (the CPU default)
has no device-side skip, so there the step reads its gradient norm back (on a CPU that costs nothing).

Resume keeps what a run has learnt and where it is (weights, EMA, optimizer moments, step, loss history, data
position, RNG states) and takes the schedule from the config it is resumed with: learning rate, warmup, decay and
max_steps, betas, eps and weight decay, cadences, and everything outside optim and train. It refuses a checkpoint
of another stage or another model, and a max_steps below the checkpoint's step.
"""

import json
import logging
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from core.vae import autoencoder_for
from data.loader import build_loader, mix_seed
from flow.rectified_flow import RectifiedFlow
from models import build_model
from trainer import builders, checkpoint, distributed
from trainer.builders import resolve_resume
from trainer.ema import EMA
from trainer.errors import ConfigError, RunStoppedError  # noqa: F401 (ConfigError: callers catch it here)
from trainer.fast_path import apply_compile, checkpoint_blocks
from trainer.held_loss import HeldLoss
from trainer.logger import Progress, RunLogger
from trainer.main_grad import MainGrads
from trainer.optim import build_optimizer, lr_factor
from trainer.plots import save_loss_plot
from trainer.precision import Precision
from trainer.preemption import PreemptionFlag
from trainer.preview import Previewer
from trainer.run_lock import RunLock
from trainer.threads import ThreadGovernor

log = logging.getLogger(__name__)


def step_generator(seed: int, step: int | str, virtual_rank: int, device: torch.device) -> torch.Generator:
    """The generator of one micro-batch's draws; see the module docstring."""
    gen = torch.Generator(device=device)
    gen.manual_seed(mix_seed(seed, "step", step, virtual_rank))
    return gen


def micro_batch_size(batch_size: int, world_size: int, grad_accum: int) -> int:
    if grad_accum < 1 or batch_size % (world_size * grad_accum):
        raise ConfigError(
            f"train.batch_size={batch_size} must split evenly over {world_size} ranks x train.grad_accum="
            f"{grad_accum} micro-batches"
        )
    return batch_size // (world_size * grad_accum)


class Trainer:
    """A stage's run: built from the config (and the checkpoint it resumes or starts from), then `fit()`."""

    def __init__(self, cfg: DictConfig, env: distributed.Distributed):
        self.cfg, self.env, t = cfg, env, cfg.train
        self.threads = ThreadGovernor(t.num_threads)
        self.device, self.out_dir = env.device, Path(t.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.micro = micro_batch_size(t.batch_size, env.world_size, t.grad_accum)
        self.precision = Precision(cfg.precision, self.device)
        if self.device.type == "cuda":  # before anything large is allocated: a run that cannot fit stops here
            from trainer.plan import check_memory

            check_memory(cfg, env.world_size, self.device)
        self.spec = builders.read_data_spec(cfg)
        builders.check_vae(cfg, self.spec, cfg.data.path)
        self.conditioning = builders.build_conditioning(cfg, self.spec, self.device, self.precision.model_dtype)
        self.resume_from = resolve_resume(t.resume, self.ckpt_dir)
        resumed = builders.read_resume_checkpoint(self.resume_from, cfg)
        init = None if resumed is not None else builders.read_init_checkpoint(cfg)
        base = (resumed or (init[1] if init else {})).get("metadata", {}).get("model")
        self.model_config = builders.build_model_config(cfg, self.spec, self.conditioning, base)
        if resumed is not None:
            builders.check_resumable(self.resume_from, resumed, cfg, self.model_config)
        self._build_model(init)
        self.step, self.history, self.bad_in_row, self.extra = 0, [], 0, {}
        self.loader_state, saved_rng = None, None
        if resumed is not None:
            saved_rng = self._restore(resumed)
        elif self.held is not None:
            self.extra["held_loss_start"] = self.held(self.model)
        del resumed, init  # a several-GB checkpoint need not stay in memory
        self._build_data()
        self._wrap_for_training()
        self._build_outputs()
        log.info("stage %s: %s (%.2fM parameters), batch %d = %d ranks x %d micro-batches x %d samples, data %s "
                 "(%d records), %s", cfg.stage, self.model_config.name, self.n_params / 1e6, t.batch_size,
                 env.world_size, t.grad_accum, self.micro, cfg.data.path, self.loader.dataset.num_records, self.device)
        if saved_rng is not None:
            # After everything that draws from the global RNGs on the way here (iter(loader) takes a base seed from
            # torch's), so the loop continues with the states the uninterrupted run had at that step.
            checkpoint.restore_rng_states(saved_rng)

    # ---- building ---------------------------------------------------------------------------------------------

    def _build_model(self, init) -> None:
        """Model (fresh, or init weights), EMA, optimizer, schedule, objective and held batches."""
        cfg, t, o = self.cfg, self.cfg.train, self.cfg.optim
        # All three global RNGs from the seed (checkpoints carry them): two runs of one config start alike.
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
        self.model = build_model(self.model_config)
        if init is not None:
            builders.apply_initial_weights(self.model, init[0], init[1], t.init_weights)
        self.model.to(self.device)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.converted = self.precision.convert(self.model, self.model_config, [tuple(self.spec.latent_shape[1:])])
        self.ema = EMA(self.model, decay=t.ema.decay, every=t.ema.every, warmup_steps=t.ema.warmup_steps,
                       start_decay=t.ema.start_decay)
        fused = o.fused if o.fused is not None else self.device.type == "cuda"
        self.opt = build_optimizer(self.model, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps,
                                   fused=fused)
        self.fused = bool(fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, o.warmup_steps, t.max_steps, o.decay_fraction)
        )
        mc = self.model_config
        self.objective = RectifiedFlow.from_config(OmegaConf.to_container(t.timesteps, resolve=True), t.prediction,
                                                   mc.base_grid, mc.patch)
        self.held = HeldLoss(cfg, self.micro, self.conditioning, self.objective, self.device, self.precision) \
            if self.env.is_main else None

    def _restore(self, resumed: dict) -> dict:
        """Load a checkpoint's run state; the schedule then follows this run's config (module docstring)."""
        self.load_state_dict(resumed)
        o = self.cfg.optim
        for group in self.opt.param_groups:  # the saved groups carry the old run's hyperparameters
            group.update(betas=tuple(o.betas), eps=o.eps, initial_lr=o.lr)
            group["weight_decay"] = o.weight_decay if group["weight_decay"] else 0.0
        self.sched.base_lrs = [o.lr for _ in self.opt.param_groups]
        for group, base, factor in zip(self.opt.param_groups, self.sched.base_lrs, self.sched.lr_lambdas, strict=True):
            group["lr"] = base * factor(self.sched.last_epoch)  # what LambdaLR computes at this step
        self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]
        log.info("resumed from %s at step %d", self.resume_from, self.step)
        log.info("kept from the checkpoint: weights, EMA, optimizer moments, history, data position, RNG; from this "
                 "config: optim.lr=%g, warmup %d, decay_fraction %g, train.max_steps=%d", o.lr, o.warmup_steps,
                 o.decay_fraction, self.cfg.train.max_steps)
        return resumed["rng"]

    def _build_data(self) -> None:
        cfg = self.cfg
        d = cfg.data
        self.loader = build_loader(
            d.path, self.micro, self.env.rank, self.env.world_size, seed=cfg.seed, num_workers=d.num_workers,
            state=self.loader_state, short_caption_prob=d.short_caption_prob, mix_shards=d.mix_shards,
            verify_checksum=d.verify_checksum, skip_bad_shards=d.skip_bad_shards,
            **builders.loader_options(cfg, self.conditioning),  # stored text features, data.buckets
        )
        builders.warn_if_batch_exceeds_data(cfg, self.loader.dataset, self.env.world_size)
        self.batches = iter(self.loader)

    def _wrap_for_training(self) -> None:
        """The fast path and DDP, after the EMA copy: they change how the trained model runs, never its parameters
        or their names."""
        t, env = self.cfg.train, self.env
        if t.get("activation_checkpointing"):
            checkpoint_blocks(self.model)
        self.forward_model = apply_compile(self.model, t.compile)
        # te.Linear(fuse_wgrad_accumulation) leaves .grad empty: its weights are reduced through main_grad instead.
        fused_wgrad = self.converted and self.precision.fuse_wgrad_accumulation
        self.main_grads = MainGrads(self.model, env.world_size) if fused_wgrad else None
        if env.enabled:
            if self.main_grads:
                self.main_grads.exclude_from_ddp(self.forward_model)
                self.main_grads.broadcast()
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.forward_model, device_ids=device_ids)

    def _build_outputs(self) -> None:
        cfg, env = self.cfg, self.env
        vae = autoencoder_for(self.spec.vae, cfg.vae.name_or_path, cfg.vae.subfolder, self.device) \
            if env.is_main else None
        self.previewer = Previewer(cfg, self.conditioning, vae, self.model_config, self.precision, self.device) \
            if env.is_main else None
        self.logger = RunLogger(cfg, env.is_main, self.out_dir, self.step if self.resume_from else None)
        self.metadata = checkpoint_metadata(cfg, self.spec, self.model_config, self.conditioning, self.n_params,
                                            self.converted)

    # ---- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, in the plain nn.Linear layout (trainer/checkpoint.py), plus the metadata
        every other tool reads."""
        model, model_extra = checkpoint.split_extra_state(self.model.state_dict())
        ema, ema_extra = checkpoint.split_extra_state(self.ema.state_dict())
        samples = self.step * self.cfg.train.grad_accum * self.micro
        state = dict(
            model=model, ema=ema, optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(), step=self.step,
            history=self.history, bad_in_row=self.bad_in_row, extra=self.extra,
            loader=self.loader.dataset.state_at(samples), rng=checkpoint.rng_states(),
            config=OmegaConf.to_container(self.cfg, resolve=True), metadata=self.metadata,
        )
        if model_extra or ema_extra:
            state["te_extra_state"] = dict(model=model_extra, ema=ema_extra)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        extra = state.get("te_extra_state") or {}
        model, model_extra = checkpoint.split_extra_state(state["model"])
        ema, ema_extra = checkpoint.split_extra_state(state["ema"])
        checkpoint.load_module_state(self.model, model, model_extra | extra.get("model", {}))
        checkpoint.load_module_state(self.ema.model, ema, ema_extra | extra.get("ema", {}))
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step, self.history, self.loader_state = state["step"], list(state["history"]), state["loader"]
        self.bad_in_row, self.extra = state.get("bad_in_row", 0), dict(state.get("extra", {}))

    # ---- one step ---------------------------------------------------------------------------------------------

    def train_step(self, step: int) -> None:
        """Micro-batches under no_sync, clip, the guarded optimizer step and the EMA; results stay on the device
        until the next sync point."""
        t, env = self.cfg.train, self.env
        loss_sum = torch.zeros((), device=self.device)
        for m in range(t.grad_accum):
            batch = next(self.batches)
            gen = step_generator(self.cfg.seed, step, env.rank * t.grad_accum + m, self.device)
            sync = m == t.grad_accum - 1 or not env.enabled
            with nullcontext() if sync else self.forward_model.no_sync():
                x1 = batch["latents"].to(device=self.device, dtype=torch.float32)
                cond = self.conditioning.from_batch(batch, gen, self.device)  # dropout draws come first from gen
                with self.precision.forward():
                    loss = self.objective.loss(self.forward_model, x1, cond, gen)
                (loss / t.grad_accum).backward()
            loss_sum += loss.detach() / t.grad_accum
        if self.main_grads:
            self.main_grads.reduce()  # the all-reduce DDP does not do for them, once per step
            self.main_grads.to_grad()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
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
        self.history.append(mean_loss)
        self.last_grad_norm = grad_norm
        if math.isfinite(grad_norm):
            self.bad_in_row = 0
            return
        self.bad_in_row += 1
        log.warning("step %d: non-finite loss %.4g or gradient norm %.4g; step skipped (%d in a row)", done,
                    mean_loss, grad_norm, self.bad_in_row)
        if self.bad_in_row >= self.cfg.train.max_bad_steps:
            last = checkpoint.list_checkpoints(self.ckpt_dir)
            raise RunStoppedError(
                f"{self.bad_in_row} consecutive steps (to step {done}) had a non-finite loss or gradient; stopping "
                f"(train.max_bad_steps={self.cfg.train.max_bad_steps}). Last good checkpoint: "
                f"{last[-1] if last else 'none yet'}. Lower optim.lr or check the data (python -m data.validate)"
            )

    # ---- on cadence -------------------------------------------------------------------------------------------

    def log_metrics(self, done: int) -> None:
        t = self.cfg.train
        elapsed = time.perf_counter() - self.tic
        recent = [x for x in self.history[-t.log_every:] if math.isfinite(x)]
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
        if self.previewer is None:
            return
        self.model.eval()
        for name, weights in (("ema", self.ema.model), ("raw", self.model)):
            path = self.previewer(weights, self.out_dir / "samples" / f"step_{done:08d}_{name}.png")
            self.logger.log_image(f"samples/{name}", path, done, caption=" | ".join(self.previewer.captions))
        self.model.train()

    def save(self, done: int) -> Path:
        path = checkpoint.checkpoint_path(self.ckpt_dir, done)
        if self.env.is_main:
            checkpoint.save_atomic(self.state_dict(), path)
            checkpoint.prune(self.ckpt_dir, self.cfg.train.keep_checkpoints)
        self.env.barrier()
        return path

    # ---- the loop ---------------------------------------------------------------------------------------------

    def fit(self) -> dict:
        t = self.cfg.train
        self.start_clock()
        with PreemptionFlag() as preempted:
            for step in range(self.step, t.max_steps):
                self.train_step(step)
                self.step = done = step + 1
                self.seen += t.batch_size
                self.progress.step()
                final = done == t.max_steps
                due = [done % every == 0 for every in (t.log_every, t.sample_every, t.ckpt_every)]
                stop = self.sync(preempted) if final or any(due) or done % t.sync_every == 0 else False
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
        self.progress = Progress(f"stage {self.cfg.stage}", self.step, t.max_steps, self.env.is_main)
        self.tic, self.seen = time.perf_counter(), 0
        self.deadline = None if t.get("max_minutes") is None else time.perf_counter() + 60 * float(t.max_minutes)
        if self.extra.get("held_loss_start") is not None and self.step == 0:
            self.logger.log({"held/loss_start": self.extra["held_loss_start"]}, 0)

    def finish(self) -> dict:
        """The stage's summary (also out_dir/summary.json): steps, losses, held losses, where things are."""
        t, mc = self.cfg.train, self.model_config
        if self.stopped_by_signal:
            log.warning("stopped by signal after step %d; checkpoint saved", self.step)
        elif self.out_of_time:
            log.info("train.max_minutes=%s reached after step %d; checkpoint saved", t.max_minutes, self.step)
        summary = dict(stage=self.cfg.stage, steps=len(self.history), max_steps=t.max_steps,
                       preempted=self.stopped_by_signal, time_limit_reached=self.out_of_time)
        if self.env.is_main:
            summary |= self._main_summary()
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            title = f"stage {self.cfg.stage}: {mc.name}, {self.n_params / 1e6:.1f}M parameters"
            save_loss_plot(list(range(1, len(self.history) + 1)), self.history, self.out_dir / "loss.png", title)
        self.logger.finish()
        return summary

    def _main_summary(self) -> dict:
        final = checkpoint.list_checkpoints(self.ckpt_dir)
        finite = [x for x in self.history if math.isfinite(x)]
        tail = finite[-50:]
        measure = self.held is not None and not self.stopped_by_signal
        held = dict(
            held_loss_start=self.extra.get("held_loss_start"),
            held_loss_end_ema=self.held(self.ema.model) if measure else None,
            held_loss_end_raw=self.held(self.model) if measure else None,
            # The null condition: what reparameterize.py carries into the next stage exactly (at t*).
            held_loss_end_ema_unconditional=self.held(self.ema.model, unconditional=True) if measure else None,
        )
        if measure:
            ends = {f"held/{k.removeprefix('held_')}": v for k, v in held.items() if v is not None and "end" in k}
            self.logger.log(ends, self.step)
        return dict(
            model=self.model_config.name, parameters=self.n_params, checkpoint=str(final[-1]) if final else None,
            first_loss=finite[0] if finite else None, final_loss=sum(tail) / len(tail) if tail else None, **held,
            samples=str(self.out_dir / "samples"), loss_plot=str(self.out_dir / "loss.png"),
        )


def checkpoint_metadata(cfg: DictConfig, spec, mcfg, conditioning, n_params: int, converted: int) -> dict:
    """What every tool reads from a checkpoint to use it with no other flag (app/pipeline.py, reparameterize.py)."""
    t = cfg.train
    return dict(
        model=mcfg.to_dict(), family=mcfg.family, size=mcfg.size, name=mcfg.name, stage=cfg.stage,
        parameters=n_params, prediction=t.prediction, space="pixel" if spec.vae.get("id") == "identity" else "latent",
        vae=dict(spec.vae, kind=cfg.vae.kind, name_or_path=cfg.vae.name_or_path, subfolder=cfg.vae.subfolder),
        latent_shape=list(spec.latent_shape), image_size=spec.image_size,
        text_encoder=OmegaConf.to_container(cfg.text_encoder, resolve=True) if spec.kind == "text" else None,
        sampling=dict(steps=t.preview.steps, cfg_scale=t.preview.cfg_scale, alpha=t.preview.alpha),
        data=str(cfg.data.path), linear_layout="torch", trained_linear_layout="te" if converted else "torch",
        **conditioning.metadata(),
    )


def memory_gb(device: torch.device) -> dict[str, float]:
    """Peak memory so far: the CUDA allocator's on a GPU, the process's resident set on a CPU."""
    if device.type == "cuda":
        return {"train/mem_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"train/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux


def train(cfg: DictConfig) -> dict:
    """Run one stage; returns its summary (also written to out_dir/summary.json)."""
    env = distributed.setup(cfg.get("device"))
    try:
        distributed.quiet_other_ranks(env, bool(cfg.train.get("log_all_ranks", False)))
        with RunLock.for_run(Path(cfg.train.out_dir), env):
            return Trainer(cfg, env).fit()
    finally:
        distributed.teardown()
