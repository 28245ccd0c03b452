"""bench/gpu_layouts.py: the multi-GPU runs' configs (issue 17) are what `serve run` accepts and
ask for exactly the GPUs of their layout. No Ray cluster here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bench.gpu_layouts import BASE_COLO, BASE_PD, Layout, gpus, main, make_config
from serving.config import AppConfig

ROOT = Path(__file__).resolve().parents[1]


def base(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


@pytest.mark.parametrize("text, kind, counts, name", [
    ("colo:4", "colo", {"colocated": 4}, "colo4"),
    ("1:3", "pd", {"prefill": 1, "decode": 3}, "1p3d"),
    ("3:1", "pd", {"prefill": 3, "decode": 1}, "3p1d"),
    ("auto:4", "auto", {"prefill": 1, "decode": 1}, "auto4"),
])
def test_layouts_parse_into_replica_counts(text, kind, counts, name):
    layout = Layout.parse(text)
    assert (layout.kind, layout.replica_counts, layout.name) == (kind, counts, name)


@pytest.mark.parametrize("text", ["0:2", "2:0", "colo:0", "auto:1", "2x2", "pd:4"])
def test_a_bad_layout_is_refused_naming_the_forms(text):
    with pytest.raises(ValueError, match=r"colo:N .* P:D .* auto:N"):
        Layout.parse(text)


@pytest.mark.parametrize("text, n", [("colo:2", 2), ("1:1", 2), ("colo:4", 4), ("1:3", 4),
                                     ("2:2", 4), ("3:1", 4), ("auto:4", 4)])
def test_each_layout_asks_for_its_gpus_and_passes_serves_checks(text, n):
    layout = Layout.parse(text)
    cfg = make_config(base(BASE_COLO if layout.kind == "colo" else BASE_PD), layout, "nccl",
                      1000, 25)
    assert gpus(cfg) == n
    args = cfg["applications"][0]["args"]
    app = AppConfig.from_args(args)
    if layout.kind == "colo":
        assert args["colocated"]["num_replicas"] == n
    else:
        assert app.kv_transport == "nccl"
        assert (app.slo.ttft_ms, app.slo.tpot_ms) == (1000, 25)
    if layout.kind == "pd":
        assert (args["prefill"]["num_replicas"], args["decode"]["num_replicas"]) == \
            (layout.prefill, layout.decode)


def test_auto_scales_both_roles_within_the_cap_under_the_application_policy():
    cfg = make_config(base(BASE_PD), Layout.parse("auto:4"), "nccl", 1000, 25)
    app = cfg["applications"][0]
    auto = AppConfig.from_args(app["args"]).autoscaler
    assert auto.enabled and auto.max_total_replicas == 4
    assert (auto.prefill.min_replicas, auto.prefill.max_replicas) == (1, 3)
    assert (auto.decode.min_replicas, auto.decode.max_replicas) == (1, 3)
    assert app["autoscaling_policy"] == {"policy_function": "cluster.slo_autoscaler:slo_policy"}


def test_serves_deployments_entries_follow_the_layout():
    """configs/tiny.yaml fixes replica counts in `deployments:`, which win over args."""
    cfg = make_config(base("configs/tiny.yaml"), Layout.parse("2:3"), "gloo")
    deps = {d["name"]: d for d in cfg["applications"][0]["deployments"]}
    assert (deps["prefill"]["num_replicas"], deps["decode"]["num_replicas"]) == (2, 3)
    auto = make_config(base("configs/tiny.yaml"), Layout.parse("auto:3"), "gloo", 500, 50)
    deps = {d["name"]: d for d in auto["applications"][0]["deployments"]}
    assert "num_replicas" not in deps["prefill"] and "num_replicas" not in deps["decode"]
    assert deps["ingress"]["num_replicas"] == 1


def test_auto_without_an_slo_is_refused():
    with pytest.raises(ValueError, match="needs slo.ttft_ms and slo.tpot_ms"):
        make_config(base("configs/tiny.yaml"), Layout.parse("auto:3"), "gloo")


def test_a_layout_needs_a_base_of_its_mode():
    with pytest.raises(ValueError, match="needs a colocated base config"):
        make_config(base(BASE_PD), Layout.parse("colo:2"))


def test_the_cli_writes_one_config_per_layout(tmp_path, capsys):
    main(["--out-dir", str(tmp_path), "colo:2", "1:1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1p1d.yaml", "colo2.yaml"]
    out = capsys.readouterr().out
    for name in ("1p1d", "colo2"):
        assert f"{tmp_path / name}.yaml: 2 GPUs" in out
