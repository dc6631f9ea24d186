"""python -m app.import_weights and train.init_from on foreign sources, with no network: tiny random diffusers
PixArt models saved with save_pretrained, a fake Hub cache read with HF_HUB_OFFLINE, this repo's own exports, and
state dicts in the PixArt-alpha repository's and the reference repository's key layouts.

The references are independent of the import's code: diffusers' own PixArtTransformer2DModel on its conventions
(timestep = 1000 (1 - t), output noise - data, so this repo's velocity is its negated noise half); PixArt's original
keys written from diffusers' by the table of PixArt-sigma's tools/convert_pixart_to_diffusers.py (commit 0c8d020),
transcribed below; the reference repository's forward re-implemented here from its models/ (hachoj/Pixart-Alpha-
From-Scratch, commit 0cfca08)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel
from einops import rearrange

from app.import_weights import HUB_PATTERNS, ImportOptions, ImportSourceError, import_weights
from core.checkpoint import CheckpointError, load
from models import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[1]


def stock_pixart(seed: int = 0, **changes) -> PixArtTransformer2DModel:
    """A tiny random PixArt transformer (learn_sigma, caption MLP), off its zero inits."""
    config = dict(num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=8, num_layers=2,
                  cross_attention_dim=48, caption_channels=24, sample_size=16, patch_size=2,
                  activation_fn="gelu-approximate", norm_type="ada_norm_single", norm_elementwise_affine=False,
                  norm_eps=1e-6, num_embeds_ada_norm=1000, attention_bias=True, use_additional_conditions=False,
                  interpolation_scale=1) | changes
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def pipeline_folder(root: Path, model: PixArtTransformer2DModel, pipeline: str = "PixArtSigmaPipeline") -> Path:
    """What a PixArt pipeline repository holds besides its encoders: transformer/, scheduler/, model_index.json."""
    model.save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    DPMSolverMultistepScheduler().save_config(root / "scheduler")
    return root


def batch(channels: int, text_dim: int, h: int, w: int, text_len: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, channels, h, w, generator=g)
    text = torch.randn(3, text_len, text_dim, generator=g)
    mask = torch.arange(text_len)[None] < torch.tensor([text_len, 2, 0])[:, None]  # full, short, dropped
    return x, torch.tensor([0.1, 0.5, 0.9]), text, mask


def imported_model(imp):
    model = build_model(imp.config).eval()
    model.load_state_dict(imp.ema)
    return model


def stock_velocity(ref, x, t, text, mask, image_size: int | None = None) -> torch.Tensor:
    """diffusers' module on its own conventions, as this repo's velocity: minus its noise half."""
    extra = None
    if ref.config.use_additional_conditions:
        n = x.shape[0]
        extra = dict(resolution=torch.tensor([[float(image_size)] * 2] * n), aspect_ratio=torch.ones(n, 1))
    with torch.no_grad():
        out = ref(x, encoder_hidden_states=text, encoder_attention_mask=mask.float(), timestep=1000 * (1 - t),
                  added_cond_kwargs=extra).sample
    return -out[:, : x.shape[1]]


# ---- diffusers' PixArtTransformer2DModel -------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["sigma", "alpha-1024-ms", "no-caption-mlp"])
def test_a_diffusers_pixart_imports_to_the_same_outputs(tmp_path, variant):
    """PixArt-Sigma-like (learn_sigma, caption MLP), PixArt-alpha 1024-MS-like (its size and aspect-ratio embedders,
    which the import fixes at the model's square size), and a transformer without a caption MLP: the imported
    pixart model equals the stock module at the base grid and on a non-square grid."""
    changes = {"sigma": {}, "alpha-1024-ms": dict(use_additional_conditions=True),
               "no-caption-mlp": dict(caption_channels=None, cross_attention_dim=24, out_channels=4,
                                      activation_fn="linear-silu")}[variant]
    ref = stock_pixart(**changes)
    folder = pipeline_folder(tmp_path / "pipe", ref, "PixArtAlphaPipeline" if "alpha" in variant else
                             "PixArtSigmaPipeline")
    imp = import_weights(str(folder))
    assert imp.config.family == "pixart" and imp.metadata["prediction"] == "epsilon"
    assert imp.config.text_len == (120 if "alpha" in variant else 300)  # the pipelines' max_sequence_length
    model = imported_model(imp)
    for h, w in ((16, 16), (16, 24)):
        x, t, text, mask = batch(4, ref.config.caption_channels or 24, h, w)
        with torch.no_grad():
            ours = model(x, t, text=text, text_mask=mask)
        assert ours.abs().max() > 0.5
        torch.testing.assert_close(ours, stock_velocity(ref, x, t, text, mask, 128), atol=1e-5, rtol=0)
    notes = " ".join(imp.notes)
    assert ("variance outputs" in notes) == (variant != "no-caption-mlp")
    assert ("fixed at 128x128" in notes) == (variant == "alpha-1024-ms")
    assert imp.metadata["imported"]["notes"] == imp.notes


def test_the_import_cli_writes_a_checkpoint_the_sampler_refuses_until_fine_tuned(tmp_path):
    folder = pipeline_folder(tmp_path / "pipe", stock_pixart())
    out = tmp_path / "init.pt"
    proc = subprocess.run([sys.executable, "-m", "app.import_weights", str(folder), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "predicts epsilon" in proc.stdout and "variance outputs" in proc.stdout
    state = load(out)
    assert state["step"] == 0 and state["metadata"]["imported"]["layout"] == "diffusers"
    assert state["metadata"]["scheduler"]["_class_name"] == "DPMSolverMultistepScheduler"
    from app.pipeline import load_pipeline

    with pytest.raises(CheckpointError, match=r"predict 'epsilon'.*fine-tune it to velocity first \(train.init_from="):
        load_pipeline(out, device="cpu")
    again = subprocess.run([sys.executable, "-m", "app.import_weights", str(folder), "--out", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.startswith("ERROR: --out") and "--force" in again.stderr


# ---- the Hub, offline --------------------------------------------------------------------------------------------


def fake_hub_cache(cache: Path, repo_id: str, folder_writer) -> str:
    """huggingface_hub's cache layout for `repo_id` at one commit (models--owner--name/{refs/main, snapshots/<commit>})
    with `folder_writer(snapshot)` filling the snapshot; what a real download leaves behind."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    folder_writer(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


def test_a_hub_id_resolves_through_the_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    ref = stock_pixart()
    commit = fake_hub_cache(tmp_path / "hub", "acme/tiny-pixart-sigma", lambda d: pipeline_folder(d, ref))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    imp = import_weights("acme/tiny-pixart-sigma")
    assert imp.metadata["imported"]["source"] == "acme/tiny-pixart-sigma"
    assert imp.metadata["imported"]["path"].endswith(commit)
    x, t, text, mask = batch(4, 24, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(imported_model(imp)(x, t, text=text, text_mask=mask),
                                   stock_velocity(ref, x, t, text, mask), atol=1e-5, rtol=0)
    with pytest.raises(ImportSourceError, match=r"acme/not-cached: cannot download it from the Hub.*HF_HUB_OFFLINE"):
        import_weights("acme/not-cached")


def test_a_hub_download_asks_for_configs_and_the_transformers_safetensors_only():
    """The allow_patterns, read by huggingface_hub's own filter over a PixArt-Sigma pipeline repository's files."""
    from huggingface_hub.utils import filter_repo_objects

    files = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
             "text_encoder/model-00001-of-00004.safetensors", "tokenizer/spiece.model", "transformer/config.json",
             "transformer/diffusion_pytorch_model.safetensors", "transformer/diffusion_pytorch_model.bin",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "PixArt-XL-2-1024-MS.pth"]
    kept = set(filter_repo_objects(files, allow_patterns=HUB_PATTERNS))
    assert kept == {"model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                    "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "vae/config.json"}


# ---- PixArt-alpha's original layout ------------------------------------------------------------------------------


def original_from_diffusers(ref: PixArtTransformer2DModel, text_len: int) -> dict[str, torch.Tensor]:
    """The PixArt-alpha repository's keys for a diffusers module: PixArt-sigma's convert_pixart_to_diffusers.py's
    table read backwards (diffusers name -> original name), with the qkv and kv_linear it splits fused again, plus
    the null caption and fixed position table the converter drops."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    sd = ref.state_dict()
    c = ref.config
    orig = {"x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
            "t_block.1.weight": sd["adaln_single.linear.weight"], "t_block.1.bias": sd["adaln_single.linear.bias"],
            "final_layer.linear.weight": sd["proj_out.weight"], "final_layer.linear.bias": sd["proj_out.bias"],
            "final_layer.scale_shift_table": sd["scale_shift_table"]}
    for mlp, fc, linear in ((0, 1, 1), (2, 2, 2)):  # mlp.0 / fc1 <-> linear_1, mlp.2 / fc2 <-> linear_2
        for kind in ("weight", "bias"):
            i, j = mlp, linear
            orig[f"y_embedder.y_proj.fc{fc}.{kind}"] = sd[f"caption_projection.linear_{j}.{kind}"]
            orig[f"t_embedder.mlp.{i}.{kind}"] = sd[f"adaln_single.emb.timestep_embedder.linear_{j}.{kind}"]
            if c.use_additional_conditions:
                orig[f"csize_embedder.mlp.{i}.{kind}"] = sd[f"adaln_single.emb.resolution_embedder.linear_{j}.{kind}"]
                orig[f"ar_embedder.mlp.{i}.{kind}"] = sd[f"adaln_single.emb.aspect_ratio_embedder.linear_{j}.{kind}"]
    for d in range(c.num_layers):
        b = f"transformer_blocks.{d}"
        orig[f"blocks.{d}.scale_shift_table"] = sd[f"{b}.scale_shift_table"]
        for kind in ("weight", "bias"):
            orig[f"blocks.{d}.attn.qkv.{kind}"] = torch.cat([sd[f"{b}.attn1.to_{n}.{kind}"] for n in "qkv"])
            orig[f"blocks.{d}.attn.proj.{kind}"] = sd[f"{b}.attn1.to_out.0.{kind}"]
            orig[f"blocks.{d}.mlp.fc1.{kind}"] = sd[f"{b}.ff.net.0.proj.{kind}"]
            orig[f"blocks.{d}.mlp.fc2.{kind}"] = sd[f"{b}.ff.net.2.{kind}"]
            orig[f"blocks.{d}.cross_attn.q_linear.{kind}"] = sd[f"{b}.attn2.to_q.{kind}"]
            orig[f"blocks.{d}.cross_attn.kv_linear.{kind}"] = torch.cat([sd[f"{b}.attn2.to_{n}.{kind}"] for n in "kv"])
            orig[f"blocks.{d}.cross_attn.proj.{kind}"] = sd[f"{b}.attn2.to_out.0.{kind}"]
    grid = c.sample_size // c.patch_size
    orig["y_embedder.y_embedding"] = torch.randn(text_len, c.caption_channels)
    orig["pos_embed"] = get_2d_sincos_pos_embed(c.num_attention_heads * c.attention_head_dim, grid, base_size=grid,
                                                interpolation_scale=c.interpolation_scale)[None].float()
    return orig


@pytest.mark.parametrize("scale, micro", [(1, False), (2, True), (0.5, False)])
def test_pixart_originals_pth_imports_to_the_same_outputs_as_diffusers(tmp_path, scale, micro):
    """A {"state_dict": ...} .pth in PixArt's own keys, with `_orig_mod.` as a compiled save leaves it: the input
    size and interpolation scale are read from its pos_embed table, the text length from its null caption."""
    ref = stock_pixart(interpolation_scale=scale, use_additional_conditions=micro)
    sd = {f"_orig_mod.{k}": v for k, v in original_from_diffusers(ref, text_len=7).items()}
    torch.save({"state_dict": sd}, tmp_path / "PixArt-tiny.pth")
    imp = import_weights(tmp_path / "PixArt-tiny.pth", ImportOptions(heads=2))
    assert (imp.config.input_size, imp.config.interpolation_scale, imp.config.text_len) == (16, scale, 7)
    assert any("null caption" in n for n in imp.notes) and any("_orig_mod." in n for n in imp.notes)
    x, t, text, mask = batch(4, 24, 16, 24)
    with torch.no_grad():
        torch.testing.assert_close(imported_model(imp)(x, t, text=text, text_mask=mask),
                                   stock_velocity(ref, x, t, text, mask, 128), atol=1e-5, rtol=0)


# ---- this repo's own exports -------------------------------------------------------------------------------------


def pixart_checkpoint(stage2_checkpoint: Path, out: Path) -> Path:
    """A velocity-trained pixart checkpoint with the caption MLP (all export formats take it), in the metadata of the
    embedded Stage-2 checkpoint (MiniLM captions, pixel space)."""
    from core.checkpoint import save_atomic
    from models import model_config

    state = load(stage2_checkpoint)
    m = state["metadata"]["model"]
    cfg = model_config("pixart-debug/4", dim=32, depth=2, heads=2, in_channels=m["in_channels"],
                       input_size=m["input_size"], text_dim=m["text_dim"], text_len=m["text_len"],
                       caption_projection=True)
    torch.manual_seed(3)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    meta = dict(state["metadata"], model=cfg.to_dict(), family="pixart", name=cfg.name, prediction="velocity")
    save_atomic(dict(model=model.state_dict(), ema=model.state_dict(), step=1, metadata=meta), out)
    return out


def images(path: Path, **sources) -> torch.Tensor:
    from app.pipeline import load_pipeline
    from app.sources import Sources

    pipe = load_pipeline(path, device="cpu", sources=Sources(**sources))
    prompt = "a large red circle in the top left on a gray background"
    return torch.as_tensor(pipe.generate(prompts=[prompt], seeds=[3], steps=3, cfg_scale=2.0))


@pytest.mark.parametrize("fmt", ["safetensors", "diffusers", "pixart", "pixart-original"])
def test_an_export_imports_back_bitwise_and_samples_the_same(stage2_checkpoint, tmp_path, fmt):
    from app.export import main as export

    source = stage2_checkpoint if fmt in ("safetensors", "diffusers") else \
        pixart_checkpoint(stage2_checkpoint, tmp_path / "pixart.pt")
    original = load(source)
    export(["--model-path", str(source), "--out-dir", str(tmp_path / "export"), "--format", fmt])
    imp = import_weights(tmp_path / "export")
    assert imp.ema.keys() == original["ema"].keys()
    assert all(torch.equal(imp.ema[k], original["ema"][k]) for k in imp.ema)  # bitwise
    meta, want = imp.metadata, original["metadata"]
    assert meta["prediction"] == want["prediction"] and meta["conditioning"] == want["conditioning"]
    # The stock transformer (pixart) has no field for a text model's unused class count.
    ignored = {"extra"} | ({"num_classes"} if fmt == "pixart" else set())
    assert {k: v for k, v in meta["model"].items() if k not in ignored} == \
        {k: v for k, v in want["model"].items() if k not in ignored}
    from core.checkpoint import save_atomic

    save_atomic(imp.checkpoint(), tmp_path / "imported.pt")
    torch.testing.assert_close(images(tmp_path / "imported.pt"), images(source), atol=0, rtol=0)


# ---- the reference repository's state dicts -----------------------------------------------------------------------


def reference_state(family: str, dim=32, depth=2, heads=2, cond_dim=16, patch=2, channels=4, text_dim=24,
                    num_classes=5, seed=0) -> dict[str, torch.Tensor]:
    """Random tensors under the reference's names (models/ccDiT, models/mmDiT), its two buffers included."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: 0.2 * torch.randn(*shape, generator=g)  # noqa: E731
    half, hd = cond_dim // 2, dim // heads
    sd = {"patchify.weight": r(dim, channels, patch, patch), "patchify.bias": r(dim),
          "time_proj.freqs": torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half) / (half - 1)),
          "pos_embed.div_term": torch.exp(-torch.log(torch.tensor(1e4)) * torch.arange(0, dim // 2, 2) / (dim // 2)),
          "linear_out.weight": r(channels * patch**2, dim), "linear_out.bias": r(channels * patch**2),
          "adaLN1.weight": r(dim, cond_dim), "adaLN1.bias": r(dim), "adaLN2.weight": r(2 * dim, dim),
          "adaLN2.bias": r(2 * dim)}

    def attention(prefix, kv_dim):
        for n, fan_in in (("q", dim), ("k", kv_dim), ("v", kv_dim), ("out", dim)):
            sd[f"{prefix}.{n}_proj.weight"], sd[f"{prefix}.{n}_proj.bias"] = r(dim, fan_in), r(dim)
        sd[f"{prefix}.q_norm.weight"], sd[f"{prefix}.k_norm.weight"] = 1 + r(hd), 1 + r(hd)

    for i in range(depth):
        b = f"dit_blocks.{i}"
        attention(f"{b}.attention.attention", dim)
        sd |= {f"{b}.mlp.linear1.weight": r(4 * dim, dim), f"{b}.mlp.linear1.bias": r(4 * dim),
               f"{b}.mlp.linear2.weight": r(dim, 4 * dim), f"{b}.mlp.linear2.bias": r(dim)}
        if family == "ccdit":
            sd |= {f"{b}.adaLN1.weight": r(dim, cond_dim), f"{b}.adaLN1.bias": r(dim),
                   f"{b}.adaLN2.weight": r(6 * dim, dim), f"{b}.adaLN2.bias": r(6 * dim)}
        else:
            attention(f"{b}.cross_attention", text_dim)
            sd[f"{b}.adaLNembed"] = r(6 * dim)
    if family == "ccdit":
        sd["cond_proj.weight"] = r(num_classes + 1, cond_dim)
    else:
        sd |= {"adaLN1_single.weight": r(dim, cond_dim), "adaLN1_single.bias": r(dim),
               "adaLN2_single.weight": r(6 * dim, dim), "adaLN2_single.bias": r(6 * dim)}
    return sd


def reference_forward(sd, x, t, heads, patch, base_grid, labels=None, text=None, mask=None, null_key=False,
                      eps=(1e-5, None)):
    """The reference's DiT.forward (ccDiT with labels, mmDiT with text), written from its models/: interleaved sin-cos
    sinusoids, separate q/k/v with RMSNorm on q and k, LayerNorm eps 1e-5, chunks (scale, shift, ...), gated MHSA and
    MLP, un-gated cross-attention. `null_key`: one extra always-visible key with logit 0 and value 0 in every
    cross-attention, the difference this repo's mmDiT is documented to make. `eps`: LayerNorm's and RMSNorm's
    epsilons (the reference's: torch's defaults)."""
    dim, cond_dim = sd["patchify.weight"].shape[0], sd["adaLN1.weight"].shape[1]
    b, _, H, W = x.shape
    h, w = H // patch, W // patch
    half = cond_dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half) / (half - 1))
    te = torch.empty(b, cond_dim)
    te[:, 0::2], te[:, 1::2] = torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)
    div = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(0, dim // 2, 2) / (dim // 2))
    gy, gx = torch.meshgrid(torch.arange(h) * (base_grid / h), torch.arange(w) * (base_grid / w), indexing="ij")
    gy, gx = gy.flatten()[:, None], gx.flatten()[:, None]
    pos = torch.zeros(h * w, dim)
    pos[:, 0:dim // 2:2], pos[:, 1:dim // 2:2] = torch.sin(gy * div), torch.cos(gy * div)
    pos[:, dim // 2::2], pos[:, dim // 2 + 1::2] = torch.sin(gx * div), torch.cos(gx * div)
    ln = lambda v: F.layer_norm(v, (dim,), eps=eps[0])  # noqa: E731
    lin = lambda v, name: F.linear(v, sd[f"{name}.weight"], sd[f"{name}.bias"])  # noqa: E731

    def attend(name, q_in, kv_in, key_mask=None):
        q, k, v = (rearrange(lin(src, f"{name}.{n}_proj"), "b n (h d) -> b h n d", h=heads)
                   for n, src in (("q", q_in), ("k", kv_in), ("v", kv_in)))
        q = F.rms_norm(q, (q.shape[-1],), sd[f"{name}.q_norm.weight"], eps=eps[1])
        k = F.rms_norm(k, (k.shape[-1],), sd[f"{name}.k_norm.weight"], eps=eps[1])
        if null_key and key_mask is not None:
            k, v = F.pad(k, (0, 0, 1, 0)), F.pad(v, (0, 0, 1, 0))
            key_mask = F.pad(key_mask, (1, 0), value=True)
        m = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        return lin(rearrange(out, "b h n d -> b n (h d)"), f"{name}.out_proj")

    tokens = rearrange(F.conv2d(x, sd["patchify.weight"], sd["patchify.bias"], stride=patch), "b c h w -> b (h w) c")
    tokens = tokens + pos
    cond = te + sd["cond_proj.weight"][labels] if labels is not None else te
    sbar = lin(F.silu(lin(te, "adaLN1_single")), "adaLN2_single") if labels is None else None
    for i in range(sum(1 for k in sd if k.endswith(".mlp.linear1.weight"))):
        blk = f"dit_blocks.{i}"
        mod = lin(F.silu(lin(cond, f"{blk}.adaLN1")), f"{blk}.adaLN2") if labels is not None else \
            sd[f"{blk}.adaLNembed"] + sbar
        g1, b1, g2, b2, a1, a2 = (c[:, None] for c in mod.chunk(6, dim=-1))
        y = ln(tokens) * (1 + g1) + b1
        tokens = a1 * attend(f"{blk}.attention.attention", y, y) + tokens
        if labels is None:
            tokens = tokens + attend(f"{blk}.cross_attention", tokens, text, mask)
        y = ln(tokens) * (1 + g2) + b2
        tokens = a2 * lin(F.silu(lin(y, f"{blk}.mlp.linear1")), f"{blk}.mlp.linear2") + tokens
    gamma, beta = (c[:, None] for c in lin(F.silu(lin(cond, "adaLN1")), "adaLN2").chunk(2, dim=-1))
    out = lin(ln(tokens) * (1 + gamma) + beta, "linear_out")
    return rearrange(out, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h, w=w, p1=patch, p2=patch)


def as_saved_by_the_reference(sd: dict[str, torch.Tensor]) -> dict:
    """Its train_stage*.py's checkpoint of a compiled TE model (models_fp8/): `_orig_mod.` keys, and te.Linear's
    `_extra_state` (a uint8 tensor, as tests/te_standin.py's stand-in writes it) after its linears."""
    from tests.te_standin import StandInTELinear

    extra = StandInTELinear(16, 16).get_extra_state()
    model = {f"_orig_mod.{k}": v for k, v in sd.items()}
    for k in list(sd):
        if k.endswith("_proj.weight") or k.endswith("linear1.weight") or k.endswith("adaLN2.weight"):
            model[f"_orig_mod.{k.rsplit('.', 1)[0]}._extra_state"] = extra.clone()
    return dict(model=model, model_ema={k: v + 0.01 for k, v in model.items()}, optimizer={}, step=300)


def test_the_reference_ccdit_imports_to_the_same_outputs(tmp_path):
    sd = reference_state("ccdit")
    torch.save(as_saved_by_the_reference(sd), tmp_path / "model_300.pt")
    out = tmp_path / "stage1.pt"
    proc = subprocess.run([sys.executable, "-m", "app.import_weights", str(tmp_path / "model_300.pt"), "--out",
                           str(out), "--input-size", "16", "--weights", "raw"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = load(out)
    meta = state["metadata"]
    assert meta["prediction"] == "velocity" and meta["num_classes"] == 5 and meta["model"]["time_scale"] == 1.0
    model = build_model(ModelConfig(**meta["model"])).eval()
    model.load_state_dict(state["ema"])
    labels = torch.tensor([0, 3, 5])  # 5: the null class
    for h, w in ((16, 16), (16, 24)):
        x, t, _, _ = batch(4, 24, h, w)
        with torch.no_grad():
            ours = model(x, t, labels=labels)
        want = reference_forward(sd, x, t, heads=2, patch=2, base_grid=8, labels=labels)
        assert want.abs().max() > 0.5
        torch.testing.assert_close(ours, want, atol=1e-4, rtol=0)
        # The whole difference is the norms' epsilons (1e-5 / machine epsilon there, 1e-6 here): with ours, exact.
        same_eps = reference_forward(sd, x, t, heads=2, patch=2, base_grid=8, labels=labels, eps=(1e-6, 1e-6))
        torch.testing.assert_close(ours, same_eps, atol=2e-6, rtol=0)


def test_the_reference_mmdit_imports_exactly_but_for_its_null_key(tmp_path):
    sd = reference_state("mmdit")
    for i in range(2):  # a null key of bias-only projections is then the documented logit-0, value-0 key
        sd[f"dit_blocks.{i}.cross_attention.k_proj.bias"].zero_()
        sd[f"dit_blocks.{i}.cross_attention.v_proj.bias"].zero_()
    torch.save(as_saved_by_the_reference(sd), tmp_path / "model_150000.pt")
    imp = import_weights(tmp_path / "model_150000.pt", ImportOptions(input_size=16, text_len=6))
    assert imp.config.family == "mmdit" and any("null key" in n for n in imp.notes)
    assert imp.metadata["tokenizer"]["id"] == "google/t5gemma-xl-xl-ul2"  # its encoder, recorded by id alone:
    assert any("without its vocabulary size" in n for n in imp.notes)   # nothing but weights was downloaded
    assert not torch.equal(imp.ema["blocks.0.embedding"], imp.model["blocks.0.embedding"])  # model_ema is `ema`
    model = build_model(imp.config).eval()
    model.load_state_dict(imp.model)
    x, t, text, mask = batch(4, 24, 16, 16)
    with torch.no_grad():
        ours = model(x, t, text=text, text_mask=mask)
    want = reference_forward(sd, x, t, 2, 2, 8, text=text, mask=mask, null_key=True, eps=(1e-6, 1e-6))
    torch.testing.assert_close(ours, want, atol=2e-6, rtol=0)
    without = reference_forward(sd, x[:2], t[:2], 2, 2, 8, text=text[:2], mask=mask[:2])
    assert (ours[:2] - without).abs().max() > 1e-3  # the null key is a real difference, as documented


# ---- what is refused ---------------------------------------------------------------------------------------------


def test_corrupt_and_mismatched_sources_are_refused_clearly(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "truncated.safetensors"
    save_file({"x_embedder.proj.weight": torch.zeros(8, 4, 2, 2)}, str(bad))
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(ImportSourceError, match="truncated.safetensors: not a readable safetensors file"):
        import_weights(bad)

    ref = stock_pixart()
    orig = original_from_diffusers(ref, 6)
    for key, expect in (("blocks.1.cross_attn.kv_linear.weight", r"missing .*blocks.1.cross_attn.kv_linear.weight"
                         r".* of PixArt-alpha's original layout"),):
        broken = dict(orig)
        del broken[key]
        save_file({k: v.contiguous() for k, v in broken.items()}, str(tmp_path / "broken.safetensors"))
        with pytest.raises(ImportSourceError, match=expect):
            import_weights(tmp_path / "broken.safetensors", ImportOptions(heads=2))
    extra = dict(orig, **{"blocks.0.attn.extra.weight": torch.zeros(3)})
    save_file({k: v.contiguous() for k, v in extra.items()}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ImportSourceError, match=r"unexpected \['blocks.0.attn.extra.weight'\]"):
        import_weights(tmp_path / "extra.safetensors", ImportOptions(heads=2))
    with pytest.raises(ImportSourceError, match=r"width 48 is no multiple of PixArt's head width 72: .*--heads"):
        import_weights(tmp_path / "extra.safetensors")

    save_file({"encoder.layer.0.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ImportSourceError, match=r"none of the layouts .*expected PixArt-alpha's .*reference's"):
        import_weights(tmp_path / "other.safetensors")

    folder = pipeline_folder(tmp_path / "mismatch", ref)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps(config | {"num_layers": 3}))
    with pytest.raises(ImportSourceError, match=r"does not fit diffusers' layout .*num_layers=3.*missing "
                                                r"\['transformer_blocks.2"):
        import_weights(folder)

    torch.save({"model": {"w": torch.zeros(2)}, "opaque": Path("a pickled object")}, tmp_path / "x.pt")
    with pytest.raises(ImportSourceError, match="x.pt: it holds Python objects other than tensors"):
        import_weights(tmp_path / "x.pt")
    with pytest.raises(ImportSourceError, match="no such file or folder, and not a Hub id"):
        import_weights(tmp_path / "nothing")


# ---- train.init_from -----------------------------------------------------------------------------------------------


def test_init_from_takes_a_diffusers_folder_and_fine_tunes_it_to_velocity(embedded_data, tmp_path):
    """train.init_from=<a PixArt pipeline folder>: imported in memory, the sizes carried from it (model=pixart alone),
    the first step starts from its weights; the checkpoint then predicts velocity and the sampler takes it."""
    from tests.stages import stage_config
    from trainer.loop import train

    ref = stock_pixart(in_channels=3, out_channels=6, sample_size=32, patch_size=4, attention_head_dim=16,
                       cross_attention_dim=32, caption_channels=384)
    folder = pipeline_folder(tmp_path / "pipe", ref)
    imp = import_weights(folder)
    cfg = stage_config(2, embedded_data, tmp_path / "run", "train.max_steps=1", f"train.init_from={folder}",
                       "model=pixart", "model.overrides.cond_dim=256", "train.prediction=velocity", "optim.lr=1e-12",
                       "train.ema.every=1")
    summary = train(cfg)
    state = load(Path(summary["checkpoint"]))
    assert state["metadata"]["prediction"] == "velocity" and state["metadata"]["model"]["caption_projection"]
    for k, v in imp.model.items():  # one step at lr 1e-12 from the imported weights
        torch.testing.assert_close(state["model"][k], v, atol=1e-6, rtol=0)
    assert images(Path(summary["checkpoint"])).shape[0] == 1
    from app.model_card import read_lineage

    lineage = read_lineage(Path(summary["checkpoint"]))  # an export's model card names the source, not a checkpoint
    assert len(lineage) == 1
    assert lineage[0].note == f"from {folder} (train.init_from, imported by app/import_weights.py)"


def test_which_init_from_sources_are_imported(tmp_path, monkeypatch):
    """train.init_from imports a Hub id, a .safetensors file, a model folder and a foreign .pt; this repo's own
    checkpoints and run folders are read as they always were (trainer/builders.py: read_init_checkpoint)."""
    from app.import_weights import is_importable
    from core.checkpoint import save_atomic

    monkeypatch.chdir(tmp_path)
    torch.save(as_saved_by_the_reference(reference_state("ccdit")), tmp_path / "model_300.pt")
    save_atomic(dict(model={}, ema={}, step=1, metadata=dict(model={}, conditioning="class")), tmp_path / "ours.pt")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    pipeline_folder(tmp_path / "pipe", stock_pixart())
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert is_importable("acme/some-model") and is_importable(tmp_path / "pipe")
    assert is_importable(tmp_path / "model_300.pt") and is_importable(tmp_path / "w.safetensors")
    assert not is_importable(tmp_path / "ours.pt") and not is_importable(tmp_path / "run")
    assert not is_importable("no/such/path/here")  # three parts: neither a path nor a Hub id
