"""The examples in examples/python run as a new user would run them, with real clients."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import websockets

from conftest import HOST, SSE, run

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Example:
    def __init__(self, name: str, *args: str, ready: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(EXAMPLES / name), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        line = ""
        while ready not in line:
            line = self.proc.stdout.readline()
            if not line and (self.proc.poll() is not None or time.monotonic() > deadline):
                raise AssertionError(f"{name} did not start: {self.proc.stderr.read()}")
        self.line = line

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return self.proc.returncode, out


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="examples/python not in this tree")
def test_publish_script():
    ex = Example("publish_script.py", "--listen", f"{HOST}:0", "--interval", "0.1",
                 ready="listening on")
    try:
        url = ex.line.split()[-1]

        async def main():
            async with aiohttp.ClientSession() as s:
                async with s.get(url) as page:
                    assert "EventSource" in await page.text()
                async with s.get(url + "events?topic=ticks") as resp:
                    tick = await SSE(resp).until("tick")
                    assert re.fullmatch(r"\d\d:\d\d:\d\d", tick["data"])

        run(main())
    finally:
        code, out = ex.stop()
    assert code == 0 and "stopped" in out


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="examples/python not in this tree")
def test_aiohttp_app():
    app_port, broker_port = free_port(), free_port()
    ex = Example("aiohttp_app.py", "--port", str(app_port), "--broker", f"{HOST}:{broker_port}",
                 ready="app on")
    app = f"http://{HOST}:{app_port}"
    ws_url = f"ws://{HOST}:{broker_port}/ws?topic=chat"
    try:
        async def main():
            # Without a session: the broker's on_connect answers 401.
            with pytest.raises(websockets.InvalidStatusCode) as e:
                async with websockets.connect(ws_url, open_timeout=10):
                    pass
            assert e.value.status_code == 401
            jar = aiohttp.CookieJar(unsafe=True)  # keep cookies of an IP-address host
            async with aiohttp.ClientSession(cookie_jar=jar) as s:
                async with s.post(f"{app}/publish", data={"text": "x"}) as r:
                    assert r.status == 401
                async with s.post(f"{app}/login", data={"name": "Zoë"}) as r:
                    assert r.status == 200 and "Hello, <b>Zoë</b>" in await r.text()
                cookie = s.cookie_jar.filter_cookies(app)["session"].value
                async with websockets.connect(ws_url, open_timeout=10, ping_interval=None,
                                              extra_headers={"Cookie": f"session={cookie}"}) as ws:
                    async def next_event(name):
                        while True:
                            m = json.loads(await asyncio.wait_for(ws.recv(), 10))
                            if m.get("event") == name:
                                return m

                    assert (await next_event("presence"))["data"] == "Zoë joined"
                    async with s.post(f"{app}/publish", data={"text": "héllo"}) as r:
                        assert r.status == 200
                    msg = await next_event("message")
                    assert json.loads(msg["data"]) == {"user": "Zoë", "text": "héllo"}

        run(main())
    finally:
        code, _ = ex.stop()
    assert code == 0, ex.proc.stderr.read() if ex.proc.stderr else ""

