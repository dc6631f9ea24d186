"""The sharding pipeline: this rank's inputs -> filtered crops -> captions -> tokens + latents -> shards.

Inputs are units of work (data/pipeline/inputs.py): a WebDataset tar, a run of an image folder's files, a run of a
dataset's rows, a stream shard or a parquet file; what follows says "tar" for any of them.

Resume design: one input unit is the unit of work, done or not done.
  - Tar `train_0003.tar` writes `shard-train_0003-00000.pt, -00001.pt, ...` (records_per_shard each, the
    last partial; with aspect-ratio buckets one series per bucket, `shard-train_0003+512x1024-00000.pt`) and
    then, atomically, `progress/train_0003.done.json`: its shard files, drop counts and the dataset spec it
    was written with. Output names depend on the tar alone, never on the rank or world
    size, so a rerun may use another --world-size.
  - On start a rank skips every tar whose marker exists and whose listed shards are all finished (`.pt` and
    sidecar `.json`, see data/shards.py). Any other tar is redone from scratch: its leftovers (finished or
    temp shards of an interrupted run, a stale marker) are deleted first. Redone output equals a clean run's
    (VAE means, tokenizer and tar captions are deterministic; VLM captions are sampled, so they differ).
  - A shard is never visible half-written: ShardWriter writes through temp names and renames.
  - A tar that cannot be read to its end (cut on disk, a download short of its Content-Length, a damaged
    header or compressed stream, a failing `pipe:` command: sources.iter_tar_samples) fails alone: its shards
    written so far are deleted, it gets no marker, it is logged by name and listed in RankResult.failed, and
    the rank goes on with its other tars. So the folder is never finalized without it, and a rerun redoes it.
  - Redoing any tar deletes a manifest.json left from an earlier finalize: it lists that tar's old shards.
  - A marker written with a different spec (other VAE, tokenizer, sizes, inputs ...) is an error, so one
    folder never mixes two configurations.
Finalize: when every input tar has its marker (so none failed, on any rank), `finalize` checks that the
markers agree and that the folder holds exactly their shards, adds the summed drop counts to spec.extra and
writes manifest.json. Every rank tries this after its own tars, so the last rank to finish writes it;
`--finalize` does it explicitly.

Shard order inside a tar follows the tar: the training loader wants shuffled sources, which webdataset
tars written by img2dataset-style tools are.

Text features (`text_features=True`, an encoder given): each kept caption, long and short, is encoded once by
the frozen encoder, and its states go into the shards beside the tokens (data/features.py). Memory: each shard
writer holds at most `buffer_bytes` / (number of buckets) of records before it appends them to disk
(data/shards.py), so a rank's peak does not grow with records_per_shard.
"""

import dataclasses
import functools
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from core.files import write_json_atomic
from core.images import images_to_tensor
from core.tokenizer import TextTokenizer
from core.vae import ImageAutoencoder
from data.buckets import Bucket, buckets_as_json
from data.features import encoder_identity, features_record
from data.pipeline.captioners import Captioner, derive_short
from data.pipeline.inputs import InputUnit, as_units
from data.pipeline.sources import DropCounts, Prepared, SourceError, ordered_map, prepare_sample, split_for_rank
from data.shards import BUFFER_BYTES, MANIFEST, DatasetSpec, ShardWriter, shard_finished, write_manifest

log = logging.getLogger(__name__)
PROGRESS_DIR = "progress"


class PipelineError(RuntimeError):
    """Inconsistent inputs or outputs (bad label, mixed specs, unfinished dataset); says what to do."""


@dataclass
class PipelineConfig:
    inputs: list[InputUnit | str]
    """Every input unit of the dataset, in the order all ranks agree on (inputs.py; a str is a tar URL)."""
    out_dir: Path
    kind: str = "text"
    image_size: int = 256
    caption_size: int | None = 512
    """Side of the captioner's crop (VLM backends); the VAE's is image_size."""
    rank: int = 0
    world_size: int = 1
    records_per_shard: int = 50_000
    batch_size: int = 64
    min_std: float = 0.02
    """Drop images whose every channel has a standard deviation below this (pixels in [0, 1])."""
    short_captions: bool = True
    num_classes: int | None = None
    class_names: list[str] | None = None
    source: str = ""
    licence: str = ""
    inputs_description: dict[str, Any] = field(default_factory=dict)
    """How the inputs were named (base_url + num_shards, or input_glob): recorded in spec.extra."""
    decode_workers: int = 4
    timeout: float = 60.0
    progress: bool = True
    buckets: list[Bucket] | None = None
    """Aspect-ratio buckets (data/buckets.py): each image goes to the nearest; None: square crops of image_size."""
    text_features: bool = False
    """Store the frozen encoder's states of every caption (needs an encoder passed to run_rank)."""
    text_encoder_subfolder: str | None = None
    """The encoder's subfolder inside its folder or hub repository, for its identity."""
    buffer_bytes: int = BUFFER_BYTES
    """Records a rank keeps in memory before its shard writers append them to disk (shared by the buckets)."""


@dataclass
class RankResult:
    processed: list[str]
    """The names of the units this rank did (a tar's URL, inputs.InputUnit.name)."""
    skipped: list[str]
    counts: DropCounts
    manifest: dict[str, Any] | None
    """The manifest when this rank found every unit done and finalized the folder."""
    failed: dict[str, str] = field(default_factory=dict)
    """Unit name -> why it could not be read whole (SourceError): no marker, no shards; a rerun redoes it."""


def build_spec(
    cfg: PipelineConfig, captioner: Captioner, tokenizer: TextTokenizer | None, vae: ImageAutoencoder,
    encoder: Any = None,
) -> DatasetSpec:
    text = cfg.kind == "text"
    caption_size = cfg.caption_size if captioner.needs_images else None
    if text and tokenizer is None:
        raise PipelineError("kind='text' needs a tokenizer")
    features = None
    if cfg.text_features:
        if not text or encoder is None:
            raise PipelineError("text_features needs kind='text' and a text encoder")
        identity = encoder_identity(encoder.name, cfg.text_encoder_subfolder)
        features = features_record(identity | dict(model_type=encoder.model_type), encoder.hidden_size,
                                   tokenizer.max_length)
    latent_shape = vae.latent_shape(cfg.image_size)
    buckets = None
    if cfg.buckets:
        factor = cfg.image_size // latent_shape[1]
        try:
            buckets = buckets_as_json(cfg.buckets, latent_shape[0], factor)
        except ValueError as err:
            raise PipelineError(f"buckets: {err}") from err
    extra = dict(
        inputs=cfg.inputs_description or dict(num_inputs=len(cfg.inputs)),
        captioner=captioner.describe(),
        filters=dict(min_side=cfg.image_size, min_std=cfg.min_std, caption_size=caption_size),
    )
    return DatasetSpec(
        kind=cfg.kind,
        latent_shape=latent_shape,
        image_size=cfg.image_size,
        vae=dict(vae.info),
        tokenizer=tokenizer.info if text else None,
        short_captions=text and cfg.short_captions,
        num_classes=cfg.num_classes or (len(cfg.class_names) if cfg.class_names else None),
        class_names=cfg.class_names,
        source=cfg.source,
        licence=cfg.licence,
        extra=extra,
        buckets=buckets,
        text_features=features,
    )


def _as_json(spec: DatasetSpec) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(spec)))  # tuples -> lists, as read back from a marker


def marker_path(out_dir: Path, stem: str) -> Path:
    return Path(out_dir) / PROGRESS_DIR / f"{stem}.done.json"


def read_marker(out_dir: Path, stem: str) -> dict[str, Any] | None:
    path = marker_path(out_dir, stem)
    return json.loads(path.read_text()) if path.exists() else None


def is_done(out_dir: Path, stem: str) -> bool:
    marker = read_marker(out_dir, stem)
    return marker is not None and all(shard_finished(Path(out_dir) / f) for f in marker["shards"])


def clean_partial(out_dir: Path, stem: str) -> list[Path]:
    """Delete every output of one tar (shards, sidecars, captions, temp files, marker) before redoing it."""
    out_dir = Path(out_dir)
    # A bucket's series is `shard-STEM+HxW-00000.pt`: a stem never holds '+' (sources.input_stem), so no stem's
    # files are taken for another's.
    pattern = re.compile(rf"\.?shard-{re.escape(stem)}(\+\d+x\d+)?-\d{{5}}\.(pt|json|captions\.jsonl)(\.tmp-.+)?")
    removed = [p for p in out_dir.glob(f"*shard-{stem}[-+]*") if pattern.fullmatch(p.name)]
    marker = marker_path(out_dir, stem)
    removed += [marker] if marker.exists() else []
    removed += list(marker.parent.glob(f".{marker.name}.tmp-*"))
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def _label(meta: dict[str, Any], num_classes: int, where: str) -> int:
    label = (meta.get("json") or {}).get("label")
    if not isinstance(label, int) or not 0 <= label < num_classes:
        raise PipelineError(f"{where}: json 'label' is {label!r}; kind='labels' needs an int in [0, {num_classes})")
    return label


@dataclass
class Tools:
    """What turns prepared samples into records: the captioner, the tokenizer (text), the VAE and, for stored
    text features, the frozen encoder."""

    captioner: Captioner
    tokenizer: TextTokenizer | None
    vae: ImageAutoencoder
    encoder: Any = None


class _Writers:
    """One ShardWriter per bucket of one input tar, made when the bucket's first record comes (unbucketed: one)."""

    def __init__(self, cfg: PipelineConfig, spec: DatasetSpec, stem: str):
        self.cfg, self.spec, self.stem = cfg, spec, stem
        self.by_bucket: dict[str | None, ShardWriter] = {}
        self.budget = max(1, cfg.buffer_bytes // max(1, len(cfg.buckets or ())))

    def __getitem__(self, bucket: Bucket | None) -> ShardWriter:
        name = bucket.name if bucket is not None else None
        if name not in self.by_bucket:
            prefix = f"shard-{self.stem}" + (f"+{name}" if name else "")
            self.by_bucket[name] = ShardWriter(self.cfg.out_dir, self.spec, self.cfg.records_per_shard, prefix,
                                               bucket=name, buffer_bytes=self.budget)
        return self.by_bucket[name]

    def close(self) -> list[str]:
        return sorted(p.name for w in self.by_bucket.values() for p in w.close())

    def abort(self) -> None:
        for writer in self.by_bucket.values():
            writer.abort()


def _write_batch(
    batch: list[Prepared], stem: str, name: str, writers: _Writers, counts: DropCounts, tools: Tools
) -> None:
    spec = writers.spec
    pairs = tools.captioner.caption([p.caption_image for p in batch], [p.meta for p in batch])
    keep = []
    for sample, (long, short) in zip(batch, pairs, strict=True):
        if spec.kind == "text" and not long:
            counts.no_caption += 1  # an empty caption would teach the unconditional branch a random image
            continue
        keep.append((sample, long, short or (derive_short(long) if spec.short_captions else "")))
    by_bucket: dict[Bucket | None, list] = {}
    for item in keep:  # the VAE encodes images of one size at a time
        by_bucket.setdefault(item[0].bucket, []).append(item)
    for bucket, group in by_bucket.items():
        latents = tools.vae.encode(images_to_tensor([s.image for s, _, _ in group]))
        record_keys = _text_records(spec, tools, [long for _, long, _ in group], [short for _, _, short in group])
        for j, (sample, long, short) in enumerate(group):
            caption: dict[str, Any] = dict(key=sample.key, input=stem)
            caption |= {k: v for k, v in (("caption", long), ("short_caption", short)) if v}
            record = {k: v[j] for k, v in record_keys.items()} | {"latents": latents[j]}
            if spec.kind == "labels":
                caption["label"] = _label(sample.meta, spec.num_classes, f"{name} sample {sample.key}")
                record["labels"] = torch.tensor(caption["label"], dtype=torch.int64)
            writers[bucket].add(caption=caption, **record)
            counts.written += 1


def _text_records(spec: DatasetSpec, tools: Tools, longs: list[str], shorts: list[str]) -> dict[str, torch.Tensor]:
    """Batched tokens and masks of the long (and short) captions, and with stored features the encoder's states."""
    if spec.kind != "text":
        return {}
    keys = {}
    keys["text_tokens"], keys["attn_mask"] = tools.tokenizer(longs)
    if spec.short_captions:
        keys["short_text_tokens"], keys["short_attn_mask"] = tools.tokenizer(shorts)
    for key, (mask_key, _) in spec.feature_keys().items():
        tokens = keys[mask_key.replace("attn_mask", "text_tokens")]
        keys[key] = tools.encoder(tokens, keys[mask_key]).cpu()  # once per caption, never again while training
    return keys


def process_unit(
    unit: InputUnit, cfg: PipelineConfig, spec: DatasetSpec, tools: Tools, bar: tqdm | None = None
) -> DropCounts:
    """Turn one input unit into its shards and marker (from scratch: leftovers are deleted first). Raises
    SourceError, after deleting what it wrote, when the unit cannot be read whole."""
    stem = unit.stem
    (Path(cfg.out_dir) / MANIFEST).unlink(missing_ok=True)
    if removed := clean_partial(cfg.out_dir, stem):
        log.info("%s: removed %d leftover files of an interrupted run", stem, len(removed))
    try:
        counts = _write_shards(unit, cfg, spec, tools, bar)
    except SourceError:
        clean_partial(cfg.out_dir, stem)
        raise
    return counts


def _write_shards(
    unit: InputUnit, cfg: PipelineConfig, spec: DatasetSpec, tools: Tools, bar: tqdm | None
) -> DropCounts:
    stem = unit.stem
    writers = _Writers(cfg, spec, stem)
    counts = DropCounts()
    caption_size = cfg.caption_size if tools.captioner.needs_images else None
    prepare = functools.partial(
        prepare_sample, image_size=cfg.image_size, caption_size=caption_size, min_std=cfg.min_std,
        buckets=cfg.buckets,
    )
    batch: list[Prepared] = []
    try:
        for result in ordered_map(prepare, unit.samples(), cfg.decode_workers):
            counts.seen += 1
            if bar is not None:
                bar.update(1)
            if isinstance(result, str):
                setattr(counts, result, getattr(counts, result) + 1)
                continue
            batch.append(result)
            if len(batch) == cfg.batch_size:
                _write_batch(batch, stem, unit.name, writers, counts, tools)
                batch = []
        if batch:
            _write_batch(batch, stem, unit.name, writers, counts, tools)
    except BaseException:
        writers.abort()  # the raw files of unfinished shards; finished ones go with clean_partial
        raise
    shards = writers.close()
    marker = dict(input=unit.name, stem=stem, shards=shards, records=counts.written, counts=dataclasses.asdict(counts))
    marker |= dict(records_per_shard=cfg.records_per_shard, spec=_as_json(spec))
    # Written last and atomically: its presence means every shard above is finished.
    marker_path(cfg.out_dir, stem).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker_path(cfg.out_dir, stem), marker)
    return counts


def run_rank(
    cfg: PipelineConfig, captioner: Captioner, tokenizer: TextTokenizer | None, vae: ImageAutoencoder,
    encoder: Any = None,
) -> RankResult:
    """Process this rank's tars (skipping done ones); finalize the folder if every tar is now done. `encoder`: the
    frozen text encoder (core/text_encoder.py) whose states cfg.text_features stores."""
    spec = build_spec(cfg, captioner, tokenizer, vae, encoder)
    tools = Tools(captioner, tokenizer, vae, encoder)
    units = as_units(cfg.inputs, cfg.timeout)
    mine = split_for_rank(units, cfg.rank, cfg.world_size)
    done = {u.stem for u in mine if is_done(cfg.out_dir, u.stem)}
    for stem in sorted(done):  # before any work: a folder must never mix two configurations
        _check_same_spec(read_marker(cfg.out_dir, stem), spec, cfg.records_per_shard, stem)
    result = RankResult([], [u.name for u in mine if u.stem in done], DropCounts(), None)
    if done:
        log.info("rank %d: skipping %d of %d input units already done", cfg.rank, len(done), len(mine))
    todo = [u for u in mine if u.stem not in done]
    # In a batch job's log file a bar redrawn ten times a second is noise: one line a minute there.
    interval = 0.5 if sys.stderr.isatty() else 60.0
    bar = tqdm(desc=f"rank {cfg.rank}/{cfg.world_size}", unit="img", disable=not cfg.progress, mininterval=interval)
    for i, unit in enumerate(todo):
        try:
            result.counts.add(process_unit(unit, cfg, spec, tools, bar))
            result.processed.append(unit.name)
        except SourceError as err:
            log.error("%s failed, its shards are removed and a rerun redoes it: %s", unit.stem, err)
            result.failed[unit.name] = str(err)
        c = result.counts
        bar.set_postfix(
            tars=f"{i + 1}/{len(todo)}", failed=len(result.failed), small=c.too_small, flat=c.degenerate,
            bad=c.undecodable,
        )
    bar.close()
    if all(is_done(cfg.out_dir, u.stem) for u in units):
        result.manifest = finalize(cfg.out_dir, units)
    return result


def _check_same_spec(marker: dict[str, Any], spec: DatasetSpec, records_per_shard: int, stem: str) -> None:
    current = _as_json(spec) | dict(records_per_shard=records_per_shard)
    written = marker["spec"] | dict(records_per_shard=marker["records_per_shard"])
    if written != current:
        fields = _differences(written, current)
        raise PipelineError(
            f"{PROGRESS_DIR}/{stem}.done.json was written with different settings ({', '.join(fields)} differ); "
            "rerun with the original flags, or use a fresh --out-dir"
        )


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the leaves where two nested dicts differ, e.g. ['extra.filters.min_std']."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(prefix + key)
    return out


def finalize(out_dir: Path | str, inputs: list[InputUnit | str]) -> dict[str, Any]:
    """Check that every input unit is done and the markers agree, then write manifest.json; returns it."""
    out_dir = Path(out_dir)
    stems = [u.stem for u in as_units(inputs)]
    missing = [s for s in stems if not is_done(out_dir, s)]
    if missing:
        raise PipelineError(
            f"{len(missing)} of {len(stems)} input tars are not done (e.g. {missing[:3]}); run the ranks that "
            "own them (rerunning the same command resumes), then finalize"
        )
    markers = [read_marker(out_dir, s) for s in stems]
    first = markers[0]
    for stem, marker in zip(stems, markers, strict=True):
        _check_same_spec(marker, DatasetSpec(**first["spec"]), first["records_per_shard"], stem)
    expected = {f for m in markers for f in m["shards"]}
    strays = sorted({p.name for p in out_dir.glob("*.pt")} - expected)
    if strays:
        raise PipelineError(
            f"{out_dir} holds shards no done input tar lists (e.g. {strays[:3]}): left from another run? "
            "Delete them or use a fresh --out-dir"
        )
    total = DropCounts()
    for marker in markers:
        total.add(DropCounts(**marker["counts"]))
    spec = DatasetSpec(**first["spec"])
    spec.extra["counts"] = dataclasses.asdict(total)
    manifest = write_manifest(out_dir, spec, first["records_per_shard"])
    if manifest["num_records"] != total.written:
        raise PipelineError(f"manifest has {manifest['num_records']} records, the markers {total.written}")
    return manifest
