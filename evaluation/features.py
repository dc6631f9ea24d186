"""The feature networks the distribution metrics read images through, behind one interface.

A feature net is a module called on uint8 images [b, 3, h, w] that returns a dict of float features [b, d]:

    pool     what FID, precision and recall compare (Inception's pool_3, 2048-d)
    spatial  what sFID compares (Inception's mixed_6/conv, its first 7 channels over the 17 x 17 grid: 2023-d)
    logits   what the Inception Score reads (the 1008 ImageNet logits without the bias, as the original IS code)

`InceptionFeatures` is the real one: torch-fidelity's port of the TensorFlow Inception graph that TTUR's FID, the
improved-GAN IS and ADM's evaluator run [heusel2017fid, salimans2016improved, dhariwal2021adm], including TF 1.x's
bilinear resize to 299 px, so features come out as the TF graph computes them. Its weights
(weights-inception-2015-12-05-6726825d.pth, 91 MB, from torch-fidelity's GitHub release) are downloaded on first
use into torch's hub cache, or read from `weights=PATH` on a node without internet; either way the file must load
with `torch.load(weights_only=True)` before torch-fidelity is given it. Tests pass a small randomly initialised
module with the same interface (tests/eval_nets.py), and evaluation/scene_encoder.py is the embedded default's.
"""

from pathlib import Path
from typing import Protocol

import torch
from jaxtyping import Float, UInt8
from torch import Tensor, nn

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
SPATIAL_CHANNELS = 7
"""ADM's sFID keeps the first 7 of mixed_6/conv's 192 channels: 7 x 17 x 17 = 2023 features [nash2021sfid]."""


class FeatureNet(Protocol):
    def __call__(self, images: UInt8[Tensor, "b 3 h w"]) -> dict[str, Float[Tensor, "b d"]]: ...


def inception_weights(path: Path | str | None = None) -> Path:
    """The Inception weights file: `path`, or torch's hub cache, downloading it there first if absent."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--inception-weights {path}: no such file")
        return path
    target = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(INCEPTION_URL, str(target))  # written to a temporary name, then moved
        except Exception as err:  # no network on a compute node: say where the file must go
            raise OSError(f"cannot download the Inception weights ({err}); fetch {INCEPTION_URL} on a machine with "
                          f"internet and pass it with --inception-weights PATH, or put it at {target}") from err
    return target


class InceptionFeatures(nn.Module):
    """pool, spatial and logits of the FID Inception in one forward (module docstring)."""

    def __init__(self, weights: Path | str | None = None):
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as err:
            raise ImportError(f"the Inception metrics need torch-fidelity ({err}): pip install -e '.[eval]' with the "
                              "torchvision build of your torch (README, Evaluation)") from err
        path = inception_weights(weights)
        try:
            torch.load(path, map_location="cpu", weights_only=True)  # plain tensors only, before anyone unpickles it
        except Exception as err:
            raise ValueError(f"{path}: not a plain state dict of tensors ({type(err).__name__}); refusing it") from err
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(path))
        self._spatial: Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)  # TF's mixed_6/conv (after its ReLU)

    def _keep_spatial(self, module, inputs, output: Tensor) -> None:
        # NHWC order, as ADM flattens it (the Frechet distance does not depend on the order of the features).
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(output), -1).float()

    @torch.no_grad()
    def forward(self, images: UInt8[Tensor, "b 3 h w"]) -> dict[str, Float[Tensor, "b d"]]:
        pool, logits = self.net(images)
        spatial, self._spatial = self._spatial, None
        return dict(pool=pool, spatial=spatial, logits=logits)
