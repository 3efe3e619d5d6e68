#!/usr/bin/env python3
"""A small chat: an aiohttp app with a Pushlet broker embedded on the same asyncio loop.

    python examples/python/aiohttp_app.py     # app on http://127.0.0.1:8000/, broker on :8080

- GET /            the page: a login form, then the chat.
- POST /login      takes a name, sets a `session` cookie (HttpOnly).
- POST /publish    publishes the text to topic "chat" as the logged-in user (401 otherwise).
- The browser connects to the broker's WebSocket (ws://127.0.0.1:8080/ws?topic=chat). Browsers
  send the app's cookies on that handshake (cookies are per host, not per port), so the broker's
  `on_connect` hook, an `async def` running on this loop, looks the session up and allows the
  connection as that user, or answers 401. Lifecycle hooks announce who joins and leaves.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import logging
import secrets

from aiohttp import web

import pushlet

SESSIONS: dict[str, str] = {}  # session id -> user name (a real app: a database)
TOPIC = "chat"

LOGIN = """<!doctype html><meta charset="utf-8"><title>Pushlet chat</title>
<form method="post" action="/login">Name: <input name="name" autofocus> <button>Enter</button></form>
"""

CHAT = """<!doctype html><meta charset="utf-8"><title>Pushlet chat</title>
<p>Hello, <b>{user}</b>.</p>
<form id="f"><input id="text" autofocus autocomplete="off"> <button>Send</button></form>
<ul id="log"></ul>
<script>
const log = text => {{ const li = document.createElement("li"); li.textContent = text;
  document.getElementById("log").prepend(li); }};
const ws = new WebSocket("ws://" + location.hostname + ":{broker_port}/ws?topic={topic}");
ws.onmessage = async e => {{
  const m = JSON.parse(await e.data.text());
  if (m.event === "message") {{ const c = JSON.parse(m.data); log(c.user + ": " + c.text); }}
  else if (m.event === "presence") log("* " + m.data);
}};
ws.onclose = e => log("(disconnected: " + (e.reason || e.code) + ")");
document.getElementById("f").onsubmit = async ev => {{
  ev.preventDefault();
  const text = document.getElementById("text");
  await fetch("/publish", {{method: "POST", body: new URLSearchParams({{text: text.value}})}});
  text.value = "";
}};
</script>
"""


def session_user(cookies: dict[str, str]) -> str | None:
    return SESSIONS.get(cookies.get("session", ""))


async def index(request: web.Request) -> web.Response:
    user = session_user(dict(request.cookies))
    if user is None:
        return web.Response(text=LOGIN, content_type="text/html")
    page = CHAT.format(user=html.escape(user), broker_port=request.app["broker"].port,
                       topic=TOPIC)
    return web.Response(text=page, content_type="text/html")


async def login(request: web.Request) -> web.Response:
    name = (await request.post()).get("name", "")
    if not isinstance(name, str) or not name.strip() or len(name) > 64:
        raise web.HTTPBadRequest(text="a name of 1 to 64 characters, please")
    sid = secrets.token_urlsafe(24)
    SESSIONS[sid] = name.strip()
    response = web.HTTPFound("/")
    response.set_cookie("session", sid, httponly=True, samesite="Lax")
    raise response


async def publish(request: web.Request) -> web.Response:
    user = session_user(dict(request.cookies))
    if user is None:
        raise web.HTTPUnauthorized(text="log in first")
    text = (await request.post()).get("text", "")
    if not isinstance(text, str) or not text:
        raise web.HTTPBadRequest(text="empty message")
    broker: pushlet.Pushlet = request.app["broker"]
    try:
        broker.publish(TOPIC, "message", json.dumps({"user": user, "text": text}))
    except pushlet.QueueFull:
        raise web.HTTPServiceUnavailable(text="busy, try again")
    return web.json_response({"ok": True})


async def on_connect(request: pushlet.ConnectRequest) -> pushlet.Allow | pushlet.Deny:
    """Runs on the app's loop; may await (a database lookup)."""
    user = session_user(request.cookies)
    if user is None:
        return pushlet.Deny(401, "log in first")
    return pushlet.Allow(user=user)


def broker_context(listen: str):
    async def context(app: web.Application):
        broker = pushlet.Pushlet(listen=listen, heartbeat=15, loop=asyncio.get_running_loop(),
                                 on_connect=on_connect)
        broker.on_connected = lambda c: broker.publish(TOPIC, "presence", f"{c.user} joined")
        broker.on_disconnected = lambda c, why: broker.publish(TOPIC, "presence",
                                                               f"{c.user} left")
        broker.start()
        app["broker"] = broker
        yield
        broker.close()

    return context


def make_app(broker_listen: str) -> web.Application:
    app = web.Application()
    app.add_routes([web.get("/", index), web.post("/login", login),
                    web.post("/publish", publish)])
    app.cleanup_ctx.append(broker_context(broker_listen))
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description="aiohttp + Pushlet chat example")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--broker", default="127.0.0.1:8080", help="broker host:port (0: any)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = make_app(args.broker)

    async def announce(app: web.Application) -> None:
        print(f"app on http://{args.host}:{args.port}/ broker on port {app['broker'].port}",
              flush=True)

    app.on_startup.append(announce)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
