"""reparameterize.py: Stage 1 -> Stage 2 parity, resolution change, and nn.Linear <-> te.Linear layouts."""

import copy
import io
import logging
import os

import pytest
import torch
from torch import nn

import reparameterize
from core import checkpoint
from models import build_model, conversion, convert_linears, model_config
from models.embeddings import sincos_pos_embed_2d
from models.linear import default_fp8_filter
from reparameterize import (
    ccdit_to_mmdit,
    change_resolution,
    load_state_allowing_missing_extra_state,
    parity,
    stage2_config,
    te_to_torch_state,
    torch_to_te_state,
)
from tests.helpers import conditioned_forward, randomize_zero_inits, text_inputs


def trained_like_pair(t_star: float = 0.5):
    cc = build_model(model_config("ccDiT-debug/4", depth=3)).eval()
    randomize_zero_inits(cc, std=0.2)  # stands in for trained weights: every path carries signal
    mm_cfg = stage2_config(cc.config, text_dim=24, text_len=5)
    mm = build_model(mm_cfg).eval()
    mm.load_state_dict(ccdit_to_mmdit(cc.state_dict(), cc.config, mm_cfg, mm.state_dict(), t_star))
    return cc, mm


def test_exact_at_t_star_for_any_caption():
    cc, mm = trained_like_pair(t_star=0.5)
    diffs = parity(cc, mm, [0.5])
    assert diffs[0.5] < 1e-5  # float32 rounding only (about 1e-6 at this size)


def test_other_times_are_approximate_but_block_zero_and_final_layer_are_exact():
    cc, mm = trained_like_pair(t_star=0.5)
    assert parity(cc, mm, [0.1])[0.1] > 1e-4  # E_i is fitted at t* only
    t_emb = torch.randn(3, cc.config.cond_dim)
    e_null = cc.y_embed.table.weight[cc.config.num_classes]
    with torch.no_grad():
        torch.testing.assert_close(mm.t_block(t_emb), cc.blocks[0].adaLN(t_emb + e_null), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mm.final.adaLN(t_emb), cc.final.adaLN(t_emb + e_null), rtol=1e-5, atol=1e-5)


def test_the_trunk_is_copied():
    cc, mm = trained_like_pair()
    cc_state, mm_state = cc.state_dict(), mm.state_dict()
    shared = [k for k in cc_state if k in mm_state and "adaLN" not in k]
    assert "patch_embed.proj.weight" in shared and "blocks.2.mlp.fc2.weight" in shared
    assert "blocks.1.attn.norm.q.weight" in shared and "final.linear.weight" in shared
    assert all(torch.equal(cc_state[k], mm_state[k]) for k in shared)
    assert all(torch.count_nonzero(b.cross_attn.proj.weight) == 0 for b in mm.blocks)


def test_mismatched_trunk_is_a_clear_error():
    cc = build_model("ccDiT-debug/4")
    mm = build_model("mmDiT-debug/4", dim=128)
    with pytest.raises(ValueError, match="dim"):
        ccdit_to_mmdit(cc.state_dict(), cc.config, mm.config, mm.state_dict())


# ---------------------------------------------------------------------------------------------------------
# change-resolution


@pytest.mark.parametrize("name", ["ccDiT-debug/4", "mmDiT-debug/4", "JointDiT-debug/4"])
def test_change_resolution_is_exact_at_the_old_size_and_runs_at_the_new(name):
    old = build_model(name).eval()  # 32 px, patch 4: an 8x8 grid
    randomize_zero_inits(old, std=0.2)
    old_state = old.state_dict()
    new_cfg, new_state = change_resolution(old_state, old.config, 64)
    assert (new_cfg.input_size, new_cfg.base_grid) == (64, old.config.base_grid) == (64, 8)
    new = build_model(new_cfg).eval()
    new.load_state_dict(new_state)  # strict: same names and shapes
    assert all(new_state[k] is v for k, v in old_state.items())  # carried, not recomputed
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        # Same positions at the old grid:
        assert torch.equal(conditioned_forward(new, x, t), conditioned_forward(old, x, t))
        y = conditioned_forward(new, torch.randn(2, 3, 64, 64), t)
    assert y.shape == (2, 3, 64, 64) and torch.isfinite(y).all()


def test_even_tokens_of_the_doubled_grid_have_the_old_positions():
    old = build_model("mmDiT-debug/4").eval()
    new = build_model(change_resolution(old.state_dict(), old.config, 64)[0]).eval()
    new.load_state_dict(old.state_dict())
    dim, g = old.config.dim, old.config.input_size // old.config.patch
    with torch.no_grad():  # a zero image: each token is the conv bias plus its position
        tok_old = old.patch_embed(torch.zeros(1, 3, 32, 32))[0].reshape(g, g, dim)
        tok_new = new.patch_embed(torch.zeros(1, 3, 64, 64))[0].reshape(2 * g, 2 * g, dim)
    assert torch.equal(tok_new[::2, ::2], tok_old)
    # Closed form: token (r, c) of the 16x16 grid sits at (r/2, c/2) base-grid units; [sin|cos](y) | [sin|cos](x).
    pos = sincos_pos_embed_2d(dim, 2 * g, 2 * g, base_grid=g).reshape(2 * g, 2 * g, dim).double()
    omega = 1.0 / 10_000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    for r, c in [(0, 0), (2, 6), (5, 3), (15, 15)]:
        y, x = r / 2 * omega, c / 2 * omega
        expected = torch.cat([y.sin(), y.cos(), x.sin(), x.cos()])
        torch.testing.assert_close(pos[r, c], expected, rtol=0, atol=1e-6)


def test_input_size_not_divisible_by_the_patch_is_a_clear_error():
    model = build_model("mmDiT-debug/4")
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        change_resolution(model.state_dict(), model.config, 62)


def test_a_resolution_dependent_parameter_is_refused(monkeypatch):
    model = build_model("mmDiT-debug/4")
    real = conversion.state_shapes

    def with_learned_positions(cfg):  # as if the model had a learned [tokens, dim] position table
        shapes = real(cfg)
        shapes["pos_embed"] = torch.Size([(cfg.input_size // cfg.patch) ** 2, cfg.dim])
        return shapes

    monkeypatch.setattr(conversion, "state_shapes", with_learned_positions)
    state = dict(model.state_dict(), pos_embed=torch.zeros(64, model.config.dim))
    with pytest.raises(ValueError, match=r"depend on the resolution \(pos_embed: \(64, 64\) -> \(256, 64\)\)"):
        change_resolution(state, model.config, 64)


def test_a_state_dict_of_another_model_is_refused():
    model = build_model("mmDiT-debug/4", depth=3)
    with pytest.raises(ValueError, match="unexpected.*blocks.2"):
        change_resolution(model.state_dict(), build_model("mmDiT-debug/4").config, 64)


def _checkpoint(model, **extra) -> dict:
    """A checkpoint shaped like the trainer's: weights, EMA, an optimizer that has stepped, metadata."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(1, 3, 32, 32), torch.rand(1), *text_inputs(model.config, 1, [2])).square().mean().backward()
    opt.step()
    return dict(
        model=model.state_dict(),
        ema={k: v + 1 for k, v in model.state_dict().items()},
        optimizer=opt.state_dict(),
        step=7,
        metadata=dict(model=model.config.to_dict(), stage=3, space="pixel"),
        **extra,
    )


def test_change_resolution_cli_updates_metadata_and_keeps_the_rest(tmp_path, capsys):
    model = build_model("mmDiT-debug/4")
    randomize_zero_inits(model)
    src, dst = tmp_path / "stage3.pt", tmp_path / "stage4" / "init.pt"
    checkpoint.save_atomic(_checkpoint(model), src)
    reparameterize.main(
        ["change-resolution", "--src", str(src), "--dst", str(dst), "--input-size", "64", "--stage", "4"]
    )
    assert "8x8 -> 16x16 tokens" in capsys.readouterr().out
    before, after = checkpoint.load(src), checkpoint.load(dst)
    meta = after["metadata"]
    assert meta["stage"] == 4 and meta["space"] == "pixel"
    assert meta["model"] == dict(before["metadata"]["model"], input_size=64)  # base_grid 8 kept
    assert meta["resolution_changed_from"] == dict(input_size=32, checkpoint=str(src))
    for key in ("model", "ema"):
        assert (
            all(torch.equal(before[key][k], v) for k, v in after[key].items())
            and before[key].keys() == after[key].keys()
        )
    torch.testing.assert_close(after["optimizer"], before["optimizer"], rtol=0, atol=0)
    assert after["step"] == 7
    loaded, _ = checkpoint.load_model(dst)  # rebuilds the 64 px model from the metadata alone
    assert loaded.config.input_size == 64


def test_change_resolution_cli_error_is_one_line(tmp_path):
    src = tmp_path / "a.pt"
    checkpoint.save_atomic(_checkpoint(build_model("mmDiT-debug/4")), src)
    with pytest.raises(SystemExit, match="multiple of the patch size"):
        reparameterize.main(
            ["change-resolution", "--src", str(src), "--dst", str(tmp_path / "b.pt"), "--input-size", "30"]
        )


# ---------------------------------------------------------------------------------------------------------
# nn.Linear <-> te.Linear layouts, on CPU with a stand-in for te.Linear


def _fp8_meta_tensor(layer: nn.Linear) -> torch.Tensor:
    """What te.Linear's get_extra_state returns once FP8 ran: its scaling state pickled into a uint8 tensor."""
    buf = io.BytesIO()
    torch.save(dict(scale_fwd=torch.ones(3), amax_history=torch.rand(4, 3), tag=layer.out_features), buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


class FakeTELinear(nn.Linear):
    """nn.Linear with te.Linear's state-dict layout: `weight`, `bias`, then `_extra_state`. Half the layers
    hold an empty tensor (TE before any FP8 step), half a serialised scaling state."""

    def __init__(self, layer: nn.Linear, with_meta: bool):
        super().__init__(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            self.weight.copy_(layer.weight)
            if layer.bias is not None:
                self.bias.copy_(layer.bias)
        self.extra = _fp8_meta_tensor(layer) if with_meta else torch.tensor([])
        self.loaded_extra = None

    def get_extra_state(self):
        return self.extra

    def set_extra_state(self, state):
        self.loaded_extra = state


def te_like(model: nn.Module) -> nn.Module:
    """A copy of `model` with the layers `convert_linears` would pick swapped for FakeTELinear."""
    model = copy.deepcopy(model)
    chosen = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and default_fp8_filter(n, m)]
    for i, (name, layer) in enumerate(chosen):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, FakeTELinear(layer, with_meta=i % 2 == 0))
    return model


@pytest.fixture
def plain_and_te():
    plain = build_model("mmDiT-debug/4").eval()
    randomize_zero_inits(plain)
    return plain, te_like(plain)


def test_te_to_torch_drops_only_extra_state(plain_and_te, caplog):
    plain, te_model = plain_and_te
    te_state = te_model.state_dict()
    extra = [k for k in te_state if k.endswith("._extra_state")]
    # Per block: attn.qkv, attn.proj, cross_attn.q, .kv, .proj, mlp.fc1, .fc2 (adaLN and final stay nn.Linear).
    assert len(extra) == 7 * plain.config.depth
    with caplog.at_level(logging.INFO, logger="reparameterize"):
        out = te_to_torch_state(te_state)
    assert f"dropped {len(extra)} _extra_state entries" in caplog.text
    assert list(out) == list(plain.state_dict())  # same names, same order
    assert all(out[k] is te_state[k] for k in out)  # weights untouched
    fresh = build_model("mmDiT-debug/4")
    fresh.load_state_dict(out)  # strict
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), plain.state_dict().values(), strict=True))


def test_torch_to_te_without_te_returns_the_weights_and_the_loader_fills_the_rest(plain_and_te):
    plain, te_model = plain_and_te
    plain_state = plain.state_dict()
    state = torch_to_te_state(plain_state)
    assert list(state) == list(plain_state) and all(state[k] is v for k, v in plain_state.items())
    target = te_like(build_model("mmDiT-debug/4"))
    with pytest.raises(RuntimeError, match="_extra_state"):
        target.load_state_dict(state)  # strict loading wants TE's entries
    result = load_state_allowing_missing_extra_state(target, state)
    assert result.missing_keys and all(k.endswith("._extra_state") for k in result.missing_keys)
    assert not result.unexpected_keys
    assert all(torch.equal(target.state_dict()[k], v) for k, v in state.items())


def test_torch_to_te_with_a_te_model_loads_strictly_and_round_trips(plain_and_te):
    plain, te_model = plain_and_te
    te_state = te_model.state_dict()
    target = te_like(build_model("mmDiT-debug/4"))
    state = torch_to_te_state(te_to_torch_state(te_state), model_with_te=target)
    assert list(state) == list(target.state_dict())
    target.load_state_dict(state)  # strict
    assert all(torch.equal(state[k], te_state[k]) for k in state if not k.endswith("_extra_state"))
    layer = target.blocks[0].attn.qkv
    assert isinstance(layer, FakeTELinear) and torch.equal(layer.loaded_extra, layer.extra)  # the model's own
    assert not torch.equal(layer.loaded_extra, te_state["blocks.0.attn.qkv._extra_state"])
    # Entries already present win over the model's: a TE checkpoint passes through unchanged.
    again = torch_to_te_state(te_state, model_with_te=target)
    assert all(again[k] is te_state[k] for k in te_state)


def test_change_resolution_carries_te_extra_state(plain_and_te):
    plain, te_model = plain_and_te
    te_state = te_model.state_dict()
    _, state = change_resolution(te_state, plain.config, 64)
    assert state.keys() == te_state.keys() and all(state[k] is v for k, v in te_state.items())


def test_torch_to_te_refuses_a_model_of_another_shape(plain_and_te):
    plain, _ = plain_and_te
    wider = te_like(build_model("mmDiT-debug/4", dim=128))
    with pytest.raises(ValueError, match="differ in .* tensors"):
        torch_to_te_state(plain.state_dict(), model_with_te=wider)


def test_loader_rejects_any_other_missing_or_unexpected_key(plain_and_te):
    plain, te_model = plain_and_te
    state = plain.state_dict()
    target = te_like(build_model("mmDiT-debug/4"))
    before = {k: v.clone() for k, v in target.state_dict().items() if not k.endswith("_extra_state")}
    missing = {k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.weight"}
    with pytest.raises(RuntimeError, match=r"missing 1 \['blocks.1.mlp.fc2.weight'\]"):
        load_state_allowing_missing_extra_state(target, missing)
    with pytest.raises(RuntimeError, match=r"unexpected 1 \['blocks.9.attn.qkv.weight'\]"):
        load_state_allowing_missing_extra_state(target, dict(state, **{"blocks.9.attn.qkv.weight": torch.zeros(1)}))
    # Nothing was loaded by the refused calls.
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())
    # A TE checkpoint into a plain model: its unexpected _extra_state entries are fine.
    result = load_state_allowing_missing_extra_state(build_model("mmDiT-debug/4"), te_model.state_dict())
    assert result.unexpected_keys and all(k.endswith("._extra_state") for k in result.unexpected_keys)


def test_layout_cli_round_trip_keeps_weights_and_optimizer(plain_and_te, tmp_path, capsys):
    plain, te_model = plain_and_te
    ckpt = _checkpoint(te_model)
    n_extra = sum(k.endswith("._extra_state") for k in ckpt["model"])
    src, mid, back = tmp_path / "te.pt", tmp_path / "torch.pt", tmp_path / "te_again.pt"
    checkpoint.save_atomic(ckpt, src)
    reparameterize.main(["to-torch", "--src", str(src), "--dst", str(mid)])
    assert f"dropped {2 * n_extra} _extra_state entries" in capsys.readouterr().out
    converted = checkpoint.load(mid)
    assert converted["metadata"]["linear_layout"] == "torch"
    for key in ("model", "ema"):
        assert not any(k.endswith("_extra_state") for k in converted[key])
        assert all(torch.equal(v, ckpt[key][k]) for k, v in converted[key].items())
    torch.testing.assert_close(converted["optimizer"], ckpt["optimizer"], rtol=0, atol=0)
    model, _ = checkpoint.load_model(mid, weights="raw")  # strict load into a plain model
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())

    reparameterize.main(["to-te", "--src", str(mid), "--dst", str(back)])
    assert "weights written unchanged (no CUDA device)" in capsys.readouterr().out
    te_again = checkpoint.load(back)
    assert te_again["metadata"]["linear_layout"] == "te"
    assert all(torch.equal(v, converted["model"][k]) for k, v in te_again["model"].items())
    target = te_like(build_model("mmDiT-debug/4"))
    load_state_allowing_missing_extra_state(target, te_again["ema"])
    assert all(torch.equal(target.state_dict()[k], v) for k, v in te_again["ema"].items())


@pytest.mark.gpu
def test_real_te_checkpoint_converts_to_a_plain_model(tmp_path):
    pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed")
    ref = build_model("mmDiT-S/2").cuda()
    randomize_zero_inits(ref, std=0.02)
    te_model = build_model("mmDiT-S/2").cuda()
    te_model.load_state_dict(ref.state_dict())
    assert convert_linears(te_model, precision="fp8", device="cuda") > 0
    assert any(k.endswith("._extra_state") for k in te_model.state_dict())
    path = tmp_path / "te.pt"
    checkpoint.save_atomic(dict(model=te_model.state_dict()), path)
    state = te_to_torch_state(checkpoint.load(path)["model"])  # weights_only load of TE's extra state, too
    plain = build_model("mmDiT-S/2")
    plain.load_state_dict(state)  # strict
    assert all(
        torch.equal(a, b.cpu()) for a, b in zip(plain.state_dict().values(), ref.state_dict().values(), strict=True)
    )
    # And back: into a freshly converted model, strictly with the model's entries, or filled by TE on load.
    for use_model in (True, False):
        target = build_model("mmDiT-S/2").cuda()
        convert_linears(target, precision="fp8", device="cuda")
        if use_model:
            target.load_state_dict(torch_to_te_state(state, model_with_te=target))
        else:
            load_state_allowing_missing_extra_state(target, torch_to_te_state(state))
        weights = {k: v for k, v in target.state_dict().items() if not k.endswith("_extra_state")}
        assert all(torch.equal(weights[k].cpu(), v) for k, v in state.items())


# ---------------------------------------------------------------------------------------------------------
# The CLI against careless input: its source is never overwritten, arguments and weights are checked


def _stage1_file(path, mutate=None):
    """A Stage-1 ccDiT checkpoint shaped like the trainer's (weights, EMA, a stepped optimizer, RNG, loader
    state); `mutate(ckpt)` spoils it before it is written. Every subcommand accepts it."""
    model = build_model("ccDiT-debug/4")
    randomize_zero_inits(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(1, 3, 32, 32), torch.rand(1), labels=torch.tensor([1])).square().mean().backward()
    opt.step()
    ckpt = dict(
        model=model.state_dict(), ema={k: v.clone() for k, v in model.state_dict().items()},
        optimizer=opt.state_dict(), step=300, rng=torch.get_rng_state(), loader=dict(samples=2400),
        metadata=dict(model=model.config.to_dict(), stage=1),
    )
    if mutate is not None:
        mutate(ckpt)
    checkpoint.save_atomic(ckpt, path)
    return path


COMMANDS = {
    "stage1-to-stage2": ["--text-dim", "24", "--text-len", "5"],
    "change-resolution": ["--input-size", "64"],
    "to-torch": [],
    "to-te": [],
}


def _argv(command, src, dst, *extra):
    return [command, "--src", str(src), "--dst", str(dst), *COMMANDS[command], *extra]


def _same_path_spellings(tmp_path, src):
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.pt").symlink_to(src)
    os.link(src, tmp_path / "hard.pt")
    return [src, tmp_path / "sub" / ".." / src.name, tmp_path / "link.pt", tmp_path / "hard.pt"]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_dst_that_is_src_is_refused_even_with_force(command, tmp_path, capsys):
    src = _stage1_file(tmp_path / "step_00000300.pt")
    before = src.read_bytes()
    for dst in _same_path_spellings(tmp_path, src):
        for force in ([], ["--force"]):
            with pytest.raises(SystemExit) as info:
                reparameterize.main(_argv(command, src, dst, *force))
            assert info.value.code == 2
            err = capsys.readouterr().err
            assert f"argument --dst: {dst} is the same file as --src {src}" in err and "Traceback" not in err
    assert src.read_bytes() == before  # the training checkpoint, optimizer and RNG state included
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.pt", "link.pt", "step_00000300.pt", "sub"]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_existing_dst_is_kept_unless_force(command, tmp_path, capsys):
    src, dst = _stage1_file(tmp_path / "a.pt"), tmp_path / "b.pt"
    dst.write_bytes(b"someone's file")
    with pytest.raises(SystemExit) as info:
        reparameterize.main(_argv(command, src, dst))
    assert info.value.code == 2 and f"argument --dst: {dst} exists; pass --force" in capsys.readouterr().err
    assert dst.read_bytes() == b"someone's file"
    reparameterize.main(_argv(command, src, dst, "--force"))
    assert isinstance(checkpoint.load(dst)["model"], dict)


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_failed_write_leaves_no_temporary_file(command, existing, tmp_path, monkeypatch):
    src, dst = _stage1_file(tmp_path / "a.pt"), tmp_path / "b.pt"
    if existing:
        dst.write_bytes(b"the old file")

    def disk_full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit, match=f"argument --dst: cannot write {dst}: No space left on device") as info:
        reparameterize.main(_argv(command, src, dst, *(["--force"] if existing else [])))
    assert "\n" not in str(info.value.code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"] if existing else ["a.pt"]
    assert not existing or dst.read_bytes() == b"the old file"


@pytest.mark.parametrize(
    "command, extra, flag",
    [
        ("stage1-to-stage2", ["--t-star", "nan"], "--t-star"),
        ("stage1-to-stage2", ["--t-star", "inf"], "--t-star"),
        ("stage1-to-stage2", ["--t-star", "-0.1"], "--t-star"),
        ("stage1-to-stage2", ["--t-star", "1.5"], "--t-star"),
        ("stage1-to-stage2", ["--t-star", "half"], "--t-star"),
        ("stage1-to-stage2", ["--text-dim", "0"], "--text-dim"),
        ("stage1-to-stage2", ["--text-dim", "-24"], "--text-dim"),
        ("stage1-to-stage2", ["--text-len", "0"], "--text-len"),
        ("change-resolution", ["--input-size", "0"], "--input-size"),
        ("change-resolution", ["--input-size", "-64"], "--input-size"),
        ("change-resolution", ["--stage", "0"], "--stage"),
    ],
)
def test_bad_arguments_are_one_line_errors_naming_the_flag(command, extra, flag, tmp_path, capsys):
    src, dst = _stage1_file(tmp_path / "a.pt"), tmp_path / "b.pt"
    with pytest.raises(SystemExit) as info:
        reparameterize.main(_argv(command, src, dst, *extra))  # the later flag wins in argparse
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {flag}: " in err and "Traceback" not in err
    assert not dst.exists()


def test_an_input_size_that_does_not_tile_names_the_flag(tmp_path):
    src, dst = _stage1_file(tmp_path / "a.pt"), tmp_path / "b.pt"
    with pytest.raises(SystemExit, match="--input-size 30: .*multiple of the patch size 4"):
        reparameterize.main(["change-resolution", "--src", str(src), "--dst", str(dst), "--input-size", "30"])
    assert not dst.exists()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_missing_or_unreadable_src_is_one_line(command, tmp_path, capsys):
    for src, words in ((tmp_path / "missing.pt", "no such file"), (tmp_path, "not a file")):
        with pytest.raises(SystemExit) as info:
            reparameterize.main(_argv(command, src, tmp_path / "b.pt"))
        assert info.value.code == 2 and f"argument --src: {src}: {words}" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="junk.pt") as info:
        reparameterize.main(_argv(command, tmp_path / "junk.pt", tmp_path / "b.pt"))
    assert "\n" not in str(info.value.code) and not (tmp_path / "b.pt").exists()


def _poison(entry, key, value):
    def mutate(ckpt):
        ckpt[entry][key] = ckpt[entry][key].clone()
        ckpt[entry][key].view(-1)[3] = value

    return mutate


@pytest.mark.parametrize(
    "command, mutate, named",
    [
        ("stage1-to-stage2", _poison("ema", "blocks.1.mlp.fc2.weight", float("nan")), "['blocks.1.mlp.fc2.weight']"),
        ("change-resolution", _poison("model", "final.linear.weight", float("inf")), "model['final.linear.weight']"),
        ("to-torch", lambda c: c["optimizer"]["state"][0]["exp_avg"].view(-1).__setitem__(0, float("nan")),
         "optimizer['state'][0]['exp_avg']"),
        ("to-te", _poison("ema", "blocks.0.attn.qkv.weight", float("-inf")), "ema['blocks.0.attn.qkv.weight']"),
    ],
)
def test_non_finite_tensors_are_refused_naming_the_tensor(command, mutate, named, tmp_path, capsys):
    src, dst = _stage1_file(tmp_path / "a.pt", mutate), tmp_path / "b.pt"
    with pytest.raises(SystemExit) as info:
        reparameterize.main(_argv(command, src, dst))
    message = str(info.value.code)
    assert f"refusing to write {dst}" in message and named in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


def test_a_t_star_outside_zero_one_is_refused_by_the_function_too():
    cc = build_model("ccDiT-debug/4")
    mm_cfg = stage2_config(cc.config, text_dim=24, text_len=5)
    for t_star in (float("nan"), -0.5, 2.0):
        with pytest.raises(ValueError, match=r"t_star must be a finite number in \[0, 1\]"):
            ccdit_to_mmdit(cc.state_dict(), cc.config, mm_cfg, build_model(mm_cfg).state_dict(), t_star)


def test_stage1_to_stage2_is_a_function_of_its_inputs(tmp_path):
    """The Stage-2 tensors that Stage 1 lacks start from a seeded initialisation: the same --src and flags give the
    same init file whatever the process drew before, and another --seed gives other fresh tensors only."""
    import torch

    from core.checkpoint import load, save_atomic
    from models import build_model, model_config

    cc = build_model(model_config("ccDiT-debug/4", num_classes=4))
    src = tmp_path / "stage1.pt"
    meta = dict(model=cc.config.to_dict(), family="ccdit", stage=1, conditioning="class", num_classes=4)
    save_atomic(dict(model=cc.state_dict(), ema=cc.state_dict(), step=1, metadata=meta), src)

    def convert(name: str, *flags: str) -> dict:
        dst = tmp_path / name
        reparameterize.main(["stage1-to-stage2", "--src", str(src), "--dst", str(dst), "--text-dim", "384",
                             "--text-len", "16", *flags])
        return load(dst)["ema"]

    torch.manual_seed(123)
    first = convert("a.pt")
    torch.randn(1000)  # the process draws something else first: no effect on the file
    second = convert("b.pt")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other = convert("c.pt", "--seed", "1")
    changed = {k for k in first if not torch.equal(first[k], other[k])}
    assert changed and all(("cross_attn" in k and not k.endswith("proj.weight") and not k.endswith("proj.bias"))
                           or k == "null_text" for k in changed), changed
