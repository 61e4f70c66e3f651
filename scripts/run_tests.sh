#!/usr/bin/env bash
# Run the test suite against the real Caffe build (built and cached on first use).
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -k augmentation`.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$REPO_ROOT/scripts/install_caffe.sh"
cd "$REPO_ROOT"
# Missing Caffe or data packages must fail the run, not skip tests.
export CAFFE_STAIN_REQUIRE_CAFFE=1 CAFFE_STAIN_REQUIRE_DATA=1 CAFFE_STAIN_REQUIRE_LMDB=1 GLOG_minloglevel=2
exec "$REPO_ROOT/.venv/bin/python" -m pytest tests "$@"
