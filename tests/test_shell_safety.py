"""Shell safety of the emitted scripts: spec strings never become shell code.

Specs whose strings carry spaces, quotes, `$(touch PWNED)`, backticks, `;` and newlines (where the
field allows them) are compiled; then every emitted .sh/.sbatch must pass `bash -n` and shellcheck,
run.sbatch's `#SBATCH` header must hold each value on one line and quoted, and the stage scripts
and run.sbatch are *executed* (PYTHON, srun and scontrol replaced by stubs that record their argv,
so nothing trains) in a scratch directory, after which no file named PWNED may exist anywhere.

Fields that are restricted (experiment.name, launch.slurm.time, validation set names) and the
#SBATCH fields given a newline must be rejected with exit code 2 instead.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stepc.cli import main

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_fuzz_spec import to_toml  # the tiny TOML writer, shared

PWN = "$(touch PWNED)"
PAYLOADS = {
    "space": "my data/with space.txt",
    "single-quote": "it's'here",
    "double-quote": 'say "hi"',
    "command-substitution": f"x{PWN}y",
    "backticks": "`touch PWNED`",
    "semicolon": "a; touch PWNED; b",
    "everything": f"a b'c\"d {PWN} `touch PWNED` ; touch PWNED & | > PWNED < * ? ~ ! # \\ {{}} [] %j %x",
    "unicode": "caf\u00e9 \u2028 \u0085 \U0001F600 \ufeff",
    "newline": f"line1\n{PWN}\nline3",
}
SHELLCHECK = shutil.which("shellcheck")

BASE: dict[str, Any] = {
    "experiment": {"name": "shell-safety", "seed": 1, "method": "step"},
    "model": {"hidden_size": 128, "num_layers": 4, "num_attention_heads": 4, "vocab_size": 4096, "seq_len": 64},
    "memory": {"stages": 2, "solver": "glpk"},
    "step": {"lora_rank": 16},
    "train": {"reference_steps": 100, "global_batch_tokens": 512, "micro_batch_size": 2, "warmup_steps": 10},
    "data": {"train": ["data/corpus/train/*.txt"], "tokenizer": "bpe-4096",
             "validation": {"milton": "data/corpus/validation/*.txt"}},
    "launch": {"nnodes": 1, "nproc_per_node": 2,
               "slurm": {"partition": "debug", "time": "00:30:00", "gpus_per_node": 0}},
}

FAKE_PYTHON = """#!{python} -S
import json, os, sys
with open(os.environ["ARGV_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
"""
FAKE_SRUN = """#!/usr/bin/env bash
# srun stub: drop srun's own options, run the command.
while [[ "${1:-}" == --* ]]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
# scontrol stub: `show hostnames` prints one node.
if [[ "$1 $2" == "show hostnames" ]]; then echo localhost; else exit 1; fi
"""


def _spec_with(payload: str) -> dict[str, Any]:
    """The base spec with `payload` in every free-form string field that accepts it."""
    doc = json.loads(json.dumps(BASE))
    doc["data"]["train"] = [payload + "/*.txt", "data/corpus/train/*.txt"]  # data paths must name a file type
    doc["data"]["validation"] = {"milton": payload + ".jsonl", "other_set": "v " + payload + ".parquet"}
    doc["data"]["tokenizer"] = payload
    doc["data"]["text_field"] = payload
    if "\n" not in payload:
        slurm = doc["launch"]["slurm"]
        slurm["partition"] = payload
        slurm["account"] = payload
        slurm["qos"] = payload
        slurm["extra"] = ["--exclusive", f"--comment={payload}"]
    return doc


def _compile(tmp_path: Path, text: str, capsys) -> tuple[int, str, Path, Path]:
    spec = tmp_path / "spec with space.toml"
    spec.write_text(text, encoding="utf-8")
    out = tmp_path / "runs"
    code = main(["compile", str(spec), "--out", str(out)])
    captured = capsys.readouterr()
    return code, captured.err, spec, out


def _no_pwned(*roots: Path) -> None:
    for root in roots:
        found = [str(p) for p in root.rglob("*PWNED*")] if root.is_dir() else []
        assert not found, f"command injection: {found}"
    assert not (REPO / "PWNED").exists() and not Path("PWNED").exists(), "command injection in the cwd"


def _stubs(tmp_path: Path) -> tuple[Path, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("fake-python", FAKE_PYTHON.format(python=sys.executable)), ("srun", FAKE_SRUN),
                       ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    return bin_dir, bin_dir / "fake-python"


def _sbatch_header(text: str) -> list[str]:
    """The lines sbatch reads options from: up to the first line that is neither a comment nor blank."""
    lines = text.split("\n")  # "\n" only: bash and sbatch do not split on U+2028 or U+0085
    header = []
    for line in lines[1:]:
        if line.startswith("#SBATCH"):
            header.append(line)
        elif line.strip() and not line.startswith("#"):
            break
    return header


def _check_sbatch(run_dir: Path, doc: dict[str, Any]) -> None:
    text = (run_dir / "run.sbatch").read_text(encoding="utf-8")
    lines = text.split("\n")
    assert lines[0] == "#!/usr/bin/env bash"
    header = _sbatch_header(text)
    slurm = doc["launch"]["slurm"]
    expected = {"--job-name": doc["experiment"]["name"], "--partition": slurm["partition"], "--time": slurm["time"]}
    expected.update({f"--{k}": slurm[k] for k in ("account", "qos") if k in slurm})
    seen = {}
    for line in header:
        option = line[len("#SBATCH "):]
        assert line.startswith("#SBATCH ") and option, line
        if option in slurm.get("extra", []):  # raw extra lines, verbatim (they are sbatch options, never shell)
            seen[option] = option
            continue
        tokens = shlex.split(option)  # quoted as one shell word: sbatch splits #SBATCH lines the same way
        assert len(tokens) == 1, f"unquoted value in {line!r}"
        name, _, value = tokens[0].partition("=")
        seen[name] = value
    for name, value in expected.items():
        assert seen.get(name) == value, f"#SBATCH {name}: {seen.get(name)!r} != {value!r}"
    for line in slurm.get("extra", []):
        assert seen.get(line) == line, f"extra line {line!r} not emitted verbatim"
    # every line mentioning SBATCH before the script body is a real #SBATCH line (nothing leaked past it)
    body_start = next(i for i, line in enumerate(lines[1:], 1) if line.strip() and not line.startswith("#"))
    assert all(line.startswith(("#SBATCH ", "# ")) or not line.strip() for line in lines[1:body_start])


def _check_scripts_static(run_dir: Path) -> None:
    scripts = sorted(run_dir.glob("*.sh")) + [run_dir / "run.sbatch"]
    assert len(scripts) >= 3
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"bash -n {script.name}: {result.stderr}"
    if SHELLCHECK:
        result = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


def _run(script: list[str], cwd: Path, env: dict[str, str]) -> None:
    result = subprocess.run(script, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _check_execution(tmp_path: Path, run_dir: Path) -> None:
    """Run stage-1.sh directly and run.sbatch through stubbed srun/scontrol; check the runtime's argv."""
    bin_dir, fake_python = _stubs(tmp_path)
    scratch = tmp_path / "scratch"  # the launch directory
    scratch.mkdir()
    log = tmp_path / "argv.jsonl"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path), "PYTHON": str(fake_python),
           "ARGV_LOG": str(log)}
    manifest = str((run_dir / "manifest.json").resolve())
    stages = len(json.loads((run_dir / "manifest.json").read_text())["plan"]["stages"])

    _run(["bash", str(run_dir / "stage-1.sh"), "--extra-arg"], scratch, env)
    slurm_env = {**env, "STEPC_RUN_DIR": str(run_dir.resolve()), "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "localhost",
                 "SLURM_JOB_NUM_NODES": "1"}
    _run(["bash", str(run_dir / "run.sbatch")], scratch, slurm_env)

    calls = [json.loads(line) for line in log.read_text().splitlines()]
    locks = [argv for argv in calls if argv[:2] == ["-m", "stepc.runlock"]]  # run.sbatch takes the run-dir lock
    assert [argv[2:4] for argv in locks] == [["acquire", str(run_dir.resolve())]], locks
    checks = [argv for argv in calls if argv[:2] == ["-m", "stepc.commands.run"]]  # run.sbatch checks what it runs
    assert checks == [["-m", "stepc.commands.run", "check", str(run_dir.resolve()), str(run_dir / "run.sbatch")]], checks
    for argv in calls:  # every other interpreter call gets the real manifest path (or run directory) as one argument
        if argv in locks or argv in checks:
            continue
        if argv[:4] == ["-m", "stepc.cli", "data", "prepare"]:
            assert argv[4] == str(run_dir.resolve()), argv
        else:
            assert argv[argv.index("--manifest") + 1] == manifest, argv
    prepares = [argv for argv in calls if argv[:4] == ["-m", "stepc.cli", "data", "prepare"]]
    assert len(prepares) == 1 + 1 + stages, calls  # stage-1.sh; run.sbatch once, then each stage script
    launches = [argv for argv in calls if argv[:2] == ["-m", "stepc.runtime.launch"]]
    assert [argv[argv.index("--stage") + 1] for argv in launches] == [str(i) for i in [1, *range(1, stages + 1)]], calls
    for argv in launches:
        assert argv[argv.index("-m", 2) + 1] == "stepc.runtime", argv
    assert launches[0][-1] == "--extra-arg"  # "$@" passes through
    assert "--rdzv_id=stepc-42-stage-1" in launches[1]
    _no_pwned(tmp_path)


def test_shellcheck_is_available():
    """shellcheck is a test dependency (scripts/setup.sh installs it): without it the checks below would
    silently run only `bash -n`, so its absence fails here."""
    assert SHELLCHECK, "shellcheck is missing: bash scripts/setup.sh installs it (apt-get install shellcheck)"


@pytest.mark.parametrize("payload_id", list(PAYLOADS))
def test_hostile_strings_compile_to_safe_scripts(tmp_path, capsys, monkeypatch, payload_id):
    monkeypatch.chdir(tmp_path)  # anything the compiler itself might run lands here
    doc = _spec_with(PAYLOADS[payload_id])
    code, err, _, out = _compile(tmp_path, to_toml(doc), capsys)
    assert code == 0, err
    run_dir = out / doc["experiment"]["name"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["spec"]["data"]["train"][0] == PAYLOADS[payload_id] + "/*.txt"  # kept verbatim, for the runtime only
    _check_scripts_static(run_dir)
    _check_sbatch(run_dir, doc)
    _check_execution(tmp_path, run_dir)


def test_newlines_in_a_multiline_toml_string(tmp_path, capsys, monkeypatch):
    """TOML's own multi-line strings (basic and literal) carry raw newlines into the data fields."""
    monkeypatch.chdir(tmp_path)
    text = to_toml({k: v for k, v in BASE.items() if k != "data"}) + (
        '\n[data]\ntrain = ["""\nline one $(touch PWNED)\n`touch PWNED`; touch PWNED\n.txt"""]\n'
        "tokenizer = '''\ntok dir\n$(touch PWNED)'''\n"
        "[data.validation]\nmilton = '''a\n\"b\" 'c' $(touch PWNED).txt'''\n")
    code, err, _, out = _compile(tmp_path, text, capsys)
    assert code == 0, err
    run_dir = out / BASE["experiment"]["name"]
    _check_scripts_static(run_dir)
    _check_sbatch(run_dir, BASE)
    _check_execution(tmp_path, run_dir)


def _sweep(tmp_path: Path, out: Path, capsys) -> int:
    spec = tmp_path / "sweep spec.toml"
    spec.write_text(to_toml(BASE), encoding="utf-8")
    code = main(["sweep", str(spec), "--grid", "train.lr=1e-3,3e-4", "--out", str(out)])
    capsys.readouterr()
    return code


@pytest.mark.parametrize("payload_id", ["everything", "unicode"])  # "everything": every kind of character of the others
def test_hostile_out_paths_stay_data_in_sweep_sbatch(tmp_path, capsys, monkeypatch, payload_id):
    """The sweep directory's path is written into sweep.sbatch: it must stay one quoted word wherever it
    appears, in the script outside a job array (its message) and inside one (task 0 runs its point)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / f"out {PAYLOADS[payload_id]}"
    assert _sweep(tmp_path, out, capsys) == 0
    sweep_dir = out / f"{BASE['experiment']['name']}.sweep"
    script = sweep_dir / "sweep.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line for line in _sbatch_header(script.read_text()) if line.startswith("#SBATCH --output=")] == [
        "#SBATCH --output=" + shlex.quote(f"{sweep_dir}/logs/slurm-%x-%A_%a.out")]
    bin_dir, fake_python = _stubs(tmp_path)
    log = tmp_path / "argv.jsonl"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path), "PYTHON": str(fake_python),
           "ARGV_LOG": str(log)}
    outside = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert outside.returncode == 2 and f"submit it with: stepc submit {sweep_dir}\n" in outside.stderr, outside.stderr
    task = {**env, "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_ID": "43", "STEPC_SWEEP_DIR": str(sweep_dir.resolve()),
            "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1"}
    _run(["bash", str(script)], tmp_path, task)
    point = (out / json.loads((sweep_dir / "sweep.json").read_text())["points"][1]["name"]).resolve()
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert ["-m", "stepc.commands.run", "check", str(point), str(point / "run.sbatch")] in calls, calls
    assert not list(tmp_path.rglob("PWNED")), "command injection"  # the out directory's own name holds the text


def test_a_control_character_in_the_sweep_out_path_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / f"out\n{PWN}"
    spec = tmp_path / "sweep spec.toml"
    spec.write_text(to_toml(BASE), encoding="utf-8")
    assert main(["sweep", str(spec), "--grid", "train.lr=1e-3,3e-4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "[--out]" in err and "control character" in err and "fix:" in err, err
    assert not out.exists()
    _no_pwned(tmp_path)


REJECTED = [
    *[(f"name-{pid}", ("experiment", "name"), p, "experiment.name") for pid, p in PAYLOADS.items()],
    ("name-trailing-newline", ("experiment", "name"), "ok-name\n", "experiment.name"),
    *[(f"time-{pid}", ("launch", "slurm", "time"), f"00:30:00{p}", "launch.slurm.time") for pid, p in PAYLOADS.items()],
    ("time-trailing-newline", ("launch", "slurm", "time"), "00:30:00\n", "launch.slurm.time"),
    ("time-unicode-digits", ("launch", "slurm", "time"), "\u0660\u0663:\u0660\u0660:\u0660\u0660", "launch.slurm.time"),
    *[(f"validation-name-{pid}", ("data", "validation"), {p: "data/v.txt"}, "data.validation.")
      for pid, p in PAYLOADS.items()],
    *[(f"{field}-newline", ("launch", "slurm", field), f"gpu\n{PWN}", f"launch.slurm.{field}")
      for field in ("partition", "account", "qos")],
    ("partition-carriage-return", ("launch", "slurm", "partition"), f"gpu\r{PWN}", "launch.slurm.partition"),
    ("extra-newline", ("launch", "slurm", "extra"), ["--exclusive", f"--mem=0\n{PWN}"], "launch.slurm.extra"),
    ("extra-trailing-newline", ("launch", "slurm", "extra"), ["--exclusive\n"], "launch.slurm.extra"),
]


@pytest.mark.parametrize("path, value, key", [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED])
def test_restricted_fields_reject_hostile_strings(tmp_path, capsys, monkeypatch, path, value, key):
    monkeypatch.chdir(tmp_path)
    doc = json.loads(json.dumps(BASE))
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    code, err, spec, out = _compile(tmp_path, to_toml(doc), capsys)
    assert code == 2, f"accepted {value!r} for {key}"
    assert err.startswith("error:") and str(spec) in err and "fix:" in err and "Traceback" not in err
    assert f"[{key}" in err, err
    assert not out.exists()
    _no_pwned(tmp_path)


def test_run_sbatch_skips_a_rendezvous_port_something_listens_on(tmp_path, capsys, monkeypatch):
    """Two runs whose rdzv_port + job id land on one number on one head node: the second job must not
    join the first one's rendezvous store, so run.sbatch (on the head node) takes the next free port."""
    import socket

    from slurm_cluster import free_rdzv_base

    monkeypatch.chdir(tmp_path)
    base = free_rdzv_base()
    doc = json.loads(json.dumps(BASE))
    doc["launch"].update(rdzv_port=base, rdzv_ports=50)
    code, err, _, out = _compile(tmp_path, to_toml(doc), capsys)
    assert code == 0, err
    run_dir = (out / doc["experiment"]["name"]).resolve()
    bin_dir, fake_python = _stubs(tmp_path)
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL.replace("echo localhost", "echo 127.0.0.1"))
    log = tmp_path / "argv.jsonl"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path), "PYTHON": str(fake_python),
           "ARGV_LOG": str(log), "STEPC_RUN_DIR": str(run_dir), "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_JOB_NUM_NODES": "1"}

    def endpoint() -> str:
        log.unlink(missing_ok=True)
        _run(["bash", str(run_dir / "run.sbatch")], tmp_path, env)
        launches = [argv for argv in map(json.loads, log.read_text().splitlines()) if argv[:2] == ["-m", "stepc.runtime.launch"]]
        return {a.split("=", 1)[1] for argv in launches for a in argv if a.startswith("--rdzv_endpoint=")}.pop()

    assert endpoint() == f"127.0.0.1:{base + 42}"  # the job id's own port
    with socket.socket() as other:  # another run's rendezvous store on that port
        other.bind(("127.0.0.1", base + 42))
        other.listen()
        assert endpoint() == f"127.0.0.1:{base + 43}"


STUB_TORCHRUN = """#!/usr/bin/env bash
# python stub: `-m stepc.runtime.launch` plays torchrun (ignores stop signals, as the real launcher
# does, and trains for a few seconds); every other call (data prepare, preflight) succeeds at once.
if [[ " $* " == *" stepc.runtime.launch "* ]]; then
  trap '' INT TERM USR1
  touch "$LAUNCHED"
  sleep 4
fi
exit 0
"""


def test_a_burst_of_stop_signals_never_breaks_the_stage_script(tmp_path, capsys, monkeypatch):
    """Ctrl-C reaches `stepc run` and the stage script together and stepc run forwards its copy, SLURM
    sends USR1 then TERM: stop signals come in bursts. bash 5.2 exits 2 with "unexpected EOF while
    looking for matching `)'" when a trapped signal interrupts a command substitution, leaving the
    workers unsupervised (seen once in test_preempt). ~500 signals while the stage trains must
    leave the script supervising until its launcher exits, then exit with the launcher's code."""
    import signal
    import time

    monkeypatch.chdir(tmp_path)
    code, err, _, out = _compile(tmp_path, to_toml(BASE), capsys)
    assert code == 0, err
    run_dir = (out / BASE["experiment"]["name"]).resolve()
    stub = tmp_path / "python-stub"
    stub.write_text(STUB_TORCHRUN)
    stub.chmod(0o755)
    launched = tmp_path / "launched"
    env = {**os.environ, "PYTHON": str(stub), "LAUNCHED": str(launched)}
    proc = subprocess.Popen(["bash", str(run_dir / "stage-1.sh")], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not launched.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    burst = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    end = time.monotonic() + 2.5
    sent = 0
    try:
        # one every 4 ms: the old template broke in 3 of 3 runs at this rate (and passed at one
        # every 10 ms); a denser storm (every 2 ms) once livelocked bash 5.2 itself (SIGCHLD
        # blocked, spinning), which no script can prevent: the finally kills what is left
        while time.monotonic() < end and proc.poll() is None:
            proc.send_signal(burst[sent % 3])
            sent += 1
            time.sleep(0.004)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "unexpected EOF" not in stderr, stderr[-2000:]
    assert proc.returncode == 0, (proc.returncode, stderr[-2000:])
    assert sent > 200
