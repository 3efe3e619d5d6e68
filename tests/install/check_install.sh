#!/bin/sh
# Installs the build into a scratch prefix and checks what users get: the header, the shared
# and static libraries, pushlet.pc (relocatable) and the CMake package, each used to build the
# README's example; and that the shared library exports the public API only.
# Usage: check_install.sh BUILD_DIR SOURCE_DIR
set -eu
build=$1 src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
fails=0 passes=0
check() { if "$@" >"$tmp/out" 2>&1; then passes=$((passes + 1)); else
  fails=$((fails + 1)); echo "FAILED: $*"; cat "$tmp/out"; fi; }

check test -f "$tmp/prefix/include/pushlet.h"
check test -f "$tmp/prefix/lib/libpushlet.a"
check test -L "$tmp/prefix/lib/libpushlet.so"
flags=$(PKG_CONFIG_PATH="$tmp/prefix/lib/pkgconfig" pkg-config --cflags --libs pushlet)
check cc "$src/examples/hello.c" $flags -o "$tmp/hello_pc"

mkdir -p "$tmp/consumer"
cat >"$tmp/consumer/CMakeLists.txt" <<CMAKE
cmake_minimum_required(VERSION 3.18)
project(consumer C)
find_package(pushlet 0.1 REQUIRED)
add_executable(hello_shared $src/examples/hello.c)
target_link_libraries(hello_shared PRIVATE pushlet::pushlet)
add_executable(hello_static $src/examples/hello.c)
target_link_libraries(hello_static PRIVATE pushlet::pushlet_static)
CMAKE
check cmake -S "$tmp/consumer" -B "$tmp/consumer/b" -DCMAKE_PREFIX_PATH="$tmp/prefix"
check cmake --build "$tmp/consumer/b"

lib=$(ls "$tmp"/prefix/lib/libpushlet.so.*.*.*)
extra=$(nm -D --defined-only "$lib" | awk '{print $3}' | grep -v '^pushlet_' || true)
check test -z "$extra"
[ -z "$extra" ] || echo "exported beyond the API: $extra"
echo "$passes passed, $fails failed"
[ "$fails" -eq 0 ]
