"""Fixed-size latent shards: the on-disk format every training stage reads.

A dataset folder holds `manifest.json` and shards `<prefix>-<index>.pt`, each a dict of tensors saved
with torch.save and loaded with `weights_only=True` (a shard never executes code). Beside each shard,
`<shard>.json` (its record count, bucket and checksum, written last: a shard without it is unfinished) and
`<shard>.captions.jsonl` (the captions as text, for people to read). data/README.md documents the
format; `python -m data.validate DIR` checks a folder against it.

Bounded memory. The writer keeps at most `buffer_bytes` of records in memory: it appends them to one raw file per
key beside the shard, and when the shard is complete writes the torch.save container with its storages left empty
(`torch.serialization.skip_data`) and copies each raw file into its storage's place, in chunks. So the peak is the
buffer, not the shard (the old writer held the shard twice: 52 GB for 50,000 latents of 16x128x128). The result is
what torch.save writes with `set_crc32_options(False)`: the sidecar's sha256 is the shard's checksum. Checking a
shard (`check_shard`) reads its values a chunk at a time from a mapping it drops after each chunk, so a check
never holds more than two chunks of any tensor, nor copies one.

Buckets. A dataset of several image sizes (aspect-ratio buckets, data/buckets.py) lists them in `spec.buckets`;
each shard holds one bucket, named by its manifest entry's `bucket`, and the manifest counts the records of each.

Text features. A text dataset may also hold its frozen encoder's states (data/features.py: the layout, the
encoder's identity in `spec.text_features`).
"""

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.files import temp_name, write_atomic, write_json_atomic
from data.features import FEATURE_KEYS, check_features_record

FORMAT = "rfdit-latent-shards"
VERSION = 1
MANIFEST = "manifest.json"
BUFFER_BYTES = 256 << 20
"""What a ShardWriter keeps in memory before it appends its records to disk (per writer)."""
CHECK_CHUNK_BYTES = 64 << 20
"""How much of a tensor one step of check_shard reads."""


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
    buckets: dict[str, dict[str, list[int]]] | None = None
    """Aspect-ratio buckets (data/buckets.py), {name: {size: [h, w] pixels, latent_shape: [c, h, w]}}: each shard
    holds one (its manifest entry's `bucket`). None: every record has `latent_shape`. With buckets, latent_shape
    and image_size describe the square of the resolution the buckets share their pixel count with."""
    text_features: dict[str, Any] | None = None
    """Text datasets with the encoder's states stored (data/features.py): encoder identity, width, dtype,
    max_length, layout. None: tokens only, encoded while training."""

    def __post_init__(self) -> None:
        if self.kind not in ("labels", "text"):
            raise ValueError(f"DatasetSpec.kind must be 'labels' or 'text', got {self.kind!r}")
        if self.kind == "text" and not self.tokenizer:
            raise ValueError("DatasetSpec.tokenizer (id, max_length, vocab_size) is required for kind='text'")
        if self.kind == "labels" and not self.num_classes:
            raise ValueError("DatasetSpec.num_classes is required for kind='labels'")
        self.latent_shape = tuple(self.latent_shape)
        if self.buckets is not None:
            self._check_buckets()
        if self.text_features is not None:
            if self.kind != "text":
                raise ValueError("DatasetSpec.text_features needs kind='text'")
            check_features_record(self.text_features, self.tokenizer)

    def _check_buckets(self) -> None:
        if not isinstance(self.buckets, dict) or not self.buckets:
            raise ValueError(f"DatasetSpec.buckets must be a non-empty object of buckets, got {self.buckets!r}")
        for name, bucket in self.buckets.items():
            shape = bucket.get("latent_shape") if isinstance(bucket, dict) else None
            size = bucket.get("size") if isinstance(bucket, dict) else None
            good = (isinstance(shape, list | tuple) and len(shape) == 3 and isinstance(size, list | tuple)
                    and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in (*shape, *size)))
            if not good or name != f"{size[0]}x{size[1]}":
                raise ValueError(f"DatasetSpec.buckets[{name!r}] must be {{size: [h, w], latent_shape: [c, h, w]}} "
                                 f"named 'HxW' by its size, got {bucket!r}")
            if shape[0] != self.latent_shape[0]:
                raise ValueError(f"DatasetSpec.buckets[{name!r}] has {shape[0]} channels, latent_shape "
                                 f"{self.latent_shape[0]}")

    def latent_shape_of(self, bucket: str | None) -> tuple[int, int, int]:
        """[C, H, W] of the latents of a shard of `bucket` (None: an unbucketed dataset)."""
        if (bucket is None) != (self.buckets is None):
            raise ValueError(f"bucket {bucket!r} for a dataset with buckets {self.buckets and list(self.buckets)}")
        if bucket is None:
            return self.latent_shape
        if bucket not in self.buckets:
            raise ValueError(f"bucket {bucket!r} is not one of the dataset's {list(self.buckets)}")
        return tuple(self.buckets[bucket]["latent_shape"])

    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """Every latent shape a batch of this dataset can have."""
        if self.buckets is None:
            return [self.latent_shape]
        return [tuple(b["latent_shape"]) for b in self.buckets.values()]

    def expected(self, bucket: str | None = None) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Per-record dtype and shape of every key a shard of `bucket` holds one row per record of (the text
        features, rows per token, are `feature_keys`)."""
        keys = {"latents": (torch.bfloat16, self.latent_shape_of(bucket))}
        if self.kind == "labels":
            keys["labels"] = (torch.int64, ())
        else:
            length = (self.tokenizer["max_length"],)
            keys |= {"text_tokens": (torch.int32, length), "attn_mask": (torch.bool, length)}
            if self.short_captions:
                keys |= {"short_text_tokens": (torch.int32, length), "short_attn_mask": (torch.bool, length)}
        return keys

    def feature_keys(self) -> dict[str, tuple[str, str]]:
        """Feature key -> (its mask key, its offsets key), for the captions this dataset stores features of."""
        if self.text_features is None:
            return {}
        keys = dict(FEATURE_KEYS)
        if not self.short_captions:
            keys.pop("short_text_features")
        return keys

    @property
    def feature_width(self) -> int:
        return int(self.text_features["width"])


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Takes records one at a time and writes shards of `records_per_shard` (the last one partial), keeping at most
    about `buffer_bytes` of them in memory (module docstring). `bucket` names the bucket every record of this
    writer has (datasets with `spec.buckets`). Use as a context manager, or call `close()` (and `abort()` on an
    error, which removes what an unfinished shard left on disk)."""

    def __init__(
        self,
        out_dir: Path | str,
        spec: DatasetSpec,
        records_per_shard: int = 50_000,
        prefix: str = "shard",
        bucket: str | None = None,
        buffer_bytes: int = BUFFER_BYTES,
    ):
        if records_per_shard < 1 or buffer_bytes < 1:
            raise ValueError(f"records_per_shard and buffer_bytes must be >= 1, got {records_per_shard}, "
                             f"{buffer_bytes}")
        self.out_dir, self.spec, self.capacity, self.prefix = Path(out_dir), spec, records_per_shard, prefix
        self.bucket, self.buffer_bytes = bucket, buffer_bytes
        self.expected = spec.expected(bucket)  # also refuses a bucket the spec does not list
        self.features = spec.feature_keys()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.index = 0
        self.written: list[Path] = []
        self._reset()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def _reset(self) -> None:
        self.count = 0
        self.pending: dict[str, list[Tensor]] = {k: [] for k in (*self.expected, *self.features)}
        self.pending_bytes = 0
        self.lengths: dict[str, list[int]] = {k: [] for k in self.features}  # real tokens per record
        self.captions: list[dict[str, Any]] = []

    def shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:05d}.pt"

    def _part(self, key: str) -> Path:
        """The raw file holding key's records of the shard being written (a temporary name: a rerun's cleanup
        and `abort` remove it)."""
        tmp = temp_name(self.out_dir / self.shard_name(self.index))
        return tmp.with_name(f"{tmp.name}.{key}")

    def add(self, caption: dict[str, Any] | None = None, **record: Tensor) -> None:
        """Add one record: a tensor per key of `spec.expected()` (unbatched), for a dataset with text features the
        encoder's states of each caption ([max_length, width], as the encoder returns one row: the writer keeps
        those of the real tokens), and optionally its captions."""
        keys = {*self.expected, *self.features}
        if set(record) != keys:
            raise ValueError(f"record keys {sorted(record)} != expected {sorted(keys)}")
        rows: dict[str, Tensor] = {}
        for key, (dtype, shape) in self.expected.items():
            value = torch.as_tensor(record[key])
            if tuple(value.shape) != shape:
                raise ValueError(f"record field {key}: shape {tuple(value.shape)} != {shape}")
            rows[key] = value.to(dtype).clone()  # its own copy: a view would keep the caller's whole batch alive
        for key, (mask_key, _) in self.features.items():
            value, mask = torch.as_tensor(record[key]), rows[mask_key]
            expected = (len(mask), self.spec.feature_width)
            if tuple(value.shape) != expected:
                raise ValueError(f"record field {key}: shape {tuple(value.shape)} != {expected} (max_length, width)")
            rows[key] = value[mask].to(torch.bfloat16)  # the real tokens, in mask order (a copy)
            self.lengths[key].append(len(rows[key]))
        for key, value in rows.items():
            self.pending[key].append(value)
            self.pending_bytes += value.numel() * value.element_size()
        self.captions.append(caption or {})
        self.count += 1
        if self.pending_bytes >= self.buffer_bytes:
            self._spill()
        if self.count == self.capacity:
            self.flush()

    def _spill(self) -> None:
        """Append the buffered records to their raw files and forget them, one at a time (stacking them first
        would hold the buffer twice)."""
        for key, values in self.pending.items():
            if values:
                with open(self._part(key), "ab") as f:
                    while values:
                        f.write(_raw(values.pop(0)))
        self.pending_bytes = 0

    def flush(self) -> Path | None:
        """Save the records taken since the last shard as the next shard (nothing if none)."""
        if self.count == 0:
            return None
        self._spill()
        path = self.out_dir / self.shard_name(self.index)
        shapes = {k: ((self.count, *shape), dtype) for k, (dtype, shape) in self.expected.items()}
        offsets = {}
        for key, (_, offsets_key) in self.features.items():
            shapes[key] = ((sum(self.lengths[key]), self.spec.feature_width), torch.bfloat16)
            offsets[offsets_key] = torch.tensor([0, *self.lengths[key]], dtype=torch.int64).cumsum(0)
            shapes[offsets_key] = ((self.count + 1,), torch.int64)
        write_atomic(path, lambda f: self._assemble(f, shapes, offsets))
        self._remove_parts()
        lines = "".join(json.dumps(c) + "\n" for c in self.captions)
        write_atomic(path.with_suffix(".captions.jsonl"), lambda f: f.write(lines.encode()))
        # The sidecar comes last: its presence marks the shard finished (resumable pipelines skip it).
        sidecar = {"file": path.name, "records": self.count, "sha256": sha256(path)}
        if self.bucket is not None:
            sidecar["bucket"] = self.bucket
        write_json_atomic(path.with_suffix(".json"), sidecar)
        self.written.append(path)
        self.index += 1
        self._reset()
        return path

    def _assemble(self, f, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], small: dict[str, Tensor]) -> None:
        """Write the shard into `f`: the container with empty storages, then each key's bytes in their place."""
        # torch.empty only reserves address space: untouched, and skip_data never reads it.
        placeholders = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in shapes.items()}
        crc = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)  # the record bytes are not there yet to checksum
        try:
            with torch.serialization.skip_data():
                torch.save(placeholders, f)
        finally:
            torch.serialization.set_crc32_options(crc)
        del placeholders
        f.flush()
        located = torch.load(f.name, map_location=torch.device("meta"), weights_only=True)
        for key in shapes:
            f.seek(located[key].untyped_storage()._checkpoint_offset)
            if key in small:
                f.write(_raw(small[key]))
                continue
            part = self._part(key)
            if part.exists():  # absent for a key with no bytes at all (features of empty captions)
                with open(part, "rb") as src:
                    while block := src.read(1 << 24):
                        f.write(block)

    def _remove_parts(self) -> None:
        for key in self.pending:
            self._part(key).unlink(missing_ok=True)

    def close(self) -> list[Path]:
        self.flush()
        return self.written

    def abort(self) -> None:
        """Forget the unfinished shard and remove its raw files (finished shards stay)."""
        self._remove_parts()
        self._reset()


def _raw(tensor: Tensor) -> memoryview:
    """A tensor's bytes, as torch.save stores them (native byte order, row-major)."""
    return memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())


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
    if spec.buckets is not None:  # records per bucket, every bucket of the table listed (0 where none fell)
        manifest["buckets"] = {name: sum(e["records"] for e in entries if e.get("bucket") == name)
                               for name in spec.buckets}
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
        _check_bucket(entry, spec, path, f"shards[{i}]")
        file = entry["file"]
        if file in seen:
            raise ShardError(path, f"shards[{i}].file", f"{file!r} is listed twice (also as shards[{seen[file]}])")
        seen[file] = i
    if "num_records" in manifest and not _is_count(manifest["num_records"]):
        raise ShardError(path, "num_records", f"{manifest['num_records']!r} is not a non-negative integer")
    return manifest, spec


def _check_bucket(entry: dict[str, Any], spec: DatasetSpec, where: Path, name: str) -> None:
    """A bucketed dataset's entries each name one of its buckets; an unbucketed one's name none."""
    bucket = entry.get("bucket")
    if spec.buckets is None and bucket is not None:
        raise ShardError(where, f"{name}.bucket", f"{bucket!r}, but spec.buckets lists none")
    if spec.buckets is not None and bucket not in spec.buckets:
        raise ShardError(where, f"{name}.bucket", f"{bucket!r} is not one of spec.buckets {list(spec.buckets)}")


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
    """Load one shard listed in the manifest, memory-mapped, and check it field by field; raises ShardError."""
    path = check_entry(data_dir, entry, Path(data_dir) / MANIFEST)
    if not path.exists():
        raise ShardError(path, "file", "missing")
    if verify_checksum and sha256(path) != entry.get("sha256"):
        raise ShardError(path, "sha256", "checksum mismatch with the manifest (truncated or modified file)")
    shard = _open(path)
    check_shard(path, shard, entry["records"], spec, entry.get("bucket"))
    return _open(path)  # a fresh mapping: the check's chunks are not resident in it


def _open(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, not a torch file, or a pickle weights_only refuses
        raise ShardError(path, "file", f"unreadable ({type(err).__name__}: {err})") from err


def check_shard(path: Path | str, shard: Any, records: int, spec: DatasetSpec, bucket: str | None = None) -> None:
    """Every key present with the right dtype and shape; values inside their valid ranges (read a chunk at a time
    from `path` when it is a file, else from `shard` itself)."""
    if not isinstance(shard, dict):
        raise ShardError(path, "file", f"holds a {type(shard).__name__}, not a dict of tensors")
    expected = {key: (dtype, (records, *shape)) for key, (dtype, shape) in spec.expected(bucket).items()}
    for _, offsets_key in spec.feature_keys().values():
        expected[offsets_key] = (torch.int64, (records + 1,))  # where each record's rows start, then the total
    for key, (dtype, shape) in expected.items():
        _check_tensor(path, shard, key, dtype, shape)
    chunks = _Chunks(path, shard)
    # One pass per chunk over min and max: NaN propagates through both, Inf shows in one, and nothing is allocated.
    if records and not all(torch.isfinite(torch.stack(torch.aminmax(c))).all() for c in chunks(shard, "latents")):
        raise ShardError(path, "latents", "contains NaN or Inf")
    if spec.kind == "labels":
        labels = shard["labels"]
        if records and (labels.min() < 0 or labels.max() >= spec.num_classes):
            raise ShardError(path, "labels", f"values outside [0, {spec.num_classes})")
        return
    vocab = spec.tokenizer["vocab_size"]
    for key in ("text_tokens", "short_text_tokens"):
        if key in shard and records and any(c.min() < 0 or c.max() >= vocab for c in chunks(shard, key)):
            raise ShardError(path, key, f"token ids outside the tokenizer's vocabulary [0, {vocab})")
    for key, (mask_key, offsets_key) in spec.feature_keys().items():
        _check_features(path, shard, key, mask_key, offsets_key, spec.feature_width, chunks)


def _check_tensor(path: Path | str, shard: dict, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if key not in shard:
        raise ShardError(path, key, "missing key")
    value = shard[key]
    if not isinstance(value, Tensor):
        raise ShardError(path, key, f"is a {type(value).__name__}, not a tensor")
    if value.dtype != dtype:
        raise ShardError(path, key, f"dtype {value.dtype} != {dtype}")
    if tuple(value.shape) != shape:
        raise ShardError(path, key, f"shape {tuple(value.shape)} != {shape}")


def _check_features(path, shard: dict, key: str, mask_key: str, offsets_key: str, width: int, chunks) -> None:
    """The stored states: bf16 [T, width] with T the real tokens of all records, offsets that start at 0 and step by
    each record's mask count (the masks stored with the tokens), and finite values."""
    offsets, mask = shard[offsets_key], shard[mask_key]
    counts = torch.cat([c.sum(1) for c in chunks(shard, mask_key)]) if len(mask) else torch.zeros(0, dtype=torch.long)
    if offsets[0] != 0 or not torch.equal(offsets.diff(), counts):
        bad = int((offsets.diff() != counts).nonzero()[0]) if len(counts) and offsets[0] == 0 else 0
        raise ShardError(path, offsets_key, f"record {bad}'s features do not match its {mask_key} (its real tokens): "
                         "offsets must start at 0 and step by each record's mask count")
    _check_tensor(path, shard, key, torch.bfloat16, (int(offsets[-1]), width))
    if len(shard[key]) and not all(torch.isfinite(torch.stack(torch.aminmax(c))).all() for c in chunks(shard, key)):
        raise ShardError(path, key, "contains NaN or Inf")


class _Chunks:
    """Rows of a shard's tensor a chunk (CHECK_CHUNK_BYTES) at a time. From a file, each chunk comes from a mapping
    of its own, released when the next one is read: checking a 26 GB shard then holds at most two chunks in
    memory (the pages of one long-lived mapping would stay resident until it is dropped)."""

    def __init__(self, path: Path | str, shard: dict):
        self.path = Path(path)
        self.from_file = self.path.is_file()

    def __call__(self, shard: dict, key: str):
        value = shard[key]
        row = max(1, value[0].numel() * value.element_size()) if len(value) else 1
        step = max(1, CHECK_CHUNK_BYTES // row)
        for start in range(0, len(value), step):
            source = _open(self.path) if self.from_file else shard
            chunk = source[key][start : start + step]
            del source
            yield chunk
