"""Input side of the sharding pipeline: which WebDataset tars, which rank reads them, and the images in them.

Inputs are a URL template expanded over `range(num_shards)` (`https://host/train_{i:04d}.tar`) or a local
glob, sorted. Rank r of W takes tars r, r + W, r + 2W, ... so a rank's share does not depend on how fast the
others are, and each tar has a stable stem (its file name without `.tar`) that names its output shards.

A tar is read as a stream (local file, file://, http(s):// with a timeout, or `pipe:COMMAND` whose stdout is
the tar; gzip, bzip2 or xz compressed or not) and grouped into samples the WebDataset way: members
`dir/abc.png` and `dir/abc.json` are the sample with key `dir/abc`; the extension starts at the first dot of
the file name.

A tar counts as read only when it is whole, and anything less raises SourceError naming it: the two zero
blocks that end every tar must follow the last member (tarfile itself stops without a word at a missing,
short or damaged header, and would pass a cut tar for a shorter complete one), every member must hold the
bytes its header promises, a compressed stream must reach its end marker, a download must deliver its
Content-Length and a `pipe:` command must exit 0.

Each image is decoded, dropped when its shorter side is below the target size (we never upsample what the
VAE sees), resized with Lanczos so the shorter side is the target and centre-cropped to a square, then
dropped when it is near a single colour: blank or flat images destabilised the reference's training.
The captioner gets a centre crop of the same square region, at `caption_size` (larger, so a VLM sees detail).
With aspect-ratio buckets (data/buckets.py) an image goes to the bucket nearest its aspect ratio instead, is
dropped when it does not cover that bucket at its own size, and is resized to cover the bucket and centre-cropped
to it; the captioner sees the same region at caption_size / image_size times the bucket.
"""

import bz2
import glob
import gzip
import http.client
import io
import json
import lzma
import re
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

import numpy as np
from PIL import Image, ImageOps

from data.buckets import Bucket, nearest_bucket

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
"""Sample entries tried for the image, in this order."""

T = TypeVar("T")
R = TypeVar("R")


class SourceError(ValueError):
    """Bad input selection or an unreadable input tar; the message names the flag or the URL."""


def list_inputs(base_url: str | None = None, num_shards: int | None = None, input_glob: str | None = None) -> list[str]:
    """Every input tar, in a fixed order (every rank must compute the same list)."""
    if (base_url is None) == (input_glob is None):
        raise SourceError("give exactly one of --base-url (with --num-shards) or --input-glob")
    if base_url is not None:
        if num_shards is None or num_shards < 1:
            raise SourceError("--num-shards must be a positive integer when --base-url is given")
        if "{i" not in base_url:
            raise SourceError(f"--base-url {base_url!r} needs an {{i}} field, e.g. 'https://host/train_{{i:04d}}.tar'")
        try:
            urls = [base_url.format(i=i) for i in range(num_shards)]
        except (KeyError, IndexError, ValueError) as err:
            raise SourceError(f"--base-url {base_url!r} is not a valid template with one field {{i}}: {err}") from err
    else:
        urls = sorted(glob.glob(input_glob))
        if not urls:
            raise SourceError(f"--input-glob {input_glob!r} matches no files")
    stems = [input_stem(u) for u in urls]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        # Output shards are named after the stem: two inputs with one stem would overwrite each other.
        raise SourceError(f"input tars must have distinct file names; repeated: {duplicates[:5]}")
    return urls


def input_stem(url: str) -> str:
    """`https://host/a/train_0003.tar` -> `train_0003`: names this tar's output shards and done marker."""
    if url.startswith("pipe:"):
        # `pipe:curl -s https://host/a.tar`: the last word that looks like a tar names it.
        words = [w for w in url[len("pipe:") :].split() if ".tar" in w or ".tgz" in w]
        url = words[-1] if words else url
    name = Path(urlparse(url).path if "://" in url else url).name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    if not stem:
        raise SourceError(f"cannot derive an output name from input {url!r}")
    return stem


def split_for_rank(urls: list[str], rank: int, world_size: int) -> list[str]:
    """Tar i goes to rank i % world_size."""
    if world_size < 1:
        raise SourceError(f"--world-size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise SourceError(f"--rank must be in [0, {world_size}) for --world-size {world_size}, got {rank}")
    return urls[rank::world_size]


@contextmanager
def open_stream(url: str, timeout: float = 60.0, retries: int = 3) -> Iterator[IO[bytes]]:
    """A readable binary stream of the tar. Opening an http(s) URL is retried (not a read that fails half
    way: the whole tar is then redone on the next run). After the caller is done, the rest of the stream is
    read and checked: a download must have delivered its Content-Length (urllib returns a body cut short by
    a closed connection without complaint) and a `pipe:` command must exit 0."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[len("pipe:") :], shell=True, stdout=subprocess.PIPE)
        try:
            yield proc.stdout
        except BaseException:
            proc.kill()
            proc.stdout.close()
            proc.wait()
            raise
        # Drain what the reader left (record padding), or the command dies of SIGPIPE writing it and its exit
        # status would say it failed.
        _drain(proc.stdout)
        proc.stdout.close()
        if (code := proc.wait()) != 0:
            raise SourceError(f"input command {url!r} exited with status {code}")
        return
    if "://" not in url or url.startswith("file://"):
        path = urlparse(url).path if url.startswith("file://") else url
        try:
            stream = open(path, "rb")
        except OSError as err:
            raise SourceError(f"cannot open input tar {url}: {err}") from err
        with stream:
            yield stream
        return
    response = _urlopen_with_retries(url, timeout, retries)
    with response:
        counted = _Counted(response)
        yield counted
        _drain(counted)
        length = response.headers.get("Content-Length")
        if length is not None and length.strip().isdigit() and counted.count != int(length):
            raise SourceError(
                f"download of {url} ended after {counted.count} of its {int(length)} bytes (Content-Length): "
                "the connection closed early"
            )


def _urlopen_with_retries(url: str, timeout: float, retries: int) -> IO[bytes]:
    error: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(2.0 ** (attempt - 1), 30.0))
        try:
            return urllib.request.urlopen(url, timeout=timeout)
        except urllib.error.HTTPError as err:
            error = err
            if err.code < 500 and err.code not in (408, 429):  # 404, 403: retrying will not help
                break
        except OSError as err:  # URLError, connection resets and socket timeouts
            error = err
    raise SourceError(f"cannot open input tar {url} (after {attempt + 1} attempts): {error}")


def _drain(stream: IO[bytes]) -> None:
    while stream.read(1 << 16):
        pass


class _Counted:
    """A read-only stream that counts the bytes read through it."""

    def __init__(self, stream: IO[bytes]):
        self.stream, self.count = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count += len(data)
        return data


class _Prefixed:
    """`head` (already read from `stream` to sniff the compression) followed by the rest of `stream`."""

    def __init__(self, head: bytes, stream: IO[bytes]):
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size is None or size < 0:
            out, self.head = self.head + self.stream.read(), b""
        else:
            out, self.head = self.head[:size], self.head[size:]
        return out


_COMPRESSED: tuple[tuple[bytes, Callable[[Any], IO[bytes]]], ...] = (
    (b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
    (b"BZh", lambda f: bz2.BZ2File(f, mode="rb")),
    (b"\xfd7zXZ\x00", lambda f: lzma.LZMAFile(f, mode="rb")),
)


def _decompressed(stream: IO[bytes]) -> IO[bytes]:
    """The tar inside a gzip, bzip2 or xz stream, or `stream` itself. Python's decompressing files raise
    EOFError at a stream cut before its end marker; tarfile's own `r|gz` stream returns what it has."""
    head = stream.read(6)
    prefixed = _Prefixed(head, stream)
    for magic, opener in _COMPRESSED:
        if head.startswith(magic):
            return opener(prefixed)
    return prefixed


class _Tail:
    """The uncompressed tar stream, keeping its last bytes so that the blocks where tarfile stopped can be
    looked at afterwards: tarfile reads ahead at most one record, so KEEP bytes always cover them."""

    KEEP = 4 * tarfile.RECORDSIZE

    def __init__(self, stream: IO[bytes]):
        self.stream, self.pos, self.tail = stream, 0, bytearray()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.pos += len(data)
        self.tail += data
        if len(self.tail) > 2 * self.KEEP:  # trimmed now and then, not on every read: a member is many reads
            del self.tail[: -self.KEEP]
        return data

    def at(self, offset: int, size: int) -> bytes:
        """The `size` bytes from `offset` on (reading on as needed); fewer where the stream ends first."""
        while self.pos < offset + size and self.read(offset + size - self.pos):
            pass
        start = offset - (self.pos - len(self.tail))
        if start < 0:
            raise RuntimeError(f"byte {offset} is no longer buffered (read on to {self.pos})")
        return bytes(self.tail[start : start + size])


def check_end_of_archive(stream: _Tail, offset: int, url: str) -> None:
    """Raise unless two zero blocks, the end-of-archive marker, start at `offset`: where tarfile stopped."""
    block = tarfile.BLOCKSIZE
    end = stream.at(offset, 2 * block)
    if len(end) < 2 * block:
        raise SourceError(
            f"input tar {url} is truncated: it ends at byte {offset + len(end)}, inside or before the header "
            f"expected at byte {offset}, without the two zero blocks that end a tar"
        )
    if end != bytes(2 * block):
        raise SourceError(f"input tar {url} has a damaged header at byte {offset}: the members after it are lost")


_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, http.client.HTTPException)
"""What reading a cut or damaged stream raises: tarfile, the decompressors, the socket and http.client."""


def iter_tar_samples(url: str, timeout: float = 60.0) -> Iterator[dict[str, Any]]:
    """Samples of one tar as {'__key__': key, ext: bytes, ...}, in tar order. Raises SourceError, before it
    yields the last sample, unless the tar was whole (module docstring)."""
    try:
        with open_stream(url, timeout) as raw:
            stream = _Tail(_decompressed(raw))
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                sample: dict[str, Any] = {}
                for member in tar:
                    if not member.isfile():
                        continue
                    match = re.fullmatch(r"((?:.*/)?[^./][^/]*?)\.([^/]+)", member.name)
                    if match is None:
                        continue  # no extension (or a hidden file): not part of any sample
                    key, ext = match.groups()
                    if sample and sample["__key__"] != key:
                        yield sample
                        sample = {}
                    sample["__key__"] = key
                    sample[ext.lower()] = tar.extractfile(member).read()
                check_end_of_archive(stream, tar.offset, url)
            _drain(stream)  # the record padding, and a compressed stream up to its end marker
            if sample:
                yield sample
    except _READ_ERRORS as err:
        raise SourceError(f"input tar {url} is unreadable or truncated: {type(err).__name__}: {err}") from err


@dataclass
class DropCounts:
    """Why samples did not become records; summed over tars into the manifest's spec.extra."""

    seen: int = 0
    undecodable: int = 0
    too_small: int = 0
    degenerate: int = 0
    no_caption: int = 0
    written: int = 0

    def add(self, other: "DropCounts") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Prepared:
    """One sample that passed the filters: the VAE's crop, the captioner's crop and the tar's metadata."""

    key: str
    image: Image.Image
    caption_image: Image.Image | None
    meta: dict[str, Any] = field(default_factory=dict)
    bucket: Bucket | None = None
    """The aspect-ratio bucket the crop has the size of (None: no buckets, a square crop)."""


def decode_image(data: bytes) -> Image.Image:
    """RGB image; transparency is composited on white (black showed through as a hard outline otherwise)."""
    return normalise_image(Image.open(io.BytesIO(data)))


def normalise_image(image: Image.Image) -> Image.Image:
    """Upright RGB: EXIF rotation applied, transparency composited on white."""
    image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def centre_square(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (Lanczos), then crop the centre square, as the reference did."""
    return cover_crop(image, size, size)


def cover_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Resize (Lanczos) by the smallest factor that makes the image cover height x width, then crop the centre."""
    w, h = image.size
    if (w, h) != (width, height):
        scale = max(width / w, height / h)
        new = (max(width, round(w * scale)), max(height, round(h * scale)))
        image = image.resize(new, Image.Resampling.LANCZOS)
        left, top = (new[0] - width) // 2, (new[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
    return image


def is_degenerate(image: Image.Image, min_std: float) -> bool:
    """True when every channel's standard deviation (pixels in [0, 1]) is below `min_std`: a near-flat image."""
    pixels = np.asarray(image, dtype=np.float32).reshape(-1, 3) / 255.0
    return bool(pixels.std(axis=0).max() < min_std)


def prepare_sample(
    sample: dict[str, Any], image_size: int, caption_size: int | None, min_std: float,
    buckets: list[Bucket] | None = None,
) -> Prepared | str:
    """The filtered, cropped sample, or the name of the DropCounts field that explains why it was dropped.

    `sample` is WebDataset-style (data/pipeline/inputs.py makes every source's samples so): the image's bytes under
    its extension, or an image a source decoded itself under '__image__'; 'txt' and 'json' as bytes (a tar's
    members) or already as str / dict."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    try:
        if "__image__" in sample:
            image = normalise_image(sample["__image__"])
        elif ext is not None:
            image = decode_image(sample[ext])
        else:
            return "undecodable"
    except (OSError, ValueError, Image.DecompressionBombError):
        return "undecodable"
    bucket = nearest_bucket(image.height, image.width, buckets) if buckets else None
    height, width = (bucket.height, bucket.width) if bucket else (image_size, image_size)
    if image.height < height or image.width < width:  # never upsample what the VAE sees
        return "too_small"
    crop = cover_crop(image, height, width)
    if is_degenerate(crop, min_std):
        return "degenerate"
    caption_image = None
    if caption_size is not None:
        # Never upsample for the VLM: below caption_size it sees the native region.
        factor = min(caption_size / image_size, image.height / height, image.width / width)
        caption_image = cover_crop(image, round(height * factor), round(width * factor))
    meta: dict[str, Any] = {"key": sample["__key__"]}
    if "txt" in sample:
        text = sample["txt"]
        meta["txt"] = (text if isinstance(text, str) else text.decode("utf-8", errors="replace")).strip()
    if "json" in sample:
        try:
            record = sample["json"] if isinstance(sample["json"], dict) else json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = {}
        meta["json"] = record if isinstance(record, dict) else {}
    return Prepared(sample["__key__"], crop, caption_image, meta, bucket)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int = 4) -> Iterator[R]:
    """`map(fn, items)` on a thread pool, in order, with at most `workers * ahead` items in flight.

    Pillow releases the GIL while decoding and resizing, so threads scale; Executor.map would read the
    whole (possibly huge) tar into memory first.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers * ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
