"""Check a dataset folder against its manifest.

    python -m data.validate DIR [--no-checksum] [--text-encoder NAME_OR_PATH [--text-encoder-subfolder SUB]]

Exits 0 when the manifest lists at least one record, every entry names a file inside DIR (and, with buckets, one
of the dataset's buckets), and every shard is present, readable, has every key with the right dtype and shape,
finite latents, token ids inside the tokenizer's vocabulary and the checksum the manifest records; with text
features also their dtype and width, finite values and offsets that match each record's mask (its real tokens);
otherwise prints one line per problem (file, field, what is wrong) and exits 1. --text-encoder also checks that
the features were made by that encoder (by the hash of its weights, or its hub id and revision). Shards are read
memory-mapped a chunk at a time (data/shards.py), never copied whole.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.cli_help import HelpFormatter


def validate(
    data_dir: Path, verify_checksum: bool = True, encoder: dict | None = None
) -> list[ShardError]:  # noqa: F821 (imported below)
    """Every problem of the folder, one ShardError each; `encoder`: an encoder identity (data/features.py) the
    features must have been made with."""
    from tqdm import tqdm

    from data.shards import ShardError, load_shard, read_manifest  # here: `--help` must not wait for torch

    try:
        manifest, spec = read_manifest(data_dir)
    except ShardError as err:
        return [err]
    errors = []
    if encoder is not None:
        errors += _check_encoder(Path(data_dir), spec, encoder)
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


def _check_encoder(data_dir: Path, spec, encoder: dict) -> list:
    from data.features import check_encoder
    from data.shards import ShardError

    where = data_dir / "manifest.json"
    if spec.text_features is None:
        return [ShardError(where, "spec.text_features", "none: the shards hold tokens only (--text-encoder checks "
                                                        "the encoder that made stored features)")]
    try:
        check_encoder(spec.text_features["encoder"], encoder, str(data_dir))
    except ValueError as err:
        return [ShardError(where, "spec.text_features.encoder", str(err))]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--no-checksum", action="store_true", help="skip the sha256 comparison (faster)")
    parser.add_argument("--text-encoder", default=None,
                        help="check the stored features were made by this encoder (hub id, folder, or 'minilm')")
    parser.add_argument("--text-encoder-subfolder", default=None, help="its subfolder (e.g. text_encoder)")
    args = parser.parse_args(argv)
    encoder = None
    if args.text_encoder is not None:
        from data.features import encoder_identity

        try:
            name = None if args.text_encoder == "minilm" else args.text_encoder
            encoder = encoder_identity(name, args.text_encoder_subfolder)
        except ValueError as err:
            parser.error(f"--text-encoder: {err}")
    errors = validate(args.data_dir, verify_checksum=not args.no_checksum, encoder=encoder)
    for err in errors:
        print(f"error: {err}", file=sys.stderr)
    if not errors:
        from data.shards import read_manifest

        manifest, spec = read_manifest(args.data_dir)
        buckets = manifest.get("buckets")
        detail = f"; buckets {', '.join(f'{k}: {v}' for k, v in buckets.items())}" if buckets else ""
        detail += f"; text features of {spec.text_features['encoder']['id']}" if spec.text_features else ""
        print(f"ok: {args.data_dir}: {len(manifest['shards'])} shards, {manifest['num_records']} records{detail}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
