#!/usr/bin/env bash
# Builds the Python binding in a fresh venv, offline, and runs its tests.
# Usage: bindings/python/run_tests.sh [VENV_DIR] [pytest args...]
#   VENV_DIR defaults to build/python-venv in the repository. The venv is made with Debian's
#   Python (PYTHON, default /usr/bin/python3) and --system-site-packages, so setuptools, wheel,
#   pytest, aiohttp and websockets come from Debian packages; nothing is downloaded.
# Needs: swig cmake pkg-config python3-dev python3-venv python3-pytest python3-aiohttp
#        python3-websockets redis-server, and the C core's -dev packages.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-$repo/build/python-venv}"
shift || true
python="${PYTHON:-/usr/bin/python3}"

for tool in swig cmake pkg-config; do
  command -v "$tool" >/dev/null || { echo "run_tests.sh: $tool is missing (apt-get install $tool)" >&2; exit 1; }
done

mkdir -p "$venv"
venv="$(cd "$venv" && pwd)"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv --system-site-packages "$venv"
fi

# Everything is built next to the venv, not in the source tree.
export PUSHLET_SOURCE_DIR="$repo"
export PUSHLET_CORE_BUILD_DIR="$venv/core-build"
export PUSHLET_BUILD_BASE="$venv/py-build"
"$venv/bin/pip" install --quiet --no-build-isolation --no-index --force-reinstall --no-deps \
  "$here" >"$venv/pip-install.log" 2>&1 || { cat "$venv/pip-install.log" >&2; exit 1; }

cd "$here"
exec timeout 900 "$venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
