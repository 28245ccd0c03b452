"""Serve configs for a layout of replicas over N GPUs, made from two base configs.

    python -m bench.gpu_layouts --out-dir /tmp/layouts colo:4 1:3 2:2 3:1 auto:4

Layouts (one replica per GPU):
  colo:N   N colocated replicas: the baseline at N GPUs (from `--base-colo`)
  P:D      P prefill + D decode replicas, KV over `--transport` (from `--base-pd`)
  auto:N   prefill and decode scaled to the SLO by cluster/slo_autoscaler.py, at most N
           replicas together, at least one of each (from `--base-pd`)

Each config is written as `<out-dir>/<name>.yaml` (names: colo4, 1p3d, auto4) and checked as
`serve run` checks it (pdserve's AppConfig, Serve's own schema); its GPU count is printed.
bench/gpu_multi.sh runs them (issue 17). With the tiny CPU configs as bases the same files make
a dry run on CPU: `--base-pd configs/tiny.yaml --base-colo configs/tiny-colocated.yaml`.
"""

from __future__ import annotations

import argparse
import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from serving.config import AppConfig

BASE_PD = "configs/llama3-8b-2gpu.yaml"
BASE_COLO = "configs/llama3-8b-2gpu-colocated.yaml"
_PD = re.compile(r"(\d+):(\d+)")
_N = re.compile(r"(colo|auto):(\d+)")


@dataclass(frozen=True)
class Layout:
    kind: str  # "colo", "pd" or "auto"
    prefill: int = 0
    decode: int = 0
    replicas: int = 0  # colo: colocated replicas; auto: the cap on prefill + decode

    @classmethod
    def parse(cls, text: str) -> Layout:
        if m := _PD.fullmatch(text):
            p, d = int(m[1]), int(m[2])
            if p and d:
                return cls("pd", prefill=p, decode=d)
        elif (m := _N.fullmatch(text)) and int(m[2]) >= (2 if m[1] == "auto" else 1):
            return cls(m[1], replicas=int(m[2]))
        raise ValueError(f"bad layout {text!r}: colo:N (N >= 1), P:D (both >= 1) or auto:N "
                         "(N >= 2)")

    @property
    def name(self) -> str:
        return f"{self.prefill}p{self.decode}d" if self.kind == "pd" else \
            f"{self.kind}{self.replicas}"

    @property
    def replica_counts(self) -> dict[str, int]:
        """Initial num_replicas per role (auto: one of each; the policy scales them)."""
        if self.kind == "colo":
            return {"colocated": self.replicas}
        if self.kind == "pd":
            return {"prefill": self.prefill, "decode": self.decode}
        return {"prefill": 1, "decode": 1}


def make_config(base: dict[str, Any], layout: Layout, transport: str | None = None,
                slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None,
                ingress_replicas: int | None = None) -> dict[str, Any]:
    """`base` (a whole Serve config, one application) with the layout's replica counts.
    `transport` replaces kv_transport (P/D layouts); the SLO is what auto:N scales to."""
    cfg = copy.deepcopy(base)
    (app,) = cfg["applications"]
    args = app["args"]
    want = "colocated" if layout.kind == "colo" else "disaggregated"
    if args.get("mode", "disaggregated") != want:
        raise ValueError(f"layout {layout.name} needs a {want} base config, not "
                         f"{args.get('mode')}")
    counts = dict(layout.replica_counts)
    if ingress_replicas is not None:
        counts["ingress"] = ingress_replicas
    for role, n in counts.items():
        args.setdefault(role, {})["num_replicas"] = n
        # Serve's `deployments:` entries win over args: keep them in step.
        for dep in app.get("deployments", ()):
            if dep.get("name") == role and "num_replicas" in dep:
                dep["num_replicas"] = n
    if layout.kind != "colo" and transport is not None:
        args["kv_transport"] = transport
    if layout.kind == "auto":
        cap = layout.replicas - 1
        args["autoscaler"] = {**args.get("autoscaler", {}), "enabled": True,
                              "max_total_replicas": layout.replicas,
                              "prefill": {"min_replicas": 1, "max_replicas": cap},
                              "decode": {"min_replicas": 1, "max_replicas": cap}}
        app["autoscaling_policy"] = {"policy_function": "cluster.slo_autoscaler:slo_policy"}
        for dep in app.get("deployments", ()):  # a fixed count there would pin the roles
            if dep.get("name") in ("prefill", "decode"):
                dep.pop("num_replicas", None)
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        slo = args.setdefault("slo", {})
        if slo_ttft_ms is not None:
            slo["ttft_ms"] = slo_ttft_ms
        if slo_tpot_ms is not None:
            slo["tpot_ms"] = slo_tpot_ms
    check(cfg)
    return cfg


def check(cfg: dict[str, Any]) -> None:
    """What `serve run` refuses, refused here: pdserve's args, then Serve's schema."""
    from ray.serve.schema import ServeDeploySchema

    AppConfig.from_args(cfg["applications"][0]["args"])
    ServeDeploySchema.model_validate(cfg)


def gpus(cfg: dict[str, Any]) -> float:
    """GPUs the layout asks for at most: replicas x num_gpus per serving role (auto: its cap
    on prefill + decode, at the larger of the two roles' num_gpus)."""
    args = cfg["applications"][0]["args"]
    per = {role: float(args.get(role, {}).get("ray_actor_options", {}).get("num_gpus", 0))
           for role in ("prefill", "decode", "colocated")}
    auto = args.get("autoscaler", {})
    if auto.get("enabled"):
        return auto["max_total_replicas"] * max(per["prefill"], per["decode"])
    if args.get("mode") == "colocated":
        return args["colocated"].get("num_replicas", 1) * per["colocated"]
    return sum(args.get(r, {}).get("num_replicas", 1) * per[r] for r in ("prefill", "decode"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("layouts", nargs="+", type=Layout.parse)
    ap.add_argument("--base-pd", default=BASE_PD)
    ap.add_argument("--base-colo", default=BASE_COLO)
    ap.add_argument("--transport", default="nccl", help="kv_transport of the P/D layouts")
    ap.add_argument("--slo-ttft-ms", type=float, default=1000)
    ap.add_argument("--slo-tpot-ms", type=float, default=25)
    ap.add_argument("--ingress-replicas", type=int, default=None)
    ap.add_argument("--out-dir", type=Path, required=True)
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    bases = {path: yaml.safe_load(Path(path).read_text())
             for path in (args.base_pd, args.base_colo)}
    for layout in args.layouts:
        base = bases[args.base_colo if layout.kind == "colo" else args.base_pd]
        cfg = make_config(base, layout, args.transport, args.slo_ttft_ms, args.slo_tpot_ms,
                          args.ingress_replicas)
        path = args.out_dir / f"{layout.name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        print(f"{path}: {gpus(cfg):g} GPUs")


if __name__ == "__main__":
    main()
