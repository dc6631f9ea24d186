"""models/conversion.py:change_patch, the embedded Stages 4-5's resolution step: the patch grows with the image and
the token grid stays, so a larger image at the larger patch computes what its area-downsampled image computed.

The reference for the area downsampling is an independent construction: nearest-neighbour upsampling by the target
size, then average pooling by the source size, which is the box filter's definition at any ratio."""

import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.conversion import area_downsample_matrix, change_patch
from tests.helpers import conditioned_forward, randomize_zero_inits


def box_downsample(x: torch.Tensor, factor_num: int, factor_den: int) -> torch.Tensor:
    """Area downsampling of [b, c, H, W] by factor_den / factor_num (H * factor_num / factor_den pixels a side)."""
    return F.avg_pool2d(F.interpolate(x, scale_factor=factor_num, mode="nearest"), kernel_size=factor_den)


@pytest.mark.parametrize("src, dst", [(6, 4), (5, 4), (6, 5), (8, 4), (4, 4)])
def test_area_matrix_is_the_box_filter(src, dst):
    row = torch.randn(3, 1, 1, src, dtype=torch.float64)
    expected = box_downsample(row.expand(3, 1, dst * src, src), dst, src)[:, 0, 0]  # rows repeat: 1-D filter
    assert torch.allclose(row[:, 0, 0] @ area_downsample_matrix(src, dst).T, expected, atol=1e-12)


@pytest.mark.parametrize("name", ["ccDiT-debug/4", "mmDiT-debug/4", "JointDiT-debug/4", "pixart-debug/4"])
@pytest.mark.parametrize("patch", [6, 5])
def test_the_larger_image_at_the_larger_patch_computes_what_its_downsampled_image_did(name, patch):
    """Every family with a patch embedding and a (p q c) output layer: tokens of a 8 * patch px image are exactly the
    tokens of its area-downsampled 32 px image, so the output, area-downsampled, is the old model's output (float64)."""
    old = build_model(name).double().eval()
    randomize_zero_inits(old, std=0.2)  # trained-like: the output layer and every gate carry signal
    cfg, state = change_patch(old.state_dict(), old.config, patch)
    assert (cfg.patch, cfg.input_size, cfg.base_grid) == (patch, 8 * patch, 8)
    new = build_model(cfg).double().eval()
    new.load_state_dict(state)  # strict: names and shapes fit the new patch
    carried = [k for k in state if "patch_embed.proj" not in k and "final.linear" not in k]
    assert carried and all(state[k] is old.state_dict()[k] or torch.equal(state[k], old.state_dict()[k])
                           for k in carried)
    x, t = torch.randn(2, 3, 8 * patch, 8 * patch, dtype=torch.float64), torch.tensor([0.3, 0.8], dtype=torch.float64)
    small = box_downsample(x, 4, patch)
    with torch.no_grad():
        y_new, y_old = conditioned_forward(new, x, t), conditioned_forward(old, small, t)
    assert y_new.shape == x.shape
    assert torch.allclose(box_downsample(y_new, 4, patch), y_old, atol=1e-9)
    assert not torch.allclose(y_new, F.interpolate(y_old, size=x.shape[-2:], mode="nearest"), atol=1e-3)  # not a copy


def test_the_output_is_the_least_norm_patch_with_that_downsampling():
    """Among the 6x6 patches whose area downsampling is the old 4x4 output, the resampled layer gives the smallest:
    its output is orthogonal to the null space of the downsampling (D U = I with U = pinv(D))."""
    old = build_model("mmDiT-debug/4").double().eval()
    randomize_zero_inits(old, std=0.2)
    _, state = change_patch(old.state_dict(), old.config, 6)
    weight = state["final.linear.weight"].reshape(6, 6, 3, -1)
    down = area_downsample_matrix(6, 4)
    null = torch.linalg.svd(down).Vh[4:]  # [2, 6]: rows whose area downsampling is zero
    assert torch.einsum("Pp,pqcd->Pqcd", null, weight).abs().max() < 1e-12
    assert torch.allclose(torch.einsum("Pp,Qq,pqcd->PQcd", down, down, weight),
                          old.state_dict()["final.linear.weight"].reshape(4, 4, 3, -1), atol=1e-12)


def test_a_family_without_a_patch_embedding_is_refused_by_name():
    model = build_model("PixelDiT-debug/4")
    with pytest.raises(ValueError, match="pixeldit.*ccdit, mmdit, jointdit and pixart"):
        change_patch(model.state_dict(), model.config, 6)
