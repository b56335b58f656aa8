#!/usr/bin/env bash
# Build (idempotently) a separate virtual environment holding MadryLab robustness==1.2.1,
# the reference contender of benchmarks/pgd_training_step.py.
#
# robustness 1.2.1 pins nothing useful for current torch and pulls heavy or obsolete deps
# (tensorboardX, grpcio, scipy, seaborn, GPUtil, cox -> ...). We install it with --no-deps and
# then only what its import of `robustness.attacker`, `robustness.cifar_models` and
# `robustness.datasets` actually needs. The worker script adds the one-line
# `torchvision.models.utils` shim that current torchvision lacks.
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
