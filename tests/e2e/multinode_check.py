"""pdserve on a 3-node Ray cluster on this machine (ray.cluster_utils.Cluster): decode on the
head, one prefill replica on each of two worker nodes, placed by configs/tiny-multinode.yaml's
custom resources, KV over gloo channels between the nodes. Run by tests/e2e/test_multinode.py in
a process of its own (its own Ray cluster, apart from the shared e2e one); prints one JSON line.

1. greedy completions over HTTP equal HF transformers';
2. a prefill node is killed while greedy streams run: every stream ends with the clean run's
   text or with a clean error event (none hangs, none is cut silently), and later requests are
   served by the surviving prefill replica;
3. the decode pool ends with no page in use and its integrity check holds.

    python -m tests.e2e.multinode_check --model DIR --port PORT
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import httpx
import yaml

from tests.e2e.serve_apps import stream_completion

ROOT = Path(__file__).resolve().parents[2]
APP = "pdserve"
N_TOKENS = 24


def replica_nodes(deployment: str) -> list[str]:
    """Node ids of the live replicas of `deployment`. Ray's public state API needs the
    dashboard, which this test does not start; the GCS table behind it is read instead."""
    from ray._private.state import actors

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return sorted(a["Address"]["NodeID"] for a in actors().values()
                  if a.get("Name", "").startswith(prefix) and a["State"] == "ALIVE")


def prompts(n: int) -> list[list[int]]:
    return [[random.Random(i).randrange(6, 2000) for _ in range(40 + 7 * i)] for i in range(n)]


async def kill_during_streams(base: str, ps: list[list[int]], kill) -> list[tuple[str, str]]:
    """The first half of `ps` streams when `kill` runs; the second half starts right after it,
    while Serve may still route prefills to the dead replica (those are retried)."""
    first = asyncio.Event()
    half = len(ps) // 2
    async with httpx.AsyncClient(base_url=base, timeout=180) as http:
        tasks = [asyncio.create_task(stream_completion(http, p, N_TOKENS, first))
                 for p in ps[:half]]
        await asyncio.wait_for(first.wait(), 180)
        await asyncio.to_thread(kill)
        tasks += [asyncio.create_task(stream_completion(http, p, N_TOKENS, first))
                  for p in ps[half:]]
        return await asyncio.gather(*tasks)


def complete(base: str, prompt: list[int]) -> str:
    r = httpx.post(f"{base}/v1/completions", timeout=180, json={
        "prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True})
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, required=True)
    opts = ap.parse_args()

    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from transformers import AutoTokenizer

    from bench.soak import parse_metrics
    from cluster.app import build_app
    from tests.hf_reference import hf_greedy

    cfg = yaml.safe_load((ROOT / "configs/tiny-multinode.yaml").read_text())
    args = cfg["applications"][0]["args"]
    args["model"]["path"] = opts.model
    args["request_timeout_s"] = 60
    args["engine"]["num_pages"] = 256

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"pdserve_decode": 1}, "include_dashboard": False})
    # Each worker node on an address of its own (loopback aliases), so that every channel
    # end has to bind to its own node's address, as on real machines.
    workers = [cluster.add_node(num_cpus=0, resources={"pdserve_prefill": 1},
                                node_ip_address=f"127.0.0.{2 + i}") for i in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    out: dict = {}
    try:
        serve.start(proxy_location="HeadOnly",
                    http_options={"host": "127.0.0.1", "port": opts.port})
        serve.run(build_app(args), name=APP, route_prefix="/")
        base = f"http://127.0.0.1:{opts.port}"
        deadline = time.time() + 120
        while httpx.get(f"{base}/health", timeout=30).status_code != 200:
            assert time.time() < deadline, "the app never became ready"
            time.sleep(0.5)

        head, worker_ids = cluster.head_node.node_id, [w.node_id for w in workers]
        out["placement"] = {"decode_on_head": replica_nodes("decode") == [head],
                            "ingress_on_head": replica_nodes("ingress") == [head],
                            "prefill_on_workers": replica_nodes("prefill") == sorted(worker_ids)}

        tok = AutoTokenizer.from_pretrained(opts.model)
        ps = prompts(8)
        ref = [tok.decode(hf_greedy(opts.model, p, N_TOKENS), skip_special_tokens=True)
               for p in ps]
        out["equal_hf"] = [complete(base, p) == r for p, r in zip(ps[:2], ref)]

        results = asyncio.run(kill_during_streams(
            base, ps, lambda: cluster.remove_node(workers[0], allow_graceful=False)))
        out["streams"] = [status if status != "ok" else ("ok" if text == r else "wrong")
                          for (status, text), r in zip(results, ref)]
        out["errors"] = [text for status, text in results if status == "error"]
        # the surviving prefill replica serves what comes next
        out["after_kill_equal_hf"] = [complete(base, p) == r for p, r in zip(ps[2:5], ref[2:5])]
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
        out["prefill_retries"] = sum(parse_metrics(metrics, "pdserve_prefill_retries_total")
                                     .values())

        decode = serve.get_deployment_handle("decode", APP)
        audit = decode.check_integrity.remote().result(timeout_s=60)  # raises if broken
        out["decode_pages_used"] = audit["pages_used"]
    finally:
        print("MULTINODE " + json.dumps(out), flush=True)
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
