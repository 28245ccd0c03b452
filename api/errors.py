"""Error bodies for both API families, and the handlers that turn every failure into one.

The route family decides the shape: paths under `/v1` answer OpenAI-style
`{"error": {"message", "type", "param", "code"}}` with 400 for bad input; the TGI routes answer
`{"error": "...", "error_type": "validation"}` with 422. FastAPI's own 422 body never leaves.
Overload is a 429 on both (`rate_limit_error` / `overloaded`) with a Retry-After header. Bodies
are written as ASCII JSON, so text echoed from the request (even a lone surrogate) cannot break
the encoding of the error that reports it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from api.chat_messages import ROLES

log = logging.getLogger(__name__)


BODY_PARSE_ERROR = "There was an error parsing the body"  # fastapi.routing's detail


class APIError(Exception):
    """A failure the client is told about. `status=None` means bad input: 400 on OpenAI routes,
    422 on TGI routes. Server-side failures carry their own status (500 / 424 / 503)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status
        self.headers = headers or {}

    @property
    def is_client_error(self) -> bool:
        return self.status is None or 400 <= self.status < 500


class GenerationError(APIError):
    """The request was accepted but failed on the server (engine error, replica gone)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=500)


def client_gone(exc: BaseException) -> bool:
    """True for the ways a vanished client surfaces: Starlette's ClientDisconnect, or, behind
    Serve, the cancelled proxy task that `receive()` raises once the client has gone (also
    inside the exception group of a response's task group, e.g. Starlette's disconnect
    listener of a stream)."""
    if isinstance(exc, ClientDisconnect):
        return True
    group = getattr(exc, "exceptions", None)  # an ExceptionGroup
    if isinstance(group, tuple) and group:
        return all(client_gone(e) for e in group)
    try:
        from ray.exceptions import TaskCancelledError
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return isinstance(exc, TaskCancelledError)


def is_openai(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def route_path(scope: dict[str, Any]) -> str:
    """The path inside the app (an app served under a route prefix sees it in root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def openai_body(err: APIError) -> dict[str, Any]:
    kind = "invalid_request_error" if err.is_client_error else "server_error"
    if err.status == 404:
        kind = "not_found_error"
    elif err.status == 429:
        kind = "rate_limit_error"

    return {"error": {"message": err.message, "type": kind, "param": err.param,
                      "code": err.code}}


def tgi_body(err: APIError) -> dict[str, Any]:
    kind = "validation" if err.is_client_error else "generation"
    if err.status == 429:
        kind = "overloaded"
    elif err.status == 401:
        kind = "unauthorized"
    return {"error": err.message, "error_type": kind}


def error_status(err: APIError, openai: bool) -> int:
    if err.status is not None:
        # TGI reports a failed generation as 424, as text-generation-inference does.
        return 424 if not openai and isinstance(err, GenerationError) else err.status
    return 400 if openai else 422


class ASCIIJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(err: APIError, path: str) -> JSONResponse:
    openai = is_openai(path)
    body = openai_body(err) if openai else tgi_body(err)
    return ASCIIJSONResponse(body, status_code=error_status(err, openai), headers=err.headers)


def _param(loc: tuple | list) -> str | None:
    # pydantic puts union members (`str`, `list[int]`, ...) in the location, and the tag of a
    # discriminated union (a chat message's role, after its list index): not parameters.
    parts = [str(p) for i, p in enumerate(loc) if p != "body" and not _is_type_tag(p)
             and not (i and isinstance(loc[i - 1], int) and p in ROLES)]
    return ".".join(parts) or None


def _is_type_tag(part: object) -> bool:
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "is-instance"}
_UNION_TAG = ("union_tag_not_found", "union_tag_invalid")  # a message without a known role


def describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable message (and the offending parameter) from pydantic's error list."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON: {detail}".rstrip(": "), None
    param = _param(first.get("loc", ()))
    if first.get("type") == "missing" and param is None:
        return "the request body is missing", None
    if first.get("type") in _UNION_TAG:
        tag = (first.get("ctx") or {}).get("discriminator", "").strip("'") or "type"
        param = f"{param}.{tag}" if param else tag
        given = (first.get("ctx") or {}).get("tag")
        what = f"unknown {tag} {given!r}" if given is not None else f"{tag} is required"
        return f"{param}: {what}; valid: {', '.join(ROLES)}", param
    # Errors for the same parameter are the alternatives of a union: list them all.
    msgs: list[str] = []
    for e in errors:
        if _param(e.get("loc", ())) == param:
            msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
            if msg not in msgs:
                msgs.append(msg)
    text = "; or ".join(msgs)
    return (f"{param}: {text}" if param else text), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, route_path(request.scope))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation(list(exc.errors()))
        return error_response(APIError(message, param), route_path(request.scope))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == BODY_PARSE_ERROR:
            # FastAPI's answer to a body that is not UTF-8 (json.loads cannot decode it): bad
            # input like any other, so 422 on TGI routes, as for malformed JSON there.
            err = APIError("the request body is not valid JSON: it is not UTF-8 text")
            return error_response(err, route_path(request.scope))
        err = APIError(str(exc.detail), status=exc.status_code, headers=exc.headers)
        return error_response(err, route_path(request.scope))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette calls this even after a stream started; a vanished client is no error.
        if not client_gone(exc):
            log.exception("unhandled error on %s (request_id=%s)", route_path(request.scope),
                          request.scope.get("state", {}).get("request_id", "-"))
        err = GenerationError(f"internal error: {exc}")
        return error_response(err, route_path(request.scope))
