#!/usr/bin/env bash
# The main job: train the default pair of source models into artifacts/sources/ (reused when already
# there), print each model's test accuracy on its own task, then merge the pair with ZipIt! end to end
# (statistics pass → merge → BatchNorm reset → evaluation on every task) and print the results table:
# per-task and joint accuracy of the sources, their ensemble and the merged model; then the partial zip.
# Extra arguments go to the merge, e.g. scripts/main.sh --trainer.devices 2 --trainer.strategy ddp
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
.venv/bin/python -m lightning_merge.models.default_pair
# stable names for the merge configs (configs/merge/*.yaml read artifacts/sources/default_task{0,1}.ckpt)
.venv/bin/python - <<'PY'
import os
from lightning_merge.models.default_pair import DEFAULT_CACHE_DIR, DEFAULT_PAIR, checkpoint_of

for i, spec in enumerate(DEFAULT_PAIR):
    link = os.path.join(DEFAULT_CACHE_DIR, f"default_task{i}.ckpt")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(checkpoint_of(spec).name, link)
PY
.venv/bin/python -m lightning_merge.cli validate --config configs/merge/zipit_fmnist_resnet20x1.yaml "$@"
# the partial zip (merged up to half depth, one tail per source) reuses the saved statistics
.venv/bin/python -m lightning_merge.cli validate --config configs/merge/zipit_partial_fmnist_resnet20x1.yaml \
    --model.init_args.evaluate_sources false --model.init_args.evaluate_ensemble false "$@"
