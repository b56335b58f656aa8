#!/usr/bin/env bash
# Build (idempotently) a separate virtual environment holding MadryLab robustness==1.2.1,
# the reference contender of benchmarks/pgd_training_step.py.
#
# robustness 1.2.1 declares heavy or obsolete dependencies (scipy, seaborn, matplotlib, tables,
# grpcio, GPUtil, py3nvml, gitpython, ...) that the benchmark never touches. We install it (and
# its logging helper cox) with --no-deps, then only what `import robustness.attacker` and
# `robustness.cifar_models` need; pip then warns about the missing ones, which is expected.
# benchmarks/_robustness_worker.py adds the `torchvision.models.utils` import shim and keeps the
# library on the CPU.
#
# Usage:  bash benchmarks/setup_robustness_env.sh [VENV_DIR]
# Default VENV_DIR: ~/.cache/robust-transfer/bench-robustness-venv
set -euo pipefail

VENV="${1:-${ROBUSTNESS_VENV:-$HOME/.cache/robust-transfer/bench-robustness-venv}}"
PY="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
TV_SPEC="${TV_SPEC:-torchvision==0.29.1}"
STAMP="$VENV/.robust-transfer-bench-ok"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ -f "$STAMP" ]] && "$VENV/bin/python" "$HERE/_robustness_worker.py" --check >/dev/null 2>&1; then
    echo "robustness venv already set up: $VENV"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating venv $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi

PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "$TORCH_SPEC" "$TV_SPEC"
# The library and its logging helper `cox` without their dependency lists, which would drag in
# scipy, seaborn, matplotlib, grpcio, GPUtil, py3nvml, gitpython, tables, ...
"${PIP[@]}" --no-deps "robustness==1.2.1" "cox==0.2"
# What `import robustness.attacker` / `robustness.cifar_models` really needs on top of torch
# (attacker -> tools.helpers -> tools.constants -> cox.store): dill, tqdm, pandas, tensorboardX.
"${PIP[@]}" dill tqdm pandas tensorboardX

"$VENV/bin/python" "$HERE/_robustness_worker.py" --check
touch "$STAMP"
echo "robustness venv ready: $VENV"
