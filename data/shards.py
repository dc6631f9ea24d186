"""Fixed-size latent shards: the on-disk format every training stage reads.

A dataset folder holds `manifest.json` and shards `<prefix>-<index>.pt`, each a dict of tensors saved
with torch.save and loaded with `weights_only=True` (a shard never executes code). Beside each shard,
`<shard>.json` (its record count and checksum, written last: a shard without it is unfinished) and
`<shard>.captions.jsonl` (the captions as text, for people to read). data/README.md documents the
format; `python -m data.validate DIR` checks a folder against it.

Records are buffered in preallocated tensors and each shard is saved sliced to the records it holds,
so no uninitialised rows reach disk, and `close()` saves the last, partial shard.
"""

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.files import write_atomic, write_json_atomic

FORMAT = "rfdit-latent-shards"
VERSION = 1
MANIFEST = "manifest.json"


class ShardError(ValueError):
    """A shard or manifest that does not match the format; names the file and the field."""

    def __init__(self, file: Path | str, field: str, problem: str):
        self.file, self.field, self.problem = str(file), field, problem
        super().__init__(f"{file}: {field}: {problem}")


@dataclass
class DatasetSpec:
    """What every record of a dataset looks like; stored in the manifest."""

    kind: str
    """'labels' (class-conditional: `labels`) or 'text' (`text_tokens` + `attn_mask`)."""
    latent_shape: tuple[int, int, int]
    """[C, H, W] of one latent (pixels for an identity VAE)."""
    image_size: int
    """Side in pixels of the images the latents were encoded from."""
    vae: dict[str, Any]
    """id (hub id, path or 'identity'), scale, shift, pixel_range: x1 = (z - shift) * scale."""
    tokenizer: dict[str, Any] | None = None
    """id, max_length, vocab_size (text datasets)."""
    short_captions: bool = False
    """Text datasets: whether `short_text_tokens` / `short_attn_mask` are present too."""
    num_classes: int | None = None
    class_names: list[str] | None = None
    source: str = ""
    licence: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("labels", "text"):
            raise ValueError(f"DatasetSpec.kind must be 'labels' or 'text', got {self.kind!r}")
        if self.kind == "text" and not self.tokenizer:
            raise ValueError("DatasetSpec.tokenizer (id, max_length, vocab_size) is required for kind='text'")
        if self.kind == "labels" and not self.num_classes:
            raise ValueError("DatasetSpec.num_classes is required for kind='labels'")
        self.latent_shape = tuple(self.latent_shape)

    def expected(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Per-record dtype and shape of every key a shard must hold."""
        keys = {"latents": (torch.bfloat16, self.latent_shape)}
        if self.kind == "labels":
            keys["labels"] = (torch.int64, ())
        else:
            length = (self.tokenizer["max_length"],)
            keys |= {"text_tokens": (torch.int32, length), "attn_mask": (torch.bool, length)}
            if self.short_captions:
                keys |= {"short_text_tokens": (torch.int32, length), "short_attn_mask": (torch.bool, length)}
        return keys


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Accumulates records and writes shards of `records_per_shard` (the last one partial)."""

    def __init__(self, out_dir: Path | str, spec: DatasetSpec, records_per_shard: int = 50_000, prefix: str = "shard"):
        self.out_dir, self.spec, self.capacity, self.prefix = Path(out_dir), spec, records_per_shard, prefix
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.index = 0
        self.written: list[Path] = []
        self._reset()

    def _reset(self) -> None:
        self.count = 0
        self.buffers = {
            k: torch.empty((self.capacity, *shape), dtype=dt) for k, (dt, shape) in self.spec.expected().items()
        }
        self.captions: list[dict[str, Any]] = []

    def shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:05d}.pt"

    def add(self, caption: dict[str, Any] | None = None, **record: Tensor) -> None:
        """Add one record: a tensor per key of `spec.expected()` (unbatched), and optionally its captions."""
        expected = self.spec.expected()
        if set(record) != set(expected):
            raise ValueError(f"record keys {sorted(record)} != expected {sorted(expected)}")
        for key, value in record.items():
            dtype, shape = expected[key]
            value = torch.as_tensor(value)
            if tuple(value.shape) != shape:
                raise ValueError(f"record field {key}: shape {tuple(value.shape)} != {shape}")
            self.buffers[key][self.count] = value.to(dtype)
        self.captions.append(caption or {})
        self.count += 1
        if self.count == self.capacity:
            self.flush()

    def flush(self) -> Path | None:
        """Save the buffered records as the next shard (nothing if empty)."""
        if self.count == 0:
            return None
        path = self.out_dir / self.shard_name(self.index)
        tensors = {k: v[: self.count].clone() for k, v in self.buffers.items()}
        write_atomic(path, lambda f: torch.save(tensors, f))
        lines = "".join(json.dumps(c) + "\n" for c in self.captions)
        write_atomic(path.with_suffix(".captions.jsonl"), lambda f: f.write(lines.encode()))
        # The sidecar comes last: its presence marks the shard finished (resumable pipelines skip it).
        write_json_atomic(path.with_suffix(".json"), {"file": path.name, "records": self.count, "sha256": sha256(path)})
        self.written.append(path)
        self.index += 1
        self._reset()
        return path

    def close(self) -> list[Path]:
        self.flush()
        return self.written


def shard_finished(path: Path) -> bool:
    return path.exists() and path.with_suffix(".json").exists()


def write_manifest(out_dir: Path | str, spec: DatasetSpec, records_per_shard: int) -> dict[str, Any]:
    """Gather every finished shard's sidecar into manifest.json (run after all writers closed)."""
    out_dir = Path(out_dir)
    entries = []
    for sidecar in sorted(out_dir.glob("*.json")):
        if sidecar.name == MANIFEST or sidecar.name.endswith(".captions.json"):
            continue
        entry = json.loads(sidecar.read_text())
        if (out_dir / entry["file"]).exists():
            entries.append(entry)
    entries.sort(key=lambda e: e["file"])
    manifest = dict(
        format=FORMAT,
        version=VERSION,
        spec=dataclasses.asdict(spec),
        records_per_shard=records_per_shard,
        num_records=sum(e["records"] for e in entries),
        shards=entries,
    )
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def read_manifest(data_dir: Path | str) -> tuple[dict[str, Any], DatasetSpec]:
    """The manifest and its spec, with every shard entry checked (check_entry): what it returns is safe to
    open. Raises ShardError naming the manifest and the field (`shards[3].records`)."""
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        raise ShardError(path, "manifest", "missing; build the folder with the sharding pipeline")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(path, "manifest", f"not valid JSON ({err})") from err
    if not isinstance(manifest, dict):
        raise ShardError(path, "manifest", f"is a JSON {type(manifest).__name__}, not a JSON object")
    for key in ("format", "spec", "shards"):
        if key not in manifest:
            raise ShardError(path, key, "missing key")
    if manifest["format"] != FORMAT:
        raise ShardError(path, "format", f"{manifest['format']!r} is not {FORMAT!r}")
    try:
        spec = DatasetSpec(**manifest["spec"])
    except (TypeError, ValueError) as err:
        raise ShardError(path, "spec", str(err)) from err
    if not isinstance(manifest["shards"], list):
        raise ShardError(path, "shards", f"is a JSON {type(manifest['shards']).__name__}, not a list")
    seen: dict[str, int] = {}
    for i, entry in enumerate(manifest["shards"]):
        check_entry(data_dir, entry, path, f"shards[{i}]")
        file = entry["file"]
        if file in seen:
            raise ShardError(path, f"shards[{i}].file", f"{file!r} is listed twice (also as shards[{seen[file]}])")
        seen[file] = i
    if "num_records" in manifest and not _is_count(manifest["num_records"]):
        raise ShardError(path, "num_records", f"{manifest['num_records']!r} is not a non-negative integer")
    return manifest, spec


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_entry(data_dir: Path | str, entry: Any, where: Path | str, name: str = "entry") -> Path:
    """The path of the shard a manifest entry names, inside `data_dir`; raises ShardError(where, name.field).

    `file` must be a relative path without `..`: a manifest can only name files in its own folder (the
    check is on the name, so a symbolic link placed in the folder on purpose is still followed). `records`
    must be a non-negative integer, `sha256` a string where present."""
    if not isinstance(entry, dict):
        raise ShardError(where, name, f"is a JSON {type(entry).__name__}, not an object with file, records, sha256")
    for key in ("file", "records"):
        if key not in entry:
            raise ShardError(where, f"{name}.{key}", "missing")
    file = entry["file"]
    if not isinstance(file, str):
        raise ShardError(where, f"{name}.file", f"{file!r} is not a string")
    parts = Path(file).parts
    if not parts or Path(file).is_absolute() or ".." in parts:
        problem = f"{file!r} is not a file name inside the data folder {data_dir} (e.g. shard-00000.pt)"
        raise ShardError(where, f"{name}.file", problem)
    if not _is_count(entry["records"]):
        raise ShardError(where, f"{name}.records", f"{entry['records']!r} is not a non-negative integer")
    if "sha256" in entry and not isinstance(entry["sha256"], str):
        raise ShardError(where, f"{name}.sha256", f"{entry['sha256']!r} is not a string")
    return Path(data_dir) / file


def load_shard(
    data_dir: Path | str, entry: dict[str, Any], spec: DatasetSpec, verify_checksum: bool = True
) -> dict[str, Tensor]:
    """Load one shard listed in the manifest and check it field by field; raises ShardError."""
    path = check_entry(data_dir, entry, Path(data_dir) / MANIFEST)
    if not path.exists():
        raise ShardError(path, "file", "missing")
    if verify_checksum and sha256(path) != entry.get("sha256"):
        raise ShardError(path, "sha256", "checksum mismatch with the manifest (truncated or modified file)")
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, not a torch file, or a pickle weights_only refuses
        raise ShardError(path, "file", f"unreadable ({type(err).__name__}: {err})") from err
    check_shard(path, shard, entry["records"], spec)
    return shard


def check_shard(path: Path | str, shard: Any, records: int, spec: DatasetSpec) -> None:
    """Every key present with the right dtype and shape; values inside their valid ranges."""
    if not isinstance(shard, dict):
        raise ShardError(path, "file", f"holds a {type(shard).__name__}, not a dict of tensors")
    for key, (dtype, shape) in spec.expected().items():
        if key not in shard:
            raise ShardError(path, key, "missing key")
        value = shard[key]
        if not isinstance(value, Tensor):
            raise ShardError(path, key, f"is a {type(value).__name__}, not a tensor")
        if value.dtype != dtype:
            raise ShardError(path, key, f"dtype {value.dtype} != {dtype}")
        if tuple(value.shape) != (records, *shape):
            raise ShardError(path, key, f"shape {tuple(value.shape)} != {(records, *shape)}")
    # One reduction (NaN propagates through amax): about 5x faster than isfinite().all() on bf16.
    if records and not torch.isfinite(shard["latents"].abs().amax()):
        raise ShardError(path, "latents", "contains NaN or Inf")
    if spec.kind == "labels":
        labels = shard["labels"]
        if records and (labels.min() < 0 or labels.max() >= spec.num_classes):
            raise ShardError(path, "labels", f"values outside [0, {spec.num_classes})")
    else:
        vocab = spec.tokenizer["vocab_size"]
        for key in ("text_tokens", "short_text_tokens"):
            if key in shard and records and (shard[key].min() < 0 or shard[key].max() >= vocab):
                raise ShardError(path, key, f"token ids outside the tokenizer's vocabulary [0, {vocab})")
