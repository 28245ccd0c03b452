"""Server-sent events: `data: <json>` lines, and a response that always closes its source."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api.errors import APIError, GenerationError, client_gone
from api.generation import Generation, close_all


def event(data: Any, sep: str = " ") -> str:
    """One SSE event. TGI writes `data:{...}` (no space); OpenAI writes `data: {...}`."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False,
                                                           separators=(",", ":"))
    return f"data:{sep}{payload}\n\n"


class EventStream(StreamingResponse):
    """A text/event-stream response whose event iterator and generations are closed however
    the response ends (finished, client gone, handler cancelled), so a request still running
    is aborted at once instead of whenever the iterator is garbage-collected."""

    def __init__(self, events: AsyncIterator[str], generations: list[Generation]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events, self._generations = events, generations

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except Exception as e:
            # Behind Serve, the disconnect listener's `receive()` raises TaskCancelledError
            # once the client has gone: the stream's normal end, not an error to report.
            if not client_gone(e):
                raise
        finally:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()
            # Also covers a response that never started iterating (client gone before the
            # headers went out): its generations are still open.
            await close_all(self._generations)


async def guarded(events: AsyncIterator[str], error_event: Callable[[APIError], str],
                  last: str | None = None) -> AsyncIterator[str]:
    """Turns a failure mid-stream into one error event (shaped by `error_event`), then `last`."""
    try:
        async with aclosing(events):
            async for e in events:
                yield e
    except APIError as e:
        yield error_event(e)
    except Exception as e:
        logging.getLogger(__name__).exception("stream failed")
        yield error_event(GenerationError(f"generation failed: {e}"))
    if last is not None:
        yield last
