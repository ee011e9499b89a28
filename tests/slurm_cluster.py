"""A real one-node SLURM cluster for the test-suite.

``SlurmCluster`` writes a private slurm.conf / cgroup.conf / munge key under a
short temp dir (``/tmp/slXXXXXX``), starts ``munged``, ``slurmctld`` and
``slurmd`` directly as child processes (foreground mode, own session, stdin
/dev/null, output to log files, no systemd / init scripts), waits until
``sinfo`` reports the node idle, and on ``stop()`` terminates exactly those
daemons by PID (SIGTERM, then SIGKILL) and removes the temp dir.

Needs root and the Debian packages slurmctld slurmd slurm-client munge
(``tests/install_slurm.sh``). ``slurm_available()`` says why not, for
``pytest.skip``.

Usage::

    with SlurmCluster() as c:
        rc, job_id = c.sbatch("job.sbatch", "--output=/tmp/x.out")   # waits; rc as sbatch --wait
        c.job_state(job_id)            # 'COMPLETED' (from `scontrol show job`)

    # pytest (e.g. in a conftest.py):
    from slurm_cluster import slurm_cluster_fixture
    slurm_cluster = slurm_cluster_fixture()          # session-scoped fixture

Design notes (see also the traps listed in the test module):

* No cgroups by default: ``ProctrackType=proctrack/linuxproc``,
  ``TaskPlugin=task/none`` -- works in containers / VMs / CI without a usable
  cgroup tree. A process a job detaches (setsid + parent exits) escapes slurm;
  ``stop()`` finds such leftovers by ``SLURM_CONF=<this cluster's conf>`` in
  their environment and kills them by PID.
* No slurmdbd, so no ``sacct``: job results come from ``scontrol show job``
  (finished jobs are kept ``MinJobAge`` = 1 day: JobState and ExitCode, the
  batch script's status) and a jobcomp text file.
* ``EnforcePartLimits=ALL``: jobs that can never run (too many CPUs / nodes /
  memory) are rejected by ``sbatch`` at once instead of pending forever.
* ``sbatch --wait`` polls slurmctld after 2 s, 10 s and then every 32 s, so it
  may return up to ~32 s after the job ended; ``sbatch(wait=True)`` therefore
  submits without it and polls ``scontrol`` every 0.25 s (``wait_job()``).
* Unix socket paths are limited to 107 bytes; slurmstepd creates
  ``<spool>/<node>/<node>_<job>.<step>``, hence the short temp dir.
"""

from __future__ import annotations

import atexit
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping

__all__ = [
    "SlurmCluster",
    "TwoNodeSlurmCluster",
    "two_node_available",
    "SlurmClusterError",
    "SbatchResult",
    "slurm_available",
    "slurm_cluster_fixture",
    "FINISHED_STATES",
]

# binaries the harness needs (daemons + clients + munge)
REQUIRED_BINARIES = (
    "munged", "munge", "unmunge",
    "slurmctld", "slurmd", "slurmstepd",
    "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel",
)

# job states after which a job will not run (again) by itself
FINISHED_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
    "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED",
})

_UNIX_PATH_MAX = 107  # sun_path is 108 bytes incl. the NUL

# Clusters started by this process and not yet stopped. The daemons run in their own session, so
# a test run killed with SIGTERM (e.g. `timeout`, a CI job cancel) would leave them running for
# good: atexit does not run on a signal. A SIGTERM handler (installed only where none was set)
# stops them, then lets the signal take its default course.
_LIVE: "set[SlurmCluster]" = set()


def _stop_live_clusters_on_sigterm(signum, frame):  # pragma: no cover - exercised by hand
    for cluster in list(_LIVE):
        cluster._atexit_stop()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_sigterm_cleanup() -> None:
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _stop_live_clusters_on_sigterm)


class SlurmClusterError(RuntimeError):
    """The cluster could not be started / a client command failed."""


class SbatchResult(tuple):
    """``(returncode, job_id)`` -- unpacks as a 2-tuple; also carries
    ``.stdout``, ``.stderr`` and ``.duration`` (seconds) of the sbatch call.
    ``job_id`` is None when the submission itself was rejected."""

    def __new__(cls, returncode: int, job_id: int | None, stdout: str = "",
                stderr: str = "", duration: float = 0.0):
        self = super().__new__(cls, (returncode, job_id))
        self.stdout, self.stderr, self.duration = stdout, stderr, duration
        return self

    @property
    def returncode(self) -> int:
        return self[0]

    @property
    def job_id(self) -> int | None:
        return self[1]

    def __repr__(self) -> str:
        return (f"SbatchResult(returncode={self[0]}, job_id={self[1]}, "
                f"stderr={self.stderr.strip()[-200:]!r})")


def slurm_available() -> str | None:
    """None if a cluster can be started here, else the reason (for pytest.skip).

    Under CI (CI=true, as CI services set it; scripts/setup.sh installs SLURM there) or with
    STEPC_REQUIRE_SLURM=1, a missing cluster is an error instead: the SLURM tests fail rather than skip.
    """
    reason = _slurm_unavailable()
    required = os.environ.get("STEPC_REQUIRE_SLURM") == "1" or os.environ.get("CI", "").lower() in ("true", "1")
    if reason and required:
        raise RuntimeError(f"CI/STEPC_REQUIRE_SLURM=1 but no SLURM cluster can start here: {reason}")
    return reason


def _slurm_unavailable() -> str | None:
    if os.name != "posix" or not Path("/proc").is_dir():
        return "SLURM harness needs Linux"
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if missing:
        return ("SLURM/munge binaries not found: " + " ".join(missing)
                + " (install with: sudo bash tests/install_slurm.sh)")
    if os.geteuid() != 0:
        return "SLURM harness must run as root (slurmd launches jobs as root)"
    return None


# --------------------------------------------------------------------- helpers
def _resolve_v4(name: str) -> str | None:
    try:
        return socket.getaddrinfo(name, None, socket.AF_INET)[0][4][0]
    except (OSError, IndexError):
        return None


def _port_free(port: int) -> bool:
    for host in ("0.0.0.0", "127.0.0.1"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def _pick_ports(n: int, low: int = 20000, high: int = 30000) -> list[int]:
    """n consecutive free TCP ports in [low, high), below the Linux ephemeral range (which
    srun / slurmstepd use for their own connections)."""
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        base = rng.randrange(low, high - n)
        ports = list(range(base, base + n))
        if all(_port_free(p) for p in ports):
            return ports
    raise SlurmClusterError(f"could not find {n} free consecutive TCP ports in {low}-{high}")


def free_rdzv_base(span: int = 64) -> int:
    """A base rendezvous port (launch.rdzv_port) whose next `span` ports are free too, apart from
    the daemons' ports: a job listens on launch.rdzv_port + job id (mod rdzv_ports), and the test
    cluster's job ids are small."""
    return _pick_ports(span, 30000, 32000)[0]


def _nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def _mem_total_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise SlurmClusterError("MemTotal not found in /proc/meminfo")


def _alive(pid: int) -> bool:
    """Process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"  <{path}: {e}>"
    return "\n".join("  " + t for t in text[-lines:]) or "  <empty>"


def _parse_scontrol(text: str) -> dict[str, str]:
    """Parse `scontrol -o show ...` output (Key=Value pairs; values may contain
    spaces only in a few fields we do not rely on)."""
    out: dict[str, str] = {}
    for m in re.finditer(r"(\S+?)=(\S*)", text):
        out.setdefault(m.group(1), m.group(2))
    return out


# --------------------------------------------------------------------- cluster
class SlurmCluster:
    """A real one-node SLURM cluster (munged + slurmctld + slurmd) owned by this
    process. Use as a context manager or call ``start()`` / ``stop()``."""

    def __init__(self, *, base_dir: str | os.PathLike | None = None,
                 start_timeout: float = 60.0, kill_wait: int = 10,
                 cred_expire: int = 10,
                 cpus: int | None = None, memory_mb: int | None = None,
                 ctld_port: int | None = None, slurmd_port: int | None = None,
                 partition: str = "debug", keep_dir: bool = False,
                 extra_conf: Iterable[str] = ()):
        """
        base_dir:   where to put conf/state/logs (default: a fresh
                    ``tempfile.mkdtemp(prefix="sl", dir="/tmp")``; it must be
                    short, see the socket path limit). stop() removes the dir
                    only if the harness created it and keep_dir is False.
        kill_wait:  slurm KillWait: seconds between SIGTERM and SIGKILL when a
                    job is cancelled / times out.
        cred_expire: slurm AuthInfo cred_expire (default 120 s in slurm):
                    job credential lifetime, and ALSO how long a requeued job
                    stays PENDING (Reason=BeginTime) before it may run again.
        cpus / memory_mb: node size (default: nproc and MemTotal - 64 MB).
        extra_conf: extra slurm.conf lines (appended before the node line).
        """
        self._own_dir = base_dir is None
        self._base_dir_arg = base_dir
        self.start_timeout = start_timeout
        self.kill_wait = kill_wait
        self.cred_expire = cred_expire
        self.partition = partition
        self.keep_dir = keep_dir
        self.extra_conf = list(extra_conf)
        self.cpus = cpus or _nproc()
        self.memory_mb = memory_mb
        self.ctld_port = ctld_port
        self.slurmd_port = slurmd_port

        self.dir: Path | None = None
        self.node: str = ""
        self.node_addr: str = ""
        self.start_seconds: float | None = None   # how long start() took
        self._procs: dict[str, subprocess.Popen] = {}
        self._started = False
        self._atexit_registered = False

    # ----------------------------------------------------------------- paths
    def _p(self, *parts: str) -> Path:
        assert self.dir is not None, "cluster not started"
        return self.dir.joinpath(*parts)

    @property
    def conf_path(self) -> Path:
        return self._p("etc", "slurm.conf")

    @property
    def log_dir(self) -> Path:
        return self._p("log")

    @property
    def munge_socket(self) -> Path:
        return self._p("run", "munge.socket.2")

    @property
    def env(self) -> dict[str, str]:
        """The variables client commands (sbatch, squeue, ...) need."""
        return {"SLURM_CONF": str(self.conf_path)}

    def client_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """os.environ without any inherited SLURM_*/SBATCH_*/SRUN_*/SALLOC_*
        variables (e.g. if pytest itself runs inside a slurm job), plus
        SLURM_CONF of this cluster, plus ``extra``."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env.update(self.env)
        if extra:
            env.update(extra)
        return env

    @property
    def pids(self) -> dict[str, int]:
        """PIDs of the daemons this object started (name -> pid)."""
        return {name: p.pid for name, p in self._procs.items()}

    # ----------------------------------------------------------------- start
    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "SlurmCluster":
        if self._started:
            return self
        reason = slurm_available()
        if reason:
            raise SlurmClusterError(reason)
        t0 = time.monotonic()
        if self._own_dir:
            self.dir = Path(tempfile.mkdtemp(prefix="sl", dir="/tmp"))
        else:
            self.dir = Path(self._base_dir_arg).resolve()
            self.dir.mkdir(parents=True, exist_ok=True)
        self._started = True
        if not self._atexit_registered:
            atexit.register(self._atexit_stop)
            self._atexit_registered = True
        _LIVE.add(self)
        _install_sigterm_cleanup()
        try:
            self._write_config()
            self._start_munged()
            self._start_slurmctld()
            self._start_slurmd()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _write_config(self) -> None:
        d = self.dir
        assert d is not None
        os.chmod(d, 0o755)  # munged wants world-x on every dir above its socket
        for sub in ("etc", "run", "log", "state", "spool", "munge"):
            self._p(sub).mkdir(exist_ok=True)
        os.chmod(self._p("munge"), 0o700)

        # node name: must resolve to 127.0.0.1 (slurmstepd connects back to srun
        # from 127.0.0.1; a hostname on 127.0.1.1 makes srun hang)
        host_s = socket.gethostname().split(".")[0]
        self.node = host_s if _resolve_v4(host_s) == "127.0.0.1" else "localhost"
        self.node_addr = _resolve_v4(self.node) or "127.0.0.1"
        host_ok = (_resolve_v4(socket.gethostname()) == "127.0.0.1"
                   and _resolve_v4(host_s) == "127.0.0.1")
        # NoCtldInAddrAny/NoInAddrAny bind to what gethostname() resolves to:
        # only safe when that is 127.0.0.1, otherwise listen on 0.0.0.0
        comm = ("CommunicationParameters=NoCtldInAddrAny,NoInAddrAny" if host_ok
                else "# CommunicationParameters off: hostname does not resolve to 127.0.0.1")

        spool = self._p("spool")
        (spool / self.node).mkdir(exist_ok=True)
        # <spool>/<node>/<node>_<jobid(8)>.<stepid(10)>
        sock_len = len(str(spool)) + 2 + 2 * len(self.node) + 1 + 8 + 1 + 10
        if sock_len > _UNIX_PATH_MAX or len(str(self.munge_socket)) > _UNIX_PATH_MAX:
            raise SlurmClusterError(
                f"cluster dir {d} is too long: slurmstepd socket paths would be "
                f"{sock_len} > {_UNIX_PATH_MAX} bytes; use a short dir such as /tmp/slXXXX")

        if self.ctld_port is None or self.slurmd_port is None:
            self.ctld_port, self.slurmd_port = _pick_ports(2)
        for p in (self.ctld_port, self.slurmd_port):
            if not _port_free(p):
                raise SlurmClusterError(f"TCP port {p} is already in use")

        # hardware: CPUs from nproc, memory from /proc/meminfo (minus headroom:
        # a node reporting less than RealMemory is drained)
        mem = self.memory_mb
        if mem is None:
            mem = _mem_total_mb()
            mem = mem - 64 if mem > 256 else mem
        self.memory_mb = mem
        topo = f"CPUs={self.cpus}"
        # give the real socket/core layout when slurmd agrees with nproc, so the
        # node is not flagged as "configuration differs from hardware"
        try:
            hw = subprocess.run(["slurmd", "-C"], capture_output=True, text=True,
                                timeout=20).stdout.splitlines()[0]
            kv = _parse_scontrol(hw)
            if kv.get("CPUs") == str(self.cpus):
                topo = (f"CPUs={self.cpus} Boards={kv.get('Boards', 1)} "
                        f"SocketsPerBoard={kv.get('SocketsPerBoard', 1)} "
                        f"CoresPerSocket={kv.get('CoresPerSocket', self.cpus)} "
                        f"ThreadsPerCore={kv.get('ThreadsPerCore', 1)}")
        except (OSError, subprocess.SubprocessError, IndexError):
            pass

        log = self._p("log")
        run = self._p("run")
        conf = f"""\
# generated by tests/slurm_cluster.py -- one-node SLURM on loopback, no slurmdbd
ClusterName=stepctest
SlurmctldHost={self.node}({self.node_addr})
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
StateSaveLocation={self._p('state')}
SlurmdSpoolDir={spool}/%n
SlurmctldPidFile={run}/slurmctld.pid
SlurmdPidFile={run}/slurmd.pid
SlurmctldLogFile={log}/slurmctld.log
SlurmdLogFile={log}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: works without a usable cgroup tree (containers, CI VMs)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# no slurmdbd -> no sacct; use `scontrol show job` (kept MinJobAge s) / jobcomp file
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={log}/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# tiny cluster, so schedule eagerly: batch jobs at submit time (default: up to
# 3 s delay), backfill every 1 s (default 30 s: a requeued job whose BeginTime
# has passed would otherwise wait up to 30 s), full main loop every 2 s (60 s)
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_interval=2
MpiDefault=none
{comm}
MailProg=/bin/true
# reject jobs that can never run here (too many nodes/CPUs/memory) at submit time
EnforcePartLimits=ALL
ReturnToService=2
MinJobAge=86400
SlurmdTimeout=300
InactiveLimit=0
KillWait={self.kill_wait}
Waittime=0
JobRequeue=1
"""
        conf += "".join(line + "\n" for line in self.extra_conf)
        conf += (f"NodeName={self.node} NodeAddr={self.node_addr} NodeHostname={self.node} "
                 f"Port={self.slurmd_port} {topo} RealMemory={mem} State=UNKNOWN\n"
                 f"PartitionName={self.partition} Nodes={self.node} Default=YES "
                 f"MaxTime=INFINITE State=UP\n")
        self.conf_path.write_text(conf)
        # cgroup.conf is only read by cgroup plugins (not loaded with the config
        # above); a neutral one keeps slurmd from picking up a system-wide file
        self._p("etc", "cgroup.conf").write_text(
            "# not used with proctrack/linuxproc + task/none\n"
            "ConstrainCores=no\nConstrainRAMSpace=no\nConstrainDevices=no\n")

        key = self._p("munge", "munge.key")
        if shutil.which("mungekey"):
            subprocess.run(["mungekey", "--create", f"--keyfile={key}", "--force"],
                           check=True, capture_output=True)
        else:
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)

    def _spawn(self, name: str, argv: list[str], pidfile: Path) -> subprocess.Popen:
        logf = open(self._p("log", f"{name}.stderr"), "ab")
        try:
            # not the caller's env: no SLURM_CONF in the daemons' environ, so
            # leftover-job detection by SLURM_CONF never matches a daemon
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    close_fds=True, env=env, cwd=str(self.dir))
        finally:
            logf.close()
        self._procs[name] = proc
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._fail(f"{name} exited with code {proc.returncode} right after start")
            try:
                if int(pidfile.read_text().strip() or 0) == proc.pid:
                    return proc
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        self._fail(f"{name} (pid {proc.pid}) did not write its pid file {pidfile}")
        raise AssertionError  # unreachable

    def _wait_for(self, what: str, check, daemon: str, detail=None) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if check():
                return
            proc = self._procs.get(daemon)
            if proc is not None and proc.poll() is not None:
                self._fail(f"{daemon} died (exit code {proc.returncode}) while waiting for {what}")
            time.sleep(0.1)
        extra = ""
        if detail is not None:
            try:
                extra = "\n" + detail()
            except Exception as e:  # pragma: no cover
                extra = f"\n<{e}>"
        self._fail(f"timed out after {self.start_timeout:.0f}s waiting for {what}{extra}")

    def _fail(self, msg: str) -> None:
        parts = [f"SLURM test cluster in {self.dir}: {msg}"]
        if self.dir is not None:
            for f in sorted(self._p("log").glob("*")):
                if f.name != "jobcomp.log":
                    parts.append(f"--- {f} (last 30 lines):\n{_tail(f)}")
        raise SlurmClusterError("\n".join(parts))

    def _start_munged(self) -> None:
        sock = self.munge_socket
        for p in (sock, Path(str(sock) + ".lock")):
            p.unlink(missing_ok=True)
        # --force: munged refuses a socket dir with a non world-x parent (e.g.
        # under /root); all clients are root, so that check does not matter
        self._spawn("munged", [
            "munged", "-F", "--force",
            f"--key-file={self._p('munge', 'munge.key')}", f"--socket={sock}",
            f"--pid-file={self._p('run', 'munged.pid')}",
            f"--seed-file={self._p('munge', 'munged.seed')}",
            f"--log-file={self._p('log', 'munged.log')}",
        ], self._p("run", "munged.pid"))

        def roundtrip() -> bool:
            try:
                cred = subprocess.run(["munge", "-S", str(sock), "-n"], capture_output=True,
                                      timeout=5, check=True).stdout
                subprocess.run(["unmunge", "-S", str(sock)], input=cred,
                               capture_output=True, timeout=5, check=True)
                return True
            except (subprocess.SubprocessError, OSError):
                return False
        self._wait_for("munged to answer (munge | unmunge)", roundtrip, "munged")

    def _start_slurmctld(self) -> None:
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf_path)],
                    self._p("run", "slurmctld.pid"))

        def up() -> bool:
            r = self._client(["scontrol", "ping"], check=False, timeout=10)
            return r.returncode == 0 and "is UP" in r.stdout
        self._wait_for("slurmctld to answer `scontrol ping`", up, "slurmctld")

    def _start_slurmd(self) -> None:
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf_path), "-N", self.node],
                    self._p("run", "slurmd.pid"))
        resumed = [False]

        def idle() -> bool:
            st = self.node_state()
            if st in ("idle", "mixed", "allocated"):
                return True
            if st and any(s in st for s in ("drain", "down", "fail")) and not resumed[0]:
                self._client(["scontrol", "update", f"nodename={self.node}", "state=resume"],
                             check=False)
                resumed[0] = True
            return False
        def node_detail() -> str:
            r = self._client(["scontrol", "show", "node", self.node], check=False, timeout=10)
            return f"sinfo state {self.node_state()!r}; scontrol show node:\n{r.stdout}{r.stderr}"
        self._wait_for(f"node {self.node} to become idle in sinfo", idle, "slurmd",
                       node_detail)

    # ----------------------------------------------------------------- stop
    def _atexit_stop(self) -> None:
        try:
            self.stop()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            pass

    def stop(self, *, cancel_jobs: bool = True) -> None:
        """Cancel remaining jobs, stop slurmd, slurmctld, munged (by PID:
        SIGTERM, SIGKILL after 20 s), kill job processes that escaped slurm,
        remove the temp dir. Idempotent."""
        if not self._started:
            return
        ctld = self._procs.get("slurmctld")
        if cancel_jobs and ctld is not None and ctld.poll() is None:
            try:
                jobs = [j["job_id"] for j in self.squeue()]
                if jobs:
                    self._client(["scancel", *map(str, jobs)], check=False, timeout=15)
                    deadline = time.monotonic() + self.kill_wait + 10
                    while self.squeue() and time.monotonic() < deadline:
                        time.sleep(0.25)
            except Exception:
                pass
        slurmds = sorted(n for n in self._procs if n.startswith("slurmd"))
        for name in (*slurmds, "slurmctld", "munged"):
            proc = self._procs.get(name)
            if proc is not None:
                self._terminate(proc)
        self._kill_leftover_job_processes()
        self._procs.clear()
        self._started = False
        _LIVE.discard(self)
        self._teardown_extra()
        if self.dir is not None and self._own_dir and not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _teardown_extra(self) -> None:
        """Subclasses: undo what they set up besides the daemons (network namespaces, ...)."""

    @staticmethod
    def _terminate(proc: subprocess.Popen, grace: float = 20.0) -> None:
        if proc.poll() is not None:
            return
        try:
            proc.send_signal(signal.SIGTERM)      # Popen signals its own PID only
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def leftover_job_pids(self) -> list[int]:
        """PIDs of processes started by this cluster's jobs that are still
        alive (found by SLURM_CONF=<our slurm.conf> in /proc/PID/environ)."""
        if self.dir is None:
            return []
        needle = f"SLURM_CONF={self.conf_path}".encode() + b"\0"
        me, daemons = os.getpid(), {p.pid for p in self._procs.values()}
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            if pid == me or pid in daemons:
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read()
            except OSError:
                continue
            if needle in env and b"SLURM_JOB_ID=" in env and _alive(pid):
                found.append(pid)
        return found

    def _kill_leftover_job_processes(self) -> None:
        pids = self.leftover_job_pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(_alive(p) for p in pids):
                time.sleep(0.1)
            pids = [p for p in pids if _alive(p)]
            if not pids:
                return

    # ----------------------------------------------------------------- clients
    def _client(self, argv: list[str], *, check: bool = True, timeout: float = 60,
                env: Mapping[str, str] | None = None, cwd=None,
                ) -> subprocess.CompletedProcess:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           env=self.client_env(env), cwd=cwd, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise SlurmClusterError(
                f"{' '.join(argv)} failed (rc {r.returncode}): {r.stderr.strip()}")
        return r

    def run(self, *argv: str, check: bool = True, timeout: float = 60,
            env: Mapping[str, str] | None = None, cwd=None) -> subprocess.CompletedProcess:
        """Run any slurm client command against this cluster."""
        return self._client(list(argv), check=check, timeout=timeout, env=env, cwd=cwd)

    def sbatch(self, script_path: str | os.PathLike, *args: str, wait: bool = True,
               env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
               timeout: float | None = 600) -> SbatchResult:
        """Submit ``sbatch --parsable ARGS SCRIPT``; with wait=True, wait for the job to end.

        Returns ``(returncode, job_id)`` (an ``SbatchResult``). With wait=True
        returncode is the batch script's exit code as ``sbatch --wait`` gives
        it (0 only if COMPLETED; the script's status, or 1 for CANCELLED/TIMEOUT
        and the like). With wait=False it is sbatch's own status.
        job_id is None if the submission was rejected (see ``.stderr``).
        ``env`` is added to the (SLURM_*-cleaned) environment, which sbatch
        exports into the job (--export=ALL); cwd is the job's working dir.
        Waiting polls scontrol every 0.25 s: ``sbatch --wait`` itself polls
        after 2 s, 10 s, then every 32 s, which cost the suite up to half a
        minute per job.
        """
        argv = ["sbatch", "--parsable"] + list(args) + [str(script_path)]
        t0 = time.monotonic()
        r = self._client(argv, check=False, timeout=timeout or 600, env=env,
                         cwd=str(cwd) if cwd is not None else None)
        job_id = None
        m = re.match(r"\s*(\d+)", r.stdout)
        if m:
            job_id = int(m.group(1))
        if not wait or job_id is None or r.returncode != 0:
            return SbatchResult(r.returncode, job_id, r.stdout, r.stderr, time.monotonic() - t0)
        state = self.wait_job(job_id, timeout=timeout or 600)
        status, _ = self.exit_code(job_id)
        returncode = 0 if state == "COMPLETED" else (status or 1)
        return SbatchResult(returncode, job_id, r.stdout, r.stderr, time.monotonic() - t0)

    def scancel(self, job_id: int, *extra: str, signal: str | None = None,
                batch: bool = False) -> None:
        """``scancel [--signal=SIG] [--batch] JOB``. Without ``signal`` the job
        is cancelled (SIGCONT+SIGTERM to every process, SIGKILL after KillWait).
        With ``signal`` only that signal is sent (the job keeps running unless
        it exits); ``batch=True`` sends it to the batch shell only."""
        argv = ["scancel"]
        if signal:
            argv.append(f"--signal={signal}")
        if batch:
            argv.append("--batch")
        self._client(argv + list(extra) + [str(job_id)])

    def requeue(self, job_id: int, hold: bool = False) -> subprocess.CompletedProcess:
        """``scontrol requeue[hold] JOB`` (check=False: inspect returncode/stderr)."""
        return self._client(["scontrol", "requeuehold" if hold else "requeue", str(job_id)],
                            check=False)

    def squeue(self) -> list[dict]:
        """Jobs slurmctld still lists as pending/running/completing."""
        r = self._client(["squeue", "-h", "-o", "%i|%j|%T|%r"])
        jobs = []
        for line in r.stdout.splitlines():
            if line.strip():
                jid, name, state, reason = line.split("|", 3)
                jobs.append({"job_id": int(jid), "name": name, "state": state,
                             "reason": reason})
        return jobs

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol -o show job -d JOB`` as a dict (JobState, ExitCode,
        DerivedExitCode, Restarts, Reason, ...). Finished jobs stay visible for
        MinJobAge (1 day) -- there is no sacct without slurmdbd."""
        r = self._client(["scontrol", "-o", "show", "job", "-d", str(job_id)])
        return _parse_scontrol(r.stdout.splitlines()[0] if r.stdout else "")

    def job_state(self, job_id: int) -> str:
        """JobState, e.g. PENDING, RUNNING, COMPLETED, FAILED, CANCELLED."""
        return self.job_info(job_id).get("JobState", "")

    def exit_code(self, job_id: int) -> tuple[int, int]:
        """(exit status, signal) from scontrol's ExitCode=E:S."""
        e, _, s = self.job_info(job_id).get("ExitCode", "0:0").partition(":")
        return int(e or 0), int(s or 0)

    def wait_job(self, job_id: int, *, timeout: float = 300, poll: float = 0.25,
                 states: Iterable[str] = FINISHED_STATES) -> str:
        """Poll scontrol until the job's state is in ``states``; return it.
        (Much faster than ``sbatch --wait``.)"""
        states = set(states)
        deadline = time.monotonic() + timeout
        st = ""
        while time.monotonic() < deadline:
            st = self.job_state(job_id)
            if st in states:
                return st
            time.sleep(poll)
        raise SlurmClusterError(f"job {job_id} still {st!r} after {timeout:.0f}s "
                                f"(waiting for {sorted(states)})")

    def node_state(self) -> str:
        r = self._client(["sinfo", "-h", "-N", "-n", self.node, "-o", "%T"],
                         check=False, timeout=10)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else ""


def slurm_cluster_fixture(scope: str = "session", **cluster_kwargs):
    """Return a pytest fixture that yields a started ``SlurmCluster`` (or skips
    with the reason from ``slurm_available()``). In a conftest.py::

        from slurm_cluster import slurm_cluster_fixture
        slurm_cluster = slurm_cluster_fixture()
    """
    import pytest

    @pytest.fixture(scope=scope)
    def _slurm_cluster():
        reason = slurm_available()
        if reason:
            pytest.skip(reason)
        with SlurmCluster(**cluster_kwargs) as cluster:
            yield cluster

    return _slurm_cluster


# --------------------------------------------------------------------- two nodes
def two_node_available() -> str | None:
    """None if a two-node cluster (network namespaces) can be started here, else why not."""
    reason = slurm_available()
    if reason:
        return reason
    missing = [b for b in ("ip", "nsenter", "unshare", "hostname") if shutil.which(b) is None]
    if missing:
        return "two-node SLURM needs " + " ".join(missing) + " (iproute2, util-linux)"
    probe = subprocess.run(["unshare", "--net", "--uts", "true"], capture_output=True, text=True, timeout=20)
    if probe.returncode != 0:
        return f"network/UTS namespaces are not available here: {probe.stderr.strip() or probe.returncode}"
    return None


class TwoNodeSlurmCluster(SlurmCluster):
    """A real two-node SLURM cluster on one machine: each slurmd runs in a network namespace of its
    own (a veth on a private bridge, its own address) and a UTS namespace of its own (its host name
    is its node name), so two torchrun agents rendezvous and two gloo ranks talk across a network.
    What /work/shared/reference/slurm-two-node.sh found, encoded here:

    * ``nsenter --net=/run/netns/NS``, not ``ip netns exec`` (which remounts /sys and hides the
      cgroup tree: slurmd 22.05 then refuses to start);
    * ``unshare --uts`` + ``hostname NODE`` per slurmd: torch uses the rank-0 agent's host name as
      MASTER_ADDR; the node names resolve through marked /etc/hosts lines (removed on stop, in
      place: /etc/hosts may be a bind mount);
    * no default route in the namespaces: a resolver query would hang 10 s instead of failing fast;
    * slurmctld stays in the root namespace and listens on the bridge address (no
      ``CommunicationParameters=NoInAddrAny``); one munged serves all (a pathname unix socket);
    * teardown by PID (the daemons are this object's children), then the veths, namespaces and
      bridge. Names carry a random suffix, so two sessions never touch each other's network.
    Jobs should set ``TMPDIR`` (``self.tmp_dir``): torchrun leaves a torchelastic_* dir per agent.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        sfx = f"{random.Random(os.getpid() ^ time.time_ns()).randrange(16 ** 4):04x}"
        self.suffix = sfx
        self.nodes = [f"st{sfx}n1", f"st{sfx}n2"]
        self.netns = [f"stepc{sfx}n1", f"stepc{sfx}n2"]
        self.bridge = f"stb{sfx}"
        self.veths = [f"stv{sfx}1", f"stv{sfx}2"]
        self.addrs: list[str] = []
        self.bridge_addr = ""
        self._made: list[tuple[str, str]] = []  # ("link"|"netns", name), for teardown
        self._hosts_marker = ""

    @property
    def tmp_dir(self) -> Path:
        return self._p("tmp")

    def _pick_subnet(self) -> str:
        routes = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True).stdout
        rng = random.Random(os.getpid() ^ time.time_ns())
        for _ in range(100):
            net = f"10.{rng.randrange(200, 250)}.{rng.randrange(1, 250)}"
            if f"{net}." not in routes:
                return net
        raise SlurmClusterError("no free 10.x.y.0/24 subnet for the test cluster's bridge")

    def _ip(self, *args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise SlurmClusterError(f"ip {' '.join(args)} failed: {r.stderr.strip()}")

    def _setup_network(self) -> None:
        net = self._pick_subnet()
        self.bridge_addr = f"{net}.1"
        self.addrs = [f"{net}.11", f"{net}.12"]
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        self._ip("addr", "add", f"{self.bridge_addr}/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for ns, veth, addr in zip(self.netns, self.veths, self.addrs):
            self._ip("netns", "add", ns)
            self._made.append(("netns", ns))
            self._ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._made.append(("link", veth))
            self._ip("link", "set", veth, "master", self.bridge, "up")
            self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "lo", "up")
            self._ip("-n", ns, "link", "set", "eth0", "up")  # and NO default route (see the class docstring)
        self._hosts_marker = f"# stepc-test-cluster {self.dir}"
        with open("/etc/hosts", "a") as hosts:
            for node, addr in zip(self.nodes, self.addrs):
                hosts.write(f"{addr} {node} {self._hosts_marker}\n")

    def _write_config(self) -> None:
        self._setup_network()
        self.tmp_dir.mkdir(exist_ok=True)
        super()._write_config()
        ctld_name = socket.gethostname().split(".")[0]  # slurmctld starts only where gethostname() matches
        lines = []
        for line in self.conf_path.read_text().splitlines():
            if line.startswith("SlurmctldHost="):
                line = f"SlurmctldHost={ctld_name}({self.bridge_addr})"
            elif line.startswith("CommunicationParameters="):
                line = "# slurmctld listens on every address: the nodes reach it on the bridge"
            elif line.startswith(("SlurmdPidFile=", "SlurmdLogFile=")):
                key, value = line.split("=", 1)
                line = f"{key}={value.replace('slurmd.', 'slurmd-%n.')}"
            elif line.startswith(("NodeName=", "PartitionName=")):
                continue
            lines.append(line)
        topo = f"CPUs={self.cpus}"
        for node, addr in zip(self.nodes, self.addrs):
            lines.append(f"NodeName={node} NodeAddr={addr} NodeHostname={node} Port={self.slurmd_port} "
                         f"{topo} RealMemory={self.memory_mb} State=UNKNOWN")
            (self._p("spool") / node).mkdir(exist_ok=True)
        lines.append(f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf_path.write_text("\n".join(lines) + "\n")
        self.node, self.node_addr = self.nodes[0], self.addrs[0]

    def _start_slurmd(self) -> None:
        for node, ns in zip(self.nodes, self.netns):
            self._spawn(f"slurmd-{node}", [
                "nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "--",
                "sh", "-c", 'hostname "$1" && exec slurmd -D -f "$2" -N "$1"', "sh", node, str(self.conf_path),
            ], self._p("run", f"slurmd-{node}.pid"))

        def idle() -> bool:
            return all(self.node_state(n) == "idle" for n in self.nodes)
        self._wait_for(f"nodes {' '.join(self.nodes)} to become idle in sinfo", idle, f"slurmd-{self.nodes[1]}",
                       lambda: self._client(["sinfo", "-N"], check=False).stdout)

    def node_state(self, node: str | None = None) -> str:
        r = self._client(["sinfo", "-h", "-N", "-n", node or self.node, "-o", "%T"], check=False, timeout=10)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else ""

    def _teardown_extra(self) -> None:
        for kind, name in reversed(self._made):
            if kind == "link":
                subprocess.run(["ip", "link", "del", name], capture_output=True)
            else:
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._made.clear()
        if self._hosts_marker:
            try:
                with open("/etc/hosts") as f:
                    kept = [line for line in f if self._hosts_marker not in line]
                with open("/etc/hosts", "w") as f:  # in place: keeps the inode
                    f.writelines(kept)
            except OSError:
                pass
            self._hosts_marker = ""


def two_node_cluster_fixture(scope: str = "session", **cluster_kwargs):
    """A pytest fixture yielding a started TwoNodeSlurmCluster (skips with the reason when it cannot run)."""
    import pytest

    @pytest.fixture(scope=scope)
    def _cluster():
        reason = two_node_available()
        if reason:
            pytest.skip(reason)
        with TwoNodeSlurmCluster(**cluster_kwargs) as cluster:
            yield cluster

    return _cluster
