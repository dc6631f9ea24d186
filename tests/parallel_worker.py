"""A train_stageN.py as torchrun starts it, with one thing changed for a test (RFDIT_TEST_MODE):

    dump         Trainer.fit is replaced: once built (and resumed), the trainer writes the state it holds, in the
                 single-file form (TrainingState.file_state, gathered from the shards), with its loader's start
                 sample and world size, to RFDIT_TEST_OUT (rank 0), and the run ends there
    die-in-save  in the second sharded save, rank 1 writes half of one of its shard files and kills itself with
                 SIGKILL, as if its node died mid-write

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/parallel_worker.py train_stage1.py K=V ...
"""

import os
import runpy
import signal
import sys

sys.path.insert(0, os.getcwd())

import torch  # noqa: E402

import trainer.loop as loop  # noqa: E402


def dump_instead_of_fit(self):
    state = self.state.file_state()  # every rank: sharded tensors are gathered to rank 0
    if self.env.is_main:
        torch.save(dict(state=state, start_sample=self.loader.dataset.start_sample, world_size=self.env.world_size),
                   os.environ["RFDIT_TEST_OUT"])
    self.env.barrier()
    return {}


def die_in_second_save():
    from torch.distributed.checkpoint import FileSystemWriter

    real, calls = FileSystemWriter.write_data, []

    def write_data(self, plan, planner):
        calls.append(1)
        result = real(self, plan, planner)
        if len(calls) == 2 and os.environ.get("RANK") == "1":
            result.wait()
            shard = max(self.path.glob("__1_*.distcp"), key=lambda p: p.stat().st_size)
            os.truncate(shard, shard.stat().st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    FileSystemWriter.write_data = write_data


mode = os.environ["RFDIT_TEST_MODE"]
if mode == "dump":
    loop.Trainer.fit = dump_instead_of_fit
elif mode == "die-in-save":
    die_in_second_save()
else:
    raise SystemExit(f"RFDIT_TEST_MODE={mode!r}: expected dump or die-in-save")
script, sys.argv = sys.argv[1], sys.argv[1:]
sys.argv[0] = os.path.join(os.getcwd(), script)
runpy.run_path(sys.argv[0], run_name="__main__")
