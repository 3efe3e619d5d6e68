"""Command line: --help, --version, bad flags (no port needed)."""

import os
import subprocess

import pytest

import pushlet_testlib as pl


def run(*args, timeout=10):
    r = subprocess.run([pl.pushletd_path(), *args], capture_output=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    out = (r.stdout + r.stderr).decode("utf-8", "replace")
    assert not pl.SANITIZER_RE.search(out), f"sanitizer report:\n{out}"
    return r.returncode, out


@pytest.fixture(autouse=True)
def need_binary():
    if not os.path.exists(pl.pushletd_path()):
        pytest.fail(f"pushletd binary not found at {pl.pushletd_path()}")


def test_help():
    rc, out = run("--help")
    assert rc == 0, out
    for flag in ("--listen", "--heartbeat", "--max-output-bytes", "--publish-secret"):
        assert flag in out, f"{flag} missing from --help"


def test_version():
    rc, out = run("--version")
    assert rc == 0, out
    assert out.strip(), "empty --version output"


@pytest.mark.parametrize("args", [
    ["--no-such-flag"],
    ["--listen", "not-an-address"],
    ["--listen", "127.0.0.1:99999"],
    ["--heartbeat", "abc"],
    ["--max-connections", "-1"],
    ["--log-level", "loud"],
    ["--listen"],
], ids=lambda a: " ".join(a))
def test_bad_arguments_fail_cleanly(args):
    # a valid --listen first, so a wrongly accepted argument cannot bind a fixed port
    try:
        rc, out = run("--listen", "127.0.0.1:0", *args, timeout=5 * pl.time_scale())
    except subprocess.TimeoutExpired:
        pytest.fail(f"pushletd accepted {args} and kept running")
    assert rc > 0, f"exit code {rc} for {args}: {out}"
    assert out.strip(), "no error message"
