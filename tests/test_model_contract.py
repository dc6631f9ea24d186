"""The model contract (models/base.py) across every family x conditioning.

First of all the golden test: every family must stay the model of main (names, shapes and order of the
state_dict, the global RNG's draws, exactly; the initial values, the forward pass and the gradients within
tolerances that CPU kinds and thread counts stay well inside); tests/model_golden.py holds the fingerprints and says
how they were taken."""

import contextlib
import re
from collections.abc import Iterator

import jaxtyping
import pytest
import torch
from jaxtyping import TypeCheckError
from torch import nn

from core.conditioning import ClassConditioning
from models import DiffusionTransformer, ModelConfig, build_model
from models.attention import CrossAttention, JointAttention
from models.embeddings import check_labels
from models.layers import modulate
from tests.helpers import randomize_zero_inits
from tests.model_golden import CASES, GOLDEN, SMALL, TOLERANCE, case_inputs, differences, fingerprint


@pytest.mark.parametrize("case", list(CASES))
def test_every_family_is_the_model_of_main(case):
    now, then = fingerprint(case), GOLDEN[case]
    assert now["state"] == then["state"], "the state_dict's names, shapes or order changed"
    assert now["buffers"] == then["buffers"]
    assert now["rng_after_build"] == then["rng_after_build"], "the build drew a different amount from the global RNG"
    names = [s.split()[0] for s in now["state"]]
    changed = {n: d for n, a, b in zip(names, now["values"], then["values"], strict=True)
               if (d := differences(a, b, TOLERANCE["values"]))}
    assert not changed, f"initial values differ (entry, now, then): {changed}"
    for size, a, b in zip(("square", "wide"), now["outputs"], then["outputs"], strict=True):
        assert not (d := differences(a, b, TOLERANCE["outputs"])), f"the {size} forward pass changed: {d}"
    assert list(now["grads"]) == list(then["grads"]), "other parameters have gradients"
    changed = {n: d for n in now["grads"] if (d := differences(now["grads"][n], then["grads"][n], TOLERANCE["grads"]))}
    assert not changed, f"the gradients changed (entry, now, then): {changed}"


# ---- the contract itself -----------------------------------------------------------------------------------


def small_model(case: str, **changes) -> DiffusionTransformer:
    return build_model(ModelConfig(**(SMALL | CASES[case] | changes)))


@pytest.mark.parametrize("case", list(CASES))
def test_every_family_names_its_blocks_and_config(case):
    model = small_model(case)
    cfg = model.config
    assert isinstance(model, DiffusionTransformer) and cfg.family == CASES[case]["family"]
    assert len(model.blocks) == cfg.depth + (cfg.pixel_depth if cfg.is_pixel_family else 0)
    # The blocks are the model's own modules (so compiling or checkpointing them acts on the model), distinct,
    # and together they hold every parameter named blocks.* / pixel_blocks.*.
    own = {id(p): n for n, p in model.named_parameters()}
    in_blocks = [own[id(p)] for block in model.blocks for p in block.parameters()]
    assert len(in_blocks) == len(set(in_blocks))
    assert set(in_blocks) == {n for n in own.values() if re.match(r"(semantic\.)?(blocks|pixel_blocks)\.", n)}


@pytest.mark.parametrize("case", list(CASES))
def test_conditioning_by_keyword_or_position_and_a_clear_error_otherwise(case):
    model = small_model(case).eval()
    randomize_zero_inits(model)
    x, t, cond = case_inputs(model.config, 16, 16)
    with torch.no_grad():
        by_keyword = model(x, t, **cond)
        assert torch.equal(model(x, t, *cond.values()), by_keyword)
    other = dict(text=torch.zeros(3, 2, SMALL["text_dim"]), text_mask=torch.ones(3, 2, dtype=torch.bool))
    if model.config.conditioning == "text":
        other = dict(labels=torch.zeros(3, dtype=torch.long))
    expected = "labels=" if model.config.conditioning == "class" else "text= and text_mask="
    with pytest.raises(TypeError, match=f"takes {expected}"):
        model(x, t, **other)
    with pytest.raises(TypeError, match=f"takes {expected}"):
        model(x, t)


@pytest.mark.parametrize("case", list(CASES))
def test_null_condition_is_the_unconditional_input(case):
    model = small_model(case).eval()
    randomize_zero_inits(model)
    cfg = model.config
    x, t, cond = case_inputs(cfg, 16, 16)
    null = model.null_condition(3, "cpu")
    with torch.no_grad():
        out = model(x, t, **null)
        assert (out - model(x, t, **cond)).abs().max() > 1e-3
        if cfg.conditioning == "class":
            # The trainer's null condition (dropout, guidance) is the same class.
            assert torch.equal(out, model(x, t, **ClassConditioning(cfg.num_classes, None, 0.0).null(3, "cpu")))
            assert model.null_label == cfg.num_classes
        else:
            # An all-False mask hides every token: any caption of any length gives the same output.
            text = torch.randn(3, 4, cfg.text_dim)
            other = model(x, t, text=text, text_mask=torch.zeros(3, 4, dtype=torch.bool))
            torch.testing.assert_close(out, other, rtol=1e-5, atol=1e-5)
            assert null["text"].dtype == torch.float32  # the model's dtype
            assert model.to(torch.bfloat16).null_condition(1)["text"].dtype == torch.bfloat16
            assert not hasattr(model, "null_label")


def test_check_labels_accepts_the_classes_and_the_null_class_only():
    model = small_model("ccdit/class")
    assert model.check_labels([0, 4, 5]) == [0, 4, 5]  # 5 classes; 5 is the null class
    for bad in ([6], [-1], [0, 7], [True], [1.0]):
        with pytest.raises(ValueError, match=r"train\.preview\.labels .* out of range 0\.\.5 .*5 is the null class"):
            check_labels(bad, 5, "train.preview.labels")
        with pytest.raises(ValueError, match="labels"):
            model.check_labels(bad)


# ---- shapes are checked in the test run (tests/conftest.py) ------------------------------------------------


def test_a_wrong_shape_that_torch_would_broadcast_fails_the_annotation():
    model = small_model("ccdit/class")
    x, t, cond = case_inputs(model.config, 16, 16)
    # One time for a batch of three broadcasts silently in the model; the forward's "b c H W" / "b" catches it.
    with pytest.raises(TypeCheckError, match="forward"):
        model(x, t[:1], **cond)
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        assert model(x, t[:1], **cond).shape == x.shape  # what happens unchecked
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)
    with pytest.raises(TypeCheckError, match="modulate"):
        modulate(torch.zeros(2, 5, 8), torch.zeros(1, 8), torch.zeros(1, 8))
    with pytest.raises(TypeCheckError):
        model(x, t, labels=cond["labels"].float())  # labels must be integers


# ---- text padding for FP8 (model.text_pad_multiple) --------------------------------------------------------

TEXT_SIDE = ("cross_attn.kv", "context_embed", "context_qkv", "context_proj", "context_mlp")
"""The linears that run over the text-side sequence (mmDiT's keys, JointDiT's context stream)."""


@contextlib.contextmanager
def text_side_rows(model: nn.Module) -> Iterator[dict[str, int]]:
    """Rows (the product of the leading dims) each text-side linear sees, counted by forward hooks."""
    rows: dict[str, int] = {}

    def count(name: str):
        return lambda _, args, __: rows.__setitem__(name, args[0].numel() // args[0].shape[-1])

    hooks = [m.register_forward_hook(count(n)) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(k in n for k in TEXT_SIDE)]
    try:
        yield rows
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("case", ["mmdit/text", "jointdit/text", "jointdit/class", "pixeldit/text",
                                  "mmpixeldit/text"])
def test_text_padding_leaves_the_output_and_makes_every_text_side_gemm_a_multiple_of_16(case):
    plain = small_model(case, text_len=120).eval()
    randomize_zero_inits(plain)
    padded = small_model(case, text_len=120, text_pad_multiple=16).eval()
    padded.load_state_dict(plain.state_dict())  # padding adds no parameter
    cfg = plain.config
    for batch in (1, 3, 5):
        g = torch.Generator().manual_seed(batch)
        x, t = torch.randn(batch, 3, 16, 16, generator=g), torch.rand(batch, generator=g)
        if cfg.conditioning == "class":
            cond = dict(labels=torch.arange(batch) % (cfg.num_classes + 1))
        else:
            valid = torch.randint(0, 121, (batch,), generator=g)
            cond = dict(text=torch.randn(batch, 120, cfg.text_dim, generator=g),
                        text_mask=torch.arange(120)[None] < valid[:, None])
        with torch.no_grad(), text_side_rows(padded) as rows, text_side_rows(plain) as unpadded:
            torch.testing.assert_close(padded(x, t, **cond), plain(x, t, **cond), rtol=1e-5, atol=1e-6)
        assert rows and all(r % (16 * batch) == 0 for r in rows.values()), rows  # per sample: any batch
        if batch == 1:  # without padding some are not: 121 keys, 2 + 120 or 2 + 1 context rows
            assert any(r % 16 for r in unpadded.values()), unpadded


@pytest.mark.parametrize("case", ["mmdit/text", "jointdit/text"])
def test_padded_text_positions_are_masked(case):
    model = small_model(case, text_pad_multiple=16).eval()
    attention = [m for m in model.modules() if isinstance(m, CrossAttention | JointAttention)]
    masks = []
    hooks = [m.register_forward_pre_hook(lambda _, args: masks.append(args[2])) for m in attention]
    x, t, cond = case_inputs(model.config, 16, 16)  # 6 tokens, of which 6, 2 and 0 are real
    with torch.no_grad():
        model(x, t, **cond)
    for h in hooks:
        h.remove()
    lead = 1 if case == "mmdit/text" else SMALL["num_registers"]  # the null token, or the registers
    expected = torch.zeros(3, 16, dtype=torch.bool)
    expected[:, :lead] = True
    expected[:, lead:lead + 6] = cond["text_mask"]
    assert len(masks) == len(attention) and all(torch.equal(m, expected) for m in masks)


def test_text_pad_multiple_must_be_positive():
    with pytest.raises(ValueError, match="model.text_pad_multiple"):
        ModelConfig(**SMALL, family="mmdit", text_pad_multiple=0)
