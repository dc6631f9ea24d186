"""Build an embedded dataset into WebDataset tars.

    python -m data.embedded.build --dataset {synthetic,openmoji} --out DIR
        [--image-size 32] [--num-samples N] [--seed 0] [--samples-per-tar 1000] [--sizes HxW,HxW,...]

Writes DIR/<name>-0000.tar, ... with `samples_per_tar` samples each (the last holds the rest) and then
DIR/dataset.json. Each sample has `__key__`, `png` (RGB, image_size square), `txt` (the long caption) and
`json` (caption, short_caption, label, label_name and the dataset's own attributes). With --sizes (synthetic
only), sample i is rendered at the i-th size in turn, height first (e.g. 40x40,32x48,48x32: the aspect-ratio
buckets of the embedded Stage 4), and dataset.json lists them.

Rebuilding is reproducible: same arguments, byte-identical tars (entries carry a fixed mtime). Each tar
is written as `<file>.tmp` and renamed when complete, and dataset.json is removed first and written
last, so an interrupted build never leaves a tar or a manifest that looks finished. Tars of this dataset
left over from a larger earlier build are removed.
"""

import argparse
import io
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

from core.cli_help import HelpFormatter
from data.embedded import EmbeddedSample, openmoji, synthetic

DATASETS = ("synthetic", "openmoji")
MANIFEST = "dataset.json"
SYNTHETIC_DEFAULT_SAMPLES = 50_000


def encode(sample: EmbeddedSample) -> dict[str, Any]:
    """The tar entries of one sample, already bytes so the encoding is ours and not WebDataset's default."""
    if sample.image.mode != "RGB":
        raise ValueError(f"{sample.key}: expected an RGB image, got {sample.image.mode} {sample.image.size}")
    png = io.BytesIO()
    sample.image.save(png, format="PNG", compress_level=9)
    record = dict(
        caption=sample.caption,
        short_caption=sample.short_caption,
        label=sample.label,
        label_name=sample.label_name,
        **sample.attributes,
    )
    return {
        "__key__": sample.key,
        "png": png.getvalue(),
        "txt": sample.caption.encode("utf-8"),
        "json": json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8"),
    }


def _write_tar(path: Path, samples: list[EmbeddedSample]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as stream:
        # mtime fixed: TarWriter stamps entries with the current time otherwise, and the bytes would differ.
        with wds.TarWriter(stream, mtime=0.0) as writer:
            for sample in samples:
                writer.write(encode(sample))
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)


def _batches(samples: Iterator[EmbeddedSample], size: int) -> Iterator[list[EmbeddedSample]]:
    batch: list[EmbeddedSample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _remove_stale_tars(out: Path, name: str, keep: set[str]) -> None:
    pattern = re.compile(rf"{re.escape(name)}-\d{{4,}}\.tar(\.tmp)?")
    for path in out.iterdir():
        if pattern.fullmatch(path.name) and path.name not in keep:
            path.unlink()


def build(
    dataset: str,
    out: Path,
    image_size: int = 32,
    num_samples: int | None = None,
    seed: int = 0,
    samples_per_tar: int = 1000,
    progress: bool = True,
    sizes: list[tuple[int, int]] | None = None,
    mix: str = "scenes",
) -> dict[str, Any]:
    """Write the tars and dataset.json into `out`; returns what dataset.json holds.

    num_samples: synthetic defaults to 50,000; openmoji to every emoji that renders. sizes: synthetic only, the
    (height, width) sample i is rendered at, in turn (default: all image_size squares). mix: synthetic only, which
    scenes it draws (synthetic.parse_mix: a name of synthetic.MIXES with optional field overrides).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    if sizes and (dataset != "synthetic" or min(min(size) for size in sizes) < 8):
        raise ValueError("sizes: synthetic scenes only, every side >= 8")
    if mix != "scenes" and dataset != "synthetic":
        raise ValueError("mix: synthetic scenes only")
    scene_mix = synthetic.parse_mix(mix) if dataset == "synthetic" else None
    if image_size < 8 or samples_per_tar < 1 or (num_samples is not None and num_samples < 1):
        raise ValueError("image_size must be >= 8, samples_per_tar and num_samples >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    if dataset == "synthetic":
        count = num_samples or SYNTHETIC_DEFAULT_SAMPLES
        samples = synthetic.iter_samples(image_size, count, seed, sizes, scene_mix)
        extra, total = synthetic.metadata(seed, scene_mix), count
        extra["mix_name"] = mix  # as given, so a builder can tell whether these tars are the mix it wants
        if sizes:
            extra["sizes"] = [list(size) for size in sizes]
    else:
        samples = openmoji.iter_samples(image_size, num_samples)
        # An upper bound: render failures are only known once rendered (none with OpenMoji 17's font).
        candidates = len(openmoji.list_emoji())
        extra, total = openmoji.metadata(), min(num_samples or candidates, candidates)
    bar = tqdm(samples, total=total, desc=f"building {dataset}", unit="img", disable=not progress)
    tars = []
    for index, batch in enumerate(_batches(iter(bar), samples_per_tar)):
        file = f"{dataset}-{index:04d}.tar"
        _write_tar(out / file, batch)
        tars.append(dict(file=file, samples=len(batch)))
    bar.close()
    _remove_stale_tars(out, dataset, {t["file"] for t in tars})
    manifest = dict(
        name=dataset,
        format="webdataset",
        keys=["__key__", "png", "txt", "json"],
        image_size=image_size,
        num_samples=sum(t["samples"] for t in tars),
        samples_per_tar=samples_per_tar,
        num_tars=len(tars),
        tars=tars,
        **extra,
    )
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument(
        "--num-samples", type=int, default=None, help=f"synthetic: default {SYNTHETIC_DEFAULT_SAMPLES}; openmoji: all"
    )
    parser.add_argument("--seed", type=int, default=0, help="synthetic scenes; openmoji is fixed by its files")
    parser.add_argument("--samples-per-tar", type=int, default=1000)
    parser.add_argument("--sizes", default=None, help="synthetic: HxW,HxW,... (height first), one per sample in turn")
    parser.add_argument("--mix", default="scenes", help="synthetic: which scenes to draw, a name of synthetic.MIXES "
                        "(scenes, single, objects) with optional overrides, e.g. 'objects,jitter=0.05'")
    args = parser.parse_args(argv)
    sizes = None
    if args.sizes:
        from data.buckets import parse_bucket

        try:
            sizes = [(b.height, b.width) for b in map(parse_bucket, args.sizes.split(","))]
        except ValueError as err:
            parser.error(f"--sizes: {err}")
    try:
        manifest = build(args.dataset, args.out, args.image_size, args.num_samples, args.seed, args.samples_per_tar,
                         sizes=sizes, mix=args.mix)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {manifest['num_samples']} samples in {manifest['num_tars']} tars to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
