"""HandleClient: a Serve DeploymentHandle seen through the `generate` client protocol.

The serving deployment exposes `run(prompt_ids, params, request_id, mailbox)`, whose outputs
arrive through the ingress's token mailbox, and an async generator method `generate(prompt_ids,
params, request_id)` yielding RequestOutput, called with `stream=True`. If the consumer stops
early (client disconnect, error, cancellation), the Serve call is cancelled,
which cancels the replica's generator: that is what aborts the request and frees its pages.
A ValueError raised in the replica (the engine refusing the input) comes back as a plain
ValueError, so the API answers it with a 4xx body.

Failover: when the replica serving a stream dies (Ray's actor errors), the request is issued
again, on whichever replica Serve picks, as prompt + the tokens generated so far with
max_tokens reduced by as many; `resumed_tokens` keeps seeded draws at their positions, so the
continuation is what the first replica would have produced. Outputs of a resumed call are
renumbered as the original request's (prompt and output token counts). Only token ids travel
here: the API's DetokenizingClient (api/detokenizing_client.py), wrapped around this client,
sees every token of the request in order across resumes, so text, multi-byte characters and
stop strings that span the failure point come out as in a clean run. At most `max_resumes`
times; then the error goes up and the API ends the stream with an error event. Every wait for
an output is bounded by `timeout_s`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from api.mailbox_call import Coalescing, mailbox_call
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from serving.batched_submit import SubmitBatcher
from serving.token_path import TokenReader
from serving.token_socket import SocketReader

log = logging.getLogger(__name__)


def _value_error(e: BaseException) -> ValueError | None:
    """The ValueError behind a Ray task error (RayTaskError keeps it in `.cause`), if any."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, ValueError):
        return ValueError(str(cause))
    if isinstance(e, ValueError) and cause is None:
        return e
    return None


def replica_died(e: BaseException) -> bool:
    """True for the errors of a replica actor that died or cannot be reached."""
    try:
        from ray.exceptions import ActorUnavailableError, RayActorError
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return isinstance(e, RayActorError | ActorUnavailableError)


class HandleClient:
    """With a `reader`, a call goes to the deployment's `run` method and its tokens come
    through the reader's mailbox, one message per engine step for all streams
    (api/mailbox_call.py), with `submit_batch` > 1 (and a token socket) many requests a call;
    without one, to the streaming `method`, one message per output."""

    def __init__(self, handle: Any, method: str = "generate", timeout_s: float = 600.0,
                 max_resumes: int = 3, reader: TokenReader | None = None,
                 coalescing: Coalescing | None = None, submit_batch: int = 1) -> None:
        self._unary = handle
        self._handle = handle.options(stream=True)
        self._method = method
        self.timeout_s, self.max_resumes = timeout_s, max_resumes
        self.reader, self.coalescing = reader, coalescing or Coalescing()
        self.num_resumes = 0
        # Many requests a Serve call (serving/batched_submit.py): only over the token socket, which
        # carries their aborts.
        self.batcher = (SubmitBatcher(handle, reader, submit_batch)
                        if submit_batch > 1 and isinstance(reader, SocketReader) else None)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        generated: list[int] = []
        for attempt in range(self.max_resumes + 1):
            ids, p, rid = prompt_ids, params, request_id
            if attempt:
                ids = prompt_ids + generated
                p = dataclasses.replace(params, max_tokens=params.max_tokens - len(generated),
                                        resumed_tokens=params.resumed_tokens + len(generated))
                rid = f"{request_id}-resume{attempt}"
            try:
                async with aclosing(self._call(ids, p, rid)) as stream:
                    async for out in stream:
                        generated += out.new_token_ids
                        if attempt:  # as the original request would have numbered it
                            out = out.evolve(num_prompt_tokens=len(prompt_ids),
                                             num_output_tokens=len(generated))
                        yield out
                        if out.finished:
                            return
                return
            except Exception as e:
                if (not replica_died(e) or attempt == self.max_resumes
                        or len(generated) >= params.max_tokens):
                    raise
                self.num_resumes += 1
                log.warning("request %s: serving replica lost after %d tokens (%s); resuming "
                            "on another replica", request_id, len(generated), type(e).__name__)
                await asyncio.sleep(0.1 * 2**attempt)  # let Serve notice the dead replica

    async def _call(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str) -> AsyncIterator[RequestOutput]:
        if self.reader is not None:
            run = self.batcher.run if self.batcher is not None else self._unary.run.remote
            stream = mailbox_call(run, self.reader, prompt_ids, params, request_id,
                                  self.timeout_s, self.coalescing)
        else:
            stream = self._stream(prompt_ids, params, request_id)
        try:
            async with aclosing(stream) as outputs:
                async for out in outputs:
                    yield out
        except Exception as e:
            bad_input = _value_error(e)
            if bad_input is not None:
                raise bad_input from None
            raise

    async def _stream(self, prompt_ids: list[int], params: SamplingParams,
                      request_id: str) -> AsyncIterator[RequestOutput]:
        response = getattr(self._handle, self._method).remote(prompt_ids, params, request_id)
        finished = False
        try:
            while not finished:
                try:
                    out = await asyncio.wait_for(anext(response), self.timeout_s)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise TimeoutError(f"no output from the serving replica for "
                                       f"{self.timeout_s:.0f} s") from None
                finished = out.finished
                yield out
        finally:
            if not finished:
                response.cancel()
