"""Throughput of the shard loader against a raw read of the same shards.

    python -m scripts.bench.loader [--data-dir DIR] [--records 4096] [--shards 8] [--batch-size 64]
                                   [--epochs 6] [--workers 0 2] [--mix-shards 4 1]

Without --data-dir it writes a synthetic text dataset of realistic record size (16x32x32 bf16 latents,
120-token long and short captions) to a temp dir. The raw read is the floor any loader pays: torch.load
of each shard and batch-sized slices copied out, in file order, with no checks. The loader rows run
ShardDataset through build_loader (shuffled, mixed across shards, split, validated on open, batches
built in the workers) for the same number of epochs. Both read from the page cache after the first
pass, so this measures CPU cost, not disk. The DataLoader floor rows gather batches from tensors already
in memory and return them the same way: the cost of the DataLoader transport alone.

Columns: samples/s of epoch 1 (worker start-up and first-open checks included), then the median and the
best of the later epochs, each with its ratio to the raw read's. Every row runs --rounds times (rows
interleaved, raw included) and keeps its best figures: on a shared machine another job's burst of CPU
then hits one round of one row, not the comparison. The raw read's epochs vary most (each torch.load
allocates and faults in a whole shard), so the best-epoch ratio is the steadier one.
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset

from core.cli_help import HelpFormatter
from data.loader import build_loader
from data.shards import DatasetSpec, ShardWriter, read_manifest, write_manifest


def make_dataset(root: Path, records: int, shards: int, text_len: int = 120) -> None:
    spec = DatasetSpec(
        kind="text",
        latent_shape=(16, 32, 32),
        image_size=256,
        vae={"id": "identity", "scale": 1.0, "shift": 0.0, "pixel_range": [-1, 1]},
        tokenizer={"id": "synthetic", "max_length": text_len, "vocab_size": 32_000},
        short_captions=True,
    )
    per_shard = -(-records // shards)
    writer = ShardWriter(root, spec, records_per_shard=per_shard)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, text_len, (records, 2), generator=gen)
    positions = torch.arange(text_len)
    for i in range(records):
        mask, short_mask = positions < lengths[i, 0], positions < lengths[i, 1] // 4 + 1
        writer.add(
            latents=torch.randn(16, 32, 32, generator=gen),
            text_tokens=torch.randint(0, 32_000, (text_len,), generator=gen) * mask,
            attn_mask=mask,
            short_text_tokens=torch.randint(0, 32_000, (text_len,), generator=gen) * short_mask,
            short_attn_mask=short_mask,
        )
    writer.close()
    write_manifest(root, spec, per_shard)


def bench_raw(data_dir: Path, batch_size: int, epochs: int) -> list[tuple[int, float]]:
    """(samples, seconds) per epoch of the raw read."""
    manifest, _ = read_manifest(data_dir)
    keys = ("latents", "text_tokens", "attn_mask")
    out = []
    for _ in range(epochs):
        samples, start = 0, time.perf_counter()
        for entry in manifest["shards"]:
            shard = torch.load(data_dir / entry["file"], map_location="cpu", weights_only=True)
            for i in range(0, entry["records"] - batch_size + 1, batch_size):
                batch = {k: shard[k][i : i + batch_size].clone() for k in keys}
                samples += batch["latents"].shape[0]
        out.append((samples, time.perf_counter() - start))
    return out


def bench_loader(
    data_dir: Path, batch_size: int, epochs: int, workers: int, verify: bool, mix: int
) -> list[tuple[int, float]]:
    """(samples, seconds) per epoch of ShardDataset through a DataLoader; the first includes worker
    start-up and each process's first-open checks (a trainer pays both too)."""
    loader = build_loader(
        data_dir,
        batch_size,
        num_workers=workers,
        verify_checksum=verify,
        short_caption_prob=0.1,
        pin_memory=False,
        mix_shards=mix,
    )
    steps = loader.dataset.samples_per_epoch // batch_size
    it = iter(loader)
    out = []
    for _ in range(epochs):
        start = time.perf_counter()
        samples = sum(b["latents"].shape[0] for b in islice(it, steps))
        out.append((samples, time.perf_counter() - start))
    return out


class InMemoryBatches(IterableDataset):
    """Batches gathered (index_select) from tensors already in memory and handed over as the loader
    hands its own: what gathering plus, with workers, the DataLoader's transport of each batch costs
    without reading a shard."""

    def __init__(self, records: int, batch_size: int, text_len: int = 120):
        self.latents = torch.randn(records, 16, 32, 32).bfloat16()
        self.tokens = torch.zeros(records, text_len, dtype=torch.int32)
        self.mask = torch.ones(records, text_len, dtype=torch.bool)
        self.kind = torch.zeros(records, dtype=torch.long)
        self.batch_size = batch_size

    def __iter__(self):
        gen = torch.Generator().manual_seed(0)
        while True:
            rows = torch.randint(0, len(self.kind), (self.batch_size,), generator=gen)
            yield dict(
                latents=self.latents.index_select(0, rows),
                text_tokens=self.tokens.index_select(0, rows),
                attn_mask=self.mask.index_select(0, rows),
                caption_kind=self.kind.index_select(0, rows),
            )


def bench_floor(records: int, batch_size: int, epochs: int, workers: int) -> list[tuple[int, float]]:
    loader = DataLoader(
        InMemoryBatches(min(records, 1024), batch_size),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
    )
    steps = records // batch_size
    it = iter(loader)
    out = []
    for _ in range(epochs):
        start = time.perf_counter()
        samples = sum(b["latents"].shape[0] for b in islice(it, steps))
        out.append((samples, time.perf_counter() - start))
    return out


def rates(epochs: list[tuple[int, float]]) -> tuple[float, float, float]:
    """Samples/s of the first epoch, and the median and the best of the later ones."""
    later = [n / t for n, t in epochs[1:] or epochs]
    return epochs[0][0] / epochs[0][1], statistics.median(later), max(later)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="an existing shard folder (default: synthetic, in a temp dir)")
    parser.add_argument("--records", type=int, default=4096)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--mix-shards", type=int, nargs="+", default=[4, 1], help="checksum-off rows for each")
    parser.add_argument("--rounds", type=int, default=3, help="run every row this many times, keep the best")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            data_dir = Path(tmp)
            t = time.perf_counter()
            make_dataset(data_dir, args.records, args.shards)
            print(f"wrote {args.records} records, {args.shards} shards to {data_dir} ({time.perf_counter() - t:.1f}s)")
        manifest, spec = read_manifest(data_dir)
        size = sum((data_dir / e["file"]).stat().st_size for e in manifest["shards"])
        print(
            f"{manifest['num_records']} records, {len(manifest['shards'])} shards, {size / 2**20:.0f} MiB, "
            f"latents {list(spec.latent_shape)}, batch {args.batch_size}, {args.epochs} epochs, "
            f"{torch.get_num_threads()} torch threads"
        )
        bench_raw(data_dir, args.batch_size, 1)  # warm the page cache: every row reads from memory
        bs, epochs, records = args.batch_size, args.epochs, manifest["num_records"]
        benches: list[tuple[str, Callable[[], list[tuple[int, float]]]]] = [
            ("raw torch.load + slice", lambda: bench_raw(data_dir, bs, epochs))
        ]
        for w in args.workers:
            first_mix = args.mix_shards[0]
            benches.append(
                (
                    f"loader workers={w} mix={first_mix} checksum=on",
                    lambda w=w, m=first_mix: bench_loader(data_dir, bs, epochs, w, True, m),
                )
            )
            for mix in args.mix_shards:
                benches.append(
                    (
                        f"loader workers={w} mix={mix} checksum=off",
                        lambda w=w, m=mix: bench_loader(data_dir, bs, epochs, w, False, m),
                    )
                )
            benches.append((f"DataLoader floor workers={w}", lambda w=w: bench_floor(records, bs, epochs, w)))
        # Rounds of every row, best figures kept (as timeit does; see the module docstring).
        best: dict[str, tuple[float, ...]] = {}
        for _ in range(args.rounds):
            for name, bench in benches:
                new = rates(bench())
                best[name] = tuple(map(max, best.get(name, new), new))
        _, raw_median, raw_best = best[benches[0][0]]
        print(f"samples/s, best of {args.rounds} rounds; ratios to the raw row's same column")
        print(f"{'':<42}{'epoch 1':>10}{'median':>10}{'/raw':>7}{'best':>10}{'/raw':>7}")
        for name, (first, median, top) in best.items():
            ratios = f"{median:>10,.0f}{median / raw_median:>7.0%}{top:>10,.0f}{top / raw_best:>7.0%}"
            print(f"{name:<42}{first:>10,.0f}{ratios}")


if __name__ == "__main__":
    main()
