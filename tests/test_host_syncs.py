"""A training step never waits for the GPU: nothing in `Trainer.train_step` reads a device tensor back to the host.
Losses, gradient norms and stop flags are read only at the sync points trainer/loop.py declares (`Trainer.sync`,
outside the step); the skip of a non-finite step is decided on the device.

There is no GPU here, so the test runs the step on the CPU and models where each tensor would live on CUDA
(`DeviceModel`, a TorchDispatchMode, with the few Tensor methods that read data without dispatching an op):

* Host tensors are the loader's batch (pinned by the DataLoader on CUDA: `pin_memory` is on there, data/loader.py)
  and what host-only ops make of it. Everything else is on the device: parameters, gradients, optimizer and EMA
  state, every factory (the step creates its tensors with `device=`), and any op with a device input.
* The step's device is `torch.device("cpu", 0)`, so `.to(device)` is told from a move to the host: a copy to it
  of a host tensor is an upload, which is free for the host only with `non_blocking=True` from pinned memory (CUDA
  makes a pageable or blocking copy wait for the stream; a host op on the batch makes an unpinned tensor).
* A sync is: an op whose value or size only the host can know, on a device tensor (`_local_scalar_dense`, which
  `.item()`, `bool()`, `float()`, `int()` and `if tensor:` dispatch; `nonzero`, `masked_select`, `unique`, boolean
  indexing, `equal`, `repeat_interleave` without a size), `.cpu()`, `.numpy()`, `.tolist()` and `.to("cpu")` of a
  device tensor, and a blocking upload.

The un-fused optimizer (the CPU default) reads its gradient norm back by design (trainer/loop.py's docstring: on
a CPU that costs nothing), so the step is run as on CUDA, with `optim.fused=true`: torch's fused AdamW runs on the
CPU too and takes `found_inf` as the CUDA kernel does (an update skipped on the device), which is the path whose
decisions must stay on the device. Not modelled: what only a CUDA runtime does (allocator retries, an explicit
torch.cuda.synchronize); `.to(tensor.device)` of a device tensor, a no-op on CUDA, cannot be told from a move to
the host here and is not counted.
"""

import traceback
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from core.text_encoder import FrozenTextEncoder
from tests.stages import ROOT, stage_config
from trainer import distributed
from trainer.loop import Trainer

aten = torch.ops.aten
STEP_DEVICE = torch.device("cpu", 0)
READS = {
    aten._local_scalar_dense.default: "a value read on the host (.item(), bool(), float(), int(), `if tensor:`)",
    aten.nonzero.default: "nonzero (its size is known on the host only)",
    aten.masked_select.default: "masked_select (its size is known on the host only)",
    aten._unique2.default: "unique (its size is known on the host only)",
    aten.unique_dim.default: "unique (its size is known on the host only)",
    aten.unique_consecutive.default: "unique_consecutive (its size is known on the host only)",
    aten.repeat_interleave.Tensor: "repeat_interleave without output_size",
    aten.equal.default: "torch.equal (a host bool)",
    aten.is_nonzero.default: "bool() of a tensor",
}
BOOLEAN_INDEXING = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default)


class DeviceModel(TorchDispatchMode):
    """Records every host read of a device tensor while active (see the module docstring for the model)."""

    def __init__(self):
        super().__init__()
        self.host = WeakIdKeyDictionary()  # host tensor -> pinned
        self.reads: list[str] = []
        self.loading = False

    def record(self, what: str) -> None:
        """`what`, where this repository's code asked for it and, when the read is in a library torch does not
        ship, in which of its files."""
        stack = traceback.extract_stack()[:-2]
        repo = [i for i, f in enumerate(stack) if f.filename.startswith(str(ROOT)) and "/site-packages/" not in
                f.filename]
        ours = [stack[i] for i in repo if "/tests/" not in stack[i].filename]
        where = f"{Path(ours[-1].filename).relative_to(ROOT)}:{ours[-1].lineno}" if ours else "?"
        library = [f.filename.split("/site-packages/")[1] for f in stack[repo[-1] + 1 if repo else 0:]
                   if "/site-packages/" in f.filename and "/site-packages/torch/" not in f.filename]
        self.reads.append(f"{where}: {what}" + (f" (in {library[-1]})" if library else ""))

    def on_host(self, tensor: torch.Tensor) -> bool:
        return self.loading or tensor in self.host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        device_inputs = [t for t in tensors if not self.on_host(t)]
        if func in READS and device_inputs:
            self.record(READS[func])
        if func in BOOLEAN_INDEXING and device_inputs and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in tree_leaves(args[1])):
            self.record("boolean indexing (its size is known on the host only)")
        upload = func is aten._to_copy.default and kwargs.get("device") == STEP_DEVICE
        if upload and tensors and self.on_host(tensors[0]):
            if not kwargs.get("non_blocking"):
                self.record("a blocking host-to-device copy (non_blocking=False)")
            elif not self.host[tensors[0]]:
                self.record("a host-to-device copy of unpinned memory (a host op made it; upload the batch first)")
        out = func(*args, **kwargs)
        if tensors and not device_inputs and not upload:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.host[t] = False
        return out

    @contextmanager
    def methods(self):
        """The Tensor methods that read data without an op (on a CPU tensor), checked while the mode is on."""

        def reading(name: str):
            real = getattr(torch.Tensor, name)

            def method(tensor, *args, **kwargs):
                if not self.on_host(tensor):
                    self.record(f".{name}() of a device tensor")
                out = real(tensor, *args, **kwargs)
                if isinstance(out, torch.Tensor):  # on the host now; a copy, as on CUDA (here .cpu() is itself)
                    out = out.clone() if out is tensor else out
                    self.host[out] = False
                return out

            return method

        real_to = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
            named = [a for a in (*args, kwargs.get("device")) if isinstance(a, str)]
            if device == torch.device("cpu") and "cpu" in named and not self.on_host(tensor):
                self.record('.to("cpu") of a device tensor')
            return real_to(tensor, *args, **kwargs)

        with ExitStack() as stack:
            for name in ("cpu", "numpy", "tolist"):
                stack.enter_context(mock.patch.object(torch.Tensor, name, reading(name)))
            stack.enter_context(mock.patch.object(torch.Tensor, "to", to))
            yield

    def loader(self, batches):
        """The trainer's batches, fetched with the model off (the loader works on the host) and marked pinned."""
        while True:
            self.loading = True
            try:
                with _disable_current_modes():
                    batch = next(batches)
            finally:
                self.loading = False
            for value in batch.values():
                self.host[value] = True
            yield batch


def reads_of_two_steps(trainer: Trainer) -> list[str]:
    """The host reads of steps 0 and 1 (the first builds the optimizer's state) of `trainer`, run as on CUDA."""
    model = DeviceModel()
    trainer.batches = model.loader(trainer.batches)
    trainer.device = STEP_DEVICE
    trainer.start_clock()
    with model.methods(), mock.patch.object(FrozenTextEncoder, "device", STEP_DEVICE), model:  # built on "cpu"
        trainer.train_step(0)
        trainer.train_step(1)
    return model.reads


@pytest.mark.parametrize("stage, extra", [
    (1, ()),  # class labels, label dropout
    (4, ("train.init_from=null",)),  # bucketed shards with stored text features, caption dropout
])
def test_a_training_step_reads_nothing_back_from_the_device(embedded_data, tmp_path, stage, extra):
    cfg = stage_config(stage, embedded_data, tmp_path, "device=cpu", "optim.fused=true", "train.eval_batches=0",
                       "train.label_dropout=0.5", "train.caption_dropout=0.5", *extra)
    trainer = Trainer(cfg, distributed.setup("cpu"))
    assert trainer.fused
    reads = reads_of_two_steps(trainer)
    assert not reads, "the step waits for the device:\n" + "\n".join(reads)


def test_with_the_text_encoder_in_the_step_only_transformers_reads_back(embedded_data, tmp_path):
    """Captions encoded in the step (no stored text features, text_cache=0 as on a GPU): nothing of ours reads
    back; transformers' BERT (the bundled MiniLM) checks `padding_mask.all()` to drop an all-visible mask
    (masking_utils.py, _ignore_bidirectional_mask_sdpa), a host read inside the library, once per encoder call.
    Stored text features (data/features.py) keep the encoder, and this read, out of the step."""
    cfg = stage_config(2, embedded_data, tmp_path, "device=cpu", "optim.fused=true", "train.eval_batches=0",
                       "train.init_from=null", "train.text_cache=0", "train.caption_dropout=0.5")
    reads = reads_of_two_steps(Trainer(cfg, distributed.setup("cpu")))
    ours = [r for r in reads if "(in transformers/masking_utils.py)" not in r]
    assert reads and not ours, "the step waits for the device:\n" + "\n".join(reads)


def test_the_model_sees_each_kind_of_read():
    """The model itself: each kind of read is seen on a device tensor, none on the batch or what the host makes
    of it, and only a non-blocking upload of the batch itself goes unrecorded."""
    model = DeviceModel()
    pinned = torch.arange(4.0)
    model.host[pinned] = True
    with model.methods(), model:
        weights = torch.ones(4, device=STEP_DEVICE)
        host = pinned * 2  # host op on the batch: host, unpinned
        host.tolist(), host.cpu(), float(host[0])  # host reads of host tensors: fine
        ok = pinned.to(STEP_DEVICE, non_blocking=True)
        seen = len(model.reads)
        host.to(STEP_DEVICE, non_blocking=True)  # unpinned
        pinned.to(STEP_DEVICE)  # blocking
        bool(weights.sum() > 0), weights.tolist(), weights.cpu(), ok.numpy(), weights.to("cpu")
        weights.nonzero(), weights[weights > 1], torch.equal(weights, ok)
    assert seen == 0
    kinds = [r.split(": ", 1)[1] for r in model.reads]
    assert kinds == ["a host-to-device copy of unpinned memory (a host op made it; upload the batch first)",
                     "a blocking host-to-device copy (non_blocking=False)", READS[aten._local_scalar_dense.default],
                     ".tolist() of a device tensor", ".cpu() of a device tensor", ".numpy() of a device tensor",
                     '.to("cpu") of a device tensor', READS[aten.nonzero.default],
                     "boolean indexing (its size is known on the host only)", READS[aten.equal.default]]
