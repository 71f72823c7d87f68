"""Who may use the daemon's HTTP front end, and from where: API keys, the ``Host`` and ``Origin`` checks, CORS.

Every HTTP request passes :meth:`HttpSecurity.check` before it is routed, the
proxied OpenAI routes included, in this order:

1. ``Host``. A daemon bound to a loopback address serves only requests that
   name it by a loopback name or address (``localhost``, ``127.0.0.0/8``,
   ``[::1]``, any port) or by a name of ``allowed_hosts``. This defeats DNS
   rebinding: a web page whose own name an attacker points at 127.0.0.1 still
   sends that name as ``Host``. A daemon bound to another address (a pod
   probed by its IP) accepts any ``Host`` unless ``allowed_hosts`` is set;
   then the loopback names, IP addresses (a rebound name is never an IP
   address) and the listed names. Refused with **421 Misdirected Request**,
   code ``invalid_host``: the status RFC 9110 gives a request sent to a server
   that does not serve its authority, which is exactly the case, and which
   keeps 400 for malformed requests.
2. ``Origin``. A browser request from another origin is refused (403,
   ``origin_not_allowed``) unless that origin is in ``allowed_origins``: a web
   page cannot use the API, even with ``Content-Type: text/plain`` requests
   that need no CORS preflight. ``Sec-Fetch-Site: cross-site`` without an
   allowed ``Origin`` counts as cross-origin too. Allowed origins get their
   preflight (``OPTIONS``) answered and ``Access-Control-Allow-Origin`` on
   the answers.
3. The API key, when any is configured: ``Authorization: Bearer KEY`` on every
   route but ``GET /health``, else 401 ``invalid_api_key`` with
   ``WWW-Authenticate: Bearer``.

The checks are a few header lookups per request: the cost is measured by
``bench/security.py`` (about a microsecond).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from starlette.types import Message, Scope, Send

from ._proxy import _send_error

if TYPE_CHECKING:
    from pydantic import SecretStr

    from ..runtime import ServeConfig

__all__ = [
    "HttpSecurity",
    "bearer_token",
    "check_credentials",
    "host_allowed",
    "host_of",
    "is_ip_address",
    "is_loopback",
    "normal_origin",
    "origin_allowed",
    "same_origin",
]

_ANY = b"*"
_DEFAULT_PORTS = {b"http": b"80", b"https": b"443"}
_ORIGIN_RE = re.compile(rb"(https?)://(\[[0-9a-f:.]+\]|[^/:\[\]]+)(?::(\d{1,5}))?")
_TOKEN_LIST_RE = re.compile(rb"[A-Za-z0-9!#$%&'*+.^_`|~-]+(?:\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")
#: Host header values already accepted, remembered up to this many (an attacker could send endless new ones).
_KNOWN_HOSTS = 64


# --- the pure checks ---------------------------------------------------------------------------


def host_of(authority: bytes) -> bytes:
    """The host of a ``Host`` header value: lower case, without its port or a final dot (IPv6 kept in brackets).

    ``b""`` when there is none (an empty value or a bracket left open).
    """
    authority = authority.strip().lower()
    if authority.startswith(b"["):
        end = authority.find(b"]")
        return authority[: end + 1] if end > 0 else b""
    host = authority.partition(b":")[0]
    return host.removesuffix(b".")


def _ip(host: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        if host.startswith(b"["):
            return ipaddress.IPv6Address(host[1:-1].decode("ascii"))
        return ipaddress.IPv4Address(host.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return None


def is_loopback(host: bytes) -> bool:
    """Whether ``host`` (as :func:`host_of` returns it) is ``localhost``, in 127.0.0.0/8 or ``[::1]``."""
    if host == b"localhost":
        return True
    if not (host.startswith(b"127.") or host.startswith(b"[")):
        return False
    ip = _ip(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip is not None and ip.is_loopback


def is_ip_address(host: bytes) -> bool:
    """Whether ``host`` (as :func:`host_of` returns it) is an IPv4 address or a bracketed IPv6 one."""
    return _ip(host) is not None


def _normal_host(host: bytes) -> bytes:
    """IPv6 addresses in their compressed form (``[0:0::1]`` is ``[::1]``); anything else as it is."""
    if host.startswith(b"["):
        ip = _ip(host)
        if ip is not None:
            return b"[" + ip.compressed.encode() + b"]"
    return host


def host_allowed(host_header: bytes | None, *, loopback_only: bool, allowed: frozenset[bytes]) -> bool:
    """Whether a request whose ``Host`` is ``host_header`` may be served.

    ``loopback_only``: the daemon listens on a loopback address. ``allowed``:
    the ``allowed_hosts`` of the config, normalised (lower case, IPv6 in
    brackets), maybe ``b"*"``. A request without ``Host`` (HTTP/1.0) passes:
    browsers always send one.
    """
    if host_header is None or _ANY in allowed:
        return True
    host = host_of(host_header)
    if is_loopback(host) or _normal_host(host) in allowed:
        return True
    if loopback_only:
        return False
    return not allowed or is_ip_address(host)


def normal_origin(origin: bytes) -> bytes | None:
    """``origin`` as browsers serialise it: lower case, no default port, IPv6 compressed. None if malformed."""
    match = _ORIGIN_RE.fullmatch(origin.strip().lower())
    if match is None:
        return None
    scheme, host, port = match.groups()
    host = _normal_host(host.removesuffix(b"."))
    if port is None or port.lstrip(b"0") == _DEFAULT_PORTS[scheme]:
        return scheme + b"://" + host
    return scheme + b"://" + host + b":" + (port.lstrip(b"0") or b"0")


def same_origin(origin: bytes, host_header: bytes | None, scheme: str) -> bool:
    """Whether ``Origin: origin`` is the origin the request itself was sent to (its scheme and ``Host``)."""
    if host_header is None:
        return False
    expected = scheme.encode("ascii") + b"://" + host_header
    if origin == expected:  # what a browser sends for a same-origin request: no parsing
        return True
    mine = normal_origin(expected)
    return mine is not None and normal_origin(origin) == mine


def origin_allowed(origin: bytes, allowed: frozenset[bytes]) -> bool:
    """Whether ``origin`` is one of ``allowed`` (normalised ``scheme://host[:port]`` strings, maybe ``b"*"``)."""
    if _ANY in allowed or origin in allowed:
        return True
    normal = normal_origin(origin)
    return normal is not None and normal in allowed


def bearer_token(authorization: bytes) -> bytes | None:
    """The token of an ``Authorization: Bearer TOKEN`` header value (the scheme in any case); None for others."""
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip() or None


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def check_credentials(authorization: bytes | None, key_digests: Iterable[bytes]) -> bool:
    """Whether the request presents one of the API keys (given as their SHA-256 digests).

    The token is hashed and compared with every key in constant time
    (:func:`hmac.compare_digest`, no early exit): neither which key matched nor
    how much of one did, nor the keys' lengths, shows in the timing.

    This is the one place a credential is checked. A browser login would be
    accepted here too: a route that takes a key and sets an ``HttpOnly``,
    ``SameSite=Strict`` session cookie, whose value this function would then
    check the same way (a ``cookie`` argument beside ``authorization``), so
    that every route keeps a single gate. The ``Origin`` check that runs first
    already refuses the cross-site requests such a cookie would need
    protecting from. (CORS answers would then need
    ``Access-Control-Allow-Credentials`` and could not use ``*``.)
    """
    if authorization is None:
        return False
    token = bearer_token(authorization)
    if token is None:
        return False
    presented = _digest(token)
    found = False
    for digest in key_digests:
        found |= hmac.compare_digest(presented, digest)
    return found


# --- the ASGI glue -----------------------------------------------------------------------------


class _Verdict:
    """What :meth:`HttpSecurity.check` decided for a request that is not simply let through."""

    __slots__ = ("code", "cors", "headers", "message", "status", "type")

    def __init__(
        self,
        status: int = 0,
        message: str = "",
        code: str = "",
        *,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
        cors: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.status = status  # 0: let through (with CORS headers added to the answer)
        self.message = message
        self.code = code
        self.type = type_
        self.headers = headers or {}
        self.cors = cors or []

    async def answer(self, send: Send) -> None:
        """Send the refusal (or the preflight's answer) in place of the app's."""
        if self.status == 204:
            await send({"type": "http.response.start", "status": 204, "headers": self.cors})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        headers = dict(self.headers)
        headers.update((k.decode("latin-1"), v.decode("latin-1")) for k, v in self.cors)
        await _send_error(send, self.code, self.message, status=self.status, headers=headers)

    def wrap(self, send: Send) -> Send:
        """``send`` adding the CORS headers to the answer's head."""
        cors = self.cors

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *cors]}
            await send(message)

        return send_with_cors


class HttpSecurity:
    """The HTTP front end's gate: ``Host``, ``Origin`` (and CORS) and API key checks, in that order.

    ``loopback``: the daemon listens on a loopback address (the ``Host``
    check is then strict). ``api_keys`` empty: no key is asked for. The keys
    are kept only as SHA-256 digests and never shown.
    """

    __slots__ = ("_hosts", "_key_digests", "_known_hosts", "_loopback", "_origins")

    def __init__(
        self,
        *,
        api_keys: Iterable[str | SecretStr] = (),
        allowed_hosts: Iterable[str] = (),
        allowed_origins: Iterable[str] = (),
        loopback: bool = True,
    ) -> None:
        keys = [k if isinstance(k, str) else k.get_secret_value() for k in api_keys]
        self._key_digests = tuple(_digest(k.encode("ascii")) for k in keys)
        self._hosts = frozenset(_normal_host(h.lower().encode("ascii")) for h in allowed_hosts)
        self._origins = frozenset(o.lower().encode("ascii") for o in allowed_origins)
        self._loopback = loopback
        self._known_hosts: set[bytes] = set()

    @classmethod
    def from_config(cls, config: ServeConfig, *, loopback: bool) -> HttpSecurity:
        """The gate for ``config`` (its ``api_keys``, ``allowed_hosts`` and ``allowed_origins``)."""
        return cls(
            api_keys=config.api_keys,
            allowed_hosts=config.allowed_hosts,
            allowed_origins=config.allowed_origins,
            loopback=loopback,
        )

    @property
    def requires_key(self) -> bool:
        """Whether requests need an API key."""
        return bool(self._key_digests)

    def check(self, scope: Scope) -> _Verdict | None:
        """None to let the request through unchanged, else what to do: refuse it, answer its
        preflight, or add CORS headers to its answer."""
        headers = dict(scope["headers"])
        host = headers.get(b"host")
        if host is not None and host not in self._known_hosts:
            if not host_allowed(host, loopback_only=self._loopback, allowed=self._hosts):
                shown = host.decode("latin-1")[:100]
                return _Verdict(
                    421,
                    f"this server does not serve the host {shown!r}: name it by a loopback address,"
                    " or add the name to allowed_hosts in the daemon's config",
                    "invalid_host",
                )
            if len(self._known_hosts) < _KNOWN_HOSTS:
                self._known_hosts.add(host)
        cors: list[tuple[bytes, bytes]] | None = None
        origin = headers.get(b"origin")
        if origin is not None:
            if not same_origin(origin, host, scope.get("scheme", "http")):
                if not origin_allowed(origin, self._origins):
                    return _cross_origin(origin.decode("latin-1")[:100])
                cors = [
                    (b"access-control-allow-origin", _ANY if _ANY in self._origins else origin),
                    (b"vary", b"Origin"),
                ]
                if scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
                    return _preflight(cors, headers.get(b"access-control-request-headers"))
        elif headers.get(b"sec-fetch-site") == b"cross-site":
            return _cross_origin(None)
        if self._key_digests and not (scope["path"] == "/health" and scope["method"] in ("GET", "HEAD")):
            if not check_credentials(headers.get(b"authorization"), self._key_digests):
                missing = b"authorization" not in headers
                return _Verdict(
                    401,
                    "missing API key: send it as 'Authorization: Bearer KEY'" if missing else "invalid API key",
                    "invalid_api_key",
                    headers={"WWW-Authenticate": 'Bearer realm="llamaproc"'},
                    cors=cors,
                )
        return None if cors is None else _Verdict(cors=cors)


def _cross_origin(origin: str | None) -> _Verdict:
    who = f"from {origin!r}" if origin is not None else "from another site"
    return _Verdict(
        403,
        f"cross-origin requests {who} are not allowed: add the origin to allowed_origins in the daemon's config",
        "origin_not_allowed",
    )


def _preflight(cors: list[tuple[bytes, bytes]], requested: bytes | None) -> _Verdict:
    """The answer to an allowed origin's CORS preflight: the methods, and the request headers
    asked for when the list is well-formed (an allowed origin is trusted with any: the official
    clients send headers of their own), else ``Authorization`` and ``Content-Type``."""
    allowed = b"Authorization, Content-Type"
    if requested is not None and _TOKEN_LIST_RE.fullmatch(requested.strip()):
        allowed = requested.strip()
    return _Verdict(
        204,
        cors=[
            *cors,
            (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
            (b"access-control-allow-headers", allowed),
            (b"access-control-max-age", b"600"),
        ],
    )
