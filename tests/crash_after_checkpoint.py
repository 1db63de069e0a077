"""`python -m tests.crash_after_checkpoint STAGE RANK N <hybrid arguments>`: the `hybrid` CLI, except
that the process of rank RANK SIGKILLs itself right after it has written its Nth checkpoint into the
folder named STAGE (stage1, stage2, ...: a training run's sharded or whole checkpoint; `candidates`: a
layer-selection candidate's result file). A deterministic kill for tests/test_distributed.py and
tests/test_convert_resume.py: no polling, no timing."""

from __future__ import annotations

import os
import signal
import sys

import distill.selection
import distill.sharding
from distill.cli import main


def crash_after(stage: str, rank: int, count: int) -> None:
    save_sharded, save_whole = distill.sharding.save_sharded, distill.sharding.save_checkpoint
    written = 0

    def count_and_maybe_die(work_dir_name: str, process_rank: int) -> None:
        nonlocal written
        if work_dir_name == stage and process_rank == rank:
            written += 1
            if written == count:
                os.kill(os.getpid(), signal.SIGKILL)

    def sharded_then_maybe_die(work_dir, state, meta, runtime):
        save_sharded(work_dir, state, meta, runtime)
        count_and_maybe_die(work_dir.name, runtime.rank)

    def whole_then_maybe_die(path, model, optimizer, step, extra):  # one process: rank 0
        save_whole(path, model, optimizer, step, extra)
        count_and_maybe_die(path.parent.name, 0)

    write_result = distill.selection.write_json_atomic

    def result_then_maybe_die(path, obj, **kwargs):
        write_result(path, obj, **kwargs)
        count_and_maybe_die(path.parent.name, int(os.environ.get("RANK", "0")))

    distill.sharding.save_sharded = sharded_then_maybe_die
    distill.sharding.save_checkpoint = whole_then_maybe_die
    distill.selection.write_json_atomic = result_then_maybe_die


if __name__ == "__main__":
    crash_after(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    sys.exit(main(sys.argv[4:]))
