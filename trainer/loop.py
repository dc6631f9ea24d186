"""The one training loop behind every train_stageN.py.

    fetch -> forward and loss under autocast -> backward (no DDP sync while accumulating) -> clip -> step
    -> EMA -> log, preview and checkpoint on cadence

It runs as one plain process or under torchrun (trainer/distributed.py). What differs between stages is
config: the data (labels or captions), the model family, the weights a stage starts from (train.init_from).

Determinism. Every random draw of a step (label or caption dropout, noise x0, time t) comes from a generator
seeded by (seed, step, virtual rank), virtual rank = rank * grad_accum + micro-batch. So the draws do not
depend on anything a run carries in memory: a run resumed from a checkpoint replays exactly the draws the
uninterrupted run made, and 2 ranks x 1 micro-batch see the same draws as 1 rank x 2 micro-batches (with
the loader's matching split: data/loader.py gives slot s = rank * workers + worker).
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
from tqdm import tqdm

from data.loader import ShardDataset, build_loader, mix_seed
from data.pipeline.encoders import autoencoder_for
from flow import build_timestep_sampler, flow_matching_loss, interpolate, resolution_shift
from models import build_model
from trainer import builders, checkpoint, distributed
from trainer.ema import EMA
from trainer.fast_path import apply_compile, checkpoint_blocks
from trainer.images import save_loss_plot
from trainer.logger import RunLogger
from trainer.main_grad import MainGrads
from trainer.optim import build_optimizer, lr_factor
from trainer.precision import Precision
from trainer.preemption import PreemptionFlag
from trainer.preview import Previewer

log = logging.getLogger(__name__)


def step_generator(seed: int, step: int | str, virtual_rank: int, device: torch.device) -> torch.Generator:
    """The generator of one micro-batch's draws; see the module docstring."""
    gen = torch.Generator(device=device)
    gen.manual_seed(mix_seed(seed, "step", step, virtual_rank))
    return gen


def resolve_resume(resume: str, ckpt_dir: Path) -> Path | None:
    """train.resume: 'auto' (newest checkpoint in out_dir, if any), 'never', or a checkpoint path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = checkpoint.list_checkpoints(ckpt_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"train.resume={resume!r}: not 'auto', 'never' or an existing checkpoint file")
    return path


def micro_batch_size(batch_size: int, world_size: int, grad_accum: int) -> int:
    if grad_accum < 1 or batch_size % (world_size * grad_accum):
        raise ValueError(
            f"train.batch_size={batch_size} must split evenly over {world_size} ranks x train.grad_accum="
            f"{grad_accum} micro-batches"
        )
    return batch_size // (world_size * grad_accum)


def build_timesteps(cfg: DictConfig, model_config):
    """train.timesteps, with shift=auto meaning SD3's sqrt(tokens / base tokens) against the base grid."""
    ts = OmegaConf.to_container(cfg.train.timesteps, resolve=True)
    if ts.get("shift") == "auto":
        grid = model_config.input_size // model_config.patch
        ts["shift"] = resolution_shift(grid * grid, model_config.base_grid**2)
        log.info("timestep shift %.3f (%dx%d tokens against a %dx%d base grid)", ts["shift"], grid, grid,
                 model_config.base_grid, model_config.base_grid)
    return build_timestep_sampler(**ts)


def rng_states() -> dict[str, Any]:
    """Global RNG states: the loop draws from its own generators, but code it calls may use these."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's key array as a tensor: checkpoints load with weights_only=True, which refuses numpy objects.
    numpy_state = dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=pos, has_gauss=has_gauss,
                       gauss=gauss)
    states = dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=numpy_state)
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def flow_loss(model, x1: torch.Tensor, cond: dict, timesteps, gen: torch.Generator, prediction: str) -> torch.Tensor:
    """One micro-batch's rectified-flow loss; noise and times from `gen` (after any dropout draws)."""
    x0 = torch.randn(x1.shape, generator=gen, device=x1.device)
    t = timesteps(x1.shape[0], generator=gen, device=x1.device)
    x_t = interpolate(x0, x1, t)
    return flow_matching_loss(model(x_t, t, **cond), x0, x1, x_t, t, prediction=prediction)


class HeldLoss:
    """The loss on fixed batches with fixed noise and times and no dropout: comparable within a stage and
    across a stage boundary (summary.json: held_loss_start / held_loss_end_*)."""

    def __init__(self, cfg: DictConfig, micro: int, conditioning, timesteps, device, precision):
        self.batches: list[dict[str, torch.Tensor]] = []
        if cfg.train.eval_batches > 0:
            data = ShardDataset(cfg.data.path, seed=mix_seed(cfg.seed, "held"), batch_size=micro,
                                verify_checksum=False)
            stream = iter(data)
            self.batches = [next(stream) for _ in range(cfg.train.eval_batches)]
        self.seed, self.conditioning, self.timesteps = cfg.seed, conditioning, timesteps
        self.device, self.precision, self.prediction = device, precision, cfg.train.prediction

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, unconditional: bool = False) -> float | None:
        """Mean loss over the held batches; `unconditional` replaces every condition by the null one."""
        if not self.batches:
            return None
        losses = []
        for i, batch in enumerate(self.batches):
            gen = step_generator(self.seed, "held", i, self.device)
            x1 = batch["latents"].to(self.device, torch.float32)
            if unconditional:
                cond = self.conditioning.null(len(x1), self.device)
            else:
                cond = self.conditioning.from_batch(batch, None, self.device)
            with self.precision.forward():
                losses.append(flow_loss(model, x1, cond, self.timesteps, gen, self.prediction).item())
        return sum(losses) / len(losses)


def train(cfg: DictConfig) -> dict:
    """Run one stage; returns its summary (also written to out_dir/summary.json)."""
    env = distributed.setup(cfg.get("device"))
    try:
        return _train(cfg, env)
    finally:
        distributed.teardown()


def _train(cfg: DictConfig, env: distributed.Distributed) -> dict:
    t = cfg.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    device, out_dir = env.device, Path(t.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    micro = micro_batch_size(t.batch_size, env.world_size, t.grad_accum)
    precision = Precision(cfg.precision, device)

    # ---- data, conditioning, model -----------------------------------------------------------------------
    spec = builders.read_data_spec(cfg)
    builders.check_vae(cfg, spec, cfg.data.path)
    conditioning = builders.build_conditioning(cfg, spec, device, precision.model_dtype)
    resume_from = resolve_resume(t.resume, ckpt_dir)
    resumed = checkpoint.load(resume_from) if resume_from is not None else None
    init = None if resumed is not None else builders.read_init_checkpoint(cfg)
    base = (resumed or (init[1] if init else {})).get("metadata", {}).get("model")
    mcfg = builders.build_model_config(cfg, spec, conditioning, base)
    # All three global RNGs from the seed (checkpoints carry them): two runs of one config start alike.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    model = build_model(mcfg)
    if init is not None:
        builders.apply_initial_weights(model, init[0], init[1], t.init_weights)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    converted = precision.convert(model)
    ema = EMA(model, decay=t.ema.decay, every=t.ema.every, warmup_steps=t.ema.warmup_steps,
              start_decay=t.ema.start_decay)
    o = cfg.optim
    fused = o.fused if o.fused is not None else device.type == "cuda"
    opt = build_optimizer(model, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, o.warmup_steps, t.max_steps, o.decay_fraction)
    )
    timesteps = build_timesteps(cfg, mcfg)
    held = HeldLoss(cfg, micro, conditioning, timesteps, device, precision) if env.is_main else None

    step, history, bad_in_row, extra = 0, [], 0, {}
    loader_state = saved_rng = None
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        ema.load_state_dict(resumed["ema"])
        opt.load_state_dict(resumed["optimizer"])
        sched.load_state_dict(resumed["scheduler"])
        saved_rng = resumed["rng"]  # restored just before the loop: set-up below draws from the global RNGs
        step, history, loader_state = resumed["step"], resumed["history"], resumed["loader"]
        bad_in_row, extra = resumed.get("bad_in_row", 0), resumed.get("extra", {})
        log.info("resumed from %s at step %d", resume_from, step)
    elif held is not None:
        extra["held_loss_start"] = held(model)
    del resumed, init  # a several-GB checkpoint need not stay in memory

    loader = build_loader(
        cfg.data.path, micro, env.rank, env.world_size, seed=cfg.seed, num_workers=cfg.data.num_workers,
        state=loader_state, short_caption_prob=cfg.data.short_caption_prob, mix_shards=cfg.data.mix_shards,
        verify_checksum=cfg.data.verify_checksum, skip_bad_shards=cfg.data.skip_bad_shards,
    )
    batches = iter(loader)
    # After the EMA copy: the fast path changes how the trained model runs, never its parameters or names.
    if t.get("activation_checkpointing"):
        checkpoint_blocks(model)
    forward_model = apply_compile(model, t.compile)
    # te.Linear(fuse_wgrad_accumulation) leaves .grad empty: its weights are reduced through main_grad instead.
    main_grads = MainGrads(model, env.world_size) if converted and precision.fuse_wgrad_accumulation else None
    if env.enabled:
        if main_grads:
            main_grads.exclude_from_ddp(forward_model)
            main_grads.broadcast()
        forward_model = DistributedDataParallel(forward_model, device_ids=[device.index] if device.type == "cuda"
                                                else None)

    vae = autoencoder_for(spec.vae, cfg.vae.name_or_path, cfg.vae.subfolder, device) if env.is_main else None
    previewer = Previewer(cfg, conditioning, vae, mcfg, precision, device) if env.is_main else None
    logger = RunLogger(cfg, env.is_main, out_dir)
    metadata = dict(
        model=mcfg.to_dict(), family=mcfg.family, size=mcfg.size, name=mcfg.name, stage=cfg.stage,
        parameters=n_params, prediction=t.prediction, space="pixel" if spec.vae.get("id") == "identity" else "latent",
        vae=dict(spec.vae, kind=cfg.vae.kind, name_or_path=cfg.vae.name_or_path, subfolder=cfg.vae.subfolder),
        latent_shape=list(spec.latent_shape), image_size=spec.image_size,
        text_encoder=OmegaConf.to_container(cfg.text_encoder, resolve=True) if spec.kind == "text" else None,
        sampling=dict(steps=t.preview.steps, cfg_scale=t.preview.cfg_scale, alpha=t.preview.alpha),
        data=str(cfg.data.path), linear_layout="te" if converted else "torch",
        **conditioning.metadata(),
    )

    def save(at: int) -> Path:
        path = checkpoint.checkpoint_path(ckpt_dir, at)
        if env.is_main:
            samples = (at * t.grad_accum) * micro
            checkpoint.save_atomic(
                dict(
                    model=model.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(),
                    scheduler=sched.state_dict(), step=at, history=history, bad_in_row=bad_in_row, extra=extra,
                    loader=loader.dataset.state_at(samples), rng=rng_states(),
                    config=OmegaConf.to_container(cfg, resolve=True), metadata=metadata,
                ),
                path,
            )
            checkpoint.prune(ckpt_dir, t.keep_checkpoints)
        env.barrier()
        return path

    def preview(at: int) -> None:
        if previewer is None:
            return
        model.eval()
        for name, weights in (("ema", ema.model), ("raw", model)):
            path = previewer(weights, out_dir / "samples" / f"step_{at:08d}_{name}.png")
            logger.log_image(f"samples/{name}", path, at, caption=" | ".join(previewer.captions))
        model.train()

    if saved_rng is not None:
        # After everything that draws from the global RNGs on the way here (iter(loader) takes a base seed from
        # torch's), so the loop continues with the states the uninterrupted run had at that step.
        restore_rng_states(saved_rng)
    model.train()
    bar = tqdm(range(step, t.max_steps), initial=step, total=t.max_steps, desc=f"stage {cfg.stage}", unit="step",
               disable=not env.is_main)
    tic, seen, stop, out_of_time = time.perf_counter(), 0, False, False
    deadline = None if t.get("max_minutes") is None else time.perf_counter() + 60 * float(t.max_minutes)
    with PreemptionFlag() as preempted:
        for step in bar:
            loss_sum = torch.zeros((), device=device)
            for m in range(t.grad_accum):
                batch = next(batches)
                gen = step_generator(cfg.seed, step, env.rank * t.grad_accum + m, device)
                sync = m == t.grad_accum - 1 or not env.enabled
                with nullcontext() if sync else forward_model.no_sync():
                    x1 = batch["latents"].to(device=device, dtype=torch.float32)
                    cond = conditioning.from_batch(batch, gen, device)  # dropout draws come first from gen
                    with precision.forward():
                        loss = flow_loss(forward_model, x1, cond, timesteps, gen, t.prediction)
                    (loss / t.grad_accum).backward()
                loss_sum += loss.detach() / t.grad_accum
            if main_grads:
                main_grads.reduce()  # the all-reduce DDP does not do for them, once per step
                main_grads.to_grad()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            # One all-reduce per step carries the loss (for logging), the preemption flag and the time limit, so
            # every rank decides to skip a bad step or to stop after this one identically.
            flags = [float(preempted.set), float(deadline is not None and time.perf_counter() >= deadline)]
            stats = env.all_reduce_sum(torch.cat([loss_sum.double()[None],
                                                  torch.tensor(flags, dtype=torch.float64, device=device)]))
            mean_loss, stop, out_of_time = stats[0].item() / env.world_size, stats[1].item() > 0, stats[2].item() > 0
            good = math.isfinite(mean_loss) and math.isfinite(grad_norm.item())
            if good:
                opt.step()
                bad_in_row = 0
            else:
                bad_in_row += 1
                log.warning("step %d: non-finite loss %.4g or gradient norm %.4g; step skipped (%d in a row)",
                            step + 1, mean_loss, grad_norm.item(), bad_in_row)
            opt.zero_grad(set_to_none=True)
            if main_grads:
                main_grads.zero()
            sched.step()
            done = step + 1
            if good:
                ema.update(model, done)
            history.append(mean_loss)
            seen += t.batch_size
            if bad_in_row >= t.max_bad_steps:
                last = checkpoint.list_checkpoints(ckpt_dir)
                raise RuntimeError(
                    f"{bad_in_row} consecutive steps (to step {done}) had a non-finite loss or gradient; stopping "
                    f"(train.max_bad_steps={t.max_bad_steps}). Last good checkpoint: "
                    f"{last[-1] if last else 'none yet'}. Lower optim.lr or check the data (python -m data.validate)"
                )

            if done % t.log_every == 0 or done == t.max_steps:
                elapsed = time.perf_counter() - tic
                recent = [x for x in history[-t.log_every:] if math.isfinite(x)]
                values = {
                    "train/loss": sum(recent) / max(1, len(recent)), "train/grad_norm": grad_norm.item(),
                    "train/lr": sched.get_last_lr()[0], "train/img_per_s": seen / elapsed,
                }
                if device.type == "cuda":
                    values["train/mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                bar.set_postfix(loss=f"{values['train/loss']:.4f}", gnorm=f"{values['train/grad_norm']:.2f}",
                                img_s=f"{values['train/img_per_s']:.0f}")
                logger.log(values, done)
                tic, seen = time.perf_counter(), 0
            final_step = done == t.max_steps or out_of_time
            if done % t.sample_every == 0 or final_step:
                preview(done)
            if done % t.ckpt_every == 0 or final_step or stop:
                save(done)
            if stop:
                log.warning("stopped by signal %s after step %d; checkpoint saved", preempted.received, done)
                break
            if out_of_time:
                log.info("train.max_minutes=%s reached after step %d; checkpoint saved", t.max_minutes, done)
                break
    bar.close()

    summary = dict(stage=cfg.stage, steps=len(history), max_steps=t.max_steps, preempted=stop,
                   time_limit_reached=out_of_time)
    if env.is_main:
        final = checkpoint.list_checkpoints(ckpt_dir)
        finite = [x for x in history if math.isfinite(x)]
        title = f"stage {cfg.stage}: {mcfg.name}, {n_params / 1e6:.1f}M parameters"
        save_loss_plot(list(range(1, len(history) + 1)), history, out_dir / "loss.png", title)
        tail = finite[-50:]
        summary |= dict(
            model=mcfg.name, parameters=n_params, checkpoint=str(final[-1]) if final else None,
            first_loss=finite[0] if finite else None, final_loss=sum(tail) / len(tail) if tail else None,
            held_loss_start=extra.get("held_loss_start"),
            held_loss_end_ema=held(ema.model) if held is not None and not summary["preempted"] else None,
            held_loss_end_raw=held(model) if held is not None and not summary["preempted"] else None,
            # The null condition: what reparameterize.py carries into the next stage exactly (at t*).
            held_loss_end_ema_unconditional=held(ema.model, unconditional=True)
            if held is not None and not summary["preempted"] else None,
            samples=str(out_dir / "samples"), loss_plot=str(out_dir / "loss.png"),
        )
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.finish()
    return summary
