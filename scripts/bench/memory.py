"""Peak memory of the shard writer, the shard check and the loader against the size of the shard.

    python -m scripts.bench.memory [--records 2000 4000 8000 16000] [--latent 16 64 64] [--dir DIR] [--smoke]

Each measurement runs in a fresh process (so its peak is its own) on one shard of --records records of --latent
bf16 latents with labels (16x64x64: 128 KiB a record, the records of 512 px SD3 latents): `writer` streams the
records through ShardWriter (its default 256 MiB buffer) and closes the shard; `check` runs load_shard (checksum
and every check of python -m data.validate); `loader` opens the shard through ShardDataset and reads one epoch of
batches of 64. The `legacy` rows do what the code did before (a writer that preallocates the shard and saves a
copy of it, a check that reduces |latents| over the whole mapped tensor) for comparison.

Columns: the shard's size; the process's peak resident set (VmHWM: getrusage) and the peak of its anonymous part
(RssAnon, sampled every 5 ms from /proc/self/status: what the process allocated, as against the shard's pages it
has mapped, which the kernel can drop and reread), both less the process's resident set before the measurement
(Python, torch and the imports). The last lines extrapolate to the 1024 px default: 50,000 records of 16x128x128
latents, 24.4 GiB a shard. Memory figures only: timings here would say nothing on a shared machine.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from core.cli_help import HelpFormatter

ROOT = Path(__file__).resolve().parents[2]
MODES = ("writer", "check", "loader", "legacy-writer", "legacy-check")


def rss_anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


class Peak:
    """The peak RssAnon while the block runs, sampled by a thread, and VmHWM after it (both KiB)."""

    def __enter__(self) -> "Peak":
        self.anon, self.done = rss_anon_kib(), threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.005):
            self.anon = max(self.anon, rss_anon_kib())

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.anon = max(self.anon, rss_anon_kib())
        self.hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def spec(latent: tuple[int, int, int]):
    from data.shards import DatasetSpec

    return DatasetSpec(kind="labels", latent_shape=latent, image_size=latent[1] * 8, num_classes=1000,
                       vae={"id": "identity", "scale": 1.0, "shift": 0.0, "pixel_range": [-1, 1]})


def write(folder: Path, records: int, latent: tuple[int, int, int], legacy: bool) -> None:
    import torch

    from data.shards import ShardWriter, write_manifest

    row = torch.randn(latent).bfloat16()
    if legacy:  # the previous writer: the whole shard preallocated, then a sliced copy of it saved
        buffers = dict(latents=torch.empty((records, *latent), dtype=torch.bfloat16),
                       labels=torch.empty(records, dtype=torch.int64))
        for i in range(records):
            buffers["latents"][i], buffers["labels"][i] = row, i % 1000
        tensors = {k: v[:records].clone() for k, v in buffers.items()}
        torch.save(tensors, folder / "legacy.pt")
        return
    with ShardWriter(folder, spec(latent), records_per_shard=records) as writer:
        for i in range(records):
            writer.add(latents=row, labels=torch.tensor(i % 1000))
    write_manifest(folder, spec(latent), records)


def check(folder: Path, legacy: bool) -> None:
    import torch

    from data.shards import load_shard, read_manifest

    if legacy:  # the previous check: one reduction over |latents|, which allocates a copy of the whole tensor
        shard = torch.load(folder / "legacy.pt", map_location="cpu", weights_only=True, mmap=True)
        assert torch.isfinite(shard["latents"].abs().amax())
        return
    manifest, data_spec = read_manifest(folder)
    load_shard(folder, manifest["shards"][0], data_spec, verify_checksum=True)


def load(folder: Path) -> None:
    from data.loader import ShardDataset

    dataset = ShardDataset(folder, batch_size=64)
    stream = iter(dataset)
    for _ in range(dataset.samples_per_epoch // 64):
        next(stream)


def measure(mode: str, folder: Path, records: int, latent: tuple[int, int, int]) -> dict:
    """One measurement in this process: its peaks over its baseline, in MiB."""
    import torch  # noqa: F401 (imported before the baseline: its libraries are no part of the measurement)

    import data.loader  # noqa: F401

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with Peak() as peak:
        start_anon = rss_anon_kib()
        if mode in ("writer", "legacy-writer"):
            write(folder, records, latent, legacy=mode.startswith("legacy"))
        elif mode in ("check", "legacy-check"):
            check(folder, legacy=mode.startswith("legacy"))
        else:
            load(folder)
    return dict(peak_rss_mib=(peak.hwm - base) / 1024, peak_anon_mib=(peak.anon - start_anon) / 1024)


def run(mode: str, folder: Path, records: int, latent: tuple[int, int, int]) -> dict:
    cmd = [sys.executable, "-m", "scripts.bench.memory", "--measure", mode, "--dir", str(folder), "--records",
           str(records), "--latent", *map(str, latent)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{mode} at {records} records failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--records", type=int, nargs="+", default=[2000, 4000, 8000, 16000])
    parser.add_argument("--latent", type=int, nargs=3, default=[16, 64, 64], metavar=("C", "H", "W"))
    parser.add_argument("--dir", type=Path, default=None, help="where the shards go (default: a temp dir)")
    parser.add_argument("--measure", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="two tiny shards (does the script run?)")
    args = parser.parse_args()
    latent = tuple(args.latent)
    if args.measure:
        print(json.dumps(measure(args.measure, args.dir, args.records[0], latent)))
        return
    if args.smoke:
        args.records, latent = [64, 128], (4, 8, 8)
    record_bytes = 2 * latent[0] * latent[1] * latent[2]
    print(f"| shard (records x {'x'.join(map(str, latent))} bf16) | GiB | "
          + " | ".join(f"{m} peak RSS / anon (MiB)" for m in MODES) + " |")
    print("|---|---:|" + "---:|" * len(MODES))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for records in args.records:
            folder = Path(tmp) / f"n{records}"
            folder.mkdir()
            cells = []
            for mode in MODES:
                figures = run(mode, folder, records, latent)
                cells.append(f"{figures['peak_rss_mib']:.0f} / {figures['peak_anon_mib']:.0f}")
            print(f"| {records} | {records * record_bytes / 2**30:.2f} | " + " | ".join(cells) + " |", flush=True)
            for path in folder.iterdir():
                path.unlink()
            folder.rmdir()
    default = 50_000 * 2 * 16 * 128 * 128 / 2**30
    print(f"\n1024 px default (50,000 x 16x128x128 bf16 = {default:.1f} GiB a shard): the writer holds its buffer "
          "(256 MiB by default, data.shards.BUFFER_BYTES; --writer-memory-mb in the pipeline) and the check at most "
          "two chunks (64 MiB each, CHECK_CHUNK_BYTES) whatever the shard's size; the loader holds its batches (one of "
          "64 x 512 KiB latents is 32 MiB) and releases the shard pages it read after each batch (data/loader.py), "
          f"so its peak stays near the sizes above. The legacy rows scale with the shard: about {2 * default:.0f} "
          f"GiB (writer) and {default:.0f} GiB (check, in every process that opens the shard) at that size.")

if __name__ == "__main__":
    main()
