"""The model card (README.md) of an exported checkpoint, from what the checkpoint and its run recorded.

Everything comes from files: the checkpoint's metadata, history and resolved config; the checkpoints it started
from (`train.init_from`, and reparameterize.py's `reparameterized_from`), read back stage by stage; each stage's
data manifest (`data.path`/manifest.json: source and licence); the run folder's summary.json and any evaluation
report (evaluation/evaluate.py's JSON) in it or named by --eval-report. What a file does not hold is said to be
unknown, never guessed. The YAML header is huggingface_hub's ModelCardData.

A checkpoint can come from anyone and the card may be published (--push-to-hub), so what a file records is
untrusted text: every value quoted is one line of at most TEXT_LIMIT characters with Markdown and HTML escaped
(`plain`, `cell_code`); the files a checkpoint names are read only when they are regular files of bounded size
(READ_LIMIT), with what fails to read said in the card, never raised. Checkpoints are read with weights_only=True
and mmap=True: only the small entries are touched, so walking an XL run's stages costs little memory.
"""

import html
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core import checkpoint

LINEAGE_LIMIT = 12
"""Most checkpoints the card follows back (a run's stages, and reparameterize.py's initialisations between them)."""
TEXT_LIMIT = 200
"""Most characters of one recorded value quoted in the card."""
READ_LIMIT = 64 << 20
"""Largest JSON file (manifest, summary, evaluation report) the card reads."""
PATH_LIMIT = 4096
"""Longest recorded path the card follows."""


class ReportError(ValueError):
    """An evaluation report the user named (--eval-report) that cannot be read; the message names the file."""


# ---- untrusted text ------------------------------------------------------------------------------------------


def one_line(value: Any, limit: int = TEXT_LIMIT) -> str:
    """`value` as text on one line of at most `limit` characters: control and format characters (newlines,
    escapes, bidirectional overrides) become spaces, and the end is cut with an ellipsis."""
    text = value if isinstance(value, str) else repr(value) if not isinstance(value, int | float) else str(value)
    text = text[: limit * 2]
    text = "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


_MARKDOWN = re.compile(r"([\\`\[\]|])")
"""What a recorded value could build structure with: code spans, links and images, table cells (and the escape
character itself). Emphasis is left alone: it changes no structure."""


def plain(value: Any, limit: int = TEXT_LIMIT) -> str:
    """Recorded text for the card's prose and table cells: `one_line`, HTML escaped, and the Markdown characters
    of _MARKDOWN backslash-escaped, so no value can open a link, an image, a code span, a table cell or a tag."""
    return _MARKDOWN.sub(r"\\\1", html.escape(one_line(value, limit), quote=False))


def cell_code(value: Any, limit: int = TEXT_LIMIT) -> str:
    """Recorded text as inline code in a table cell: `one_line`, with no backtick (which would end the span) and
    the cell separator escaped (a table reads `\\|` as a literal bar, inside code too)."""
    return "`" + one_line(value, limit).replace("`", "'").replace("|", "\\|") + "`"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return plain(value)


def read_json(path: Path) -> Any:
    """A JSON file's content; ValueError saying why not (not a regular file, larger than READ_LIMIT, not JSON)."""
    try:
        if not path.is_file():
            raise ValueError("not a regular file")
        if path.stat().st_size > READ_LIMIT:
            raise ValueError(f"larger than {READ_LIMIT >> 20} MiB")
        with open(path, "rb") as f:
            data = f.read(READ_LIMIT + 1)
        return json.loads(data)
    except (OSError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"unreadable ({type(err).__name__})") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err.msg} at line {err.lineno})") from err


def _recorded_path(value: Any) -> Path | None:
    """A path recorded in a checkpoint, if it can be one (a string of sane length, no NUL)."""
    if not isinstance(value, str) or not value or len(value) > PATH_LIMIT or "\0" in value:
        return None
    return Path(value)


@dataclass
class Stage:
    """One checkpoint of the lineage: what it was, how far it trained, on what (recorded values, untrusted)."""

    path: str
    stage: Any
    step: Any
    name: Any
    data: str | None
    losses: int = 0
    """Losses the checkpoint's history holds."""
    first_loss: Any = None
    last_loss: Any = None
    note: str = ""


def light_load(path: Path) -> dict:
    """A checkpoint memory-mapped (weights_only=True), so reading its metadata does not read its tensors."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an older zip format cannot be memory-mapped: read it whole
        return checkpoint.load(path)


def _mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _previous(state: dict, here: Path) -> tuple[Path | None, str]:
    """The checkpoint `state` started from, and how (init_from or reparameterized from), if it still exists."""
    meta = _mapping(state.get("metadata"))
    if meta.get("reparameterized_from"):
        source, how = meta["reparameterized_from"], "reparameterize.py"
    else:
        source = _mapping(_mapping(state.get("config")).get("train")).get("init_from")
        how = "train.init_from"
    if not source:
        return None, ""
    from app.import_weights import is_importable

    if how == "train.init_from" and isinstance(source, str) and is_importable(source):  # a Hub id, PixArt .pth ...
        return None, f"from {one_line(source)} ({how}, imported by app/import_weights.py)"
    path = _recorded_path(source)
    if path is None:
        return None, f"from {one_line(source)} ({how}; not a path)"
    try:
        return checkpoint.resolve(path, how), f"from {source} ({how})"
    except (OSError, ValueError):
        return None, f"from {source} ({how}; no longer on disk)"


def read_lineage(path: Path) -> list[Stage]:
    """The checkpoint at `path`, then the one it started from, and so on (newest first). A checkpoint named by
    another that cannot be read ends the walk, said in the note of the one that named it."""
    stages: list[Stage] = []
    seen: set[Path] = set()
    current: Path | None = Path(path)
    while current is not None and current.resolve() not in seen and len(stages) < LINEAGE_LIMIT:
        seen.add(current.resolve())
        try:
            state = light_load(current)
        except (checkpoint.CheckpointError, OSError) as err:
            if not stages:
                raise
            stages[-1].note += f"; unreadable: {one_line(err)}"
            break
        if not isinstance(state, dict):
            stages[-1].note += "; not a checkpoint"
            break
        meta = _mapping(state.get("metadata"))
        history = state.get("history") if isinstance(state.get("history"), list) else []
        data = _mapping(_mapping(state.get("config")).get("data")).get("path") or meta.get("data")
        previous, note = _previous(state, current)
        stages.append(Stage(str(current), meta.get("stage"), state.get("step"), meta.get("name") or "model",
                            data if isinstance(data, str) else None, len(history),
                            history[0] if history else None, history[-1] if history else None, note))
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
        folder = _recorded_path(stage.data)
        manifest = folder / "manifest.json" if folder is not None else None
        if manifest is not None and os.path.lexists(manifest):
            try:
                record = _mapping(read_json(manifest))
                spec = _mapping(record.get("spec"))
                entry |= dict(source=spec.get("source") or "not recorded",
                              licence=spec.get("licence") or "not recorded", records=record.get("num_records"),
                              kind=spec.get("kind"))
            except ValueError as err:
                entry["source"] = f"manifest.json {err}"
        out.append(entry)
    return out


def run_folder(path: Path) -> Path:
    """The run's out_dir of a checkpoint in `out_dir/checkpoints/`, else the checkpoint's own folder."""
    path = Path(path)
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def evaluations(path: Path, reports: list[Path]) -> dict[str, Any]:
    """The run folder's summary.json and the evaluation reports (the run folder's eval*.json / eval/*.json and the
    ones given), as recorded. A report the user named that cannot be read raises ReportError naming it; one found
    in the run folder is listed as unreadable, with why."""
    folder = run_folder(path)
    found: dict[str, Any] = {}
    for report in reports:
        try:
            found[str(report)] = _report(read_json(report))
        except ValueError as err:
            raise ReportError(f"--eval-report {report}: {err}") from err
    summary = folder / "summary.json"
    if summary.exists():
        try:
            found["summary"] = _mapping(read_json(summary))
        except ValueError as err:
            found[str(summary)] = dict(unreadable=str(err))
    for report in [*sorted(folder.glob("eval*.json")), *sorted((folder / "eval").glob("*.json"))]:
        if str(report) not in found:
            try:
                found[str(report)] = _report(read_json(report))
            except ValueError as err:
                found[str(report)] = dict(unreadable=str(err))
    return found


def _report(data: Any) -> Any:
    """What the card quotes of an evaluation report: its accuracy, no-shape rate and settings, if it has them."""
    if isinstance(data, dict):
        return {k: data[k] for k in ("accuracy", "no_shape_found", "settings") if k in data} or data
    return data


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
    sampling = dict(steps=24, cfg_scale=4.0, alpha=1.0) | dict(record.sampling or {})  # checked when read
    vae = _mapping(record.vae)
    lines = [f"---\n{header}\n---", f"# {plain(record.name)} ({weights} weights, `{fmt}` export)", "",
             "A rectified-flow diffusion transformer trained with rfdit (t = 0 noise, t = 1 data; the network predicts "
             f"the {'velocity x1 - x0' if record.prediction == 'velocity' else 'clean image (x-prediction)'}).", "",
             "## Architecture", "",
             f"- {plain(cfg.name)}: family `{cfg.family}`, width {_fmt(cfg.dim)}, depth {_fmt(cfg.depth)}, "
             f"{_fmt(cfg.heads)} heads, patch {_fmt(cfg.patch)}; **{parameters:,} parameters**",
             f"- conditioning: {record.conditioning}"
             + (f" ({_fmt(record.num_classes)} classes + the null class)" if not text
                else f" ({_fmt(cfg.text_len)} tokens of {_fmt(cfg.text_dim)} channels)"),
             f"- input: {_fmt(cfg.in_channels)} x {_fmt(cfg.input_size)} x {_fmt(cfg.input_size)}; images of "
             f"{_fmt(record.image_size)} px; latent space {plain(vae.get('id', 'identity'))} (scale "
             f"{_fmt(vae.get('scale', 1.0))}, shift {_fmt(vae.get('shift', 0.0))}, pixel range "
             f"{plain(vae.get('pixel_range'))})"]
    if text:
        tok = _mapping(record.tokenizer)
        encoder = _mapping(record.text_encoder).get("name_or_path") or "bundled MiniLM"
        lines.append(f"- text encoder {plain(encoder)}, tokenizer {plain(tok.get('name') or tok.get('id'))} "
                     f"(max length {_fmt(tok.get('max_length'))})")
    lines += ["", "## Training", "", "Newest first; each line one checkpoint and what it started from.", "",
              "| checkpoint | stage | step | model | losses logged (first -> last) | started |",
              "|---|---:|---:|---|---|---|"]
    for s in stages:
        loss = f"{s.losses} ({_fmt(s.first_loss)} -> {_fmt(s.last_loss)})" if s.losses else "none"
        lines.append(f"| {cell_code(Path(s.path).name)} | {_fmt(s.stage)} | {_fmt(s.step)} | {plain(s.name)} | "
                     f"{loss} | {plain(s.note or 'from scratch', 2 * TEXT_LIMIT)} |")
    lines += ["", "## Data", "", "| data | kind | records | source | licence |", "|---|---|---:|---|---|"]
    lines += [f"| {cell_code(d['path'])} | {_fmt(d['kind'])} | {_fmt(d['records'])} | {plain(d['source'])} | "
              f"{plain(d['licence'])} |" for d in sources]
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
    said = " ".join(one_line(f"{d['source']} {d['licence']} {d['path']}", 4 * TEXT_LIMIT) for d in sources).lower()
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
            lines.append(f"- {plain(name)}: {plain(json.dumps(report, default=str)[: 8 * TEXT_LIMIT], 4 * TEXT_LIMIT)}")
    return lines
