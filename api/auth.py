"""Optional API keys: `Authorization: Bearer <key>` on every route but /health.

Keys come from the app config (`api_keys`) or, when that is unset, from the environment
(`PDSERVE_API_KEYS`, comma-separated); with neither, the API is open. A request without a valid
key gets a 401 in its route family's error shape, before admission and before its body is
read, so unauthenticated traffic takes no concurrency slot. /health stays open: load balancers
and Serve's own probes call it without credentials.

Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every configured key
without stopping at a match, so the time taken says nothing about a key's length or prefix.
They are never logged and never exported: /metrics carries only a count of refusals.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence

from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import APIError, error_response, route_path

ENV = "PDSERVE_API_KEYS"
OPEN_PATHS = frozenset({"/health"})


def resolve_keys(configured: Sequence[str | SecretStr] | None) -> list[bytes]:
    """The keys' digests: from `configured` if given (even empty: explicitly open), else from
    $PDSERVE_API_KEYS. Blank entries are dropped (a trailing comma is not an empty key)."""
    if configured is None:
        configured = os.environ.get(ENV, "").split(",")
    plain = [k.get_secret_value() if isinstance(k, SecretStr) else k for k in configured]
    return [_digest(k.strip()) for k in plain if k.strip()]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def parse_bearer(value: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` value; None for another scheme."""
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"authorization":
            return parse_bearer(value.decode("latin-1"))
    return None


class Unauthorized(APIError):
    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_api_key", status=401,
                         headers={"WWW-Authenticate": "Bearer"})


class ApiKeys:
    """The configured keys (as digests); `num_refused` counts 401s for /metrics."""

    def __init__(self, configured: Sequence[str | SecretStr] | None = None) -> None:
        self.digests = resolve_keys(configured)
        self.num_refused = 0

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def __repr__(self) -> str:  # never the keys, not even their digests
        return f"ApiKeys({len(self.digests)} keys)"

    def allows(self, token: str | None) -> bool:
        if token is None:
            return False
        given = _digest(token)
        ok = False
        for d in self.digests:  # no early exit: every key is compared every time
            ok |= hmac.compare_digest(given, d)
        return ok

    def check(self, token: str | None, how: str) -> None:
        """Unless keys are off or `token` is one of them, counts a refusal and raises
        Unauthorized; `how` tells the client how to send a key."""
        if not self.enabled or self.allows(token):
            return
        self.num_refused += 1
        raise Unauthorized("invalid API key" if token is not None else
                           f"missing API key: send {how}")


class ApiKeyAuth:
    """ASGI middleware: a 401 at once for a request without a valid key (keys enabled)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        if scope["type"] == "http" and path not in OPEN_PATHS:
            try:
                self.keys.check(_bearer(scope), "the header `Authorization: Bearer <key>`")
            except Unauthorized as err:
                await error_response(err, path)(scope, receive, send)
                return
        await self.app(scope, receive, send)
