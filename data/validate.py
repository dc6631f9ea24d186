"""Check a dataset folder against its manifest.

    python -m data.validate DIR [--no-checksum]

Exits 0 when the manifest lists at least one record, every entry names a file inside DIR, and every shard
is present, readable, has every key with the right dtype and shape, finite latents, token ids inside the
tokenizer's vocabulary and the checksum the manifest records; otherwise prints one line per problem (file,
field, what is wrong) and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def validate(data_dir: Path, verify_checksum: bool = True) -> list[ShardError]:  # noqa: F821 (imported below)
    from tqdm import tqdm

    from data.shards import ShardError, load_shard, read_manifest  # here: `--help` must not wait for torch

    try:
        manifest, spec = read_manifest(data_dir)
    except ShardError as err:
        return [err]
    errors = []
    for entry in tqdm(manifest["shards"], desc=f"validating {data_dir}", unit="shard", leave=False):
        try:
            load_shard(data_dir, entry, spec, verify_checksum)
        except ShardError as err:
            errors.append(err)
    total = sum(e["records"] for e in manifest["shards"])
    if total == 0:  # a training stage would have nothing to read
        problem = "no shards" if not manifest["shards"] else f"{len(manifest['shards'])} shards, all with 0 records"
        errors.append(ShardError(Path(data_dir) / "manifest.json", "shards", f"{problem}: the dataset is empty"))
    if total != manifest.get("num_records", total):
        errors.append(
            ShardError(Path(data_dir) / "manifest.json", "num_records", f"{manifest['num_records']} != {total}")
        )
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--no-checksum", action="store_true", help="skip the sha256 comparison (faster)")
    args = parser.parse_args(argv)
    errors = validate(args.data_dir, verify_checksum=not args.no_checksum)
    for err in errors:
        print(f"error: {err}", file=sys.stderr)
    if not errors:
        from data.shards import read_manifest

        manifest, _ = read_manifest(args.data_dir)
        print(f"ok: {args.data_dir}: {len(manifest['shards'])} shards, {manifest['num_records']} records")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
