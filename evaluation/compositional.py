"""Compositional generalisation, the scoring: generate the held-out synthetic triples, read each image with the
pixel analyser, score colour, shape and position, and draw the grid. The command line is evaluation/evaluate.py,
which documents the prompts, the seed rule and the output. Images may be square or not (a multi-aspect stage's
buckets): every image of one evaluation has one size, and the analyser reads positions per axis."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import UInt8
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from data.embedded.synthetic import COLOURS, POSITIONS, SHAPES, SceneSpec, held_out_prompts, held_out_specs
from evaluation.analyse import SceneReading, analyse_scene

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "position")
BACKGROUND = "gray"
"""Contrasts with every shape colour, so every held-out triple has a prompt; the analyser is told it."""
SIZE = "large"

Generate = Callable[[list[str], list[int]], UInt8[torch.Tensor, "b h w 3"] | UInt8[np.ndarray, "b h w 3"]]
"""`generate(prompts, seeds)`: one image per (prompt, seed) pair, uint8 RGB, channels last."""


@dataclass(frozen=True)
class Judgement:
    """One generated image: what its prompt asked for, what the analyser read, and which attributes match."""

    prompt_index: int
    sample: int
    seed: int
    spec: SceneSpec
    reading: SceneReading | None

    @property
    def expected(self) -> dict[str, str]:
        truth = self.spec.shapes[0]
        return dict(colour=truth.colour, shape=truth.shape, position=truth.position)

    @property
    def correct(self) -> dict[str, bool]:
        """Per attribute, plus `overall`; a position read only by the nearest-anchor fallback does not count."""
        r, want = self.reading, self.expected
        if r is None:
            flags = dict.fromkeys(ATTRIBUTES, False)
        else:
            flags = dict(
                colour=r.colour == want["colour"],
                shape=r.shape == want["shape"],
                position=r.in_region and r.position == want["position"],
            )
        return flags | dict(overall=all(flags.values()))

    def describe(self) -> dict:
        """The JSON record of this image."""
        read = None
        if self.reading is not None:
            read = dict(colour=self.reading.colour, shape=self.reading.shape, position=self.reading.position)
            read |= dict(in_region=self.reading.in_region, rgb=list(self.reading.rgb))
        return dict(seed=self.seed, read=read, correct=self.correct)


def sample_seed(seed: int, prompt_index: int, sample: int, samples_per_prompt: int) -> int:
    """The seed of sample `sample` of prompt `prompt_index`: distinct per image and independent of batching."""
    return seed + prompt_index * samples_per_prompt + sample


def _as_uint8_array(images, count: int) -> UInt8[np.ndarray, "b h w 3"]:
    """The generator's batch as numpy, checked: a wrong shape or dtype would otherwise be scored as misses."""
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[0] != count or array.shape[3] != 3:
        raise ValueError(f"generate() must return uint8 [{count}, h, w, 3], got {array.dtype} {tuple(array.shape)}")
    return array


def generate_held_out(
    generate: Generate, samples_per_prompt: int, seed: int, batch_size: int, progress: bool = True
) -> UInt8[np.ndarray, "n h w 3"]:
    """All images, prompt-major (`n` = 40 * samples_per_prompt); batches may span prompts."""
    if samples_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"samples_per_prompt and batch_size must be >= 1, got {samples_per_prompt}, {batch_size}")
    prompts = held_out_prompts(BACKGROUND, SIZE)
    jobs = [
        (prompt, sample_seed(seed, i, j, samples_per_prompt))
        for i, prompt in enumerate(prompts)
        for j in range(samples_per_prompt)
    ]
    batches = []
    with tqdm(total=len(jobs), desc="generating", unit="img", disable=not progress) as bar:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            batch = generate([p for p, _ in chunk], [s for _, s in chunk])
            batches.append(_as_uint8_array(batch, len(chunk)))
            bar.update(len(chunk))
    shapes = {b.shape[1:] for b in batches}
    if len(shapes) != 1:
        raise ValueError(f"generate() returned images of different sizes: {sorted(shapes)}")
    return np.concatenate(batches)


def judge_images(
    images: UInt8[np.ndarray, "n h w 3"], samples_per_prompt: int, seed: int, progress: bool = True
) -> list[Judgement]:
    """Analyse every image against the held-out triple of its prompt (images in `generate_held_out` order)."""
    specs = held_out_specs(BACKGROUND, SIZE)
    if len(images) != len(specs) * samples_per_prompt:
        raise ValueError(f"expected {len(specs)} x {samples_per_prompt} images, got {len(images)}")
    judgements = []
    for k, image in enumerate(tqdm(images, desc="analysing", unit="img", disable=not progress)):
        i, j = divmod(k, samples_per_prompt)
        reading = analyse_scene(image, background=BACKGROUND)
        judgements.append(Judgement(i, j, sample_seed(seed, i, j, samples_per_prompt), specs[i], reading))
    return judgements


def _accuracy(judgements: Sequence[Judgement]) -> dict:
    """Count and the fraction right per attribute and overall."""
    n = len(judgements)
    fractions = {key: sum(j.correct[key] for j in judgements) / n for key in (*ATTRIBUTES, "overall")}
    return dict(n=n) | fractions


def _breakdown(judgements: Sequence[Judgement], attribute: str, vocabulary: Sequence[str]) -> dict:
    """Accuracies over the images whose prompt names each value of `attribute`, in vocabulary order."""
    groups = {value: [j for j in judgements if j.expected[attribute] == value] for value in vocabulary}
    return {value: _accuracy(group) for value, group in groups.items() if group}


def summarise(judgements: Sequence[Judgement], samples_per_prompt: int, seed: int) -> dict:
    """The report: overall accuracies, per-colour/shape/position breakdowns, and every image's reading."""
    per_prompt = []
    for i, prompt in enumerate(held_out_prompts(BACKGROUND, SIZE)):
        group = judgements[i * samples_per_prompt : (i + 1) * samples_per_prompt]
        per_prompt.append(
            dict(prompt=prompt, expected=group[0].expected)
            | dict(overall=_accuracy(group)["overall"], samples=[j.describe() for j in group])
        )
    return dict(
        num_prompts=len(per_prompt),
        samples_per_prompt=samples_per_prompt,
        seed=seed,
        background=BACKGROUND,
        size=SIZE,
        accuracy=_accuracy(judgements),
        no_shape_found=sum(j.reading is None for j in judgements) / len(judgements),
        by_colour=_breakdown(judgements, "colour", list(COLOURS)),
        by_shape=_breakdown(judgements, "shape", SHAPES),
        by_position=_breakdown(judgements, "position", POSITIONS),
        per_prompt=per_prompt,
    )


def evaluate_compositions(
    generate: Generate, samples_per_prompt: int = 4, seed: int = 0, batch_size: int = 40, progress: bool = True
) -> dict:
    """Generate every held-out prompt `samples_per_prompt` times and score the images; see the module docstring."""
    images = generate_held_out(generate, samples_per_prompt, seed, batch_size, progress)
    return summarise(judge_images(images, samples_per_prompt, seed, progress), samples_per_prompt, seed)


def format_table(report: dict) -> str:
    """The accuracies as aligned text: overall, then one row per colour, shape and position."""
    keys = (*ATTRIBUTES, "overall")
    header = f"{'':22} {'n':>5} " + " ".join(f"{k:>8}" for k in keys)

    def row(name: str, acc: dict) -> str:
        return f"{name:22} {acc['n']:5d} " + " ".join(f"{acc[k]:8.3f}" for k in keys)

    lines = [
        f"held-out compositions: {report['num_prompts']} prompts x {report['samples_per_prompt']} samples, "
        f"seed {report['seed']}; no shape found in {report['no_shape_found']:.3f}",
        header,
        row("all", report["accuracy"]),
    ]
    for attribute in ATTRIBUTES:
        lines += [row(f"{attribute} {value}", acc) for value, acc in report[f"by_{attribute}"].items()]
    return "\n".join(lines)


FRAME = 3
"""Grid border width in pixels around each image; red marks a wrong sample."""
WRONG_RGB = (230, 0, 0)
GRID_RGB = (40, 40, 40)
TEXT_RGB = (235, 235, 235)
LINE_HEIGHT = 12
MIN_CELL = 96
"""Images are upscaled (nearest) by a whole factor to at least this side, so a 32 px sample is legible."""


def _misread_lines(judgement: Judgement) -> list[str]:
    """What the analyser read for each wrong attribute, for the caption under a grid cell."""
    if judgement.reading is None:
        return ["no shape"]
    wrong = [a for a in ATTRIBUTES if not judgement.correct[a]]
    lines = [str(getattr(judgement.reading, a)) for a in wrong]
    if "position" in wrong and not judgement.reading.in_region:
        lines[-1] = f"near {lines[-1]}"  # the centroid is in no position's region
    return lines


def render_grid(
    images: UInt8[np.ndarray, "n h w 3"], judgements: Sequence[Judgement], samples_per_prompt: int
) -> Image.Image:
    """One row per prompt (its short caption on the left), a red frame and a note on every sample with a miss."""
    n, h, w, _ = images.shape
    scale = max(1, -(-MIN_CELL // max(h, w)))
    cell_w, cell_h = w * scale + 2 * FRAME, h * scale + 2 * FRAME + 3 * LINE_HEIGHT
    font = ImageFont.load_default()
    prompts = [f"{t['colour']} {t['shape']}, {t['position']}" for t in (j.expected for j in judgements)]
    label_w = 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(p, font=font)) for p in prompts)
    rows = n // samples_per_prompt
    grid = Image.new("RGB", (label_w + samples_per_prompt * cell_w, rows * cell_h), GRID_RGB)
    draw = ImageDraw.Draw(grid)
    for k, (image, judgement) in enumerate(zip(images, judgements, strict=True)):
        i, j = divmod(k, samples_per_prompt)
        x, y = label_w + j * cell_w, i * cell_h
        if j == 0:
            draw.text((4, y + FRAME + (h * scale) // 2 - LINE_HEIGHT // 2), prompts[k], fill=TEXT_RGB, font=font)
        if not judgement.correct["overall"]:
            draw.rectangle((x, y, x + cell_w - 1, y + h * scale + 2 * FRAME - 1), fill=WRONG_RGB)
        tile = Image.fromarray(image).resize((w * scale, h * scale), Image.NEAREST)
        grid.paste(tile, (x + FRAME, y + FRAME))
        for line_no, line in enumerate(_misread_lines(judgement) if not judgement.correct["overall"] else []):
            draw.text((x + FRAME, y + h * scale + 2 * FRAME + line_no * LINE_HEIGHT), line, fill=WRONG_RGB, font=font)
    return grid
