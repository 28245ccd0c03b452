"""HandleClient: a Serve DeploymentHandle seen through the `generate` client protocol.

The serving deployment exposes an async generator method `generate(prompt_ids, params,
request_id)` yielding RequestOutput. Here it is called with `stream=True` and re-yielded. If the
consumer stops early (client disconnect, error, cancellation), the Serve call is cancelled,
which cancels the replica's generator: that is what aborts the request and frees its pages.
A ValueError raised in the replica (the engine refusing the input) comes back as a plain
ValueError, so the API answers it with a 4xx body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


def _value_error(e: BaseException) -> ValueError | None:
    """The ValueError behind a Ray task error (RayTaskError keeps it in `.cause`), if any."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, ValueError):
        return ValueError(str(cause))
    if isinstance(e, ValueError) and cause is None:
        return e
    return None


class HandleClient:
    def __init__(self, handle: Any, method: str = "generate") -> None:
        self._handle = handle.options(stream=True)
        self._method = method

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        response = getattr(self._handle, self._method).remote(prompt_ids, params, request_id)
        finished = False
        try:
            async for out in response:
                finished = out.finished
                yield out
                if finished:
                    return
        except Exception as e:
            bad_input = _value_error(e)
            if bad_input is not None:
                raise bad_input from None
            raise
        finally:
            if not finished:
                response.cancel()
