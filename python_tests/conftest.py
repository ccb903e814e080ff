"""Suite-wide settings. One intra-op thread: the tests use small tensors, and on a shared 2-core machine
OpenMP's spin-waiting made small models 10-50x slower with two. Tests that exercise threading (the fused
op's parallel paths) set the thread count themselves."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def torchrun():
    """Run ``mtrobust-fast ARGS`` in 2 processes under ``torch.distributed.run`` (gloo on CPU, one thread each);
    returns the completed process."""

    def run(*args, timeout=240):
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "mtrobust_fast.cli", *map(str, args), "--workers", "0", "--no-progress", "--device", "cpu"]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)

    return run
