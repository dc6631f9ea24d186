"""A browser front end for a trained checkpoint (Gradio): a prompt or a class in, images out.

    python -m app.gradio_app --model-path outputs/embedded/stage5/checkpoints/step_00000150.pt
    python -m app.gradio_app --model-path outputs/embedded/stage1/checkpoints/step_00000800.pt --port 7861
    python -m app.gradio_app --model-path ckpt.pt --rewrite-endpoint http://localhost:8000/v1 \\
        --rewrite-model Qwen/Qwen3-VL-2B-Instruct

The checkpoint decides the mode: a class picker for a class-conditional (Stage 1) checkpoint, a prompt box
for the text stages, with steps, guidance and alpha defaulting to what the stage previewed with. It is loaded
once, at start-up, and one image is drawn there, so a file that is not a usable checkpoint stops the app with
a one-line message instead of failing in the browser. The app listens on 127.0.0.1 unless --host says
otherwise, and makes a public gradio.live link only with --share. Image i of a request has seed `seed + i`,
as in app/sample.py, so the CLI line the app prints under the images reproduces them. One generation runs
at a time; a bounded queue holds the others. Every request is checked by app/validation.py, the CLI's own checks
(with the controls' ranges, and a cost within --max-tflop), and stopped if it runs past --time-limit seconds, so
no request holds the one worker for long; uploads are refused (the app takes no files). What the checkpoint names
(text encoder, tokenizer, VAE) loads only from hub ids or the bundled MiniLM: --text-encoder, --tokenizer and
--vae PATH load a folder instead, and only --trust-remote-code lets an encoder run its own code (app/sources.py).
--lora DIR merges a LoRA adapter into the checkpoint at start-up (at --lora-scale S), as app/sample.py does.

Optional prompt rewriting (--rewrite-endpoint, app/rewrite.py) retells the prompt in the style of the
training captions through an OpenAI-compatible VLM server; the prompt actually used is shown.

The `generate` endpoint is callable from Python:

    from gradio_client import Client
    Client("http://127.0.0.1:7860/").predict(prompt="a red circle", seed=3, api_name="/generate")
"""

import argparse
import sys
from pathlib import Path

from app.precision import add_fp32_flag
from app.sources import add_lora_flags, add_source_flags
from core.cli_help import HelpFormatter

_UI = ("Generator", "Settings", "TrajectoryWriter", "build_app", "launch_kwargs", "load_or_exit", "make_rewriter",
       "one_line", "header", "rewrite_note", "sampling_controls", "THEME", "CSS")


def __getattr__(name: str):
    """The page and its handlers (app/gradio_ui.py: gradio, torch) load on first use, so --help answers at once."""
    if name in _UI:
        from app import gradio_ui

        return getattr(gradio_ui, name)
    raise AttributeError(f"module 'app.gradio_app' has no attribute {name!r}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model-path", type=Path, required=True,
                   help="checkpoint written by the trainer, or a run folder / its checkpoints/ (the newest)")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    add_fp32_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    p.add_argument("--max-prompt-chars", type=int, default=1000, help="longest prompt accepted, in characters")
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait for the one running")
    p.add_argument("--max-tflop", type=float, default=None,
                   help="budget of a request in teraFLOP of the transformer: its FLOPs at the size asked x solver "
                        "evaluations x steps x images, x 2 with guidance (default: 100 on a CPU, 20,000 on a GPU)")
    p.add_argument("--time-limit", type=float, default=300.0,
                   help="seconds a request may run; a longer one is stopped at its next model evaluation and the "
                        "worker moves on")
    add_source_flags(p)
    add_lora_flags(p)
    g = p.add_argument_group("prompt rewriting (optional)")
    g.add_argument("--rewrite-endpoint", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    g.add_argument("--rewrite-model", help="model name the server serves, e.g. Qwen/Qwen3-VL-2B-Instruct")
    g.add_argument("--rewrite-style", choices=("long", "short"), default="long",
                   help="which caption instruction to follow (data/pipeline/prompts/)")
    g.add_argument("--rewrite-api-key-env", default="OPENAI_API_KEY", help="env var holding the API key, if any")
    args = p.parse_args(argv)
    if not 1 <= args.port <= 65535:
        p.error(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_prompt_chars < 1:
        p.error(f"--max-prompt-chars must be >= 1, got {args.max_prompt_chars}")
    if args.queue_size < 1:
        p.error(f"--queue-size must be >= 1, got {args.queue_size}")
    if args.max_tflop is not None and not 0 < args.max_tflop <= 1e12:  # NaN fails too
        p.error(f"--max-tflop must be a number in (0, 1e12], got {args.max_tflop}")
    if not 0 < args.time_limit <= 86400:
        p.error(f"--time-limit must be a number of seconds in (0, 86400], got {args.time_limit}")
    if bool(args.rewrite_endpoint) != bool(args.rewrite_model):
        p.error("--rewrite-endpoint and --rewrite-model go together: give both or neither")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from app.gradio_ui import Limits, build_app, launch_kwargs, load_or_exit, make_rewriter

    pipe = load_or_exit(args)
    demo = build_app(pipe, make_rewriter(args, pipe), args.max_prompt_chars, args.queue_size, args.model_path,
                     Limits(tflop=args.max_tflop, time_limit=args.time_limit))
    # quiet, with our own lines: Gradio's would tell a CLI user to "set share=True in launch()".
    _, local_url, share_url = demo.launch(**launch_kwargs(args), quiet=True, prevent_thread_lock=True)
    public = f" and {share_url}" if share_url else " (add --share for a public link)"
    print(f"serving {args.model_path} on {local_url}{public}", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {args.host}: anyone who can reach this machine can use the app", file=sys.stderr)
    demo.block_thread()


if __name__ == "__main__":
    main()
