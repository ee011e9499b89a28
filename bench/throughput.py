"""Tokens/s of the stepc runtime (torchrun, 1 CPU rank: unsharded, as FSDP2 has nothing to shard) vs a plain PyTorch loop.

Same model, batch, optimizer and data; the two are interleaved (plain, runtime, plain, runtime)
so machine noise hits both, and the ratio is taken within this one run.

    python bench/throughput.py [--steps 60] [--repeats 3]   # table + bench/results/throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stepc.runtime.data.prepared import open_prepared  # noqa: E402
from stepc.runtime.model.llama import llama_config  # noqa: E402
from stepc.runtime.data.prepare import prepare  # noqa: E402
from stepc.runtime.data.sampler import BlockSampler  # noqa: E402
from stepc.schema.spec import Data, Model  # noqa: E402

THREADS = 2


def write_spec(path: Path, steps: int) -> None:
    path.write_text(f"""
[experiment]
name = "bench-throughput"
method = "vanilla"
[model]
hidden_size = 128
num_layers = 6
num_attention_heads = 4
num_key_value_heads = 2
vocab_size = 4096
seq_len = 128
[memory]
accounting = "exact"
[train]
reference_steps = {steps}
global_batch_tokens = 1024
micro_batch_size = 8
warmup_steps = 10
precision = "fp32"
checkpoint_every = {steps * 10}
[data]
train = ["{ROOT / 'data/corpus/train'}/*.txt"]
tokenizer = "bpe-4096"
holdout_fraction = 0.0
[eval]
every_steps = {steps * 10}
max_tokens = 1024
[launch]
nproc_per_node = 1
""")


def runtime_tokens_per_s(spec: Path, out: Path) -> float:
    subprocess.run([sys.executable, "-m", "stepc.cli", "compile", str(spec), "--out", str(out), "--force"],
                   check=True, capture_output=True)
    run_dir = out / "bench-throughput"
    for stale in ("checkpoints", "metrics.jsonl", "export"):
        subprocess.run(["rm", "-rf", str(run_dir / stale)], check=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    subprocess.run(["bash", str(run_dir / "stage-1.sh")], check=True, capture_output=True, env=env, cwd=ROOT)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r.get("event") == "train"][1:]  # the first window includes warm-up
    return statistics.median(rates)


def plain_tokens_per_s(steps: int, cache: Path) -> float:
    """The loop a researcher would write by hand: no FSDP, no process group."""
    torch.set_num_threads(THREADS)
    data = Data(train=[str(ROOT / "data/corpus/train/*.txt")], tokenizer="bpe-4096", cache_dir=str(cache))
    prepare(data, cache, cache)
    sampler = BlockSampler(open_prepared(cache, data, 128).train["train"], 42)
    model_spec = Model(vocab_size=4096, hidden_size=128, intermediate_size=341, num_attention_heads=4,
                       num_key_value_heads=2, seq_len=128, num_layers=6)
    torch.manual_seed(42)
    model = LlamaForCausalLM(llama_config(model_spec, 6))  # transformers' own model and loss, as a researcher would
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)  # as the runtime
    times = []
    for step in range(steps):
        start = time.perf_counter()
        x = torch.from_numpy(sampler.batch(step, 0, 0, 1, 8, 1))
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        times.append(time.perf_counter() - start)
    steady = times[10:]
    return 1024 * len(steady) / sum(steady)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    plain, runtime = [], []
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "bench.toml"
        write_spec(spec, args.steps)
        for _ in range(args.repeats):
            plain.append(plain_tokens_per_s(args.steps, Path(tmp) / "cache"))
            runtime.append(runtime_tokens_per_s(spec, Path(tmp) / "runs"))
    # medians: one repeat slowed by another process on this shared machine must not move the ratio
    ratio = statistics.median(runtime) / statistics.median(plain)
    print(f"{'loop':28} {'tokens/s (each repeat)':>36} {'median':>10}")
    print(f"{'plain PyTorch, 1 process':28} {', '.join(f'{v:,.0f}' for v in plain):>36} {statistics.median(plain):10,.0f}")
    print(f"{'stepc runtime, 1 rank':28} {', '.join(f'{v:,.0f}' for v in runtime):>36} {statistics.median(runtime):10,.0f}")
    print(f"ratio runtime / plain = {ratio:.3f} (goal >= 0.9); model 6 x d128, batch 8 x 128 tokens, {THREADS} threads, CPU")
    out = ROOT / "bench" / "results" / "throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"plain_tokens_per_s": plain, "runtime_tokens_per_s": runtime, "ratio": ratio,
                               "steps": args.steps, "threads": THREADS}, indent=1) + "\n")


if __name__ == "__main__":
    main()
