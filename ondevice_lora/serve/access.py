"""Who may talk to the server: an API key, a Host allowlist, and no web page unless allowed.

An adapter trained on personal data answers with it, so the server keeps strangers out:

- Host allowlist (loopback names by default): a web page that rebinds its own DNS name to
  127.0.0.1 (DNS rebinding) sends its own name as Host and is refused, so it cannot read replies.
- Origin: browsers send it on every cross-origin POST, even a "simple" text/plain one that needs
  no preflight; a request whose Origin is not in --allowed-origins is refused before it reaches
  the model. CORS headers are sent only for those origins.
- API key (`Authorization: Bearer KEY`), compared in constant time; required to listen beyond
  loopback.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from ..errors import OndeviceLoraError
from .schema import APIError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# Addresses that listen on every interface.
WILDCARD_HOSTS = ("", "0.0.0.0", "::")


@dataclasses.dataclass
class AccessConfig:
    """`ondevice-lora serve --api-key / --allowed-hosts / --allowed-origins`."""

    api_key: str | None = None
    # Host header names (no port) the server answers; "*" answers any.
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    # Origins (scheme://host[:port]) whose pages may call the server, with CORS; "*" any.
    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self):
        if self.api_key is not None and not self.api_key.strip():
            raise OndeviceLoraError("--api-key is empty; pass a secret, or leave it out.")
        self.allowed_hosts = tuple(h.lower() for h in self.allowed_hosts)
        self.allowed_origins = tuple(o.rstrip("/").lower() for o in self.allowed_origins)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(bind_host: str) -> tuple[str, ...]:
    """Loopback names, and the address listened on when it is one address (not a wildcard)."""
    if bind_host in WILDCARD_HOSTS or bind_host.lower() in LOOPBACK_HOSTS:
        return LOOPBACK_HOSTS
    return (*LOOPBACK_HOSTS, bind_host.lower())


def check_bind(host: str, access: AccessConfig) -> str | None:
    """The warning to show for listening on `host`, or None on loopback; raises when listening
    beyond loopback without an API key."""
    if is_loopback(host):
        return None
    if access.api_key is None:
        raise OndeviceLoraError(
            f"--host {host} listens beyond this machine: anyone who can reach it could read "
            "your adapters' answers. Pass --api-key SECRET (or set ONDEVICE_LORA_API_KEY), "
            "or keep the default --host 127.0.0.1."
        )
    hosts = ", ".join(access.allowed_hosts)
    return (
        f"warning: listening on {host}, beyond this machine. Requests need the API key; "
        f"they must name one of these hosts in their Host header: {hosts} (--allowed-hosts). "
        "Traffic is plain HTTP: put TLS in front of it on an untrusted network."
    )


def host_name(header: str) -> str:
    """The name in a Host header, without its port: "[::1]:8080" -> "::1"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class AccessGuard:
    """ASGI middleware answering the three checks above, in OpenAI's error shape."""

    def __init__(self, app, config: AccessConfig):
        self.app = app
        self.config = config

    def _refusal(self, scope) -> APIError | None:
        config = self.config
        headers = Headers(scope=scope)
        host = host_name(headers.get("host", ""))
        if "*" not in config.allowed_hosts and host not in config.allowed_hosts:
            return APIError(
                400,
                f"Host {host!r} is not one this server answers to ({', '.join(config.allowed_hosts)}"
                "); start it with --allowed-hosts to add a name.",
                code="host_not_allowed",
            )
        origin = headers.get("origin")
        if origin is not None:
            if "*" not in config.allowed_origins and origin.lower() not in config.allowed_origins:
                return APIError(
                    403,
                    f"requests from web pages at {origin!r} are not allowed; start the server "
                    "with --allowed-origins to let a page call it.",
                    code="origin_not_allowed",
                )
            if scope["method"] == "OPTIONS":
                return None  # a CORS preflight carries no credentials: CORS answers it
        if config.api_key is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            valid = scheme.lower() == "bearer" and hmac.compare_digest(
                given.strip().encode(), config.api_key.encode()
            )
            if not valid:
                return APIError(
                    401,
                    "missing or wrong API key: send the header Authorization: Bearer KEY "
                    "(openai clients: api_key=KEY).",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                response = JSONResponse(refusal.body, refusal.status, headers=refusal.headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def with_access(app, config: AccessConfig):
    """`app` behind the access checks, with CORS for the allowed origins (if any)."""
    if config.allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        app = CORSMiddleware(
            app,
            allow_origins=list(config.allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return AccessGuard(app, config)
