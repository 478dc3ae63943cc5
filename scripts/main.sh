#!/usr/bin/env bash
# The main job: train the default pair of source models into artifacts/sources/ (reused when already
# there) and print each model's test accuracy on its own task.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
.venv/bin/python -m lightning_merge.models.sources "$@"
