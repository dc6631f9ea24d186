"""LoRA through peft on every model family (core/lora.py, trainer/lora.py): which layers are adapted, the adapted
model at B = 0 against its base, merged against unmerged and against the closed form W + alpha / r B A in float64,
the adapter folder's round trip (also through peft's own PeftModel loader), its errors, an FP8 base on the TE
stand-in, a bf16 base under autocast, and the pixart flavour's adapter in stock diffusers' PixArtTransformer2DModel.

References are independent of the code under test: the base model's own output, float64 matrix products, peft's
PeftModel.from_pretrained, and diffusers' module."""

import json
import re

import pytest
import torch
from torch import nn

from core import lora as core_lora
from core.checkpoint import CheckpointError
from models import build_model, model_config
from tests.helpers import randomize_zero_inits

SMALL = dict(dim=32, depth=2, heads=2, cond_dim=32, in_channels=4, input_size=8)
FAMILIES = [  # (name, conditioning, per-block linears the defaults adapt, family-specific extras)
    ("ccdit", "class", None, {}),
    ("mmdit", "text", 7, {}),
    ("pixart", "text", 7, {}),
    ("jointdit", "text", None, dict(num_registers=2)),
    ("pixeldit", "class", None, dict(pixel_dim=8, pixel_depth=1)),
    ("pixeldit", "text", None, dict(pixel_dim=8, pixel_depth=1)),
    ("mmpixeldit", "text", None, dict(pixel_dim=8, pixel_depth=1)),
]


def model_of(family: str, conditioning: str, seed: int = 0, **extra) -> nn.Module:
    torch.manual_seed(seed)
    fields = SMALL | dict(conditioning=conditioning) | extra
    if family == "pixart":
        fields.pop("cond_dim")  # diffusers' fixed 256
    fields |= dict(num_classes=4) if conditioning == "class" else dict(text_dim=16, text_len=4)
    patch = 4 if family in ("pixeldit", "mmpixeldit") else 2
    model = build_model(model_config(f"{family}-debug/{patch}", **fields)).eval()
    with torch.no_grad():
        randomize_zero_inits(model)  # off adaLN-Zero, whose closed gates would hide most of the network
    return model


def inputs(model: nn.Module, seed: int = 1) -> tuple:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.tensor([0.3, 0.8])
    if cfg.conditioning == "class":
        return x, t, dict(labels=torch.tensor([1, 3]))
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    return x, t, dict(text=torch.randn(2, cfg.text_len, cfg.text_dim, generator=g), text_mask=mask)


def adapted(model: nn.Module, rank: int = 4, alpha: float = 8.0, seed: int = 2) -> nn.Module:
    """`model` with LoRA on its default targets and random A and B (B starts at zero otherwise)."""
    core_lora.inject(model, core_lora.lora_config(rank, alpha, 0.0, core_lora.default_targets(model.config)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in core_lora.adapter_parameters(model).values():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize(("family", "conditioning", "per_block", "extra"), FAMILIES)
def test_default_targets_are_attention_and_mlp_linears_of_every_block(family, conditioning, per_block, extra):
    model = model_of(family, conditioning, **extra)
    targets = core_lora.default_targets(model.config)
    found = core_lora.matched_modules(model, targets)
    assert all(found.values()), {t: n for t, n in found.items() if not n}
    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    chosen = {n for names in found.values() for n in names}
    assert chosen <= linears
    # Every attention projection and MLP layer of every block, nothing else outside the blocks but, where the class
    # enters through adaLN (a ccDiT stream), every adaLN MLP that reads it: the blocks' and the final layer's.
    expected = {n for n in linears if ("attn." in n or "mlp." in n) and re.search(r"blocks\.\d+\.", n)}
    if family == "ccdit" or (family == "pixeldit" and conditioning == "class"):
        expected |= {n for n in linears if ".adaLN.fc" in n}
    assert chosen == expected, sorted(chosen ^ expected)
    if per_block is not None:
        assert len(chosen) == per_block * model.config.depth


@pytest.mark.parametrize(("family", "conditioning", "per_block", "extra"), FAMILIES)
def test_a_fresh_lora_is_its_base_and_only_adapters_train(family, conditioning, per_block, extra):
    """peft starts B at zero: the adapted model's output is the base's, bit for bit; only A and B require grad."""
    base = model_of(family, conditioning, **extra)
    x, t, cond = inputs(base)
    with torch.no_grad():
        reference = base(x, t, **cond)
    model = core_lora.inject(base, core_lora.lora_config(4, None, 0.0, core_lora.default_targets(base.config)))
    with torch.no_grad():
        assert torch.equal(model(x, t, **cond), reference)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == set(core_lora.adapter_parameters(model))
    assert all(not torch.count_nonzero(p) for n, p in model.named_parameters() if ".lora_B." in n)


@pytest.mark.parametrize(("family", "conditioning", "per_block", "extra"), FAMILIES[:4])
def test_merged_equals_unmerged_and_the_closed_form(family, conditioning, per_block, extra):
    model = adapted(model_of(family, conditioning, **extra), rank=4, alpha=8.0)
    x, t, cond = inputs(model)
    with torch.no_grad():
        unmerged = model(x, t, **cond)
    base = model_of(family, conditioning, **extra)  # the same seed: the same base weights
    lora_state = {n: p.detach().clone() for n, p in core_lora.adapter_parameters(model).items()}
    adapter = core_lora.Adapter(None, model.peft_config["default"], core_lora.to_file_names(lora_state), None)
    merged = core_lora.apply_adapter(base, adapter, scale=0.5 * 2)  # set_scale(1): alpha / r as trained
    assert not any(core_lora.is_adapter_parameter(n) for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, **cond), unmerged, atol=2e-5, rtol=0)
    # The closed form, in float64: W' = W + alpha / r * B A on each adapted layer.
    name = "blocks.1.mlp.fc1"
    fresh = model_of(family, conditioning, **extra)
    w = fresh.get_submodule(name).weight.double()
    a, b = (lora_state[f"{name}.lora_{k}.default.weight"].double() for k in "AB")
    torch.testing.assert_close(merged.get_submodule(name).weight.double(), w + 8.0 / 4 * b @ a, atol=1e-6, rtol=0)


def test_lora_scale_scales_the_update():
    """scale s: W + s alpha / r B A, so scale 0 is the base and scale 2 doubles the update."""
    model = adapted(model_of("mmdit", "text"))
    state = core_lora.to_file_names({n: p.detach() for n, p in core_lora.adapter_parameters(model).items()})
    adapter = core_lora.Adapter(None, model.peft_config["default"], state, None)
    name = "blocks.0.attn.qkv"
    w = model_of("mmdit", "text").get_submodule(name).weight.detach().double()
    delta = (state[f"{name}.lora_B.weight"].double() @ state[f"{name}.lora_A.weight"].double()) * 8.0 / 4
    for scale in (0.0, 2.0):
        merged = core_lora.apply_adapter(model_of("mmdit", "text"), adapter, scale=scale)
        torch.testing.assert_close(merged.get_submodule(name).weight.double(), w + scale * delta, atol=1e-6, rtol=0)


def record_for(model) -> core_lora.AdapterRecord:
    return core_lora.AdapterRecord(model=model.config.to_dict(), base=dict(path="base.pt", weights="ema",
                                   fingerprint=core_lora.weights_fingerprint(model_of("mmdit", "text").state_dict())))


def test_adapter_folder_round_trip_and_peft_reads_it(tmp_path):
    """save_adapter -> read_adapter -> applied to a fresh base equals the adapted model; peft's own loader
    (PeftModel.from_pretrained) reads the folder to the same output."""
    from peft import PeftModel

    model = adapted(model_of("mmdit", "text"))
    x, t, cond = inputs(model)
    with torch.no_grad():
        reference = model(x, t, **cond)
    folder = core_lora.save_adapter(tmp_path / "adapter", model.peft_config["default"],
                                    core_lora.adapter_parameters(model), record_for(model))
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    adapter = core_lora.read_adapter(folder)
    assert adapter.record.model == model.config.to_dict() and adapter.config.r == 4
    base = model_of("mmdit", "text")
    core_lora.check_fits(adapter, base, base.state_dict(), "--lora")  # same network, same weights: silent
    for merge in (False, True):
        out = core_lora.apply_adapter(model_of("mmdit", "text"), adapter, merge=merge)
        with torch.no_grad():
            torch.testing.assert_close(out(x, t, **cond), reference, atol=2e-5, rtol=0)
    peft_model = PeftModel.from_pretrained(model_of("mmdit", "text"), str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model.base_model.model(x, t, **cond), reference, atol=2e-5, rtol=0)


def test_an_adapter_for_another_network_or_a_broken_folder_is_refused(tmp_path, caplog):
    model = adapted(model_of("mmdit", "text"))
    folder = core_lora.save_adapter(tmp_path / "a", model.peft_config["default"], core_lora.adapter_parameters(model),
                                    record_for(model))
    wider = model_of("mmdit", "text", dim=64)
    with pytest.raises(CheckpointError, match=r"--lora .*another network.*dim 32 \(adapter\) != 64"):
        core_lora.check_fits(core_lora.read_adapter(folder), wider, None, "--lora")
    other = model_of("mmdit", "text", seed=5)  # same network, other weights: applies, with a warning
    core_lora.check_fits(core_lora.read_adapter(folder), other, other.state_dict(), "--lora")
    assert "trained on other weights" in caplog.text
    with pytest.raises(CheckpointError, match="no such folder"):
        core_lora.read_adapter(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="not a LoRA adapter"):
        core_lora.read_adapter(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | dict(peft_type="IA3")))
    with pytest.raises(CheckpointError, match="adapter_config.json: peft_type is 'IA3', not LORA"):
        core_lora.read_adapter(folder)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: not a readable safetensors file"):
        core_lora.read_adapter(folder)


def test_a_target_that_selects_nothing_names_the_layers_there_are():
    model = model_of("mmdit", "text")
    with pytest.raises(ValueError, match=r"\['attn.to_q'\] select no module .* blocks.\*.attn.qkv"):
        core_lora.inject(model, core_lora.lora_config(4, None, 0.0, ["attn.qkv", "attn.to_q"]))
    with pytest.raises(ValueError, match="not nn.Linear"):
        core_lora.inject(model_of("mmdit", "text"), core_lora.lora_config(4, None, 0.0, ["attn.norm"]))


@pytest.mark.parametrize("fuse_wgrad", [False, True])
def test_fp8_base_with_bf16_adapters_on_the_te_standin(monkeypatch, fuse_wgrad):
    """The trainer's order (trainer/lora.py): inject, convert with adapter_aware, freeze. The wrapped base layers
    become te.Linear, the adapters stay nn.Linear; an FP8 step gives the adapters gradients and the frozen te.Linear
    weights none, with no main_grad touched (TE's rule for a weight that does not require grad)."""
    from omegaconf import OmegaConf

    from tests import te_standin
    from trainer import lora as lora_training
    from trainer.main_grad import MainGrads
    from trainer.precision import Precision

    te_standin.install(monkeypatch)
    model = model_of("mmdit", "text", dim=64, heads=4)
    settings = lora_training.LoraSettings(rank=16, alpha=None, dropout=0.0, target_modules=None)
    core_lora.inject(model, settings.peft_config(model.config))
    precision = Precision(OmegaConf.create(dict(compute="fp32", fp8=True, fp8_recipe="current",
                                                keep_high_precision=None, fuse_wgrad_accumulation=fuse_wgrad)),
                          torch.device("cuda"))
    size = model.config.input_size  # the caption-side layers (5 rows a sample) stay bf16 for TE's shape rule
    converted = precision.convert(model, model.config, [(size, size)], adapted=lora_training.adapter_aware)
    lora_training.freeze_base(model)
    te = {n for n, m in model.named_modules() if isinstance(m, te_standin.Linear)}
    assert converted == len(te) > 0 and all(n.endswith(".base_layer") for n in te)
    assert {n.removesuffix(".base_layer") for n in te} >= {"blocks.0.attn.qkv", "blocks.1.mlp.fc2"}
    adapters = [m for n, m in model.named_modules() if n.endswith((".lora_A.default", ".lora_B.default"))]
    assert adapters and all(type(m) is nn.Linear for m in adapters)
    grads = MainGrads(model) if fuse_wgrad else None
    assert grads is None or not grads.params  # no fused weight requires grad
    for name in te:
        model.get_submodule(name).weight.main_grad = None  # TE would read it: an AttributeError-free trap
    model.train()
    x, t, cond = inputs(model)
    with precision.forward():
        out = model(x, t, **cond)
    out.float().square().mean().backward()
    assert all(model.get_submodule(n).weight.grad is None for n in te)
    assert all(model.get_submodule(n).weight.main_grad is None for n in te)
    lora_grads = {n: p.grad for n, p in core_lora.adapter_parameters(model).items()}
    assert all(g is not None for g in lora_grads.values())
    assert any(g.abs().sum() > 0 for n, g in lora_grads.items() if ".lora_B." in n)


def test_frozen_bf16_base_with_fp32_adapters_under_autocast():
    """store_frozen: the base in bf16, the adapters fp32; a forward and backward under bf16 autocast (on the CPU here,
    as the trainer runs it on CUDA) works and reaches the adapters alone."""
    from trainer import lora as lora_training

    for family, conditioning, _, extra in FAMILIES:
        model = adapted(model_of(family, conditioning, **extra))
        lora_training.freeze_base(model)
        changed = lora_training.store_frozen(model, torch.bfloat16)
        frozen = [p for p in model.parameters() if not p.requires_grad]
        assert changed == sum(p.numel() for p in frozen) and all(p.dtype == torch.bfloat16 for p in frozen)
        x, t, cond = inputs(model)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, **cond)
        out.float().square().mean().backward()
        assert all(p.grad is None for p in frozen), family
        assert all(p.grad is not None and p.dtype == torch.float32
                   for p in core_lora.adapter_parameters(model).values()), family


def test_pixart_adapter_in_stock_diffusers_equals_ours(tmp_path):
    """The pixart flavour: its adapter, written for diffusers' PixArtTransformer2DModel (export --format pixart
    --lora), loaded by peft into the stock transformer (diffusers' own load_lora_adapter is not on that class)
    gives the adapted model's output, unmerged and merged, on diffusers' conventions."""
    from diffusers import PixArtTransformer2DModel
    from peft import PeftModel

    from app.export import write_pixart_lora
    from models.conversion import pixart_diffusers_config, pixart_to_diffusers

    assert not hasattr(PixArtTransformer2DModel, "load_lora_adapter")  # what the export's docstring says
    base = model_of("pixart", "text")
    stock = PixArtTransformer2DModel(**pixart_diffusers_config(base.config)).eval()
    stock.load_state_dict(pixart_to_diffusers(base.state_dict(), base.config), strict=True)
    model = adapted(base)
    folder = core_lora.save_adapter(tmp_path / "adapter", model.peft_config["default"],
                                    core_lora.adapter_parameters(model), record_for(model))
    write_pixart_lora(core_lora.read_adapter(folder), model.config, tmp_path / "transformer_lora")
    x, t, cond = inputs(model)
    with torch.no_grad():
        ours = model(x, t, **cond)
        theirs_model = PeftModel.from_pretrained(stock, str(tmp_path / "transformer_lora")).eval()
        theirs = theirs_model(x, encoder_hidden_states=cond["text"], encoder_attention_mask=cond["text_mask"].float(),
                              timestep=1000 * (1 - t)).sample
        torch.testing.assert_close(ours, -theirs, atol=2e-5, rtol=0)
        merged = theirs_model.merge_and_unload()
        again = merged(x, encoder_hidden_states=cond["text"], encoder_attention_mask=cond["text_mask"].float(),
                       timestep=1000 * (1 - t)).sample
    torch.testing.assert_close(ours, -again, atol=2e-5, rtol=0)
    assert ours.abs().max() > 0.1
