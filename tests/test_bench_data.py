"""The data benchmarks run (--smoke: tiny shards and model), so they do not rot between the runs that measure; their
figures are not checked."""

import os
import subprocess
import sys

import pytest

from tests.stages import ROOT


@pytest.mark.slow
@pytest.mark.parametrize("script, rows", [("memory", 2), ("text_features", 3)])
def test_data_bench_script_smoke(script, rows):
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # this checkout's packages first
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-m", f"scripts.bench.{script}", "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + rows, proc.stdout  # the header and one row per size or mode
