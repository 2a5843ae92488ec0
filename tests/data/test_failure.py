"""The data-error watcher: one rank ending its own watcher leaves the other ranks' watching, and those still end
their process with the publisher's line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.training.helpers import free_port, subprocess_env

BOUND_S = 60

# Rank 1 stops its watcher, then publishes a data error; rank 0, still watching, must end with that line and 2.
RANK_SCRIPT = textwrap.dedent("""
    import sys, threading, time
    import torch.distributed as dist
    from colorize_dist.data import failure

    def watchers():
        return [t for t in threading.enumerate() if t.name == "colorize-data-error-watcher"]

    dist.init_process_group("gloo", init_method="env://")
    rank = dist.get_rank()
    failure.watch()
    assert len(watchers()) == 1
    if rank == 1:
        started = time.monotonic()
        failure.stop_watching()
        assert not watchers(), "rank 1's watcher still runs after stop_watching"
        print(f"rank 1 stopped watching in {time.monotonic() - started:.2f} s", flush=True)
    dist.barrier()
    if rank == 1:
        failure.publish("shard train-000001.tar is damaged; remake it")
        sys.exit(0)
    time.sleep(30)  # the watcher ends this process long before
    sys.exit(1)
""")


def test_a_rank_that_stops_watching_leaves_the_others_watching(tmp_path: Path) -> None:
    script = tmp_path / "train.py"  # the line's prefix is the program's name
    script.write_text(RANK_SCRIPT)
    port = free_port()
    processes = [
        subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=subprocess_env() | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                                            "WORLD_SIZE": "2", "RANK": str(rank)})
        for rank in range(2)]
    outputs = [process.communicate(timeout=BOUND_S) for process in processes]
    (_, rank0_err), (rank1_out, rank1_err) = outputs
    assert processes[1].returncode == 0, rank1_err
    assert "rank 1 stopped watching in" in rank1_out
    assert processes[0].returncode == 2, rank0_err
    assert rank0_err.strip().splitlines()[-1] == "train: shard train-000001.tar is damaged; remake it", rank0_err
