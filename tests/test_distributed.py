"""Multi-process training: two CPU processes (DDP over gloo) train the same heads as one process does on the same
global batches, through the base and from the hidden-state cache, and the two processes' heads stay equal. Running the
heads from the cache inside the model's call (which is what lets DDP see them) leaves the model's forward as it was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed
from distributed_training import (
    GLOBAL_BATCH,
    PROCESS_SETUPS,
    result_name,
    train_heads,
    untrained_model,
)

SCRIPT = Path(__file__).with_name("distributed_training.py")

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="this PyTorch build has no torch.distributed gloo backend, which two CPU processes need to train together",
)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder where both processes of one two-process launch saved their heads, for every setup."""
    output = tmp_path_factory.mktemp("two-processes")
    # One thread per process: the two share this machine's cores. `--standalone` picks a free local port.
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*launch, str(SCRIPT), str(output)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, f"the two-process launch failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return output


@pytest.mark.parametrize("cache", [False, True], ids=["through-the-base", "from-the-cache"])
def test_two_processes_train_the_heads_one_process_trains_on_the_same_global_batches(
    two_process_results, tmp_path, cache
):
    one_process = train_heads(tmp_path, cache, GLOBAL_BATCH, 1)
    start = untrained_model().exit_heads.state_dict()
    # Every head tensor moves far more than the tolerances below, so heads that trained apart cannot pass.
    assert all((one_process[name] - start[name]).abs().max() > 5e-4 for name in start)
    for setup, _, _ in PROCESS_SETUPS:
        first, second = (torch.load(two_process_results / result_name(setup, cache, rank)) for rank in (0, 1))
        assert first.keys() == second.keys() == one_process.keys()
        for name, tensor in one_process.items():
            # Gradients all-reduced every step leave both processes with the same heads.
            torch.testing.assert_close(second[name], first[name], rtol=1e-6, atol=1e-8, msg=f"{setup}: {name}")
            torch.testing.assert_close(first[name], tensor, rtol=1e-5, atol=1e-6, msg=f"{setup}: {name}")
