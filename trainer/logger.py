"""Run logging on rank 0: a progress bar, and Weights & Biases (online with an API key, offline otherwise,
or disabled). wandb is imported only when used."""

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def wandb_mode(requested: str) -> str:
    """auto -> online when WANDB_API_KEY is set (or `wandb login` wrote a netrc entry), else offline."""
    if requested not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"wandb.mode={requested!r}: expected auto, online, offline or disabled")
    if requested != "auto":
        return requested
    netrc = Path.home() / ".netrc"
    logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    return "online" if os.environ.get("WANDB_API_KEY") or logged_in else "offline"


class RunLogger:
    """Scalars and images to wandb (when on); a no-op on ranks other than 0."""

    def __init__(self, cfg: DictConfig, is_main: bool, out_dir: Path):
        self.run = None
        if not is_main:
            return
        mode = wandb_mode(cfg.wandb.mode)
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError as err:
            raise ImportError(f"wandb.mode={mode} but wandb is not installed ({err}); or set wandb=disabled") from err
        w = cfg.wandb
        self.run = wandb.init(
            project=w.project,
            entity=w.entity,
            name=w.name or f"stage{cfg.stage}-{out_dir.name}",
            tags=list(w.tags),
            mode=mode,
            dir=str(out_dir),
            config=OmegaConf.to_container(cfg, resolve=True),
            resume="allow",
            id=self._run_id(out_dir),
        )
        log.info("wandb %s: %s", mode, self.run.url if mode == "online" else out_dir / "wandb")

    @staticmethod
    def _run_id(out_dir: Path) -> str:
        """One wandb run per out_dir, kept across resumes, so a resumed run continues the same curves."""
        path = out_dir / "wandb_run_id.txt"
        if path.exists():
            return path.read_text().strip()
        import wandb

        run_id = wandb.util.generate_id()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id)
        return run_id

    def log(self, values: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def log_image(self, key: str, path: Path, step: int, caption: str = "") -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path), caption=caption)}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
