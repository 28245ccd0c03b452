"""Soak test against a running pdserve: many requests, some aborted, some invalid; then every
replica must be back to zero KV pages with a sound allocator, and none may have restarted.

    python -m bench.soak --url http://127.0.0.1:8000 --requests 1000

Request mix (seeded): `--abort-frac` are streams the client drops, before the response starts
or after a few events; `--invalid-frac` are bad bodies that must get their 4xx; the rest are
valid requests over OpenAI (completions, chat; streamed or not) and TGI routes that must finish
cleanly. A 429 is counted, not failed (the server protecting itself). Anything else (a 5xx, an
error event in a 200 stream, a wrong status, a hang past `--timeout`) is a failure.
Exit status 0 when the run passes; the counts are printed as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from typing import Any

import httpx

INVALID: list[tuple[str, Any, int]] = [  # (path, body, expected status)
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400),
    ("/v1/completions", {"prompt": [1, 10**6]}, 400),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**9}, 400),
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", {"prompt": "hi", "model": "nope"}, 404),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("/generate", {"inputs": "", "parameters": {}}, 422),
    ("/generate", {"inputs": "hi", "parameters": {"top_p": 2}}, 422),
    ("/generate_stream", {"inputs": "hi", "parameters": {"max_new_tokens": 0}}, 422),
]
WORDS = "the river ran past old mill where a keeper of bees sang to lanterns at dusk".split()


def parse_metrics(text: str, name: str) -> dict[tuple[str, str], float]:
    """{(role, replica): value} of one metric in Prometheus text."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            fields = dict(kv.split("=", 1) for kv in labels.split(","))
            out[(fields["role"].strip('"'), fields["replica"].strip('"'))] = float(value)
    return out


def role_totals(base_url: str, role: str, names: Sequence[str]) -> tuple[float, ...]:
    """Each metric of `names` summed over the replicas of `role`, from the server's /metrics."""
    text = urllib.request.urlopen(f"{base_url}/metrics", timeout=10).read().decode()
    return tuple(sum(v for (r, _), v in parse_metrics(text, name).items() if r == role)
                 for name in names)


async def replicas_state(http: httpx.AsyncClient) -> dict[str, dict]:
    text = (await http.get("/metrics")).text
    return {name: parse_metrics(text, name) for name in (
        "pdserve_kv_pages_used", "pdserve_kv_integrity_ok", "pdserve_kv_integrity_failures_total")}


def valid_request(rng: random.Random, max_tokens: int) -> tuple[str, dict, bool]:
    prompt = " ".join(rng.choices(WORDS, k=rng.randint(3, 40)))
    n = rng.randint(1, max_tokens)
    kind = rng.choice(["cmpl", "chat", "tgi"])
    stream = rng.random() < 0.6
    if kind == "cmpl":
        return "/v1/completions", {"prompt": prompt, "max_tokens": n, "temperature": 0,
                                   "stream": stream}, stream
    if kind == "chat":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}],
                                        "max_tokens": n, "stream": stream, "seed": 1}, stream
    return ("/generate_stream" if stream else "/generate"), {
        "inputs": prompt, "parameters": {"max_new_tokens": n}}, stream


def stream_failed(path: str, events: list[str]) -> str | None:
    """Why a finished 200 stream is not a clean one, or None."""
    if any('"error"' in e for e in events):
        return "error event"
    if path.startswith("/v1/"):
        return None if events and events[-1] == "[DONE]" else "no [DONE]"
    last = json.loads(events[-1]) if events else {}
    return None if last.get("generated_text") is not None else "no final event"


async def one(http: httpx.AsyncClient, rng: random.Random, args) -> str:
    roll = rng.random()
    if roll < args.invalid_frac:
        path, body, want = rng.choice(INVALID)
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = await http.post(path, content=content, headers={"content-type": "application/json"})
        return "invalid_4xx" if r.status_code == want else f"fail:invalid got {r.status_code}"
    abort = roll < args.invalid_frac + args.abort_frac
    path, body, stream = valid_request(rng, args.max_tokens)
    if abort:
        path, body, stream = valid_request(rng, args.max_tokens * 4)
        body = {**body, "stream": True} if "prompt" in body or "messages" in body else body
        path = "/generate_stream" if path == "/generate" else path
        stream = True
    request = http.build_request("POST", path, json=body)
    if abort and rng.random() < 0.4:  # gone before the first token, if it is quick enough
        try:
            r = await asyncio.wait_for(http.send(request, stream=True), rng.uniform(0, 0.05))
        except TimeoutError:
            return "aborted_before_response"
        await r.aclose()
        return "aborted_after_headers"
    r = await http.send(request, stream=True)
    try:
        if r.status_code == 429:
            return "rejected_429"
        if r.status_code != 200:
            return f"fail:status {r.status_code}"
        if not stream:
            await r.aread()
            return "ok"
        keep = rng.randint(1, 5) if abort else None
        events: list[str] = []
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                events.append(line[5:].strip())
                if keep is not None and len(events) >= keep:
                    return "aborted_mid_stream"  # closing the response drops the connection
        why = stream_failed(path, events)
        if why is None:
            return "aborted_too_late" if abort else "ok"  # the stream ended first
        return f"fail:{why}"
    finally:
        await r.aclose()


async def run_soak(url: str, requests: int = 1000, concurrency: int = 16, abort_frac: float = 0.2,
                   invalid_frac: float = 0.05, max_tokens: int = 32, timeout: float = 120,
                   settle: float = 30, seed: int = 0) -> dict[str, Any]:
    args = argparse.Namespace(abort_frac=abort_frac, invalid_frac=invalid_frac,
                              max_tokens=max_tokens)
    counts: Counter = Counter()
    rng = random.Random(seed)
    seeds = [rng.randrange(2**32) for _ in range(requests)]
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        before = await replicas_state(http)
        sem = asyncio.Semaphore(concurrency)

        async def guarded(i: int) -> None:
            async with sem:
                try:
                    outcome = await asyncio.wait_for(one(http, random.Random(seeds[i]), args),
                                                     timeout)
                except TimeoutError:
                    outcome = "fail:hang"
                except httpx.HTTPError as e:
                    outcome = f"fail:{type(e).__name__}"
                counts[outcome] += 1

        start = time.perf_counter()
        await asyncio.gather(*(guarded(i) for i in range(requests)))
        elapsed = time.perf_counter() - start
        deadline = time.monotonic() + settle
        while True:  # metrics arrive twice a second; aborted requests free their pages at once
            after = await replicas_state(http)
            used = after["pdserve_kv_pages_used"]
            if not any(used.values()) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(3)  # replicas audit their allocators when idle, every 2 s
        after = await replicas_state(http)
        used = after["pdserve_kv_pages_used"]
    engine_roles = {"prefill", "decode", "colocated"}
    replicas_before = {k for k in before["pdserve_kv_pages_used"] if k[0] in engine_roles}
    replicas_after = {k for k in after["pdserve_kv_pages_used"] if k[0] in engine_roles}
    report = {
        "requests": requests, "seconds": round(elapsed, 1),
        "outcomes": dict(sorted(counts.items())),
        "failures": sum(n for k, n in counts.items() if k.startswith("fail")),
        "pages_used_after": {f"{r}/{i}": v for (r, i), v in sorted(used.items())},
        "integrity_ok": all(after["pdserve_kv_integrity_ok"].values())
        and not any(after["pdserve_kv_integrity_failures_total"].values()),
        "replicas_restarted": sorted(f"{r}/{i}" for r, i in replicas_before - replicas_after),
    }
    report["passed"] = (report["failures"] == 0 and not any(used.values())
                        and report["integrity_ok"] and not report["replicas_restarted"])
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--abort-frac", type=float, default=0.2)
    p.add_argument("--invalid-frac", type=float, default=0.05)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=120, help="per request, seconds")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    report = asyncio.run(run_soak(a.url, a.requests, a.concurrency, a.abort_frac,
                                  a.invalid_frac, a.max_tokens, a.timeout, seed=a.seed))
    print(json.dumps(report, indent=1))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
