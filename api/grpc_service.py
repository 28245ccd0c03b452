"""The gRPC service (api/proto/pdserve.proto) as methods of the ingress deployment.

Ray Serve's gRPC proxy (the Serve config's `grpc_options`: a port and `grpc_servicer_functions:
[api.proto.pdserve_pb2_grpc.add_GenerationServicer_to_server]`) routes a call of
`/pdserve.v1.Generation/<Method>` to the method of that name on the application's ingress
deployment (the `application` metadata picks the application when there are several), passing
the request message and, to a parameter named `grpc_context`, a RayServegRPCContext; a
server-streaming rpc is an async generator method. So the Ingress inherits this mixin and
both APIs share one replica: the FastAPI app's ServerContext (tokenizer, limits, the admitted
and detokenizing client) and its Admission (one concurrency count for HTTP and gRPC).

Status codes: bad input INVALID_ARGUMENT, an unknown model NOT_FOUND, overload
RESOURCE_EXHAUSTED, a missing or wrong key (`authorization: Bearer <key>` metadata, the HTTP
API's keys) UNAUTHENTICATED, a failure on the server INTERNAL. A unary call sets the code on
the context and returns an empty message (the proxy applies the code: no traceback in the
logs); a stream has to raise after setting it, because the proxy applies a context only
together with a message (an empty message first would reach the client). Serve 2.60 logs such
a raise with its traceback, in the replica's and the proxy's logs, as an error: a refused
stream is noisier there than a refused unary call.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import grpc

from api import grpc_protocol
from api.admission import Admission
from api.auth import ApiKeys, parse_bearer
from api.context import ServerContext, new_id
from api.errors import APIError
from api.generation import collect, start
from api.proto import pdserve_pb2 as pb

SERVICER_FUNCTION = "api.proto.pdserve_pb2_grpc.add_GenerationServicer_to_server"

_CODES = {401: grpc.StatusCode.UNAUTHENTICATED, 404: grpc.StatusCode.NOT_FOUND,
          429: grpc.StatusCode.RESOURCE_EXHAUSTED, 499: grpc.StatusCode.CANCELLED,
          503: grpc.StatusCode.UNAVAILABLE}


def status_code(err: APIError) -> grpc.StatusCode:
    if err.status in _CODES:
        return _CODES[err.status]
    return grpc.StatusCode.INVALID_ARGUMENT if err.is_client_error else grpc.StatusCode.INTERNAL


class GrpcCallFailed(Exception):
    """Raised out of a stream after its status is set (one plain message: it crosses Ray)."""


def _bearer(grpc_context: Any) -> str | None:
    if grpc_context is None:
        return None
    for key, value in grpc_context.invocation_metadata():
        if key.lower() == "authorization":
            return parse_bearer(value.decode("latin-1") if isinstance(value, bytes) else value)
    return None


@dataclass
class GrpcState:
    ctx: ServerContext
    admission: Admission
    keys: ApiKeys

    @contextlib.asynccontextmanager
    async def admitted(self, grpc_context: Any) -> AsyncIterator[None]:
        """The key, then a concurrency slot (as the HTTP middlewares: a refusal takes none)."""
        self.keys.check(_bearer(grpc_context), "the metadata `authorization: Bearer <key>`")
        await self.admission.enter()  # cluster-wide: shared with HTTP and other replicas
        try:
            yield
        finally:
            self.admission.leave()


def _fail(grpc_context: Any, err: APIError) -> None:
    if grpc_context is None:  # called through a handle, not the proxy: the error as it is
        raise err
    grpc_context.set_code(status_code(err))
    grpc_context.set_details(err.message)


class GrpcService:
    """Mixin for the ingress deployment: `Generate` and `GenerateStream`.

    The deployment calls `grpc_attach(app)` with the FastAPI app that build_api made (its
    `state.ctx`, `state.admission` and `state.keys`).
    """

    _grpc_state: GrpcState | None = None

    def grpc_attach(self, app: Any) -> Any:
        # The HTTP app's key checker: one set of keys, one refusal count on /metrics.
        self._grpc_state = GrpcState(app.state.ctx, app.state.admission, app.state.keys)
        return app

    def _grpc(self) -> GrpcState:
        if self._grpc_state is None:
            raise APIError("the API is not ready yet", status=503)
        return self._grpc_state

    async def Generate(self, request: pb.GenerateRequest,  # named as the rpc
                       grpc_context: Any = None) -> pb.GenerateResponse:
        rid = new_id("grpc")
        try:
            state = self._grpc()
            async with state.admitted(grpc_context):
                ids, params = grpc_protocol.prepare(state.ctx, request)
                [result] = await collect(state.ctx.client, [(ids, params, rid)])
            return grpc_protocol.response(state.ctx, rid, result)
        except APIError as e:
            _fail(grpc_context, e)
            return pb.GenerateResponse(request_id=rid)

    async def GenerateStream(self, request: pb.GenerateRequest,  # named as the rpc
                             grpc_context: Any = None) -> AsyncIterator[pb.GenerateResponse]:
        rid = new_id("grpc")
        try:
            state = self._grpc()
            async with state.admitted(grpc_context):
                ids, params = grpc_protocol.prepare(state.ctx, request)
                # Primed: input the engine refuses fails before the first message.
                gen = await start(state.ctx.client, ids, params, rid)
                sent = 0
                # Closing (client gone, error) aborts the request and frees its pages.
                async with aclosing(gen.outputs()) as outs:
                    async for out in outs:
                        sent += len(out.new_token_ids)
                        yield grpc_protocol.stream_message(state.ctx, rid, out,
                                                           gen.num_prompt_tokens, sent)
        except APIError as e:
            _fail(grpc_context, e)
            raise GrpcCallFailed(e.message) from None
