"""The memory planner under train.parallel (planner/plan.py): the shard group, the sharded state against its
closed form, FSDP's working copies against a count of the model's own blocks, and the per-step traffic against
the ring algorithms' costs worked out by hand [patarasuk2009]."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import build_model
from planner.plan import (
    compose,
    data_shape,
    fsdp_working_bytes,
    make_plan,
    plan_model_config,
    shard_degree,
    step_traffic,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.size=debug", "model.patch=4", "data.image_size=32", "vae=identity", "precision=fp32"]


def test_the_shard_group_of_each_mode():
    assert shard_degree(compose(2, []), 64) == 1
    assert shard_degree(compose(2, ["train.parallel=fsdp"]), 64) == 64
    assert shard_degree(compose(2, ["train.parallel=hsdp"]), 64) == 8  # one node of 8
    assert shard_degree(compose(2, ["train.parallel=hsdp"]), 64, gpus_per_node=4) == 4
    assert shard_degree(compose(2, ["train.parallel=hsdp", "train.hsdp_shard_size=16"]), 64) == 16
    assert shard_degree(compose(2, ["train.parallel=hsdp"]), 2) == 2  # fewer GPUs than a node: one group
    with pytest.raises(ValueError, match="train.hsdp_shard_size=3 does not divide 8"):
        shard_degree(compose(2, ["train.parallel=hsdp", "train.hsdp_shard_size=3"]), 8)


def test_fsdp_divides_the_state_and_adds_its_working_copies():
    cfg = compose(2, [*SMALL, "train.parallel=fsdp", "precision=bf16"])
    rows = {r.name: r.bytes for r in make_plan(cfg, 8).rows()}
    with torch.device("meta"):
        model = build_model(plan_model_config(cfg, data_shape(cfg)))  # the model the plan describes
    params = sum(p.numel() for p in model.parameters())
    share = math.ceil(params / 8)
    assert rows["parameters (fp32 master weights)"] == rows["gradients (fp32)"] == rows["EMA (fp32 copy)"] == 4 * share
    assert rows["optimizer (AdamW, two fp32 moments)"] == 8 * share
    assert "DDP gradient buckets (fp32)" not in rows
    # The model's own blocks, counted by parameter name: the root is everything outside blocks.N.
    per_block: dict[str, int] = {}
    for name, p in model.named_parameters():
        if name.startswith("blocks."):
            per_block[name.split(".")[1]] = per_block.get(name.split(".")[1], 0) + p.numel()
    root, largest = params - sum(per_block.values()), max(per_block.values())
    assert rows["FSDP unsharded working copies"] == 2 * root + 4 * largest + 2 * largest * 6  # bf16 copies, fp32 RS
    assert fsdp_working_bytes(root, largest, 4) == 4 * root + 8 * largest + 2 * largest * 8


def test_step_traffic_is_the_ring_cost_worked_by_hand():
    p = 1000
    # DDP, 8 GPUs: one fp32 all-reduce, 2 * 7/8 * 4000 bytes, whatever the accumulation.
    assert step_traffic(p, "ddp", 8, 1, 20, 2) == dict(all_reduce=7000)
    # FSDP, 8 GPUs, 2 micro-batches, bf16 gathers: per micro-batch 7/8 * (2000 forward + 2000 backward) gathered
    # and 7/8 * 4000 reduce-scattered; with a 100-parameter root the backward gathers 1800.
    assert step_traffic(p, "fsdp", 8, 8, 2, 2) == dict(all_gather=7000, reduce_scatter=7000)
    assert step_traffic(p, "fsdp", 8, 8, 1, 2, root=100) == dict(all_gather=int(7 / 8 * 3800), reduce_scatter=3500)
    # HSDP, 16 GPUs in 2 groups of 8: the same within a group, plus 2 * 1/2 * 4 * 125 across the two replicas.
    assert step_traffic(p, "hsdp", 16, 8, 1, 2) == dict(all_gather=3500, reduce_scatter=3500, all_reduce=500)


@pytest.mark.slow
def test_cli_plans_hsdp_over_the_node_size_it_is_given():
    proc = subprocess.run([sys.executable, "-m", "planner", "stage=1", *SMALL, "train.parallel=hsdp", "+gpus=8",
                           "+gpus_per_node=4"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "8 GPUs (hsdp, state sharded over 4)" in proc.stdout and "FSDP unsharded working copies" in proc.stdout
