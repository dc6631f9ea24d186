from pathlib import Path

import pytest
import torch
from jaxtyping import install_import_hook

import tests.typecheck  # noqa: F401 (the hook names its checker by this dotted path)

# Shape annotations are checked in the test run only: every function of models/ imported from here on checks
# its jaxtyping annotations with beartype (tests/typecheck.py), so a wrong annotation or a wrong shape fails a
# test. (flow/ is not hooked: beartype cannot check its TimestepSampler Protocol, which is not runtime_checkable.)
install_import_hook("models", "tests.typecheck.beartype_unless_compiling")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA; elsewhere they are skipped with the reason, never silently dropped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def embedded_data(tmp_path_factory):
    """Small synthetic datasets in the layout the embedded stage configs read (tests/stages.py)."""
    from tests.stages import build_embedded_data

    return build_embedded_data(tmp_path_factory.mktemp("embedded-data"))


def perturb_weights(checkpoint: Path, std: float = 0.1) -> Path:
    """Gaussian noise of `std` added to the raw and the EMA weights of `checkpoint`, in place (atomically).

    Two steps leave adaLN-Zero's gates and the zero-initialised output head nearly closed, and the EMA nearer still:
    every sample would be a gray field of 127s and 128s whatever its seed, label or caption, and a front end that
    used the wrong one would pass every pixel comparison. With the noise, different seeds, labels and captions
    give different images (the tests that compare pixels assert it before they compare)."""
    from core.checkpoint import load, save_atomic

    state = load(checkpoint)
    g = torch.Generator().manual_seed(0)
    for key in ("model", "ema"):
        state[key] = {k: v + std * torch.randn(v.shape, generator=g).to(v.dtype) for k, v in state[key].items()}
    save_atomic(state, checkpoint)
    return checkpoint


@pytest.fixture(scope="session")
def stage1_checkpoint(embedded_data, tmp_path_factory):
    """A two-step Stage 1 (class-conditional ccDiT) checkpoint on the embedded data, for the front ends; its weights
    perturbed so that its samples depend on the seed and the label (perturb_weights)."""
    from tests.stages import stage_config
    from trainer.loop import train

    cfg = stage_config(1, embedded_data, tmp_path_factory.mktemp("stage1-run"), "train.max_steps=2")
    return perturb_weights(Path(train(cfg)["checkpoint"]))


@pytest.fixture(scope="session")
def stage2_checkpoint(embedded_data, tmp_path_factory):
    """A two-step Stage 2 (text-conditional mmDiT, from scratch) checkpoint on the embedded data; its weights
    perturbed so that its samples depend on the seed and the caption (perturb_weights)."""
    from tests.stages import stage_config
    from trainer.loop import train

    cfg = stage_config(2, embedded_data, tmp_path_factory.mktemp("stage2-run"), "train.max_steps=2",
                       "train.init_from=null")
    return perturb_weights(Path(train(cfg)["checkpoint"]))
