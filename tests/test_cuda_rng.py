"""The CUDA RNG state a checkpoint keeps (trainer/checkpoint.py: rng_states, restore_rng_states) resumes where other
GPUs, or fewer, are visible than where it was saved: an 8-GPU node's checkpoint on 4 GPUs, on 1, under
CUDA_VISIBLE_DEVICES.

There is no GPU here, so `fake_cuda` stands in for the hardware only: it makes torch.cuda see `visible` devices,
each with a CPU generator as its default generator, CUDA initialised and one device current. torch's own
functions run unchanged on top (torch/cuda/random.py of torch 2.13): get_rng_state and set_rng_state take the
device's index, or the current device for an index-less one, and index torch.cuda.default_generators with it
(lines 38-41 and 69-73), so an index past the visible devices raises IndexError as on a GPU machine;
get_rng_state_all returns one state per device_count() (line 47) and set_rng_state_all sets device i to the i-th
state (lines 85-86)."""

import logging

import pytest
import torch

from trainer import checkpoint


@pytest.fixture
def fake_cuda(monkeypatch):
    """`fake_cuda(visible, current)`: torch.cuda with `visible` devices, `current` the current one."""

    def install(visible: int, current: int) -> tuple[torch.Generator, ...]:
        generators = tuple(torch.Generator().manual_seed(1000 + i) for i in range(visible))
        for module in (torch.cuda, torch.cuda.random):  # torch/cuda/random.py imports these names from torch.cuda
            monkeypatch.setattr(module, "device_count", lambda: visible)
            monkeypatch.setattr(module, "current_device", lambda: current)
            monkeypatch.setattr(module, "is_initialized", lambda: True)
            monkeypatch.setattr(module, "_lazy_init", lambda: None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "default_generators", generators)
        return generators

    return install


def test_a_checkpoint_of_an_8_gpu_node_resumes_on_4_gpus_and_on_1(fake_cuda):
    """Saved by the rank on cuda:5 of 8 visible GPUs; resumed by a rank on cuda:1 of 4, and on cuda:0 of 1 (what
    CUDA_VISIBLE_DEVICES=5 shows that rank): its generator continues from the saved state."""
    saved_on = fake_cuda(visible=8, current=5)
    torch.randn(3, generator=saved_on[5])  # the state moved on from its seed
    states = checkpoint.rng_states()
    expected = saved_on[5].get_state()
    for visible, current in ((4, 1), (1, 0)):
        resumed_on = fake_cuda(visible=visible, current=current)
        checkpoint.restore_rng_states(states)
        assert torch.equal(resumed_on[current].get_state(), expected)
        assert all(not torch.equal(g.get_state(), expected) for i, g in enumerate(resumed_on) if i != current)


def test_the_trainer_keeps_its_own_device_state(fake_cuda):
    """The trainer names its device (trainer/loop.py): the state of that device, not of the current one."""
    generators = fake_cuda(visible=4, current=0)
    states = checkpoint.rng_states(torch.device("cuda", 2))
    assert torch.equal(states["cuda"], generators[2].get_state())
    generators = fake_cuda(visible=4, current=0)
    checkpoint.restore_rng_states(states, torch.device("cuda", 3))
    assert torch.equal(generators[3].get_state(), states["cuda"])
    assert "cuda" not in checkpoint.rng_states(torch.device("cpu"))  # a CPU run keeps none


def test_a_checkpoint_that_kept_every_visible_device_still_loads(fake_cuda, caplog):
    """Checkpoints written before kept a list, one state per visible device: the rank's own entry is restored, and
    on a device the saving run did not see, nothing (with a warning) rather than an IndexError."""
    old = [torch.Generator().manual_seed(7 + i).get_state() for i in range(2)]
    states = dict(checkpoint.rng_states(torch.device("cpu")), cuda=old)
    generators = fake_cuda(visible=4, current=1)
    checkpoint.restore_rng_states(states)
    assert torch.equal(generators[1].get_state(), old[1])
    generators = fake_cuda(visible=4, current=3)
    before = generators[3].get_state()
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        checkpoint.restore_rng_states(states)
    assert torch.equal(generators[3].get_state(), before)
    assert "CUDA RNG states of 2 devices, none for cuda:3" in caplog.text
