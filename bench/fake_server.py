"""A fake OpenAI-compatible streaming server with controlled latencies, to test the harness.

It answers /health, /v1/models and streaming /v1/completions: the first chunk after `ttft_ms`,
then a chunk every `tpot_ms` per token it carries, then usage (if asked) and `[DONE]`.
`max_concurrency` makes requests queue as on a saturated server, so attainment falls with rate.

    python -m bench.fake_server [CONFIG.yaml] --port 8000 --ttft-ms 50 --tpot-ms 10

A CONFIG file may hold a `fake:` mapping of the same settings, which lets `bench.compare` run
end to end against fakes in place of real Serve configs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class FakeConfig:
    ttft_ms: float = 20.0
    tpot_ms: float = 5.0
    tokens_per_chunk: int = 1
    max_concurrency: int = 0  # 0: unlimited
    fail_every: int = 0  # every Nth request answers HTTP 500; 0: never
    model: str = "fake-model"
    # No request's first token before this many requests have arrived (a barrier): a test of
    # "all sent before any answer" then holds however slow the machine is. 0: no barrier.
    hold_until: int = 0


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def make_app(cfg: FakeConfig) -> web.Application:
    slots = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency > 0 else None
    count = 0
    all_arrived = asyncio.Event()

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(_: web.Request) -> web.Response:
        """Prometheus text: completion requests received so far, and one labelled series."""
        return web.Response(text=f"# TYPE fake_requests_total counter\n"
                                 f"fake_requests_total {count}\n"
                                 f'fake_info{{model="{cfg.model}"}} 1\n')

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": cfg.model, "object": "model"}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        nonlocal count
        count += 1
        if count >= cfg.hold_until:
            all_arrived.set()
        body = await request.json()
        if cfg.fail_every and count % cfg.fail_every == 0:
            return web.json_response({"error": {"message": "injected failure"}}, status=500)
        if not body.get("stream"):
            return web.json_response({"error": {"message": "only stream=true"}}, status=400)
        if slots is None:
            return await _stream(request, body)
        async with slots:
            return await _stream(request, body)

    async def _stream(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        n = int(body.get("max_tokens", 16))
        prompt = body.get("prompt", "")
        n_prompt = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await all_arrived.wait()
        await asyncio.sleep(cfg.ttft_ms / 1e3)
        sent = 0
        while sent < n:
            k = min(cfg.tokens_per_chunk, n - sent)
            sent += k
            finish = "length" if sent == n else None
            choice = {"index": 0, "text": " tok" * k, "finish_reason": finish}
            await resp.write(_sse({"object": "text_completion", "model": cfg.model,
                                   "choices": [choice]}))
            if sent < n:
                await asyncio.sleep(cfg.tpot_ms * k / 1e3)
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": n_prompt, "completion_tokens": n,
                     "total_tokens": n_prompt + n}
            await resp.write(_sse({"object": "text_completion", "choices": [], "usage": usage}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/completions", completions)
    return app


@contextmanager
def running(cfg: FakeConfig, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `cfg` from a background thread with its own event loop; yields the base URL."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, Any] = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(make_app(cfg))
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, host, port).start())
        state["addr"] = runner.addresses[0]
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("fake server did not start")
    try:
        yield f"http://{state['addr'][0]}:{state['addr'][1]}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.fake_server", description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", help="YAML file whose `fake:` mapping sets defaults")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    for f in fields(FakeConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None)
    args = p.parse_args(argv)
    cfg = FakeConfig()
    if args.config:
        import yaml

        with open(args.config) as fh:
            cfg = replace(cfg, **((yaml.safe_load(fh) or {}).get("fake") or {}))
    cfg = replace(cfg, **{f.name: v for f in fields(FakeConfig)
                          if (v := getattr(args, f.name)) is not None})
    web.run_app(make_app(cfg), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
