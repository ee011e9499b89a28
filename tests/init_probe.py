"""torchrun entry for test_meta_init.py: build stage 1 (fresh) and stage 2 (grown from stage 1's export)
of a compiled run exactly as the runtime does - meta model, setup.prepare (FSDP2 over the ranks,
to_empty), fill - and save rank 0's gathered full state dicts plus every rank's local bytes.

usage: torchrun --nproc_per_node N tests/init_probe.py RUN_DIR OUT_DIR [--block-bytes B] BUILD [BUILD ...]

--block-bytes: fill every tensor over B bytes in row blocks of about B (materialise.BLOCK_BYTES, 16 MiB,
is more than any tensor of the test models, so without it every tensor is filled whole).

A BUILD is PRECISION (stages 1 and 2 as the run builds them: stage1-worldN-PRECISION.pt, stage2-...) or
PRECISION:OPERATOR (stage 2 grown with that growth operator: stage2-worldN-PRECISION-OPERATOR.pt). All
in one launch: starting the workers costs more than building the models.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from stepc.runtime.loop import checkpoint as ckpt
from stepc.runtime.model.materialise import BLOCK_BYTES, init_fresh, meta_fresh_model, meta_grown_model
from stepc.runtime.loop.setup import Stage
from stepc.runtime.loop.setup import prepare as _prepare
from stepc.schema.manifest import load_manifest


def probe_spec(spec, precision: str, operator: str | None):
    """The run's spec with another precision (and growth operator), as test_meta_init's eager side builds it."""
    update = {"train": spec.train.model_copy(update={"precision": precision})}
    if operator:
        update["step"] = spec.step.model_copy(update={"growth_operator": operator})
    return spec.model_copy(update=update)


def main() -> None:
    run_dir, out, args = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    block_bytes = BLOCK_BYTES
    if args[0] == "--block-bytes":
        block_bytes, args = int(args[1]), args[2:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    manifest = load_manifest(run_dir)
    builds = []
    for arg in args:
        precision, _, operator = arg.partition(":")
        builds += [(precision, 2, operator)] if operator else [(precision, 1, None), (precision, 2, None)]
    for precision, index, operator in builds:
        spec = probe_spec(manifest.spec, precision, operator)
        info = manifest.plan.stages[index - 1]
        st = Stage(run_dir, spec, manifest.plan, info, rank, world, torch.device("cpu"))
        if index == 1:
            model = meta_fresh_model(spec, info.total_layers)

            def fill(m):
                init_fresh(m, spec.experiment.seed, block_bytes=block_bytes)
        else:
            model, _, _, fill = meta_grown_model(spec, run_dir / "checkpoints" / "stage-1" / "final", info, block_bytes)
        _prepare(model, st)
        fill(model)
        local = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())
        sizes = [None] * world
        dist.all_gather_object(sizes, local)
        state = ckpt.full_model_state(model)
        if rank == 0:
            name = f"stage{index}-world{world}-{precision}" + (f"-{operator}" if operator else "")
            torch.save({"state": state, "local_bytes": sizes}, out / f"{name}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
