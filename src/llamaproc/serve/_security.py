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
   route but ``GET /health`` and the dashboard's page and login, else 401
   ``invalid_api_key`` with ``WWW-Authenticate: Bearer``. A browser, whose
   ``EventSource`` cannot send that header, logs in once instead
   (``POST /ui/login`` with a key): it gets a session cookie (a random token
   the daemon keeps in :class:`Sessions`, never the key), accepted in place of
   the header for ``GET`` (and ``HEAD``) of ``/ui`` and ``/api/*`` and for
   ``POST /ui/logout`` only. Every route that changes something still wants the
   header, so a page that made a browser send the cookie could change nothing;
   and the cookie is ``SameSite=Strict`` and the ``Origin`` check refuses
   other origins besides.

The checks are a few header lookups per request: the cost is measured by
``bench/security.py`` (about a microsecond).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from starlette.requests import cookie_parser
from starlette.types import Message, Scope, Send

from ._proxy import _send_error

if TYPE_CHECKING:
    from pydantic import SecretStr

    from ..runtime import ServeConfig

__all__ = [
    "MAX_SESSIONS",
    "SESSION_COOKIE",
    "SESSION_TTL",
    "HttpSecurity",
    "Sessions",
    "bearer_token",
    "check_credentials",
    "host_allowed",
    "host_of",
    "is_ip_address",
    "is_loopback",
    "normal_origin",
    "origin_allowed",
    "same_origin",
    "session_cookie",
]

_ANY = b"*"
_DEFAULT_PORTS = {b"http": b"80", b"https": b"443"}
_ORIGIN_RE = re.compile(rb"(https?)://(\[[0-9a-f:.]+\]|[^/:\[\]]+)(?::(\d{1,5}))?")
_TOKEN_LIST_RE = re.compile(rb"[A-Za-z0-9!#$%&'*+.^_`|~-]+(?:\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")
#: Host header values already accepted, remembered up to this many (an attacker could send endless new ones).
_KNOWN_HOSTS = 64
#: The name of the dashboard's session cookie.
SESSION_COOKIE = "llamaproc_session"
#: Seconds a dashboard login lasts.
SESSION_TTL = 12 * 3600.0
#: Logins kept at once; a new one beyond ends the oldest.
MAX_SESSIONS = 64
#: Routes that need no key: the health probe, the dashboard's page and its login.
_PUBLIC = frozenset(
    {
        ("GET", "/health"),
        ("HEAD", "/health"),
        ("GET", "/ui"),
        ("HEAD", "/ui"),
        ("GET", "/ui/dashboard.js"),
        ("HEAD", "/ui/dashboard.js"),
        ("POST", "/ui/login"),
    }
)


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

    The dashboard's login (:meth:`HttpSecurity.login`) compares its key the
    same way; the session cookie it gives is checked next to this, by the same
    gate. The ``Origin`` check that runs first refuses the cross-site requests
    such a cookie needs protecting from, and CORS answers never carry
    ``Access-Control-Allow-Credentials``: an allowed origin uses the header.
    """
    if authorization is None:
        return False
    token = bearer_token(authorization)
    return token is not None and _is_key(token, key_digests)


def _is_key(token: bytes, key_digests: Iterable[bytes]) -> bool:
    presented = _digest(token)
    found = False
    for digest in key_digests:
        found |= hmac.compare_digest(presented, digest)
    return found


def session_cookie(header: bytes | None) -> bytes | None:
    """The session token of a ``Cookie`` header value, if it has one."""
    if header is None:
        return None
    value = cookie_parser(header.decode("latin-1")).get(SESSION_COOKIE)
    return value.encode("latin-1") if value else None


class Sessions:
    """The dashboard's logins: random tokens, each valid for ``ttl`` seconds, at most ``limit`` at once.

    Only the tokens' SHA-256 digests are kept (with their expiry), so the
    daemon's memory holds nothing a cookie could be made from. A login beyond
    ``limit`` ends the oldest. ``clock`` (monotonic seconds) is for tests.
    """

    __slots__ = ("_clock", "_expiry", "limit", "ttl")

    def __init__(
        self, *, ttl: float = SESSION_TTL, limit: int = MAX_SESSIONS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if ttl <= 0 or limit < 1:
            raise ValueError("ttl must be > 0 and limit >= 1")
        self.ttl = ttl
        self.limit = limit
        self._clock = clock
        self._expiry: dict[bytes, float] = {}  # digest -> when it expires, oldest login first

    def __len__(self) -> int:
        return len(self._expiry)

    def create(self) -> str:
        """A new session's token (to be sent once, as the cookie's value)."""
        now = self._clock()
        self._expire(now)
        while len(self._expiry) >= self.limit:
            del self._expiry[next(iter(self._expiry))]
        token = secrets.token_urlsafe(32)
        self._expiry[_digest(token.encode("ascii"))] = now + self.ttl
        return token

    def valid(self, token: bytes) -> bool:
        """Whether ``token`` is a session that has not expired nor ended."""
        expiry = self._expiry.get(_digest(token))
        if expiry is None:
            return False
        if expiry <= self._clock():
            self._expire(self._clock())
            return False
        return True

    def end(self, token: bytes) -> None:
        """End the session of ``token`` (a logout); unknown tokens are ignored."""
        self._expiry.pop(_digest(token), None)

    def _expire(self, now: float) -> None:
        for digest in [d for d, expiry in self._expiry.items() if expiry <= now]:
            del self._expiry[digest]


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
    are kept only as SHA-256 digests and never shown. ``sessions`` holds the
    dashboard's logins (:meth:`login`).
    """

    __slots__ = ("_hosts", "_key_digests", "_known_hosts", "_loopback", "_origins", "sessions")

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
        self.sessions = Sessions()

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

    def login(self, key: str) -> str | None:
        """A new session's token if ``key`` is one of the API keys (compared as the header is), else None."""
        try:
            token = key.encode("ascii")
        except UnicodeEncodeError:
            return None
        if not self._key_digests or not _is_key(token, self._key_digests):
            return None
        return self.sessions.create()

    def _session_allows(self, method: str, path: str, cookie: bytes | None) -> bool:
        """Whether the request's session cookie stands in for the key: reading ``/ui`` and ``/api/*``,
        and logging out; never a route that changes something."""
        if method in ("GET", "HEAD"):
            if not (path == "/ui" or path.startswith(("/ui/", "/api/"))):
                return False
        elif (method, path) != ("POST", "/ui/logout"):
            return False
        token = session_cookie(cookie)
        return token is not None and self.sessions.valid(token)

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
        if self._key_digests and not check_credentials(headers.get(b"authorization"), self._key_digests):
            method, path = scope["method"], scope["path"]
            if (method, path) not in _PUBLIC and not self._session_allows(method, path, headers.get(b"cookie")):
                if b"authorization" in headers:
                    message = "invalid API key"
                elif session_cookie(headers.get(b"cookie")) is not None:
                    message = "the session has ended or does not allow this request: log in again, or send the key"
                else:
                    message = "missing API key: send it as 'Authorization: Bearer KEY'"
                return _Verdict(
                    401,
                    message,
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
