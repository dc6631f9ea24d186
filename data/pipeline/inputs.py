"""Units of work for every input source: WebDataset tars, an image folder with side-by-side captions, a Hugging Face
`datasets` dataset (saved to disk, a local folder of data files, or the Hub; streamed or not) and parquet files.

Every source is cut into units the way tars are: an ordered list the same on every rank, unit i going to rank
i % world_size, each unit with a stable stem that names its output shards and its done marker (data/pipeline/run.py
explains the resume design). A unit yields WebDataset-style samples, `{'__key__': key, 'png': bytes, 'txt': str,
'json': {...}}`, so every source goes through the same decode, size and degenerate-image filters, bucketing,
captioning, tokenizer and text features (sources.prepare_sample onwards).

  tars          one tar is one unit (sources.py reads and checks it)
  image folder  `a/b/img.png` with `a/b/img.txt` (or `.caption`, kohya's extension) for the caption and/or
                `a/b/img.json` (`caption`, `short_caption`, `label`), the convention of kohya's and diffusers' scripts;
                the sorted files, `per_unit` images a unit
  datasets      a map-style dataset: `per_unit` rows a unit (Dataset.select); a streamed one: one unit per data-file
                shard (IterableDataset.shard over its n_shards), since a stream can only be split by its files
  parquet       one file is one unit, streamed through datasets' parquet reader

A unit that cannot be read to its end (a file deleted after listing, a network or parquet error mid-stream) raises
SourceError naming it: it fails alone and a rerun redoes it, as a truncated tar does.
"""

import glob
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from data.pipeline.sources import IMAGE_EXTENSIONS, SourceError, input_stem, iter_tar_samples

CAPTION_EXTENSIONS = ("txt", "caption")
"""Side-by-side caption files of an image folder, tried in this order (kohya's scripts default to `.caption`)."""


@dataclass(frozen=True)
class InputUnit:
    """One unit of work: `name` is what its marker and messages record, `stem` names its shards."""

    name: str
    stem: str
    samples: Callable[[], Iterator[dict[str, Any]]]


def tar_units(urls: list[str], timeout: float = 60.0) -> list[InputUnit]:
    return [InputUnit(url, input_stem(url), partial(iter_tar_samples, url, timeout)) for url in urls]


def as_units(inputs: list, timeout: float = 60.0) -> list[InputUnit]:
    """InputUnits as they are; plain strings are tar URLs."""
    return [u if isinstance(u, InputUnit) else tar_units([u], timeout)[0] for u in inputs]


def _stem(text: str) -> str:
    """A stem from a name: no '+' (it separates a bucket in shard names), no path separators."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".") or "input"


def _check_per_unit(per_unit: int, flag: str) -> None:
    if per_unit < 1:
        raise SourceError(f"{flag} must be >= 1, got {per_unit}")


# ---- an image folder -------------------------------------------------------------------------------------------

def list_images(root: Path | str) -> list[Path]:
    """Every image under `root` (IMAGE_EXTENSIONS, any case), relative, sorted; hidden files and folders skipped."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"--image-dir {root} is not a folder")
    found = [p.relative_to(root) for p in root.rglob("*") if p.is_file()
             and p.suffix[1:].lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in
                                                                      p.relative_to(root).parts)]
    if not found:
        raise SourceError(f"--image-dir {root} holds no {'/'.join(IMAGE_EXTENSIONS)} images")
    return sorted(found)


def folder_sample(root: Path, relative: Path) -> dict[str, Any]:
    """One image with its side-by-side caption (.txt or .caption) and .json, read whole."""
    path = root / relative
    sample: dict[str, Any] = {"__key__": relative.with_suffix("").as_posix()}
    try:
        sample[path.suffix[1:].lower()] = path.read_bytes()
        for ext in CAPTION_EXTENSIONS:
            if (side := path.with_suffix(f".{ext}")).is_file():
                sample["txt"] = side.read_bytes()
                break
        if (side := path.with_suffix(".json")).is_file():
            sample["json"] = side.read_bytes()
    except OSError as err:
        raise SourceError(f"cannot read {path} (was the folder changed while sharding?): {err}") from err
    return sample


def folder_units(root: Path | str, per_unit: int) -> list[InputUnit]:
    """The folder's images in units of `per_unit`, named `<folder>-00000`, `<folder>-00001`, ..."""
    _check_per_unit(per_unit, "--images-per-unit")
    root = Path(root)
    images = list_images(root)
    units = []
    for i, start in enumerate(range(0, len(images), per_unit)):
        chunk = images[start : start + per_unit]
        name = f"{root} [images {start}-{start + len(chunk) - 1} of {len(images)}]"
        units.append(InputUnit(name, _stem(f"{root.resolve().name}-{i:05d}"),
                               partial(lambda files: (folder_sample(root, f) for f in files), chunk)))
    return units


# ---- Hugging Face datasets and parquet -------------------------------------------------------------------------

@dataclass(frozen=True)
class Columns:
    """Which dataset columns hold what; `caption`, `short_caption` and `label` may be absent from a dataset."""

    image: str = "image"
    caption: str | None = "text"
    short_caption: str | None = None
    label: str | None = "label"


def _caption_text(value: Any) -> str:
    """A caption cell: a string, or a list of them (COCO-style: the first non-empty one)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        return next((v for v in value if isinstance(v, str) and v.strip()), "")
    return ""


def _image_entry(value: Any) -> dict[str, Any]:
    """An image cell as a sample entry: encoded bytes under 'png' (the decoder reads the real format from the bytes),
    or a decoded PIL image under '__image__' where only a path is stored (datasets' own decoder opens local files and
    hf:// paths alike)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return {"png": value["bytes"]}
        if value.get("path"):
            from datasets import Image as ImageFeature

            try:
                return {"__image__": ImageFeature().decode_example(value)}
            except (OSError, ValueError, Image.DecompressionBombError):
                return {}  # counted as undecodable
        return {}
    if isinstance(value, bytes | bytearray):
        return {"png": bytes(value)}
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return {"png": buffer.getvalue()}
    return {}


def row_sample(row: dict[str, Any], key: str, columns: Columns) -> dict[str, Any]:
    """A dataset row as a WebDataset-style sample (the image bytes, the caption, a json with label/short caption)."""
    sample: dict[str, Any] = {"__key__": key} | _image_entry(row.get(columns.image))
    if columns.caption and (text := _caption_text(row.get(columns.caption))):
        sample["txt"] = text
    meta = {}
    if columns.short_caption and (text := _caption_text(row.get(columns.short_caption))):
        meta["short_caption"] = text
    if columns.label and isinstance(row.get(columns.label), int):
        meta["label"] = row[columns.label]
    if meta:
        sample["json"] = meta
    return sample


_DATASET_ERRORS = (OSError, ValueError, KeyError)
"""What reading a dataset can raise mid-way: missing or unreadable files, network errors, pyarrow's ArrowInvalid
(a ValueError) and ArrowIOError (an OSError), a missing split or column."""


def _rows(dataset: Any, name: str, columns: Columns, prefix: str = "", first_index: int = 0
          ) -> Iterator[dict[str, Any]]:
    """Samples keyed by row: `prefix` + the row's index (the unit's stem for a stream shard or a parquet file, whose
    rows count from 0; nothing for a map-style dataset, whose indices are global), unique in the dataset."""
    try:
        for i, row in enumerate(dataset, start=first_index):
            yield row_sample(row, f"{prefix}{i:09d}", columns)
    except _DATASET_ERRORS as err:
        raise SourceError(f"{name} could not be read to its end: {type(err).__name__}: {err}") from err


def _undecoded(dataset: Any, column: str) -> Any:
    """The dataset with `column` left encoded (bytes and path) when it is an Image feature: the pipeline decodes it
    itself, so one bad image is counted and dropped instead of ending the unit."""
    from datasets import Image as ImageFeature

    feature = (dataset.features or {}).get(column)
    return dataset.cast_column(column, ImageFeature(decode=False)) if isinstance(feature, ImageFeature) else dataset


def check_columns(features: Any, columns: Columns, kind: str, captions_needed: bool, where: str) -> None:
    """Refuse a dataset without a column the run reads (the image; the label for labels data; the caption where the
    captions come from the data), naming the flag and the columns it has. features None (a stream whose schema is
    unknown until read) passes."""
    if features is None:
        return
    have = list(features)
    wanted = [(columns.image, "--image-column")]
    wanted += [(columns.label, "--label-column")] if kind == "labels" else []
    wanted += [(columns.caption, "--caption-column")] if captions_needed else []
    wanted += [(columns.short_caption, "--short-caption-column")] if columns.short_caption else []
    for column, flag in wanted:
        if column not in have:
            raise SourceError(f"{where} has no column {column!r} ({flag}); its columns are {have}")


def class_names_of(features: Any, columns: Columns) -> list[str] | None:
    """The label column's class names when it is a datasets ClassLabel."""
    feature = (features or {}).get(columns.label) if columns.label else None
    return list(feature.names) if getattr(feature, "names", None) else None


def open_dataset(name_or_path: str, split: str, streaming: bool, config: str | None = None) -> Any:
    """A dataset saved with `save_to_disk` (load_from_disk), else `load_dataset` of a local folder of data files or a
    Hub id. Datasets never runs code shipped with a dataset (its loading scripts are gone since datasets 4)."""
    import datasets

    path = Path(name_or_path)
    try:
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise SourceError(f"--dataset {name_or_path} has no split {split!r} (--split); it has "
                                      f"{list(loaded)}")
                loaded = loaded[split]
            return loaded.to_iterable_dataset() if streaming else loaded
        return datasets.load_dataset(name_or_path, config, split=split, streaming=streaming)
    except SourceError:
        raise
    # RuntimeError: a dataset that needs a loading script, which datasets (>= 4) refuses to run.
    except (*_DATASET_ERRORS, RuntimeError, datasets.exceptions.DatasetNotFoundError) as err:
        raise SourceError(f"--dataset {name_or_path} (split {split!r}) cannot be opened: {type(err).__name__}: "
                          f"{err}") from err


def dataset_units(dataset: Any, name: str, columns: Columns, per_unit: int) -> list[InputUnit]:
    """A map-style dataset in units of `per_unit` rows; a streamed one in one unit per data-file shard. Units are
    named after the dataset: its folder's name, or the Hub id with '/' as '_'."""
    import datasets

    dataset = _undecoded(dataset, columns.image)
    base = _stem(Path(name).resolve().name if Path(name).is_dir() else name.replace("/", "_"))
    if isinstance(dataset, datasets.IterableDataset):
        n = dataset.num_shards
        return [InputUnit(f"{name} [stream shard {i} of {n}]", f"{base}-{i:05d}",
                          partial(lambda i: _rows(dataset.shard(num_shards=n, index=i), name, columns,
                                                  f"{base}-{i:05d}/"), i))
                for i in range(n)]
    _check_per_unit(per_unit, "--rows-per-unit")
    units = []
    for i, start in enumerate(range(0, len(dataset), per_unit)):
        stop = min(start + per_unit, len(dataset))
        unit_name = f"{name} [rows {start}-{stop - 1} of {len(dataset)}]"
        units.append(InputUnit(unit_name, f"{base}-{i:05d}", partial(
            lambda start, stop, unit_name: _rows(dataset.select(range(start, stop)), unit_name, columns, "", start),
            start, stop, unit_name)))
    return units


def list_parquet(pattern: str) -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise SourceError(f"--parquet-glob {pattern!r} matches no files")
    stems = [_stem(Path(f).stem) for f in files]
    if len(set(stems)) < len(stems):
        raise SourceError(f"--parquet-glob {pattern!r}: parquet files must have distinct file names")
    return files


def parquet_features(path: str) -> Any:
    """The datasets Features of one parquet file (from its schema; an image column written by datasets keeps its
    Image type through the schema's metadata)."""
    import datasets

    try:
        return datasets.load_dataset("parquet", data_files=[path], split="train", streaming=True).features
    except _DATASET_ERRORS as err:
        raise SourceError(f"cannot read parquet file {path}: {type(err).__name__}: {err}") from err


def _parquet_rows(path: str, columns: Columns) -> Iterator[dict[str, Any]]:
    import datasets

    try:
        stream = datasets.load_dataset("parquet", data_files=[path], split="train", streaming=True)
    except _DATASET_ERRORS as err:
        raise SourceError(f"cannot read parquet file {path}: {type(err).__name__}: {err}") from err
    yield from _rows(_undecoded(stream, columns.image), f"parquet file {path}", columns, f"{_stem(Path(path).stem)}/")


def parquet_units(files: list[str], columns: Columns) -> list[InputUnit]:
    """One unit per parquet file, named after it."""
    return [InputUnit(f, _stem(Path(f).stem), partial(_parquet_rows, f, columns)) for f in files]
