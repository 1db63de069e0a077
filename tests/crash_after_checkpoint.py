"""`python -m tests.crash_after_checkpoint STAGE RANK N <hybrid arguments>`: the `hybrid` CLI, except
that the process of rank RANK SIGKILLs itself right after it has written its shard of the Nth sharded
checkpoint of STAGE (the work directory's stage1/stage2/... folder). A deterministic kill for
tests/test_distributed.py: no polling, no timing."""

from __future__ import annotations

import os
import signal
import sys

import distill.sharding
from distill.cli import main


def crash_after(stage: str, rank: int, count: int) -> None:
    save = distill.sharding.save_sharded
    written = 0

    def save_then_maybe_die(work_dir, state, meta, runtime):
        nonlocal written
        save(work_dir, state, meta, runtime)
        if work_dir.name == stage and runtime.rank == rank:
            written += 1
            if written == count:
                os.kill(os.getpid(), signal.SIGKILL)

    distill.sharding.save_sharded = save_then_maybe_die


if __name__ == "__main__":
    crash_after(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    sys.exit(main(sys.argv[4:]))
