"""The training loop shared by every stage: fetch -> loss -> backward -> clip -> step -> EMA -> log,
preview and checkpoint on cadence.

This is the single-process form; DDP, text conditioning, the shard loader and wandb join it as the
training work lands (see the issues), without a second copy of the loop.
"""

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from data.synthetic import ColouredDiscs
from flow import build_timestep_sampler, flow_matching_loss, interpolate, sample
from models import build_model, model_config
from trainer import checkpoint
from trainer.ema import EMA
from trainer.images import save_grid, save_loss_plot
from trainer.optim import build_optimizer, lr_factor

log = logging.getLogger(__name__)


def build_data(cfg: DictConfig) -> ColouredDiscs:
    if cfg.data.kind != "discs":
        raise ValueError(f"data.kind={cfg.data.kind!r} is not available yet; known: 'discs'")
    return ColouredDiscs(image_size=cfg.data.image_size, batch_size=cfg.train.batch_size, seed=cfg.seed)


def drop_labels(labels: torch.Tensor, p: float, null_label: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample Bernoulli(p) replacement by the null class, so the model also learns p(x) for guidance."""
    drop = torch.rand(labels.shape, generator=gen) < p
    return torch.where(drop, torch.full_like(labels, null_label), labels)


@torch.no_grad()
def preview(model: torch.nn.Module, cfg: DictConfig, path: Path) -> None:
    """A grid of samples from fixed noise: one column per preview label, rows are seeds."""
    p = cfg.train.preview
    labels = torch.tensor(list(p.labels)).repeat(p.rows)
    gen = torch.Generator().manual_seed(p.seed)
    size = cfg.data.image_size
    x0 = torch.randn(len(labels), model.config.in_channels, size, size, generator=gen)
    uncond = dict(labels=torch.full_like(labels, model.null_label))
    x1 = sample(
        model,
        x0,
        dict(labels=labels),
        uncond,
        steps=p.steps,
        alpha=p.alpha,
        cfg_scale=p.cfg_scale,
        prediction=cfg.train.prediction,
    )
    save_grid(x1, path, cols=len(p.labels), scale=p.scale)


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


def train(cfg: DictConfig) -> dict:
    """Run a stage; returns a summary (final loss, checkpoint path, figures)."""
    if cfg.stage != 1:
        raise NotImplementedError(
            f"stage {cfg.stage} trains on captions; text conditioning in the loop arrives with the data and "
            "training issues. Stage 1 (class-conditional) runs today: python train_stage1.py experiment=embedded"
        )
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.train.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    data = build_data(cfg)

    mcfg = model_config(cfg.model.name, **OmegaConf.to_container(cfg.model.overrides, resolve=True))
    if mcfg.family == "ccdit" and mcfg.num_classes != data.num_classes:
        raise ValueError(f"model.overrides.num_classes={mcfg.num_classes} but the data has {data.num_classes}")
    model = build_model(mcfg)
    n_params = sum(p.numel() for p in model.parameters())
    e = cfg.train.ema
    ema = EMA(model, decay=e.decay, every=e.every, warmup_steps=e.warmup_steps, start_decay=e.start_decay)
    o = cfg.optim
    opt = build_optimizer(model, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps)
    max_steps = cfg.train.max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, o.warmup_steps, max_steps, o.decay_fraction))
    timesteps = build_timestep_sampler(**OmegaConf.to_container(cfg.train.timesteps, resolve=True))
    step, history = 0, []
    drop_gen = torch.Generator().manual_seed(cfg.seed + 1)  # label dropout draws, checkpointed with the rest

    resume_from = resolve_resume(cfg.train.resume, ckpt_dir)
    if resume_from is not None:
        state = checkpoint.load(resume_from)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        drop_gen.set_state(state["rng"]["label_dropout"])
        step, history = state["step"], state["history"]
        log.info("resumed from %s at step %d", resume_from, step)

    def save(at: int) -> Path:
        path = checkpoint.checkpoint_path(ckpt_dir, at)
        checkpoint.save_atomic(
            dict(
                model=model.state_dict(),
                ema=ema.state_dict(),
                optimizer=opt.state_dict(),
                scheduler=sched.state_dict(),
                step=at,
                history=history,
                rng=dict(torch=torch.get_rng_state(), label_dropout=drop_gen.get_state()),
                config=OmegaConf.to_container(cfg, resolve=True),
                metadata=dict(
                    model=mcfg.to_dict(),
                    stage=cfg.stage,
                    space="pixel",
                    pixel_range=[-1, 1],
                    prediction=cfg.train.prediction,
                    class_names=data.class_names,
                ),
            ),
            path,
        )
        checkpoint.prune(ckpt_dir, cfg.train.keep_checkpoints)
        return path

    model.train()
    bar = tqdm(range(step, max_steps), initial=step, total=max_steps, desc=f"stage {cfg.stage}", unit="step")
    tic = time.perf_counter()
    for step in bar:
        batch = data.batch(step)
        x1 = batch["image"]
        labels = drop_labels(batch["label"], cfg.train.label_dropout, model.null_label, drop_gen)
        x0 = torch.randn_like(x1)
        t = timesteps(x1.shape[0])
        x_t = interpolate(x0, x1, t)
        loss = flow_matching_loss(model(x_t, t, labels=labels), x0, x1, x_t, t, prediction=cfg.train.prediction)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        ema.update(model, step + 1)
        history.append(loss.item())

        done = step + 1
        if done % cfg.train.log_every == 0 or done == max_steps:
            recent = history[-cfg.train.log_every :]
            rate = len(recent) * x1.shape[0] / (time.perf_counter() - tic)
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", gnorm=f"{grad_norm:.2f}", img_s=f"{rate:.0f}")
            tic = time.perf_counter()
        if done % cfg.train.sample_every == 0 or done == max_steps:
            preview(ema.model, cfg, out_dir / "samples" / f"step_{done:08d}_ema.png")
        if done % cfg.train.ckpt_every == 0 or done == max_steps:
            save(done)

    final = checkpoint.list_checkpoints(ckpt_dir)[-1]
    title = f"stage {cfg.stage}: {mcfg.name}, {n_params / 1e6:.1f}M parameters"
    save_loss_plot(list(range(1, len(history) + 1)), history, out_dir / "loss.png", title)
    tail = history[-50:]
    summary = dict(
        stage=cfg.stage,
        steps=len(history),
        final_loss=sum(tail) / len(tail),
        first_loss=history[0],
        checkpoint=str(final),
        samples=str(out_dir / "samples"),
        loss_plot=str(out_dir / "loss.png"),
    )
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
