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

Resume keeps what a run has learnt and where it is (weights, EMA, optimizer moments, step, loss history, data
position, RNG states) and takes the schedule from the config it is resumed with: learning rate, warmup, decay and
max_steps, betas, eps and weight decay, cadences, and everything outside optim and train. It refuses a checkpoint
of another stage or another model, and a max_steps below the checkpoint's step. Checkpoints are one file
(train.checkpoint_format=file, rank 0) or a sharded folder (sharded, every rank: trainer/checkpoint.py); either
resumes under any train.parallel and world size. The run position is read first (the loader is built from it);
weights, EMA, optimizer and schedule once the model is wrapped and sharded and the optimizer built over its
final parameters. On another world size the data continues from the same global sample count.
"""

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from core.vae import autoencoder_for
from data.loader import build_loader, mix_seed
from flow.rectified_flow import RectifiedFlow
from models.registry import build_model
from trainer import builders, checkpoint, distributed, sharded_state
from trainer import lora as lora_training
from trainer.builders import resolve_resume
from trainer.cadence import CadenceEvaluation
from trainer.ema import EMA
from trainer.errors import ConfigError, RunStoppedError  # noqa: F401 (ConfigError: callers catch it here)
from trainer.fast_path import apply_compile, checkpoint_blocks
from trainer.held_loss import HeldLoss
from trainer.logger import Progress, RunLogger, memory_gb
from trainer.main_grad import MainGrads
from trainer.optim import build_optimizer, lr_factor
from trainer.parallel import Parallel
from trainer.plots import save_loss_plot
from trainer.precision import Precision, loadable_extra_state
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
        self.step, self.history, self.bad_in_row, self.extra = 0, [], 0, {}
        self.loader_state, saved_rng, self.pending_state = None, None, None
        if resumed is not None:
            saved_rng = self._restore(resumed)
        elif self.held is not None:
            self.extra["held_loss_start"] = self.held(self.model)
        del resumed, init  # a several-GB checkpoint need not stay in memory
        self._build_data()
        self._wrap_for_training()  # and then the checkpoint's tensors, into the model as wrapped and sharded
        self._build_outputs()
        log.info("stage %s: %s (%.2fM parameters), batch %d = %d ranks x %d micro-batches x %d samples, data %s "
                 "(%d records), %s", cfg.stage, self.model_config.name, self.n_params / 1e6, t.batch_size,
                 env.world_size, t.grad_accum, self.micro, cfg.data.path, self.loader.dataset.num_records, self.device)
        if saved_rng is not None:
            # After everything that draws from the global RNGs on the way here (iter(loader) takes a base seed from
            # torch's), so the loop continues with the states the uninterrupted run had at that step.
            checkpoint.restore_rng_states(saved_rng, self.device)

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

    def _restore(self, resumed: dict) -> dict:
        """A checkpoint's run position now (the loader is built from it); its tensors later, once the model is
        wrapped and the optimizer built (_wrap_for_training). Returns this rank's RNG states, restored last."""
        self._load_position(resumed)
        self.pending_state = resumed
        log.info("resumed from %s at step %d", self.resume_from, self.step)
        saved_world = int(resumed["loader"].get("world_size", self.env.world_size))
        if saved_world != self.env.world_size:
            log.warning("resumed on %d ranks from a checkpoint saved on %d: the data continues at global sample %d "
                        "(%d per rank), in another order than a %d-rank run would take", self.env.world_size,
                        saved_world, self.loader_state["samples"] * self.env.world_size, self.loader_state["samples"],
                        saved_world)
        model = resumed["model"]
        own = model.path / checkpoint.rank_file(self.env.rank) if isinstance(model, checkpoint.ShardedEntry) else None
        if own is not None and own.is_file() and saved_world == self.env.world_size:
            return checkpoint.load_file(own)["rng"]  # a sharded checkpoint keeps every rank's
        return resumed["rng"]

    def _follow_config_schedule(self) -> None:
        """After a resume: the saved param groups carry the old run's hyperparameters; this run's config rules."""
        o = self.cfg.optim
        for group in self.opt.param_groups:
            group.update(betas=tuple(o.betas), eps=o.eps, initial_lr=o.lr)
            group["weight_decay"] = o.weight_decay if group["weight_decay"] else 0.0
        self.sched.base_lrs = [o.lr for _ in self.opt.param_groups]
        for group, base, factor in zip(self.opt.param_groups, self.sched.base_lrs, self.sched.lr_lambdas, strict=True):
            group["lr"] = base * factor(self.sched.last_epoch)  # what LambdaLR computes at this step
        self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]
        log.info("kept from the checkpoint: weights, EMA, optimizer moments, history, data position, RNG; from this "
                 "config: optim.lr=%g, warmup %d, decay_fraction %g, train.max_steps=%d", o.lr, o.warmup_steps,
                 o.decay_fraction, self.cfg.train.max_steps)

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
        self.writer = self._checkpoint_writer()
        if self.pending_state is not None:
            try:
                self._load_tensors(self.pending_state)
            except checkpoint.CheckpointError as err:  # a sharded folder damaged where its sizes do not show it
                raise builders.unreadable_resume(self.resume_from, self.cfg, err) from None
            self._follow_config_schedule()
            self.pending_state = None

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

    def _checkpoint_writer(self) -> checkpoint.ShardedWriter | None:
        """train.checkpoint_format: a ShardedWriter for sharded checkpoints, None for one file by rank 0."""
        t = self.cfg.train
        fmt = t.checkpoint_format or ("sharded" if self.parallel.sharded else "file")
        if t.async_checkpoint and fmt != "sharded":  # two keys (and the mode): checked here, where all are known
            raise ConfigError("train.async_checkpoint=true writes sharded checkpoints only: set "
                              "train.checkpoint_format=sharded (or train.async_checkpoint=false)")
        if fmt == "file":
            return None
        return checkpoint.ShardedWriter(self.ckpt_dir, self.env, t.keep_checkpoints, t.async_checkpoint)

    def _build_outputs(self) -> None:
        cfg, env = self.cfg, self.env
        vae = autoencoder_for(self.spec.vae, cfg.vae.name_or_path, cfg.vae.subfolder, self.device) \
            if env.is_main or cfg.train.eval.fid_samples else None
        self.previewer = Previewer(cfg, self.conditioning, vae, self.model_config, self.precision, self.device) \
            if env.is_main else None
        self.logger = RunLogger(cfg, env.is_main, self.out_dir, self.step if self.resume_from else None)
        self.metadata = checkpoint.metadata_record(cfg, self.spec, self.model_config, self.conditioning,
                                                   self.n_params, self.converted)
        if self.lora_record is not None:  # an adapter-only checkpoint: tools load it through its base
            self.metadata["lora"] = self.lora_record
        self.evaluation = CadenceEvaluation.build(cfg, env, self.spec, self.conditioning, self.objective,
                                                  self.precision, vae)

    # ---- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any] | None:
        """Everything a resume needs in the single-file form (the plain nn.Linear layout, the optimizer numbered
        by index: trainer/checkpoint.py), plus the metadata every other tool reads. Sharded, every rank must call
        it (the tensors are gathered into rank 0's CPU memory) and ranks other than 0 get None."""
        keep = lora_training.kept if self.lora.enabled else None
        if self.parallel.sharded:
            whole = sharded_state.whole_state(self.model, self.ema.model, self.opt, self.env.is_main, keep)
            if whole is None:
                return None
            model_state, ema_state, optimizer = whole
        else:
            model_state, ema_state, optimizer = self.model.state_dict(), self.ema.state_dict(), self.opt.state_dict()
            if keep is not None:  # the adapters only: the base is train.init_from's
                model_state, ema_state = (lora_training.adapter_state(s) for s in (model_state, ema_state))
        model, model_extra = checkpoint.split_extra_state(model_state)
        ema, ema_extra = checkpoint.split_extra_state(ema_state)
        state = dict(model=model, ema=ema, optimizer=optimizer, scheduler=self.sched.state_dict(),
                     **self._run_state(), **self._rank_state())
        if model_extra or ema_extra:
            state["te_extra_state"] = dict(model=model_extra, ema=ema_extra)
        return state

    def _run_state(self) -> dict[str, Any]:
        """What a checkpoint holds once, whatever its form: where the run is, its config and metadata."""
        return dict(step=self.step, history=self.history, bad_in_row=self.bad_in_row, extra=self.extra,
                    config=OmegaConf.to_container(self.cfg, resolve=True), metadata=self.metadata)

    def _rank_state(self) -> dict[str, Any]:
        """What each rank holds of its own: the loader's position (steps x micro-batches x micro-batch) and RNGs."""
        samples = self.step * self.cfg.train.grad_accum * self.micro
        return dict(loader=self.loader.dataset.state_at(samples), rng=checkpoint.rng_states(self.device))

    def sharded_state(self) -> tuple[dict, dict, dict]:
        """A sharded checkpoint's three parts (trainer/checkpoint.py): the tensors DCP writes (each rank its
        shards), what rank 0 writes once (meta.pt), and this rank's own."""
        tensors, shared = sharded_state.sharded_parts(self.model, self.ema.model, self.opt,
                                                      lora_training.kept if self.lora.enabled else None)
        shared |= self._run_state() | dict(scheduler=self.sched.state_dict(), world_size=self.env.world_size,
                                           parallel=self.parallel.mode)
        return tensors, shared, self._rank_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint of either form (a loaded file, or trainer.checkpoint.load of a sharded folder) into this
        run, whatever its parallel mode and world size; every rank calls it."""
        self._load_position(state)
        self._load_tensors(state)

    def _load_position(self, state: dict[str, Any]) -> None:
        d = self.cfg.data
        self.step, self.history = state["step"], list(state["history"])
        self.loader_state = checkpoint.continue_loader(state["loader"], self.env.world_size, d.num_workers,
                                                       self.micro)
        self.bad_in_row, self.extra = state.get("bad_in_row", 0), dict(state.get("extra", {}))

    def _load_tensors(self, state: dict[str, Any]) -> None:
        """Weights, EMA, optimizer moments and schedule, from a file or a sharded folder, into the model as it is
        wrapped (whole on every rank, or sharded over a mesh of any size)."""
        keep = lora_training.kept if self.lora.enabled else None
        if isinstance(state["model"], checkpoint.ShardedEntry):
            sharded_state.load_sharded(self.model, self.ema.model, self.opt, state["model"].path, state, keep)
        elif self.parallel.sharded:
            sharded_state.load_whole_into_shards(self.model, self.ema.model, self.opt, state, keep)
        elif keep is not None:
            saved = state.get("te_extra_state") or {}
            extra = loadable_extra_state(dict(model=saved.get("model", {}), ema=saved.get("ema", {})),
                                         "the checkpoint")
            for module, key in ((self.model, "model"), (self.ema.model, "ema")):
                weights, inline = checkpoint.split_extra_state(state[key])
                lora_training.load_adapter_state(module, weights, inline | extra[key], f"train.resume ({key})")
            self.opt.load_state_dict(state["optimizer"])
        else:
            saved = state.get("te_extra_state") or {}
            model, model_extra = checkpoint.split_extra_state(state["model"])
            ema, ema_extra = checkpoint.split_extra_state(state["ema"])
            extra = loadable_extra_state(dict(model=model_extra | saved.get("model", {}),
                                              ema=ema_extra | saved.get("ema", {})), "the checkpoint")
            checkpoint.load_module_state(self.model, model, extra["model"])
            checkpoint.load_module_state(self.ema.model, ema, extra["ema"])
            self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])

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
            self.extra["validation"] = dict(values, step=done)

    def save(self, done: int) -> Path:
        """One checkpoint: a file by rank 0, or a sharded folder by every rank (written in the background with
        train.async_checkpoint; a half-written one never has its final name)."""
        if self.writer is not None:
            path = self.writer.save(done, *self.sharded_state())
        else:
            path = checkpoint.checkpoint_path(self.ckpt_dir, done)
            state = self.state_dict() if self.env.is_main or self.parallel.sharded else None
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
            lora_training.write_adapters(self.out_dir, self.lora, self.model_config, self.metadata, done, tensors)

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
        self.progress = Progress(f"stage {self.cfg.stage}", self.step, t.max_steps, self.env.is_main)
        self.tic, self.seen = time.perf_counter(), 0
        self.deadline = None if t.max_minutes is None else time.perf_counter() + 60 * float(t.max_minutes)
        if self.extra.get("held_loss_start") is not None and self.step == 0:
            self.logger.log({"held/loss_start": self.extra["held_loss_start"]}, 0)

    def finish(self) -> dict:
        """The stage's summary (also out_dir/summary.json): steps, losses, held losses, where things are."""
        t, mc = self.cfg.train, self.model_config
        if self.stopped_by_signal:
            log.warning("stopped by signal after step %d; checkpoint saved", self.step)
        elif self.out_of_time:
            log.info("train.max_minutes=%s reached after step %d; checkpoint saved", t.max_minutes, self.step)
        if self.writer is not None:
            self.writer.wait()  # an asynchronous save still writing: the summary names it complete
        summary = dict(stage=self.cfg.stage, steps=len(self.history), max_steps=t.max_steps,
                       preempted=self.stopped_by_signal, time_limit_reached=self.out_of_time)
        held = self._held_end()
        if self.env.is_main:
            summary |= self._main_summary(held)
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            title = f"stage {self.cfg.stage}: {mc.name}, {self.n_params / 1e6:.1f}M parameters"
            save_loss_plot(list(range(1, len(self.history) + 1)), self.history, self.out_dir / "loss.png", title)
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
        final = checkpoint.list_checkpoints(self.ckpt_dir)
        finite = [x for x in self.history if math.isfinite(x)]
        tail = finite[-50:]
        measure = self.held is not None and not self.stopped_by_signal
        held = dict(held_loss_start=self.extra.get("held_loss_start"), **held_end)
        if measure:
            ends = {f"held/{k.removeprefix('held_')}": v for k, v in held.items() if v is not None and "end" in k}
            self.logger.log(ends, self.step)
        return dict(
            model=self.model_config.name, parameters=self.n_params, trainable_parameters=self.n_trainable,
            checkpoint=str(final[-1]) if final else None,
            first_loss=finite[0] if finite else None, final_loss=sum(tail) / len(tail) if tail else None, **held,
            validation=self.extra.get("validation"),
            samples=str(self.out_dir / "samples"), loss_plot=str(self.out_dir / "loss.png"),
        )


def train(cfg: DictConfig) -> dict:
    """Run one stage; returns its summary (also written to out_dir/summary.json)."""
    env = distributed.setup(cfg.device, need_group=cfg.train.parallel != "ddp")
    try:
        distributed.quiet_other_ranks(env, cfg.train.log_all_ranks)
        with RunLock.for_run(Path(cfg.train.out_dir), env):
            return Trainer(cfg, env).fit()
    finally:
        distributed.teardown()

