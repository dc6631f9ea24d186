"""Joint attention passes SDPA a mask only where something is masked (models/attention.py): the class-conditional
JointDiT and MM-PixelDiT give F.scaled_dot_product_attention attn_mask=None, which its FlashAttention-2 kernel
needs (flash takes no mask at all), and compute what the all-visible mask computes; captions keep their mask."""

import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.attention import JointAttention
from tests.helpers import randomize_zero_inits, text_inputs

REAL_SDPA = F.scaled_dot_product_attention


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every F.scaled_dot_product_attention call's attn_mask, recorded; the real SDPA computes."""
    masks = []

    def spy(q, k, v, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return REAL_SDPA(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return masks


def with_a_visible_mask(q, k, v, attn_mask=None, **kwargs):
    """SDPA with the mask path taken where no mask was given: every key visible (the reference)."""
    if attn_mask is None:
        attn_mask = torch.ones(q.shape[0], 1, 1, k.shape[2], dtype=torch.bool)
    return REAL_SDPA(q, k, v, attn_mask=attn_mask, **kwargs)


def test_joint_attention_without_a_mask_is_the_all_visible_mask():
    torch.manual_seed(0)
    attn = JointAttention(32, 4).double()
    x, context = torch.randn(2, 9, 32, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
    without = attn(x, context, None)
    visible = attn(x, context, torch.ones(2, 5, dtype=torch.bool))
    for a, b in zip(without, visible, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["JointDiT-debug/4", "MMPixelDiT-debug/16"])
def test_class_conditional_joint_models_give_sdpa_no_mask(name, sdpa_calls, monkeypatch):
    model = build_model(name, conditioning="class", num_classes=4).double().eval()
    randomize_zero_inits(model)
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen, dtype=torch.float64)
    t, labels = torch.rand(2, generator=gen, dtype=torch.float64), torch.tensor([1, cfg.num_classes])  # one null
    with torch.no_grad():
        out = model(x, t, labels=labels)
    assert sdpa_calls and all(mask is None for mask in sdpa_calls)
    monkeypatch.setattr(F, "scaled_dot_product_attention", with_a_visible_mask)
    with torch.no_grad():
        reference = model(x, t, labels=labels)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)


def test_captions_keep_their_mask(sdpa_calls):
    """Padded caption tokens are hidden (their padding is known only on the device: no mask-free shortcut)."""
    model = build_model("JointDiT-debug/4").eval()
    randomize_zero_inits(model)
    text, mask = text_inputs(model.config, 2, [3, 5])
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32), torch.rand(2), text=text, text_mask=mask)
    joint = [m for m in sdpa_calls if m is not None]
    assert len(joint) == len(sdpa_calls) == model.config.depth
    registers = model.config.num_registers
    assert torch.equal(joint[0][:, 0, 0, registers:registers + text.shape[1]], mask)
