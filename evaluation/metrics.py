"""Distribution metrics of a sample batch against a reference: FID, sFID, Inception Score, precision and recall,
and the CLIP score of text samples.

    python -m evaluation.metrics --samples DIR/samples.npz --reference REF.npz --json DIR/metrics.json
    torchrun --nproc_per_node=8 -m evaluation.metrics --samples DIR/samples.npz --reference REF.npz

`--samples`: an ADM-layout .npz (evaluation/sample_many.py writes one; evaluation/npz.py). `--reference`: an ADM
reference batch (.npz: `arr_0` images, and where present the statistics `mu`, `sigma`, `mu_s`, `sigma_s`), a
folder of same-size images, or a reference saved with --save-reference. Under torchrun every rank extracts the
features of a contiguous slice and the slices are gathered in order; the statistics are computed once.

The definitions are ADM's evaluator's [dhariwal2021adm], which DiT [peebles2023] and the class-conditional
ImageNet papers after it report with, on the same Inception features (evaluation/features.py):

* FID: the Frechet distance between Gaussians fitted (float64 mean and unbiased covariance) to the pool features
  [heusel2017fid], with scipy's sqrtm; sFID the same on the spatial features [nash2021sfid]. With a reference
  .npz that carries `mu`/`sigma` (and `mu_s`/`sigma_s`) those are used, as ADM's evaluator does, so a FID-50K
  against VIRTUAL_imagenet256_labeled.npz compares with the published ones; `--reference-stats recompute` fits
  them to the reference images instead.
* Inception Score: exp E[KL(p(y|x) || p(y))] of the softmax of the unbiased logits, in contiguous splits of 5,000
  images (10 for 50,000), averaged [salimans2016improved].
* Precision and recall: k-nearest-neighbour manifolds (k = 3) of the pool features [kynkaanniemi2019improved];
  precision is the fraction of samples inside the reference manifold, recall the fraction of reference images
  inside the sample manifold.
* CLIP score (text samples, which carry their `captions`): torchmetrics' CLIPScore, 100 x the mean cosine between
  the image and the caption embedding, floored at 0 [hessel2021clipscore], with the model of --clip-model
  (transformers' CLIP from the hub; default openai/clip-vit-large-patch14, torchmetrics' default).

Why ADM's statistics and not torchmetrics' FrechetInceptionDistance / InceptionScore (whose Inception is the same
torch-fidelity port): published FIDs use the reference batches' precomputed statistics, which those classes cannot
take; torchmetrics' IS shuffles the images before it splits them into a number of splits, where ADM's splits are
contiguous 5,000s; and neither offers sFID, nor torchmetrics precision and recall (torch-fidelity's needs
torchvision, which has no CPU build on this project's registry). The tests check these statistics against
torchmetrics fed the same features, against scipy in float64 and against closed forms (tests/test_metrics.py).
"""

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from core.cli_help import HelpFormatter
from core.ranks import ALONE, Ranks

IS_SPLIT_SIZE = 5000
NEIGHBOURS = 3
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ---- statistics ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gaussian:
    mu: np.ndarray
    sigma: np.ndarray


def fit_gaussian(features: Float[Tensor, "n d"] | np.ndarray) -> Gaussian:
    """Mean and unbiased covariance in float64 (numpy's cov, as ADM)."""
    x = np.asarray(features, dtype=np.float64)
    if len(x) < 2:
        raise ValueError(f"a covariance needs at least 2 images, got {len(x)}")
    return Gaussian(x.mean(axis=0), np.cov(x, rowvar=False))


def frechet_distance(a: Gaussian, b: Gaussian, eps: float = 1e-6) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), float64; an almost singular product is retried with
    eps on the diagonals, as TTUR's and ADM's code do."""
    import scipy.linalg

    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(f"statistics of different sizes: {a.mu.shape} and {b.mu.shape}")
    diff = a.mu - b.mu
    covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(a.sigma)) * eps
        covmean = scipy.linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"the Frechet distance's matrix root has an imaginary part {np.abs(covmean.imag).max()}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def inception_score(logits: Float[Tensor, "n k"], split_size: int = IS_SPLIT_SIZE) -> tuple[float, float]:
    """(mean, standard deviation) over contiguous splits of `split_size` of exp E[KL(p(y|x) || p(y))]."""
    p = torch.softmax(torch.as_tensor(logits).double(), dim=1)
    scores = []
    for part in p.split(split_size):
        marginal = part.mean(dim=0, keepdim=True)
        kl = (torch.special.xlogy(part, part) - part * marginal.log()).sum(dim=1).mean()
        scores.append(kl.exp())
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False))


def _distances(rows: Tensor, cols: Tensor, block: int):
    for start in range(0, len(rows), block):
        yield start, torch.cdist(rows[start : start + block], cols)


def manifold_radii(features: Float[Tensor, "n d"], k: int = NEIGHBOURS, block: int = 4096) -> Float[Tensor, " n"]:
    """Each point's distance to its k-th nearest neighbour in the same set (itself excluded: it is the 0th)."""
    radii = torch.empty(len(features), dtype=features.dtype, device=features.device)
    for start, d in _distances(features, features, block):
        radii[start : start + len(d)] = d.kthvalue(k + 1, dim=1).values
    return radii


def inside(queries: Tensor, points: Tensor, radii: Tensor, block: int = 4096) -> Tensor:
    """Whether each query lies within the radius of at least one point."""
    hits = torch.empty(len(queries), dtype=torch.bool, device=queries.device)
    for start, d in _distances(queries, points, block):
        hits[start : start + len(d)] = (d <= radii[None]).any(dim=1)
    return hits


def precision_recall(reference: Tensor, samples: Tensor, k: int = NEIGHBOURS) -> tuple[float, float]:
    """Improved precision and recall [kynkaanniemi2019improved] of samples against a reference (feature rows)."""
    if min(len(reference), len(samples)) <= k:
        raise ValueError(f"precision and recall need more than k={k} images on each side")
    ref, gen = reference.float(), samples.float()
    precision = inside(gen, ref, manifold_radii(ref, k)).double().mean()
    recall = inside(ref, gen, manifold_radii(gen, k)).double().mean()
    return float(precision), float(recall)


# ---- images and features ------------------------------------------------------------------------------------


class ImageFolder:
    """Same-size RGB images of a folder (sorted by name), sliced like an NHWC uint8 array."""

    def __init__(self, folder: Path):
        self.files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"--reference {folder}: no {'/'.join(IMAGE_SUFFIXES)} images in it")
        self.shape = (len(self.files), *self._read(self.files[0]).shape)

    def _read(self, path: Path) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: slice) -> np.ndarray:
        arrays = [self._read(p) for p in self.files[index]]
        for path, a in zip(self.files[index], arrays, strict=True):
            if a.shape != self.shape[1:]:
                raise ValueError(f"--reference {path}: {a.shape[1]}x{a.shape[0]} px, but {self.files[0].name} is "
                                 f"{self.shape[2]}x{self.shape[1]}: resize or crop the reference images to one size")
        return np.stack(arrays)


def _batch(images: Sequence, start: int, end: int, device) -> Tensor:
    """Rows start..end of NHWC uint8 images as an NCHW uint8 tensor on `device`."""
    return torch.from_numpy(np.array(images[start:end])).permute(0, 3, 1, 2).to(device)  # a copy: maps are read-only


def my_slice(n: int, ranks: Ranks) -> range:
    """This rank's contiguous share of n items (gathered in rank order, the shares restore the original order)."""
    return range(n * ranks.rank // ranks.world_size, n * (ranks.rank + 1) // ranks.world_size)


@torch.no_grad()
def extract(images: Sequence, net, ranks: Ranks = ALONE, batch_size: int = 100, device: str = "cpu",
            progress: bool = False) -> dict[str, Tensor]:
    """The features of every image (NHWC uint8 rows), each rank taking one contiguous slice, gathered in order."""
    from tqdm import tqdm

    mine = my_slice(len(images), ranks)
    parts: dict[str, list[Tensor]] = {}
    for start in tqdm(range(mine.start, mine.stop, batch_size), desc="features", unit="batch", disable=not progress):
        for key, value in net(_batch(images, start, min(start + batch_size, mine.stop), device)).items():
            parts.setdefault(key, []).append(value.float().cpu())
    if not parts:  # an empty slice still takes part in the gathers, with rows of the right width
        parts = {key: [value.float().cpu()[:0]] for key, value in net(_batch(images, 0, 1, device)).items()}
    feats = {key: ranks.gather_rows(torch.cat(values)) for key, values in sorted(parts.items())}
    bad = [key for key, value in feats.items() if not torch.isfinite(value).all()]
    if bad:  # every statistic of them would be NaN, and JSON has no NaN
        raise ValueError(f"the feature net gave NaN or infinite {', '.join(bad)} features: no metric computed")
    return feats


@dataclass
class Reference:
    """What samples are compared with: the statistics for FID and sFID, and pool features for precision/recall."""

    pool: Gaussian
    spatial: Gaussian | None
    pool_features: Tensor | None
    source: str
    num_images: int
    stats_from: str = "images"


def _stats(arrays: dict[str, np.ndarray], where: str) -> tuple[Gaussian | None, Gaussian | None]:
    pool = _gaussian(arrays, "mu", "sigma", where) if "mu" in arrays or "sigma" in arrays else None
    spatial = _gaussian(arrays, "mu_s", "sigma_s", where) if "mu_s" in arrays or "sigma_s" in arrays else None
    return pool, spatial


def _gaussian(arrays: dict[str, np.ndarray], mean: str, cov: str, where: str) -> Gaussian:
    """Stored statistics, checked as a Gaussian's: a finite mean of d numbers and a finite, symmetric, positive
    semi-definite d x d covariance (what np.cov gives, up to rounding), so the Frechet distance's matrix root is
    real; ValueError naming the array otherwise, before any feature is extracted."""
    if mean not in arrays or cov not in arrays:
        raise ValueError(f"{where}: holds {mean if mean in arrays else cov} without {cov if mean in arrays else mean}")
    mu, sigma = arrays[mean], arrays[cov]
    if mu.dtype.kind not in "fiu" or sigma.dtype.kind not in "fiu" or mu.ndim != 1 or len(mu) == 0 \
            or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{where}: {mean} {list(mu.shape)} and {cov} {list(sigma.shape)} are not a mean of d numbers "
                         "and a d x d covariance")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{where}: {mean} or {cov} holds NaN or infinite values")
    scale = max(float(np.abs(sigma).max()), 1e-300)
    if not np.allclose(sigma, sigma.T, rtol=0, atol=1e-8 * scale):
        raise ValueError(f"{where}: {cov} is not symmetric, so not a covariance")
    lowest = float(np.linalg.eigvalsh(sigma).min())
    if lowest < -1e-6 * scale:
        raise ValueError(f"{where}: {cov} has a negative eigenvalue ({lowest:.3g}), so not a covariance")
    return Gaussian(mu, sigma)


def feature_widths(net, images: Sequence, device: str = "cpu") -> dict[str, int]:
    """{feature name: width} of `net`, from one image: what stored statistics must match before extraction."""
    return {k: int(v.shape[1]) for k, v in net(_batch(images, 0, 1, device)).items()}


def check_reference_widths(reference: "Reference", widths: dict[str, int], where: str) -> None:
    """ValueError when the reference's statistics or features are not of the feature net's widths."""
    pairs = [("mu/sigma", reference.pool.mu.shape[0], widths.get("pool"))]
    if reference.spatial is not None:
        pairs.append(("mu_s/sigma_s", reference.spatial.mu.shape[0], widths.get("spatial")))
    if reference.pool_features is not None:
        pairs.append(("pool_features", reference.pool_features.shape[1], widths.get("pool")))
    for name, have, want in pairs:
        if want is not None and have != want:
            raise ValueError(f"{where}: {name} are of {have} features, but the feature net gives {want}: statistics "
                             "of another network (recompute them from images with this one)")


def check_count(n: int, what: str, neighbours: int | None = NEIGHBOURS) -> None:
    """ValueError unless `n` images are enough: 2 for a covariance (FID), more than k for precision and recall
    (`neighbours` k; None when they are not computed)."""
    need = 2 if neighbours is None else max(2, neighbours + 1)
    if n < need:
        pr = "" if neighbours is None else f" and precision and recall more than k={neighbours}"
        raise ValueError(f"{what} holds {n} image{'s' if n != 1 else ''}: FID needs at least 2 (a covariance){pr}; "
                         f"give at least {need}")


def load_reference(path: Path | str, net, ranks: Ranks = ALONE, batch_size: int = 100, device: str = "cpu",
                   recompute: bool = False, progress: bool = False,
                   widths: dict[str, int] | None = None) -> Reference:
    """A reference from an ADM .npz, a saved reference (its `pool_features`), or a folder of images; everything it
    holds is checked (counts, statistics, and, given the feature net's `widths`, their sizes) before anything is
    extracted from its images."""
    from evaluation.npz import read_npz

    path = Path(path)
    where = f"--reference {path}"
    if path.is_dir():
        images, arrays = ImageFolder(path), {}
    else:
        arrays = read_npz(path, "--reference")
        images = arrays.get("arr_0")
    given_pool, given_spatial = (None, None) if recompute else _stats(arrays, where)
    if "pool_features" in arrays and given_pool is not None:
        feats = np.asarray(arrays["pool_features"])
        if feats.ndim != 2 or feats.dtype.kind != "f" or not np.isfinite(feats).all():
            raise ValueError(f"{where}: pool_features must be finite float rows [N, d], got {feats.dtype} "
                             f"{list(feats.shape)}")
        check_count(len(feats), f"{where} (pool_features)")
        reference = Reference(given_pool, given_spatial, torch.from_numpy(feats.astype(np.float32)), str(path),
                              len(feats), "saved")
        check_reference_widths(reference, widths or {}, where)
        return reference
    if images is None:
        if given_pool is None:
            raise ValueError(f"{where}: holds neither images (arr_0) nor statistics (mu, sigma)")
        reference = Reference(given_pool, given_spatial, None, str(path), 0, "npz")
        check_reference_widths(reference, widths or {}, where)
        return reference
    check_count(len(images), where)
    if given_pool is not None:
        check_reference_widths(Reference(given_pool, given_spatial, None, str(path), 0), widths or {}, where)
    feats = extract(images, net, ranks, batch_size, device, progress)
    spatial = given_spatial or (fit_gaussian(feats["spatial"]) if "spatial" in feats else None)
    stats_from = "npz" if given_pool is not None else "images"
    return Reference(given_pool or fit_gaussian(feats["pool"]), spatial, feats["pool"], str(path), len(images),
                     stats_from)


def save_reference(path: Path, reference: Reference) -> None:
    """An .npz that --reference reads back without the images: mu, sigma, mu_s, sigma_s and the pool features."""
    from core.files import write_atomic

    arrays = dict(mu=reference.pool.mu, sigma=reference.pool.sigma)
    if reference.spatial is not None:
        arrays |= dict(mu_s=reference.spatial.mu, sigma_s=reference.spatial.sigma)
    if reference.pool_features is not None:
        arrays["pool_features"] = reference.pool_features.numpy()
    write_atomic(Path(path), lambda f: np.savez(f, **arrays))


# ---- CLIP score ---------------------------------------------------------------------------------------------


class ProjectedCLIP(torch.nn.Module):
    """A transformers CLIPModel whose get_image_features / get_text_features return the projected embeddings as
    tensors: transformers 5 returns an output object there (its pooler_output), which torchmetrics 1.x reads as a
    tensor."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(out) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def hub_clip(name: str) -> Callable[[], tuple[torch.nn.Module, Any]]:
    """torchmetrics' model factory for a CLIP on the hub (downloaded there on first use)."""

    def load():
        from transformers import CLIPModel, CLIPProcessor

        return ProjectedCLIP(CLIPModel.from_pretrained(name).eval()), CLIPProcessor.from_pretrained(name)

    return load


def clip_score(images: Sequence, captions: Sequence[str], clip: Callable[[], tuple[torch.nn.Module, Any]],
               ranks: Ranks = ALONE, batch_size: int = 100, device: str = "cpu") -> float:
    """torchmetrics' CLIPScore over (image, caption) pairs, each rank its contiguous slice, summed over ranks."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=clip).to(device)
    mine = my_slice(len(images), ranks)
    for start in range(mine.start, mine.stop, batch_size):
        end = min(start + batch_size, mine.stop)
        with torch.no_grad():
            metric.update(_batch(images, start, end, device), [str(c) for c in captions[start:end]])
    return float(metric.compute())  # torchmetrics sums score and count over the process group


# ---- the whole evaluation -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    batch_size: int = 100
    device: str = "cpu"
    neighbours: int = NEIGHBOURS
    is_split_size: int = IS_SPLIT_SIZE
    progress: bool = False


DEFAULTS = Settings()


def evaluate(samples: dict[str, np.ndarray], reference: Reference | None, net,
             clip: Callable[[], tuple[torch.nn.Module, Any]] | None = None, ranks: Ranks = ALONE,
             settings: Settings = DEFAULTS) -> dict[str, Any] | None:
    """The metrics of `samples` (arrays of an ADM .npz) on every rank's slice; the report on rank 0 (else None)."""
    s = settings
    images = samples["arr_0"]
    if reference is not None:
        check_count(len(images), "--samples", s.neighbours if reference.pool_features is not None else None)
    feats = extract(images, net, ranks, s.batch_size, s.device, s.progress) if reference is not None else {}
    clip_value = None
    if clip is not None and "captions" in samples:
        clip_value = clip_score(images, samples["captions"], clip, ranks, s.batch_size, s.device)
    if not ranks.is_main:
        return None
    report: dict[str, Any] = dict(num_samples=len(images), image_size=list(images.shape[1:3]))
    if reference is not None:
        report |= dict(reference=reference.source, reference_images=reference.num_images,
                       reference_stats=reference.stats_from)
        report["fid"] = frechet_distance(fit_gaussian(feats["pool"]), reference.pool)
        if reference.spatial is not None and "spatial" in feats:
            report["sfid"] = frechet_distance(fit_gaussian(feats["spatial"]), reference.spatial)
        if "logits" in feats:
            report["inception_score"], report["inception_score_std"] = inception_score(feats["logits"],
                                                                                       s.is_split_size)
        if reference.pool_features is not None:
            pr = precision_recall(reference.pool_features.to(s.device), feats["pool"].to(s.device), s.neighbours)
            report["precision"], report["recall"] = pr
    if clip_value is not None:
        report["clip_score"] = clip_value
    bad = [k for k, v in report.items() if isinstance(v, float) and not np.isfinite(v)]
    if bad:  # JSON has no NaN: a report holding one would be invalid, and the number means nothing
        raise ValueError(f"the {', '.join(bad)} came out as {report[bad[0]]} (non-finite features or statistics): "
                         "no report written")
    return report


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return int(text)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m evaluation.metrics", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--samples", type=Path, required=True, help="ADM-layout .npz of samples (arr_0 uint8 NHWC)")
    p.add_argument("--reference", type=Path, default=None,
                   help="ADM reference .npz, a saved reference, or a folder of images (none: CLIP score only)")
    p.add_argument("--reference-stats", choices=("auto", "recompute"), default="auto",
                   help="auto: the .npz's mu/sigma if it has them (ADM's protocol); recompute: from its images")
    p.add_argument("--save-reference", type=Path, default=None,
                   help="write the reference's statistics and pool features here, to pass as --reference next time")
    p.add_argument("--inception-weights", type=Path, default=None,
                   help="the FID Inception weights file (default: torch's hub cache, downloaded on first use)")
    p.add_argument("--clip-model", default=DEFAULT_CLIP, help="CLIP on the hub for text samples' CLIP score")
    p.add_argument("--no-clip", action="store_true", help="skip the CLIP score of text samples")
    p.add_argument("--batch-size", type=_positive, default=100, help="images per feature-net call")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available; rank r takes GPU r)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    return p.parse_args(argv)


def loaded_clip(name: str) -> Callable[[], tuple[torch.nn.Module, Any]]:
    """The CLIP of --clip-model loaded now (before any feature is extracted), as torchmetrics' factory."""
    try:
        model, processor = hub_clip(name)()
    except (OSError, ValueError, ImportError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ValueError(f"--clip-model {name}: cannot load it ({first}); on a machine without internet fetch it "
                         "once where there is (README), or skip the CLIP score with --no-clip") from None
    return lambda: (model, processor)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    from core.files import write_json_atomic
    from core.ranks import join, leave
    from core.writable import writable_file
    from evaluation.features import InceptionFeatures
    from evaluation.npz import read_npz

    ranks = join(args.device)
    try:
        try:
            for flag, path in (("--json", args.json), ("--save-reference", args.save_reference)):
                if path is not None:  # written at the end: checked at the start
                    writable_file(path, f"{flag} {path}")
            samples = read_npz(args.samples, "--samples")
            if "arr_0" not in samples:
                raise ValueError(f"--samples {args.samples}: no arr_0 (the images)")
            if args.reference is None and (args.no_clip or "captions" not in samples):
                raise ValueError(f"--samples {args.samples}: nothing to compute without --reference (FID, sFID, IS, "
                                 "precision, recall) unless the samples carry captions (the CLIP score)")
            if args.reference is not None:  # enough for FID and precision/recall, before any reading of the reference
                check_count(len(samples["arr_0"]), f"--samples {args.samples}")
            clip = loaded_clip(args.clip_model) if not args.no_clip and "captions" in samples else None
            net = InceptionFeatures(args.inception_weights).to(ranks.device) if args.reference else None
            settings = Settings(args.batch_size, str(ranks.device), progress=sys.stderr.isatty() and ranks.is_main)
            reference = None
            if args.reference is not None:
                widths = feature_widths(net, samples["arr_0"], str(ranks.device))
                reference = load_reference(args.reference, net, ranks, args.batch_size, str(ranks.device),
                                           args.reference_stats == "recompute", settings.progress, widths)
                if args.save_reference is not None and ranks.is_main:
                    save_reference(args.save_reference, reference)
            report = evaluate(samples, reference, net, clip, ranks, settings)
        except (OSError, ValueError, ImportError) as err:
            raise SystemExit(str(err)) from err
        if report is not None:
            report |= dict(samples=str(args.samples),
                           feature_net="inception-v3-compat (torch-fidelity)" if reference is not None else None,
                           clip_model=args.clip_model if "clip_score" in report else None)
            text = json.dumps(report, indent=2, allow_nan=False)
            print(text)
            if args.json is not None:
                try:
                    write_json_atomic(args.json, report)
                except OSError as err:
                    raise SystemExit(f"--json {args.json}: {err}") from err
        return report
    finally:
        leave()


if __name__ == "__main__":
    main()
