"""The model card (README.md) of an exported checkpoint, from what the checkpoint and its run recorded.

Everything comes from files: the checkpoint's metadata, history and resolved config; the checkpoints it started
from (`train.init_from`, and reparameterize.py's `reparameterized_from`), read back stage by stage; each stage's
data manifest (`data.path`/manifest.json: source and licence); the run folder's summary.json and any evaluation
report (evaluation/evaluate.py's JSON) in it or named by --eval-report. What a file does not hold is said to be
unknown, never guessed. The YAML header is huggingface_hub's ModelCardData.

Checkpoints are read with weights_only=True and mmap=True: only the small entries are touched, so walking an XL
run's stages costs little memory.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core import checkpoint

LINEAGE_LIMIT = 12
"""Most checkpoints the card follows back (a run's stages, and reparameterize.py's initialisations between them)."""


@dataclass
class Stage:
    """One checkpoint of the lineage: what it was, how far it trained, on what."""

    path: str
    stage: Any
    step: Any
    name: str
    data: str | None
    history: list[float] = field(default_factory=list)
    note: str = ""


def light_load(path: Path) -> dict:
    """A checkpoint memory-mapped (weights_only=True), so reading its metadata does not read its tensors."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an older zip format cannot be memory-mapped: read it whole
        return checkpoint.load(path)


def _previous(state: dict, here: Path) -> tuple[Path | None, str]:
    """The checkpoint `state` started from, and how (init_from or reparameterized from), if it still exists."""
    meta = state.get("metadata") or {}
    if meta.get("reparameterized_from"):
        source, how = meta["reparameterized_from"], "reparameterize.py"
    else:
        source = ((state.get("config") or {}).get("train") or {}).get("init_from")
        how = "train.init_from"
    if not source:
        return None, ""
    from app.import_weights import is_importable

    if how == "train.init_from" and is_importable(source):  # a Hub id, a diffusers folder, PixArt's .pth ...
        return None, f"from {source} ({how}, imported by app/import_weights.py)"
    try:
        return checkpoint.resolve(Path(source), how), f"from {source} ({how})"
    except FileNotFoundError:
        return None, f"from {source} ({how}; no longer on disk)"


def read_lineage(path: Path) -> list[Stage]:
    """The checkpoint at `path`, then the one it started from, and so on (newest first)."""
    stages: list[Stage] = []
    seen: set[Path] = set()
    current: Path | None = Path(path)
    while current is not None and current.resolve() not in seen and len(stages) < LINEAGE_LIMIT:
        seen.add(current.resolve())
        state = light_load(current)
        meta = state.get("metadata") or {}
        config = state.get("config") or {}
        history = [float(x) for x in state.get("history") or []]
        data = (config.get("data") or {}).get("path") or meta.get("data")
        previous, note = _previous(state, current)
        stages.append(Stage(str(current), meta.get("stage"), state.get("step"), str(meta.get("name") or "model"),
                            data, history, note))
        del state
        current = previous
    return stages


def data_sources(stages: list[Stage]) -> list[dict[str, Any]]:
    """Each distinct data folder of the lineage with its manifest's source, licence and size (or unknown)."""
    out, seen = [], set()
    for stage in stages:
        if not stage.data or stage.data in seen:
            continue
        seen.add(stage.data)
        entry: dict[str, Any] = dict(path=stage.data, source="unknown (no manifest.json)", licence="unknown",
                                     records=None, kind=None)
        manifest = Path(stage.data) / "manifest.json"
        if manifest.is_file():
            try:
                record = json.loads(manifest.read_text())
                spec = record.get("spec") or {}
                entry |= dict(source=spec.get("source") or "not recorded",
                              licence=spec.get("licence") or "not recorded", records=record.get("num_records"),
                              kind=spec.get("kind"))
            except (OSError, ValueError) as err:
                entry["source"] = f"unreadable manifest.json ({err})"
        out.append(entry)
    return out


def run_folder(path: Path) -> Path:
    """The run's out_dir of a checkpoint in `out_dir/checkpoints/`, else the checkpoint's own folder."""
    path = Path(path)
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def evaluations(path: Path, reports: list[Path]) -> dict[str, Any]:
    """The run folder's summary.json and the evaluation reports (the run folder's eval*.json / eval/*.json and the
    ones given), as recorded."""
    folder = run_folder(path)
    found: dict[str, Any] = {}
    summary = folder / "summary.json"
    if summary.is_file():
        found["summary"] = json.loads(summary.read_text())
    candidates = [*sorted(folder.glob("eval*.json")), *sorted((folder / "eval").glob("*.json")), *map(Path, reports)]
    for report in candidates:
        if report.is_file():
            data = json.loads(report.read_text())
            found[str(report)] = {k: data[k] for k in ("accuracy", "no_shape_found", "settings") if k in data} or data
    return found


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render(
    record: checkpoint.CheckpointMetadata,
    parameters: int,
    fmt: str,
    weights: str,
    stages: list[Stage],
    sources: list[dict[str, Any]],
    evals: dict[str, Any],
    usage: str,
    license: str | None = None,
) -> str:
    """The model card's text. `usage`: the format's own loading snippet (app/export.py)."""
    from huggingface_hub import ModelCardData

    cfg = record.model_config
    text = record.conditioning == "text"
    tags = ["rfdit", "rectified-flow", "diffusion-transformer", cfg.family]
    tags += ["pixart-alpha"] if cfg.family == "pixart" else []
    task = "text-to-image" if text else "unconditional-image-generation"
    header = ModelCardData(library_name="diffusers", license=license, tags=tags, pipeline_tag=task).to_yaml()
    sampling = dict(steps=24, cfg_scale=4.0, alpha=1.0) | dict(record.sampling or {})
    vae = record.vae or {}
    lines = [f"---\n{header}\n---", f"# {record.name} ({weights} weights, `{fmt}` export)", "",
             "A rectified-flow diffusion transformer trained with rfdit (t = 0 noise, t = 1 data; the network predicts "
             f"the {'velocity x1 - x0' if record.prediction == 'velocity' else 'clean image (x-prediction)'}).", "",
             "## Architecture", "",
             f"- {cfg.name}: family `{cfg.family}`, width {cfg.dim}, depth {cfg.depth}, {cfg.heads} heads, patch "
             f"{cfg.patch}; **{parameters:,} parameters**",
             f"- conditioning: {record.conditioning}" + (f" ({record.num_classes} classes + the null class)" if not text
                                                        else f" ({cfg.text_len} tokens of {cfg.text_dim} channels)"),
             f"- input: {cfg.in_channels} x {cfg.input_size} x {cfg.input_size}; images of {record.image_size} px; "
             f"latent space `{vae.get('id', 'identity')}` (scale {_fmt(vae.get('scale', 1.0))}, shift "
             f"{_fmt(vae.get('shift', 0.0))}, pixel range {vae.get('pixel_range')})"]
    if text:
        tok = record.tokenizer or {}
        lines.append(f"- text encoder `{(record.text_encoder or {}).get('name_or_path') or 'bundled MiniLM'}`, "
                     f"tokenizer `{tok.get('name') or tok.get('id')}` (max length {tok.get('max_length')})")
    lines += ["", "## Training", "", "Newest first; each line one checkpoint and what it started from.", "",
              "| checkpoint | stage | step | model | losses logged (first -> last) | started |",
              "|---|---:|---:|---|---|---|"]
    for s in stages:
        loss = f"{len(s.history)} ({_fmt(s.history[0])} -> {_fmt(s.history[-1])})" if s.history else "none"
        started = s.note or "from scratch"
        lines.append(f"| `{Path(s.path).name}` | {s.stage} | {s.step} | {s.name} | {loss} | {started} |")
    lines += ["", "## Data", "", "| data | kind | records | source | licence |", "|---|---|---:|---|---|"]
    lines += [f"| `{d['path']}` | {d['kind']} | {d['records']} | {d['source']} | {d['licence']} |" for d in sources]
    if not sources:
        lines.append("| unknown | | | | |")
    lines += ["", *_data_notes(sources), "## Sampling defaults", "",
              f"{sampling['steps']} Euler steps on the alpha-warped grid (alpha = {sampling['alpha']}, diffusers' "
              f"FlowMatchEulerDiscreteScheduler shift), classifier-free guidance {sampling['cfg_scale']}.", "",
              "## Evaluation", ""]
    lines += _evaluation_lines(evals)
    lines += ["", "## Use", "", usage]
    return "\n".join(lines) + "\n"


def _data_notes(sources: list[dict[str, Any]]) -> list[str]:
    """What the card says about the embedded datasets' terms, when the manifests name them."""
    said = " ".join(f"{d['source']} {d['licence']} {d['path']}" for d in sources).lower()
    notes = []
    if "openmoji" in said:
        notes.append("OpenMoji's images are CC BY-SA 4.0: attribution and share-alike apply to what is made from them.")
    if "synthetic" in said:
        notes.append("The synthetic scenes are generated by this repository (data/embedded/synthetic.py).")
    return [" ".join(notes), ""] if notes else []


def _evaluation_lines(evals: dict[str, Any]) -> list[str]:
    if not evals:
        return ["None recorded with this checkpoint's run (no summary.json or evaluation report)."]
    lines = []
    summary = evals.get("summary") or {}
    keys = ("steps", "first_loss", "final_loss", "held_loss_start", "held_loss_end_ema", "held_loss_end_raw")
    if summary:
        lines.append("Run summary (summary.json): " + ", ".join(f"{k} {_fmt(summary[k])}" for k in keys
                                                                  if summary.get(k) is not None) + ".")
    for name, report in evals.items():
        if name != "summary":
            lines.append(f"- `{name}`: {json.dumps(report, default=str)}")
    return lines
