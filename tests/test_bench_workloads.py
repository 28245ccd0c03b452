"""bench.workloads and bench.loadgen.arrival_offsets: deterministic requests and schedules."""

from __future__ import annotations

import math
import random

import pytest

from bench.loadgen import arrival_offsets
from bench.workloads import LengthDist, PromptMaker, WorkloadConfig, build_workload, shared_prefix


def test_length_dist_parse_and_sample() -> None:
    rng = random.Random(0)
    assert LengthDist.parse("128") == LengthDist("fixed", 128)
    assert LengthDist.parse("fixed:64").sample(rng) == 64
    uni = LengthDist.parse("uniform:10:20")
    xs = [uni.sample(rng) for _ in range(500)]
    assert min(xs) == 10 and max(xs) == 20
    norm = LengthDist.parse("normal:100:50:40:150")
    xs = [norm.sample(rng) for _ in range(2000)]
    assert min(xs) == 40 and max(xs) == 150  # clipped at both ends
    assert 90 < sum(xs) / len(xs) < 110
    assert min(LengthDist.parse("normal:2:10").sample(rng) for _ in range(200)) == 1
    for bad in ("", "uniform:5", "uniform:9:3", "gamma:1:2", "fixed:0", "normal:a:b"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


@pytest.mark.parametrize("name", ["synthetic", "shared-prefix", "long-prompt"])
@pytest.mark.parametrize("fmt", ["ids", "text"])
def test_same_seed_same_requests(name: str, fmt: str) -> None:
    cfg = WorkloadConfig(name, num_prompts=12, input_len="uniform:5:40", output_len="normal:8:4",
                         num_groups=3, group_size=4, prefix_len=16, suffix_len=4,
                         prompt_format=fmt, vocab_size=50)
    a, b = build_workload(cfg, "7:2:None:0"), build_workload(cfg, "7:2:None:0")
    assert a == b and len(a) == 12
    assert build_workload(cfg, "7:4:None:0") != a  # another run, other prompts
    for spec in a:
        assert spec.output_len >= 1
        if fmt == "ids":
            assert len(spec.prompt) == spec.prompt_len
            assert all(0 <= t < 50 for t in spec.prompt)
        else:
            assert isinstance(spec.prompt, str)
            assert len(spec.prompt.split()) == spec.prompt_len


def test_long_prompt_defaults() -> None:
    specs = build_workload(WorkloadConfig("long-prompt", num_prompts=3), 0)
    assert [(s.prompt_len, s.output_len) for s in specs] == [(2048, 16)] * 3
    specs = build_workload(WorkloadConfig("synthetic", num_prompts=2), 0)
    assert [(s.prompt_len, s.output_len) for s in specs] == [(128, 128)] * 2


def test_shared_prefix_groups_share_prefix_and_interleave() -> None:
    rng = random.Random(1)
    out = LengthDist.parse("4")
    specs = shared_prefix(3, 5, prefix_len=20, suffix_len=6, output_len=out,
                          maker=PromptMaker("ids", 1000), rng=rng)
    assert len(specs) == 15
    assert [s.group for s in specs] == [0, 1, 2] * 5  # round-robin in time
    prefixes = {}
    for s in specs:
        assert len(s.prompt) == 26 and s.prompt_len == 26
        prefixes.setdefault(s.group, set()).add(tuple(s.prompt[:20]))
    assert all(len(p) == 1 for p in prefixes.values())  # one prefix per group
    assert len({next(iter(p)) for p in prefixes.values()}) == 3  # distinct across groups
    assert len({tuple(s.prompt[20:]) for s in specs}) == 15  # unique suffixes


def test_shared_prefix_text() -> None:
    specs = shared_prefix(2, 3, 10, 3, LengthDist.parse("2"), PromptMaker("text"),
                          random.Random(0))
    for s in specs:
        same_group = [t for t in specs if t.group == s.group]
        assert {" ".join(t.prompt.split()[:10]) for t in same_group} == {
            " ".join(s.prompt.split()[:10])
        }
        assert len(s.prompt.split()) == 13


def test_workload_config_validates() -> None:
    with pytest.raises(ValueError):
        WorkloadConfig("nope")
    with pytest.raises(ValueError):
        WorkloadConfig(input_len="uniform:1")
    with pytest.raises(ValueError):
        WorkloadConfig(prompt_format="bytes")


def test_arrival_offsets_deterministic_poisson() -> None:
    a = arrival_offsets(4000, rate=8.0, seed=3)
    assert a == arrival_offsets(4000, rate=8.0, seed=3)
    assert a != arrival_offsets(4000, rate=8.0, seed=4)
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:]))
    gaps = [y - x for x, y in zip(a, a[1:])]
    mean = sum(gaps) / len(gaps)
    assert mean == pytest.approx(1 / 8, rel=0.05)
    # exponential: the coefficient of variation is 1
    var = sum((g - mean) ** 2 for g in gaps) / len(gaps)
    assert math.sqrt(var) / mean == pytest.approx(1.0, abs=0.08)
    # burstiness > 1 is more regular than Poisson, at the same mean rate
    b = arrival_offsets(4000, rate=8.0, seed=3, burstiness=4.0)
    bg = [y - x for x, y in zip(b, b[1:])]
    bmean = sum(bg) / len(bg)
    assert bmean == pytest.approx(1 / 8, rel=0.05)
    assert math.sqrt(sum((g - bmean) ** 2 for g in bg) / len(bg)) / bmean < 0.6
    assert arrival_offsets(5, math.inf) == [0.0] * 5
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0)
