"""Which requests may reach the app at all: the `Host` and `Origin` checks in front of every route.

A server on 127.0.0.1 is not private by itself: any web page the user has open can make the
browser send requests to it, and with DNS rebinding (a name that first resolves to the attacker,
then to 127.0.0.1) those requests are same-origin in the browser's eyes. What gives them away is
the `Host` header (the attacker's name) and, for requests that change something, the `Origin` /
`Sec-Fetch-Site` headers. So, on every route (the page, Gradio's own routes, the API, docs):

- `Host` must name this server: loopback names; with `--listen` also the machine's names and
  addresses; with `--share` the tunnel's host; plus `--allowed-hosts`. Otherwise 403.
- A request that changes something (any method but GET/HEAD/OPTIONS, and websockets) with an
  `Origin` must come from this server's own origin (or one of `--cors-allow-origins`), and one
  the browser marks `Sec-Fetch-Site: cross-site` is refused. Programs that send no `Origin`
  (curl, client libraries) are not browsers driven by a foreign page and pass.
- What installs or runs code additionally asks `same_origin()`: the request must carry its origin
  and it must be this server's (see `webui.ui.extensions_tab`).
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SHARE_SUFFIX = ".gradio.live"  # Gradio's share tunnel hands out <id>.gradio.live


def _split_host(value: str) -> tuple[str, str | None]:
    """`host[:port]` (IPv6 in brackets) -> (lower-case host without brackets, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        return value, None
    return host, port


def machine_names() -> set[str]:
    """This machine's host names and addresses (what a browser on the network may call it)."""
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    try:
        import psutil

        for addresses in psutil.net_if_addrs().values():
            for a in addresses:
                if a.family in (socket.AF_INET, socket.AF_INET6):
                    names.add(a.address.split("%")[0].lower())
    except Exception:  # noqa: BLE001  interface listing is a convenience; --allowed-hosts adds more
        pass
    for name in list(names):
        try:
            for info in socket.getaddrinfo(name, None):
                names.add(str(info[4][0]).split("%")[0].lower())
        except OSError:
            pass
    return {n for n in names if n}


@dataclass(frozen=True)
class Policy:
    hosts: frozenset[str]  # allowed Host names ("*" allows any)
    origins: frozenset[str]  # extra allowed origins, "scheme://host[:port]" ("*" allows any)
    share: bool = False

    @classmethod
    def build(cls, *, listen: bool, share: bool, allowed_hosts: Iterable[str] = (),
              cors_origins: Iterable[str] = ()) -> "Policy":
        hosts = set(LOOPBACK)
        if listen:
            hosts |= machine_names()
        hosts |= {_split_host(h)[0] for h in allowed_hosts if h.strip()}
        return cls(frozenset(hosts), frozenset(o.strip().rstrip("/").lower() for o in cors_origins if o.strip()),
                   share)

    def host_allowed(self, host_header: str | None) -> bool:
        if "*" in self.hosts:
            return True
        if not host_header:
            return False
        host, _ = _split_host(host_header)
        return host in self.hosts or (self.share and host.endswith(SHARE_SUFFIX))

    def refusal(self, method: str, headers: Mapping[str, str]) -> str | None:
        """Why a request with these (lower-case) headers is refused, or None."""
        host = headers.get("host")
        if not self.host_allowed(host):
            return (f"host {host!r} is not this server's name (a page on another site may be trying to reach it; "
                    "start with --allowed-hosts NAME to allow that name)")
        if method.upper() in SAFE_METHODS:
            return None
        origin = headers.get("origin")
        if origin is not None:
            origin = origin.strip().rstrip("/").lower()
            if "*" in self.origins or origin in self.origins:
                return None
            if origin == "null" or _split_host(urlsplit(origin).netloc) != _split_host(host or ""):
                return f"origin {origin!r} is not this server's (start with --cors-allow-origins to allow it)"
        if headers.get("sec-fetch-site") == "cross-site":
            return "a cross-site request (from a page of another site) may not change anything here"
        return None


def same_origin(headers: Mapping[str, str]) -> bool:
    """True when a browser says the request comes from a page of this very server: it names its
    origin and that is the request's own host (what installing or running code requires)."""
    origin = headers.get("origin")
    if not origin or headers.get("sec-fetch-site") not in (None, "same-origin"):
        return False
    return _split_host(urlsplit(origin.strip()).netloc) == _split_host(headers.get("host") or "")


class RequestGuard:
    """ASGI middleware applying a `Policy` to every HTTP request and websocket."""

    def __init__(self, app, policy: Policy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        method = scope.get("method", "GET") if scope["type"] == "http" else "WEBSOCKET"
        reason = self.policy.refusal(method, headers)
        if reason is None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
            return
        await _answer(send, 403, reason)


# Gradio routes that act on a session: with --gradio-auth they need the session's login.
SESSION_ROUTES = ("/gradio_api/cancel", "/gradio_api/reset", "/gradio_api/stream/", "/gradio_api/heartbeat/",
                  "/gradio_api/run-history", "/gradio_api/runs", "/gradio_api/queue/", "/gradio_api/call/",
                  "/gradio_api/upload")
_API_INFO = re.compile(rb"<script>window\.gradio_api_info = .*?;</script>", re.S)


def _logged_in(scope) -> bool:
    """Whether the request carries the login of Gradio's auth (its session cookie, read the way
    Gradio reads it). Fails closed: an app without that state counts as not logged in."""
    app = scope.get("app")
    tokens, cookie_id = getattr(app, "tokens", None), getattr(app, "cookie_id", None)
    if not isinstance(tokens, dict) or cookie_id is None:
        return False
    cookies = {}
    for key, value in scope.get("headers", []):
        if key.lower() == b"cookie":
            for part in value.decode("latin-1").split(";"):
                name, _, val = part.strip().partition("=")
                cookies[name] = val
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    return token is not None and tokens.get(token) is not None


class LoginGate:
    """With `--gradio-auth`: nothing about the app before login. The session routes answer 401,
    and the login page (Gradio renders it from the same template as the app) is sent without the
    API description Gradio puts in it (every endpoint, parameter and choice: model names)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or _logged_in(scope):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path.startswith(SESSION_ROUTES):
            await _answer(send, 401, "log in first")
            return
        start: dict = {}
        chunks: list[bytes] = []

        async def buffered(message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            if any(k.lower() == b"content-type" and v.startswith(b"text/html") for k, v in headers):
                body = _API_INFO.sub(b"<script>window.gradio_api_info = null;</script>", body)
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, buffered)


class BodyLimit:
    """Refuses request bodies over `limit` bytes (413) before anything reads them whole: by the
    declared Content-Length, and by counting what arrives when none is declared."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key.lower() == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._refuse(send)
                return
        seen = 0
        refused = started = False

        async def counted():
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    refused = True
                    return {"type": "http.disconnect"}  # the app stops reading: the body ended
            return message

        async def guarded_send(message) -> None:
            nonlocal started
            if refused:  # the app's own answer to a cut body is replaced by ours
                if not started:
                    started = True
                    await self._refuse(send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded_send)
        except Exception:
            if not refused:
                raise
            if not started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        await _answer(send, 413, f"request body over this server's limit of {self.limit // 2**20} MiB (--max-body-mb)")


async def _answer(send, status: int, reason: str) -> None:
    """A JSON error answer in the API's shape, `{"error", "detail"}`."""
    body = json.dumps({"error": reason, "detail": reason}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
