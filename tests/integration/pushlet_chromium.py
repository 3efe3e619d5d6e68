"""Headless Chromium driven over the DevTools protocol, for tests with a real browser:
`with chromium_page() as target:` starts a private Chromium, waits for its page target and yields
it (target["webSocketDebuggerUrl"] is the CDP socket); everything is cleaned up afterwards, and
only the processes started here are ended."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.request

import pytest

import pushlet_testlib as pl

CHROMIUM = "/usr/bin/chromium"


def _start(profile, log):
    return subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
         # port 0: Chromium picks a free port and writes it to <profile>/DevToolsActivePort
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)


def _stop(proc):
    """End the Chromium we started (by PID), then any helper left in its own process group."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group we created with start_new_session
    except (ProcessLookupError, PermissionError):
        pass


@contextlib.contextmanager
def chromium_page():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed")
    profile = tempfile.mkdtemp(prefix="pushlet-chromium-")
    log_path = profile + ".log"
    log = open(log_path, "wb")
    proc = _start(profile, log)
    try:
        port_file = os.path.join(profile, "DevToolsActivePort")

        def devtools_port():
            if proc.poll() is not None:
                raise AssertionError(f"chromium exited with {proc.returncode}: "
                                     f"{open(log_path, 'rb').read()[-3000:]!r}")
            try:
                with open(port_file) as f:
                    first = f.readline().strip()
                return int(first) if first.isdigit() else None
            except OSError:
                return None

        port = pl.wait_until(devtools_port, 30, 0.1, "Chromium's DevToolsActivePort")

        def page_target():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2) as r:
                    targets = json.loads(r.read())
            except OSError:
                return None
            pages = [t for t in targets if t.get("type") == "page"
                     and t.get("webSocketDebuggerUrl")]
            return pages[0] if pages else None

        yield pl.wait_until(page_target, 20, 0.1, "a page target")
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(profile, ignore_errors=True)
        try:
            os.unlink(log_path)
        except OSError:
            pass
