"""Aspect-ratio buckets: the image sizes a multi-aspect stage trains on, and which bucket an image goes to.

PixArt-alpha trains its 512 and 1024 px stages on about 40 buckets from 1:4 to 4:1 at a near-constant pixel count
[chen2023pixartalpha]. Its tables follow one rule, regenerated here rather than copied (`bucket_table`): at a
resolution S, every (height, width) whose sides are multiples of S / 16 and whose area lies in [0.9, 1] x S^2,
with the aspect ratio inside [1/4, 4]. The rule gives 41 buckets at 256, 512 and 1024 px; PixArt-alpha's
published tables list 40 of them (they lack 704 x 1344 at 1024 px, h/w 1.91, and its 256 / 512 px counterparts,
although they list the transposes): kept here, so the table is symmetric in height and width.
`tests/test_buckets.py` checks the rule against diffusers' copies of the tables.

A bucket is (height, width) in pixels, named "HxW" (height first, as PixArt-alpha's [h, w] pairs). An image goes
to the bucket nearest its aspect ratio in log(h / w), which treats a portrait and its landscape transpose alike
(PixArt-alpha compares h / w linearly, which puts the cut between 1:2 and 1:3 nearer 1:2 than between 2:1 and
3:1); it is then resized to cover the bucket and centre-cropped to it (data/pipeline/sources.py).
"""

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PIXART_RESOLUTIONS = (256, 512, 1024)
"""The resolutions PixArt-alpha published tables for; `bucket_table` takes any."""
MIN_AREA, MAX_ASPECT, STEPS_PER_SIDE = 0.9, 4.0, 16
"""The rule's numbers: area in [MIN_AREA, 1] x S^2, aspect within [1 / MAX_ASPECT, MAX_ASPECT], sides in steps
of S / STEPS_PER_SIDE."""


@dataclass(frozen=True, order=True)
class Bucket:
    """One training size, in pixels."""

    height: int
    width: int

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"a bucket needs positive sides, got {self.height}x{self.width}")

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}"

    @property
    def ratio(self) -> float:
        """Height over width, as PixArt-alpha keys its tables."""
        return self.height / self.width

    @property
    def area(self) -> int:
        return self.height * self.width

    def latent_shape(self, channels: int, factor: int) -> tuple[int, int, int]:
        """[C, H, W] of this bucket's latents for an autoencoder that downsamples by `factor`."""
        if self.height % factor or self.width % factor:
            raise ValueError(f"bucket {self.name} is not a multiple of the VAE's downsampling {factor}")
        return (channels, self.height // factor, self.width // factor)


def bucket_table(
    resolution: int, step: int | None = None, min_area: float = MIN_AREA, max_aspect: float = MAX_ASPECT
) -> list[Bucket]:
    """Every bucket of the rule at `resolution` (module docstring), sorted by aspect ratio (tallest first).

    `step` (default resolution / 16) is the side's granularity; pass a multiple of patch x VAE factor for tiny
    resolutions where resolution / 16 is not one. `max_aspect` caps max(h / w, w / h)."""
    step = step or resolution // STEPS_PER_SIDE
    if resolution < 1 or step < 1 or not 0 < min_area <= 1 or max_aspect < 1:
        raise ValueError(f"bucket_table({resolution}, step={step}, min_area={min_area}, max_aspect={max_aspect}): "
                         "needs a positive resolution and step, min_area in (0, 1] and max_aspect >= 1")
    target = resolution * resolution
    largest = math.isqrt(int(target * max_aspect)) + step  # the longest side any bucket can have
    buckets = []
    for height in range(step, largest + 1, step):
        for width in range(step, largest + 1, step):
            # Integer comparisons: area / S^2 in [min_area, 1] and the aspect cap, with no rounding at the edges.
            area = height * width
            if area <= target and area >= min_area * target and max(height, width) <= max_aspect * min(height, width):
                buckets.append(Bucket(height, width))
    return sorted(buckets, key=lambda b: (-b.ratio, b.height))


def pixart_table(resolution: int) -> list[Bucket]:
    """PixArt-alpha's table at 256, 512 or 1024 px, by the rule."""
    if resolution not in PIXART_RESOLUTIONS:
        raise ValueError(f"PixArt-alpha's bucket tables are for {PIXART_RESOLUTIONS} px, not {resolution}: "
                         "give --buckets HxW,HxW,... or bucket_table(resolution, step)")
    return bucket_table(resolution)


_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_bucket(text: str) -> Bucket:
    """'HxW' (pixels, height first) -> Bucket; ValueError naming the text otherwise."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a bucket HxW in pixels, height first (e.g. 512x1024)")
    return Bucket(int(match[1]), int(match[2]))


def parse_buckets(text: str, resolution: int) -> list[Bucket]:
    """A --buckets value: 'pixart' (PixArt-alpha's table at `resolution`) or 'HxW,HxW,...', sorted by aspect."""
    if text.strip().lower() == "pixart":
        return pixart_table(resolution)
    buckets = [parse_bucket(part) for part in text.split(",") if part.strip()]
    if not buckets:
        raise ValueError(f"{text!r} names no bucket; give 'pixart' or HxW,HxW,...")
    if len(set(buckets)) != len(buckets):
        raise ValueError(f"{text!r} names a bucket twice")
    return sorted(buckets, key=lambda b: (-b.ratio, b.height))


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's in log(h / w); on a tie the larger, then the first."""
    if not buckets:
        raise ValueError("no buckets to choose from")
    log_ratio = math.log(height / width)
    return min(buckets, key=lambda b: (abs(math.log(b.ratio) - log_ratio), -b.area))


def buckets_as_json(buckets: Iterable[Bucket], channels: int, factor: int) -> dict[str, dict]:
    """The manifest's record of a table: {name: {size: [h, w], latent_shape: [c, h, w]}}, in table order."""
    return {b.name: dict(size=[b.height, b.width], latent_shape=list(b.latent_shape(channels, factor)))
            for b in buckets}
