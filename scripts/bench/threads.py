"""Step time of the embedded Stage 1 alone and next to a competing CPU-bound process, for thread settings.

    python -m scripts.bench.threads [--data-dir outputs/data] [--steps 150] [--settings 2 auto]

On a machine with few cores, a torch run with one intra-op thread per core slows down many times when another
process takes a core: every parallel region waits for the thread whose core is taken. `train.num_threads=auto`
(trainer/threads.py) counts the cores other processes use and runs on the rest. For each setting this runs the
embedded Stage 1 (the demo's model and batch) for --steps steps, alone and then beside one single-threaded
busy loop, and prints the median seconds per step over the logged intervals after the first. Run it on an
otherwise idle machine: anything else running changes the figures.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from core.cli_help import HelpFormatter

ROOT = Path(__file__).resolve().parents[2]
COMPETITORS = {
    "python": "import time\nend = time.time() + 3600\nwhile time.time() < end:\n    pass\n",
    # one-thread torch matmuls: another training-like process
    "torch": "import time, torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nend = time.time() + 3600\n"
             "while time.time() < end:\n    a = (a @ a).tanh()\n",
}


def run_stage1(data_dir: Path, out: Path, threads: str, steps: int, log_every: int) -> list[float]:
    """Seconds per step of each logged interval (metrics.jsonl's img/s at batch 32)."""
    cmd = [sys.executable, "train_stage1.py", "experiment=embedded", f"embedded_data={data_dir}",
           f"train.out_dir={out}", f"train.max_steps={steps}", f"train.log_every={log_every}",
           f"train.num_threads={threads}", "train.eval_batches=0", "train.sample_every=100000",
           "train.ckpt_every=100000", "train.resume=never"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [32 / r["train/img_per_s"] for r in rows if "train/img_per_s" in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data-dir", type=Path, default=ROOT / "outputs" / "data", help="embedded shards (make data)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--settings", nargs="+", default=["2", "auto"], help="train.num_threads values to compare")
    p.add_argument("--competitor", choices=sorted(COMPETITORS), default="python",
                   help="the busy process: a pure-Python loop or one-thread torch matmuls")
    args = p.parse_args()
    print(f"{'num_threads':>11} {'alone s/step':>13} {'with 1 busy process':>20} {'slowdown':>9}"
          f"   (competitor: {args.competitor})")
    for setting in args.settings:
        times = {}
        for busy in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                competitor = subprocess.Popen([sys.executable, "-c", COMPETITORS[args.competitor]]) if busy else None
                try:
                    per_step = run_stage1(args.data_dir, Path(tmp) / "run", setting, args.steps, args.log_every)
                finally:
                    if competitor is not None:
                        competitor.kill()
                        competitor.wait()
            times[busy] = statistics.median(per_step[1:])  # the first interval holds the start-up
        print(f"{setting:>11} {times[False]:>13.3f} {times[True]:>20.3f} {times[True] / times[False]:>8.1f}x",
              flush=True)


if __name__ == "__main__":
    main()
