"""Stream records from a shard folder (data/shards.py) into training: deterministic, split across
ranks and dataloader workers, and resumable to the exact sample.

Epoch order. Epoch e permutes the shards with a generator seeded from (seed, e), the same on every rank,
and shuffles each shard's records with one seeded from (seed, e, shard index). Concatenated, they give
the epoch's global record order of N records.

Split. Each rank runs W dataloader workers (W = 1 for num_workers=0): S = world_size * W slots, slot
s = rank * W + w. Slot s takes the contiguous range [s * L, (s + 1) * L) of the global order, with
L = N // S: every record is seen at most once per epoch, exactly once when S divides N, and the last
N - S * L records of the (shuffled) order are dropped, so every rank and worker yields the same
number of samples per epoch. Contiguous ranges keep each slot on about N / S records' worth of shards,
opened one at a time. Iteration is infinite: a slot runs through its range of epoch 0, then of epoch 1...
The price of contiguous ranges: a rank's batch holds records of one or two shards, so shards must be
written from a shuffled source (a shard of one class or one source would make whole batches of it).

Resume. A DataLoader with W workers takes batch j from worker j % W, and each worker fills a batch with
B consecutive samples of its stream. So after k batches (c = k * B samples consumed by this rank),
worker w has produced the batches j < k with j % W == w and can start from there without running
anything. A resumed DataLoader starts over at worker 0, so its worker w plays the role (slot) of the
original worker (k + w) % W. The trainer saves `dataset.state_at(step * batch_size)` and restores with
`dataset.load_state_dict(state)` before the DataLoader creates its iterator. Everything random (orders,
short-caption draws) is a function of (seed, epoch, shard index), never of a running generator.

Validation. A shard is checked by `load_shard` when a process first opens it (the checks of
`python -m data.validate`); reopened unchanged (same size and mtime) in a later epoch, it is trusted.
Without skip_bad_shards the ShardError propagates. With it, a bad shard is warned about once, counted
in `bad_shards` (in the process that iterates: a worker's count stays in the worker) and its records
are skipped. The stream is infinite, so a rank that yields fewer samples that epoch never runs dry and
DDP step counts stay equal; but the skipped records still hold their positions in the stream, so a run
resumed after a skip replays as many records as were skipped before the save point (exact otherwise).
"""

import hashlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.shards import ShardError, load_shard, read_manifest

SETUP_KEYS = ("seed", "world_size", "num_workers", "batch_size", "num_records")
"""What a saved state's order depends on besides the position: resuming with other values is not exact."""


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from several parts; a hash, so neighbouring epochs or shards get unrelated streams."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


def shard_order(seed: int, epoch: int, num_shards: int, shuffle: bool = True) -> Int[Tensor, "n"]:
    """The epoch's order of shard indices; a function of (seed, epoch) only, so equal on every rank."""
    if not shuffle:
        return torch.arange(num_shards)
    return torch.randperm(num_shards, generator=_generator(seed, epoch, "shards"))


def record_order(seed: int, epoch: int, shard: int, records: int, shuffle: bool = True) -> Int[Tensor, "n"]:
    """The order in which an epoch visits one shard's rows."""
    if not shuffle:
        return torch.arange(records)
    return torch.randperm(records, generator=_generator(seed, epoch, shard, "records"))


def short_caption_draws(seed: int, epoch: int, shard: int, records: int, prob: float) -> Bool[Tensor, "n"]:
    """Row i of the shard uses its short caption in this epoch. Indexed by row, not by visiting order, so
    the draw of a record does not depend on how the epoch is split or where a run resumed."""
    if prob <= 0.0:
        return torch.zeros(records, dtype=torch.bool)
    if prob >= 1.0:
        return torch.ones(records, dtype=torch.bool)
    return torch.rand(records, generator=_generator(seed, epoch, shard, "captions")) < prob


def samples_per_epoch(num_records: int, world_size: int, num_workers: int) -> int:
    """Samples one rank yields per epoch: L = N // (world_size * W) per worker stream, W streams."""
    workers = max(num_workers, 1)
    return num_records // (world_size * workers) * workers


class ShardDataset(IterableDataset):
    """Infinite stream of per-record dicts from a shard folder, for one rank of `world_size`.

    Yields `latents` (bf16 [C, H, W], as stored) and `labels` (int64 []) for a labels dataset, or
    `text_tokens` (int32 [L]), `attn_mask` (bool [L]) and `caption_kind` (int64 [], 0 long / 1 short)
    for a text dataset. `num_workers` and `batch_size` must match the DataLoader's (they define the
    split and the resume positions); `build_loader` keeps them in step.
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
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if not 0.0 <= short_caption_prob <= 1.0:
            raise ValueError(f"short_caption_prob must be in [0, 1], got {short_caption_prob}")
        if num_workers < 0 or batch_size < 1:
            raise ValueError(f"num_workers must be >= 0 and batch_size >= 1, got {num_workers}, {batch_size}")
        self.data_dir = Path(data_dir)
        self.manifest, self.spec = read_manifest(self.data_dir)
        if short_caption_prob > 0 and not (self.spec.kind == "text" and self.spec.short_captions):
            raise ValueError(
                f"short_caption_prob={short_caption_prob} needs a text dataset with short captions, but "
                f"{self.data_dir} has kind={self.spec.kind!r}, short_captions={self.spec.short_captions}"
            )
        self.entries: list[dict[str, Any]] = self.manifest["shards"]
        self.sizes = [int(e["records"]) for e in self.entries]
        self.num_records = sum(self.sizes)
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.short_caption_prob = short_caption_prob
        self.verify_checksum, self.skip_bad_shards = verify_checksum, skip_bad_shards
        self.num_workers, self.batch_size = num_workers, batch_size
        if self.per_slot == 0:
            raise ValueError(
                f"{self.data_dir} has {self.num_records} records, fewer than world_size * num_workers = "
                f"{self.num_slots} slots: every slot would be empty"
            )
        self.start_sample = 0
        """Samples of this rank already consumed when iteration starts (set by load_state_dict)."""
        self.samples_yielded = 0
        """start_sample + samples yielded since; exact in the process that iterates (num_workers=0)."""
        self.bad_shards = 0
        """Distinct bad shards met (with skip_bad_shards) in this process."""
        self.shards_loaded = 0
        """Shard opens in this process: each slot opens only the shards its range crosses."""
        self._bad: set[str] = set()
        self._checked: dict[str, tuple[int, int] | None] = {}  # file -> (size, mtime_ns) that passed load_shard
        self._open: tuple[int, dict[str, Tensor] | None] | None = None  # (shard index, tensors or None if bad)

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
        return self.num_records // self.num_slots

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank yields per epoch: equal on every rank."""
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
        # epoch and position count in the saved run's epochs, whose length follows from its setup.
        saved = {k: int(state.get(k, getattr(self, k))) for k in ("num_records", "world_size", "num_workers")}
        start = int(state["epoch"]) * samples_per_epoch(**saved) + int(state["position"])
        if self.workers > 1 and start % self.batch_size:
            raise ValueError(
                f"with num_workers={self.num_workers} the loader resumes at batch boundaries only: "
                f"{start} samples is not a multiple of batch_size={self.batch_size}"
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
        epoch, offset = divmod(taken, self.per_slot)
        while True:
            start = slot * self.per_slot
            for record in self._iter_range(epoch, start + offset, start + self.per_slot):
                self.samples_yielded += 1
                yield record
            epoch, offset = epoch + 1, 0

    def _iter_range(self, epoch: int, begin: int, end: int) -> Iterator[dict[str, Tensor]]:
        """Records [begin, end) of the epoch's global order, opening only the shards they lie in."""
        order = shard_order(self.seed, epoch, len(self.entries), self.shuffle).tolist()
        first = 0  # global position of the current shard's first record
        for shard in order:
            if first >= end:
                break
            size = self.sizes[shard]
            lo, hi = max(begin, first) - first, min(end, first + size) - first
            first += size
            if lo >= hi:
                continue
            tensors = self._load(shard)
            if tensors is None:  # bad shard, skipped
                continue
            rows = record_order(self.seed, epoch, shard, size, self.shuffle)[lo:hi].tolist()
            yield from self._records(
                tensors, rows, short_caption_draws(self.seed, epoch, shard, size, self.short_caption_prob)
            )

    def _records(self, tensors: dict[str, Tensor], rows: list[int], short: Tensor) -> Iterator[dict[str, Tensor]]:
        latents = tensors["latents"]
        if self.spec.kind == "labels":
            labels = tensors["labels"]
            for i in rows:
                yield {"latents": latents[i], "labels": labels[i]}
            return
        # Index 0 is the long caption, 1 the short one (absent, and never drawn, without short captions).
        tokens = (tensors["text_tokens"], tensors.get("short_text_tokens"))
        masks = (tensors["attn_mask"], tensors.get("short_attn_mask"))
        kinds = short.long()
        use_short = short.tolist()
        for i in rows:
            k = use_short[i]
            yield {
                "latents": latents[i],
                "text_tokens": tokens[k][i],
                "attn_mask": masks[k][i],
                "caption_kind": kinds[i],
            }

    def _load(self, shard: int) -> dict[str, Tensor] | None:
        """The shard's tensors (memory-mapped), validated; cached while the stream stays in it."""
        if self._open is not None and self._open[0] == shard:
            return self._open[1]
        self._open = None  # release the previous shard's mapping before opening the next
        entry = self.entries[shard]
        tensors = None if entry["file"] in self._bad else self._load_checked(entry)
        self._open = (shard, tensors)
        return tensors

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
    `loader.dataset.state_at(step * batch_size)`), or call `loader.dataset.load_state_dict` before
    the first `iter(loader)`. Make one iterator and keep it: a new one restarts at the loaded state."""
    dataset = ShardDataset(
        data_dir, rank, world_size, seed, num_workers=num_workers, batch_size=batch_size, **dataset_kwargs
    )
    if state is not None:
        dataset.load_state_dict(state)
    workers = num_workers > 0
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=True,  # the stream is infinite; no partial batch ever forms, this only documents it
        persistent_workers=workers,
        prefetch_factor=prefetch_factor if workers else None,
        in_order=True,  # batch j from worker j % W: the order resume relies on
    )
