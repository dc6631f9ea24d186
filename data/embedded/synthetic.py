"""Synthetic compositional scenes: one or two coloured shapes on a plain background, with captions.

Every image is a pure function of (seed, index), so a rebuild writes byte-identical tars.

Vocabulary (the orders below are the index orders used by labels and by the held-out rule):

    shapes     circle, square, triangle, star                  (label = class index of the first shape)
    colours    red, green, blue, yellow, purple, orange, white, black
    positions  top left, top right, bottom left, bottom right, center
    sizes      small, large
    backgrounds gray, white, black, beige, light blue   (only ones that contrast with every shape drawn)

Geometry, as fractions of the image side: a shape's area centroid sits at its position's anchor, the
centre of a quadrant (0.25 or 0.75 on each axis) or of the image (0.5). `small` and `large` are nominal
diameters of 0.30 and 0.42, so a corner shape stays inside its quadrant and two corner shapes never
touch. Two-shape scenes therefore use two different corners (a centre shape would overlap a corner
one). `region_box` is the 3x3-grid cell holding the anchor: an analyser checks that a shape's centroid
lies in the cell of the position its caption names; the cells do not overlap, so no centroid matches
two positions.

Non-square images (an image size (height, width), for the aspect-ratio buckets of the embedded Stages 4-5):
anchors and grid cells are the same fractions of each axis, and a shape's nominal diameter is the fraction of the
shorter side, so shapes stay round and inside their quadrants and every caption stays true to the pixels. A square
size renders exactly as before. `make_sample` draws nothing more for the size: the scene of (seed, index) is the
same at every size.

Rendering: Pillow draws at 8x the target size and `Image.reduce` averages each 8x8 block (an exact
area filter: anti-aliased edges, no ringing, interiors keep the exact named colour). The star has five
points and an inner radius of 0.38 of the outer one, so even a small star at 32 px has visible points
and ideally fills a third of its bounding box, against a half for the triangle.

Captions, one grammar throughout (shapes listed in the position order above; the label is the first):

    a small red circle in the top left on a gray background
    a small red circle in the top left and a large blue square in the bottom right on a white background
    short: "red circle, top left" / "red circle, top left; blue square, bottom right"

Mixes (`MIXES`, chosen with `--mix` when building): which scenes a dataset draws, so each stage of the embedded
curriculum gets data for its own job (PixArt-alpha's curriculum [chen2023pixartalpha]; README, "The embedded demo"):

    scenes   one shape (60%) at any of the five positions, or two in two corners; small or large; the default
    single   one shape at any of the five positions; the sizes and backgrounds of the mix's fields
    captions `single` on gray only, the background every held-out prompt names: the caption stages' scenes (on five
             backgrounds the words bound to shapes at half the rate at this budget; README, "What limits it")
    objects  one `huge` shape (diameter 0.62) at the centre, optionally jittered: class-conditional pretraining on
             object-centric images, where the label is true to most of the pixels

Held-out combinations (`HELD_OUT`): the 40 (colour, shape, position) triples with
(colour index + 2 * shape index + 3 * position index) % 4 == 0. They never appear in a generated scene,
alone or as either shape of a pair, at any size or on any background. Because 3 is invertible mod 4 and
the colours span two full periods of 4, every (shape, position) pair keeps 6 of its 8 colours, every
(colour, shape) pair keeps at least 3 of its 5 positions and every (colour, position) pair keeps at least
2 of its 4 shapes: each colour, shape and position is seen in training, just never in these triples.
`held_out_prompts()` gives their captions for evaluation.
"""

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw

from data.embedded import EmbeddedSample

NAME = "synthetic"
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "purple": (130, 20, 190),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
NOVEL_COLOURS: dict[str, tuple[int, int, int]] = {"pink": (240, 110, 180)}
"""Colours no generated scene uses (sample_spec draws from COLOURS only): `novel_colour_sample` draws them for a small
set of its own, which a LoRA teaches to a model that never saw the word (scripts/demo/lora.py)."""
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "beige": (225, 205, 160),
    "light blue": (170, 200, 235),
}
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
CORNERS: tuple[str, ...] = POSITIONS[:4]
SIZES: dict[str, float] = {"small": 0.30, "large": 0.42, "huge": 0.62}
"""Nominal diameters as fractions of the shorter side. `huge` is only drawn centred (the `objects` mix): at 0.62 a
corner shape would leave its quadrant."""
MIN_CONTRAST = 110.0
"""Smallest RGB distance between a shape colour and a background it may be drawn on."""
SUPERSAMPLE = 8
STAR_INNER_RATIO = 0.38
TWO_SHAPE_PROBABILITY = 0.4

# Anchors (x, y) as fractions of the side: quadrant centres and the image centre.
_ANCHORS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}


def _held_out() -> tuple[tuple[str, str, str], ...]:
    return tuple(
        (colour, shape, position)
        for ci, colour in enumerate(COLOURS)
        for si, shape in enumerate(SHAPES)
        for pi, position in enumerate(POSITIONS)
        if (ci + 2 * si + 3 * pi) % 4 == 0
    )


HELD_OUT: tuple[tuple[str, str, str], ...] = _held_out()
"""(colour, shape, position) triples never generated; see the module docstring for the rule."""


class UniformSource(Protocol):
    """What `sample_spec` needs from a generator: `random.Random` and `numpy.random.Generator` both fit."""

    def random(self) -> float: ...


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    position: str
    size: str = "large"
    offset: tuple[float, float] = (0.0, 0.0)
    """(x, y) shift of the centroid from its anchor, in fractions of the side (the `objects` mix's jitter)."""

    def __post_init__(self) -> None:
        colours = COLOURS | NOVEL_COLOURS
        for value, allowed in ((self.colour, colours), (self.shape, SHAPES), (self.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {list(allowed)}")
        if self.size not in SIZES:
            raise ValueError(f"size {self.size!r} is not one of {list(SIZES)}")
        if self.size == "huge" and self.position != "center":
            raise ValueError("a huge shape is drawn at the center only (it would leave a corner's quadrant)")

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.position)


@dataclass(frozen=True)
class SceneSpec:
    """One image: shapes in caption order (position order) and a background that contrasts with all."""

    shapes: tuple[ShapeSpec, ...]
    background: str = "gray"

    def __post_init__(self) -> None:
        if not 1 <= len(self.shapes) <= 2:
            raise ValueError(f"a scene has one or two shapes, got {len(self.shapes)}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background {self.background!r} is not one of {list(BACKGROUNDS)}")
        if len(self.shapes) == 2 and not all(s.position in CORNERS for s in self.shapes):
            raise ValueError("two-shape scenes put both shapes in corners (a centre shape would overlap)")
        if len({s.position for s in self.shapes}) != len(self.shapes):
            raise ValueError("two shapes cannot share a position")
        for s in self.shapes:
            if not contrasts(s.colour, self.background):
                raise ValueError(f"a {s.colour} shape does not stand out on a {self.background} background")

    @property
    def label(self) -> int:
        return SHAPES.index(self.shapes[0].shape)


def contrasts(colour: str, background: str) -> bool:
    return math.dist((COLOURS | NOVEL_COLOURS)[colour], BACKGROUNDS[background]) >= MIN_CONTRAST


def _pick(rng: UniformSource, options: Sequence[str]) -> str:
    # Only `random()` is used, so random.Random and numpy Generators give the same kind of draw.
    return options[min(int(rng.random() * len(options)), len(options) - 1)]


@dataclass(frozen=True)
class SceneMix:
    """Which scenes a dataset draws (`MIXES`; the module docstring says what each is for). The default draws exactly
    the scenes it always has: a rebuild of an existing dataset stays byte-identical."""

    two_shape_probability: float = TWO_SHAPE_PROBABILITY
    positions: tuple[str, ...] = POSITIONS
    sizes: tuple[str, ...] = ("small", "large")
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    jitter: float = 0.0
    """Largest shift of a shape from its anchor on each axis, as a fraction of that axis (uniform)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.two_shape_probability <= 1.0 or not 0.0 <= self.jitter <= 0.1:
            raise ValueError("two_shape_probability must lie in [0, 1] and jitter in [0, 0.1]")
        for values, allowed, what in ((self.positions, POSITIONS, "positions"), (self.sizes, SIZES, "sizes"),
                                      (self.backgrounds, BACKGROUNDS, "backgrounds")):
            unknown = [v for v in values if v not in allowed]
            if not values or unknown:
                raise ValueError(f"{what}: {unknown or 'none'} not among {list(allowed)}")
        if self.two_shape_probability and ("huge" in self.sizes or not set(CORNERS) <= set(self.positions)):
            raise ValueError("two-shape scenes need the four corners and no huge size")
        if "huge" in self.sizes and set(self.positions) != {"center"}:
            raise ValueError("a huge shape is drawn at the center only (it would leave a corner's quadrant)")


MIXES: dict[str, SceneMix] = {
    "scenes": SceneMix(),
    "single": SceneMix(two_shape_probability=0.0, sizes=("large",)),
    "objects": SceneMix(two_shape_probability=0.0, positions=("center",), sizes=("huge",)),
    "captions": SceneMix(two_shape_probability=0.0, sizes=("large",), backgrounds=("gray",)),
}


def parse_mix(text: str) -> SceneMix:
    """A mix by name, with fields overridden: "objects", "single,backgrounds=gray", "objects,jitter=0.05";
    tuple fields take values separated by '+' ("sizes=small+large", "backgrounds=gray+light blue")."""
    name, *settings = [part.strip() for part in text.split(",")]
    if name not in MIXES:
        raise ValueError(f"unknown mix {name!r}; expected one of {list(MIXES)}")
    fields = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or key not in SceneMix.__dataclass_fields__:
            raise ValueError(f"mix setting {setting!r}: expected key=value with key one of "
                             f"{list(SceneMix.__dataclass_fields__)}")
        fields[key] = tuple(value.split("+")) if isinstance(getattr(MIXES[name], key), tuple) else float(value)
    return replace(MIXES[name], **fields)


def _sample_shape(rng: UniformSource, position: str, mix: SceneMix) -> ShapeSpec:
    while True:  # rejection keeps the distribution uniform over the allowed triples
        colour, shape = _pick(rng, list(COLOURS)), _pick(rng, SHAPES)
        if (colour, shape, position) not in HELD_OUT:
            size = _pick(rng, mix.sizes)
            offset = (0.0, 0.0)
            if mix.jitter:
                offset = ((2 * rng.random() - 1) * mix.jitter, (2 * rng.random() - 1) * mix.jitter)
            return ShapeSpec(colour, shape, position, size, offset)


def sample_spec(rng: UniformSource, mix: SceneMix = MIXES["scenes"]) -> SceneSpec:
    """A random scene of `mix` that contains no held-out triple; deterministic given the generator's state."""
    if rng.random() < mix.two_shape_probability:
        first = _pick(rng, CORNERS)
        second = _pick(rng, [p for p in CORNERS if p != first])
        positions = sorted((first, second), key=POSITIONS.index)
    else:
        positions = [_pick(rng, mix.positions)]
    shapes = tuple(_sample_shape(rng, p, mix) for p in positions)
    backgrounds = [b for b in mix.backgrounds if all(contrasts(s.colour, b) for s in shapes)]
    if not backgrounds:  # a mix with few backgrounds: redraw the scene (only such mixes reach here)
        return sample_spec(rng, mix)
    return SceneSpec(shapes, _pick(rng, backgrounds))


def spec_for_index(seed: int, index: int, mix: SceneMix = MIXES["scenes"]) -> SceneSpec:
    """Sample `index` of the dataset built with `seed`: its own generator, so it does not depend on others."""
    return sample_spec(np.random.default_rng([seed, index]), mix)


def _polygon(shape: str, cx: float, cy: float, diameter: float) -> list[tuple[float, float]]:
    """Vertices with the area centroid at (cx, cy); y grows downwards."""
    if shape == "square":
        h = 0.44 * diameter
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # Equilateral, apex up: the centroid of a triangle is the centre of its circumscribed circle.
        r = 0.56 * diameter
        return [(cx + r * math.sin(a), cy - r * math.cos(a)) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
    if shape == "star":
        outer = 0.56 * diameter
        radii = [outer if k % 2 == 0 else outer * STAR_INNER_RATIO for k in range(10)]
        return [(cx + r * math.sin(k * math.pi / 5), cy - r * math.cos(k * math.pi / 5)) for k, r in enumerate(radii)]
    raise ValueError(f"no polygon for {shape!r}")


Size = int | tuple[int, int]
"""An image size: a side in pixels, or (height, width)."""


def height_width(image_size: Size) -> tuple[int, int]:
    """(height, width) of a size."""
    return (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))


def render_scene(spec: SceneSpec, image_size: Size = 32) -> Image.Image:
    """The scene as an RGB image of `image_size` px (a side, or (height, width)), drawn supersampled and
    box-filtered down."""
    height, width = height_width(image_size)
    canvas = Image.new("RGB", (width * SUPERSAMPLE, height * SUPERSAMPLE), BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(canvas)
    side = min(height, width) * SUPERSAMPLE  # the diameter's reference: shapes stay round and in their quadrant
    for s in spec.shapes:
        ax, ay = _ANCHORS[s.position]
        ax, ay = ax + s.offset[0], ay + s.offset[1]
        cx, cy, diameter = ax * (width * SUPERSAMPLE), ay * (height * SUPERSAMPLE), SIZES[s.size] * side
        fill = (COLOURS | NOVEL_COLOURS)[s.colour]
        if s.shape == "circle":
            r = diameter / 2
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(s.shape, cx, cy, diameter), fill=fill)
    return canvas.reduce(SUPERSAMPLE)


def region_box(position: str, image_size: Size) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), end-exclusive pixels: the 3x3-grid cell a shape at `position` has its centroid in
    (`image_size` a side, or (height, width): the grid divides each axis in thirds).

    Corners are the corner cells and `center` the middle one; the edge-middle cells belong to no position.
    """
    col = {"left": 0, "right": 2}
    row = {"top": 0, "bottom": 2}
    if position == "center":
        r, c = 1, 1
    elif position in CORNERS:
        vertical, horizontal = position.split()
        r, c = row[vertical], col[horizontal]
    else:
        raise ValueError(f"unknown position {position!r}; expected one of {POSITIONS}")
    height, width = height_width(image_size)
    rows, cols = [round(k * height / 3) for k in range(4)], [round(k * width / 3) for k in range(4)]
    return (cols[c], rows[r], cols[c + 1], rows[r + 1])


def _phrase(s: ShapeSpec) -> str:
    return f"a {s.size} {s.colour} {s.shape} in the {s.position}"


def caption(spec: SceneSpec) -> str:
    """The long caption, e.g. 'a small red circle in the top left on a gray background'."""
    return " and ".join(_phrase(s) for s in spec.shapes) + f" on a {spec.background} background"


def short_caption(spec: SceneSpec) -> str:
    """Colour, shape and position only, e.g. 'red circle, top left'."""
    return "; ".join(f"{s.colour} {s.shape}, {s.position}" for s in spec.shapes)


def held_out_specs(background: str = "gray", size: str = "large") -> list[SceneSpec]:
    """One single-shape scene per held-out triple, in `HELD_OUT` order."""
    return [SceneSpec((ShapeSpec(c, s, p, size),), background) for c, s, p in HELD_OUT]


def held_out_prompts(background: str = "gray", size: str = "large") -> list[str]:
    """Captions of the held-out triples in the training grammar, for evaluating compositional generalisation.

    Gray contrasts with every colour; a background that does not (e.g. white for a white shape) raises.
    """
    return [caption(spec) for spec in held_out_specs(background, size)]


def make_sample(seed: int, index: int, image_size: Size, mix: SceneMix = MIXES["scenes"]) -> EmbeddedSample:
    spec = spec_for_index(seed, index, mix)
    shapes = [
        dict(colour=s.colour, shape=s.shape, position=s.position, size=s.size, rgb=list(COLOURS[s.colour]))
        for s in spec.shapes
    ]
    return EmbeddedSample(
        key=f"{NAME}-{index:06d}",
        image=render_scene(spec, image_size),
        caption=caption(spec),
        short_caption=short_caption(spec),
        label=spec.label,
        label_name=SHAPES[spec.label],
        attributes=dict(
            shapes=shapes,
            num_shapes=len(shapes),
            background=spec.background,
            background_rgb=list(BACKGROUNDS[spec.background]),
            seed=seed,
            index=index,
        ),
    )


def iter_samples(
    image_size: Size, num_samples: int, seed: int = 0, sizes: Sequence[Size] | None = None,
    mix: SceneMix = MIXES["scenes"],
) -> Iterator[EmbeddedSample]:
    """The dataset's samples; with `sizes`, sample i is rendered at sizes[i % len(sizes)] (the same scenes, in
    equal shares of each size, for aspect-ratio buckets)."""
    for index in range(num_samples):
        yield make_sample(seed, index, sizes[index % len(sizes)] if sizes else image_size, mix)


def novel_colour_sample(seed: int, index: int, image_size: Size, colour: str = "pink") -> EmbeddedSample:
    """Sample `index` of a one-shape set in a NOVEL_COLOURS colour: shape, position and a background it stands out on
    drawn uniformly from its own generator (seeded by (seed, index, the colour's place)), large as in the caption
    stages' `single` mix, captioned in the training grammar."""
    if colour not in NOVEL_COLOURS:
        raise ValueError(f"{colour!r} is not one of the novel colours {list(NOVEL_COLOURS)}")
    rng = np.random.default_rng([seed, index, 1 + list(NOVEL_COLOURS).index(colour)])
    shape = ShapeSpec(colour, _pick(rng, SHAPES), _pick(rng, POSITIONS), _pick(rng, MIXES["single"].sizes))
    spec = SceneSpec((shape,), _pick(rng, [b for b in BACKGROUNDS if contrasts(colour, b)]))
    return EmbeddedSample(
        key=f"{NAME}-{colour}-{index:06d}", image=render_scene(spec, image_size), caption=caption(spec),
        short_caption=short_caption(spec), label=spec.label, label_name=SHAPES[spec.label],
        attributes=dict(shapes=[dict(colour=colour, shape=shape.shape, position=shape.position, size=shape.size,
                                     rgb=list(NOVEL_COLOURS[colour]))], num_shapes=1, background=spec.background,
                        background_rgb=list(BACKGROUNDS[spec.background]), seed=seed, index=index),
    )


def metadata(seed: int, mix: SceneMix = MIXES["scenes"]) -> dict:
    """What dataset.json records besides the common fields."""
    return dict(
        mix=asdict(mix),
        licence="CC0-1.0",
        source="procedurally generated by data/embedded/synthetic.py",
        class_names=list(SHAPES),
        seed=seed,
        colours={k: list(v) for k, v in COLOURS.items()},
        backgrounds={k: list(v) for k, v in BACKGROUNDS.items()},
        positions=list(POSITIONS),
        sizes=dict(SIZES),
        held_out=[list(t) for t in HELD_OUT],
        held_out_rule="(colour index + 2 * shape index + 3 * position index) % 4 == 0",
        held_out_prompts=held_out_prompts(),
    )
