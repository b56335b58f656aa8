#!/usr/bin/env bash
# Installs everything robust-transfer needs and links the environment at ./.venv.
#
# The 5.5 GB environment is built once per dependency list (keyed by a hash of pyproject.toml and
# this script) under ~/.cache/robust-transfer and reused by later runs and clones.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

# Fashion-MNIST (the demo's source data) comes from Debian, not from the network at run time.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "installing the Debian package dataset-fashion-mnist" >&2
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

key=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
VENV=${ROBUST_TRANSFER_VENV:-$HOME/.cache/robust-transfer/venv-$key}
if [ ! -f "$VENV/.complete" ]; then
  echo "building the environment $VENV (about 3 minutes, once)" >&2
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade "pip>=23" "setuptools>=77" wheel
  # torch first and pinned: these builds install from this machine's disk.
  "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/pip" install -q --no-build-isolation -e ".[test]"
  # Animal-MNIST's declared dependencies pull in TensorFlow; its data needs none of them.
  "$VENV/bin/pip" install -q --no-deps animal-mnist==0.4
  touch "$VENV/.complete"
else
  # The environment outlives clones: point its editable install at this checkout.
  "$VENV/bin/pip" install -q --no-build-isolation --no-deps -e . >/dev/null
fi
ln -sfn "$VENV" .venv
echo "environment ready: .venv -> $VENV" >&2
