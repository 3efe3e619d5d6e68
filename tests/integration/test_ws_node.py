"""Node.js WebSocket clients (`ws` + `@msgpack/msgpack`) against pushletd: runs
tests/integration/node/ws_client.test.mjs with node's test runner.

Skipped only when `node` is missing. Installs the node dependencies itself when
node/node_modules is absent (npm ci, offline first, then from the registry).
"""

import os
import shutil
import subprocess

import pytest

import pushlet_testlib as pl

NODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node")


def ensure_node_modules():
    pl.npm_ci(NODE_DIR, ("ws", "@msgpack/msgpack"))


@pytest.mark.timeout(400)
def test_node_ws_client(pushletd):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    ensure_node_modules()
    srv = pushletd()
    env = dict(os.environ, PUSHLET_URL=srv.base,
               PUSHLET_TEST_TIME_SCALE=str(pl.time_scale()))
    try:
        r = subprocess.run([node, "--test", "--test-reporter=tap", "ws_client.test.mjs"],
                           cwd=NODE_DIR, env=env, capture_output=True, text=True,
                           timeout=120 * pl.time_scale(), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"node tests did not finish in time:\n{e.stdout}\n{e.stderr}")
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"node --test failed (exit {r.returncode}):\n{out}"
    assert "# fail 0" in out and "# pass 6" in out, out
