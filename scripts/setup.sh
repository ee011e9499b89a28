#!/usr/bin/env bash
# Set up stepc on a fresh Debian/Ubuntu machine (idempotent): GLPK, shellcheck and a one-node
# SLURM for the tests, CPU torch pinned so pip never pulls a multi-GB CUDA build, the package
# with its test extras, and the bundled public-domain corpus under data/corpus (and the instruction set
# built from it under data/instructions).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"
if ! command -v glpsol >/dev/null || ! command -v shellcheck >/dev/null; then
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq glpk-utils shellcheck >/dev/null
fi
# SLURM is only needed by the SLURM test (skipped with a reason where it cannot be installed).
$SUDO bash tests/install_slurm.sh || echo "setup: SLURM not installed; tests/test_slurm_run.py will be skipped" >&2
python3 -m pip install -q "torch==${STEPC_TORCH_VERSION:-2.13.0}"
python3 -m pip install -q -e ".[test]"
python3 -m stepc.commands.corpus data/corpus
python3 -m stepc.commands.instructions data/instructions  # the instruction set of specs/tiny-cpu-sft.toml
