"""What every request to `instructkit serve` passes before any route sees it (plain ASGI, so it
also covers the responses it writes itself):

- the Host header names this server: the bound address, `localhost` on a loopback bind, any IP
  address on a wildcard bind, or a name given with --allowed-hosts. A web page on another origin
  can make a browser reach 127.0.0.1 through DNS rebinding, but its requests carry its own name.
- the API key, on /v1/ routes, when one is set (compared in constant time).
- the body is at most `max_request_bytes`: a larger one is refused with 413 before anything
  parses it (by its Content-Length, or while reading when it has none).
- every response, errors included, carries the page's Content-Security-Policy.
"""

from __future__ import annotations

import hmac
import ipaddress

from fastapi.responses import JSONResponse

from instructkit.serve.protocol import ApiError

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostCheck:
    """Which Host header names a server bound to `bound` answers to."""

    def __init__(self, bound: str, extra: list[str] = ()):
        self.bound, self.extra = bound.lower(), {name.lower() for name in extra}

    def allows(self, name: str) -> bool:
        if "*" in self.extra or name == self.bound or name in self.extra:
            return True
        if self.bound in LOOPBACK:
            return name in LOOPBACK
        return self.bound in ("0.0.0.0", "::", "") and _is_ip(name)


def _host_name(header: str) -> str:
    """The name in a Host header, without the port ("[::1]:8000" -> "::1")."""
    if header.startswith("["):
        return header[1 : header.find("]")].lower()
    return header.rsplit(":", 1)[0].lower() if header.count(":") == 1 else header.lower()


class Guard:
    def __init__(self, app, *, api_key: str | None, hosts: HostCheck | None, max_request_bytes: int):
        self.app, self.api_key, self.hosts, self.limit = app, api_key, hosts, max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k.lower().encode() not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        refusal = self._refusal(scope, headers)
        body = None
        if refusal is None and scope["method"] not in ("GET", "HEAD"):
            body, refusal = await self._read_body(receive, headers)
        if refusal is not None:
            return await JSONResponse(refusal.body(), status_code=refusal.status)(scope, receive, send_with_headers)
        await self.app(scope, _replay(body, receive) if body is not None else receive, send_with_headers)

    def _refusal(self, scope, headers: dict[str, str]) -> ApiError | None:
        name = _host_name(headers.get("host", ""))
        if self.hosts is not None and not self.hosts.allows(name):
            return ApiError(400, f"Host {name!r} is not allowed (this server answers to {self.hosts.bound}; "
                                 "add names with --allowed-hosts)", code="invalid_host")
        if self.api_key and scope["path"].startswith("/v1/"):
            header = headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return ApiError(401, "Incorrect or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key")
        return None

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than this server's limit of {self.limit:,} bytes "
                             "(--max-request-bytes)", code="request_too_large")

    async def _read_body(self, receive, headers: dict[str, str]) -> tuple[bytes | None, ApiError | None]:
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return None, self._too_large()
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks), None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return None, self._too_large()
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _replay(body: bytes, receive):
    """A receive that gives the app the body already read, then the client's later messages."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
