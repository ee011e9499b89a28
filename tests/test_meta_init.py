"""Meta-device construction (runtime/model/materialise.py): every rank fills only its shards, and the weights are
bit-identical for 1 rank, 2 ranks, 3 ranks (uneven shards) and the eager CPU reference - for a fresh
stage-1 model and for a stage-2 model grown from stage 1's safetensors export, in fp32 and in bf16
(frozen weights stored in bf16). Real torchrun, gloo, FSDP2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, stage_env

PROBE = Path(__file__).with_name("init_probe.py")


OPERATORS = ("stack-middle", "interpolation-copy")


def _probe(run_dir: Path, out: Path, nproc: int, *builds: str, block_bytes: int | None = None) -> None:
    out.mkdir(exist_ok=True)
    blocks = ["--block-bytes", str(block_bytes)] if block_bytes else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(PROBE), str(run_dir), str(out), *blocks, *builds]
    proc = subprocess.run(cmd, env=stage_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]


@pytest.fixture(scope="module")
def two_ranks(full_run, tmp_path_factory) -> Path:
    """One 2-rank launch for both tests (starting the workers costs more than building the models):
    stages 1 and 2 in bf16, and stage 2 grown with each of OPERATORS in fp32."""
    out = tmp_path_factory.mktemp("two-ranks")
    _probe(full_run, out, 2, "bf16", *(f"fp32:{op}" for op in OPERATORS))
    return out


def _same(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), what
    for key in a:
        assert a[key].dtype == b[key].dtype, f"{what}: {key} {a[key].dtype} vs {b[key].dtype}"
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sharded_init_is_bit_identical_to_eager_for_any_world_size(full_run, two_ranks, tmp_path, precision):
    from eager_reference import fresh_model, grown_model
    from stepc.schema.manifest import load_manifest

    manifest = load_manifest(full_run)
    spec = manifest.spec.model_copy(update={"train": manifest.spec.train.model_copy(update={"precision": precision})})
    stages = manifest.plan.stages
    eager = {
        1: fresh_model(spec, stages[0].total_layers, spec.experiment.seed).state_dict(),
        2: grown_model(spec, full_run / "checkpoints" / "stage-1" / "final", stages[1])[0].state_dict(),
    }
    worlds = (1, 3) if precision == "fp32" else (2,)  # 1: no sharding; 3: uneven shards; 2 in bf16
    for world in worlds:
        out = two_ranks if world == 2 else tmp_path
        if world != 2:  # 3 ranks fill in row blocks of 1 KB that straddle the uneven shards' edges
            _probe(full_run, out, world, precision, block_bytes=1024 if world == 3 else None)
        for index in (1, 2):
            saved = torch.load(out / f"stage{index}-world{world}-{precision}.pt", weights_only=False)
            _same(saved["state"], eager[index], f"stage {index}, {world} rank(s), {precision}")
            total = sum(t.nbytes for k, t in eager[index].items() if "rotary" not in k)
            if spec.model.tie_embeddings:
                total -= eager[index]["lm_head.weight"].nbytes
            assert sum(saved["local_bytes"]) == total  # the shards add up to the model, once
            if world > 1:
                assert max(saved["local_bytes"]) < 0.6 * total  # no rank holds the whole model



def test_sharded_growth_follows_the_same_layer_map_as_eager_growth(full_run, two_ranks):
    """The meta-device fill and the eager grow_layers follow one map (growth.layer_sources): with a
    stacking or copy operator the 2-rank sharded grown model equals the eager one bit for bit."""
    from init_probe import probe_spec

    from eager_reference import grown_model
    from stepc.schema.manifest import load_manifest

    manifest = load_manifest(full_run)
    for operator in OPERATORS:  # both built in the module's one 2-rank launch
        spec = probe_spec(manifest.spec, "fp32", operator)
        eager = grown_model(spec, full_run / "checkpoints" / "stage-1" / "final", manifest.plan.stages[1])[0].state_dict()
        saved = torch.load(two_ranks / f"stage2-world2-fp32-{operator}.pt", weights_only=False)
        _same(saved["state"], eager, f"grown with {operator}, 2 ranks")


def test_fresh_init_depends_on_the_seed_and_matches_transformers_statistics():
    from test_gpu_metrics import small_spec

    from eager_reference import fresh_model

    spec = small_spec(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, seq_len=32, num_layers=2)
    a, b = fresh_model(spec, 2, 1).state_dict(), fresh_model(spec, 2, 2).state_dict()
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"])
    w = a["model.embed_tokens.weight"]
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002  # initializer_range
    assert torch.equal(a["model.norm.weight"], torch.ones(64))


@pytest.mark.parametrize("rows, cols", [(1000, 64), (1001, 40), (33, 1), (40, 3)])
def test_row_blocks_draw_what_one_draw_of_the_whole_tensor_draws(rows, cols):
    """materialise._RowDraw: a large embedding or LM head drawn in 16-row blocks, asked for in pieces that
    straddle the blocks, equals torch's one normal_ over the whole tensor under the same seed (the
    independent oracle: what transformers' _init_weights does to the whole weight), padding row zeroed.
    Sizes that are multiples of 16 elements and not; (33, 1) has a last block under 16 elements."""
    from torch import nn

    from test_gpu_metrics import small_spec
    from stepc.runtime.model.materialise import _RowDraw, meta_fresh_model

    model = meta_fresh_model(small_spec(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                        num_key_value_heads=2, seq_len=32, num_layers=2), 1)
    for module in (nn.Embedding(rows, cols, padding_idx=rows // 2), nn.Linear(cols, rows, bias=False)):
        torch.manual_seed(7)
        oracle = torch.empty(rows, cols).normal_(0.0, model.config.initializer_range)
        if isinstance(module, nn.Embedding):
            oracle[rows // 2] = 0
        draw = _RowDraw(model, module, 7, block_bytes=1)
        got = torch.cat([draw((slice(a, min(a + 5, rows)), slice(0, cols))) for a in range(0, rows, 5)])
        assert torch.equal(got, oracle), type(module).__name__
        assert torch.equal(draw((slice(2, 4), slice(1, cols))), oracle[2:4, 1:])  # an earlier row: drawn again


FILL_PEAK = """
import json, sys, torch
from test_gpu_metrics import small_spec
from stepc.runtime.model.materialise import init_fresh, meta_fresh_model

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

spec = small_spec(vocab_size=50257, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2, seq_len=32, num_layers=2)
init_fresh(meta_fresh_model(spec, 1).to_empty(device="cpu"), 1)  # imports and first-use allocations
model = meta_fresh_model(spec, 1).to_empty(device="cpu")  # pages not yet touched: filling counts them
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
init_fresh(model, 1, block_bytes=int(sys.argv[1]))
print(json.dumps({"extra": status("VmHWM") - before - sum(p.nbytes for p in model.parameters()),
                  "largest": max(p.nbytes for p in model.parameters())}))
"""


def test_filling_holds_a_block_of_a_large_tensor_not_the_whole_of_it():
    """The 1.2B meta fill peaked at 1.25x a rank's shard (bench/scale.py): the fill drew the whole fp32
    embedding (V x d) on the CPU before copying a rank's rows. Now a tensor over block_bytes is drawn
    and copied in row blocks: filling a model with a 51 MB embedding in 4 MiB blocks needs under half
    the embedding beyond the model itself (7 MB measured; drawn whole: 51 MB)."""
    # every allocation over 64 KiB its own mmap, returned when freed: RSS counts live tensors, not glibc's
    # cached free heap (which otherwise adds 0-20 MB at random)
    env = {**stage_env(), "MALLOC_MMAP_THRESHOLD_": str(2**16)}
    proc = subprocess.run([sys.executable, "-c", FILL_PEAK, str(4 * 2**20)], env=env,
                          cwd=Path(__file__).parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout)
    assert figures["extra"] < 0.5 * figures["largest"], figures
