"""Data preparation at scale: a synthetic parquet corpus, the tokenizer's ceiling, `stepc data prepare`,
and the time from `stepc run` to the first training steps on prepared data.

The corpus is built from the bundled text (paragraphs shuffled with a fixed seed, glued into 2-5 KB
documents, 1000-document row groups, 250 MB files) and deleted afterwards. Reported side by side:

- raw ``encode_batch`` on the same documents: all threads (wall) and one thread (CPU time): the ceiling;
- ``stepc data prepare --workers W``: wall tokens/s, tokens per CPU-second of all its processes (the
  stable figure on a shared machine), peak RSS of the process tree and of the largest worker
  (polled every 0.1 s), shard bytes;
- ``stepc run`` of a small gpt2-vocab model on the prepared corpus: seconds to the stage_start event
  (data opened, model built) and to the first train event (10 optimizer steps done).

    nice -n 10 python bench/data.py [--size-gb 1] [--workers N]   # table + bench/results/data-<size>.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FILE_BYTES = 250 << 20
ROW_GROUP = 1000


def paragraphs() -> list[str]:
    from stepc.commands.corpus import build_corpus

    corpus = ROOT / "data" / "corpus"
    if not (corpus / "COMPLETE").exists():
        build_corpus(corpus)
    paras = []
    for path in sorted((corpus / "train").glob("*.txt")):
        paras += [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return paras


def build_corpus(out: Path, size_bytes: int, seed: int = 0) -> tuple[int, int]:
    """Parquet files of shuffled-paragraph documents (2-5 KB) until ``size_bytes`` of text; (files, documents)."""
    rng = random.Random(seed)
    paras = paragraphs()
    out.mkdir(parents=True)
    total = docs = files = 0
    writer, file_bytes, batch = None, 0, []
    while total < size_bytes:
        target, doc, n = rng.randint(2000, 5000), [], 0
        while n < target:
            p = paras[rng.randrange(len(paras))]
            doc.append(p)
            n += len(p) + 2
        text = "\n\n".join(doc)
        batch.append(text)
        total += len(text.encode())
        file_bytes += len(text.encode())
        docs += 1
        if len(batch) == ROW_GROUP:
            if writer is None:
                writer = pq.ParquetWriter(out / f"part-{files:05d}.parquet", pa.schema([("text", pa.string())]))
                files += 1
            writer.write_table(pa.table({"text": batch}))
            batch = []
            if file_bytes >= FILE_BYTES:
                writer.close()
                writer, file_bytes = None, 0
    if batch:
        if writer is None:
            writer = pq.ParquetWriter(out / f"part-{files:05d}.parquet", pa.schema([("text", pa.string())]))
            files += 1
        writer.write_table(pa.table({"text": batch}))
    if writer is not None:
        writer.close()
    return files, docs


RAW = """
import json, os, sys, time
import pyarrow.parquet as pq
from stepc.runtime.data.tokenizer import build_gpt2_tokenizer
tok = build_gpt2_tokenizer()
pf = pq.ParquetFile(sys.argv[1])
docs = pf.read_row_groups(list(range(min(int(sys.argv[2]), pf.num_row_groups)))).column("text").to_pylist()
tok.encode_batch_fast(docs[:200], add_special_tokens=False)  # warm up
wall, cpu = time.perf_counter(), time.process_time()
tokens = sum(len(e.ids) for e in tok.encode_batch_fast(docs, add_special_tokens=False))
print(json.dumps({"tokens": tokens, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}))
"""


def raw_encode(first_file: Path, row_groups: int, threads: int | None) -> dict:
    """encode_batch_fast on the first row groups, in a fresh process (RAYON_NUM_THREADS=threads)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads:
        env["RAYON_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, "-c", RAW, str(first_file), str(row_groups)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(RSS of the process and all its descendants, largest single descendant RSS)."""
    total, largest = 0, 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for p in procs:
        try:
            rss = p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
        total += rss
        if p.pid != proc.pid:
            largest = max(largest, rss)
    return total, largest


def prepare_corpus(spec: Path, workers: int, cwd: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "stepc.cli", "data", "prepare", str(spec), "--workers", str(workers)],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ps = psutil.Process(proc.pid)
    peak_total = peak_worker = 0
    while proc.poll() is None:
        total, largest = tree_rss(ps)
        peak_total, peak_worker = max(peak_total, total), max(peak_worker, largest)
        time.sleep(0.1)
    wall = time.perf_counter() - start
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"stepc data prepare failed ({proc.returncode}):\n{out}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_bytes": peak_total, "peak_worker_rss_bytes": peak_worker,
            "max_rss_any_process_bytes": after.ru_maxrss * 1024, "output": out}


def open_in_process(spec: Path, cwd: Path) -> float:
    """Seconds for what every rank does at stage start: check the index against the files, map the shards."""
    from stepc.compiler.load import load_spec
    from stepc.runtime.data.prepared import open_prepared
    from stepc.runtime.data.prepare import prepare

    parsed, _ = load_spec(spec)
    here = os.getcwd()
    os.chdir(cwd)
    try:
        run_dir = cwd / "index-only"
        run_dir.mkdir(exist_ok=True)
        prepare(parsed.data, Path(parsed.data.cache_dir), run_dir)  # writes the index from the cache, no tokenising
        start = time.perf_counter()
        open_prepared(run_dir, parsed.data, parsed.model.seq_len)
        return time.perf_counter() - start
    finally:
        os.chdir(here)


def write_spec(path: Path, name: str, train: str, cache: Path) -> Path:
    path.write_text(f"""[experiment]
name = "{name}"
[model]
hidden_size = 128
num_layers = 2
num_attention_heads = 4
vocab_size = 50257
seq_len = 128
[memory]
layers = [1, 1]
accounting = "exact"
[train]
reference_steps = 400
global_batch_tokens = 1024
micro_batch_size = 4
warmup_steps = 10
precision = "fp32"
checkpoint_every = 1000
[data]
train = ["{train}"]
tokenizer = "gpt2"
cache_dir = "{cache}"
holdout_fraction = 0.0
[eval]
every_steps = 1000
max_tokens = 4096
[launch]
nproc_per_node = 2
[launch.slurm]
gpus_per_node = 0
""")
    return path


def time_to_first_step(spec: Path, work: Path) -> dict:
    """`stepc run` on the prepared corpus: seconds to stage_start and to the first train event, then stop it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "stepc.cli", "compile", str(spec), "--out", str(work / "runs")], cwd=work,
                   env=env, check=True, capture_output=True)
    run_dir = next((work / "runs").iterdir())
    metrics = run_dir / "metrics.jsonl"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "stepc.cli", "run", str(run_dir)], cwd=work, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    seen: dict[str, float] = {}
    try:
        while "train" not in seen and proc.poll() is None and time.perf_counter() - start < 600:
            if metrics.exists():
                for line in metrics.read_text().splitlines():
                    event = json.loads(line)["event"]
                    seen.setdefault(event, time.perf_counter() - start)
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
    return {"to_stage_start_s": seen.get("stage_start"), "to_first_train_event_s": seen.get("train"),
            "fingerprint_bytes": (run_dir / "data-fingerprint.json").stat().st_size
            if (run_dir / "data-fingerprint.json").exists() else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="text bytes of the synthetic corpus, in GB (default 1)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--keep", type=Path, help="build the corpus here and keep it (default: a temp dir, deleted)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="stepc-bench-data-"))
    root = args.keep or tmp
    try:
        t0 = time.perf_counter()
        files, docs = build_corpus(root / "corpus", int(args.size_gb * 1e9))
        build_s = time.perf_counter() - t0
        first = sorted((root / "corpus").glob("*.parquet"))[0]
        raw_all = raw_encode(first, 5, None)
        raw_one = raw_encode(first, 5, 1)
        spec = write_spec(root / "bench.toml", "bench-data", str(root / "corpus" / "*.parquet"), root / "cache")
        prep = prepare_corpus(spec, args.workers, root)
        index_tokens = sum(int(line.split(" documents, ")[1].split(" tokens")[0]) for line in prep["output"].splitlines()
                           if line.startswith("train "))
        shard_bytes = sum(p.stat().st_size for p in (root / "cache" / "shards").rglob("*.bin"))
        again = prepare_corpus(spec, args.workers, root)  # everything cached: the cost every stage start pays
        open_s = open_in_process(spec, root)
        first_step = time_to_first_step(spec, root)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    raw_per_cpu = raw_one["tokens"] / raw_one["cpu_s"]
    prep_per_cpu = index_tokens / prep["cpu_s"]
    result = {
        "size_gb": args.size_gb, "files": files, "documents": docs, "tokens": index_tokens, "workers": args.workers,
        "cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "corpus_build_s": build_s,
        "raw_encode_all_threads_tokens_per_s": raw_all["tokens"] / raw_all["wall_s"],
        "raw_encode_one_thread_tokens_per_cpu_s": raw_per_cpu,
        "prepare_wall_s": prep["wall_s"], "prepare_tokens_per_s": index_tokens / prep["wall_s"],
        "prepare_tokens_per_cpu_s": prep_per_cpu, "prepare_vs_raw_per_core": prep_per_cpu / raw_per_cpu,
        "prepare_peak_rss_bytes": prep["peak_rss_bytes"], "prepare_peak_worker_rss_bytes": prep["peak_worker_rss_bytes"],
        "shard_bytes": shard_bytes, "bytes_per_token": shard_bytes / max(1, index_tokens),
        "prepare_again_wall_s": again["wall_s"], "open_prepared_s": open_s, **first_step,
    }
    out = ROOT / "bench" / "results" / f"data-{args.size_gb:g}gb.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    mb = 1 << 20
    rows = [
        ("corpus", f"{args.size_gb:g} GB text, {files} parquet files, {docs} documents, {index_tokens / 1e6:.1f}M tokens"),
        ("raw encode_batch, all threads", f"{result['raw_encode_all_threads_tokens_per_s'] / 1e6:.2f}M tokens/s"),
        ("raw encode_batch, 1 thread", f"{raw_per_cpu / 1e6:.2f}M tokens per CPU-s (the per-core ceiling)"),
        (f"stepc data prepare, {args.workers} workers", f"{result['prepare_tokens_per_s'] / 1e6:.2f}M tokens/s wall, "
                                                       f"{prep_per_cpu / 1e6:.2f}M tokens per CPU-s "
                                                       f"({result['prepare_vs_raw_per_core']:.2f}x the ceiling)"),
        ("  wall", f"{prep['wall_s']:.0f} s"),
        ("  peak RSS, all processes",
         f"{prep['peak_rss_bytes'] / mb:.0f} MB (largest worker {prep['peak_worker_rss_bytes'] / mb:.0f} MB)"),
        ("  shards", f"{shard_bytes / mb:.0f} MB ({result['bytes_per_token']:.2f} bytes/token)"),
        ("prepare again (all cached)", f"{again['wall_s']:.1f} s"),
        ("open prepared data (per rank, stage start)", f"{open_s:.2f} s"),
        ("stepc run -> stage_start", f"{first_step['to_stage_start_s']:.1f} s" if first_step["to_stage_start_s"] else "n/a"),
        ("stepc run -> first train event (10 steps)",
         f"{first_step['to_first_train_event_s']:.1f} s" if first_step["to_first_train_event_s"] else "n/a"),
        ("load average before / after", f"{load_before[0]:.1f} / {result['load_average_after'][0]:.1f} on {os.cpu_count()} CPUs"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
