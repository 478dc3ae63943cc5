#!/usr/bin/env bash
# Idempotent setup: a .venv with torch 2.14.1 / torchvision 0.29.1, lightning_merge (editable, with its
# test extras) and Debian's Fashion-MNIST package when /usr/share/datasets/fashion-mnist is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install --quiet -e '.[test]'

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update
    $SUDO apt-get install -y dataset-fashion-mnist
fi
