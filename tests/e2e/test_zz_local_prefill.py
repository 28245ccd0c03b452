"""`decode.local_prefill_max_tokens` end to end: an application of its own whose decode replica
prefills short prompts itself gives the same tokens as the shared `pd` application (every
prompt through its prefill replica), and /metrics counts the local prefill and times its first
token apart. Deadlines are hang guards only."""

from __future__ import annotations

import httpx
from ray import serve

from tests.e2e.conftest import app_args
from tests.e2e.serve_apps import counter, deploy, serving, wait_until

APP, ROUTE = "localpf", "/localpf"
LOCAL = "pdserve_local_prefills_total"
LOCAL_TTFT = "pdserve_local_prefill_ttft_seconds_count"


def _completion(base: str, prompt: list[int]) -> str:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_a_short_prompt_is_prefilled_on_the_decode_replica(cluster):
    args = app_args(cluster["model_dir"], "disaggregated")
    args["decode"] = {"local_prefill_max_tokens": 8}
    deploy({"applications": [{"name": APP, "route_prefix": ROUTE,
                              "import_path": "cluster.app:build_app", "args": args}]})
    base = cluster["base"] + ROUTE
    try:
        wait_until("the app", lambda: serving(APP, base))
        before = counter(base, LOCAL)  # the shared apps never prefill on a decode replica
        timed = counter(base, LOCAL_TTFT)
        prompt = [11, 12, 13, 14, 15, 16]
        assert _completion(base, prompt) == _completion(cluster["base"], prompt)
        wait_until("the local prefill on /metrics", lambda: counter(base, LOCAL) == before + 1)
        # its first token timed apart too (through the replica's output sink)
        wait_until("its TTFT on /metrics", lambda: counter(base, LOCAL_TTFT) == timed + 1)
    finally:
        serve.delete(APP)  # its replicas leave /metrics (the pages-freed test reads it)
