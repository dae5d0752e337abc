"""WebSocket echo server and clients for the e2e `websocket` scenario, on Python's `websockets`.

Usage:
  ws.py serve HOST PORT        echo every message; a plain GET gets 200 "server: ws" (probes)
  ws.py clients URL N SECONDS  N tunnels, each sending a numbered message every 100 ms and
                               waiting for its echo, until the proxy closes it or SECONDS pass

The clients print `open N` once every tunnel has had its first echo, then one JSON line per
tunnel when it ends: its index, echoes, when it last got one and when it closed (unix seconds),
and the close code the proxy sent (null: no close frame).
"""

import asyncio
import http
import json
import sys
import time

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed


async def echo(ws):
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        pass


def plain_get(connection, request):
    if "upgrade" not in request.headers.get("Connection", "").lower():
        return connection.respond(http.HTTPStatus.OK, "server: ws\n")
    return None


async def run_server(host, port):
    # No pings of its own: only the clients' messages move, so idle time means what it says.
    async with serve(echo, host, port, process_request=plain_get, ping_interval=None):
        print(f"listening on {host}:{port}", flush=True)
        await asyncio.Future()


async def tunnel(url, i, opened, all_open, deadline):
    result = {"tunnel": i, "echoes": 0, "last_echo_at": None, "closed_at": None, "code": None}
    try:
        async with connect(url, ping_interval=None, open_timeout=10, close_timeout=5) as ws:
            n = 0
            while time.time() < deadline:
                n += 1
                message = f"{i}-{n}"
                await ws.send(message)
                got = await asyncio.wait_for(ws.recv(), timeout=5)
                if got != message:
                    result["error"] = f"echo {got!r} for {message!r}"
                    break
                result["echoes"] += 1
                result["last_echo_at"] = time.time()
                if n == 1:
                    opened.append(i)
                    if len(opened) == all_open:
                        print(f"open {all_open}", flush=True)
                await asyncio.sleep(0.1)
    except ConnectionClosed as e:
        result["closed_at"] = time.time()
        result["code"] = e.rcvd.code if e.rcvd is not None else None
    except Exception as e:  # noqa: BLE001 - every failure is reported, the test judges it
        result["closed_at"] = time.time()
        result["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(result), flush=True)


async def run_clients(url, n, seconds):
    deadline = time.time() + seconds
    opened = []
    await asyncio.gather(*(tunnel(url, i, opened, n, deadline) for i in range(n)))


def main():
    if sys.argv[1] == "serve":
        asyncio.run(run_server(sys.argv[2], int(sys.argv[3])))
    elif sys.argv[1] == "clients":
        asyncio.run(run_clients(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}")


if __name__ == "__main__":
    main()
