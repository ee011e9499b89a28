#!/usr/bin/env bash
# tests/install_slurm.sh -- install the Debian packages the SLURM test harness
# (tests/slurm_cluster.py) needs: slurmctld slurmd slurm-client munge.
#
# Idempotent: does nothing when every binary is already on PATH.
# Must run as root on Debian/Ubuntu (CI: fresh Debian, no systemd).
# The package postinst scripts must not start munge/slurm services (there is no
# systemd, and a stray munged/slurmd would hold the default ports); a temporary
# /usr/sbin/policy-rc.d that exits 101 blocks that, unless one already exists.
set -euo pipefail

need=(munged munge unmunge slurmctld slurmd slurmstepd sbatch srun scontrol sinfo squeue scancel)
missing=()
for b in "${need[@]}"; do command -v "$b" >/dev/null 2>&1 || missing+=("$b"); done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install_slurm: already installed ($(slurmd -V 2>/dev/null || echo slurmd))"
  exit 0
fi
echo "install_slurm: missing ${missing[*]}; installing slurmctld slurmd slurm-client munge"

[[ $(id -u) -eq 0 ]] || { echo "install_slurm: must run as root" >&2; exit 1; }
command -v apt-get >/dev/null || { echo "install_slurm: apt-get not found (Debian/Ubuntu only)" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
guard=""
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
  guard=/usr/sbin/policy-rc.d
  printf '#!/bin/sh\nexit 101\n' > "$guard"
  chmod 755 "$guard"
fi
cleanup() { [[ -n "$guard" ]] && rm -f "$guard"; return 0; }
trap cleanup EXIT

ok=0
for attempt in 1 2 3; do
  if apt-get update -qq -o DPkg::Lock::Timeout=120 &&
     apt-get install -y -qq --no-install-recommends \
       -o DPkg::Lock::Timeout=120 \
       -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
       slurmctld slurmd slurm-client munge; then
    ok=1; break
  fi
  echo "install_slurm: apt-get attempt $attempt failed; retrying in 5 s" >&2
  sleep 5
done
[[ $ok -eq 1 ]] || { echo "install_slurm: apt-get install failed" >&2; exit 1; }

missing=()
for b in "${need[@]}"; do command -v "$b" >/dev/null 2>&1 || missing+=("$b"); done
if [[ ${#missing[@]} -ne 0 ]]; then
  echo "install_slurm: still missing after install: ${missing[*]}" >&2
  exit 1
fi
echo "install_slurm: installed $(slurmd -V)"
