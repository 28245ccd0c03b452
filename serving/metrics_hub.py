"""A named Ray actor that collects every replica's metrics snapshot for `/metrics`.

Replicas push a snapshot twice a second; the ingress reads them all. Snapshots that stop
arriving (replica gone) age out, so a scaled-down or dead replica disappears from `/metrics`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import ray

HUB_NAME = "pdserve-metrics-hub"
HUB_NAMESPACE = "pdserve"
STALE_AFTER_S = 10.0
PUSH_EVERY_S = 0.5


@ray.remote(num_cpus=0)
class MetricsHub:
    def __init__(self) -> None:
        self.snapshots: dict[tuple[str, str], tuple[float, dict]] = {}

    def push(self, snapshot: dict) -> None:
        self.snapshots[(snapshot["role"], snapshot["replica"])] = (time.monotonic(), snapshot)

    def collect(self) -> list[dict]:
        now = time.monotonic()
        self.snapshots = {k: v for k, v in self.snapshots.items() if now - v[0] < STALE_AFTER_S}
        return [snap for _, snap in sorted(self.snapshots.values(), key=lambda v: (
            v[1]["role"], v[1]["replica"]))]


def get_hub():
    return MetricsHub.options(name=HUB_NAME, namespace=HUB_NAMESPACE, get_if_exists=True,
                              lifetime="detached").remote()


def start_pushing(snapshot: Callable[[], dict]) -> threading.Event:
    """Push `snapshot()` to the hub from a daemon thread until the returned event is set."""
    stop = threading.Event()
    hub = get_hub()

    def run() -> None:
        while not stop.wait(PUSH_EVERY_S):
            try:
                hub.push.remote(snapshot())
            except Exception:  # the hub restarting must not take the replica down
                time.sleep(PUSH_EVERY_S)

    threading.Thread(target=run, name="pdserve-metrics-push", daemon=True).start()
    return stop


async def collect_snapshots() -> list[dict]:
    return await get_hub().collect.remote()
