"""What a run reports, from rank 0: a metrics file that always exists, progress, and Weights & Biases.

* `out_dir/metrics.jsonl`: one JSON object per line ({"step": ..., "train/loss": ..., ...}), written whatever the
  wandb mode, so a run's curves survive a cluster without wandb. A resumed run first drops the lines of steps
  after the checkpoint it resumed from (they were trained again), so every step appears once.
* progress: a tqdm bar on a terminal; without one (SLURM, a log file) a plain line at every log step, so logs stay
  readable instead of filling with carriage returns.
* wandb: online with an API key (or a `wandb login` netrc entry), offline otherwise (`wandb sync` later), or
  disabled; imported only when used. The run id is made here and kept in `out_dir/wandb_run_id.txt`, so a resumed
  run continues the same wandb run.
"""

import json
import logging
import math
import os
import secrets
import string
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
_ID_ALPHABET = string.ascii_lowercase + string.digits


def wandb_mode(requested: str) -> str:
    """auto -> online when WANDB_API_KEY is set (or `wandb login` wrote a netrc entry), else offline."""
    if requested not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"wandb.mode={requested!r}: expected auto, online, offline or disabled")
    if requested != "auto":
        return requested
    netrc = Path.home() / ".netrc"
    logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    return "online" if os.environ.get("WANDB_API_KEY") or logged_in else "offline"


def run_id(out_dir: Path) -> str:
    """One wandb run per out_dir, kept across resumes: 8 characters of [a-z0-9], as wandb's own ids."""
    path = out_dir / "wandb_run_id.txt"
    if path.exists():
        return path.read_text().strip()
    new = "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)
    return new


class MetricsFile:
    """Append-only JSON lines; `truncate_after(step)` keeps the lines of steps up to `step`."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, values: dict[str, Any], step: int) -> None:
        row = {"step": step, "time": round(time.time(), 3)}
        row |= {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in values.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class Progress:
    """A bar on a terminal, a line per log step elsewhere."""

    def __init__(self, desc: str, start: int, total: int, enabled: bool, tty: bool | None = None):
        self.desc, self.total, self.enabled = desc, total, enabled
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.bar = None
        if enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(initial=start, total=total, desc=desc, unit="step")

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def report(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        short = dict(loss=f"{values['train/loss']:.4f}", gnorm=f"{values['train/grad_norm']:.2f}",
                     img_s=f"{values['train/img_per_s']:.0f}")
        if self.bar is not None:
            self.bar.set_postfix(**short)
        else:
            print(f"{self.desc}: step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in short.items())
                  + f" lr {values['train/lr']:.3g}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class RunLogger:
    """Scalars to the metrics file and wandb (when on), images to wandb; a no-op on ranks other than 0."""

    def __init__(self, cfg: DictConfig, is_main: bool, out_dir: Path, resumed_step: int | None = None):
        self.run, self.metrics = None, None
        if not is_main:
            return
        self.metrics = MetricsFile(out_dir / METRICS)
        if resumed_step is not None:
            self.metrics.truncate_after(resumed_step)
        mode = wandb_mode(cfg.wandb.mode)
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError as err:
            raise ImportError(f"wandb.mode={mode} but wandb is not installed ({err}); or set wandb=disabled") from err
        w = cfg.wandb
        self.run = wandb.init(
            project=w.project, entity=w.entity, name=w.name or f"stage{cfg.stage}-{out_dir.name}", tags=list(w.tags),
            mode=mode, dir=str(out_dir), config=OmegaConf.to_container(cfg, resolve=True), resume="allow",
            id=run_id(out_dir),
        )
        log.info("wandb %s: %s", mode, self.run.url if mode == "online" else out_dir / "wandb")

    def log(self, values: dict[str, Any], step: int) -> None:
        if self.metrics is not None:
            self.metrics.write(values, step)
        if self.run is not None:
            self.run.log(values, step=step)

    def log_image(self, key: str, path: Path, step: int, caption: str = "") -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path), caption=caption)}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def memory_gb(device: torch.device) -> dict[str, float]:
    """Peak memory so far: the CUDA allocator's on a GPU, the process's resident set on a CPU."""
    if device.type == "cuda":
        return {"train/mem_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"train/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
