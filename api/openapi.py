"""The OpenAPI schema as the contract: every status and content type each route answers with.

FastAPI declares 200 (as JSON) and 422 for every route with a body; this server answers
otherwise: OpenAI routes say 400 for bad input, streams are text/event-stream, /metrics is
Prometheus text, and 401 / 404 / 413 / 429 / 424 / 500 / 503 come back where they can. The
table below is what the routes do; `contract_openapi` writes it over FastAPI's guess, with the
error shapes of api/errors.py, the shape of each stream's events, the bearer scheme when API
keys are on, and the limits that depend on the config and the model (api/openapi_limits.py).

A stream is declared one event at a time: OpenAPI 3.1 has no keyword for the items of a
text/event-stream body, and its `schema` there is read as describing each event (what
Schemathesis does, and what OpenAPI 3.2 names `itemSchema`): an event is `{data, event, id,
retry}` as the SSE format defines it, and `data` holds a JSON chunk (or `[DONE]`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from api.auth import OPEN_PATHS
from api.context import ServerContext
from api.openapi_limits import limit_requests
from api.protocol_openai import CHOICE_RULES, choice_rules

_OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
_TGI_ERROR = {"type": "object", "required": ["error", "error_type"], "properties": {
    "error": {"type": "string"}, "error_type": {"type": "string"}}}


def _events(chunk: dict[str, Any], done: bool) -> dict[str, Any]:
    """text/event-stream: one SSE event whose `data` is a JSON `chunk` (or OpenAI's [DONE])."""
    data: dict[str, Any] = {"type": "string", "contentMediaType": "application/json",
                            "contentSchema": chunk}
    if done:
        data = {"anyOf": [{"const": "[DONE]"}, data]}
    return {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"], "properties": {
            "data": data, "event": {"type": "string"}, "id": {"type": "string"},
            "retry": {"type": "integer", "minimum": 0}}}}}


def _chunk(obj: str) -> dict[str, Any]:
    return {"type": "object", "required": ["id", "object", "created", "model", "choices"],
            "properties": {"object": {"const": obj}, "choices": {"type": "array"}}}


# A failure after a stream has started is one error event in the family's shape.
_SSE = {
    "/v1/completions": _events({"anyOf": [_chunk("text_completion"), _OPENAI_ERROR]}, True),
    "/v1/chat/completions": _events({"anyOf": [_chunk("chat.completion.chunk"),
                                               _OPENAI_ERROR]}, True),
    "tgi": _events({"anyOf": [{"type": "object", "required": [
        "index", "token", "top_tokens", "generated_text", "details"]}, _TGI_ERROR]}, False),
}

_WHY = {400: "Bad input", 401: "Missing or invalid API key", 404: "Unknown model",
        413: "Request body too large", 422: "Bad input", 424: "Generation failed",
        429: "Overloaded (see Retry-After)", 500: "Generation failed",
        503: "Not ready"}

# (method, path): (errors, 200 content types: "json" / "sse" / "text")
_GEN_OAI = ((400, 404, 413, 429, 500), ("json", "sse"))
_GEN_TGI = (413, 422, 424, 429)
ROUTES: dict[tuple[str, str], tuple[tuple[int, ...], tuple[str, ...]]] = {
    ("get", "/v1/models"): ((), ("json",)),
    ("get", "/v1/models/{model_id}"): ((404,), ("json",)),
    ("post", "/v1/completions"): _GEN_OAI,
    ("post", "/v1/chat/completions"): _GEN_OAI,
    ("get", "/info"): ((), ("json",)),
    ("post", "/tokenize"): ((413, 422), ("json",)),
    ("post", "/generate"): (_GEN_TGI, ("json",)),
    ("post", "/generate_stream"): (_GEN_TGI, ("sse",)),
    ("post", "/"): (_GEN_TGI, ("json", "sse")),
    ("get", "/health"): ((503,), ("json",)),
    ("get", "/metrics"): ((), ("text",)),
}

# Body constraints that hold on one route only (the request model is shared): TGI refuses
# `decoder_input_details` and `best_of` > 1 on streams (422), as TGI does.
_TGI_STREAM = {"properties": {"parameters": {"properties": {
    "decoder_input_details": {"const": False}, "best_of": {"enum": [1, None]}}}}}
BODY_RULES: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/generate_stream"): _TGI_STREAM,
    ("post", "/"): {"if": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
                    "then": _TGI_STREAM},
}


def contract_openapi(app: FastAPI, ctx: ServerContext, keys_enabled: bool) -> None:
    """Replaces `app.openapi` with the contract version (built once, like FastAPI's)."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = base()
            _rewrite(schema, ctx, keys_enabled)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _rewrite(schema: dict[str, Any], ctx: ServerContext, keys_enabled: bool) -> None:
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    comps[CHOICE_RULES] = choice_rules()
    comps["CompletionRequest"].setdefault("allOf", []).append(
        {"$ref": f"#/components/schemas/{CHOICE_RULES}"})
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body: never sent
        comps.pop(name, None)
    comps["OpenAIError"], comps["TGIError"] = _OPENAI_ERROR, _TGI_ERROR
    if keys_enabled:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http",
                                                              "scheme": "bearer"}}
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            errors, kinds = ROUTES[(method, path)]
            ok = op["responses"].get("200", {"description": "Successful Response"})
            json_ok = ok.get("content", {}).get("application/json",
                                               {"schema": {"type": "object"}})
            content: dict[str, Any] = {}
            for kind in kinds:
                if kind == "json":
                    content["application/json"] = json_ok
                elif kind == "sse":
                    content.update(_SSE.get(path, _SSE["tgi"]))
                else:
                    content["text/plain"] = {"schema": {"type": "string"}}
            responses: dict[str, Any] = {"200": {**ok, "content": content}}
            statuses = set(errors)
            if keys_enabled and path not in OPEN_PATHS:
                statuses.add(401)
                op["security"] = [{"bearer": []}]
            shape = "OpenAIError" if path.startswith("/v1/") else "TGIError"
            for status in sorted(statuses):
                body = ({"schema": {"type": "object"}} if path == "/health" else
                        {"schema": {"$ref": f"#/components/schemas/{shape}"}})
                responses[str(status)] = {"description": _WHY[status],
                                          "content": {"application/json": body}}
            op["responses"] = responses
            if (method, path) in BODY_RULES:
                body = op["requestBody"]["content"]["application/json"]
                body["schema"] = {"allOf": [body["schema"], BODY_RULES[(method, path)]]}
    limit_requests(comps, ctx)
    _name_the_model(schema, ctx.model_name)


def _name_the_model(schema: dict[str, Any], name: str) -> None:
    """The one model id that /v1/models/{model_id} answers 200 for, as the parameter's example."""
    for param in schema["paths"]["/v1/models/{model_id}"]["get"].get("parameters", []):
        if param["name"] == "model_id":
            param["example"] = name
