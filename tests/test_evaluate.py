"""The compositional evaluation scores generators whose right answers are known.

Each generator renders a scene per prompt with `render_scene`: the prompt's own triple (everything right), or
with one attribute changed on purpose, or nothing at all. The CLI is exercised with a stand-in pipeline, never
a real checkpoint.
"""

import json
import sys
import types
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from data.embedded.synthetic import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    POSITIONS,
    SceneSpec,
    ShapeSpec,
    held_out_prompts,
    held_out_specs,
    render_scene,
)
from evaluation.evaluate import (
    FRAME,
    WRONG_RGB,
    evaluate_compositions,
    format_table,
    generate_held_out,
    judge_images,
    main,
    parse_args,
    render_grid,
)

IMAGE_SIZE = 32
SAMPLES = 2
BATCH = 24  # 80 images: three full batches and a partial one, each spanning prompts
SPEC_OF_PROMPT = dict(zip(held_out_prompts(), held_out_specs(), strict=True))


def _next(options, value):
    """The value after `value` in `options`, cyclically: always a different one."""
    options = list(options)
    return options[(options.index(value) + 1) % len(options)]


def scene_generator(change=lambda shape: shape, noise: float = 6.0):
    """`generate(prompts, seeds)` rendering each prompt's scene with `change` applied to its shape, plus seeded
    noise so that the seeds matter."""

    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        images = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            spec = SPEC_OF_PROMPT[prompt]
            pixels = np.asarray(render_scene(SceneSpec((change(spec.shapes[0]),), spec.background), IMAGE_SIZE))
            noisy = pixels + np.random.default_rng(seed).normal(0.0, noise, pixels.shape)
            images.append(np.clip(np.round(noisy), 0, 255).astype(np.uint8))
        return torch.from_numpy(np.stack(images))

    return generate


def truth():
    return scene_generator()


def wrong_colour():
    return scene_generator(lambda s: ShapeSpec(_next(COLOURS, s.colour), s.shape, s.position, s.size))


def wrong_position():
    return scene_generator(lambda s: ShapeSpec(s.colour, s.shape, _next(POSITIONS, s.position), s.size))


def nothing(prompts: list[str], seeds: list[int]) -> torch.Tensor:
    return torch.tensor(BACKGROUNDS["gray"], dtype=torch.uint8).expand(len(prompts), IMAGE_SIZE, IMAGE_SIZE, 3)


def score(generate, seed: int = 0) -> dict:
    return evaluate_compositions(generate, SAMPLES, seed=seed, batch_size=BATCH, progress=False)


def assert_accuracies(report: dict, colour: float, shape: float, position: float, overall: float) -> None:
    """The same fractions overall and in every per-colour, per-shape and per-position breakdown."""
    want = dict(colour=colour, shape=shape, position=position, overall=overall)
    groups = [report["accuracy"]] + [
        acc for key in ("by_colour", "by_shape", "by_position") for acc in report[key].values()
    ]
    for acc in groups:
        assert {k: acc[k] for k in want} == want


@pytest.fixture(scope="module")
def truth_report() -> dict:
    return score(truth())


def test_ground_truth_scores_one_everywhere(truth_report):
    assert_accuracies(truth_report, 1.0, 1.0, 1.0, 1.0)
    assert truth_report["no_shape_found"] == 0.0
    assert truth_report["accuracy"]["n"] == 40 * SAMPLES
    assert [p["prompt"] for p in truth_report["per_prompt"]] == held_out_prompts()


def test_breakdowns_cover_the_vocabulary_in_order(truth_report):
    assert list(truth_report["by_colour"]) == list(COLOURS)
    assert list(truth_report["by_shape"]) == ["circle", "square", "triangle", "star"]
    assert list(truth_report["by_position"]) == list(POSITIONS)
    for k, attribute in enumerate(("colour", "shape", "position")):
        counts = Counter(triple[k] for triple in HELD_OUT)
        assert {v: acc["n"] for v, acc in truth_report[f"by_{attribute}"].items()} == {
            v: SAMPLES * c for v, c in counts.items()
        }


def test_wrong_colour_scores_zero_on_colour_only():
    report = score(wrong_colour())
    assert_accuracies(report, 0.0, 1.0, 1.0, 0.0)
    read = report["per_prompt"][0]["samples"][0]["read"]
    assert read["colour"] == _next(COLOURS, report["per_prompt"][0]["expected"]["colour"])


def test_wrong_position_scores_zero_on_position_only():
    assert_accuracies(score(wrong_position()), 1.0, 1.0, 0.0, 0.0)


def test_blank_images_score_zero():
    report = score(nothing)
    assert_accuracies(report, 0.0, 0.0, 0.0, 0.0)
    assert report["no_shape_found"] == 1.0
    assert all(s["read"] is None for p in report["per_prompt"] for s in p["samples"])


def test_seeds_follow_the_documented_rule_and_batches_respect_batch_size():
    calls = []

    def recording(prompts, seeds):
        calls.append((list(prompts), list(seeds)))
        return truth()(prompts, seeds)

    generate_held_out(recording, SAMPLES, seed=7, batch_size=BATCH, progress=False)
    assert [len(p) for p, _ in calls] == [24, 24, 24, 8]
    pairs = [pair for prompts, seeds in calls for pair in zip(prompts, seeds, strict=True)]
    prompts = held_out_prompts()
    assert pairs == [(prompts[i], 7 + i * SAMPLES + j) for i in range(40) for j in range(SAMPLES)]


def test_same_seed_same_report_at_any_batch_size(truth_report):
    again = evaluate_compositions(truth(), SAMPLES, seed=0, batch_size=7, progress=False)
    assert json.dumps(again) == json.dumps(truth_report)
    seeds = [s["seed"] for p in score(truth(), seed=1)["per_prompt"] for s in p["samples"]]
    assert seeds == list(range(1, 1 + 40 * SAMPLES))


def test_a_generator_returning_the_wrong_batch_is_refused():
    def short(prompts, seeds):
        return truth()(prompts[:-1], seeds[:-1])

    with pytest.raises(ValueError, match=r"uint8 \[24, h, w, 3\]"):
        generate_held_out(short, SAMPLES, seed=0, batch_size=BATCH, progress=False)
    with pytest.raises(ValueError, match="uint8"):
        generate_held_out(lambda p, s: truth()(p, s).float(), SAMPLES, seed=0, batch_size=BATCH, progress=False)


def test_grid_frames_wrong_samples_in_red():
    generate = wrong_colour()
    images = generate_held_out(generate, SAMPLES, seed=0, batch_size=BATCH, progress=False)
    judgements = judge_images(images, SAMPLES, seed=0, progress=False)
    wrong = np.asarray(render_grid(images, judgements, SAMPLES))
    right_images = generate_held_out(truth(), SAMPLES, seed=0, batch_size=BATCH, progress=False)
    right = np.asarray(render_grid(right_images, judge_images(right_images, SAMPLES, 0, progress=False), SAMPLES))
    assert wrong.shape == right.shape and wrong.shape[0] % 40 == 0
    assert (wrong == WRONG_RGB).all(axis=-1).sum() > 40 * SAMPLES * 4 * FRAME * IMAGE_SIZE
    assert not (right == WRONG_RGB).all(axis=-1).any()


def test_table_lists_every_group(truth_report):
    table = format_table(truth_report)
    assert "all" in table and "colour purple" in table and "position bottom right" in table
    assert len(table.splitlines()) == 3 + 8 + 4 + 5


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--samples-per-prompt", "0", "--samples-per-prompt: must be a positive integer, got '0'"),
        ("--batch-size", "-3", "--batch-size: must be a positive integer, got '-3'"),
        ("--steps", "0", "--steps: must be a positive integer, got '0'"),
        ("--seed", "-1", "--seed: must be >= 0, got '-1'"),
        ("--cfg-scale", "-1", "--cfg-scale: must be >= 0, got '-1'"),
        ("--alpha", "0", "--alpha: must be > 0, got '0'"),
        ("--weights", "best", "--weights: invalid choice: 'best'"),
        ("--samples-per-prompt", "two", "--samples-per-prompt: must be a positive integer, got 'two'"),
        ("--alpha", "nan", "--alpha: must be > 0, got 'nan'"),
    ],
)
def test_parser_rejects_bad_values(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model-path", "x.pt", flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_parser_defaults():
    args = parse_args(["--model-path", "x.pt"])
    assert (args.samples_per_prompt, args.steps, args.cfg_scale, args.alpha) == (4, 24, 3.0, 1.0)
    assert (args.seed, args.weights, args.batch_size, args.out_dir, args.json) == (0, "ema", 40, None, None)


class StandInPipeline:
    """What `app.pipeline.load_pipeline` returns, as far as the CLI uses it: metadata and generate()."""

    def __init__(self, conditioning: str):
        self.metadata = dict(conditioning=conditioning)
        self.calls = []

    def generate(self, prompts, seeds, steps, cfg_scale, alpha):
        self.calls.append(dict(steps=steps, cfg_scale=cfg_scale, alpha=alpha))
        return truth()(prompts, seeds)


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    """Installs a fake `app.pipeline` module; returns a checkpoint path and a setter for its conditioning."""
    state = dict(pipe=StandInPipeline("text"))
    module = types.ModuleType("app.pipeline")
    def load_pipeline(path, weights="ema", device="cpu", sources=None, limits=None, fp32=False):
        state.update(sources=sources, limits=limits, fp32=fp32)
        return state["pipe"]

    module.load_pipeline = load_pipeline
    monkeypatch.setitem(sys.modules, "app.pipeline", module)
    checkpoint = tmp_path / "step_00000001.pt"
    checkpoint.write_bytes(b"")
    return checkpoint, state


def test_cli_writes_json_and_grid(stand_in, tmp_path, capsys):
    checkpoint, state = stand_in
    args = ["--model-path", str(checkpoint), "--samples-per-prompt", "1", "--steps", "3", "--cfg-scale", "2"]
    report = main(args + ["--json", str(tmp_path / "r.json"), "--out-dir", str(tmp_path / "grid")])
    out = capsys.readouterr()
    assert json.loads(out.out) == report == json.loads((tmp_path / "r.json").read_text())
    assert report["accuracy"]["overall"] == 1.0 and report["settings"]["steps"] == 3
    assert "colour red" in out.err
    assert state["pipe"].calls[0] == dict(steps=3, cfg_scale=2.0, alpha=1.0)
    assert Image.open(tmp_path / "grid" / "grid.png").size[1] > 40 * IMAGE_SIZE


def test_cli_passes_the_users_sources_to_the_loader(stand_in, tmp_path):
    """--text-encoder / --tokenizer / --vae / --trust-remote-code reach load_pipeline; without them nothing is
    trusted and every source is the checkpoint's (app/sources.py)."""
    from app.sources import Sources

    checkpoint, state = stand_in
    main(["--model-path", str(checkpoint), "--samples-per-prompt", "1", "--steps", "1"])
    assert state["sources"] == Sources()
    main(["--model-path", str(checkpoint), "--samples-per-prompt", "1", "--steps", "1", "--text-encoder",
          str(tmp_path / "enc"), "--tokenizer", str(tmp_path / "tok"), "--vae", "acme/vae", "--trust-remote-code"])
    assert state["sources"] == Sources(str(tmp_path / "enc"), str(tmp_path / "tok"), "acme/vae", True)
    assert state["limits"].pixel_steps is None
    main(["--model-path", str(checkpoint), "--samples-per-prompt", "1", "--steps", "1", "--max-pixel-steps", "7"])
    assert state["limits"].pixel_steps == 7 and state["fp32"] is False
    main(["--model-path", str(checkpoint), "--samples-per-prompt", "1", "--steps", "1", "--fp32"])
    assert state["fp32"] is True  # the transformer in float32 on CUDA too (app/precision.py)


def test_cli_refuses_a_class_conditional_checkpoint(stand_in):
    checkpoint, state = stand_in
    state["pipe"] = StandInPipeline("class")
    with pytest.raises(SystemExit, match="is a class-conditional checkpoint; the compositional evaluation needs a"):
        main(["--model-path", str(checkpoint)])


def test_cli_refuses_a_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--model-path", str(tmp_path / "missing.pt")])
