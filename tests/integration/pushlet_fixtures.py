"""pytest fixtures and hooks for pushletd tests; conftest.py in tests/integration and
tests/browser import everything from here."""

import os
import signal

import pytest

import pushlet_testlib as pl

DEFAULT_TEST_TIMEOUT = 120.0


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "timeout(seconds): hard per-test bound (default 120 s, scaled for sanitizers)")


class HardTimeout(BaseException):
    """Raised by SIGALRM when a test exceeds its hard bound (BaseException: not swallowed)."""


@pytest.fixture(autouse=True)
def hard_timeout(request):
    """Every test is bounded, even if a helper forgets a timeout."""
    m = request.node.get_closest_marker("timeout")
    seconds = (m.args[0] if m else DEFAULT_TEST_TIMEOUT) * pl.time_scale()

    def on_alarm(signum, frame):
        raise HardTimeout(f"test exceeded its hard bound of {seconds:.0f}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def pushletd(request, tmp_path_factory):
    """Factory: pushletd(*flags, env={...}) starts a server on 127.0.0.1:0 and returns it.

    At teardown every server still running gets SIGTERM; each must exit 0 within its stop
    timeout (+ slack) and its stderr must not contain a sanitizer report. Server stderr is
    attached to the report of a failing test.
    """
    binary = pl.pushletd_path()
    if not os.path.exists(binary):
        pytest.fail(f"pushletd binary not found at {binary} (build it or set PUSHLETD=...)")
    servers = []
    request.node._pushletd_servers = servers

    def start(*args, env=None):
        s = pl.Server(args=args, env=env, binary=binary,
                      workdir=str(tmp_path_factory.mktemp("pushletd")))
        servers.append(s)
        s.start()
        return s

    try:
        yield start
        _check_servers(servers)
    finally:
        # whatever happened (even the hard timeout firing), leave no server of ours running
        for s in servers:
            if s.proc is not None and s.proc.poll() is None:
                os.kill(s.proc.pid, signal.SIGKILL)
                s.proc.wait(timeout=10)
            s._close_files()


def _check_servers(servers):
    problems = []
    for s in servers:
        if s.proc is None:
            continue
        if s.returncode is None:
            try:
                rc = s.stop()
            except pl.Timeout as e:
                problems.append(f"pid {s.proc.pid}: {e}")
                rc = s.returncode
            if rc != 0:
                problems.append(f"pid {s.proc.pid}: exit code {rc} after SIGTERM (expected 0)")
        report = s.sanitizer_report()
        if report:
            problems.append(f"pid {s.proc.pid}: sanitizer report in stderr:\n{report}")
    if problems:
        tails = "\n".join(f"--- stderr of pushletd pid {s.proc.pid} ({' '.join(s.cmd)}) ---\n"
                          f"{s.stderr_tail()}" for s in servers if s.proc is not None)
        pytest.fail("pushletd teardown problems:\n" + "\n".join(problems) + "\n" + tails,
                    pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for s in getattr(item, "_pushletd_servers", []):
            if s.proc is not None:
                rep.sections.append((f"pushletd pid {s.proc.pid} stderr ({rep.when})",
                                     f"command: {' '.join(s.cmd)}\n{s.stderr_tail()}"))
