"""How long the training loop stalls for a sharded checkpoint, with and without asynchronous saving, on the CPU.

    python -m scripts.bench.checkpoint [--ranks 2] [--dim 768] [--depth 12] [--steps 24] [--every 6] [--smoke]

`--ranks` gloo processes train an mmDiT (random inputs, FSDP2 through trainer/parallel.py, AdamW) and save a
sharded checkpoint every `--every` steps through trainer/checkpoint.py's ShardedWriter, once synchronously
(dcp.save) and once with train.async_checkpoint's path (dcp.async_save: the call returns after the copy to host
memory; the write runs in a thread on its own gloo group). Rank 0 prints, per mode, the time the loop spent in
each save call (the stall), the step time with and without a save in it, and the final wait for the last
asynchronous write. Measure on an idle machine: other processes' load changes both the steps and the writes.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def train_and_save(rank: int, args, folder: Path, results: dict) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from core.ranks import Ranks
    from models import build_model, model_config
    from trainer import checkpoint
    from trainer.optim import build_optimizer
    from trainer.parallel import Parallel

    env = Ranks(rank, args.ranks, torch.device("cpu"))
    cfg = model_config("mmDiT-B/2", dim=args.dim, depth=args.depth, heads=max(1, args.dim // 64), in_channels=4,
                       input_size=16, text_dim=64, text_len=8, conditioning="text")
    torch.manual_seed(0)
    model = build_model(cfg)
    parallel = Parallel("fsdp", env, bf16=False)
    parallel.wrap(model)
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    gen = torch.Generator().manual_seed(rank)
    batch = dict(x=torch.randn(2, 4, 16, 16, generator=gen), t=torch.rand(2, generator=gen),
                 text=torch.randn(2, 8, 64, generator=gen), text_mask=torch.ones(2, 8, dtype=torch.bool))

    def step() -> None:
        model(**batch).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for mode in ("sync", "async"):
        writer = checkpoint.ShardedWriter(folder / mode, env, keep=2, asynchronous=mode == "async")
        stalls, plain, with_save = [], [], []
        for s in range(1, args.steps + 1):
            dist.barrier()
            tic = time.perf_counter()
            step()
            stepped = time.perf_counter()
            if s % args.every == 0:
                model_state, optimizer = get_state_dict(model, opt)
                writer.save(s, dict(model=model_state, optimizer=optimizer["state"]), dict(step=s), dict(rank=rank))
                stalls.append(time.perf_counter() - stepped)
                with_save.append(time.perf_counter() - tic)
            else:
                plain.append(stepped - tic)
        tic = time.perf_counter()
        writer.wait()
        final = time.perf_counter() - tic
        dist.barrier()  # rank 0 has renamed the last folder
        size = 0 if rank else sum(f.stat().st_size for f in (folder / mode).rglob("*") if f.is_file()) / 2 ** 20 / 2
        results[mode] = (stalls, plain, with_save, final, size)


def worker(rank: int, args, folder: str, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    results: dict = {}
    try:
        train_and_save(rank, args, Path(folder), results)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        report(args, results)


def report(args, results: dict) -> None:
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    print(f"{args.ranks} ranks, mmDiT {args.dim} wide x {args.depth} blocks, a sharded checkpoint every {args.every} "
          f"of {args.steps} steps")
    print("| mode | saves | stall per save, mean / max | step without a save | step with one | last write waited for "
          "| checkpoint |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, (stalls, plain, with_save, final, size) in results.items():
        print(f"| {mode} | {len(stalls)} | {mean(stalls):.3f} / {max(stalls):.3f} s | {mean(plain):.3f} s | "
              f"{mean(with_save):.3f} s | {final:.3f} s | {size:.1f} MiB |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=6)
    parser.add_argument("--smoke", action="store_true", help="a tiny model and 4 steps: checks that it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.dim, args.depth, args.steps, args.every = 64, 2, 4, 2
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(args, folder, port), nprocs=args.ranks, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
