"""The Gradio app itself: the page, its handlers and their checks (app/gradio_app.py is its command line).

See app/gradio_app.py for how to run it and what it does.
"""

import argparse
import os
import random
import shlex
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from PIL import Image

from app import validation as checks
from app.pipeline import CheckpointError, Pipeline, load_pipeline
from app.rewrite import PromptRewriter, RewriteError
from app.sources import lora_from_args, sources_from_args
from app.validation import APP, Limits, RequestError, check_number

# System fonts only: the default theme loads Google Fonts, which a cluster node without internet cannot reach.
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "Helvetica", "Arial", "sans-serif"],
    font_mono=["ui-monospace", "DejaVu Sans Mono", "monospace"],
)
# The images are small (32-64 px); scaled up by the browser they should stay crisp pixels, not blur.
CSS = "#gallery img, #trajectory img { image-rendering: pixelated; }"


@dataclass(frozen=True)
class Settings:
    """One request's sampling settings, checked (app/validation.py)."""

    steps: int
    cfg_scale: float
    cfg_interval: tuple[float, float]
    alpha: float
    method: str
    seed: int
    num_images: int
    trajectory: bool
    height: int
    width: int

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_images)]


class TrajectoryWriter:
    """Denoising trajectories as animated GIFs in a temporary folder the app owns. Gradio copies each file into
    its cache when it sends it, so only the newest `keep` are kept here."""

    def __init__(self, keep: int = 32, display: int = 256):
        self._dir = tempfile.TemporaryDirectory(prefix="rfdit-gradio-")
        self.root, self.keep, self.display = Path(self._dir.name), keep, display

    def write(self, frames: np.ndarray) -> str:
        """[n, h, w, 3] uint8 frames -> the path of a looping GIF, scaled up to about `display` pixels with
        nearest-neighbour (a 32 px frame would be a speck), the final image held for a second."""
        n, h, w, _ = frames.shape
        scale = max(1, self.display // max(h, w))
        frames = np.ascontiguousarray(frames)
        images = [Image.fromarray(f).resize((w * scale, h * scale), Image.NEAREST) for f in frames]
        path = self.root / f"trajectory_{uuid.uuid4().hex}.gif"
        images[0].save(path, save_all=True, append_images=images[1:], duration=[80] * (n - 1) + [1000], loop=0)
        for old in sorted(self.root.glob("*.gif"), key=lambda p: p.stat().st_mtime)[: -self.keep]:
            old.unlink(missing_ok=True)
        return str(path)


class Generator:
    """The handlers behind the UI and the `generate` endpoint. Their parameter names are the endpoint's."""

    def __init__(self, pipe: Pipeline, rewriter: PromptRewriter | None, limits: Limits, source: str | None):
        self.pipe, self.rewriter, self.limits, self.source = pipe, rewriter, limits, source
        self.trajectories = TrajectoryWriter()
        names = [] if pipe.is_text else pipe.conditioning.class_names
        self.class_choices = [(f"{i}: {name}", i) for i, name in enumerate(names)]
        self.size_choices = [(f"{h} x {w}" + (" (trained)" if (h, w) == (pipe.image_size,) * 2 else ""), f"{h}x{w}")
                             for h, w in pipe.buckets]

    def size(self, size: Any) -> tuple[int, int]:
        """(height, width) from the size picker's value ('HxW'; None: the trained square); RequestError otherwise."""
        if size is None:
            return self.pipe.image_size, self.pipe.image_size
        from data.buckets import parse_bucket

        try:
            bucket = parse_bucket(size) if isinstance(size, str) else None
        except ValueError:
            bucket = None
        if bucket is None:
            raise RequestError(f"Size must be HxW in pixels, height first (e.g. {self.size_choices[0][1]}), got "
                               f"{size!r}")
        return self.pipe.check_size(APP, bucket.height, bucket.width)

    def settings(self, steps, guidance_scale, guidance_start, guidance_end, alpha, solver, seed, randomize_seed,
                 num_images, show_trajectory, size=None) -> Settings:
        """The controls' values checked against the limits (RequestError otherwise), the seed drawn if asked."""
        lim = self.limits
        sampling = checks.check_settings(APP, lim, steps, guidance_scale, (guidance_start, guidance_end), alpha,
                                         solver)
        n = check_number(APP.num_images, num_images, lim.num_images, integer=True)
        if randomize_seed:
            seed = random.randint(lim.seed[0], lim.seed[1] - n + 1)
        seed = check_number(APP.seed, seed, lim.seed, integer=True)
        if seed + n - 1 > lim.seed[1]:
            raise RequestError(f"Seed + Number of images - 1 must be at most {lim.seed[1]}, got {seed + n - 1}")
        height, width = self.size(size)
        self.pipe.check_budget(APP, lim, height, width, sampling.steps, n, sampling.method, sampling.cfg_scale)
        return Settings(steps=sampling.steps, cfg_scale=sampling.cfg_scale, cfg_interval=sampling.cfg_interval,
                        alpha=sampling.alpha, method=sampling.method, seed=seed, num_images=n,
                        trajectory=bool(show_trajectory), height=height, width=width)

    def check_text(self, prompt: Any, which: str = "prompt") -> str:
        """A non-empty string within the character limit, stripped; RequestError otherwise."""
        return checks.check_prompt(f"The {which}", prompt, self.limits)

    def check_prompt(self, prompt: Any, which: str = "prompt") -> str:
        """`check_text`, and no longer than the checkpoint's tokenizer reads; RequestError otherwise."""
        return self.pipe.check_prompt(f"The {which}", prompt, self.limits)

    def final_prompt(self, prompt: Any, rewrite: bool) -> str:
        """The prompt to draw from: the user's, or (when asked) its rewrite in the training-caption style."""
        if not rewrite:
            return self.check_prompt(prompt)
        if self.rewriter is None:
            raise gr.Error("Prompt rewriting is off: the app was started without --rewrite-endpoint")
        prompt = self.check_text(prompt)
        try:
            rewritten = self.rewriter.rewrite(prompt)
        except RewriteError as err:
            raise gr.Error(str(err)) from err
        return self.check_prompt(rewritten, "rewritten prompt")

    def class_index(self, class_label: Any) -> int:
        """The class as an index: a value of the picker, its label ("0: circle") or the class name."""
        for label, index in self.class_choices:
            if class_label in (index, label, label.split(": ", 1)[1]) and not isinstance(class_label, bool):
                return index
        raise gr.Error(f"Class must be one of 0..{len(self.class_choices) - 1} "
                       f"({', '.join(label for label, _ in self.class_choices)}), got {class_label!r}")

    def generate_text(self, prompt, rewrite, steps, guidance_scale, guidance_start, guidance_end, alpha, solver,
                      seed, randomize_seed, num_images, show_trajectory, size=None):
        """Text checkpoints: (gallery, trajectory GIF, prompt used, seed, status)."""
        try:
            settings = self.settings(steps, guidance_scale, guidance_start, guidance_end, alpha, solver, seed,
                                     randomize_seed, num_images, show_trajectory, size)
            used = self.final_prompt(prompt, bool(rewrite))
        except RequestError as err:
            raise gr.Error(str(err)) from err
        gallery, gif, status = self.draw("prompts", used, settings)
        return gallery, gif, used, settings.seed, status

    def generate_class(self, class_label, steps, guidance_scale, guidance_start, guidance_end, alpha, solver,
                       seed, randomize_seed, num_images, show_trajectory, size=None):
        """Class checkpoints: (gallery, trajectory GIF, seed, status)."""
        try:
            settings = self.settings(steps, guidance_scale, guidance_start, guidance_end, alpha, solver, seed,
                                     randomize_seed, num_images, show_trajectory, size)
        except RequestError as err:
            raise gr.Error(str(err)) from err
        gallery, gif, status = self.draw("labels", self.class_index(class_label), settings)
        return gallery, gif, settings.seed, status

    def draw(self, key: str, item: str | int, s: Settings) -> tuple[list, str | None, str]:
        """Sample the images. With a trajectory, the first image is drawn on its own with it and the rest
        without: a sample depends on its seed only, so the pixels are the same, and only one image's
        intermediate states are decoded."""
        # One time limit for the whole request (both calls below), so a long one frees the app's worker.
        common = dict(steps=s.steps, cfg_scale=s.cfg_scale, alpha=s.alpha, cfg_interval=s.cfg_interval,
                      method=s.method, names=APP, limits=replace(self.limits, time_limit=None), height=s.height,
                      width=s.width)
        seeds, start = s.seeds, time.perf_counter()
        try:
            with checks.time_limit(self.pipe.model, self.limits.time_limit, APP.time_limit):
                images, gif = self._draw(key, item, s, seeds, common)
        except ValueError as err:
            raise gr.Error(str(err)) from err
        gallery = [(image.numpy(), f"seed {seed}") for image, seed in zip(images, seeds, strict=True)]
        return gallery, gif, self.status(key, item, s, time.perf_counter() - start)

    def _draw(self, key: str, item: str | int, s: Settings, seeds: list[int], common: dict[str, Any]):
        """(images, the first image's trajectory GIF or None)."""
        if not s.trajectory:
            return self.pipe.generate(**{key: [item] * len(seeds)}, seeds=seeds, **common), None
        first, frames = self.pipe.generate(**{key: [item]}, seeds=seeds[:1], return_trajectory=True, **common)
        gif = self.trajectories.write(frames[:, 0].numpy())
        parts = [first]
        if len(seeds) > 1:
            parts.append(self.pipe.generate(**{key: [item] * (len(seeds) - 1)}, seeds=seeds[1:], **common))
        return torch.cat(parts), gif

    def status(self, key: str, item: str | int, s: Settings, seconds: float) -> str:
        """What was drawn, how long it took, and the app/sample.py line that draws the same pixels."""
        n = s.num_images
        what = ["--prompt", item] if key == "prompts" else ["--class-label", str(item)]
        cli = ["python", "-m", "app.sample", "--model-path", self.source or "CKPT", *what, "--num-samples", str(n),
               "--seed", str(s.seed), "--steps", str(s.steps), "--cfg-scale", f"{s.cfg_scale:g}", "--cfg-interval",
               f"{s.cfg_interval[0]:g}", f"{s.cfg_interval[1]:g}", "--alpha", f"{s.alpha:g}", "--method", s.method,
               "--out-dir", "outputs/samples"]
        if self.pipe.lora is not None:
            cli[4:4] = ["--lora", self.pipe.lora["folder"], "--lora-scale", f"{self.pipe.lora['scale']:g}"]
        if (s.height, s.width) != (self.pipe.image_size, self.pipe.image_size):
            cli[-2:-2] = ["--bucket", f"{s.height}x{s.width}"]
        seeds = f"seed {s.seed}" if n == 1 else f"seeds {s.seed}-{s.seed + n - 1}"
        return f"{n} image{'s' * (n > 1)}, {seeds}, in {seconds:.1f} s. Same pixels from the CLI:\n\n" \
               f"```\n{shlex.join(cli)}\n```"


def header(pipe: Pipeline, source: str | None) -> str:
    """The checkpoint's model, stage, resolution and conditioning, and the file it came from."""
    meta = pipe.metadata
    kind = "text-conditional" if pipe.is_text else f"class-conditional, {len(pipe.conditioning.class_names)} classes"
    name = meta.get("name") or meta["model"].get("family", "model")
    line = f"## {name} · Stage {meta.get('stage', '?')} · {pipe.image_size}×{pipe.image_size} px\n{kind}"
    line += f" · `{source}`" if source else ""
    return line + (f" · LoRA `{pipe.lora['folder']}` × {pipe.lora['scale']:g}" if pipe.lora else "")


def rewrite_note(rewriter: PromptRewriter | None) -> str:
    """The rewrite switch's explanation: where rewrites come from, or why the switch is disabled."""
    if rewriter is None:
        return ("Disabled: no --rewrite-endpoint given. Start the app with --rewrite-endpoint URL --rewrite-model "
                "NAME (an OpenAI-compatible server such as vllm serve Qwen/Qwen3-VL-2B-Instruct) to retell "
                "prompts in the style of the training captions.")
    return (f"Retells the prompt through {rewriter.model} at {rewriter.url} with the captioner's {rewriter.style} "
            "caption instructions; the result is shown under 'Prompt used'.")


def sampling_controls(lim: Limits, d: dict[str, Any]) -> list[gr.components.Component]:
    """Steps, guidance, alpha, solver, seed, number of images and the trajectory switch, in the order the
    handlers take them, created in the current Blocks layout."""
    methods = list(checks.METHODS)
    with gr.Row():
        steps = gr.Slider(*lim.steps, value=int(d["steps"]), step=1, label="Steps")
        cfg = gr.Slider(*lim.cfg_scale, value=float(d["cfg_scale"]), step=0.1, label="Guidance scale",
                              info="1 turns guidance off")
    with gr.Row():
        lo = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Guidance from t", info="0 is noise")
        hi = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="Guidance until t", info="1 is the image")
    with gr.Row():
        alpha = gr.Slider(*lim.alpha, value=float(d["alpha"]), step=0.05, label="Alpha",
                                info="time-grid warp; > 1 spends more steps near noise")
        solver = gr.Dropdown(choices=methods, value="euler", label="Solver")
    with gr.Row():
        seed = gr.Number(value=0, precision=0, minimum=lim.seed[0], maximum=lim.seed[1], label="Seed")
        randomize = gr.Checkbox(label="Randomise seed", value=False, info="draw a new seed for every request")
    with gr.Row():
        num_images = gr.Slider(*lim.num_images, value=1, step=1, label="Number of images")
        trajectory = gr.Checkbox(label="Show trajectory", value=False,
                                 info="an animated GIF of the first image's denoising")
    return [steps, cfg, lo, hi, alpha, solver, seed, randomize, num_images, trajectory]


def build_app(
    pipe: Pipeline,
    rewriter: PromptRewriter | None = None,
    max_prompt_chars: int = 1000,
    queue_size: int = 16,
    source: str | Path | None = None,
    limits: Limits | None = None,
) -> gr.Blocks:
    """The app around a loaded pipeline, queued (one generation at a time, at most `queue_size` waiting).
    Importable, so tests and notebooks can build it around any Pipeline; `launch_kwargs` says how to serve it."""
    d = pipe.defaults()
    lim = replace(limits or Limits(), prompt_chars=max_prompt_chars).covering(d)
    handlers = Generator(pipe, rewriter, lim, None if source is None else str(source))
    with gr.Blocks(title=f"rfdit · {pipe.metadata.get('name', 'checkpoint')}", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as demo:
        gr.Markdown(header(pipe, handlers.source))
        with gr.Row():
            with gr.Column(scale=1):
                if pipe.is_text:
                    subject = gr.Textbox(label="Prompt", lines=2, max_length=max_prompt_chars,
                                         placeholder="a large red circle in the top left on a gray background")
                    rewrite = gr.Checkbox(label="Rewrite the prompt like a training caption", value=False,
                                          interactive=rewriter is not None, info=rewrite_note(rewriter))
                    inputs = [subject, rewrite]
                else:
                    subject = gr.Dropdown(choices=handlers.class_choices, value=0, label="Class")
                    inputs = [subject]
                controls = sampling_controls(lim, d)
                size = gr.Dropdown(choices=handlers.size_choices, value=f"{pipe.image_size}x{pipe.image_size}",
                                   label="Size (height x width, px)",
                                   info="an aspect-ratio bucket: those it was trained on, or its resolution's")
                button = gr.Button("Generate", variant="primary")
            with gr.Column(scale=1):
                outputs = [
                    gr.Gallery(label="Images", columns=4, format="png", object_fit="contain", height=360,
                               elem_id="gallery"),
                    gr.Image(label="Trajectory", type="filepath", interactive=False, elem_id="trajectory",
                             height=280),
                ]
                if pipe.is_text:
                    outputs.append(gr.Textbox(label="Prompt used", interactive=False))
                status = gr.Markdown()
        seed = controls[6]  # also an output: it shows the seed drawn when "Randomise seed" is on
        triggers = [button.click] + ([subject.submit] if pipe.is_text else [])
        # preprocess=False: the handlers get the values as sent and check them all themselves. Gradio's own
        # range check would say only "Value 0 is less than minimum value 1", not which control or range.
        gr.on(triggers, handlers.generate_text if pipe.is_text else handlers.generate_class,
              inputs=inputs + controls + [size], outputs=outputs + [seed, status], api_name="generate",
              preprocess=False)
    return demo.queue(default_concurrency_limit=1, max_size=queue_size)


MAX_UPLOAD_BYTES = 0
"""Gradio's max_file_size: the app takes no files, so its upload route accepts none (Gradio has no limit unless
told one)."""


def launch_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """What `Blocks.launch` gets: loopback unless --host, and share set explicitly, so that neither a
    GRADIO_SHARE nor a GRADIO_SERVER_NAME in the environment opens the app to the internet unasked; no uploads."""
    return dict(server_name=args.host, server_port=args.port, share=bool(args.share), show_error=True,
                ssr_mode=False, theme=THEME, css=CSS, max_file_size=MAX_UPLOAD_BYTES)


def one_line(err: BaseException, limit: int = 400) -> str:
    """An error as one line of at most `limit` characters (torch's load errors run over several paragraphs)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_or_exit(args: argparse.Namespace) -> Pipeline:
    """The pipeline, tried on one image (tokenizer, model and VAE all exercised); SystemExit with one line
    naming the file if anything about it is wrong, so the problem shows at start-up and not in the browser.
    (A file torch cannot read comes back from app/pipeline.py without torch's own advice, which for a file that
    is no plain checkpoint is to load it with weights_only=False: that would run code from the file.)"""
    try:
        pipe = load_pipeline(args.model_path, args.weights, args.device, sources_from_args(args), fp32=args.fp32,
                             lora=lora_from_args(args))
        item = dict(prompts=["a test"]) if pipe.is_text else dict(labels=[0])
        pipe.generate(**item, seeds=[0], steps=1, cfg_scale=1.0)
    except CheckpointError as err:
        raise SystemExit(one_line(err)) from err
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(one_line(f"--model-path {args.model_path}: cannot generate from it "
                                  f"({type(err).__name__}: {err})")) from err
    return pipe


def make_rewriter(args: argparse.Namespace, pipe: Pipeline) -> PromptRewriter | None:
    """The rewriter if --rewrite-endpoint is given, told a word budget that fits the checkpoint's tokenizer."""
    if not args.rewrite_endpoint:
        return None
    if not pipe.is_text:
        print("note: --rewrite-endpoint ignored: a class-conditional checkpoint takes no prompt", file=sys.stderr)
        return None
    max_words = max(8, (pipe.conditioning.max_length - 2) * 3 // 4)  # about 4 tokens per 3 words
    return PromptRewriter(args.rewrite_endpoint, args.rewrite_model, args.rewrite_style,
                          os.environ.get(args.rewrite_api_key_env), max_words=max_words)
