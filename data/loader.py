"""Stream batches from a shard folder (data/shards.py) into training: deterministic, split across ranks
and dataloader workers, mixed across shards, and resumable to the exact batch.

Epoch order. Epoch e permutes the shards with a generator seeded from (seed, e), the same on every rank,
and shuffles each shard's records with one seeded from (seed, e, shard index). The shard order is cut
into windows of `mix_shards` consecutive shards (M; the last window may hold fewer). A window's records,
its shards concatenated in that order, are visited in a permutation seeded from (seed, e, window index)
(the identity for a window of one shard, or without shuffle). Windows concatenated give the epoch's
global record order of N records: a function of (seed, epoch, M, shard sizes) only. M = 1 is shard by
shard (each batch holds records of one or two shards, so a shard of one class or one source makes whole
batches of it); M > 1 spreads every stretch of the order over M shards.

Split. Each rank runs W dataloader workers (W = 1 for num_workers=0): S = world_size * W slots, slot
s = rank * W + w. Slot s takes the contiguous range [s * L, (s + 1) * L) of the global order, with
L = N // S: every record is seen at most once per epoch, exactly once when S divides N, and the last
N - S * L records of the (shuffled) order are dropped, so every rank and worker yields the same number
of samples per epoch. A slot opens only the shards of the windows its range crosses (memory-mapped), at
most M at once: it releases a window's shards before opening the next window's. Iteration is infinite:
a slot runs through its range of epoch 0, then of epoch 1...

Batches. A slot's stream is cut into batches of B = batch_size consecutive records, built where the
stream runs (in the worker): per shard, caption kind and key one index_select from the memory-mapped
shard, joined by one torch.cat per key when a batch spans several such groups, so a batch costs a
handful of copies, not B records' worth of Python. Inside a batch the records are grouped by shard (in
window order), then by caption kind (long before short), in stream order within a group: with M = 1 and
no short captions that is the stream order itself. The dataset yields plain dicts of freshly allocated
batched tensors (also with num_workers=0); `build_loader` hands them through `DataLoader(batch_size=None)`
untouched, from workers by the DataLoader's standard transport. On a machine with few cores that
transport, not the loader, limits throughput with workers (data/README.md has the measured figures).

Resume. A DataLoader with W workers takes batch j from worker j % W. So after k batches (c = k * B
samples consumed by this rank), worker w has produced the batches j < k with j % W == w and can start
from there without running anything. A resumed DataLoader starts over at worker 0, so its worker w plays
the role (slot) of the original worker (k + w) % W. What the trainer calls:

    save:     state = loader.dataset.state_at(batches_taken * batch_size)   # dict of plain ints
    restore:  loader = build_loader(..., state=state)    # or, before the first iter(loader),
              loader.dataset.load_state_dict(state)

batches_taken counts every batch taken from the loader (optimizer steps x micro-batches per step); with
num_workers=0, `loader.dataset.state_dict()` returns the same from the batches yielded so far. With
workers, resume is exact at batch boundaries only (c a multiple of B). The state records the setup the
order depends on (seed, world_size, num_workers, batch_size, mix_shards, num_records): restored under
another setup, the run continues from the same sample count, with a warning, but not in the order the
original run would have seen. Everything random (orders, short-caption draws) is a function of (seed,
epoch, shard or window index), never of a running generator.

Buckets. A dataset of aspect-ratio buckets (data/shards.py: spec.buckets) gives batches whose records all
share one bucket, so one latent shape. Each bucket is a pool of its own shards, ordered as above (its shard order,
windows and window orders salted with its name) into its own epoch order of N_b records. Slot s takes the range
[s * L_b, (s + 1) * L_b) of each bucket's order, L_b = N_b // S, and cuts it into K_b = L_b // B whole batches
(the rest dropped). The epoch is the sequence of those sum_b K_b batches in an order seeded from (seed, epoch),
the same for every slot: every rank and worker takes the same number of batches per epoch, a bucket's share of
the batches is K_b / K, proportional to its records (up to the dropped remainders), and with no workers the ranks
draw the same bucket at every step. A bucket with fewer than S * B records gives no batch (a warning says so).
Resume is exact at batch boundaries (where the trainer saves): batch k of a slot's stream is batch k mod K of
epoch k // K, its bucket and its place in the bucket's range follow from the sequence.

Text features. With `text_features=True` (the dataset must hold them: data/features.py) a text batch also has
`text_features` (bf16 [B, L, D]): each record's stored states scattered back to its mask's positions of a zero
tensor, the long or the short caption's as `caption_kind` says.

Memory. A slot holds its batches, the orders of its windows (16 bytes a window record) and the mappings of at
most mix_shards shards per pool. The pages a mapping has read stay resident, and counted in the process's RSS,
until they are released (with the kernel's read-around, several times the bytes asked for), so after each
shard's part of a batch its mapped pages are released (`madvise(MADV_DONTNEED)`: the pages are clean, and stay
in the page cache for the next read). The loader's resident set then does not grow with the shard
(scripts/bench/memory.py); where madvise is missing it grows up to the mapped shards' size, which the kernel can
still drop under pressure.

Validation. A shard is checked by `load_shard` when a process first opens it (the checks of
`python -m data.validate`); reopened unchanged (same size and mtime) in a later epoch, it is trusted.
Without skip_bad_shards the ShardError propagates. With it, a bad shard is warned about once, counted
in `bad_shards` (in the process that iterates: a worker's count stays in the worker) and its records
are skipped: the batch is filled from the records after them, so batches stay full and a rank that
yields fewer records that epoch never runs dry (DDP step counts stay equal). The skipped records still
hold their positions in the stream, so a run resumed after a skip replays as many records as were
skipped before the save point (exact otherwise). With buckets a batch keeps its bucket: the records of a bad shard
are replaced by the batch's good ones repeated, and a batch with none is skipped.
"""

import bisect
import ctypes
import functools
import hashlib
import mmap
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.shards import ShardError, load_shard, read_manifest

SETUP_KEYS = ("seed", "world_size", "num_workers", "batch_size", "mix_shards", "num_records")
"""What a saved state's order depends on besides the position: resuming with other values is not exact."""


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from several parts; a hash, so neighbouring epochs or shards get unrelated streams."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


def _salted(salt: str | None, *parts: int | str) -> tuple[int | str, ...]:
    """Seed parts, with a bucket's name where there is one (no name: the unbucketed streams, as they always were)."""
    return parts if salt is None else (*parts, salt)


def shard_order(
    seed: int, epoch: int, num_shards: int, shuffle: bool = True, salt: str | None = None
) -> Int[Tensor, " n"]:
    """The epoch's order of shard indices (of one bucket's shards, `salt` its name); a function of (seed, epoch)
    only, so equal on every rank."""
    if not shuffle:
        return torch.arange(num_shards)
    return torch.randperm(num_shards, generator=_generator(*_salted(salt, seed, epoch, "shards")))


def record_order(seed: int, epoch: int, shard: int, records: int, shuffle: bool = True) -> Int[Tensor, " n"]:
    """The order in which an epoch visits one shard's rows."""
    if not shuffle:
        return torch.arange(records)
    return torch.randperm(records, generator=_generator(seed, epoch, shard, "records"))


def window_order(
    seed: int, epoch: int, window: int, sizes: Sequence[int], shuffle: bool = True, salt: str | None = None
) -> Int[Tensor, " n"]:
    """Window position -> position in the concatenation of the window's shards (each in record_order).
    The identity for one shard, so mix_shards=1 reproduces the shard-by-shard order exactly."""
    records = sum(sizes)
    if not shuffle or len(sizes) <= 1:
        return torch.arange(records)
    return torch.randperm(records, generator=_generator(*_salted(salt, seed, epoch, window, "window")))


def bucket_sequence(seed: int, epoch: int, batches: Sequence[int], shuffle: bool = True) -> Int[Tensor, " k"]:
    """The bucket (index into `batches`) of each batch of an epoch: bucket b `batches[b]` times, in an order seeded
    from (seed, epoch), the same for every slot."""
    sequence = torch.repeat_interleave(torch.arange(len(batches)), torch.tensor(batches, dtype=torch.long))
    if not shuffle:
        return sequence
    return sequence[torch.randperm(len(sequence), generator=_generator(seed, epoch, "buckets"))]


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's madvise(addr, length, advice), or None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return function


MADV_DONTNEED = 4
"""The same value on Linux and macOS."""


def release_pages(tensors: Iterable[Tensor]) -> None:
    """Drop the resident pages of memory-mapped, never written tensors from this process (module docstring:
    Memory); a later read faults them in again from the page cache. Tensors smaller than a page are left."""
    madvise, page = _madvise(), mmap.PAGESIZE
    if madvise is None:
        return
    for tensor in tensors:
        nbytes = tensor.untyped_storage().nbytes()
        if nbytes < page:
            continue
        start = tensor.untyped_storage().data_ptr()
        first, end = start // page * page, -(-(start + nbytes) // page) * page
        madvise(first, end - first, MADV_DONTNEED)


def scatter_features(
    features: Float[Tensor, "t d"], offsets: Int[Tensor, " m"], rows: Int[Tensor, " n"], mask: Bool[Tensor, "n l"]
) -> Float[Tensor, "n l d"]:
    """Stored text features (data/features.py) of shard rows `rows` as a zero [n, L, D] batch holding each row's
    states at its mask's True positions: what the encoder returns for those tokens."""
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    before = torch.cumsum(lengths, 0) - lengths  # where each row's states start in the gathered rows
    flat = torch.repeat_interleave(starts - before, lengths) + torch.arange(int(lengths.sum()))
    out = torch.zeros(*mask.shape, features.shape[-1], dtype=features.dtype)
    out[mask] = features.index_select(0, flat)
    return out


def short_caption_draws(seed: int, epoch: int, shard: int, records: int, prob: float) -> Bool[Tensor, " n"]:
    """Row i of the shard uses its short caption in this epoch. Indexed by row, not by visiting order, so
    the draw of a record does not depend on how the epoch is split or mixed, or where a run resumed."""
    if prob <= 0.0:
        return torch.zeros(records, dtype=torch.bool)
    if prob >= 1.0:
        return torch.ones(records, dtype=torch.bool)
    return torch.rand(records, generator=_generator(seed, epoch, shard, "captions")) < prob


def samples_per_epoch(num_records: int, world_size: int, num_workers: int) -> int:
    """Samples one rank yields per epoch: L = N // (world_size * W) per worker stream, W streams."""
    workers = max(num_workers, 1)
    return num_records // (world_size * workers) * workers


@dataclass
class _Window:
    """One window of an epoch's global order: global positions [start, stop)."""

    epoch: int
    index: int
    shards: list[int]
    """Shard indices, in the epoch's shard order."""
    start: int
    stop: int
    firsts: Tensor
    """Concatenated position of each shard's first record."""
    perm: Tensor
    """window_order: window position -> concatenated position."""
    rows: Tensor
    """Concatenated position -> row in its shard (each shard's record_order)."""
    short: Tensor | None
    """Concatenated position -> uses its short caption (short_caption_draws of its row); None: none do."""


class _Pool:
    """Shards whose records one epoch order covers: every shard of an unbucketed dataset, or one bucket's. Keeps the
    window the stream is in and its open shards (module docstring)."""

    def __init__(self, dataset: "ShardDataset", shards: list[int], name: str | None):
        self.dataset, self.shards, self.name = dataset, shards, name
        self.sizes = [dataset.sizes[s] for s in shards]
        self.num_records = sum(self.sizes)
        self.open: dict[int, dict[str, Tensor] | None] = {}  # shard index -> tensors, None if bad
        self._layout: tuple[int, list[int], list[list[int]]] | None = None  # (epoch, window starts, shards)
        self._window: _Window | None = None

    def window_at(self, epoch: int, position: int) -> _Window:
        """The window of `epoch` that holds position `position` of this pool's order; entering a new window
        releases the open shards that are not in it (a slot holds at most mix_shards shards open per pool)."""
        window, d = self._window, self.dataset
        if window is not None and window.epoch == epoch and window.start <= position < window.stop:
            return window
        if self._layout is None or self._layout[0] != epoch:
            local = shard_order(d.seed, epoch, len(self.shards), d.shuffle, self.name).tolist()
            order = [self.shards[i] for i in local]
            groups = [order[i : i + d.mix_shards] for i in range(0, len(order), d.mix_shards)]
            starts = [0, *accumulate(sum(d.sizes[s] for s in g) for g in groups)]
            self._layout = (epoch, starts, groups)
        _, starts, groups = self._layout
        index = bisect.bisect_right(starts, position) - 1  # empty windows share a start: take the last
        shards = groups[index]
        sizes = [d.sizes[s] for s in shards]
        orders = [record_order(d.seed, epoch, s, n, d.shuffle) for s, n in zip(shards, sizes, strict=True)]
        short = None
        if d.short_caption_prob > 0:  # draws are per row: look them up in visiting order once per window
            short = torch.cat(
                [
                    short_caption_draws(d.seed, epoch, s, n, d.short_caption_prob)[order]
                    for s, n, order in zip(shards, sizes, orders, strict=True)
                ]
            )
        window = _Window(
            epoch=epoch,
            index=index,
            shards=shards,
            start=starts[index],
            stop=starts[index + 1],
            firsts=torch.tensor([0, *accumulate(sizes)][:-1]),
            perm=window_order(d.seed, epoch, index, sizes, d.shuffle, self.name),
            rows=torch.cat(orders),
            short=short,
        )
        self.open = {s: t for s, t in self.open.items() if s in shards}  # drops the others' mappings
        self._window = window
        return window

    def load(self, shard: int) -> dict[str, Tensor] | None:
        """The shard's tensors (memory-mapped), validated; kept open while the stream stays in its window."""
        if shard not in self.open:
            entry = self.dataset.entries[shard]
            self.open[shard] = None if entry["file"] in self.dataset._bad else self.dataset._load_checked(entry)
        return self.open[shard]

    def gather(self, window: _Window, lo: int, hi: int) -> list[dict[str, Tensor]]:
        """The records at window positions [lo, hi) that lie in good shards, as batch parts (dicts of
        fresh tensors) in batch order. Records are grouped by (shard, caption kind), in stream order
        within a group, so each group is one index_select per key from the mapped shard: the per-record
        work is all in those copies."""
        concat = window.perm[lo:hi]
        rows = window.rows[concat]
        group = torch.searchsorted(window.firsts, concat, right=True) - 1  # index into window.shards
        kinds = 1 if window.short is None else 2
        if kinds == 2:
            group = group * 2 + window.short[concat]
        if len(window.shards) > 1 or kinds == 2:
            grouped = torch.argsort(group, stable=True)
            group, rows = group[grouped], rows[grouped]
        counts = torch.bincount(group, minlength=len(window.shards) * kinds).view(-1, kinds).tolist()
        parts, first = [], 0
        for shard, per_kind in zip(window.shards, counts, strict=True):
            if sum(per_kind) == 0:
                continue
            tensors = self.load(shard)
            for kind, count in enumerate(per_kind):
                group_rows = rows[first : first + count]
                first += count
                if count and tensors is not None:  # None: a bad shard, skipped
                    parts.append(self.dataset._select(tensors, group_rows, kind))
            if tensors is not None:
                release_pages(tensors.values())  # the part is a copy: the mapped pages can go
        return parts


class ShardDataset(IterableDataset):
    """Infinite stream of batches (dicts of tensors with a leading batch dim B) from a shard folder, for
    one rank of `world_size`.

    Yields `latents` (bf16 [B, C, H, W], as stored) and `labels` (int64 [B]) for a labels dataset, or
    `text_tokens` (int32 [B, L]), `attn_mask` (bool [B, L]) and `caption_kind` (int64 [B], 0 long /
    1 short) for a text dataset, with `text_features` (bf16 [B, L, D]) when `text_features`. `num_workers` must
    match the DataLoader's, which must not batch again (batch_size=None): `build_loader` sets both. `mix_shards`
    is the window size M of the module docstring: more mixing costs M open shard mappings and 16 bytes a window
    record (its order) per slot (per bucket). `buckets`: with a bucketed dataset, train on these buckets only
    (names 'HxW'; None: all).
    """

    def __init__(
        self,
        data_dir: Path | str,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        short_caption_prob: float = 0.0,
        verify_checksum: bool = True,
        skip_bad_shards: bool = False,
        num_workers: int = 0,
        batch_size: int = 1,
        mix_shards: int = 4,
        text_features: bool = False,
        buckets: Sequence[str] | None = None,
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if not 0.0 <= short_caption_prob <= 1.0:
            raise ValueError(f"short_caption_prob must be in [0, 1], got {short_caption_prob}")
        if num_workers < 0 or batch_size < 1 or mix_shards < 1:
            raise ValueError(
                f"num_workers must be >= 0, batch_size and mix_shards >= 1, got {num_workers}, {batch_size}, "
                f"{mix_shards}"
            )
        self.data_dir = Path(data_dir)
        self.manifest, self.spec = read_manifest(self.data_dir)
        if short_caption_prob > 0 and not (self.spec.kind == "text" and self.spec.short_captions):
            raise ValueError(
                f"short_caption_prob={short_caption_prob} needs a text dataset with short captions, but "
                f"{self.data_dir} has kind={self.spec.kind!r}, short_captions={self.spec.short_captions}"
            )
        if text_features and self.spec.text_features is None:
            raise ValueError(f"text_features=True, but {self.data_dir} holds no text features (build it with "
                             "data/make_shards.py --text-features)")
        self.entries: list[dict[str, Any]] = self.manifest["shards"]
        self.sizes = [int(e["records"]) for e in self.entries]
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.short_caption_prob, self.text_features = short_caption_prob, text_features
        self.verify_checksum, self.skip_bad_shards = verify_checksum, skip_bad_shards
        self.num_workers, self.batch_size, self.mix_shards = num_workers, batch_size, mix_shards
        self.pools = self._pools(buckets)
        self.num_records = sum(pool.num_records for pool in self.pools)
        self.bucketed = self.spec.buckets is not None
        empty = self.batches_per_epoch == 0 if self.bucketed else self.per_slot == 0
        if empty:
            raise ValueError(
                f"{self.data_dir} has {self.num_records} records, fewer than world_size * num_workers = "
                f"{self.num_slots} slots" + (f" x batch_size {batch_size} per bucket" if self.bucketed else "")
                + ": every slot would be empty"
            )
        for pool in self.pools if self.bucketed else ():
            if self.bucket_batches(pool) == 0:
                warnings.warn(f"bucket {pool.name} of {self.data_dir} has {pool.num_records} records, fewer than "
                              f"{self.num_slots} slots x batch_size {batch_size}: none of them is drawn", stacklevel=2)
        self.start_sample = 0
        """Samples of this rank already consumed when iteration starts (set by load_state_dict)."""
        self.samples_yielded = 0
        """start_sample + samples yielded since; exact in the process that iterates (num_workers=0)."""
        self.bad_shards = 0
        """Distinct bad shards met (with skip_bad_shards) in this process."""
        self.shards_loaded = 0
        """Shard opens in this process: each slot opens only the shards of the windows its range crosses."""
        self._bad: set[str] = set()
        self._checked: dict[str, tuple[int, int] | None] = {}  # file -> (size, mtime_ns) that passed load_shard
        self._sequence: tuple[int, Tensor, Tensor] | None = None  # (epoch, bucket of each batch, its ordinal)

    def _pools(self, buckets: Sequence[str] | None) -> list[_Pool]:
        """One pool of every shard, or one per bucket (those `buckets` names, all by default)."""
        if self.spec.buckets is None:
            if buckets is not None:
                raise ValueError(f"buckets={list(buckets)}, but {self.data_dir} has no buckets")
            return [_Pool(self, list(range(len(self.entries))), None)]
        names = list(self.spec.buckets) if buckets is None else list(buckets)
        unknown = [b for b in names if b not in self.spec.buckets]
        if unknown or not names:
            raise ValueError(f"buckets={names}: {self.data_dir} has buckets {list(self.spec.buckets)}")
        return [_Pool(self, [i for i, e in enumerate(self.entries) if e.get("bucket") == b], b) for b in names]

    # ---- sizes ---------------------------------------------------------------------------------------

    @property
    def workers(self) -> int:
        """Streams per rank: one in-process stream when the DataLoader has no workers."""
        return max(self.num_workers, 1)

    @property
    def num_slots(self) -> int:
        return self.world_size * self.workers

    @property
    def per_slot(self) -> int:
        """Samples one worker stream yields per epoch (the remainder N - S * L is dropped)."""
        if self.bucketed:
            return self.batches_per_epoch * self.batch_size
        return self.num_records // self.num_slots

    def bucket_batches(self, pool: _Pool) -> int:
        """K_b: batches of one bucket per slot per epoch."""
        return pool.num_records // self.num_slots // self.batch_size

    @property
    def batches_per_epoch(self) -> int:
        """K: batches per slot per epoch of a bucketed dataset."""
        return sum(self.bucket_batches(pool) for pool in self.pools)

    @property
    def open_shards(self) -> int:
        """Shards this process holds open (memory-mapped) now: at most mix_shards per pool."""
        return sum(len(pool.open) for pool in self.pools)

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank yields per epoch: equal on every rank."""
        if self.bucketed:
            return self.per_slot * self.workers
        return samples_per_epoch(self.num_records, self.world_size, self.num_workers)

    # ---- resume --------------------------------------------------------------------------------------

    def state_at(self, samples_consumed: int) -> dict[str, int]:
        """The loader state after this rank consumed `samples_consumed` samples: batches taken from the
        loader (steps x micro-batches per step) x per-rank batch size. Plain ints: fits any checkpoint."""
        if samples_consumed < 0:
            raise ValueError(f"samples_consumed must be >= 0, got {samples_consumed}")
        epoch, position = divmod(samples_consumed, self.samples_per_epoch)
        return dict(
            epoch=epoch,
            position=position,
            samples=samples_consumed,
            seed=self.seed,
            world_size=self.world_size,
            num_workers=self.num_workers,
            batch_size=self.batch_size,
            mix_shards=self.mix_shards,
            num_records=self.num_records,
        )

    def state_dict(self) -> dict[str, int]:
        """State at the samples yielded in this process, for num_workers=0 (no prefetch: what was yielded
        was consumed). With workers this process sees no progress: use `state_at` instead."""
        if self.num_workers > 0:
            raise RuntimeError(
                "with num_workers > 0 the dataset in the main process does not see what the workers yielded: "
                "save state_at(batches taken from the loader * batch_size) instead"
            )
        return self.state_at(self.samples_yielded)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Start the next iteration where `state` left off. Call before the DataLoader's first iterator
        (workers copy the dataset when they start; persistent workers never see later changes)."""
        missing = [k for k in ("epoch", "position") if k not in state]
        if missing:
            raise ValueError(f"loader state lacks {missing} (a state from state_at has epoch, position, samples)")
        changed = {k: (state[k], getattr(self, k)) for k in SETUP_KEYS if k in state and state[k] != getattr(self, k)}
        if changed:
            warnings.warn(
                f"loader state was saved with a different setup {changed} (saved, now): the run continues "
                "from the same number of samples but not in the order the original run would have seen",
                stacklevel=2,
            )
        if self.bucketed:  # an epoch's length depends on every bucket's size: count in samples
            start = int(state.get("samples", int(state["epoch"]) * self.samples_per_epoch + int(state["position"])))
        else:  # epoch and position count in the saved run's epochs, whose length follows from its setup.
            saved = {k: int(state.get(k, getattr(self, k))) for k in ("num_records", "world_size", "num_workers")}
            start = int(state["epoch"]) * samples_per_epoch(**saved) + int(state["position"])
        if (self.workers > 1 or self.bucketed) and start % self.batch_size:
            raise ValueError(
                f"with num_workers={self.num_workers}{' and buckets' if self.bucketed else ''} the loader resumes at "
                f"batch boundaries only: {start} samples is not a multiple of batch_size={self.batch_size}"
            )
        self.start_sample = self.samples_yielded = start

    def _stream_start(self, worker: int) -> tuple[int, int]:
        """(slot, samples already taken from that slot's stream) for DataLoader worker `worker`."""
        workers = self.workers
        if workers == 1:
            return self.rank, self.start_sample
        done_batches = self.start_sample // self.batch_size
        role = (done_batches + worker) % workers  # the original worker whose batches this one continues
        batches_of_role = (done_batches - role + workers - 1) // workers  # batches j < done with j % W == role
        return self.rank * workers + role, batches_of_role * self.batch_size

    # ---- iteration -----------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        """Batches as dicts of tensors."""
        info = get_worker_info()
        worker = 0
        if info is not None:
            if info.num_workers != self.num_workers:
                raise RuntimeError(
                    f"ShardDataset(num_workers={self.num_workers}) runs in a DataLoader with "
                    f"{info.num_workers} workers; pass the same value to both (build_loader does)"
                )
            worker = info.id
        elif self.num_workers > 0:
            raise RuntimeError(f"ShardDataset(num_workers={self.num_workers}) is iterated outside DataLoader workers")
        slot, taken = self._stream_start(worker)
        self.samples_yielded = self.start_sample
        stream = self._bucket_batches(slot, taken) if self.bucketed else self._batches(slot, taken)
        for batch in stream:
            self.samples_yielded += self.batch_size
            yield batch

    def _batches(self, slot: int, taken: int) -> Iterator[dict[str, Tensor]]:
        """Batches of slot `slot`'s stream after its first `taken` records, each filled from the next
        stream positions that lie in good shards (all of them, without bad shards)."""
        per_slot, size, pool = self.per_slot, self.batch_size, self.pools[0]
        epoch, offset = divmod(taken, per_slot)
        skipped = 0  # consecutive stream positions that fell in bad shards
        while True:
            parts: list[dict[str, Tensor]] = []
            filled = 0
            while filled < size:
                if offset == per_slot:
                    epoch, offset = epoch + 1, 0
                begin = slot * per_slot + offset
                window = pool.window_at(epoch, begin)
                # One window at a time: its shards are released before the next window's are opened.
                end = min(begin + size - filled, slot * per_slot + per_slot, window.stop)
                new = pool.gather(window, begin - window.start, end - window.start)
                parts += new
                got = sum(len(part["latents"]) for part in new)
                offset += end - begin
                filled += got
                skipped = 0 if got else skipped + end - begin
                # Bad shards are skipped, which could loop forever once nothing good is left to reach.
                if skipped and (len(self._bad) == len(self.entries) or (not self.shuffle and skipped >= per_slot)):
                    raise RuntimeError(f"every shard slot {slot} can read in {self.data_dir} is bad")
            yield _join(parts)

    def _bucket_batches(self, slot: int, taken: int) -> Iterator[dict[str, Tensor]]:
        """Batches of slot `slot`'s stream of a bucketed dataset after its first `taken` records (a whole number
        of batches): each one bucket's next batch of the slot's range of that bucket, in the epoch's sequence."""
        size = self.batch_size
        epoch, index = divmod(taken // size, self.batches_per_epoch)
        skipped = 0  # consecutive batches that had no good record
        while True:
            buckets, ordinals = self._epoch_sequence(epoch)
            for i in range(index, len(buckets)):
                pool = self.pools[int(buckets[i])]
                begin = slot * (pool.num_records // self.num_slots) + int(ordinals[i]) * size
                batch = self._pool_batch(pool, epoch, begin, size)
                if batch is None:
                    skipped += 1
                    if all(self.entries[s]["file"] in self._bad for p in self.pools for s in p.shards):
                        raise RuntimeError(f"every shard slot {slot} can read in {self.data_dir} is bad")
                    continue
                skipped = 0
                yield batch
            epoch, index = epoch + 1, 0

    def _epoch_sequence(self, epoch: int) -> tuple[Tensor, Tensor]:
        """(bucket of each batch of the epoch, how many batches of that bucket come before it)."""
        if self._sequence is None or self._sequence[0] != epoch:
            counts = [self.bucket_batches(pool) for pool in self.pools]
            buckets = bucket_sequence(self.seed, epoch, counts, self.shuffle)
            ordinals = torch.empty_like(buckets)
            for b in range(len(counts)):
                where = (buckets == b).nonzero().flatten()
                ordinals[where] = torch.arange(len(where))
            self._sequence = (epoch, buckets, ordinals)
        return self._sequence[1], self._sequence[2]

    def _pool_batch(self, pool: _Pool, epoch: int, begin: int, size: int) -> dict[str, Tensor] | None:
        """Positions [begin, begin + size) of a bucket's order as one batch: the records of bad shards replaced by
        the batch's good ones repeated (None when there are none)."""
        parts, position = [], begin
        while position < begin + size:
            window = pool.window_at(epoch, position)
            stop = min(begin + size, window.stop)
            parts += pool.gather(window, position - window.start, stop - window.start)
            position = stop
        got = sum(len(part["latents"]) for part in parts)
        if got == 0:
            return None
        batch = _join(parts)
        if got < size:
            repeat = torch.arange(size) % got
            batch = {key: value[repeat] for key, value in batch.items()}
        return batch

    def _select(self, tensors: dict[str, Tensor], rows: Tensor, kind: int) -> dict[str, Tensor]:
        """Shard rows `rows`, with their long (kind 0) or short (kind 1) caption, as a batch part."""
        part = {"latents": tensors["latents"].index_select(0, rows)}
        if self.spec.kind == "labels":
            part["labels"] = tensors["labels"].index_select(0, rows)
            return part
        prefix = "short_" if kind else ""
        for key in ("text_tokens", "attn_mask"):
            part[key] = tensors[prefix + key].index_select(0, rows)
        part["caption_kind"] = torch.full((len(rows),), kind, dtype=torch.int64)
        if self.text_features:
            part["text_features"] = scatter_features(tensors[prefix + "text_features"],
                                                     tensors[prefix + "text_feature_offsets"], rows, part["attn_mask"])
        return part

    def _load_checked(self, entry: dict[str, Any]) -> dict[str, Tensor] | None:
        """load_shard's checks (and checksum) on the first open in this process; an unchanged file
        (same size and mtime) opened again in a later epoch is trusted: checking a 1.6 GB shard reads
        it twice (sha256, isfinite), several times the cost of the samples taken from it."""
        path = self.data_dir / entry["file"]
        try:
            stat = path.stat()
            fingerprint = (stat.st_size, stat.st_mtime_ns)
        except OSError:
            fingerprint = None  # missing: load_shard says so
        self.shards_loaded += 1
        if fingerprint is not None and self._checked.get(entry["file"]) == fingerprint:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        try:
            tensors = load_shard(self.data_dir, entry, self.spec, verify_checksum=self.verify_checksum)
        except ShardError as err:
            if not self.skip_bad_shards:
                raise
            self._bad.add(entry["file"])
            self.bad_shards += 1
            warnings.warn(
                f"skipping bad shard {err.file} ({entry['records']} records): {err.field}: {err.problem}",
                stacklevel=2,
            )
            return None
        self._checked[entry["file"]] = fingerprint
        return tensors


def _join(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Batch parts as one batch; one part is already a fresh tensor per key (cat would only copy it again)."""
    if len(parts) == 1:
        return parts[0]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def build_loader(
    data_dir: Path | str,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 2,
    state: dict[str, int] | None = None,
    pin_memory: bool | None = None,
    prefetch_factor: int = 4,
    **dataset_kwargs: Any,
) -> DataLoader:
    """A DataLoader over a ShardDataset: `batch_size` per rank, infinite. Restore with `state` (from
    `loader.dataset.state_at(batches_taken * batch_size)`), or call `loader.dataset.load_state_dict`
    before the first `iter(loader)`. Make one iterator and keep it: a new one restarts at the loaded
    state. `dataset_kwargs` go to ShardDataset (shuffle, mix_shards, short_caption_prob, ...)."""
    dataset = ShardDataset(
        data_dir, rank, world_size, seed, num_workers=num_workers, batch_size=batch_size, **dataset_kwargs
    )
    if state is not None:
        dataset.load_state_dict(state)
    workers = num_workers > 0
    return DataLoader(
        dataset,
        batch_size=None,  # the dataset yields whole batches: nothing to collate, passed through as they come
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=workers,
        prefetch_factor=prefetch_factor if workers else None,  # in batches, per worker
        in_order=True,  # batch j from worker j % W: the order resume relies on
    )
