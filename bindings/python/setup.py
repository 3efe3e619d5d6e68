"""Builds pushlet._pushlet: SWIG over core/include/pushlet.h, linked with the C core.

By default the C core is built from this repository's sources with CMake (target
pushlet_static, the same sources and flags as `make build`) inside setuptools' build directory,
and linked statically into the extension: no installed libpushlet is needed. Offline: everything
comes from Debian packages (swig, cmake, the -dev packages of the core's dependencies).

Environment:
  PUSHLET_SOURCE_DIR      the repository root (the directory holding core/); by default the
                          one two levels above this file. Set it when pip builds a copy of this
                          directory somewhere else.
  PUSHLET_USE_SYSTEM_LIB  1: link an installed libpushlet found by pkg-config instead.
  PUSHLET_BUILD_TYPE      CMake build type for the core (default RelWithDebInfo).
  PUSHLET_CORE_BUILD_DIR  where CMake builds the core (default: inside setuptools' build_temp).
  PUSHLET_BUILD_BASE      setuptools' build directory (default: build/ next to this file).
  SWIG                    the swig program (default: swig).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
DEPS = ["libuv", "libcjson", "msgpack", "hiredis", "openssl", "zlib"]
EXTRA_LIBS = ["http_parser", "pthread"]  # no pkg-config file for http-parser


def fail(msg: str) -> None:
    sys.stderr.write(f"\npushlet: {msg}\n\n")
    raise SystemExit(1)


def source_dir() -> Path:
    """The repository root, where core/include/pushlet.h lives."""
    env = os.environ.get("PUSHLET_SOURCE_DIR")
    candidates = [Path(env)] if env else [HERE.parent.parent]
    for root in candidates:
        if (root / "core" / "include" / "pushlet.h").is_file():
            return root.resolve()
    where = env or str(HERE.parent.parent)
    fail(f"the Pushlet C sources were not found at {where} (no core/include/pushlet.h).\n"
         "Build from a checkout of the repository (pip install ./bindings/python), or set\n"
         "PUSHLET_SOURCE_DIR to the repository root.")
    raise AssertionError


def pkg_config(*args: str) -> list[str]:
    try:
        out = subprocess.run(["pkg-config", *args], check=True, capture_output=True, text=True)
    except FileNotFoundError:
        fail("pkg-config is missing (Debian: apt-get install pkg-config)")
    except subprocess.CalledProcessError as e:
        fail(f"pkg-config {' '.join(args)} failed: {e.stderr.strip()}\n"
             "Debian: apt-get install libuv1-dev libcjson-dev libmsgpack-dev libhiredis-dev "
             "libssl-dev zlib1g-dev libhttp-parser-dev")
    return out.stdout.split()


def run(cmd: list[str], what: str) -> None:
    print("pushlet:", " ".join(cmd), flush=True)
    try:
        subprocess.run(cmd, check=True)
    except FileNotFoundError:
        fail(f"{cmd[0]} is missing: it is needed to {what} (Debian: apt-get install {cmd[0]})")
    except subprocess.CalledProcessError:
        fail(f"could not {what} (command above)")


class BuildExt(build_ext):
    """Build the C core (or find the installed one), run SWIG, then compile the extension."""

    def run(self) -> None:
        tmp = Path(self.build_temp).resolve()
        tmp.mkdir(parents=True, exist_ok=True)
        if os.environ.get("PUSHLET_USE_SYSTEM_LIB") == "1":
            cflags = pkg_config("--cflags", "pushlet")
            include = [f[2:] for f in cflags if f.startswith("-I")]
            link = pkg_config("--libs", "pushlet")
            objects: list[str] = []
        else:
            root = source_dir()
            include = [str(root / "core" / "include")]
            core_build = Path(os.environ.get("PUSHLET_CORE_BUILD_DIR") or tmp / "core")
            objects = [self.build_core(root, core_build.resolve())]
            link = pkg_config("--libs", *DEPS) + [f"-l{lib}" for lib in EXTRA_LIBS]
        wrapper = self.run_swig(tmp, include)
        for ext in self.extensions:
            ext.sources = [str(wrapper)]
            ext.include_dirs = include
            ext.extra_objects = objects
            ext.extra_link_args = link
            ext.extra_compile_args = ["-fvisibility=hidden", "-Wno-unused-parameter"]
        super().run()

    def build_core(self, root: Path, build: Path) -> str:
        cmake = os.environ.get("CMAKE", "cmake")
        if not shutil.which(cmake):
            fail("cmake is missing: it builds the C core (Debian: apt-get install cmake)")
        build_type = os.environ.get("PUSHLET_BUILD_TYPE", "RelWithDebInfo")
        cache = build / "CMakeCache.txt"
        if cache.is_file() and f"CMAKE_HOME_DIRECTORY:INTERNAL={root}\n" not in cache.read_text():
            shutil.rmtree(build)  # configured for another checkout: CMake would refuse it
        run([cmake, "-S", str(root), "-B", str(build), f"-DCMAKE_BUILD_TYPE={build_type}",
             "-DPUSHLET_BUILD_TESTS=OFF", "-DPUSHLET_BUILD_BENCH=OFF", "-DPUSHLET_BUILD_FUZZ=OFF",
             "-DPUSHLET_SANITIZE="], "configure the C core")
        jobs = str(os.cpu_count() or 2)
        run([cmake, "--build", str(build), "--target", "pushlet_static", "-j", jobs],
            "build the C core")
        lib = build / "lib" / "libpushlet.a"
        if not lib.is_file():
            fail(f"the C core was built but {lib} is missing")
        return str(lib)

    def run_swig(self, tmp: Path, include: list[str]) -> Path:
        out = tmp / "pushlet_wrap.c"
        interface = HERE / "pushlet.i"
        # The SWIG proxy module is not used: the pushlet package imports _pushlet directly.
        run([os.environ.get("SWIG", "swig"), "-python", "-interface", "_pushlet",
             *[f"-I{d}" for d in include], "-outdir", str(tmp), "-o", str(out), str(interface)],
            "generate the Python wrapper")
        return out


class BuildPy(build_py):
    """Build the extension first, so a wheel never misses it (TOOLCHAIN.md)."""

    def run(self) -> None:
        self.run_command("build_ext")
        super().run()


setup(
    options={"build": {"build_base": os.environ.get("PUSHLET_BUILD_BASE", "build")}},
    ext_modules=[Extension("pushlet._pushlet", sources=["pushlet.i"])],
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
)
