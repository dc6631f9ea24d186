"""model=pixart (models/pixart.py) against diffusers' own PixArtTransformer2DModel, its place in the model contract,
one training step through the loop, and the Stage 1 -> pixart re-parameterization (models/conversion.py).

The parity reference is diffusers' module with the weights renamed by pixart_to_diffusers, called on diffusers'
conventions (timestep = 1000 (1 - t), output noise - data); nothing of this repo's forward runs on that side."""

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from models import ModelConfig, build_model, model_config
from models.conversion import ccdit_to_pixart, pixart_diffusers_config, pixart_to_diffusers
from tests.helpers import randomize_zero_inits

SMALL = dict(dim=32, depth=2, heads=2, in_channels=4, input_size=16, text_dim=24, text_len=6)


def pixart(**changes) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(model_config("pixart-debug/2", **(SMALL | changes))).eval()
    with torch.no_grad():  # off the adaLN-Zero init, whose zero gates would hide most of the network
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def stock(model) -> PixArtTransformer2DModel:
    ref = PixArtTransformer2DModel(**pixart_diffusers_config(model.config)).eval()
    missing, unexpected = ref.load_state_dict(pixart_to_diffusers(model.state_dict(), model.config), strict=True)
    assert not missing and not unexpected
    return ref


def inputs(cfg: ModelConfig, h: int, w: int, seed: int = 1):
    """A batch of 3 whose captions have 6, 2 and 0 real tokens (the last is a dropped caption)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, cfg.in_channels, h, w, generator=g)
    text = torch.randn(3, cfg.text_len, cfg.text_dim, generator=g)
    mask = torch.arange(cfg.text_len)[None] < torch.tensor([6, 2, 0])[:, None]
    return x, torch.tensor([0.1, 0.5, 0.9]), text, mask


@pytest.mark.parametrize("activation", ["gelu_tanh", "silu"])
@pytest.mark.parametrize("caption_projection", [False, True])
@pytest.mark.parametrize("size", [(16, 16), (32, 32), (16, 24)], ids=["base", "larger", "wider"])
def test_pixart_equals_diffusers_pixart_transformer(activation, caption_projection, size):
    model = pixart(activation=activation, caption_projection=caption_projection)
    ref = stock(model)
    x, t, text, mask = inputs(model.config, *size)
    with torch.no_grad():
        ours = model(x, t, text=text, text_mask=mask)
        theirs = ref(x, encoder_hidden_states=text, encoder_attention_mask=mask.float(),
                     timestep=1000 * (1 - t)).sample
    assert ours.abs().max() > 0.5  # a real output, not the zero of an untrained head
    torch.testing.assert_close(ours, -theirs, atol=1e-5, rtol=0)


def test_pixart_keeps_its_base_grid_at_a_new_resolution_as_diffusers_interpolates():
    """A later stage at 2x the input side keeps base_grid: the exported interpolation_scale makes diffusers'
    positions (base_size = sample_size // patch) the same, and PixArt-alpha's own scale 2 on top of that."""
    for scale in (1.0, 2.0):
        model = pixart(input_size=32, base_grid=8, interpolation_scale=scale)
        assert pixart_diffusers_config(model.config)["interpolation_scale"] == 2 * scale
        x, t, text, mask = inputs(model.config, 32, 32)
        with torch.no_grad():
            theirs = stock(model)(x, encoder_hidden_states=text, encoder_attention_mask=mask.float(),
                                  timestep=1000 * (1 - t)).sample
            torch.testing.assert_close(model(x, t, text=text, text_mask=mask), -theirs, atol=1e-5, rtol=0)


def test_a_fresh_pixart_outputs_zero_and_a_dropped_caption_is_finite():
    model = build_model(model_config("pixart-debug/2", **SMALL))
    x, t, text, mask = inputs(model.config, 16, 16)
    assert torch.equal(model(x, t, text=text, text_mask=mask), torch.zeros_like(x))  # adaLN-Zero
    with torch.no_grad():
        randomize_zero_inits(model)
    null = model.null_condition(3)
    assert not null["text_mask"].any() and torch.isfinite(model(x, t, **null)).all()


def test_prepared_captions_give_the_same_output():
    model = pixart(caption_projection=True, text_pad_multiple=4)
    x, t, text, mask = inputs(model.config, 16, 16)
    with torch.no_grad():
        prepared = model.prepare_condition(text, mask)
        torch.testing.assert_close(model(x, t, **prepared), model(x, t, text=text, text_mask=mask), atol=1e-6, rtol=0)
    assert prepared["text_kv"].shape[-2] == 8  # 6 tokens padded to a multiple of 4


def test_pixart_refuses_what_diffusers_cannot_express_and_other_families_its_options():
    for key, value in (("qk_norm", True), ("cond_dim", 64), ("rope", True), ("mlp_ratio", 2.0)):
        with pytest.raises(ValueError, match=f"model.overrides.{key}="):
            model_config("pixart-debug/2", **{key: value})
    with pytest.raises(ValueError, match="model.overrides.activation='gelu_tanh' is a pixart option"):
        model_config("mmdit-debug/2", activation="gelu_tanh")
    assert model_config("pixart-XL/2").cond_dim == 256  # the size's own cond_dim yields to diffusers' 256


def test_one_training_step_on_the_embedded_stage2_data(embedded_data, tmp_path):
    from core.checkpoint import load, model_weights
    from tests.stages import stage_config
    from trainer.loop import train

    cfg = stage_config(2, embedded_data, tmp_path, "train.max_steps=1", "train.init_from=null", "model=pixart",
                       "model.overrides.cond_dim=256", "train.prediction=velocity",
                       "+model.overrides.caption_projection=true")
    state = load(Path(train(cfg)["checkpoint"]))
    meta = state["metadata"]
    assert meta["model"]["family"] == "pixart" and meta["prediction"] == "velocity" and meta["name"] == "PixArt-debug/4"
    assert len(state["history"]) == 1 and torch.isfinite(torch.tensor(state["history"])).all()
    raw = model_weights(state, "raw")
    assert raw.keys() == build_model(ModelConfig(**meta["model"])).state_dict().keys()
    # adaLN-Zero starts the output projection at zero (so the first step's gradient reaches it alone): it moved.
    assert raw["final.linear.weight"].abs().max() > 0


# ---- Stage 1 -> pixart ------------------------------------------------------------------------------------------


def stage1(**changes):
    torch.manual_seed(0)
    cfg = model_config("ccdit-debug/4", **(dict(dim=32, depth=2, heads=2, cond_dim=32, in_channels=4, input_size=16)
                                            | changes))
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def converted(cc, **changes):
    px = model_config("pixart-debug/4", dim=32, depth=2, heads=2, in_channels=4, input_size=16, text_dim=24,
                      text_len=6, **({"activation": "silu"} | changes))
    state, inexact = ccdit_to_pixart(cc.state_dict(), cc.config, px, build_model(px).state_dict(), t_star=0.5)
    model = build_model(px).eval()
    model.load_state_dict(state)
    return model, inexact


def test_stage1_without_qk_norm_carries_into_pixart_exactly_at_t_star_for_any_caption():
    cc = stage1(qk_norm=False)
    px, inexact = converted(cc)
    assert inexact == ["the modulation tables away from t*=0.5"]
    x, _, text, mask = inputs(px.config, 16, 16)
    t = torch.full((3,), 0.5)
    null = torch.full((3,), cc.config.num_classes)
    with torch.no_grad():
        reference = cc(x, t, labels=null)
        assert reference.abs().max() > 0.5
        torch.testing.assert_close(px(x, t, text=text, text_mask=mask), reference, atol=1e-4, rtol=0)
        off = (px(x, torch.full((3,), 0.2), text=text, text_mask=mask) - cc(x, torch.full((3,), 0.2), labels=null))
    assert off.abs().max() > 1e-2  # off t* the final layer's table is not the ccDiT's modulation


def test_stage1_time_path_is_block0s_modulation_at_every_t():
    """adaLN-single's s(t) equals the ccDiT's block-0 modulation at the null class for every t (with the
    residual stream's halves swapped), though the pixart reads a 256-wide sinusoid of 1000 (1 - t)."""
    import torch.nn.functional as F

    cc = stage1(qk_norm=False)
    px, _ = converted(cc)
    t = torch.linspace(0, 1, 11)
    swap = torch.cat([torch.arange(16, 32), torch.arange(16)])
    with torch.no_grad():
        want = cc.blocks[0].adaLN(cc.t_embed(t) + cc.y_embed(torch.full((11,), cc.config.num_classes)))
        got = px.t_block(F.silu(px.t_embedder(px.t_embed(t))))
    torch.testing.assert_close(got, want.reshape(11, 6, 32)[..., swap].reshape(11, -1), atol=1e-4, rtol=0)


def test_what_cannot_carry_over_is_named():
    _, inexact = converted(stage1(qk_norm=True), activation="gelu_tanh")
    assert inexact[:2] == ["the attention (the ccDiT has QK-norm, pixart has none)",
                           "the MLPs (silu in the ccDiT, gelu_tanh here)"]
    cc = stage1(cond_dim=48)
    px, inexact = converted(cc)
    assert inexact[-1].startswith("the time path (left at px_init: cond_dim 48")
    with pytest.raises(ValueError, match=r"differ in \['depth'\]"):
        ccdit_to_pixart(cc.state_dict(), cc.config, dataclasses.replace(px.config, depth=3), {}, 0.5)


def test_reparameterize_cli_writes_a_pixart_stage2_init(tmp_path, capsys):
    """`reparameterize.py stage1-to-stage2 --family pixart`: an init a pixart Stage 2 loads, with what it could
    not carry exactly printed (the ccDiT's QK-norm and SiLU MLP here)."""
    import reparameterize
    from core.checkpoint import load, save_atomic
    from models import build_model, model_config

    cc = build_model(model_config("ccDiT-debug/4", num_classes=4))
    src = tmp_path / "stage1.pt"
    meta = dict(model=cc.config.to_dict(), family="ccdit", stage=1, conditioning="class", num_classes=4)
    save_atomic(dict(model=cc.state_dict(), ema=cc.state_dict(), step=1, metadata=meta), src)
    dst = tmp_path / "init.pt"
    reparameterize.main(["stage1-to-stage2", "--src", str(src), "--dst", str(dst), "--text-dim", "384",
                         "--text-len", "16", "--family", "pixart"])
    out = capsys.readouterr().out
    assert "QK-norm" in out and "PixArt-debug/4" in out
    init = load(dst)
    from models import ModelConfig

    px = build_model(ModelConfig(**init["metadata"]["model"]))
    assert px.config.family == "pixart"
    px.load_state_dict(init["ema"])  # strict: every pixart tensor is there
