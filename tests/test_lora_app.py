"""LoRA adapters in the tools: app/sample.py --lora / --lora-scale, the Gradio app's start-up, python -m app.export
--merge-lora, and the pixart flavour's adapter beside the exported stock diffusers transformer.

References: the base checkpoint's own images (scale 0), the sampler run on the base model with the adapter applied
unmerged (peft's layers, not the merge the CLI does), the closed form W + s alpha / r B A in float64, and diffusers'
PixArtTransformer2DModel with peft's own PeftModel loader."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.export import main as export_main
from app.sample import main as sample_main
from core import checkpoint
from core import lora as core_lora
from models import ModelConfig, build_model

PROMPT = "a large red circle in the top left on a gray background"


def livened(ckpt: Path, out: Path) -> Path:
    """`ckpt` with every weight moved off its (adaLN-Zero) init: a two-step checkpoint's gates and output layer are
    still about zero, which would hide what an adapter on the blocks does."""
    state = checkpoint.load(ckpt)
    g = torch.Generator().manual_seed(1)
    for key in ("model", "ema"):
        state[key] = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in state[key].items()}
    checkpoint.save_atomic(state, out)
    return out


@pytest.fixture(scope="module")
def base(stage2_checkpoint, tmp_path_factory) -> Path:
    return livened(stage2_checkpoint, tmp_path_factory.mktemp("base") / "step_00000002.pt")


def random_adapter(ckpt: Path, folder: Path, rank: int = 4, alpha: float = 8.0, seed: int = 0) -> Path:
    """An adapter for `ckpt`'s network on its default targets, with random A and B (a trained one's B would be as
    nonzero; random makes the effect large at this size)."""
    state = checkpoint.load(ckpt)
    meta, weights = state["metadata"], checkpoint.model_weights(state, "ema")
    model = build_model(ModelConfig(**meta["model"]))
    config = core_lora.lora_config(rank, alpha, 0.0, core_lora.default_targets(model.config))
    core_lora.inject(model, config)
    g = torch.Generator().manual_seed(seed)
    tensors = {n: 0.3 * torch.randn(p.shape, generator=g) for n, p in core_lora.adapter_parameters(model).items()}
    record = core_lora.AdapterRecord(model=meta["model"], prediction=meta["prediction"],
                                     base=dict(path=str(ckpt), weights="ema",
                                               fingerprint=core_lora.weights_fingerprint(weights)))
    return core_lora.save_adapter(folder, config, tensors, record)


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("prompt_*.png"))}


def test_sample_cli_merges_a_lora_at_its_scale(base, tmp_path):
    from app.pipeline import load_pipeline

    adapter = random_adapter(base, tmp_path / "adapter")
    args = ["--model-path", str(base), "--prompt", PROMPT, "--num-samples", "2", "--steps", "3"]
    sample_main([*args, "--out-dir", str(tmp_path / "base")])
    sample_main([*args, "--lora", str(adapter), "--lora-scale", "0", "--out-dir", str(tmp_path / "zero")])
    sample_main([*args, "--lora", str(adapter), "--lora-scale", "0.5", "--out-dir", str(tmp_path / "half")])
    plain, zero, half = pngs(tmp_path / "base"), pngs(tmp_path / "zero"), pngs(tmp_path / "half")
    assert plain.keys() == zero.keys() == half.keys() and len(plain) == 2
    assert all(np.array_equal(plain[k], zero[k]) for k in plain)  # scale 0 is the base
    assert any(np.abs(plain[k].astype(int) - half[k].astype(int)).max() > 8 for k in plain)

    # The reference: the base pipeline with the adapter's layers applied unmerged (peft's forward), scale 0.5.
    pipe = load_pipeline(base, device="cpu")
    pipe.model = core_lora.apply_adapter(pipe.model, core_lora.read_adapter(adapter), scale=0.5, merge=False).eval()
    images = pipe.generate(prompts=[PROMPT, PROMPT], seeds=[0, 1], steps=3)
    for image, name in zip(images, sorted(half), strict=True):
        assert np.abs(image.numpy().astype(int) - half[name].astype(int)).max() <= 1, name


def test_a_lora_run_folder_samples_and_the_wrong_adapter_is_refused(stage1_checkpoint, stage2_checkpoint,
                                                                      embedded_data, tmp_path):
    from tests.stages import stage_config
    from trainer.loop import train

    run = tmp_path / "run"
    train(stage_config(2, embedded_data, run, "device=cpu", "train.lora.rank=2", "train.max_steps=2",
                       f"train.init_from={stage2_checkpoint}"))
    sample_main(["--model-path", str(stage2_checkpoint), "--prompt", PROMPT, "--steps", "2", "--lora", str(run),
                 "--out-dir", str(tmp_path / "out")])  # the run folder stands for its adapter/
    assert (tmp_path / "out" / "grid.png").is_file()
    with pytest.raises(SystemExit, match=r"--lora .*trained for another network.*family 'mmdit' \(adapter\) != "
                                         r"'ccdit'"):
        sample_main(["--model-path", str(stage1_checkpoint), "--class-label", "0", "--lora", str(run / "adapter"),
                     "--out-dir", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="LoRA training checkpoint: it holds the adapters only"):
        sample_main(["--model-path", str(run), "--prompt", PROMPT, "--out-dir", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="--lora-scale needs --lora"):
        sample_main(["--model-path", str(stage2_checkpoint), "--prompt", PROMPT, "--lora-scale", "2",
                     "--out-dir", str(tmp_path / "z")])


def test_gradio_app_loads_the_lora_at_start_up(base, tmp_path):
    from app.gradio_app import parse_args
    from app.gradio_ui import header, load_or_exit

    adapter = random_adapter(base, tmp_path / "adapter")
    pipe = load_or_exit(parse_args(["--model-path", str(base), "--device", "cpu", "--lora", str(adapter),
                                    "--lora-scale", "0.5"]))
    assert pipe.lora == dict(folder=str(adapter), scale=0.5)
    assert f"LoRA `{adapter}` × 0.5" in header(pipe, str(base))
    assert not any(core_lora.is_adapter_parameter(n) for n, _ in pipe.model.named_parameters())  # merged


def test_export_merge_lora_writes_the_merged_weights(base, tmp_path):
    from safetensors.torch import load_file

    adapter = random_adapter(base, tmp_path / "adapter", rank=4, alpha=8.0)
    export_main(["--model-path", str(base), "--out-dir", str(tmp_path / "merged"), "--format",
                 "safetensors", "--merge-lora", str(adapter), "--lora-scale", "0.5"])
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    weights = checkpoint.model_weights(checkpoint.load(base), "ema")
    lora = core_lora.read_adapter(adapter).state
    assert merged.keys() == weights.keys()
    adapted = {k.partition(".lora_")[0] for k in lora}
    for name, value in weights.items():
        module = name.removesuffix(".weight")
        if module in adapted and name.endswith(".weight"):
            delta = lora[f"{module}.lora_B.weight"].double() @ lora[f"{module}.lora_A.weight"].double()
            torch.testing.assert_close(merged[name].double(), value.double() + 0.5 * 8.0 / 4 * delta, atol=1e-6,
                                       rtol=0)
        else:
            assert torch.equal(merged[name], value), name
    assert "merged in at scale 0.5" in (tmp_path / "merged" / "README.md").read_text()
    with pytest.raises(SystemExit, match="--lora writes an adapter for stock diffusers' PixArt .* --format pixart"):
        export_main(["--model-path", str(base), "--out-dir", str(tmp_path / "x"), "--lora", str(adapter)])


def test_export_pixart_with_its_adapter_loads_in_stock_diffusers(embedded_data, tmp_path):
    """--format pixart --lora: PixArtTransformer2DModel.from_pretrained + peft's PeftModel.from_pretrained on the
    written transformer_lora gives the adapted model's velocity (diffusers' conventions: timestep 1000 (1 - t),
    output noise - data)."""
    from diffusers import PixArtTransformer2DModel
    from peft import PeftModel

    from tests.stages import stage_config
    from trainer.loop import train

    trained = Path(train(stage_config(2, embedded_data, tmp_path / "px", "device=cpu", "train.max_steps=2",
                                      "train.init_from=null", "model=pixart", "model.overrides.cond_dim=256",
                                      "train.prediction=velocity"))["checkpoint"])
    ckpt = livened(trained, tmp_path / "live" / "step_00000002.pt")
    adapter = random_adapter(ckpt, tmp_path / "adapter")
    export_main(["--model-path", str(ckpt), "--out-dir", str(tmp_path / "out"), "--format", "pixart", "--lora",
                 str(adapter)])
    transformer = PixArtTransformer2DModel.from_pretrained(tmp_path / "out", subfolder="transformer").eval()
    theirs = PeftModel.from_pretrained(transformer, str(tmp_path / "out" / "transformer_lora")).eval()
    ours = core_lora.apply_adapter(checkpoint.load_model(ckpt)[0], core_lora.read_adapter(adapter), merge=False)
    cfg = ours.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    text, t = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g), torch.tensor([0.2, 0.7])
    mask = torch.arange(cfg.text_len)[None] < torch.tensor([5, 0])[:, None]
    with torch.no_grad():
        reference = ours(x, t, text=text, text_mask=mask)
        out = theirs(x, encoder_hidden_states=text, encoder_attention_mask=mask.float(), timestep=1000 * (1 - t)).sample
    assert reference.abs().max() > 0.1
    torch.testing.assert_close(-out, reference, atol=2e-5, rtol=0)
    assert "transformer_lora" in (tmp_path / "out" / "README.md").read_text()
