"""Stage 1 -> Stage 2 re-parameterization: the mmDiT reproduces the ccDiT's null-class output."""

import pytest
import torch

from models import build_model, model_config
from reparameterize import ccdit_to_mmdit, parity, stage2_config
from tests.helpers import randomize_zero_inits


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
