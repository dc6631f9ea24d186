"""The tables of docs/SCALING.md: per-GPU memory from the planner and per-step communication from its traffic
model, for mmDiT-XL/2 and a 2B and an 8B mmDiT, at 8, 64 and 512 GPUs, under ddp, fsdp and hsdp.

    python -m scripts.figures.scaling [--gpus 8 64 512] [--batch 10240] [--mfu 0.4] [--gpu-memory-gb 80]

Everything is computed, nothing is measured on a GPU: memory is planner/plan.py's (activations measured on the
CPU as a GPU holds them), traffic is planner/plan.py's step_traffic (ring costs), compute is the forward FLOPs of
one sample counted by torch.utils.flop_counter on the meta device (plus the frozen text encoder's 2 x parameters
x tokens), times 3 for forward and backward (4 with activation checkpointing), at --mfu of the GPU's dense bf16
peak. Bandwidths are the datasheets' (bib.bib: nvidia2023h100, nvidia2023dgxh100): NVLink 4 at 450 GB/s per
direction per GPU within a node; one 400 Gb/s InfiniBand NDR link (50 GB/s) per GPU between nodes. A collective
whose group spans nodes is taken to run at the InfiniBand rate.
"""

import argparse
import sys

MODELS = {
    "mmDiT-XL/2": [],
    "mmDiT-2B/2": ["+model.overrides.dim=2048", "+model.overrides.depth=28", "+model.overrides.heads=16"],
    "mmDiT-8B/2": ["+model.overrides.dim=4096", "+model.overrides.depth=30", "+model.overrides.heads=32"],
}
PEAK_BF16 = 989e12  # H100 / H200 SXM dense bf16 FLOP/s [nvidia2023h100]
NVLINK = 450e9  # bytes/s per direction per GPU, NVLink 4 (900 GB/s both directions) [nvidia2023h100]
INFINIBAND = 50e9  # bytes/s per GPU: one ConnectX-7 400 Gb/s NDR link each [nvidia2023dgxh100]
GPUS_PER_NODE = 8
MODES = ("ddp", "fsdp", "hsdp")
GIB = 2**30


def forward_flops(mcfg) -> int:
    """Forward FLOPs of one sample, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models import build_model
    from trainer.precision import example_inputs

    with torch.device("meta"):
        model = build_model(mcfg)
        inputs = example_inputs(mcfg, mcfg.input_size, mcfg.input_size)
        with FlopCounterMode(display=False) as counter:
            model(**inputs)
    return counter.get_total_flops()


def row(name: str, overrides: list[str], gpus: int, mode: str, batch: int, gpu_bytes: int, mfu: float,
        checkpointing: bool = False) -> dict:
    import torch
    from omegaconf import OmegaConf

    from models import build_model
    from planner.plan import (
        compose,
        data_shape,
        make_plan,
        plan_model_config,
        shard_degree,
        step_traffic,
        text_encoder_parameters,
    )
    from trainer.fast_path import blocks_of

    cfg = compose(2, [*overrides, f"train.parallel={mode}", f"train.batch_size={batch}", "train.grad_accum=1"])
    mcfg = plan_model_config(cfg, data_shape(cfg))
    with torch.device("meta"):
        model = build_model(mcfg)
    n = sum(p.numel() for p in model.parameters())
    root = n - sum(sum(p.numel() for p in b.parameters()) for b in blocks_of(model))
    plan = make_plan(cfg, gpus, gpu_bytes, gpus_per_node=GPUS_PER_NODE)
    choice = _setting(plan, checkpointing)
    out = dict(model=name, gpus=gpus, mode=mode, plan=plan, choice=choice, mcfg=mcfg, n=n)
    if choice is None:
        return out
    shard = shard_degree(cfg, gpus, GPUS_PER_NODE)
    traffic = step_traffic(n, mode, gpus, shard, choice.grad_accum, 2, root=root)
    encoder, _ = text_encoder_parameters(OmegaConf.to_container(cfg.text_encoder, resolve=True))
    per_sample = forward_flops(mcfg) * (4 if choice.checkpointing else 3) + 2 * (encoder or 0) * mcfg.text_len
    compute = per_sample * (batch // gpus) / (PEAK_BF16 * mfu)
    seconds = 0.0
    for kind, sent in traffic.items():
        across = (kind == "all_reduce" and mode == "hsdp") or (mode != "hsdp" and gpus > GPUS_PER_NODE)
        seconds += sent / (INFINIBAND if across else NVLINK)
    return out | dict(traffic=traffic, compute=compute, comm=seconds)


def _setting(plan, force_checkpointing: bool = False):
    """The fastest setting that fits: the largest micro-batch without checkpointing, else with it (None: none);
    with `force_checkpointing`, the largest with it."""
    from planner.plan import Setting

    for checkpointing in (True,) if force_checkpointing else (False, True):
        micro = plan.largest_micro(checkpointing)
        if micro is not None:
            return Setting(micro, plan.per_gpu_batch() // micro, checkpointing)
    return None


def memory_table(rows: list[dict]) -> str:
    lines = ["| model | GPUs | mode | params + grads + AdamW + EMA (+ DDP buckets / FSDP copies) | activations per "
             "sample, plain / checkpointed | micro-batch (checkpointing) | total at it |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        plan = r["plan"]
        state = sum(x.bytes for x in plan.state_rows) / GIB
        p, tokens = plan.profile, plan.tokens
        act = f"{p.full.per_sample(tokens) / 2**20:.0f} / {p.checkpointed_per_sample(tokens) / 2**20:.0f} MiB"
        c = r["choice"]
        fit = "does not fit" if c is None else f"{c.micro} ({'on' if c.checkpointing else 'off'})"
        total = "-" if c is None else f"{plan.total(c) / GIB:.1f} GiB"
        lines.append(f"| {r['model']} | {r['gpus']} | {r['mode']} | {state:.2f} GiB | {act} | {fit} | {total} |")
    return "\n".join(lines)


def traffic_table(rows: list[dict]) -> str:
    lines = ["| model | GPUs | mode | micro x accum | sent per GPU per step | communication | compute | "
             "share communicating (no overlap) |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "traffic" not in r:
            continue
        c, sent = r["choice"], sum(r["traffic"].values())
        kinds = ", ".join(f"{k.replace('_', '-')} {v / 1e9:.1f}" for k, v in r["traffic"].items())
        share = r["comm"] / (r["comm"] + r["compute"])
        lines.append(f"| {r['model']} | {r['gpus']} | {r['mode']} | {c.micro} x {c.grad_accum} | {sent / 1e9:.1f} GB "
                     f"({kinds}) | {r['comm']:.2f} s | {r['compute']:.2f} s | {100 * share:.0f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--batch", type=int, default=10240, help="global batch (Stage 2's)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation of the compute")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--checkpointing", action="store_true", help="the largest micro-batch with checkpointing")
    args = parser.parse_args(argv)
    rows = [row(name, MODELS[name], gpus, mode, args.batch, int(args.gpu_memory_gb * 1e9), args.mfu,
                args.checkpointing) for name in args.models for gpus in args.gpus for mode in args.modes]
    for name in args.models:
        r = next(x for x in rows if x["model"] == name)
        print(f"- {name}: {r['mcfg'].dim} wide, {r['mcfg'].depth} blocks, {r['n']:,} parameters")
    print("\nMemory per GPU (Stage 2: 256 tokens, T5Gemma-XL captions, global batch "
          f"{args.batch}; {args.gpu_memory_gb:g} GB GPUs):\n")
    print(memory_table(rows))
    print("\nThe micro-batch is the largest that fits " + ("with activation checkpointing." if args.checkpointing else
          "without checkpointing, else the largest with it."))
    print(f"\nCommunication per optimizer step at that micro-batch (MFU {args.mfu:g} assumed):\n")
    print(traffic_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
