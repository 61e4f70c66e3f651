#!/usr/bin/env bash
# Build the sdist and the wheel, then run the tests that need no Caffe on Python 3.8 ... 3.13
# (the interpreters pyenv has), each in its own virtual environment with the wheel installed:
#
#   3.8          the oldest dependency versions pyproject.toml allows: every `>=` lower bound of
#                the runtime, [scripts] and [test] requirements, installed exactly
#   3.9 ... 3.13 the newest releases pip finds for that Python
#
# The tests run from the unpacked sdist against the installed wheel, so a module or template
# missing from either fails them; Caffe and the data packages are absent, and the tests that
# need them skip. Each console script's --help runs from the venv's bin/ and must work without
# pycaffe, and on the Python of the pycaffe build of scripts/install_caffe.sh (.venv/) also with
# only that build on PYTHONPATH.
#
#   bash scripts/test_python_versions.sh               # all of 3.8 ... 3.13 found under pyenv
#   bash scripts/test_python_versions.sh 3.8 3.13      # some of them
#   bash scripts/test_python_versions.sh -- -k params  # arguments after -- go to pytest
#
# The venvs are cached under ~/.cache/caffe-stain-augment/pythons/ (CAFFE_STAIN_PYTHONS_CACHE),
# keyed by the interpreter, pyproject.toml and make_venv below: a warm run only reinstalls the
# wheel. Cold, each venv takes 1-2 minutes of downloads and installs.
# Environment: PYENV_ROOT (default ~/.pyenv), JOBS (versions tested at once, default 2),
# PYCAFFE_DIR and PYCAFFE_VERSION (another pycaffe build's python/ folder and its Python, e.g. 3.11).
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${CAFFE_STAIN_PYTHONS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/caffe-stain-augment/pythons}
PYENV_ROOT=${PYENV_ROOT:-$HOME/.pyenv}
JOBS=${JOBS:-2}
ALL_VERSIONS=(3.8 3.9 3.10 3.11 3.12 3.13)
LOWEST_VERSION=3.8
# The build backend at the lower bound of pyproject.toml's [build-system] (and the wheel package
# that setuptools < 70.1 needs for bdist_wheel).
BUILD_TOOLS=("build==1.2.2" "setuptools==64.0.0" "wheel==0.38.4")

versions=() pytest_args=()
while [ $# -gt 0 ]; do
  case $1 in
    --) shift; pytest_args=("$@"); break ;;
    *) versions+=("$1"); shift ;;
  esac
done
[ ${#versions[@]} -gt 0 ] || versions=("${ALL_VERSIONS[@]}")

say() { printf '[python-versions] %s\n' "$*"; }
die() { printf '[python-versions] ERROR: %s\n' "$*" >&2; exit 1; }
hash_of() { cat "$@" | sha256sum | cut -c1-12; }

# The newest pyenv interpreter of a minor version (e.g. 3.8 -> ~/.pyenv/versions/3.8.18/bin/python).
find_python() {
  local dir
  dir=$(ls -d "$PYENV_ROOT/versions/$1".* 2>/dev/null | grep -E "/$1\.[0-9]+$" | sort -V | tail -n 1 || true)
  [ -n "$dir" ] && [ -x "$dir/bin/python" ] && echo "$dir/bin/python"
}

mkdir -p "$CACHE/logs"
START=$SECONDS

# --- 1. sdist and wheel, with `python -m build` and the oldest setuptools pyproject.toml allows
TOOLS_PYTHON=${TOOLS_PYTHON:-$(find_python 3.11 || command -v python3)}
TOOLS=$CACHE/tools-$(printf '%s\n' "${BUILD_TOOLS[@]}" "$("$TOOLS_PYTHON" -V 2>&1)" | sha256sum | cut -c1-12)
if [ ! -f "$TOOLS/.complete" ]; then
  rm -rf "$TOOLS"
  "$TOOLS_PYTHON" -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check "${BUILD_TOOLS[@]}" >"$CACHE/logs/tools.log" 2>&1 \
    || { tail -n 20 "$CACHE/logs/tools.log" >&2; die "installing ${BUILD_TOOLS[*]} failed"; }
  touch "$TOOLS/.complete"
fi
DIST=$(mktemp -d "${TMPDIR:-/tmp}/caffe-stain-dist.XXXXXX")
trap 'rm -rf "$DIST"' EXIT
# Wheel built from the sdist (build's default), so a file missing from the sdist breaks the wheel.
(cd "$REPO_ROOT" && "$TOOLS/bin/python" -m build --no-isolation --outdir "$DIST" .) >"$CACHE/logs/build.log" 2>&1 \
  || { tail -n 30 "$CACHE/logs/build.log" >&2; die "python -m build failed (log: $CACHE/logs/build.log)"; }
rm -rf "$REPO_ROOT/build"  # setuptools' scratch folder, when it leaves one
WHEEL=$(ls "$DIST"/*.whl) SDIST=$(ls "$DIST"/*.tar.gz)

# What the wheel must hold: every module of caffe_layers/, the templates, its console scripts;
# and nothing else (no tests, scripts, results or data).
"$TOOLS/bin/python" - "$WHEEL" "$REPO_ROOT" "$DIST/commands.txt" <<'EOF' || die "the wheel's contents are wrong"
import re, sys, zipfile
from pathlib import Path

wheel, root = zipfile.ZipFile(sys.argv[1]), Path(sys.argv[2])
names = set(wheel.namelist())
package = {p.relative_to(root).as_posix() for p in (root / "caffe_layers").rglob("*.py")}
templates = {"caffe_layers/prototxt/" + p.name for p in (root / "prototxt").glob("*.prototxt")}
info = {n for n in names if n.split("/")[0].endswith(".dist-info")}
problems = [f"missing: {n}" for n in sorted((package | templates) - names)]
problems += [f"unexpected: {n}" for n in sorted(names - package - templates - info)]
setup = (root / "setup.py").read_text()
commands = re.findall(r'"([a-z]+)"', re.search(r"for command in \(([^)]*)\)", setup).group(1))
entry_points = next(wheel.read(n).decode() for n in info if n.endswith("entry_points.txt"))
problems += [f"no console script caffe-stain-{c}" for c in commands
             if f"caffe-stain-{c} = caffe_layers.cli.{c}:main" not in entry_points]
Path(sys.argv[3]).write_text("".join(c + "\n" for c in commands))
print("[python-versions] wheel %s: %d files, %.0f kB (%d modules, %d templates, %d console scripts)"
      % (Path(sys.argv[1]).name, len(names), Path(sys.argv[1]).stat().st_size / 1024, len(package),
         len(templates), len(commands)))
for problem in problems:
    print("[python-versions]   " + problem, file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
SRC=$DIST/src
mkdir "$SRC" && tar -xzf "$SDIST" -C "$SRC" --strip-components=1
COMMANDS=$(cat "$DIST/commands.txt")

# Exactly the lower bounds, for the run on the oldest Python.
"$TOOLS/bin/python" - "$REPO_ROOT/pyproject.toml" >"$DIST/lowest.txt" <<'EOF'
import sys, tomllib
from packaging.requirements import Requirement
from packaging.version import Version

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
requirements = project["dependencies"] + [r for extra in ("scripts", "slides", "test")
                                         for r in project["optional-dependencies"][extra]]
lowest = {}
for text in requirements:
    requirement = Requirement(text)
    bounds = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    if requirement.name != project["name"] and bounds:
        lowest[requirement.name] = max(bounds + ([lowest[requirement.name]] if requirement.name in lowest else []))
for name, version in sorted(lowest.items()):
    print(f"{name}=={version}")
EOF
# The pycaffe build of scripts/install_caffe.sh (or PYCAFFE_DIR, for Python PYCAFFE_VERSION), for
# the console scripts' --help on that Python.
PTH=$(ls "$REPO_ROOT"/.venv/lib/python*/site-packages/caffe_build.pth 2>/dev/null | head -n 1 || true)
PYCAFFE_DIR=${PYCAFFE_DIR:-$([ -n "$PTH" ] && cat "$PTH" || true)}
PYCAFFE_VERSION=${PYCAFFE_VERSION:-$([ -n "$PTH" ] && echo "$PTH" | sed -E 's#.*/lib/python([0-9.]+)/.*#\1#' || true)}
[ -z "$PYCAFFE_DIR" ] || [ -f "$PYCAFFE_DIR/caffe/__init__.py" ] || die "no pycaffe in PYCAFFE_DIR=$PYCAFFE_DIR"
say "built in $((SECONDS - START)) s; lowest versions for $LOWEST_VERSION: $(tr '\n' ' ' <"$DIST/lowest.txt")"

# --- 2. one venv per Python (cached), the wheel, --help of each command, pytest
make_venv() {  # PYTHON VENV MODE: the interpreter's venv with the wheel and its [test] extra
  local constraints=()
  [ "$3" = lowest ] && constraints=(-c "$DIST/lowest.txt")
  rm -rf "$2"
  "$1" -m venv "$2"
  "$2/bin/python" -m pip install --disable-pip-version-check -q "${constraints[@]}" "$WHEEL[test]"
  touch "$2/.complete"
}

test_one() {
  local version=$1 python=$2 log=$3 mode venv key start=$SECONDS
  mode=newest; [ "$version" = "$LOWEST_VERSION" ] && mode=lowest
  # A venv is reused while the interpreter, the requirements and the recipe above are the same.
  key=$({ "$python" -V 2>&1; echo "$mode"; declare -f make_venv; cat "$REPO_ROOT/pyproject.toml"; } | sha256sum | cut -c1-12)
  venv=$CACHE/py$version-$mode-$key
  {
    echo "== Python $version ($python), $mode dependencies, venv $venv"
    if [ ! -f "$venv/.complete" ]; then
      rm -rf "$CACHE/py$version-$mode-"*  # the venvs of older keys (each holds ~0.5-0.7 GB)
      make_venv "$python" "$venv" "$mode"
      echo "venv created in $((SECONDS - start)) s"
    fi
    "$venv/bin/python" -m pip install --disable-pip-version-check -q --no-deps --force-reinstall "$WHEEL"
    "$venv/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
      | grep -iE '^(numpy|scipy|pyyaml|scikit-image|opencv-python-headless|pillow|tifffile|matplotlib|tqdm|imagecodecs|protobuf|pytest|hypothesis|vermin) '
    # The installed package, not the source tree, is what the tests import.
    (cd "$DIST" && "$venv/bin/python" -c 'import caffe_layers, sys; p = caffe_layers.template_dir(); assert "site-packages" in str(p), p; print("templates:", p)')
    # Each command's --help, without pycaffe (docs/without-caffe.md) and, on the Python of the
    # pycaffe build, with it.
    local pycaffe="" help=$DIST/help-$version.txt
    [ "$version" = "$PYCAFFE_VERSION" ] && pycaffe=$PYCAFFE_DIR
    for command in $COMMANDS; do
      for path in "" $pycaffe; do
        env ${path:+PYTHONPATH="$path"} GLOG_minloglevel=2 "$venv/bin/caffe-stain-$command" --help >"$help" 2>&1 \
          || { cat "$help"; echo "caffe-stain-$command --help failed${path:+ (pycaffe: $path)}"; return 1; }
      done
    done
    echo "console scripts: --help works for every command without pycaffe${pycaffe:+ and with $pycaffe}"
    (cd "$SRC" && env -u CAFFE_STAIN_REQUIRE_CAFFE -u CAFFE_STAIN_REQUIRE_DATA -u CAFFE_TOOL -u PYTHONPATH \
       GLOG_minloglevel=2 "$venv/bin/pytest" tests -q -p no:cacheprovider "${pytest_args[@]}")
  } >"$log" 2>&1
}

pids=() names=() logs=() missing=()
for version in "${versions[@]}"; do
  python=$(find_python "$version" || true)
  if [ -z "$python" ]; then missing+=("$version"); continue; fi
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  log=$CACHE/logs/py$version.log
  rm -f "$log.status"  # exit status in a file: `wait -n` above may already have reaped the job
  ( set +e; (set -e; test_one "$version" "$python" "$log"); echo $? >"$log.status" ) &
  pids+=($!) names+=("$version") logs+=("$log")
done
[ ${#pids[@]} -gt 0 ] || die "none of Python ${versions[*]} under $PYENV_ROOT/versions"

wait
failed=0
for i in "${!pids[@]}"; do
  if [ "$(cat "${logs[$i]}.status" 2>/dev/null)" = 0 ]; then status=ok; else status=FAILED; failed=1; fi
  summary=$(grep -E '[0-9]+ (passed|failed|errors?)( |,|$)' "${logs[$i]}" | tail -n 1)
  say "Python ${names[$i]}: $status -- ${summary:-no pytest summary} (log: ${logs[$i]})"
  if [ "$status" != ok ]; then  # failing tests and the log's last lines, cut (parameter ids can be huge)
    { grep -E '^(FAILED|ERROR) ' "${logs[$i]}" || true; tail -n 15 "${logs[$i]}"; } | awk '!seen[$0]++' | cut -c1-240 >&2
  fi
done
for version in "${missing[@]}"; do say "Python $version: not under $PYENV_ROOT/versions, not tested"; done
say "total $((SECONDS - START)) s"
exit "$failed"
