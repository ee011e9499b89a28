"""The runtime's own collectives run under a process group that, like NCCL on a GPU, serves only the
model's device (review item 1: CPU tensors all-reduced under "nccl" crash at step 1).

No GPU here, so the model lives on `meta` and the default process group is torch's fake backend
registered for the "meta" device only ("meta:fake", world size 2): any collective on a CPU tensor
raises "No backend type associated with device type cpu", exactly as NCCL refuses CPU tensors. The
train step, the measured model-state bytes and the eval sums must all get through it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from stepc.runtime.device import device_and_backend


@pytest.fixture
def meta_group():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("meta:fake", store=FakeStore(), rank=0, world_size=2)
    try:
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.zeros(1))  # the group really refuses host tensors
        yield
    finally:
        dist.destroy_process_group()


def _stage(run_dir):
    from stepc.runtime.loop.setup import Stage
    from stepc.schema.manifest import load_manifest

    manifest = load_manifest(run_dir)
    # world=1 in the Stage: the module stays unsharded on `meta`; the group still has two ranks.
    return Stage(run_dir, manifest.spec, manifest.plan, manifest.plan.stages[0], 0, 1, torch.device("meta"))


def test_step_metrics_and_eval_collectives_stay_on_the_model_device(make_run, meta_group):
    from stepc.runtime.model.materialise import meta_fresh_model
    from stepc.runtime.loop.metrics import model_state_bytes
    from stepc.runtime.loop.evaluator import eval_sums
    from stepc.runtime.loop.setup import Trainee, make_optimizer, prepare
    from stepc.runtime.loop.train import _train_step

    st = _stage(make_run.compile("rt", train={"global_batch_tokens": 256, "micro_batch_size": 2},
                                 launch={"nproc_per_node": 1}))
    model = meta_fresh_model(st.spec, st.stage.total_layers)
    prepare(model, st)
    optimizer = make_optimizer(model, st.spec, st.device)
    seq = st.spec.model.seq_len
    ids = torch.zeros(2, seq, dtype=torch.long, device="meta")
    batches = iter([(ids, ids)] * st.grad_accum)  # (input_ids, labels), as device_batches yields them

    loss, grad_norm = _train_step(st, Trainee(model, optimizer), batches)
    assert loss.device.type == "meta" and loss.shape == () and grad_norm.device.type == "meta"
    # The all-reduce goes through; only reading a meta tensor back to Python cannot (a GPU would).
    with pytest.raises(RuntimeError, match="cannot be called on meta tensors"):
        model_state_bytes(model, optimizer, st.device)
    blocks = np.zeros((4, seq), dtype=np.int64)
    sums = eval_sums(st, model, blocks, np.arange(4))
    assert sums.device.type == "meta" and sums.shape == (2,)


def test_gpu_backend_string_serves_both_devices():
    """On a GPU the group is "cpu:gloo,cuda:nccl" (host objects in checkpointing go through gloo);
    on CPU plain gloo. Checked on the parsed backend config, since NCCL cannot start here."""
    from torch.distributed import BackendConfig

    device, backend = device_and_backend()
    assert (device.type, backend) == ("cpu", "gloo")
    gpu = BackendConfig("cpu:gloo,cuda:nccl").get_device_backend_map()
    assert gpu == {"cpu": "gloo", "cuda": "nccl"}
