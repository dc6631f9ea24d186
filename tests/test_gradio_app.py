"""The Gradio app (app/gradio_app.py), served on loopback around tiny checkpoints and driven the way users
drive it: gradio_client for the `generate` endpoint, a headless Chromium for the page, a subprocess for the
start-up errors, and a loopback OpenAI-compatible server for prompt rewriting."""

import inspect
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from app.gradio_app import build_app, launch_kwargs, main, parse_args
from app.pipeline import load_pipeline
from app.rewrite import PromptRewriter
from app.sample import main as sample_main
from data.pipeline.captioners import Prompts
from reparameterize import main as reparameterize_main
from tests.helpers import loopback_chat_server

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
PROMPT = "a large red circle in the top left on a gray background"
REWRITTEN = "A large blue square sits in the bottom right of the frame on a plain gray background"
CONTROL_LABELS = ("Prompt", "Rewrite the prompt like a training caption", "Steps", "Guidance scale",
                  "Guidance from t", "Guidance until t", "Alpha", "Solver", "Seed", "Randomise seed",
                  "Number of images", "Show trajectory", "Generate", "Images", "Trajectory", "Prompt used")


@pytest.fixture(scope="module")
def text_pipe(stage2_checkpoint):
    return load_pipeline(stage2_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def class_pipe(stage1_checkpoint):
    return load_pipeline(stage1_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def chat_server():
    """A loopback chat server (tests/helpers.py) that answers with `state['reply']`, wrapped the way VLMs wrap
    it, or fails with `state['status']`."""
    with loopback_chat_server(lambda body, state: f' "{state["reply"]}"\n') as state:
        state["reply"] = REWRITTEN
        yield state


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(demo: gr.Blocks, checkpoint: Path):
    """Launch `demo` with the CLI's own launch arguments on a free loopback port; (url, demo) to close."""
    port = free_port()
    kwargs = launch_kwargs(parse_args(["--model-path", str(checkpoint), "--port", str(port)]))
    demo.launch(**kwargs, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def text_app(text_pipe, stage2_checkpoint, chat_server):
    """A text app with prompt rewriting through the loopback chat server."""
    rewriter = PromptRewriter(chat_server["url"], "test-vlm", api_key="sk-test", max_words=20)
    demo = build_app(text_pipe, rewriter, source=stage2_checkpoint)
    yield serve(demo, stage2_checkpoint)
    demo.close()


@pytest.fixture(scope="module")
def plain_text_app(text_pipe, stage2_checkpoint):
    """A text app started without --rewrite-endpoint."""
    demo = build_app(text_pipe, source=stage2_checkpoint)
    yield serve(demo, stage2_checkpoint)
    demo.close()


@pytest.fixture(scope="module")
def class_app(class_pipe, stage1_checkpoint):
    demo = build_app(class_pipe, source=stage1_checkpoint)
    yield serve(demo, stage1_checkpoint)
    demo.close()


def client(url: str, tmp_path: Path) -> Client:
    return Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path))


def images(gallery) -> list[np.ndarray]:
    """The gallery output as gradio_client hands it back (downloaded files) -> arrays."""
    return [np.asarray(Image.open(item["image"]).convert("RGB")) for item in gallery]


@pytest.mark.slow
def test_text_endpoint_is_deterministic_in_the_seed(text_app, text_pipe, tmp_path):
    c = client(text_app, tmp_path)
    args = dict(prompt=PROMPT, steps=2, randomize_seed=False, api_name="/generate")
    gallery, gif, used, seed, status = c.predict(**args, seed=5, num_images=2)
    a5, a6 = images(gallery)
    assert a5.shape == (32, 32, 3) and gif is None and used == PROMPT and seed == 5
    assert [item["caption"] for item in gallery] == ["seed 5", "seed 6"] and "-m app.sample" in status
    again = images(c.predict(**args, seed=5, num_images=1)[0])[0]
    other = images(c.predict(**args, seed=6, num_images=1)[0])[0]
    assert np.array_equal(a5, again) and not np.array_equal(a5, other)
    assert np.array_equal(a6, other)  # image i has seed `seed + i`, as in app/sample.py
    direct = text_pipe.generate(prompts=[PROMPT], seeds=[5], steps=2).numpy()[0]
    assert np.array_equal(a5, direct)  # PNG all the way: the browser sees the pipeline's pixels


def test_the_status_line_reproduces_the_pixels_with_the_cli(text_app, text_pipe, tmp_path):
    gallery, *_, status = client(text_app, tmp_path).predict(
        prompt=PROMPT, steps=2, guidance_scale=2.5, alpha=1.5, guidance_start=0.1, seed=11, num_images=2,
        api_name="/generate")
    # Each setting the line carries changes these pixels (the fixture is not gray): a line that lost one would not
    # reproduce them.
    chosen = dict(prompts=[PROMPT], seeds=[11], steps=2, cfg_scale=2.5, alpha=1.5, cfg_interval=(0.1, 1.0))
    first = images(gallery)[0]
    assert np.array_equal(first, text_pipe.generate(**chosen).numpy()[0])
    for change in (dict(seeds=[12]), dict(prompts=["a small blue star in the center"]), dict(cfg_scale=1.0),
                   dict(alpha=1.0), dict(cfg_interval=(0.0, 1.0))):
        assert not np.array_equal(first, text_pipe.generate(**chosen | change).numpy()[0]), change
    argv = shlex.split(status.split("```")[1])[3:]  # after "python -m app.sample"
    argv[argv.index("--out-dir") + 1] = str(tmp_path / "cli")
    sample_main(argv)
    for item, image in zip(gallery, images(gallery), strict=True):
        seed = item["caption"].removeprefix("seed ")
        assert np.array_equal(image, np.asarray(Image.open(tmp_path / "cli" / f"prompt_00_seed_{seed}.png")))


def test_text_endpoint_shows_the_trajectory_of_the_first_image(text_app, tmp_path):
    gallery, gif, *_ = client(text_app, tmp_path).predict(
        prompt=PROMPT, steps=2, seed=0, num_images=2, show_trajectory=True, api_name="/generate")
    assert len(images(gallery)) == 2
    animation = Image.open(gif)
    assert animation.format == "GIF" and animation.n_frames == 3  # the noise, then one frame per step


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(prompt="   "), "The prompt is empty"),
        (dict(prompt=["a red circle"]), "The prompt must be a string, got list"),
        (dict(prompt="a" * 1001), "The prompt is 1001 characters long; at most 1000"),
        (dict(prompt="red circle " * 40), "tokens long, but this checkpoint's text encoder reads only the first"),
        (dict(steps=0), "Steps must be between 1 and 200, got 0"),
        (dict(steps=2.5), "Steps must be a whole number"),
        (dict(guidance_scale=-1), "Guidance scale must be between 0.0 and 20.0"),
        (dict(alpha=0), "Alpha must be between 0.1 and 10.0"),
        (dict(guidance_start=0.8, guidance_end=0.2), "Guidance from t (0.8) must not be after Guidance until t"),
        (dict(num_images=9), "Number of images must be between 1 and 8, got 9"),
        (dict(seed=-1), "Seed must be between 0 and"),
        (dict(solver="leapfrog"), "Solver must be one of euler"),
    ],
)
def test_invalid_inputs_come_back_as_messages(text_app, tmp_path, override, message):
    args = dict(prompt=PROMPT, steps=2, seed=0, randomize_seed=False) | override
    with pytest.raises(AppError, match=message.replace("(", r"\(").replace(")", r"\)")):
        client(text_app, tmp_path).predict(**args, api_name="/generate")


def test_the_handler_shares_the_clis_checks(text_pipe):
    """Values no slider sends (NaN, a budget-breaking request) are refused by the handler itself."""
    from app.gradio_app import Generator
    from app.validation import Limits, RequestError

    tflop = text_pipe.evaluation_flops(32, 32) * 2 * 20 * 3 / 1e12  # guided: two evaluations a step
    handlers = Generator(text_pipe, None, Limits(tflop=tflop * (1 - 1e-9)), None)
    controls = dict(steps=20, guidance_scale=4.0, guidance_start=0.0, guidance_end=1.0, alpha=1.0, solver="euler",
                    seed=0, randomize_seed=False, num_images=3, show_trajectory=False)
    with pytest.raises(RequestError, match="Guidance scale must be between 0.0 and 20.0, got nan"):
        handlers.settings(**controls | dict(guidance_scale=float("nan")))
    budget = r"32x32 pixels x 20 euler steps x 3 images with guidance = .* TFLOP.*\(the app's --max-tflop raises it"
    with pytest.raises(RequestError, match=budget):
        handlers.settings(**controls)
    assert handlers.settings(**controls | dict(num_images=2)).seeds == [0, 1]
    assert handlers.settings(**controls | dict(guidance_scale=1.0)).num_images == 3  # unguided: half the cost


def test_a_request_past_the_time_limit_frees_the_worker(text_pipe, stage2_checkpoint, tmp_path):
    """A request that runs past --time-limit stops at its next model evaluation and the app's one worker takes
    the next request. Each evaluation is slowed to 0.2 s: 50 steps would hold the worker for 10 s."""
    import time

    from app.validation import Limits

    calls = []

    def slowly(module, args) -> None:
        calls.append(1)
        time.sleep(0.2)

    slow = text_pipe.model.register_forward_pre_hook(slowly)
    demo = build_app(text_pipe, source=stage2_checkpoint, limits=Limits(time_limit=0.5))
    try:
        c = client(serve(demo, stage2_checkpoint), tmp_path)
        with pytest.raises(AppError, match=r"past the time limit of 0.5 s \(the app's --time-limit\)"):
            c.predict(prompt=PROMPT, steps=50, seed=0, api_name="/generate")
        assert 1 <= len(calls) <= 4  # stopped at the first evaluation after 0.5 s
        calls.clear()
        gallery, *_ = c.predict(prompt=PROMPT, steps=1, guidance_scale=1.0, seed=0, api_name="/generate")
        assert len(images(gallery)) == 1 and len(calls) == 1
    finally:
        slow.remove()
        demo.close()


def test_the_app_takes_no_uploads(plain_text_app, tmp_path):
    """The app takes no files, so Gradio's upload route refuses any (max_file_size); without it Gradio stores
    whatever is posted."""
    import httpx

    files = {"files": ("big.bin", b"x" * 4096, "application/octet-stream")}
    response = httpx.post(f"{plain_text_app}gradio_api/upload", files=files, timeout=60)
    assert response.status_code == 413, (response.status_code, response.text[:200])


def test_randomised_seed_is_reported(text_app, tmp_path):
    gallery, _, _, seed, status = client(text_app, tmp_path).predict(
        prompt=PROMPT, steps=1, seed=0, randomize_seed=True, api_name="/generate")
    assert gallery[0]["caption"] == f"seed {seed}" and f"--seed {seed}" in status


def test_prompt_rewriting_is_shown_and_used(text_app, text_pipe, chat_server, tmp_path):
    chat_server["requests"].clear()
    user = "blue square, bottom right"
    gallery, _, used, _, _ = client(text_app, tmp_path).predict(
        prompt=user, rewrite=True, steps=2, seed=3, api_name="/generate")
    assert used == REWRITTEN  # quotes and the newline the server added are cleaned off
    direct = text_pipe.generate(prompts=[REWRITTEN], seeds=[3], steps=2).numpy()[0]
    assert np.array_equal(images(gallery)[0], direct)
    (request,) = chat_server["requests"]
    body = request["body"]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert body["model"] == "test-vlm" and body["messages"][-1] == {"role": "user", "content": user}
    system = body["messages"][0]["content"]
    assert Prompts.load().long in system and "at most 20 words" in system  # the captioner's instructions


def test_prompt_rewriting_failures_name_the_flags(text_app, chat_server, tmp_path):
    c = client(text_app, tmp_path)
    chat_server["status"] = 500
    try:
        with pytest.raises(AppError, match=r"prompt rewriting failed: .*failed after 2 attempts.*--rewrite-endpoint"):
            c.predict(prompt=PROMPT, rewrite=True, steps=1, api_name="/generate")
    finally:
        chat_server["status"] = 200
    chat_server["reply"] = "red circle " * 40
    try:
        with pytest.raises(AppError, match="The rewritten prompt is .* tokens long"):
            c.predict(prompt=PROMPT, rewrite=True, steps=1, api_name="/generate")
    finally:
        chat_server["reply"] = REWRITTEN


def test_rewrite_switch_is_disabled_without_an_endpoint(text_pipe, plain_text_app, tmp_path):
    demo = build_app(text_pipe)
    (switch,) = [b for b in demo.blocks.values() if isinstance(b, gr.Checkbox) and b.label.startswith("Rewrite")]
    assert switch.interactive is False and "no --rewrite-endpoint given" in switch.info
    with pytest.raises(AppError, match="Prompt rewriting is off: the app was started without --rewrite-endpoint"):
        client(plain_text_app, tmp_path).predict(prompt=PROMPT, rewrite=True, steps=1, api_name="/generate")


def test_class_app_draws_the_chosen_class(class_app, class_pipe, tmp_path):
    c = client(class_app, tmp_path)
    gallery, gif, seed, status = c.predict(class_label=1, steps=2, seed=4, api_name="/generate")
    (image,) = images(gallery)
    assert image.shape == (32, 32, 3) and seed == 4 and "--class-label 1" in status
    assert np.array_equal(image, class_pipe.generate(labels=[1], seeds=[4], steps=2).numpy()[0])
    # Another class or another seed is another image (the fixture is not gray), so the line above can fail.
    assert not np.array_equal(image, class_pipe.generate(labels=[2], seeds=[4], steps=2).numpy()[0])
    assert not np.array_equal(image, class_pipe.generate(labels=[1], seeds=[5], steps=2).numpy()[0])
    names = class_pipe.conditioning.class_names
    with pytest.raises(AppError, match=rf"Class must be one of 0..{len(names) - 1} \(0: {names[0]}"):
        c.predict(class_label=len(names), steps=2, api_name="/generate")


def test_building_the_app_writes_no_stub_files(class_pipe):
    """Subclassing a Gradio component makes Gradio write a .pyi next to the module; the app must not."""
    build_app(class_pipe)
    assert not (ROOT / "app" / "gradio_app.pyi").exists()


def test_class_picker_shows_the_class_names(class_pipe):
    demo = build_app(class_pipe)
    (picker,) = [b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.label == "Class"]
    names = class_pipe.conditioning.class_names
    assert [label for label, _ in picker.choices] == [f"{i}: {name}" for i, name in enumerate(names)]
    assert not any(isinstance(b, gr.Textbox) and b.label == "Prompt" for b in demo.blocks.values())


@pytest.mark.slow
def test_corrupt_checkpoint_fails_at_start_up_in_one_line(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"garbage, not a checkpoint")
    run = subprocess.run([sys.executable, "app/gradio_app.py", "--model-path", str(bad)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "garbage.pt" in lines[0] and "not a readable checkpoint" in lines[0], run.stderr
    assert "weights_only" not in lines[0]  # torch's advice to load it unsafely is not passed on
    assert "Traceback" not in run.stderr + run.stdout


def test_missing_file_and_reparameterized_init_fail_at_start_up(stage1_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit, match="missing.pt: no such file"):
        main(["--model-path", str(tmp_path / "missing.pt")])
    init = tmp_path / "init.pt"
    reparameterize_main(["stage1-to-stage2", "--src", str(stage1_checkpoint), "--dst", str(init),
                         "--text-dim", "384", "--text-len", "32"])
    with pytest.raises(SystemExit) as exit_info:
        main(["--model-path", str(init)])
    message = str(exit_info.value.code)
    assert "init.pt" in message and "reparameterize.py" in message and "\n" not in message


def test_default_bind_is_loopback_and_share_is_off():
    kwargs = launch_kwargs(parse_args(["--model-path", "ckpt.pt"]))
    assert kwargs["server_name"] == "127.0.0.1" and kwargs["share"] is False and kwargs["server_port"] == 7860
    inspect.signature(gr.Blocks.launch).bind(None, **kwargs)  # every key is a launch() parameter
    shared = launch_kwargs(parse_args(["--model-path", "ckpt.pt", "--share", "--host", "0.0.0.0", "--port", "9000"]))
    assert (shared["server_name"], shared["share"], shared["server_port"]) == ("0.0.0.0", True, 9000)


@pytest.mark.parametrize(
    "argv, flag",
    [(["--rewrite-endpoint", "http://x/v1"], "--rewrite-model"), (["--port", "0"], "--port"),
     (["--max-prompt-chars", "0"], "--max-prompt-chars"), (["--max-tflop", "0"], "--max-tflop"),
     (["--max-tflop", "nan"], "--max-tflop"), (["--time-limit", "0"], "--time-limit"),
     (["--time-limit", "inf"], "--time-limit")],
)
def test_bad_flags_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--model-path", "ckpt.pt", *argv])
    assert flag in capsys.readouterr().err


def chromium(url: str, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    """Headless Chromium on `url` with the given output flags. Without a browser the test is skipped, saying how
    to get one: `make test` installs it where it may (as root with apt-get, as in CI)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install it with `sudo apt-get install -y chromium` (make test does)")
    argv = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1000",
            "--virtual-time-budget=15000", *flags, url]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_page_renders_the_controls_in_a_browser(plain_text_app, text_pipe, tmp_path):
    dom = chromium(plain_text_app, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    missing = [label for label in CONTROL_LABELS if label not in dom.stdout]
    assert not missing, f"labels not in the rendered page: {missing}"
    assert text_pipe.metadata["name"] in dom.stdout and "no --rewrite-endpoint given" in dom.stdout
    png = tmp_path / "app.png"
    shot = chromium(plain_text_app, tmp_path, f"--screenshot={png}")
    assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float64)
    assert pixels.shape == (1000, 1280) and pixels.std() > 10, f"blank screenshot (std {pixels.std():.1f})"
