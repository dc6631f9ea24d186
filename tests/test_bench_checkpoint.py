"""scripts/bench/checkpoint.py runs (its --smoke size) and prints both modes' stall; the figures themselves are
measured on an idle machine, not here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_checkpoint_benchmark_smoke():
    proc = subprocess.run([sys.executable, "-m", "scripts.bench.checkpoint", "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| sync", "| async"))]
    assert [r.split("|")[1].strip() for r in rows] == ["sync", "async"]
    assert all(r.split("|")[2].strip() == "2" for r in rows)  # two saves each
