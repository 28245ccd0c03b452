"""Prometheus text exposition (format 0.0.4) from per-replica metric snapshots.

A snapshot is plain data:

    {"role": "decode", "replica": "decode-1",
     "gauges": {"pdserve_kv_pages_used": 3, ...},
     "counters": {"pdserve_requests_total": 7, ...},
     "histograms": {"pdserve_ttft_seconds": {"buckets": [0.01, 0.1], "counts": [2, 1],
                                             "sum": 0.2, "count": 4}}}

Histogram `counts` are per bucket (not cumulative), one per finite upper bound; observations
above the last bound are `count - sum(counts)`. A gauge or counter value may also be a list of
`(labels, value)` pairs for series with extra labels. Every series gets `role` and `replica`
labels; series of one metric from all replicas are grouped under one `# TYPE` line.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BAD_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_:]")


def _name(name: str) -> str:
    name = _BAD_NAME_CHARS.sub("_", str(name))
    return "_" + name if name[:1].isdigit() else name


def _num(v: Any) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def _escape(value: Any) -> str:
    return str(value).replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _labels(labels: dict[str, Any]) -> str:
    inner = ",".join(f'{_name(k)}="{_escape(v)}"' for k, v in labels.items())
    return "{" + inner + "}" if inner else ""


def _series(value: Any) -> list[tuple[dict[str, Any], Any]]:
    if isinstance(value, (list, tuple)):
        return [(dict(labels), v) for labels, v in value]
    return [({}, value)]


def _histogram(name: str, base: dict[str, Any], h: dict[str, Any]) -> list[str]:
    lines, cumulative = [], 0
    for bound, count in zip(h["buckets"], h["counts"]):
        cumulative += count
        lines.append(f"{name}_bucket{_labels({**base, 'le': _num(float(bound))})} "
                     f"{_num(cumulative)}")
    lines.append(f"{name}_bucket{_labels({**base, 'le': '+Inf'})} {_num(h['count'])}")
    lines.append(f"{name}_sum{_labels(base)} {_num(h['sum'])}")
    lines.append(f"{name}_count{_labels(base)} {_num(h['count'])}")
    return lines


def render(snapshots: list[dict[str, Any]]) -> str:
    families: dict[str, tuple[str, list[str]]] = {}

    def family(name: str, kind: str) -> list[str] | None:
        known = families.setdefault(name, (kind, []))
        if known[0] != kind:
            log.warning("metric %s is both a %s and a %s; dropping the %s", name, known[0],
                        kind, kind)
            return None
        return known[1]

    for snap in snapshots:
        base = {"role": snap.get("role", ""), "replica": snap.get("replica", "")}
        for kind, key in (("gauge", "gauges"), ("counter", "counters")):
            for raw, value in (snap.get(key) or {}).items():
                name = _name(raw)
                lines = family(name, kind)
                if lines is not None:
                    lines += [f"{name}{_labels({**base, **extra})} {_num(v)}"
                              for extra, v in _series(value)]
        for raw, h in (snap.get("histograms") or {}).items():
            name = _name(raw)
            lines = family(name, "histogram")
            if lines is not None:
                lines += _histogram(name, base, h)

    out: list[str] = []
    for name in sorted(families):
        kind, lines = families[name]
        out.append(f"# TYPE {name} {kind}")
        out += lines
    return "\n".join(out) + "\n" if out else ""
