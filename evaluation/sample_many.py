"""Many samples from one checkpoint, for FID and CLIP score: deterministic per index, split over ranks, resumable.

    python -m evaluation.sample_many --model-path CKPT --num-samples 50000 --out-dir DIR
    torchrun --nproc_per_node=8 -m evaluation.sample_many --model-path CKPT --num-samples 50000 --out-dir DIR

Sample i (0 <= i < N) has noise seed `seed + i` and, for a class checkpoint, the label
`np.random.default_rng([seed, i]).integers(num_classes)` (`--labels uniform`, the default: uniform at random,
as DiT's sample_ddp.py draws them [peebles2023]) or `i % num_classes` (`--labels balanced`: N / num_classes of
each). A text checkpoint takes caption `i % len(captions)` from `--captions FILE` (one per line) or from
`--caption-shards DIR`, a held-out shard folder (its `*.captions.jsonl`, in manifest order). So an image depends
on its index only, never on the rank, the batch it was drawn in or how often the run was restarted (on a GPU the
batch composition can move the last bits of a pixel, as for any batched sampler).

The indices are cut into parts of --batch-size; the parts not yet on disk are dealt round-robin over the ranks,
each written atomically to DIR/parts/part-NNNNNN.npz (and its PNGs first, with --png, to DIR/png/NNNNNN.png). A
killed run started again with the same flags continues where it stopped and neither regenerates nor duplicates an
index; other flags are refused, naming the settings that differ (DIR/sampling.json records them). Every part
records the hash of the settings it was drawn with: before drawing, rank 0 reads each part on disk whole, and one
that cannot be read (damaged), holds other indices or was drawn with other settings (sampling.json lost or
removed) is named, moved aside to part-NNNNNN.npz.rejected and drawn again. When every part is there, rank 0
writes DIR/samples.npz in the ADM layout (evaluation/npz.py: arr_0 uint8 [N, H, W, 3], arr_1 the
labels, or captions) and DIR/samples.json. Sampling goes through app/pipeline.py, as the CLI and the app do
(guidance, its interval, alpha, steps, solver, EMA or raw weights).
"""

import argparse
import hashlib
import json
import sys
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from app.precision import add_fp32_flag
from core.cli_help import HelpFormatter
from core.files import write_atomic, write_json_atomic

SETTINGS = "sampling.json"
SAMPLES = "samples.npz"
PLAN_MEMBER = "plan"
"""The member of every part that holds its plan's hash (Plan.digest)."""
REJECTED = ".rejected"


@dataclass(frozen=True)
class Plan:
    """What to draw; everything an index's image depends on, so a resumed run can check it is the same run."""

    model_path: str
    num_samples: int
    batch_size: int
    seed: int
    steps: int | None
    cfg_scale: float | None
    cfg_interval: tuple[float, float]
    alpha: float | None
    method: str
    weights: str
    labels: str
    captions_from: str | None
    dtype: str = "float32"
    """The transformer's (app/precision.py): bf16 and fp32 samples differ in their last bits."""

    @property
    def num_parts(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def indices(self, part: int) -> range:
        return range(part * self.batch_size, min((part + 1) * self.batch_size, self.num_samples))

    def digest(self) -> str:
        """sha256 of the settings, as sampling.json records them: what every part carries."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def sample_seed(seed: int, index: int) -> int:
    return seed + index


def class_label(seed: int, index: int, num_classes: int, rule: str) -> int:
    """The label of sample `index`: uniform at random from (seed, index), or balanced (index mod classes)."""
    if rule == "balanced":
        return index % num_classes
    return int(np.random.default_rng([seed, index]).integers(num_classes))


def read_captions(path: Path) -> list[str]:
    """Captions from a text file (one per line, blank lines skipped) or a shard folder's captions sidecars."""
    path = Path(path)
    if path.is_dir():
        manifest = path / "manifest.json"
        if not manifest.is_file():
            raise ValueError(f"--caption-shards {path}: no manifest.json (a shard folder: data/README.md)")
        captions = []
        for entry in json.loads(manifest.read_text())["shards"]:
            sidecar = (path / entry["file"]).with_suffix(".captions.jsonl")
            if not sidecar.is_file():
                raise ValueError(f"--caption-shards {path}: {sidecar.name} is missing (the shards' caption text)")
            captions += [json.loads(line)["caption"] for line in sidecar.read_text().splitlines() if line]
        what = "--caption-shards"
    else:
        if not path.is_file():
            raise ValueError(f"--captions {path}: no such file")
        captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        what = "--captions"
    if not captions:
        raise ValueError(f"{what} {path}: holds no caption")
    return captions


def check_settings(out_dir: Path, plan: Plan) -> None:
    """Refuse to continue a run of other settings in `out_dir`, naming each setting that differs."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir}: a file, not a folder")
    path = out_dir / SETTINGS
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
        saved = {"dtype": "float32"} | saved  # runs from before the dtype was recorded: fp32
    except (OSError, ValueError) as err:
        raise ValueError(f"--out-dir {out_dir}: {path} is unreadable ({err}); remove it (every part records its own "
                         "settings, so none is reused wrongly) or use another --out-dir") from None
    now = json.loads(json.dumps(asdict(plan)))  # tuples as lists, as saved
    differ = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if differ:
        listed = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in differ.items())
        raise ValueError(f"--out-dir {out_dir} holds samples drawn with other settings ({listed}); use another "
                         "--out-dir, or the same flags to continue that run")


def part_path(out_dir: Path, part: int) -> Path:
    return out_dir / "parts" / f"part-{part:06d}.npz"


def draw_part(pipe, plan: Plan, part: int, captions: list[str] | None) -> dict[str, np.ndarray]:
    """Part `part`'s images (uint8 NHWC) and what they were conditioned on."""
    from app.validation import CLI

    idx = list(plan.indices(part))
    seeds = [sample_seed(plan.seed, i) for i in idx]
    kwargs = dict(seeds=seeds, steps=plan.steps, cfg_scale=plan.cfg_scale, cfg_interval=tuple(plan.cfg_interval),
                  alpha=plan.alpha, method=plan.method, names=CLI)
    out: dict[str, np.ndarray] = dict(index=np.asarray(idx, dtype=np.int64), plan=np.asarray(plan.digest()))
    if pipe.is_text:
        prompts = [captions[i % len(captions)] for i in idx]
        images = pipe.generate(prompts=prompts, **kwargs)
        out["captions"] = np.asarray(prompts)
    else:
        labels = [class_label(plan.seed, i, pipe.conditioning.num_classes, plan.labels) for i in idx]
        images = pipe.generate(labels=labels, **kwargs)
        out["arr_1"] = np.asarray(labels, dtype=np.int64)
    out["arr_0"] = images.cpu().numpy()
    return out


def write_part(out_dir: Path, part: int, arrays: dict[str, np.ndarray], png: bool) -> None:
    """PNGs first, then the part file: a part on disk means its PNGs are there too."""
    if png:
        from PIL import Image

        for i, image in zip(arrays["index"].tolist(), arrays["arr_0"], strict=True):
            target = out_dir / "png" / f"{i:06d}.png"
            write_atomic(target, lambda f, im=image: Image.fromarray(im).save(f, format="PNG"))
    write_atomic(part_path(out_dir, part), lambda f: np.savez(f, **arrays))


def _read_part(out_dir: Path, plan: Plan, part: int) -> dict[str, np.ndarray]:
    """A part's arrays, read whole (zip checks each member's CRC); ValueError naming the file when it cannot be
    read or is not this plan's part (part_problem)."""
    path = part_path(out_dir, part)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise ValueError(f"{path}: unreadable ({type(err).__name__}: {str(err)[:200]})") from None
    problem = part_problem(arrays, plan, part)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return arrays


def part_problem(arrays: dict[str, np.ndarray], plan: Plan, part: int) -> str | None:
    """Why a part's arrays are not part `part` of `plan`, or None."""
    if PLAN_MEMBER not in arrays or arrays[PLAN_MEMBER].shape != () or str(arrays[PLAN_MEMBER]) != plan.digest():
        return "drawn with other settings (its plan hash is not this run's)"
    index, images = arrays.get("index"), arrays.get("arr_0")
    if index is None or index.tolist() != list(plan.indices(part)):
        return f"holds other indices than part {part}'s"
    if images is None or images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(index) \
            or images.shape[-1] != 3:
        return "holds no uint8 [N, H, W, 3] images of its indices"
    conditions = arrays.get("arr_1", arrays.get("captions"))
    if conditions is None or len(conditions) != len(index):
        return "holds no label or caption per index"
    return None


def screen_parts(out_dir: Path, plan: Plan) -> list[tuple[Path, str]]:
    """Move aside (to part-NNNNNN.npz.rejected) every part on disk that _read_part refuses, so it counts as
    missing and is drawn again; returns (file, why) of each."""
    rejected = []
    for part in range(plan.num_parts):
        path = part_path(out_dir, part)
        if not path.is_file():
            continue
        try:
            _read_part(out_dir, plan, part)
        except ValueError as err:
            path.replace(path.with_name(path.name + REJECTED))
            rejected.append((path, str(err).removeprefix(f"{path}: ")))
    return rejected


def assemble(out_dir: Path, plan: Plan) -> Path:
    """DIR/samples.npz from the parts, in index order, streamed (the images never sit in memory together)."""
    from evaluation.npz import write_streamed

    missing = [p for p in range(plan.num_parts) if not part_path(out_dir, p).is_file()]
    if missing:
        raise ValueError(f"{out_dir}: {len(missing)} parts are missing (first {missing[0]}); run again to draw them")
    first = _read_part(out_dir, plan, 0)
    small = {k: [] for k in ("arr_1", "captions") if k in first}
    for p in range(plan.num_parts):  # np.load reads only the members asked for: the labels or captions
        path = part_path(out_dir, p)
        try:
            with np.load(path, allow_pickle=False) as data:
                for k, values in small.items():
                    values.append(data[k])
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
            raise ValueError(f"{path}: unreadable ({type(err).__name__}: {str(err)[:200]}); run again to draw it "
                             "anew") from None
    images = (_read_part(out_dir, plan, p)["arr_0"] for p in range(plan.num_parts))
    target = out_dir / SAMPLES
    write_streamed(target, (plan.num_samples, *first["arr_0"].shape[1:]), images,
                   **{k: np.concatenate(v) for k, v in small.items()})
    return target


def missing_parts(out_dir: Path, plan: Plan) -> list[int]:
    return [p for p in range(plan.num_parts) if not part_path(out_dir, p).is_file()]


def share(parts: list[int], ranks) -> list[int]:
    """This rank's parts of the missing ones: round-robin, so the ranks finish together."""
    return parts[ranks.rank :: ranks.world_size]


def draw(pipe, plan: Plan, out_dir: Path, parts: list[int], png: bool = False, captions: list[str] | None = None,
         progress: bool = True, desc: str = "sampling") -> None:
    from tqdm import tqdm

    for part in tqdm(parts, desc=desc, unit="part", disable=not progress):
        write_part(out_dir, part, draw_part(pipe, plan, part, captions), png)


def run(pipe, plan: Plan, out_dir: Path, ranks, png: bool = False, captions: list[str] | None = None,
        progress: bool = True) -> Path:
    """Draw the missing parts (this rank's share), then rank 0 writes samples.npz; returns its path."""
    out_dir = Path(out_dir)
    if pipe.is_text and not captions:
        raise ValueError("a text checkpoint needs captions: --captions FILE or --caption-shards DIR")
    check_settings(out_dir, plan)
    ranks.barrier()
    if ranks.is_main:
        write_json_atomic(out_dir / SETTINGS, asdict(plan))
        for path, why in screen_parts(out_dir, plan):
            print(f"evaluation.sample_many: {path}: {why}; drawing it again (the file is kept as "
                  f"{path.name}{REJECTED})", file=sys.stderr)
    ranks.barrier()  # the parts rank 0 refused are gone before any rank lists what is missing
    todo = missing_parts(out_dir, plan)
    ranks.barrier()  # every rank lists the missing parts before any is written
    draw(pipe, plan, out_dir, share(todo, ranks), png, captions, progress, f"sampling (rank {ranks.rank})")
    ranks.barrier()
    target = out_dir / SAMPLES
    if ranks.is_main:
        assemble(out_dir, plan)
        summary = dict(asdict(plan), samples=str(target), image_size=pipe.image_size, text=pipe.is_text,
                       drawn_now=len(todo), already_there=plan.num_parts - len(todo))
        write_json_atomic(out_dir / "samples.json", summary)
    ranks.barrier()
    return target


def _whole(least: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {least}, got {text!r}")
        return value

    return parse


_positive, _non_negative = _whole(1), _whole(0)


def parse_args(argv=None) -> argparse.Namespace:
    from flow.methods import ADAPTIVE_METHODS, FIXED_METHODS

    p = argparse.ArgumentParser(prog="python -m evaluation.sample_many", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--model-path", type=Path, required=True, help="checkpoint, or its run folder (the newest)")
    p.add_argument("--num-samples", type=_positive, required=True)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--batch-size", type=_positive, default=64, help="images per generate() call and per part file")
    p.add_argument("--seed", type=_non_negative, default=0, help="sample i has seed SEED + i")
    p.add_argument("--steps", type=_positive, default=None, help="ODE steps (default: the checkpoint's)")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance (1: off)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"))
    p.add_argument("--alpha", type=float, default=None, help="time-grid warp (> 1: more steps near noise)")
    p.add_argument("--method", default="euler", choices=FIXED_METHODS + ADAPTIVE_METHODS)
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--labels", choices=("uniform", "balanced"), default="uniform",
                   help="class checkpoints: labels uniform at random per index (DiT's), or balanced")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--captions", type=Path, help="text checkpoints: a held-out caption file, one per line")
    g.add_argument("--caption-shards", type=Path, help="text checkpoints: a held-out shard folder's captions")
    p.add_argument("--png", action="store_true", help="also write every sample as DIR/png/NNNNNN.png")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available; rank r takes GPU r)")
    add_fp32_flag(p)
    p.add_argument("--max-pixel-steps", type=_positive, default=None,
                   help="budget of height x width x steps x images per generate() call (app/validation.py)")
    from app.sources import add_source_flags

    add_source_flags(p)
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    from dataclasses import replace

    from app.pipeline import CheckpointError, load_pipeline, resolve_checkpoint
    from app.sources import sources_from_args
    from app.validation import BATCH, RequestError
    from core.ranks import join, leave
    from core.writable import writable_folder

    ranks = join(args.device)
    try:
        try:
            writable_folder(args.out_dir, f"--out-dir {args.out_dir}")
            model_path = resolve_checkpoint(args.model_path)
            limits = replace(BATCH, pixel_steps=args.max_pixel_steps)
            pipe = load_pipeline(model_path, weights=args.weights, device=ranks.device,
                                 sources=sources_from_args(args), limits=limits, fp32=args.fp32)
            source = args.captions or args.caption_shards
            if source is not None and not pipe.is_text:
                raise ValueError(f"--model-path {model_path} is class-conditional: --captions and --caption-shards "
                                 "are for text checkpoints (--labels uniform|balanced picks the labels)")
            captions = read_captions(source) if pipe.is_text and source else None
        except (CheckpointError, ValueError) as err:
            raise SystemExit(str(err)) from err
        plan = Plan(str(model_path.resolve()), args.num_samples, args.batch_size, args.seed, args.steps,
                    args.cfg_scale, tuple(args.cfg_interval), args.alpha, args.method, args.weights,
                    args.labels if not pipe.is_text else "captions", str(source) if pipe.is_text else None,
                    str(pipe.dtype).removeprefix("torch."))
        try:
            target = run(pipe, plan, args.out_dir, ranks, png=args.png, captions=captions,
                         progress=sys.stderr.isatty())
        except (RequestError, ValueError) as err:
            raise SystemExit(f"--model-path {model_path}: {err}") from err
        except OSError as err:  # a full disk, no permission: the atomic writes left no part half-written
            raise SystemExit(f"--out-dir {args.out_dir}: {err}") from err
        if ranks.is_main:
            print(target)
        return target
    finally:
        leave()


if __name__ == "__main__":
    main()
