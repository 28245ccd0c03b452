"""/metrics renders replica snapshots as Prometheus text (exact output); /health follows ready()."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.prometheus import render
from api.server import build_api

pytestmark = pytest.mark.anyio

SNAPSHOTS = [
    {"role": "decode", "replica": "decode-1",
     "gauges": {"pdserve_kv_pages_total": 512, "pdserve_kv_pages_used": 3},
     "counters": {"pdserve_requests_total": 3, "pdserve_kv_transfer_bytes_total": 123},
     "histograms": {"pdserve_ttft_seconds": {"buckets": [0.01, 0.05, 1], "counts": [1, 2, 0],
                                             "sum": 1.2, "count": 4}}},
    {"role": "prefill", "replica": "prefill-0",
     "gauges": {"pdserve_kv_pages_used": 7}, "counters": {"pdserve_requests_total": 5}},
]

EXPECTED = """\
# TYPE pdserve_kv_pages_total gauge
pdserve_kv_pages_total{role="decode",replica="decode-1"} 512
# TYPE pdserve_kv_pages_used gauge
pdserve_kv_pages_used{role="decode",replica="decode-1"} 3
pdserve_kv_pages_used{role="prefill",replica="prefill-0"} 7
# TYPE pdserve_kv_transfer_bytes_total counter
pdserve_kv_transfer_bytes_total{role="decode",replica="decode-1"} 123
# TYPE pdserve_requests_total counter
pdserve_requests_total{role="decode",replica="decode-1"} 3
pdserve_requests_total{role="prefill",replica="prefill-0"} 5
# TYPE pdserve_ttft_seconds histogram
pdserve_ttft_seconds_bucket{role="decode",replica="decode-1",le="0.01"} 1
pdserve_ttft_seconds_bucket{role="decode",replica="decode-1",le="0.05"} 3
pdserve_ttft_seconds_bucket{role="decode",replica="decode-1",le="1.0"} 3
pdserve_ttft_seconds_bucket{role="decode",replica="decode-1",le="+Inf"} 4
pdserve_ttft_seconds_sum{role="decode",replica="decode-1"} 1.2
pdserve_ttft_seconds_count{role="decode",replica="decode-1"} 4
"""


class StubTokenizer:
    """Just enough tokenizer for routes that never tokenize."""

    all_special_ids: list[int] = []

    def __len__(self) -> int:
        return 16


class NoClient:
    async def generate(self, prompt_ids, params, request_id):  # pragma: no cover
        raise AssertionError("not called")
        yield


def http_for(**kw) -> httpx.AsyncClient:
    app = build_api(NoClient(), StubTokenizer(), "tiny", 64, **kw)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_render_exact() -> None:
    assert render(SNAPSHOTS) == EXPECTED
    assert render([]) == ""
    families = {f.name: f for f in text_string_to_metric_families(EXPECTED)}
    assert families["pdserve_ttft_seconds"].type == "histogram"
    assert families["pdserve_requests"].type == "counter"  # the parser drops `_total`


def test_render_labelled_series_and_escaping() -> None:
    snap = {"role": "api", "replica": 'a"b\\c\nd',
            "counters": {"pdserve_http_requests_total": [({"route": "/x", "status": "200"}, 2)]},
            "gauges": {"pdserve temp-value": 0.5, "pdserve_inf": float("inf")}}
    assert render([snap]) == (
        "# TYPE pdserve_http_requests_total counter\n"
        'pdserve_http_requests_total{role="api",replica="a\\"b\\\\c\\nd",route="/x",'
        'status="200"} 2\n'
        "# TYPE pdserve_inf gauge\n"
        'pdserve_inf{role="api",replica="a\\"b\\\\c\\nd"} +Inf\n'
        "# TYPE pdserve_temp_value gauge\n"
        'pdserve_temp_value{role="api",replica="a\\"b\\\\c\\nd"} 0.5\n')
    [family, *_] = text_string_to_metric_families(render([snap]))
    assert family.samples[0].labels["replica"] == 'a"b\\c\nd'


async def test_metrics_endpoint() -> None:
    async def source() -> list[dict]:
        return SNAPSHOTS

    async with http_for(metrics_source=source) as http:
        await http.get("/health")
        await http.get("/nowhere")
        r = await http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    lines = r.text.splitlines()
    assert set(EXPECTED.splitlines()) <= set(lines)
    api = [ln for ln in lines if 'role="api"' in ln]
    assert any('route="/health",status="200"} 1' in ln for ln in api)
    assert any('route="other",status="404"} 1' in ln for ln in api)
    assert any(ln.startswith("pdserve_metrics_source_up{") and ln.endswith(" 1") for ln in api)
    assert r.text.count("# TYPE pdserve_requests_total counter") == 1


async def test_metrics_source_sync_or_failing() -> None:
    async with http_for(metrics_source=lambda: SNAPSHOTS[1:]) as http:
        text = (await http.get("/metrics")).text
    assert 'pdserve_kv_pages_used{role="prefill",replica="prefill-0"} 7' in text

    def broken() -> list[dict]:
        raise ConnectionError("controller unreachable")

    async with http_for(metrics_source=broken) as http:
        r = await http.get("/metrics")
    assert r.status_code == 200  # a scrape still answers, and says the source is down
    assert any(ln.startswith("pdserve_metrics_source_up{") and ln.endswith(" 0")
               for ln in r.text.splitlines())


async def test_health() -> None:
    async with http_for() as http:
        r = await http.get("/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    async with http_for(ready=lambda: False) as http:
        assert (await http.get("/health")).status_code == 503

    async def warming() -> bool:
        return False

    def broken() -> bool:
        raise RuntimeError("no replicas")

    for ready in (warming, broken):
        async with http_for(ready=ready) as http:
            r = await http.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "unavailable"}
