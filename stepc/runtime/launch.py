"""`python -m stepc.runtime.launch TORCHRUN_ARGS`: torchrun without its traceback on a worker's failure.

The stage scripts launch the workers through this module rather than `python -m torch.distributed.run`.
It calls torchrun's own `parse_args` and `run` (same flags, same elastic agent, same signal handling),
and differs only when a worker fails: torchrun's `main` re-raises ChildFailedError, which prints a
Python traceback of the launcher and a 15-line report after the worker's own message. A worker that
diagnosed its failure (CUDA out of memory, non-finite loss, full disk) has already printed one
message naming the fix; here the launcher adds one line (which rank, which exit code) and exits 1,
as torchrun does. The stage script turns that into exit code 2 when the worker left a FAILED record.

OMP_NUM_THREADS, when the environment does not set it, is set here to the threads each worker uses
(`worker_threads`): torchrun would otherwise set 1 and print a five-line warning about it.
"""

from __future__ import annotations

import os
import socket
import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if "OMP_NUM_THREADS" not in os.environ:
        from stepc.runtime.device import worker_threads

        os.environ["OMP_NUM_THREADS"] = str(worker_threads(_local_workers(args.nproc_per_node)))
    try:
        run(args)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        print(f"torchrun: worker rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) on "
              f"{socket.gethostname()} exited with code {failure.exitcode}", file=sys.stderr, flush=True)
        return 1
    return 0


def _local_workers(nproc_per_node: str) -> int:
    """torchrun's --nproc_per_node: a number, or "gpu"/"cuda"/"auto"/"cpu" (one per GPU, else per CPU)."""
    if nproc_per_node.isdigit():
        return max(1, int(nproc_per_node))
    import torch

    if nproc_per_node in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
