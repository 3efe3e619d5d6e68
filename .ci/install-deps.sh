#!/usr/bin/env bash
# Installs the Debian 12 packages Pushlet needs to build, test and benchmark.
# Idempotent: packages already present are skipped; apt is only called when something is missing.
# Usage: scripts/install-deps.sh [build|test|bench|all]   (default: all)
set -euo pipefail

build_pkgs=(build-essential cmake pkg-config libuv1-dev libhiredis-dev libmsgpack-dev libcjson-dev
            libhttp-parser-dev libssl-dev zlib1g-dev)
test_pkgs=(libcriterion-dev curl python3 python3-venv python3-pytest python3-websockets
           python3-aiohttp python3-msgpack redis-server clang libclang-rt-14-dev chromium
           swig python3-dev python3-setuptools python3-wheel)
bench_pkgs=(nginx libnginx-mod-nchan)

case "${1:-all}" in
  build) want=("${build_pkgs[@]}") ;;
  test)  want=("${build_pkgs[@]}" "${test_pkgs[@]}") ;;
  bench) want=("${build_pkgs[@]}" "${bench_pkgs[@]}") ;;
  all)   want=("${build_pkgs[@]}" "${test_pkgs[@]}" "${bench_pkgs[@]}") ;;
  *) echo "usage: $0 [build|test|bench|all]" >&2; exit 2 ;;
esac

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
