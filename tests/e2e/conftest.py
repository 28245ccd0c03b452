"""One running Serve cluster shared by every end-to-end test (start-up costs ~20 s).

Two applications on one Ray instance: the disaggregated app (1 prefill + 1 decode replica) at
`/` and the colocated baseline at `/colocated`, both over the same tiny model, behind Serve's
HAProxy ingress as `make serve` runs them (`RAY_SERVE_ENABLE_HA_PROXY=0` in the environment:
behind Serve's Python proxy).
"""

from __future__ import annotations

import os
import time

import httpx
import pytest

from api.grpc_service import SERVICER_FUNCTION
from bench.launcher import serve_env
from bench.ports import free_port as _free_port
from engine.tiny_model import make_tiny_model


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)

ZERO_CPU = {"ray_actor_options": {"num_cpus": 0}}




def app_args(model_dir: str, mode: str) -> dict:
    """The colocated app sends many requests a Serve call (`submit_batch`), the disaggregated
    one a call per request: the e2e tests cover both."""
    return {"mode": mode, "model": {"path": model_dir},
            "submit_batch": 32 if mode == "colocated" else 1,
            "engine": {"page_size": 16, "num_pages": 512, "max_num_batched_tokens": 512},
            "prefill": ZERO_CPU, "decode": ZERO_CPU, "colocated": ZERO_CPU, "ingress": ZERO_CPU,
            "request_timeout_s": 120}


@pytest.fixture(scope="session")
def e2e_model(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("e2e") / "tiny-llama", "llama", 0))


def haproxy_env() -> dict[str, str]:
    """The HTTP path users get (`make serve`): Serve's HAProxy ingress, read by the Ray
    processes that ray.init starts. Its stats and metrics ports are free ones instead of the
    fixed 8404 / 9101, and a stopping ingress replica stays reachable for 2 s instead of 30 s
    (long enough for HAProxy on this one node to drop it; the redeploy tests wait for it)."""
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "0":  # Serve's Python proxy, on request
        return {}
    return {**serve_env(),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


@pytest.fixture(scope="session")
def cluster(e2e_model):
    ray = pytest.importorskip("ray")
    from ray import serve

    from cluster.app import build_app

    port, grpc_port = _free_port(), _free_port()
    while grpc_port == port:
        grpc_port = _free_port()
    os.environ.update(haproxy_env())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]})
    serve.run(build_app(app_args(e2e_model, "disaggregated")), name="pd", route_prefix="/")
    serve.run(build_app(app_args(e2e_model, "colocated")), name="colo",
              route_prefix="/colocated")
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if all(httpx.get(f"{base}{p}/health").status_code == 200 for p in ("", "/colocated")):
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    # gRPC (tests/e2e/test_zz_grpc.py): the `application` metadata names "pd" or "colo".
    yield {"base": base, "colocated": f"{base}/colocated", "model_dir": e2e_model,
           "grpc": f"127.0.0.1:{grpc_port}"}
    serve.shutdown()
    ray.shutdown()
