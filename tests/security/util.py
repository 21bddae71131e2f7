"""The attacker's tools: raw requests on a socket, and a deliberately misbehaving origin.

The origin here does what careless origins do: it trusts the fields it receives and
echoes them into bodies it marks cacheable (``Cache-Control: public, max-age=60``). If
any field the cache key does not cover reaches it, an innocent client that asks for the
same URL afterwards gets the attacker's page from the cache.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.policy.messages import RequestHead
from proxy.rules.plan import RuleSet
from tests.harness import Origin, Proxy

CACHEABLE = {"Cache-Control": "public, max-age=60", "Content-Type": "application/json"}


@dataclass
class Raw:
    status: int
    fields: list[tuple[str, str]]
    body: bytes
    # The server closed the connection after this response: None unless asked (``see_close``).
    closed: bool | None

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.fields if k.lower() == name.lower()), None)

    @property
    def x_cache(self) -> str:
        return self.header("X-Cache-Status") or ""

    def json(self) -> Any:
        return json.loads(self.body)


def port_of(proxy: Proxy) -> int:
    return proxy.listeners.proxy_addresses[0][1]


async def send_raw(proxy: Proxy, data: bytes, *, head_only: bool = False, see_close: bool = False) -> Raw:
    """Send ``data`` as is on a new connection and read one response (Content-Length framed,
    or up to the close). ``see_close``: then wait (0.2 s at most) to see whether the server
    closes the connection (``closed``); not by default, as a connection kept open costs each
    request those 0.2 s (over a second a test for many)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(proxy))
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")[:-2]
        fields = [(k, v) for k, _, v in (line.partition(": ") for line in lines[1:])]
        status = int(lines[0].split(" ")[1])
        length = next((int(v) for k, v in fields if k.lower() == "content-length"), None)
        if head_only or status in (204, 304):
            body = b""
        elif length is not None:
            body = await asyncio.wait_for(reader.readexactly(length), 10)
        else:
            body = await asyncio.wait_for(reader.read(), 10)
        closed: bool | None = None
        if see_close:
            try:
                closed = await asyncio.wait_for(reader.read(1), 0.2) == b""
            except TimeoutError:
                closed = False
        return Raw(status, fields, body, closed)
    finally:
        writer.close()


def request(method: str, target: str, *fields: str, version: str = "1.1") -> bytes:
    """Request bytes exactly as given (no Host unless a field says so)."""
    lines = [f"{method} {target} HTTP/{version}", *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def get(target: str, *fields: str, host: str | None = "shop.example") -> bytes:
    return request("GET", target, *([f"Host: {host}"] if host is not None else []), *fields)


async def echo(request: web.Request) -> web.Response:
    """A cacheable page that tells what the origin received: Host, target and every field."""
    body = {"host": request.headers.get("Host"), "target": request.raw_path,
            "method": request.method, "fields": [[k, v] for k, v in request.headers.items()]}
    return web.Response(text=json.dumps(body), headers=CACHEABLE)


def echo_origin(origin: Origin, *paths: str) -> None:
    for path in paths:
        origin.route(path, echo)


def received(reply: Raw) -> dict[str, Any]:
    """What the origin said it received, from an echo page (fields by lower-cased name)."""
    data: dict[str, Any] = reply.json()
    fields: dict[str, list[str]] = {}
    for k, v in data["fields"]:
        fields.setdefault(k.lower(), []).append(v)
    data["fields"] = fields
    return data


def head(target: str, lines: list[tuple[str, str]] | None = None) -> RequestHead:
    """A GET of ``target`` on ``a.example`` with these field lines."""
    fields = CIMultiDict([("Host", "a.example"), *(lines or [])])
    return RequestHead("GET", "http", "a.example", target, CIMultiDictProxy(fields))


def assert_plan(rules: RuleSet, target: str, lines: list[tuple[str, str]], rule: str | None,
                detail: str | None) -> None:
    """The rule ``rules`` choose for a GET of ``target`` with ``lines``, and its bypass detail."""
    plan = rules.plan(head(target, lines))
    assert (plan.rule.name if plan.rule else None) == rule
    assert plan.bypass is (detail is not None)
    if detail is not None:
        assert plan.bypass_detail == detail
